"""dare(): drop with probability p, rescale survivors by 1/(1-p), with a counter-based mask."""

from __future__ import annotations

import math

import pytest
import torch

from mergelang import rng
from mergelang.check import TensorPlan
from mergelang.execute import ExecOptions, evaluate_in_memory
from mergelang.graph import Node, const, with_random_key
from mergelang.ops import OPS, KernelContext

X = torch.tensor([[1.0, -2.0, 3.0], [0.5, 0.0, -4.0]])


def dare_node(p: float, seed: int = 0) -> Node:
    return with_random_key(Node("dare", [Node("load", (), {"model": "x"}), const(p), const(seed)]))


def run_dare(x: torch.Tensor, p: float, *, seed: int = 0, run_seed: int = 0, chunk: int = 1 << 20,
             name: str = "t.weight") -> torch.Tensor:
    """Evaluate dare(x) through the executor's chunked path."""
    tp = TensorPlan(name, dare_node(p, seed), tuple(x.shape), "F32")
    return evaluate_in_memory(tp, {"x": x.float()}, ExecOptions(seed=run_seed, chunk=chunk))


def test_vectorized_draws_match_python_reference():
    key = rng.derive_key(7, "model.layers.0.mlp.up_proj.weight", b"digest")
    for start in (0, 12345, 2**31 - 100, 2**32 - 100, 2**40):  # crossing the int32 sign and 2^32 boundaries
        got = rng.draws(key, start, 257).tolist()
        assert got == [rng.reference_draw(key, start + i) for i in range(257)]


def test_mixer_is_lowbias32():
    """The unkeyed core is the lowbias32 finalizer; values computed by hand from its definition."""
    assert rng._mix32(0) == 0
    # 1 → *0x7feb352d = 0x7feb352d → ^ (>> 15) = 0x7febcafb → *0x846ca68b mod 2^32 = 0x6889f849 → ^ (>> 16)
    x = (0x7FEB352D ^ (0x7FEB352D >> 15)) * 0x846CA68B & 0xFFFFFFFF
    assert rng._mix32(1) == x ^ (x >> 16) == 0x688990C0


def test_draws_are_uniform_and_independent_across_keys():
    n = 1 << 20
    a = rng.draws(1, 0, n).double() / 2**32
    b = rng.draws(2, 0, n).double() / 2**32
    sigma = (1 / 12 / n) ** 0.5
    assert abs(a.mean().item() - 0.5) < 5 * sigma
    assert abs(torch.corrcoef(torch.stack([a, b]))[0, 1].item()) < 5 / n**0.5
    hist = torch.histc(a, bins=16, min=0, max=1)
    assert (hist - n / 16).abs().max().item() < 5 * (n / 16) ** 0.5


def test_hand_made_tensor_entries_are_zero_or_rescaled():
    p = 0.5
    out = run_dare(X, p)
    for got, x in zip(out.view(-1).tolist(), X.view(-1).tolist()):
        assert got == 0.0 or got == pytest.approx(x / (1 - p), rel=0, abs=0)


def test_mask_matches_an_independent_reference():
    """Recompute the mask with the pure-Python hash and compare entry by entry."""
    p, run_seed, name = 0.3, 11, "model.layers.1.self_attn.q_proj.weight"
    x = torch.arange(1, 201, dtype=torch.float32).view(10, 20)
    out = run_dare(x, p, run_seed=run_seed, name=name)
    key = rng.derive_key(run_seed, name, bytes.fromhex(dare_node(p).attr("key")))
    limit = round((1 - p) * 2**32)
    expected = [v / (1 - p) if rng.reference_draw(key, i) < limit else 0.0
                for i, v in enumerate(x.view(-1).tolist())]
    assert out.view(-1).tolist() == pytest.approx(expected, rel=1e-7)


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9, 0.99])
def test_kept_fraction_within_four_sigma(p):
    n = 1_000_000
    out = run_dare(torch.ones(n), p, run_seed=3)
    kept = (out != 0).double().mean().item()
    sigma = math.sqrt(p * (1 - p) / n)
    assert abs(kept - (1 - p)) < 4 * sigma
    assert torch.allclose(out[out != 0], torch.tensor(1 / (1 - p)))


def test_p_zero_is_identity():
    assert torch.equal(run_dare(X, 0.0), X)


def test_seeds():
    x = torch.randn(10_000)
    a, b = run_dare(x, 0.5, run_seed=1), run_dare(x, 0.5, run_seed=1)
    assert torch.equal(a, b)
    assert not torch.equal(a, run_dare(x, 0.5, run_seed=2))  # another run seed
    assert not torch.equal(a, run_dare(x, 0.5, seed=1, run_seed=1))  # explicit op seed: independent mask
    assert not torch.equal(a, run_dare(x, 0.5, run_seed=1, name="other.weight"))  # another tensor


@pytest.mark.parametrize("chunk", [1, 7, 4096, 10_001])
@pytest.mark.parametrize("shape", [(10_001,), (73, 137)])
def test_mask_does_not_depend_on_chunk_size(chunk, shape):
    x = torch.randn(shape)
    whole = run_dare(x, 0.7, run_seed=5)
    assert torch.equal(run_dare(x, 0.7, run_seed=5, chunk=chunk), whole)
    assert torch.equal(run_dare(x.reshape(-1), 0.7, run_seed=5, chunk=chunk).reshape(shape), whole)


def test_mask_does_not_depend_on_thread_count():
    x = torch.randn(300_000)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run_dare(x, 0.9, run_seed=5)
        torch.set_num_threads(max(2, before))
        many = run_dare(x, 0.9, run_seed=5)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, many)


def test_keep_probability_is_not_rounded_to_the_tensor_dtype():
    """mergekit draws its mask in the tensor dtype, so bf16 rounds 0.9 to 0.8984375; here it is exact to 2^-32."""
    assert rng.threshold(0.1) == round(0.1 * 2**32)
    assert rng.threshold(1.0) == 2**32 and rng.threshold(0.0) == 0
    n = 1 << 22
    kept = rng.keep_mask(5, 0, n, 0.9).double().mean().item()
    assert abs(kept - 0.9) < 4 * (0.09 / n) ** 0.5 and abs(kept - 0.8984375) > 4 * (0.09 / n) ** 0.5


def test_kernel_registry_entry():
    spec = OPS["dare"]
    assert [p.name for p in spec.params] == ["p", "seed"] and spec.random
    assert spec.params[0].check(1.0) == "must be in [0, 1)" and spec.params[0].check(0.0) is None
    ctx = KernelContext(key=123)
    out = spec.kernel(ctx, torch.ones(1000), p=0.25, seed=0)
    expected = torch.where(rng.keep_mask(123, 0, 1000, 0.75), torch.tensor(1 / 0.75), torch.tensor(0.0))
    assert torch.equal(out, expected)
