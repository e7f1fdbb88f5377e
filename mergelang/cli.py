"""Command line: `mergelang run | check | explain | demo | import | stats | verify`."""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path

import click

from . import __version__
from .api import RunOptions, check, parse_size, write_plan
from .ast import Source
from .diagnostics import INTERRUPTED, Diagnostic, MergelangError, Reporter
from .io import CheckpointError
from .memory import tune_malloc

tune_malloc()  # before any thread allocates

EXIT_ERROR = 1
EXIT_INTERRUPTED = 130


class _Sources(dict):
    """Source texts for rendering diagnostics, read from disk on first use."""

    def __missing__(self, name: str) -> Source | None:
        try:
            text = Path(name).read_text(encoding="utf-8")
        except OSError:
            return None
        self[name] = Source(name, text, Path(name).parent)
        return self[name]


def _print(diagnostics: list[Diagnostic]) -> None:
    sources = _Sources()
    for d in diagnostics:
        click.echo(d.render(sources) + "\n", err=True)


def _user_errors(fn):
    """Turn user mistakes into diagnostics and exit codes; a traceback only ever means a bug."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        reporter = Reporter()
        try:
            return fn(*args, reporter=reporter, **kwargs)
        except MergelangError as e:
            _print(reporter.warnings + e.diagnostics)
            n = len(e.diagnostics)
            click.echo(f"{n} error{'s' * (n > 1)}; nothing was written.", err=True)
            sys.exit(EXIT_ERROR)
        except CheckpointError as e:
            _print(reporter.warnings + [Diagnostic("E010", str(e), help="an input changed or is damaged; "
                                                                         "nothing was written")])
            sys.exit(EXIT_ERROR)
        except KeyboardInterrupt:
            _print([Diagnostic(INTERRUPTED, "interrupted", notes=("nothing was written: the partial output was "
                                                                  "removed and the inputs are untouched",))])
            sys.exit(EXIT_INTERRUPTED)

    return wrapper


def _parse_models(values: tuple[str, ...]) -> dict[str, Path]:
    models = {}
    for v in values:
        name, sep, path = v.partition("=")
        if not sep or not name or not path:
            raise click.BadParameter(f"expected NAME=PATH, got {v!r}", param_hint="--model")
        models[name] = Path(path)
    return models


def _size(ctx, param, value):
    try:
        return parse_size(value)
    except ValueError as e:
        raise click.BadParameter(str(e)) from None


def _dtype(ctx, param, value):
    from .check import parse_dtype

    try:
        if value is not None:
            parse_dtype(value)  # validate here; the plan parses it again where it is used
        return value
    except ValueError as e:
        raise click.BadParameter(str(e)) from None


spec_argument = click.argument("spec", type=click.Path(path_type=Path, dir_okay=False))
model_option = click.option("--model", "models", multiple=True, metavar="NAME=PATH",
                            help="Use PATH (a folder, or a hub id in the local Hugging Face cache) "
                                 "for the spec's model NAME (repeatable).")


def entry() -> None:
    """The console script. It leaves through os._exit once the command is done and its output
    flushed: interpreter shutdown with torch loaded (module teardown and torch's static destructors)
    takes about 0.4 s and does nothing a finished command needs. After Ctrl-C that also matters for
    correctness: the partial output is already gone (the atomic folder's cleanup ran as the interrupt
    unwound), and torch's thread pools, stopped mid-work, can abort the process in their destructors."""
    try:
        main()
        code = 0  # click's standalone mode always raises SystemExit; this is only a fallback
    except SystemExit as e:
        code = e.code
    _leave(code)


def _leave(code) -> None:
    """Exit with SystemExit's meaning of `code` (None: 0; an int; else printed, 1), after the atexit
    handlers (logging's flush, temporary files) and a flush of stdout and stderr."""
    if code is not None and not isinstance(code, int):
        print(code, file=sys.stderr)
        code = 1
    import atexit

    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe (`mergelang ... | head`) or a closed stream
            code = code or EXIT_ERROR
    os._exit(code or 0)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="mergelang")
def main():
    """mergelang: merge language-model checkpoints with a formula."""


@main.command()
@spec_argument
@click.option("-o", "--output", "out", required=True, type=click.Path(path_type=Path), help="Output folder.")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(min=0), help="Seed of random ops.")
@model_option
@click.option("--dtype", callback=_dtype, help="Output dtype (bf16, fp16, fp32); default: the spec's dtype=, else the base model's.")
@click.option("--shard-size", default="5GB", show_default=True, callback=_size, help="Largest output shard.")
@click.option("--device", default="cpu", show_default=True, help="Where to compute: cpu, cuda, cuda:1, ...")
@click.option("-j", "--threads", type=click.IntRange(min=1), help="CPU threads (default: all cores). "
              "The output does not depend on it.")
@click.option("--chunk-size", "chunk", type=click.IntRange(min=1), hidden=True,
              help="Elements per chunk (tuning and tests; the output does not depend on it).")
@click.option("--force", is_flag=True, help="Replace the output folder if it exists.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
@click.option("--compile", "compile_", type=click.Choice(["auto", "always", "never"]), default=None,
              help="Compile elementwise regions: as numba loops on the CPU, and with torch.compile "
                   "where that pays (auto, the default; or $MERGELANG_COMPILE); with torch.compile "
                   "(always); or not at all (never). The output does not depend on it.")
@_user_errors
def run(spec, out, seed, models, dtype, shard_size, device, threads, chunk, force, quiet, compile_, reporter):
    """Merge: evaluate SPEC and write a Hugging Face checkpoint to OUTPUT."""
    _check_device(device)
    if compile_ is None:
        from .fuse import default_mode

        try:
            compile_ = default_mode()
        except ValueError as e:
            raise click.UsageError(str(e)) from None
    options = RunOptions(seed=seed, models=_parse_models(models), dtype=dtype, shard_size=shard_size,
                         device=device, force=force, compile=compile_, threads=threads)
    if chunk:
        options.chunk = chunk
    plan = check(spec, options, reporter)
    _print(reporter.warnings)
    try:
        with _progress(plan, quiet) as advance:
            path = write_plan(plan, out, options, advance)
    finally:
        plan.close()
    if not quiet:
        click.echo(f"wrote {len(plan.tensors)} tensors ({plan.output_bytes / 1e6:.1f} MB) to {path}", err=True)


@main.command(name="check")
@spec_argument
@model_option
@click.option("--dtype", callback=_dtype, help="Check as if writing this dtype.")
@_user_errors
def check_cmd(spec, models, dtype, reporter):
    """Report every problem in SPEC and its inputs without reading any weights."""
    plan = check(spec, RunOptions(models=_parse_models(models), dtype=dtype), reporter)
    plan.close()
    _print(reporter.warnings)
    inputs = ", ".join(f"{k} ({len(c.tensors)} tensors)" for k, c in plan.checkpoints.items())
    click.echo(f"ok: {len(plan.tensors)} output tensors, {plan.output_bytes / 1e6:.1f} MB; inputs: {inputs}")


@main.command()
@spec_argument
@model_option
@click.option("--tensor", help="Show the graph specialized and optimized for this tensor (reads headers).")
@click.option("--unoptimized", is_flag=True, help="Show the graph before optimization.")
@click.option("--dot", is_flag=True, help="Print Graphviz source instead of text.")
@_user_errors
def explain(spec, models, tensor, unoptimized, dot, reporter):
    """Print the expression graph that SPEC evaluates for every tensor."""
    from .graph import render, render_dot
    from .lower import lower_file
    from .optimize import optimize

    lowered = lower_file(spec, reporter)
    _print(reporter.warnings)
    root = lowered.output
    if tensor is not None:
        root = _specialized(lowered, tensor, _parse_models(models), reporter)
    elif not unoptimized:
        root = optimize(root, lowered.spans)
    if dot:
        click.echo(render_dot(root))
        return
    from .check import resolve_inputs

    folders = resolve_inputs(lowered, _parse_models(models), reporter)
    reporter.raise_if_errors()
    click.echo("inputs:")
    for key, m in lowered.inputs.items():
        source = f"lora({m.path_text!r}, base={m.base_key})" if m.kind == "lora" else f"model({m.path_text!r})"
        click.echo(f"  {key} = {source}  # {folders[key]}")
    title = f"graph for {tensor}" if tensor else ("graph" if unoptimized else "optimized graph")
    click.echo(f"{title}:")
    click.echo("  " + render(root, lowered.spans).replace("\n", "\n  "))


def _specialized(lowered, tensor, models, reporter):
    from .check import build_plan

    plan = build_plan(lowered, models, None, reporter)
    plan.close()
    for tp in plan.tensors:
        if tp.name == tensor:
            return tp.graph
    names = [tp.name for tp in plan.tensors]
    from .diagnostics import MISSING_TENSOR, suggest

    raise MergelangError(Diagnostic(MISSING_TENSOR, f"no output tensor named `{tensor}`",
                                    help=suggest(tensor, names) or f"e.g. {names[0] if names else 'none'}"))


@main.command()
@click.argument("folder", type=click.Path(path_type=Path, file_okay=False), default="mergelang-demo")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
@_user_errors
def demo(folder, quiet, reporter):
    """Make three tiny Llama checkpoints in FOLDER and merge them with the demo spec."""
    from .demo import make_demo

    spec = make_demo(folder)
    click.echo(f"made tiny checkpoints base/, ft0/, ft1/ and {spec}", err=True)
    options = RunOptions(seed=7, force=True)
    plan = check(spec, options, reporter)
    try:
        with _progress(plan, quiet) as advance:
            out = write_plan(plan, folder / "merged", options, advance)
    finally:
        plan.close()
    click.echo(f"merged into {out}\n\nThe formula:\n\n{spec.read_text()}\n"
               f"Try: mergelang explain {spec}\n     mergelang check {spec}\n     mergelang verify {out}")


def _check_device(device: str) -> None:
    if device == "cpu":  # the default: no need to import torch to know it
        return
    import torch

    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise click.BadParameter(str(e), param_hint="--device") from None
    if dev.type != "cpu":
        module = getattr(torch, dev.type, None)
        if module is None or not hasattr(module, "is_available") or not module.is_available():
            raise click.BadParameter(f"device {device!r} is not available on this machine", param_hint="--device")


class _progress:
    """A rich progress bar over the output's bytes (tensors done, throughput, time left)."""

    def __init__(self, plan, quiet: bool):
        self.plan, self.quiet = plan, quiet

    def __enter__(self):
        if self.quiet or not sys.stderr.isatty():
            return None
        from rich.console import Console
        from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn,
                                   TransferSpeedColumn)

        self.progress = Progress(TextColumn("merging"), BarColumn(), TextColumn("{task.fields[done]}/{task.fields[n]} tensors"),
                                 DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn(),
                                 console=Console(stderr=True), transient=True)
        self.progress.__enter__()
        self.task = self.progress.add_task("merge", total=self.plan.output_bytes, done=0, n=len(self.plan.tensors))
        self.written: dict[str, int] = {}
        self.done = 0

        def advance(tp, nbytes):
            self.written[tp.name] = self.written.get(tp.name, 0) + nbytes
            if self.written[tp.name] >= tp.nbytes:
                self.done += 1
            self.progress.update(self.task, advance=nbytes, done=self.done)

        return advance

    def __exit__(self, *exc):
        if hasattr(self, "progress"):
            self.progress.__exit__(*exc)
        return False


# ---- mergelang stats -------------------------------------------------------------------------------


@main.command()
@click.argument("ft", type=click.Path(path_type=Path))
@click.argument("base", type=click.Path(path_type=Path))
@click.option("--by", type=click.Choice(["layer", "kind", "tensor"]), default="kind", show_default=True,
              help="Group the table's rows by layer, by tensor kind (q_proj, mlp.up_proj, ...) or per tensor.")
@click.option("--plot", "plot_path", type=click.Path(path_type=Path, dir_okay=False),
              help="Also draw mean and p99 |δ| by layer into this PNG (needs mergelang[plot]).")
@click.option("--json", "as_json", is_flag=True, help="Print the statistics as JSON instead of a table.")
@_user_errors
def stats(ft, base, by, plot_path, as_json, reporter):
    """Measure the delta FT − BASE (range, mean |δ|, quantiles) and how much DARE drop it tolerates."""
    import json

    from rich.console import Console

    from .stats import delta_stats
    from .stats_view import plot, print_report, pyplot

    if plot_path is not None:
        pyplot()  # fail before reading any weights
    report = delta_stats(ft, base)
    _print(report.diagnostics)
    if as_json:
        click.echo(json.dumps(report.to_json(), indent=2, ensure_ascii=False))
    else:
        print_report(report, by, Console(width=None if sys.stdout.isatty() else 160))
    if plot_path is not None:
        click.echo(f"wrote {plot(report, plot_path)}", err=True)


# ---- mergelang import ------------------------------------------------------------------------------


@main.command(name="import")
@click.argument("config", type=click.Path(path_type=Path, dir_okay=False))
@click.option("-o", "--output", "out", type=click.Path(path_type=Path, dir_okay=False),
              help="Write the spec to this file instead of printing it.")
@click.option("--force", is_flag=True, help="Replace the output file if it exists.")
@_user_errors
def import_cmd(config, out, force, reporter):
    """Translate a mergekit YAML CONFIG into a mergelang spec."""
    from .importer import translate_file, write_spec

    spec = translate_file(config)
    if out is None:
        click.echo(spec, nl=False)
        return
    write_spec(spec, out, force=force)
    click.echo(f"wrote {out}", err=True)
# ---- mergelang verify ------------------------------------------------------------------------------


@main.command()
@click.argument("folder", type=click.Path(path_type=Path, file_okay=False))
@click.option("--model", "models", multiple=True, metavar="NAME=PATH",
              help="The input NAME has moved to PATH (its files must still hash the same; repeatable).")
@click.option("--tmp", type=click.Path(path_type=Path, file_okay=False),
              help="Where to write the re-run merge (default: the system's temporary folder); removed after.")
@click.option("--device", default="cpu", show_default=True, help="Where to compute; the output does not depend on it.")
@click.option("-j", "--threads", type=click.IntRange(min=1), help="CPU threads (default: all cores).")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
@_user_errors
def verify(folder, models, tmp, device, threads, quiet, reporter):
    """Check that FOLDER is what its recorded spec computes from its recorded inputs.

    Reads the record in FOLDER/README.md, checks that every input file still has its recorded
    sha256, re-runs the merge into a temporary folder and compares every file. Prints `identical`
    (exit 0), or the first file (and tensor) that differs (exit 1).
    """
    from .verify import verify_folder

    _check_device(device)
    if threads:
        import torch

        torch.set_num_threads(threads)

    def on_plan(plan):
        _print(reporter.warnings)
        reporter.diagnostics.clear()
        return _progress(plan, quiet)

    difference = verify_folder(folder, _parse_models(models), reporter, device=device, tmp=tmp, on_plan=on_plan)
    if difference is None:
        click.echo("identical")
        return
    click.echo(f"differs: {difference}")
    sys.exit(EXIT_ERROR)
