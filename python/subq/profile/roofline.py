"""The roofline plot: every (op, size, pass, callable) as a point (matmul FLOPs per minimum byte, achieved matmul
TFLOP/s) under the two ceilings measured in the run, min(peak, bandwidth x intensity), log-log. matplotlib is
imported here only (Agg backend, no display), so everything else runs without it."""

from __future__ import annotations

from pathlib import Path

from subq.profile.report import flat

MARKERS = {"fwd": "o", "fwd+bwd": "^"}


def plot(rows: list[dict], peak: dict, title: str, path: Path) -> None:
    """Writes the PNG; raises ImportError when matplotlib is missing."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [r for r in flat(rows) if r["tflops"] is not None]
    series = list(dict.fromkeys((r["op"], r["impl"]) for r in points))
    colors = plt.get_cmap("tab10" if len(series) <= 10 else "tab20")
    peak_tf, bw = peak["matmul_tflops"], peak["copy_gbs"]
    ridge = peak_tf * 1e3 / bw  # FLOP/B where the bandwidth roof meets the matmul roof

    fig, ax = plt.subplots(figsize=(11, 6.5), dpi=120)
    xs = [r["intensity"] for r in points] + [ridge]
    lo, hi = min(xs) / 4, max(xs) * 4
    grid = [lo * (hi / lo) ** (i / 200) for i in range(201)]
    ax.plot(grid, [min(peak_tf, bw * x / 1e3) for x in grid], color="black", linewidth=1.5)
    ax.axhline(peak_tf, color="black", linestyle=":", linewidth=0.8)
    ax.annotate(f"matmul peak {peak_tf:.4g} TFLOP/s", (hi, peak_tf), ha="right", va="bottom", fontsize=8)
    ax.annotate(f"copy {bw:.4g} GB/s", (lo * 1.2, bw * lo * 1.2 / 1e3), rotation=0, va="bottom", fontsize=8)
    for index, (op, impl) in enumerate(series):
        for pass_name, marker in MARKERS.items():
            mine = [r for r in points if (r["op"], r["impl"], r["pass"]) == (op, impl, pass_name)]
            if mine:
                ax.scatter([r["intensity"] for r in mine], [r["tflops"] for r in mine], marker=marker, s=36,
                           color=colors(index), edgecolors="black", linewidths=0.4,
                           label=f"{op} / {impl} ({pass_name})")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("arithmetic intensity: matmul FLOPs executed / minimum bytes (FLOP/B)")
    ax.set_ylabel("achieved TFLOP/s (matmul FLOPs executed / time)")
    ax.set_title(title)
    ax.grid(True, which="both", linewidth=0.3, alpha=0.5)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7, frameon=False)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
