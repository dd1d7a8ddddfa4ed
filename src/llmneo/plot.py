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
    fig = loss_figure(plt, rows, title)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def training_rows(rows: list[dict]) -> list[dict]:
    """The training rows of metrics.jsonl rows (eval_strategy's held-out rows have eval_* keys instead)."""
    return [r for r in rows if "loss" in r]


def loss_figure(plt, rows: list[dict], title: str):
    """The training_loss.png figure; held-out eval_loss rows (eval_strategy) as dots. One logged row is drawn
    as a marker: a line through one point is invisible."""
    fig, ax = plt.subplots(figsize=(7, 4))
    held_out = [r for r in rows if r.get("eval_loss") is not None]
    rows = training_rows(rows)
    steps = [r["step"] for r in rows]
    marker = "o" if len(rows) == 1 else None
    for key, style in (("loss", "-"), ("ce_loss", "--"), ("kd_loss", ":")):
        values = [r.get(key) for r in rows]
        if rows and all(v is not None for v in values):
            ax.plot(steps, values, style, marker=marker, label=key)
    if held_out:
        ax.plot([r["step"] for r in held_out], [r["eval_loss"] for r in held_out], "o-", label="eval_loss (held-out)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (per response token)")
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def arm_comparison(curves: dict[str, list[dict]], rows: list[dict], path: Path) -> bool:
    """The demo's figure: each arm's training loss, then held-out perplexity, KL to the teacher and (when
    measured) the teacher's log-prob of each model's greedy answers, per model."""
    plt = _pyplot()
    if plt is None:
        return False
    bars = [("perplexity", "held-out perplexity (lower is better)"),
            ("kl_to_teacher", "held-out KL to teacher (lower is better)")]
    if any(r.get("teacher_logprob") is not None for r in rows):
        bars.append(("teacher_logprob", "teacher log-prob of greedy answers\n(per token, higher is better)"))
    fig, axes = plt.subplots(1, 1 + len(bars), figsize=(5 * (1 + len(bars)), 4.2))
    for arm, history in curves.items():
        history = training_rows(history)
        axes[0].plot([r["step"] for r in history], [r["loss"] for r in history], label=arm)
    axes[0].set_xlabel("optimizer step")
    axes[0].set_ylabel("training loss (each arm's own objective)")
    axes[0].set_title("training loss")
    axes[0].legend()
    axes[0].grid(alpha=0.3)
    names = [r["model"].split(" (")[0].replace(", untrained", "") for r in rows]
    colours = ["#777777", "#bbbbbb"] + [f"C{i}" for i in range(len(rows) - 2)]  # arms coloured as their curves
    for ax, (key, title) in zip(axes[1:], bars):
        values = [r.get(key) or 0.0 for r in rows]
        drawn = ax.bar(range(len(rows)), values, color=colours[:len(rows)])
        ax.set_xticks(range(len(rows)), names, rotation=30, ha="right")
        ax.set_title(title)
        ax.bar_label(drawn, fmt="%.3f", fontsize=8)
        ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
