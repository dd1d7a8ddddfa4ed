"""Loss curves as PNG (matplotlib is optional: `pip install llmneo[plot]`)."""

from __future__ import annotations

import warnings
from pathlib import Path


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        warnings.warn("plot_loss: matplotlib is not installed (pip install 'llmneo[plot]'); no plot written")
        return None
    return plt


def training_loss(rows: list[dict], path: Path, title: str = "training loss") -> bool:
    """Plot loss, ce_loss and kd_loss (when present) against step. Returns whether a file was written."""
    plt = _pyplot()
    if plt is None or not rows:
        return False
    fig, ax = plt.subplots(figsize=(7, 4))
    steps = [r["step"] for r in rows]
    for key, style in (("loss", "-"), ("ce_loss", "--"), ("kd_loss", ":")):
        values = [r.get(key) for r in rows]
        if all(v is not None for v in values):
            ax.plot(steps, values, style, label=key)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (per response token)")
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
