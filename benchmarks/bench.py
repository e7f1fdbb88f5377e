"""Benchmark mergelang against mergekit on a Llama-shaped family of bf16 checkpoints.

Run by hand; it prints a markdown table. It is not a test.

    python benchmarks/bench.py                       # linear, dare_linear, ties; 3 runs each
    python benchmarks/bench.py --only linear --runs 1
    python benchmarks/bench.py --depth-check         # also mergelang `linear` at 4, 8 and 16 layers, in one series

The family (made once, then reused from --workdir) is a base model and three fine-tunes of it:
hidden 2048, intermediate 5440, vocab 32000, 16 attention heads with 8 key/value heads, untied head,
8 layers by default (about 499M parameters, 998 MB in bf16), sharded at 500 MB. Base weights are
N(0, 0.02) (norm weights 1 + N(0, 0.02)); a fine-tune adds a delta drawn from N(0, 0.005) in which 1%
of the entries are six times larger. Every tensor comes from its own seeded torch.Generator, so a
given torch version always makes the same bytes, and only one shard's tensors are in memory at a time.

Each merge is run by both tools, alternating, under GNU time (`/usr/bin/time -v`) for the peak
resident set size; wall time is measured around the process. Before any timing, every input file is
read once (untimed) so that all runs find the inputs in the page cache; before each run, untimed,
`sync` writes back what the runs before it left dirty (mergekit does not fsync its output: the
kernel wrote it back during the next run) and the merge's inputs are read again, and so is every file
of the Python environment (standard library, libpython, installed packages; `--cold-environment`
leaves them out): the kernel drops pages left idle for 30 s, so after mergekit's long runs the
parts of torch's libraries that only a start reads were gone for mergelang, while mergekit, run
after mergelang's short runs, found them cached. The floor is what the machine
needs at least for that merge: reading each of its inputs once from the page cache (each read timed
right after an untimed one, as the tools' inputs are read before each run: the kernel here drops
cached pages left idle, and a cold read took 2-4 times as long), and writing and fsyncing one
model-sized file, through the page cache or with O_DIRECT, whichever is faster.
"""

from __future__ import annotations

import argparse
import compileall
import functools
import importlib.metadata
import json
import mmap
import os
import platform
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

from mergelang import demo
from mergelang.demo import TINY_LLAMA, llama_tensor_shapes

GNU_TIME = "/usr/bin/time"
SHARD_BYTES = 500_000_000
READ_BUFFER_BYTES = 16 << 20
FAMILY_VERSION = 1
BASE_STD = 0.02
DELTA_STD = 0.005
OUTLIER_FRACTION = 0.01
OUTLIER_SCALE = 6.0
FINETUNES = ("ft0", "ft1", "ft2")
MODELS = ("base", *FINETUNES)
DEPTHS = (4, 16)
GB = 1e9


# ---------------------------------------------------------------------------------------------------
# The merges: one mergekit configuration and one mergelang spec with the same math.


@dataclass(frozen=True)
class Merge:
    name: str
    inputs: tuple[str, ...]
    mergekit: dict
    mergelang: str
    default: bool = True


def _models(names, weights, **extra) -> list[dict]:
    return [{"model": n, "parameters": {"weight": w, **extra}} for n, w in zip(names, weights)]


MERGES: dict[str, Merge] = {
    m.name: m
    for m in [
        Merge(
            "linear",
            FINETUNES,
            {"merge_method": "linear", "models": _models(FINETUNES, [0.5, 0.3, 0.2]),
             "parameters": {"normalize": True}},
            "output linear([ft0, ft1, ft2], weights=[0.5, 0.3, 0.2])",
        ),
        Merge(
            "dare_linear",
            ("base", "ft0", "ft1"),
            {"merge_method": "dare_linear", "base_model": "base",
             "models": _models(("ft0", "ft1"), [0.5, 0.5], density=0.1)},
            "output dare_linear(base, [ft0, ft1], weights=[0.5, 0.5], density=0.1)",
        ),
        Merge(
            "ties",
            MODELS,
            {"merge_method": "ties", "base_model": "base",
             "models": _models(FINETUNES, [0.5, 0.3, 0.2], density=0.5)},
            "output ties(base, [ft0, ft1, ft2], weights=[0.5, 0.3, 0.2], density=0.5)",
        ),
        Merge(
            "weighted_sum",
            FINETUNES,
            {"merge_method": "linear", "models": _models(FINETUNES, [0.5, 0.3, 0.2]),
             "parameters": {"normalize": True}},
            "output 0.5 * ft0 + 0.3 * ft1 + 0.2 * ft2",
            default=False,
        ),
    ]
}


# ---------------------------------------------------------------------------------------------------
# The checkpoint family.


@dataclass(frozen=True)
class Shape:
    hidden: int
    intermediate: int
    vocab: int
    layers: int
    heads: int
    kv_heads: int

    def config(self) -> dict:
        config = dict(TINY_LLAMA)
        config.update(
            hidden_size=self.hidden,
            intermediate_size=self.intermediate,
            vocab_size=self.vocab,
            num_hidden_layers=self.layers,
            num_attention_heads=self.heads,
            num_key_value_heads=self.kv_heads,
            head_dim=self.hidden // self.heads,
            max_position_embeddings=4096,
            initializer_range=BASE_STD,
            use_cache=True,
            torch_dtype="bfloat16",
            dtype="bfloat16",
        )
        return config

    def folder_name(self) -> str:
        return (f"llama-h{self.hidden}-i{self.intermediate}-v{self.vocab}-l{self.layers}"
                f"-a{self.heads}-kv{self.kv_heads}")

    def params(self) -> int:
        total = 0
        for shape in llama_tensor_shapes(self.config()).values():
            n = 1
            for d in shape:
                n *= d
            total += n
        return total


def _seed(model_seed: int, index: int) -> int:
    return model_seed * 1_000_003 + index


def _base_tensor(name: str, shape: tuple[int, ...], index: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(_seed(0, index))
    w = torch.randn(shape, generator=gen, dtype=torch.float32).mul_(BASE_STD)
    if name.endswith("norm.weight"):
        w.add_(1.0)
    return w.to(torch.bfloat16)


def _finetune_tensor(base: torch.Tensor, model_seed: int, index: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(_seed(model_seed, index))
    delta = torch.randn(base.shape, generator=gen, dtype=torch.float32).mul_(DELTA_STD)
    outliers = torch.rand(base.shape, generator=gen) < OUTLIER_FRACTION
    delta[outliers] *= OUTLIER_SCALE
    del outliers
    return delta.add_(base.to(torch.float32)).to(torch.bfloat16)


def _plan_shards(shapes: dict[str, tuple[int, ...]]) -> list[list[str]]:
    shards: list[list[str]] = [[]]
    used = 0
    for name, shape in shapes.items():
        nbytes = 2
        for d in shape:
            nbytes *= d
        if shards[-1] and used + nbytes > SHARD_BYTES:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += nbytes
    return shards


def _write_model(folder: Path, config: dict, model: str) -> None:
    """Write one checkpoint, one shard at a time; a shard holds at most SHARD_BYTES of tensors."""
    shapes = llama_tensor_shapes(config)
    index_of = {name: i for i, name in enumerate(shapes)}
    shards = _plan_shards(shapes)
    model_seed = MODELS.index(model)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    tmp.chmod(0o755)
    try:
        weight_map = {}
        total = 0
        for k, names in enumerate(shards, start=1):
            file = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
            tensors = {}
            for name in names:
                t = _base_tensor(name, shapes[name], index_of[name])
                if model_seed:
                    t = _finetune_tensor(t, model_seed, index_of[name])
                tensors[name] = t
                total += t.numel() * t.element_size()
                weight_map[name] = file
            save_file(tensors, str(tmp / file), metadata={"format": "pt"})
            (tmp / file).chmod(0o644)
            del tensors
        (tmp / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
        _write_config(tmp, config)
        (tmp / "generation_config.json").write_text(json.dumps(
            {"_from_model_config": True, "bos_token_id": config["bos_token_id"],
             "eos_token_id": config["eos_token_id"]}, indent=2) + "\n")
        (tmp / ".complete").write_text(f"{FAMILY_VERSION}\n")
        if folder.exists():
            shutil.rmtree(folder)
        os.rename(tmp, folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def _write_config(folder: Path, config: dict) -> None:
    text = json.dumps(config, indent=2, sort_keys=True) + "\n"
    path = folder / "config.json"
    if not path.is_file() or path.read_text() != text:
        path.write_text(text)


def _is_complete(folder: Path) -> bool:
    marker = folder / ".complete"
    return marker.is_file() and marker.read_text().strip() == str(FAMILY_VERSION)


def make_family(workdir: Path, shape: Shape, models: tuple[str, ...] = MODELS) -> Path:
    root = workdir / shape.folder_name()
    root.mkdir(parents=True, exist_ok=True)
    config = shape.config()
    for model in models:
        folder = root / model
        if _is_complete(folder):
            _write_config(folder, config)
            continue
        start = time.perf_counter()
        print(f"making {folder} ...", file=sys.stderr, flush=True)
        _write_model(folder, config, model)
        print(f"  {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
    return root


def weight_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors"))


def model_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in weight_files(folder))


# ---------------------------------------------------------------------------------------------------
# The floor: page-cache reads and an fsynced write.


def read_files(files: list[Path], buffer: bytearray) -> float:
    view = memoryview(buffer)
    start = time.perf_counter()
    for path in files:
        with open(path, "rb", buffering=0) as f:
            while f.readinto(view):
                pass
    return time.perf_counter() - start


def write_file(path: Path, size: int, buffer, fsync: bool = True, direct: bool = False) -> float:
    """Seconds to write `size` bytes from `buffer` (page-aligned memory, for direct) into a new file.
    direct: O_DIRECT, whole pages (the last one padded, then the file cut to its size), as mergelang
    writes where the file system allows it."""
    view = memoryview(buffer)
    start = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | (os.O_DIRECT if direct else 0), 0o644)
    try:
        left = -(-size // 4096) * 4096 if direct else size
        while left:
            left -= os.write(fd, view[: min(left, len(view))])
        if direct:
            os.ftruncate(fd, size)
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)
    elapsed = time.perf_counter() - start
    if not fsync:
        os.sync()
    path.unlink()
    return elapsed


@dataclass
class Floor:
    read_s: dict[str, float]
    write_s: float
    write_nosync_s: float
    write_direct_s: float | None  # None: the file system refuses O_DIRECT

    @property
    def best_write_s(self) -> float:
        return min(self.write_s, self.write_direct_s or self.write_s)

    def for_inputs(self, inputs: tuple[str, ...]) -> float:
        return sum(self.read_s[m] for m in inputs) + self.best_write_s


def direct_write_s(path: Path, size: int, buffer) -> float | None:
    if not hasattr(os, "O_DIRECT"):
        return None
    try:
        return write_file(path, size, buffer, direct=True)
    except OSError:  # EINVAL: no O_DIRECT on this file system
        path.unlink(missing_ok=True)
        return None


def measure_floor(root: Path, workdir: Path, runs: int) -> Floor:
    buffer = mmap.mmap(-1, READ_BUFFER_BYTES)  # page-aligned, for the direct write too
    reads: dict[str, list[float]] = {m: [] for m in MODELS}
    writes: list[float] = []
    nosync: list[float] = []
    direct: list[float | None] = []
    size = model_bytes(root / "base")
    for _ in range(runs):
        for m in MODELS:
            read_files(weight_files(root / m), buffer)  # untimed first, as before each tool's run
            reads[m].append(read_files(weight_files(root / m), buffer))
        writes.append(write_file(workdir / "floor-write.bin", size, buffer))
        nosync.append(write_file(workdir / "floor-write.bin", size, buffer, fsync=False))
        direct.append(direct_write_s(workdir / "floor-write.bin", size, buffer))
    return Floor({m: statistics.median(v) for m, v in reads.items()}, statistics.median(writes),
                 statistics.median(nosync), None if None in direct else statistics.median(direct))


def measure_startup(runs: int) -> float:
    """Median wall time of starting this Python and importing torch, which both tools do before
    they read a byte (the floor leaves it out); the process then leaves at once (os._exit), without
    the interpreter's teardown, as mergelang does."""
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import os, torch; os._exit(0)"], check=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def warm_page_cache(root: Path, models: tuple[str, ...] = MODELS) -> tuple[int, float]:
    files = [f for m in models for f in weight_files(root / m)]
    elapsed = read_files(files, bytearray(READ_BUFFER_BYTES))
    return sum(f.stat().st_size for f in files), elapsed


# Folders of the standard library that no tool loads.
UNLOADED = ("site-packages", "test", "idlelib", "tkinter", "turtledemo", "ensurepip")


@functools.cache
def environment_files() -> tuple[Path, ...]:
    """The files both tools load from: this Python's standard library (without its tests and its
    own site-packages) and shared library, and the environment's installed packages."""
    paths = sysconfig.get_paths()
    found = []
    for key in ("stdlib", "platstdlib", "purelib", "platlib"):
        for folder, dirs, names in os.walk(paths[key]):
            if key in ("stdlib", "platstdlib") and folder == paths[key]:
                dirs[:] = [d for d in dirs if d not in UNLOADED]
            found += [Path(folder, n) for n in names]
    libdir = sysconfig.get_config_var("LIBDIR")
    found += [Path(libdir, n) for n in os.listdir(libdir) if n.startswith("libpython")] if libdir else []
    return tuple(sorted({p for p in found if p.is_file() and not p.is_symlink()}))


def warm_environment() -> tuple[int, float]:
    """Read every environment file once (untimed): the tools' own libraries and modules, in the page
    cache as their inputs are."""
    files = environment_files()
    return sum(f.stat().st_size for f in files), read_files(files, bytearray(READ_BUFFER_BYTES))


# ---------------------------------------------------------------------------------------------------
# Running the tools.


@dataclass
class Run:
    wall_s: float
    rss_bytes: int
    cpu_s: float


@dataclass
class Result:
    runs: list[Run] = field(default_factory=list)
    error: str | None = None

    @property
    def wall(self) -> float | None:
        return statistics.median(r.wall_s for r in self.runs) if self.runs and not self.error else None

    @property
    def cpu(self) -> float | None:
        return statistics.median(r.cpu_s for r in self.runs) if self.runs and not self.error else None

    @property
    def rss(self) -> int | None:
        return max(r.rss_bytes for r in self.runs) if self.runs and not self.error else None


def compile_bytecode() -> bool:
    """Compile mergelang's modules to bytecode, as pip does when it installs a wheel (mergekit, a
    regular install, has its bytecode): run from a source checkout with PYTHONDONTWRITEBYTECODE
    set, every run would compile them again (0.085 s here). False where the folder is read-only."""
    return bool(compileall.compile_dir(Path(demo.__file__).parent, quiet=1))


def _tool(name: str) -> str:
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    found = shutil.which(name)
    if not found:
        sys.exit(f"bench: cannot find `{name}` next to {sys.executable} or on PATH")
    return found


def _check_gnu_time() -> None:
    ok = False
    if Path(GNU_TIME).exists():
        probe = subprocess.run([GNU_TIME, "-v", "true"], capture_output=True, text=True)
        ok = "Maximum resident set size" in probe.stderr
    if not ok:
        sys.exit(f"bench: GNU time is needed at {GNU_TIME} (e.g. `apt-get install -y time`)")


_RSS = re.compile(r"Maximum resident set size \(kbytes\): (\d+)")
_CPU = re.compile(r"(?:User|System) time \(seconds\): ([\d.]+)")


def timed(cmd: list[str], log: Path) -> Run:
    """Run cmd under GNU time; raise RuntimeError with the log's tail if it fails."""
    stats = log.with_suffix(".time")
    with open(log, "wb") as out:
        start = time.perf_counter()
        proc = subprocess.run([GNU_TIME, "-v", "-o", str(stats), *cmd], stdout=out, stderr=subprocess.STDOUT)
        wall = time.perf_counter() - start
    if proc.returncode != 0:
        tail = log.read_text(errors="replace").strip().splitlines()[-15:]
        raise RuntimeError(f"exit status {proc.returncode}: {shlex.join(cmd)}\n" + "\n".join(tail))
    text = stats.read_text()
    match = _RSS.search(text)
    if not match:
        raise RuntimeError(f"no peak RSS in {stats}")
    return Run(wall, int(match.group(1)) * 1024, sum(float(t) for t in _CPU.findall(text)))


def mergekit_command(config: Path, out: Path) -> list[str]:
    return [_tool("mergekit-yaml"), str(config), str(out), "--allow-crimes", "--no-copy-tokenizer",
            "--lazy-unpickle", "--out-shard-size", "5B", "--no-write-model-card", "--random-seed", "0",
            "--quiet"]


def mergelang_command(spec: Path, out: Path) -> list[str]:
    return [_tool("mergelang"), "run", str(spec), "-o", str(out), "-q"]


def write_inputs(merge: Merge, root: Path, folder: Path) -> tuple[Path, Path]:
    """The mergekit YAML (JSON is valid YAML) and the mergelang spec for this merge over root's family."""
    folder.mkdir(parents=True, exist_ok=True)
    config = json.loads(json.dumps(merge.mergekit))
    for m in config["models"]:
        m["model"] = str(root / m["model"])
    if "base_model" in config:
        config["base_model"] = str(root / config["base_model"])
    config.update(dtype="float32", out_dtype="bfloat16")
    yaml = folder / f"{merge.name}.yml"
    yaml.write_text(json.dumps(config, indent=2) + "\n")
    lines = [f'{m} = model("{root / m}")' for m in MODELS if re.search(rf"\b{m}\b", merge.mergelang)]
    spec = folder / f"{merge.name}.ml"
    spec.write_text("\n".join([*lines, "", merge.mergelang]) + "\n")
    return yaml, spec


def _clean(out: Path) -> None:
    if out.exists():
        shutil.rmtree(out)
    for stale in out.parent.glob(f".{out.name}.*"):
        shutil.rmtree(stale, ignore_errors=True)


def settle(root: Path, inputs: tuple[str, ...], environment: bool = True) -> None:
    """Before a timed run, untimed: flush what earlier runs left to write back (mergekit does not
    fsync its output, and the kernel would write it during the next run), and read the merge's
    inputs into the page cache again (this machine's host reclaims idle page cache), and the
    Python environment's files: after mergekit's long runs, the parts of torch's libraries that
    only its start had read were evicted, where mergekit, run after mergelang's short runs, always
    found them cached (the pages it faulted in from disk cost mergelang's `ties` 0.45 s)."""
    os.sync()
    warm_page_cache(root, inputs)
    if environment:
        warm_environment()


def run_tool(result: Result, cmd: list[str], out: Path, log: Path, keep: bool,
             prepare=lambda: None) -> None:
    if result.error:
        return
    _clean(out)
    prepare()
    try:
        result.runs.append(timed(cmd, log))
        last = result.runs[-1]
        print(f"  {log.stem}: {last.wall_s:.1f} s wall, {last.cpu_s:.1f} s CPU, {last.rss_bytes / GB:.2f} GB",
              file=sys.stderr, flush=True)
    except RuntimeError as e:
        result.error = str(e)
        print(f"  {log.stem}: FAILED\n{e}", file=sys.stderr, flush=True)
    if not keep:
        _clean(out)


# ---------------------------------------------------------------------------------------------------
# Reporting.


def _fmt(x: float | None, digits: int = 1) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def _ratio(a: float | None, b: float | None) -> str:
    return "n/a" if a is None or b is None or b == 0 else f"{a / b:.2f}"


def machine() -> str:
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    ram = "unknown"
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                ram = f"{int(line.split()[1]) * 1024 / GB:.1f} GB"
    except OSError:
        pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return (f"{cpu}; {os.cpu_count()} logical cores ({usable} usable, torch uses {torch.get_num_threads()} "
            f"threads); RAM {ram}; {platform.system()} {platform.release()}; Python {platform.python_version()}")


def load_average() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "unknown"


def versions() -> str:
    def version(dist: str) -> str:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return "not installed"

    rev = ""
    repo = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain"], capture_output=True,
                               text=True, check=True).stdout.strip()
        rev = f" (git {head}{', with uncommitted changes' if dirty else ''})"
    except (OSError, subprocess.CalledProcessError):
        pass
    return (f"torch {torch.__version__}, mergekit {version('mergekit')}, "
            f"mergelang {version('mergelang')}{rev}, safetensors {version('safetensors')}")


# ---------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", type=Path, default=Path("/tmp/mergelang-bench"),
                   help="where the checkpoint family is cached and outputs are written (default: %(default)s)")
    p.add_argument("--runs", type=int, default=3, help="runs of each tool per merge (default: %(default)s)")
    p.add_argument("--layers", type=int, default=8, help="decoder layers of the family (default: %(default)s)")
    p.add_argument("--only", help="comma-separated merges to run, from: " + ", ".join(MERGES)
                   + " (default: " + ", ".join(m for m in MERGES if MERGES[m].default) + ")")
    p.add_argument("--skip-mergekit", action="store_true", help="run mergelang only")
    p.add_argument("--keep-outputs", action="store_true", help="keep the last output of each tool and merge")
    p.add_argument("--depth-check", action="store_true",
                   help="also run mergelang `linear` on families of 4 and 16 layers")
    p.add_argument("--cold-environment", action="store_true",
                   help="do not read the Python environment's files before each run (only the inputs)")
    p.add_argument("--depth-merge", default="linear", choices=list(MERGES), help=argparse.SUPPRESS)
    p.add_argument("--hidden", type=int, default=2048, help=argparse.SUPPRESS)
    p.add_argument("--intermediate", type=int, default=5440, help=argparse.SUPPRESS)
    p.add_argument("--vocab", type=int, default=32000, help=argparse.SUPPRESS)
    p.add_argument("--heads", type=int, default=16, help=argparse.SUPPRESS)
    p.add_argument("--kv-heads", type=int, default=8, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.runs < 1:
        p.error(f"--runs must be at least 1, got {args.runs}")
    if args.layers < 1:
        p.error(f"--layers must be at least 1, got {args.layers}")
    names = args.only.split(",") if args.only else [m for m in MERGES if MERGES[m].default]
    unknown = [n for n in names if n not in MERGES]
    if unknown:
        p.error(f"unknown merge {', '.join(unknown)}; choose from {', '.join(MERGES)}")
    args.merges = [MERGES[n] for n in dict.fromkeys(names)]
    if args.hidden % args.heads or args.heads % args.kv_heads:
        p.error("hidden must be a multiple of heads, and heads a multiple of kv-heads")
    return args


def shape_for(args: argparse.Namespace, layers: int) -> Shape:
    return Shape(args.hidden, args.intermediate, args.vocab, layers, args.heads, args.kv_heads)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    _check_gnu_time()
    workdir = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    args.load_before = load_average()
    args.versions = versions()
    shape = shape_for(args, args.layers)
    root = make_family(workdir, shape)
    specs, outs, logs = workdir / "specs", workdir / "out", workdir / "logs"
    outs.mkdir(exist_ok=True)
    logs.mkdir(exist_ok=True)

    args.bytecode = compile_bytecode()
    warm_bytes, warm_s = warm_page_cache(root)
    env_bytes = 0 if args.cold_environment else warm_environment()[0]
    floor = measure_floor(root, workdir, args.runs)
    args.startup_s = measure_startup(max(args.runs, 3))
    size = model_bytes(root / "base")

    results: dict[tuple[str, str], Result] = {}
    for merge in args.merges:
        yaml, spec = write_inputs(merge, root, specs / shape.folder_name())
        mk = results[merge.name, "mergekit"] = Result()
        ml = results[merge.name, "mergelang"] = Result()
        print(f"{merge.name}:", file=sys.stderr, flush=True)
        for i in range(args.runs):
            keep = args.keep_outputs and i == args.runs - 1
            prepare = functools.partial(settle, root, merge.inputs, not args.cold_environment)
            if not args.skip_mergekit:
                out = outs / f"mergekit-{merge.name}"
                run_tool(mk, mergekit_command(yaml, out), out, logs / f"mergekit-{merge.name}-{i}.log", keep,
                         prepare)
            out = outs / f"mergelang-{merge.name}"
            run_tool(ml, mergelang_command(spec, out), out, logs / f"mergelang-{merge.name}-{i}.log", keep,
                     prepare)

    depth_rows = []
    if args.depth_check:
        for layers in sorted({*DEPTHS, args.layers}):
            s = shape_for(args, layers)
            r = make_family(workdir, s)
            merge = MERGES[args.depth_merge]
            # Every depth in one series, the main family's too: its runs above alternate with
            # mergekit's, which leave the machine in another state (caches dropped, memory freed).
            warm_page_cache(r, merge.inputs)
            yaml, spec = write_inputs(merge, r, specs / s.folder_name())
            res = Result()
            print(f"{merge.name}, {layers} layers:", file=sys.stderr, flush=True)
            for i in range(args.runs):
                out = outs / f"mergelang-{merge.name}-l{layers}"
                run_tool(res, mergelang_command(spec, out), out,
                         logs / f"mergelang-{merge.name}-l{layers}-{i}.log", False,
                         functools.partial(settle, r, merge.inputs, not args.cold_environment))
            depth_rows.append((layers, s.params(), model_bytes(r / "base"), res))

    report(args, shape, size, warm_bytes, warm_s, env_bytes, floor, results, depth_rows, workdir)


def depth_summary(depth_rows) -> str:
    """How far the peak RSS spreads over the depths, and how far each middle depth's time lies from
    the line (in bytes per model) through the shallowest and the deepest: "linear in bytes"."""
    rows = [(nbytes, r) for _, _, nbytes, r in depth_rows if r.wall is not None and r.rss is not None]
    if len(rows) < 2:
        return "Depth: too few depths measured."
    rss = [r.rss for _, r in rows]
    text = f"Peak RSS over the depths: {min(rss) / GB:.2f}-{max(rss) / GB:.2f} GB ({max(rss) / min(rss) - 1:.0%} apart)."
    (b0, r0), (b1, r1) = rows[0], rows[-1]
    for nbytes, r in rows[1:-1]:
        line = r0.wall + (r1.wall - r0.wall) * (nbytes - b0) / (b1 - b0)
        text += (f" At {nbytes / GB:.3f} GB per model the time is {r.wall:.2f} s, {r.wall / line - 1:+.0%} from the line"
                 f" through the shallowest and deepest ({line:.2f} s).")
    return text


def report(args, shape, size, warm_bytes, warm_s, env_bytes, floor, results, depth_rows, workdir) -> None:
    print(f"## mergelang vs mergekit: {shape.layers}-layer Llama family, bf16\n")
    print(f"Family: hidden {shape.hidden}, intermediate {shape.intermediate}, vocab {shape.vocab}, "
          f"{shape.layers} layers, {shape.heads} heads / {shape.kv_heads} kv heads, untied lm_head: "
          f"{shape.params() / 1e6:.0f}M parameters, {size / GB:.3f} GB per model in "
          f"{SHARD_BYTES // 1_000_000} MB shards; base + 3 fine-tunes (delta N(0, {DELTA_STD}), "
          f"{OUTLIER_FRACTION:.0%} of entries x{OUTLIER_SCALE:g}), in {workdir}.\n")
    print("| merge | mergekit median wall s | mergekit peak RSS GB | mergelang median wall s "
          "| mergelang peak RSS GB | time ratio (mergekit/mergelang) | memory ratio | floor s "
          "| mergelang / floor |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    failures = []
    for merge in args.merges:
        mk, ml = results[merge.name, "mergekit"], results[merge.name, "mergelang"]
        fl = floor.for_inputs(merge.inputs)
        mk_wall = mk.wall
        mk_rss = mk.rss / GB if mk.rss is not None else None
        ml_rss = ml.rss / GB if ml.rss is not None else None
        skipped = "skipped" if args.skip_mergekit else None
        print(f"| {merge.name} | {skipped or _fmt(mk_wall)} | {skipped or _fmt(mk_rss, 2)} | {_fmt(ml.wall)} "
              f"| {_fmt(ml_rss, 2)} | {_ratio(mk_wall, ml.wall)} | {_ratio(mk_rss, ml_rss)} | {fl:.2f} "
              f"| {_ratio(ml.wall, fl)} |")
        for tool, r in (("mergekit", mk), ("mergelang", ml)):
            if r.error:
                failures.append(f"- {merge.name}, {tool}: {r.error.splitlines()[0]}")
                failures.extend(f"      {line}" for line in r.error.splitlines()[1:])

    print()
    print("CPU time (user + system, median; less sensitive than wall time to other work on the machine): "
          + "; ".join(f"{m.name} mergekit {_fmt(results[m.name, 'mergekit'].cpu)} s, "
                      f"mergelang {_fmt(results[m.name, 'mergelang'].cpu)} s" for m in args.merges) + ".")
    print()
    reads = ", ".join(f"{m} {floor.read_s[m]:.2f} s" for m in MODELS)
    direct = (f"{floor.write_direct_s:.2f} s with O_DIRECT, " if floor.write_direct_s is not None
              else "O_DIRECT refused here, ")
    print(f"Floor = reading each input of the merge once from the page cache, right after an untimed "
          f"read of it as before each tool's run ({reads}; "
          f"{READ_BUFFER_BYTES >> 20} MiB reads into one buffer) + writing and fsyncing one "
          f"{size / GB:.3f} GB file, the faster way ({direct}{floor.write_s:.2f} s through the page cache; "
          f"{floor.write_nosync_s:.2f} s to write it into the page cache without fsync); medians of "
          f"{args.runs}. mergelang fsyncs its output; mergekit does not.")
    print(f"Startup = starting Python and importing torch (`python -c \"import os, torch; os._exit(0)\"`), "
          f"which mergekit does before it reads a byte (mergelang imports torch only for an op that its "
          f"loops do not compute; these merges have none): {args.startup_s:.2f} s (median of {max(args.runs, 3)}). "
          f"mergelang / (floor + startup): "
          + ", ".join(f"{m.name} {_ratio(results[m.name, 'mergelang'].wall, floor.for_inputs(m.inputs) + args.startup_s)}"
                      for m in args.merges) + ".")
    print(f"Page cache: warmed before timing by one untimed read of every input file "
          f"({warm_bytes / GB:.2f} GB in {warm_s:.1f} s). Before each timed run, untimed: the last output "
          f"is deleted, `sync` writes back what earlier runs left dirty (mergekit does not fsync its "
          f"output), and the merge's inputs are read once more"
          + ("." if args.cold_environment else
             f", and so is every file of the Python environment ({env_bytes / GB:.2f} GB: the standard "
             f"library, libpython and the installed packages), which both tools load from."))
    print("mergelang's modules were compiled to bytecode before timing, as installing a wheel does."
          if args.bytecode else "mergelang's modules could not be compiled to bytecode before timing.")
    print(f"Runs: {args.runs} per tool and merge, the tools alternating; wall = median, peak RSS = largest "
          f"'Maximum resident set size' reported by GNU time; GB = 10^9 bytes. Both tools compute in float32 "
          f"and write bf16 (mergekit: dtype float32, out_dtype bfloat16) as one output file.")
    print()
    print("Merges:")
    for merge in args.merges:
        method = merge.mergekit["merge_method"]
        params = {k: v for k, v in merge.mergekit.items() if k not in ("merge_method", "models", "base_model")}
        per_model = [m["parameters"] for m in merge.mergekit["models"]]
        print(f"- {merge.name}: mergelang `{merge.mergelang}`; mergekit `{method}` "
              f"{'with base_model base, ' if 'base_model' in merge.mergekit else ''}"
              f"models {[m['model'] for m in merge.mergekit['models']]} {per_model} {params or ''}".rstrip())

    if depth_rows:
        print()
        merge = MERGES[args.depth_merge]
        print(f"### mergelang `{merge.name}` at several depths\n")
        print(f"| layers | params | GB per model | median wall s | median CPU s | peak RSS GB "
              f"| wall s per GB moved ({len(merge.inputs)} inputs + output) |")
        print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
        for layers, params, nbytes, r in depth_rows:
            moved = (len(merge.inputs) + 1) * nbytes / GB
            rss = r.rss / GB if r.rss is not None else None
            per_gb = r.wall / moved if r.wall is not None else None
            print(f"| {layers} | {params / 1e6:.0f}M | {nbytes / GB:.3f} | {_fmt(r.wall)} | {_fmt(r.cpu)} "
                  f"| {_fmt(rss, 2)} "
                  f"| {_fmt(per_gb, 2)} |")
            if r.error:
                failures.append(f"- {merge.name} at {layers} layers, mergelang: {r.error.splitlines()[0]}")
                failures.extend(f"      {line}" for line in r.error.splitlines()[1:])
        print()
        print(depth_summary(depth_rows))

    if failures:
        print()
        print("Failures:")
        print("\n".join(failures))

    print()
    print(f"Machine: {machine()}")
    print(f"Load average (1, 5, 15 min): {args.load_before} at the start, {load_average()} at the end "
          f"(other work on the machine inflates the timings)")
    print(f"Versions: {args.versions} (at the start)")
    print(f"Command: {shlex.join([sys.executable, *sys.argv])}")
    print("mergekit: " + shlex.join(mergekit_command(Path("CONFIG.yml"), Path("OUT"))))
    print("mergelang: " + shlex.join(mergelang_command(Path("SPEC.ml"), Path("OUT"))))


if __name__ == "__main__":
    main()
