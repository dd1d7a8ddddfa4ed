"""llmneo eval: metrics against independent computations, adapters, and the lm-eval bridge."""

from __future__ import annotations

import json
import math

import pytest
import torch

from llmneo import cli, config, data, evaluate, models


def _examples(student_dir, alpaca_file):
    cfg = config.load(overrides={"model_name_or_path": str(student_dir), "dataset": str(alpaca_file),
                                 "cutoff_len": 64})
    tokenizer = models.load_tokenizer(str(student_dir), "model_name_or_path")
    return data.build(cfg, tokenizer).train, tokenizer


def test_perplexity_is_exp_mean_response_ce(student_dir, alpaca_file):
    from transformers import AutoModelForCausalLM

    examples, tokenizer = _examples(student_dir, alpaca_file)
    model = AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32).eval()
    got = evaluate.response_metrics(model, examples, tokenizer.pad_token_id, len(tokenizer), batch_size=3)
    # Independently: HF's own shifted loss, one unpadded example at a time, weighted by its token count.
    total, count = 0.0, 0
    with torch.no_grad():
        for ex in examples:
            labels = torch.tensor([ex["labels"]])
            n = int((labels[:, 1:] != -100).sum())
            total += float(model(torch.tensor([ex["input_ids"]]), labels=labels).loss) * n
            count += n
    assert got["tokens"] == count
    assert got["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-5)


def test_kl_and_agreement_by_hand(student_dir, teacher_dir, alpaca_file):
    from transformers import AutoModelForCausalLM

    examples, tokenizer = _examples(student_dir, alpaca_file)
    student = AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32).eval()
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).eval()
    vocab = len(tokenizer)
    got = evaluate.response_metrics(student, examples, tokenizer.pad_token_id, vocab, teacher=teacher, batch_size=4)
    kl, agree, n = 0.0, 0, 0
    with torch.no_grad():
        for ex in examples:
            ids = torch.tensor([ex["input_ids"]])
            s_logits = student(ids).logits[0, :, :vocab].double()
            t_logits = teacher(ids).logits[0, :, :vocab].double()  # padded rows of the teacher dropped
            for t in range(len(ex["labels"]) - 1):
                if ex["labels"][t + 1] == -100:
                    continue
                p = torch.exp(t_logits[t] - torch.logsumexp(t_logits[t], 0))
                q = torch.exp(s_logits[t] - torch.logsumexp(s_logits[t], 0))
                kl += float((p * (p.log() - q.log())).sum())
                agree += int(s_logits[t].argmax() == t_logits[t].argmax())
                n += 1
    assert got["kl_to_teacher"] == pytest.approx(kl / n, rel=1e-4)
    assert got["top1_agreement"] == pytest.approx(agree / n)
    assert got["kl_to_teacher"] > 0.1  # the fixture teacher is peaked: a real difference to measure


def test_eval_cli_on_an_adapter_dir(tmp_path, base_overrides, teacher_dir, alpaca_file, capsys):
    import yaml

    run_cfg = tmp_path / "neo.yaml"
    run_cfg.write_text(yaml.safe_dump({**base_overrides, "max_steps": 2}))
    assert cli.main(["train", str(run_cfg)]) == 0
    out = base_overrides["output_dir"]
    capsys.readouterr()
    assert cli.main(["eval", f"model_name_or_path={out}", f"teacher_model_name_or_path={teacher_dir}",
                     f"dataset={alpaca_file}", f"output_dir={out}"]) == 0
    printed = capsys.readouterr().out
    assert "perplexity" in printed and "KL to teacher" in printed
    results = json.loads((tmp_path / "out" / "eval_results.json").read_text())
    assert {"perplexity", "tokens", "kl_to_teacher", "top1_agreement"} <= set(results)
    assert 0.0 <= results["top1_agreement"] <= 1.0 and results["perplexity"] > 1.0


def test_eval_with_val_size_scores_the_held_out_rows(tmp_path, student_dir):
    """`llmneo eval val_size=...` scores the held-out split, not the training split.

    Each row's reply has its own length, so the scored token count says which rows were scored; the
    perplexity is recomputed with HF's own loss on the held-out examples alone.
    """
    from conftest import write_jsonl
    from transformers import AutoModelForCausalLM

    words = ["red", "fox", "blue", "sky", "cold", "tea", "warm", "sun"]
    rows = [{"instruction": f"Repeat {w}.", "input": "", "output": " ".join([w] * (3 * i + 1))}
            for i, w in enumerate(words)]
    dataset = write_jsonl(tmp_path / "rows.jsonl", rows)
    settings = {"model_name_or_path": str(student_dir), "dataset": str(dataset), "cutoff_len": 128, "val_size": 2}
    tokenizer = models.load_tokenizer(str(student_dir), "model_name_or_path")
    splits = data.build(config.load(overrides=settings), tokenizer)
    # the two splits partition the rows: each instruction is in exactly one of them
    held_out = {w for w in words if any(f"Repeat {w}." in tokenizer.decode(ex["input_ids"]) for ex in splits.eval)}
    trained = {w for w in words if any(f"Repeat {w}." in tokenizer.decode(ex["input_ids"]) for ex in splits.train)}
    assert len(held_out) == 2 and held_out.isdisjoint(trained) and held_out | trained == set(words)

    model = AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32).eval()

    def by_hand(examples):
        total, count = 0.0, 0
        with torch.no_grad():
            for ex in examples:
                labels = torch.tensor([ex["labels"]])
                n = int((labels[:, 1:] != -100).sum())
                total += float(model(torch.tensor([ex["input_ids"]]), labels=labels).loss) * n
                count += n
        return math.exp(total / count), count

    held_out_ppl, held_out_tokens = by_hand(splits.eval)
    train_ppl, train_tokens = by_hand(splits.train)
    assert held_out_tokens != train_tokens and held_out_ppl != pytest.approx(train_ppl, rel=1e-3)

    out = tmp_path / "eval"
    assert cli.main(["eval", *(f"{k}={v}" for k, v in settings.items()), f"output_dir={out}"]) == 0
    results = json.loads((out / "eval_results.json").read_text())
    assert results["tokens"] == held_out_tokens
    assert results["perplexity"] == pytest.approx(held_out_ppl, rel=1e-5)


def test_eval_needs_something_to_do(student_dir, capsys):
    assert cli.main(["eval", f"model_name_or_path={student_dir}"]) == 2
    assert "nothing to evaluate" in capsys.readouterr().err


TASK_YAML = """\
task: llmneo_local_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
target_delimiter: ""
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""

DOCS = [
    {"question": "The quick brown", "choices": [" fox", " dog", " zebra"], "answer": 0},
    {"question": "Two plus two is", "choices": [" four", " five"], "answer": 0},
    {"question": "Hello", "choices": [" there", " yak", " student"], "answer": 1},
    {"question": "The small", "choices": [" teacher", " student"], "answer": 1},
]


def test_lm_eval_bridge_on_a_local_task(tmp_path, student_dir):
    pytest.importorskip("lm_eval")
    from transformers import AutoModelForCausalLM

    data_file = tmp_path / "docs.jsonl"
    data_file.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    task_file = tmp_path / "task.yaml"
    task_file.write_text(TASK_YAML.format(data=data_file))
    out = tmp_path / "eval"
    assert cli.main(["eval", f"model_name_or_path={student_dir}", f"tasks={task_file}", f"output_dir={out}"]) == 0
    acc = json.loads((out / "eval_results.json").read_text())["lm_eval"]["llmneo_local_mc"]["acc,none"]
    # Independently: pick the choice with the highest summed log-likelihood of its tokens.
    tokenizer = models.load_tokenizer(str(student_dir), "model_name_or_path")
    model = AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32).eval()
    correct = 0
    with torch.no_grad():
        for doc in DOCS:
            context = tokenizer(doc["question"], add_special_tokens=False)["input_ids"]
            scores = []
            for choice in doc["choices"]:
                whole = tokenizer(doc["question"] + choice, add_special_tokens=False)["input_ids"]
                ids = torch.tensor([whole])
                logprobs = torch.log_softmax(model(ids).logits[0].double(), -1)  # (T, V)
                # the logits at position i - 1 score token i, for each continuation token i
                scores.append(sum(float(logprobs[i - 1, whole[i]]) for i in range(len(context), len(whole))))
            correct += int(max(range(len(scores)), key=scores.__getitem__) == doc["answer"])
    assert acc == pytest.approx(correct / len(DOCS))


def test_unknown_lm_eval_task(student_dir, capsys):
    pytest.importorskip("lm_eval")
    assert cli.main(["eval", f"model_name_or_path={student_dir}", "tasks=no_such_task_xyz"]) == 2
    assert "unknown lm-eval task" in capsys.readouterr().err
