"""What `llmneo sweep` writes about its cells: sweep.csv, sweep.md, heatmap.png, and which cell is best.

Each cell is one row: its axis values, status, held-out metrics and a training summary. `sweep_metric`
ranks the finished rows (lower perplexity or KL is better, higher top-1 agreement). Files are written
through a temporary file and a rename (run_dir.write_text), so a crash never leaves half a table. An `Axis`
(one swept key and its values) is defined here, where the tables and the heatmap lay the axes out; `grid`
parses them from the command line.
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass
from pathlib import Path

from llmneo import evaluate, plot, run_dir

LOWER_IS_BETTER = {"perplexity": True, "kl_to_teacher": True, "top1_agreement": False}
METRICS = tuple(LOWER_IS_BETTER)
RESULT_COLUMNS = ("status", *METRICS, "final_loss", "train_runtime", "trainable_params", "cell_dir", "error")


@dataclass
class Axis:
    key: str
    texts: list[str]  # the values as the user wrote them: CSV cells, folder names, tick labels


def best(rows: list[dict], metric: str) -> dict | None:
    """The finished row with the best metric (the first one on a tie), or None."""
    scored = [r for r in rows if r["status"] == "ok" and isinstance(r.get(metric), (int, float))
              and math.isfinite(r[metric])]
    if not scored:
        return None
    sign = 1 if LOWER_IS_BETTER[metric] else -1
    return min(scored, key=lambda r: sign * r[metric])


def write_csv(path: Path, axes: list[Axis], rows: list[dict]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=[a.key for a in axes] + list(RESULT_COLUMNS), lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: "" if v is None else v for k, v in r.items()})
    run_dir.write_text(path, buffer.getvalue())


def write_markdown(path: Path, axes: list[Axis], rows: list[dict], metric: str, heatmap: bool) -> None:
    top = best(rows, metric)
    direction = "lower" if LOWER_IS_BETTER[metric] else "higher"
    columns = [(a.key, a.key) for a in axes] + [(k, k) for k in RESULT_COLUMNS if k != "cell_dir"]
    shown = [{**r, "error": str(r.get("error") or "").replace("|", "\\|")} for r in rows]
    shape = " x ".join(f"{a.key}: {len(a.texts)}" for a in axes)
    lines = ["# llmneo sweep", "", (f"{len(rows)} cells ({shape}), each scored on the held-out split; "
                                    f"`{metric}` picks the best ({direction} is better)."), ""]
    if top is not None:
        setting = " ".join(f"{a.key}={top[a.key]}" for a in axes)
        lines += [f"**Best:** {setting}: {metric} {top[metric]:.4g} (`{top['cell_dir']}`)", ""]
    lines += [evaluate.format_table(shown, columns), ""]
    if heatmap:
        lines += [f"![{metric} heatmap](heatmap.png)", ""]
    run_dir.write_text(path, "\n".join(lines))


def write_heatmap(path: Path, axes: list[Axis], rows: list[dict], metric: str) -> bool:
    """Two axes: `metric` per cell, axis 1 on y and axis 2 on x; failed cells grey and marked."""
    plt = plot._pyplot()
    if plt is None:
        return False
    import numpy as np

    ys, xs = axes
    grid = np.full((len(ys.texts), len(xs.texts)), np.nan)
    status = np.full(grid.shape, "pending", dtype=object)
    for r in rows:
        i, j = ys.texts.index(r[ys.key]), xs.texts.index(r[xs.key])
        status[i, j] = r["status"]
        if r["status"] == "ok" and isinstance(r.get(metric), (int, float)):
            grid[i, j] = r[metric]
    lower = LOWER_IS_BETTER[metric]
    # Better cells are the bright ones; missing ones grey.
    cmap = plt.get_cmap("viridis_r" if lower else "viridis").with_extremes(bad="#d9d9d9")
    finite = grid[np.isfinite(grid)]
    fig, ax = plt.subplots(figsize=(2.0 + 1.3 * len(xs.texts), 1.6 + 0.8 * len(ys.texts)))
    image = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, aspect="auto",
                      vmin=finite.min() if finite.size else 0, vmax=finite.max() if finite.size else 1)
    for (i, j), value in np.ndenumerate(grid):
        if np.isfinite(value):
            r, g, b, _ = cmap(image.norm(value))
            colour = "black" if 0.299 * r + 0.587 * g + 0.114 * b > 0.5 else "white"
            ax.text(j, i, f"{value:.4g}", ha="center", va="center", color=colour, fontsize=9)
        else:
            ax.text(j, i, "failed" if status[i, j] == "failed" else "-", ha="center", va="center",
                    color="#b00000" if status[i, j] == "failed" else "black", fontsize=9)
    top = best(rows, metric)
    if top is not None:
        i, j = ys.texts.index(top[ys.key]), xs.texts.index(top[xs.key])
        ax.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=2.5))
    ax.set_xticks(range(len(xs.texts)), xs.texts)
    ax.set_yticks(range(len(ys.texts)), ys.texts)
    ax.set_xlabel(xs.key)
    ax.set_ylabel(ys.key)
    ax.set_title(f"held-out {metric} ({'lower' if lower else 'higher'} is better; best boxed)")
    if finite.size:
        fig.colorbar(image, ax=ax, label=metric)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def describe(r: dict, metric: str) -> str:
    shown = [metric] + [m for m in METRICS if m != metric]
    return ", ".join(f"{m} {r[m]:.4g}" for m in shown if isinstance(r.get(m), (int, float)))
