"""The roofline plot: one panel per op, each (size, pass, callable) a point (matmul FLOPs per minimum byte, achieved
matmul TFLOP/s) under the two ceilings measured in the run, min(peak, bandwidth x intensity), log-log. subq is
drawn in one colour on every panel and its baselines in others; circles are forward, triangles forward+backward;
the points of one callable and pass are joined in size order. matplotlib is imported here only (Agg backend, no
display), so everything else runs without it."""

from __future__ import annotations

import math
from pathlib import Path

from subq.profile.report import flat

MARKERS = {"fwd": "o", "fwd+bwd": "^"}
SUBQ_COLOR = "#d62728"
BASELINE_COLORS = ("#1f77b4", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#17becf", "#7f7f7f")
COLUMNS = 3


def _impl_colors(impls: list[str]) -> dict[str, str]:
    colors, baselines = {}, iter(BASELINE_COLORS)
    for impl in impls:
        colors[impl] = SUBQ_COLOR if impl.startswith("subq") else next(baselines, "#000000")
    return colors


def _panel(ax, points: list[dict], peak_tf: float, bw: float, lo: float, hi: float) -> None:
    grid = [lo * (hi / lo) ** (i / 200) for i in range(201)]
    ax.plot(grid, [min(peak_tf, bw * x / 1e3) for x in grid], color="black", linewidth=1.2)
    ax.text(hi, peak_tf * 1.08, f"matmul {peak_tf:.3g} TFLOP/s", ha="right", va="bottom", fontsize=7)
    x_label = lo * 1.5
    ax.text(x_label, bw * x_label / 1e3 * 1.25, f"copy {bw:.3g} GB/s", ha="left", va="bottom", fontsize=7,
            rotation=0)
    impls = list(dict.fromkeys(r["impl"] for r in points))
    colors = _impl_colors(impls)
    for impl in impls:
        for pass_name, marker in MARKERS.items():
            mine = [r for r in points if (r["impl"], r["pass"]) == (impl, pass_name)]
            if not mine:
                continue
            xs, ys = [r["intensity"] for r in mine], [r["tflops"] for r in mine]
            ax.plot(xs, ys, color=colors[impl], linewidth=0.6, alpha=0.6)
            ax.scatter(xs, ys, marker=marker, s=28, color=colors[impl], edgecolors="black", linewidths=0.3,
                       label=f"{impl} ({pass_name})", zorder=3)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(lo, hi)
    ax.grid(True, which="both", linewidth=0.3, alpha=0.5)
    ax.legend(loc="lower right", fontsize=6.5, frameon=True, framealpha=0.85)


def plot(rows: list[dict], peak: dict, title: str, path: Path) -> None:
    """Writes the PNG; raises ImportError when matplotlib is missing."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [r for r in flat(rows) if r["tflops"] is not None and r["intensity"]]
    ops = list(dict.fromkeys(r["op"] for r in points))
    if not ops:
        return
    peak_tf, bw = peak["matmul_tflops"], peak["copy_gbs"]
    ridge = peak_tf * 1e3 / bw  # FLOP/B where the bandwidth roof meets the matmul roof
    xs = [r["intensity"] for r in points] + [ridge]
    lo, hi = min(xs) / 3, max(xs) * 3
    y_lo = min(min(r["tflops"] for r in points), bw * lo / 1e3) / 3
    columns = min(COLUMNS, len(ops))
    rows_of_panels = math.ceil(len(ops) / columns)
    fig, axes = plt.subplots(rows_of_panels, columns, figsize=(5.2 * columns, 4.2 * rows_of_panels + 0.6),
                             dpi=110, squeeze=False, sharex=True, sharey=True)
    for index, op in enumerate(ops):
        ax = axes[index // columns][index % columns]
        _panel(ax, [r for r in points if r["op"] == op], peak_tf, bw, lo, hi)
        ax.set_ylim(y_lo, peak_tf * 3)
        ax.set_title(op, fontsize=10)
    for index in range(len(ops), rows_of_panels * columns):
        axes[index // columns][index % columns].set_visible(False)
    fig.supxlabel("arithmetic intensity: matmul FLOPs executed / minimum bytes (FLOP/B)", fontsize=9)
    fig.supylabel("achieved TFLOP/s (matmul FLOPs executed / time)", fontsize=9)
    fig.suptitle(f"{title}  (circles: forward, triangles: forward+backward; subq in red)", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
