"""The run folder's loss_curve.png (matplotlib, no display needed)."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import log
from ..rundir import TRAINER_STATE


def plot_loss_curve(log_history: list[dict], path: Path) -> None:
    """Draw it; a failure (matplotlib that cannot load, a full disk) is a warning, not the end of a run whose adapter
    is already written: the loss per step is in the Trainer's state file either way."""
    tmp = path.with_name(path.name + ".tmp.png")
    try:
        _draw(log_history, tmp)
        os.replace(tmp, path)
    except Exception as e:  # noqa: BLE001 (a picture is never worth a run)
        tmp.unlink(missing_ok=True)
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        log(f"warning: could not draw {path.name} ({first}); the losses are in {TRAINER_STATE}")


def _draw(log_history: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(h["step"], h["loss"]) for h in log_history if "loss" in h]
    evals = [(h["step"], h["eval_loss"]) for h in log_history if "eval_loss" in h]
    fig, ax = plt.subplots(figsize=(7, 4))
    try:
        if train:
            ax.plot(*zip(*train), label="train loss", marker="." if len(train) < 50 else None)
        if evals:
            ax.plot(*zip(*evals), "o--", label="eval loss")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss (answer tokens)")
        ax.set_title("medlora training loss")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(path, dpi=110, format="png")
    finally:
        plt.close(fig)
