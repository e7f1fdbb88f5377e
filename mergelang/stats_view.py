"""Showing a DeltaReport: a rich table for the terminal, and a plot of |δ| by layer (matplotlib)."""

from __future__ import annotations

from pathlib import Path

from .diagnostics import MISSING_DEPENDENCY, WRITE, Diagnostic, MergelangError
from .stats import LARGE_DELTA, QUANTILES, SAFE_DELTA, DeltaReport, DeltaStats, level

PLOT_SIZE = (12.0, 4.5)  # inches
PLOT_DPI = 100
_LEVEL_STYLE = {"small": "green", "moderate": "yellow", "large": "red"}


def _layer_label(layer: int | None) -> str:
    return "-" if layer is None else str(layer)


def rows(report: DeltaReport, by: str) -> list[tuple[str, DeltaStats]]:
    """(label, statistics) per row of the table, grouped `by` "layer", "kind" or "tensor"."""
    if by == "layer":
        return [(_layer_label(k), s) for k, s in report.by_layer.items()]
    if by == "kind":
        return list(report.by_kind.items())
    return [(t.name, t.stats) for t in report.tensors]


def table(report: DeltaReport, by: str):
    from rich.table import Table

    exact = by == "tensor"
    title = f"δ = ft − base, by {by}" + ("" if exact else " (quantiles of |δ| within 0.4 %)")
    t = Table(title=title, title_justify="left")
    t.add_column({"layer": "layer", "kind": "kind", "tensor": "tensor"}[by])
    for head in ("entries", "min δ", "max δ", "mean |δ|", *(f"p{q * 100:g}" for q in QUANTILES), "max |δ|", "DARE"):
        t.add_column(head, justify="right" if head != "DARE" else "left")

    def add(label: str, s: DeltaStats, **kw) -> None:
        lv = level(s.p99)
        t.add_row(label, str(s.count), f"{s.min:.3g}", f"{s.max:.3g}", f"{s.mean_abs:.3g}",
                  *(f"{s.quantiles[q]:.3g}" for q in QUANTILES), f"{s.max_abs:.3g}",
                  f"[{_LEVEL_STYLE[lv]}]{lv}[/]", **kw)

    for label, s in rows(report, by):
        add(label, s)
    t.add_section()
    add("all", report.overall, style="bold")
    return t


def print_report(report: DeltaReport, by: str, console) -> None:
    console.print(f"fine-tuned: {report.ft}\nbase:       {report.base}")
    console.print(table(report, by))
    lv = level(report.overall.p99)
    console.print(f"[bold {_LEVEL_STYLE[lv]}]verdict:[/] {report.verdict}", highlight=False)


def pyplot():
    """matplotlib.pyplot on a file backend, or a diagnostic saying how to install it."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise MergelangError(Diagnostic(MISSING_DEPENDENCY, "--plot needs matplotlib, which is not installed",
                                        help="pip install 'mergelang[plot]'")) from None
    return plt


def plot(report: DeltaReport, out: Path) -> Path:
    """Mean and p99 |δ| per layer, one line per tensor kind, on a log axis, with the SAFE_DELTA
    and LARGE_DELTA reference lines; written as a PNG of PLOT_SIZE × PLOT_DPI pixels."""
    plt = pyplot()
    from matplotlib.ticker import MaxNLocator
    series: dict[str, list[tuple[int, DeltaStats]]] = {}
    for t in report.tensors:
        if t.layer is not None:
            series.setdefault(t.kind, []).append((t.layer, t.stats))
    fig, axes = plt.subplots(1, 2, figsize=PLOT_SIZE, dpi=PLOT_DPI, sharey=True)
    for ax, (title, value) in zip(axes, (("mean |δ|", lambda s: s.mean_abs), ("p99 |δ|", lambda s: s.p99))):
        for kind, points in sorted(series.items()):
            points.sort(key=lambda p: p[0])
            ys = [max(value(s), 1e-12) for _, s in points]  # a log axis cannot show 0
            ax.plot([layer for layer, _ in points], ys, marker=".", label=kind)
        ax.axhline(SAFE_DELTA, color="green", linestyle="--", linewidth=1, label=f"{SAFE_DELTA} (DARE safe)")
        ax.axhline(LARGE_DELTA, color="red", linestyle="--", linewidth=1, label=f"{LARGE_DELTA} (DARE hurts)")
        ax.set_yscale("log")
        ax.set_xlabel("layer")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("|ft − base|")
    axes[1].legend(fontsize="small", loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.suptitle(f"{Path(report.ft).name} − {Path(report.base).name}")
    fig.subplots_adjust(left=0.07, right=0.78, bottom=0.12, top=0.86, wspace=0.08)
    out = Path(out)
    try:
        fig.savefig(out, dpi=PLOT_DPI, format="png")
    except OSError as e:
        raise MergelangError(Diagnostic(WRITE, f"cannot write the plot {out}: {e.strerror or e}")) from None
    finally:
        plt.close(fig)
    return out
