"""What a run leaves besides checkpoints: ``history.json`` (every step's loss and learning rate, every evaluation)
and ``loss.png``, the train and val loss curves. matplotlib is imported here only, with the Agg canvas (no display,
no global backend switch), so training runs without it."""

from __future__ import annotations

import json
from pathlib import Path

HISTORY_FILE = "history.json"
PLOT_FILE = "loss.png"
SMOOTHING_POINTS = 50  # the noisy per-step train loss is also drawn as a trailing mean over len/50 steps


def write_history(out: Path, history: dict, config: dict) -> Path:
    path = out / HISTORY_FILE
    path.write_text(json.dumps({"config": config, **history}, indent=1) + "\n")
    return path


def plot_losses(out: Path, history: dict, title: str) -> Path:
    """Writes the PNG; raises ImportError when matplotlib is missing."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 4.5), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    steps = [r["step"] for r in history["train"]]
    losses = [r["loss"] for r in history["train"]]
    window = max(1, len(losses) // SMOOTHING_POINTS)
    smooth = []
    for end in range(1, len(losses) + 1):
        recent = losses[max(0, end - window): end]
        smooth.append(sum(recent) / len(recent))
    ax.plot(steps, losses, color="tab:blue", alpha=0.25, linewidth=0.8)
    ax.plot(steps, smooth, color="tab:blue", label="train (smoothed)")
    ax.plot([r["step"] for r in history["val"]], [r["loss"] for r in history["val"]], "o-", color="tab:orange",
            markersize=3, label="val")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats per token)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = out / PLOT_FILE
    fig.savefig(path)
    return path
