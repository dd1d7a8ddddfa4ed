"""What `llmneo demo` writes: the verdict in plain words, report.md, results.json and curves.png."""

from __future__ import annotations

import json
from pathlib import Path

ON_POLICY = "neo on-policy"  # the on-policy arm's row


def verdict(rows: list[dict]) -> str:
    """Plain statements on Neo vs LoRA, Neo vs KD and on-policy vs off-policy Neo, whatever the numbers say."""
    by = {r["model"]: r for r in rows}
    neo, lora, kd, base = by["neo"], by["lora"], by["kd"], rows[1]
    lines = []
    better = neo["perplexity"] < lora["perplexity"]
    closer = neo["kl_to_teacher"] < lora["kl_to_teacher"]
    lines.append(f"Neo {'beats' if better else 'does not beat'} LoRA on held-out perplexity "
                 f"({neo['perplexity']:.4f} vs {lora['perplexity']:.4f}) and "
                 f"{'is closer to' if closer else 'is not closer to'} the teacher "
                 f"(KL {neo['kl_to_teacher']:.4f} vs {lora['kl_to_teacher']:.4f}).")
    gain_kd = base["kl_to_teacher"] - kd["kl_to_teacher"]
    gain_neo = base["kl_to_teacher"] - neo["kl_to_teacher"]
    if gain_neo <= 0:
        lines.append(f"Neo did not reduce the KL to the teacher from the pruned student's "
                     f"({neo['kl_to_teacher']:.4f} vs {base['kl_to_teacher']:.4f}).")
    elif gain_kd > 0:
        lines.append(f"Neo recovers {100 * gain_neo / gain_kd:.0f}% of full KD's KL reduction from the pruned student "
                     f"with {neo['trainable_params'] / kd['trainable_params']:.1%} of its trainable parameters "
                     f"(held-out perplexity {neo['perplexity']:.4f} vs KD {kd['perplexity']:.4f}).")
    else:
        lines.append(f"Neo reduced the KL to the teacher from the pruned student's ({neo['kl_to_teacher']:.4f} vs "
                     f"{base['kl_to_teacher']:.4f}); full KD did not on this run, so there is no KD gain to compare "
                     f"with.")
    if ON_POLICY in by:
        lines.append(_on_policy_verdict(by[ON_POLICY], neo, rows[0]))
    return " ".join(lines)


def _on_policy_verdict(on: dict, off: dict, teacher: dict) -> str:
    wins = {"perplexity": on["perplexity"] < off["perplexity"], "KL": on["kl_to_teacher"] < off["kl_to_teacher"],
            "teacher log-prob": on["teacher_logprob"] > off["teacher_logprob"]}
    text = (f"On-policy Neo {'beats' if wins['perplexity'] else 'does not beat'} off-policy Neo on held-out "
            f"perplexity ({on['perplexity']:.4f} vs {off['perplexity']:.4f}), "
            f"{'is closer to' if wins['KL'] else 'is not closer to'} the teacher "
            f"(KL {on['kl_to_teacher']:.4f} vs {off['kl_to_teacher']:.4f}), and its own greedy answers "
            f"{'score higher' if wins['teacher log-prob'] else 'do not score higher'} under the teacher "
            f"(mean log-prob per token {on['teacher_logprob']:.4f} vs {off['teacher_logprob']:.4f}; "
            f"the teacher's own greedy answers {teacher['teacher_logprob']:.4f}).")
    won = [name for name, win in wins.items() if win]
    if len(won) == len(wins):
        return text + " It wins on all three."
    if not won:
        return text + " It wins on none of the three."
    return text + f" It wins on {' and '.join(won)} only."


def describe_settings(values: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in values.items())


def describe_numerics(numerics: dict) -> str:
    threads = f"{numerics['threads']} thread{'s' if numerics['threads'] != 1 else ''}"
    text = (f"{threads}, ATen {numerics['aten_cpu_capability']} kernels, MKL branch {numerics['mkl_cbwr']}, "
            f"{numerics['device']}, torch {numerics['torch']}")
    if numerics["missed"]:
        return text + " (not as pinned: " + "; ".join(numerics["missed"]) + ")"
    return text + " (as pinned)"


def write(out: Path, *, command: str, settings: dict, shared: dict, generation: dict, numerics: dict,
          rows: list[dict], curves: dict, runtime: float) -> dict:
    """report.md, results.json and curves.png in `out`; the table and verdict printed too."""
    from llmneo import evaluate, plot, run_dir

    for row in rows:
        mem = row.get("peak_memory_bytes")
        row["peak_memory_mb"] = None if mem is None else mem / 2**20
    columns = [("model", "model"), ("perplexity", "held-out ppl"), ("kl_to_teacher", "KL to teacher"),
               ("top1_agreement", "top-1 agreement"), ("teacher_logprob", "teacher log-prob of greedy answers"),
               ("trainable_params", "trainable params"), ("peak_memory_mb", "peak RSS (MB)"),
               ("wall_time", "wall time (s)")]
    table = evaluate.format_table(rows, columns)
    statement = verdict(rows)
    plot.arm_comparison(curves, rows, out / "curves.png")
    on_policy = next(r for r in rows if r["model"] == ON_POLICY)
    unended = [f"{r['model']} {1 - r['replies_ended']:.0%}" for r in rows if r["replies_ended"] < 1]
    text = "\n".join([
        "# llmneo demo: SFT, LoRA, KD, Neo and on-policy Neo on a toy world", "",
        f"Command: `{command}` (settings: {json.dumps(settings)}"
        + (f", shared: {json.dumps(shared)}" if shared else "") + ")", "",
        table, "",
        f"**Verdict.** {statement}", "",
        "Held-out metrics are over response tokens of unseen samples of the world. Peak RSS is the process's "
        "resident-set high-water mark during that run (CPU); at this size it is mostly the torch runtime.",
        "The teacher log-prob of greedy answers is the teacher's mean log-prob per token of the replies each model "
        "writes itself, greedily, to the held-out prompts (the teacher's row: its own greedy answers); higher is "
        f"closer to what the teacher would say. On-policy Neo is Neo with {describe_settings(generation)}; "
        + (f"{on_policy['on_policy_fraction']:.0%} of its steps were on-policy."
           if on_policy.get("on_policy_fraction") is not None else "its on-policy fraction was not recorded."),
        "Greedy answers that did not end within max_new_tokens: " + (", ".join(unended) if unended else "none") + ".",
        f"Numerics: {describe_numerics(numerics)}.",
        f"Total demo time: {runtime:.0f} s. Curves: curves.png.", ""])
    (out / "report.md").write_text(text)
    run_dir.write_json(out / "results.json", {"rows": rows, "verdict": statement, "settings": settings,
                                              "shared": shared, "on_policy": generation, "numerics": numerics,
                                              "runtime": runtime})
    print()
    print(table)
    print()
    print(statement)
    print(f"[llmneo demo] report written to {out / 'report.md'} ({runtime:.0f} s)", flush=True)
    return {"rows": rows, "verdict": statement, "runtime": runtime}
