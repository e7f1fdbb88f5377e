"""Outputs that transformers loads as the model the formula describes.

Tiny random Llama, Mistral and Qwen2 models (Qwen2 has q/k/v biases) are built from configs and
saved with save_pretrained; each merge's output is loaded with from_pretrained and compared with a
model whose state dict the test computes itself (or with the base, for a zero delta).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import write_spec
from mergelang.api import RunOptions, check, run
from mergelang.diagnostics import MergelangError, Reporter

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

IDS = torch.tensor([[1, 5, 9, 2, 7, 3, 11, 4]])
ARCHS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "mistral": ("MistralConfig", "MistralForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
}


def make_model(folder: Path, arch: str = "llama", *, seed: int = 0, vocab: int = 64, tie: bool = False,
               dtype: torch.dtype = torch.float32, hidden: int = 32):
    config_cls, model_cls = (getattr(transformers, n) for n in ARCHS[arch])
    config = config_cls(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab,
                        max_position_embeddings=64, tie_word_embeddings=tie)
    torch.manual_seed(seed)
    model = model_cls(config).to(dtype).eval()
    with torch.no_grad():  # random norms too, so that every tensor matters
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * 0.05 + (1.0 if "norm" in name else 0.0))
    model.save_pretrained(folder)
    return model


def perturb(model, folder: Path, *, seed: int, vocab: int | None = None, std: float = 0.01):
    """A fine-tune of `model`: its weights plus noise; with `vocab`, rows appended to the embeddings."""
    torch.manual_seed(seed)
    config = model.config.__class__.from_dict(model.config.to_dict())
    if vocab is not None:
        config.vocab_size = vocab
    ft = type(model)(config).to(model.dtype).eval()
    base_sd = model.state_dict()
    with torch.no_grad():
        for name, p in ft.named_parameters():
            b = base_sd[name]
            p.copy_(torch.randn_like(p) * 0.05)
            p[: b.shape[0]] = b + torch.randn_like(b) * std
    ft.save_pretrained(folder)
    return ft


def make_tokenizer(folder: Path, n: int, rename: dict[int, str] | None = None) -> None:
    """A WordLevel tokenizer of n tokens ("[UNK]", "t1", ..., with some ids renamed)."""
    names = ["[UNK]"] + [f"t{i}" for i in range(1, n)]
    for i, t in (rename or {}).items():
        names[i] = t
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({t: i for i, t in enumerate(names)}, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(folder)


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def merge(tmp: Path, text: str, reporter: Reporter | None = None, **options) -> Path:
    spec = write_spec(tmp, text)
    plan = check(spec, RunOptions(**options), reporter)
    try:
        from mergelang.api import write_plan

        return write_plan(plan, tmp / "out", RunOptions(**options))
    finally:
        plan.close()


def load(folder: Path, dtype=None):
    return transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def with_state(like, state: dict[str, torch.Tensor]):
    model = type(like)(like.config).to(like.dtype).eval()
    model.load_state_dict(state, strict=False)
    model.tie_weights()
    return model


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("arch", list(ARCHS))
def test_zero_delta_gives_the_base(tmp_path, arch, dtype):
    base = make_model(tmp_path / "base", arch, dtype=dtype)
    perturb(base, tmp_path / "ft", seed=1)
    out = merge(tmp_path, 'base = model("base")\nft = model("ft")\noutput base + 0 * (ft - base)\n')
    merged = load(out)
    assert merged.dtype == dtype
    assert torch.equal(logits(merged), logits(load(tmp_path / "base")))
    if arch == "qwen2":
        assert "model.layers.0.self_attn.q_proj.bias" in tensors(out)


def test_real_merge_generates_like_the_computed_model(tmp_path):
    base = make_model(tmp_path / "base", "qwen2")
    ft0 = perturb(base, tmp_path / "ft0", seed=1, std=0.05)
    ft1 = perturb(base, tmp_path / "ft1", seed=2, std=0.05)
    out = merge(tmp_path, 'base = model("base")\nft0 = model("ft0")\nft1 = model("ft1")\n'
                          "output base + avg(ft0 - base, ft1 - base)\n")
    b, s0, s1 = base.state_dict(), ft0.state_dict(), ft1.state_dict()
    expected = {k: b[k] + ((s0[k] - b[k]) + (s1[k] - b[k])) / 2 for k in b}
    written = tensors(out)
    for k, v in written.items():
        torch.testing.assert_close(v, expected[k], rtol=0, atol=1e-6)
    reference = with_state(base, expected)
    prompt = IDS[:, :4]
    want = reference.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)
    got = load(out).generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(got, want)
    assert not torch.equal(logits(reference), logits(base))  # the merge moved the model


def test_tied_models_give_a_tied_output(tmp_path):
    base = make_model(tmp_path / "base", tie=True)
    ft = perturb(base, tmp_path / "ft", seed=1)
    assert "lm_head.weight" not in tensors(tmp_path / "base")
    out = merge(tmp_path, 'base = model("base")\nft = model("ft")\noutput base + 0.5 * (ft - base)\n')
    written = tensors(out)
    assert "lm_head.weight" not in written
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is True
    b, f = base.state_dict(), ft.state_dict()
    expected = {k: b[k] + 0.5 * (f[k] - b[k]) for k in written}
    merged = load(out)
    assert torch.equal(merged.lm_head.weight, merged.model.embed_tokens.weight)
    torch.testing.assert_close(logits(merged), logits(with_state(base, expected)), rtol=0, atol=1e-5)


def test_untied_reference_merges_a_tied_models_embeddings_as_its_head(tmp_path):
    base = make_model(tmp_path / "base", tie=False)
    tied = make_model(tmp_path / "ft", seed=3, tie=True)
    reporter = Reporter()
    out = merge(tmp_path, 'base = model("base")\nft = model("ft")\noutput base + 0.5 * (ft - base)\n', reporter)
    head = tensors(out)["lm_head.weight"]
    b, t = base.state_dict()["lm_head.weight"], tied.state_dict()["model.embed_tokens.weight"]
    torch.testing.assert_close(head, b + 0.5 * (t - b), rtol=0, atol=1e-7)
    assert any("`ft` ties lm_head" in w.message for w in reporter.warnings)


def test_tied_reference_leaves_an_untied_head_out_with_a_warning(tmp_path):
    make_model(tmp_path / "base", tie=True)
    make_model(tmp_path / "ft", seed=3, tie=False)
    reporter = Reporter()
    out = merge(tmp_path, 'base = model("base")\nft = model("ft")\noutput base + 0.5 * (ft - base)\n', reporter)
    assert "lm_head.weight" not in tensors(out)
    (warning,) = [w for w in reporter.warnings if "lm_head" in w.message]
    assert warning.message == ("`base` ties lm_head to the input embeddings, so the output does too; "
                               "the lm_head.weight of `ft` is left out")


@pytest.fixture()
def two_vocabs(tmp_path):
    """base: 64 tokens; ft: the same 64 plus 8 appended (rows 0..63 are base's rows plus noise)."""
    base = make_model(tmp_path / "base", vocab=64)
    ft = perturb(base, tmp_path / "ft", seed=1, vocab=72)
    make_tokenizer(tmp_path / "base", 64)
    make_tokenizer(tmp_path / "ft", 72)
    return tmp_path, base.state_dict(), ft.state_dict()


SPEC_VOCAB = 'base = model("base")\nft = model("ft")\noutput base + 0.5 * (ft - base){options}\n'


def test_two_vocabularies_keep_the_common_rows(two_vocabs):
    tmp, b, f = two_vocabs
    reporter = Reporter()
    out = merge(tmp, SPEC_VOCAB.format(options=""), reporter)
    written = tensors(out)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        assert torch.equal(written[name], b[name] + 0.5 * (f[name][:64] - b[name]))
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 64
    assert any("rows they have in common" in w.message for w in reporter.warnings)
    assert load(out).model.embed_tokens.weight.shape == (64, 32)


@pytest.mark.parametrize("chunk", [1 << 18, 32 * 5], ids=["one-chunk", "5-row-chunks"])
def test_tokenizer_model_gives_its_vocabulary(two_vocabs, chunk):
    tmp, b, f = two_vocabs
    reporter = Reporter()
    out = merge(tmp, SPEC_VOCAB.format(options=", tokenizer=ft"), reporter, chunk=chunk)
    written = tensors(out)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        expected = f[name].clone()
        expected[:64] = b[name] + 0.5 * (f[name][:64] - b[name])
        assert torch.equal(written[name], expected)
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 72
    assert (out / "tokenizer.json").read_bytes() == (tmp / "ft" / "tokenizer.json").read_bytes()
    (warning,) = reporter.warnings
    assert "rows 0..63 are merged, rows 64..71 are copied from `ft`" in warning.message
    assert load(out).model.embed_tokens.weight.shape == (72, 32)


def test_a_smaller_tokenizer_model_cuts_the_vocabulary(two_vocabs):
    """The formula's models have 72 rows (ft first), the tokenizer model 64: the output has 64."""
    tmp, b, f = two_vocabs
    spec = 'base = model("base")\nft = model("ft")\noutput ft + 0.5 * (base - ft), tokenizer=base\n'
    out = merge(tmp, spec)
    written = tensors(out)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        assert torch.equal(written[name], f[name][:64] + 0.5 * (b[name] - f[name][:64]))
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 64
    assert (out / "tokenizer.json").read_bytes() == (tmp / "base" / "tokenizer.json").read_bytes()


def test_disagreeing_tokenizers_are_named(two_vocabs):
    tmp, _, _ = two_vocabs
    make_tokenizer(tmp / "base", 64, rename={17: "seventeen"})
    reporter = Reporter()
    merge(tmp, SPEC_VOCAB.format(options=", tokenizer=ft"), reporter)
    messages = [w.message for w in reporter.warnings]
    assert any("disagree at id 17: 't17' vs 'seventeen'" in m for m in messages), messages
    # one vocabulary size: the check runs all the same
    make_model(tmp / "same", seed=5, vocab=64)
    make_tokenizer(tmp / "same", 64, rename={3: "three"})
    reporter = Reporter()
    (tmp / "out").rename(tmp / "out-before")
    merge(tmp, 'base = model("base")\nsame = model("same")\noutput base + 0 * same, tokenizer=same\n', reporter)
    assert [w.message for w in reporter.warnings] == [
        "the tokenizers of `same` and `base` disagree at id 3: 'three' vs 't3'; their embedding rows are "
        "merged all the same, row by row"]


def test_tokenizer_config_and_chat_template_options(tmp_path):
    make_model(tmp_path / "base")
    ft = make_model(tmp_path / "ft", seed=2)
    make_tokenizer(tmp_path / "base", 64)
    make_tokenizer(tmp_path / "ft", 64, rename={5: "five"})
    ft.generation_config.max_new_tokens = 17
    ft.generation_config.save_pretrained(tmp_path / "ft")
    (tmp_path / "chat.jinja").write_text("{% for m in messages %}<{{ m.content }}>{% endfor %}")
    spec = ('base = model("base")\nft = model("ft")\n'
            'output base + 0.5 * (ft - base), tokenizer=ft, config=ft, chat_template="chat.jinja"\n')
    out = merge(tmp_path, spec)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (out / name).read_bytes() == (tmp_path / "ft" / name).read_bytes(), name
    assert json.loads((out / "generation_config.json").read_text())["max_new_tokens"] == 17
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert tok.convert_ids_to_tokens(5) == "five"
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == "<hi>"

    inline = 'output base, chat_template="[{{ messages[0].content }}]"'
    (tmp_path / "out2").mkdir()
    out2 = merge(tmp_path / "out2", f'base = model("../base")\n{inline}\n')
    assert (out2 / "chat_template.jinja").read_text() == "[{{ messages[0].content }}]"
    tok2 = transformers.AutoTokenizer.from_pretrained(out2)
    assert tok2.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False) == "[x]"


def _config_matches_tensors(out: Path) -> dict:
    config = json.loads((out / "config.json").read_text())
    written = tensors(out)
    dtypes = {str(t.dtype).removeprefix("torch.") for t in written.values()}
    assert {config.get("dtype", config.get("torch_dtype")), config["torch_dtype"]} == dtypes
    layers = {int(k.split(".")[2]) for k in written if k.startswith("model.layers.")}
    assert config["num_hidden_layers"] == len(layers) == max(layers) + 1
    assert config["vocab_size"] == written["model.embed_tokens.weight"].shape[0]
    return config


def test_dtype_option_and_cli_override(tmp_path):
    make_model(tmp_path / "base")
    make_model(tmp_path / "ft", seed=2)
    spec = 'base = model("base")\nft = model("ft")\noutput base + 0.5 * (ft - base), dtype="bf16"\n'
    out = merge(tmp_path, spec)
    assert _config_matches_tensors(out)["torch_dtype"] == "bfloat16"
    assert load(out).dtype == torch.bfloat16
    (tmp_path / "again").mkdir()
    write_spec(tmp_path / "again", spec.replace('"base"', '"../base"').replace('"ft"', '"../ft"'))
    out2 = run(tmp_path / "again" / "spec.ml", tmp_path / "again" / "out", RunOptions(dtype="fp16"))
    assert _config_matches_tensors(out2)["torch_dtype"] == "float16"


def test_config_from_another_model_follows_the_tensors(tmp_path):
    """config= a model with another vocabulary size and layer count: the written config matches the tensors."""
    make_model(tmp_path / "base", vocab=64)
    other = tmp_path / "other"
    other.mkdir()
    config = json.loads((tmp_path / "base" / "config.json").read_text())
    config.update(vocab_size=100, num_hidden_layers=5, rope_theta=1234.0)
    (other / "config.json").write_text(json.dumps(config))
    save_file({"x": torch.zeros(1)}, other / "model.safetensors")
    out = merge(tmp_path, 'base = model("base")\nother = model("other")\noutput base, config=other\n')
    written = _config_matches_tensors(out)
    assert written["rope_theta"] == 1234.0 or written.get("rope_parameters", {}).get("rope_theta") == 1234.0


def test_config_of_a_tied_model_for_an_untied_output(tmp_path):
    make_model(tmp_path / "base", tie=False)
    make_model(tmp_path / "tied", seed=3, tie=True)
    out = merge(tmp_path, 'base = model("base")\ntied = model("tied")\noutput base, config=tied\n')
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    assert torch.equal(logits(load(out)), logits(load(tmp_path / "base")))


def test_rotary_caches_are_skipped_and_missing_weights_named(tmp_path):
    make_model(tmp_path / "base")
    make_model(tmp_path / "ft", seed=2)
    extra = tensors(tmp_path / "base")
    extra["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(4)
    save_file(extra, tmp_path / "base" / "model.safetensors", metadata={"format": "pt"})
    reporter = Reporter()
    out = merge(tmp_path, 'base = model("base")\nft = model("ft")\noutput base + 0.5 * (ft - base)\n', reporter)
    assert reporter.diagnostics == []
    assert "model.layers.0.self_attn.rotary_emb.inv_freq" not in tensors(out)

    lacking = tensors(tmp_path / "ft")
    del lacking["model.layers.1.self_attn.k_proj.weight"]
    save_file(lacking, tmp_path / "ft" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(MergelangError) as e:
        check(tmp_path / "spec.ml", RunOptions())
    (error,) = e.value.diagnostics
    assert error.message == "model `ft` has no tensor `model.layers.1.self_attn.k_proj.weight`, which `base` has"


def test_option_mistakes_are_diagnostics(tmp_path):
    make_model(tmp_path / "base")
    spec = write_spec(tmp_path, 'base = model("base")\noutput base, tokenizer=base * 2, dtype="int8"\n')
    with pytest.raises(MergelangError) as e:
        check(spec, RunOptions())
    found = [(d.message, d.span.line, d.span.col) for d in e.value.diagnostics]
    assert found == [("`tokenizer=` must name a model, found a tensor", 2, 24),
                     ('`dtype=` must be one of "bf16", "fp16", "fp32", "fp64", found "int8"', 2, 40)]
