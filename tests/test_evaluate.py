"""llmneo eval: metrics against independent computations, adapters, and the lm-eval bridge."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from llmneo import cli, evaluate
from llmneo.config import schema
from llmneo.data import dataset as data
from llmneo.models import loading


def _examples(student_dir, alpaca_file):
    cfg = schema.load(overrides={"model_name_or_path": str(student_dir), "dataset": str(alpaca_file),
                                 "cutoff_len": 64})
    tokenizer = loading.load_tokenizer(str(student_dir), "model_name_or_path")
    return data.build(cfg, tokenizer).train, tokenizer


def _hf_mean_ce(model, examples) -> tuple[float, int]:
    """HF's own shifted loss, one unpadded example at a time, weighted by its token count."""
    total, count = 0.0, 0
    with torch.no_grad():
        for ex in examples:
            labels = torch.tensor([ex["labels"]])
            n = int((labels[:, 1:] != -100).sum())
            total += float(model(torch.tensor([ex["input_ids"]]), labels=labels).loss) * n
            count += n
    return total / count, count


@pytest.mark.parametrize("chunk_size", [0, 5, 256])
def test_perplexity_is_exp_mean_response_ce(student_dir, alpaca_file, chunk_size):
    from transformers import AutoModelForCausalLM

    examples, tokenizer = _examples(student_dir, alpaca_file)
    model = AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32).eval()
    got = evaluate.held_out(model, None, examples, pad_token_id=tokenizer.pad_token_id, vocab_size=len(tokenizer),
                            batch_size=3, chunk_size=chunk_size)
    ce, count = _hf_mean_ce(model, examples)
    assert got["tokens"] == count
    assert got["ce_loss"] == pytest.approx(ce, rel=1e-5)
    assert got["perplexity"] == pytest.approx(math.exp(ce), rel=1e-5)
    assert got["kl_to_teacher"] is got["top1_agreement"] is got["kd_loss"] is None  # nothing to compare with


def _hand_jsd(p: torch.Tensor, q: torch.Tensor, beta: float) -> float:
    """GKD's generalised JSD: beta*KL(p || m) + (1-beta)*KL(q || m), m = beta*p + (1-beta)*q, in float64."""
    m = beta * p + (1 - beta) * q
    return float(beta * (p * (p / m).log()).sum() + (1 - beta) * (q * (q / m).log()).sum())


@dataclasses.dataclass(frozen=True)
class Settings:  # any object with these four attributes will do, as will a dict
    kind: str
    temperature: float
    beta: float
    skew: float


@pytest.mark.parametrize("chunk_size, as_object", [(0, False), (3, True), (256, False)])
def test_kl_agreement_and_kd_loss_by_hand(student_dir, teacher_dir, alpaca_file, chunk_size, as_object):
    """Every metric against float64 sums over full logits, for each chunking (and full logits, chunk 0).

    kd_loss is the configured divergence (here jsd, beta 0.3, T 2, scaled by T^2); kl_to_teacher stays
    forward KL at T = 1 whatever the run's divergence.
    """
    from transformers import AutoModelForCausalLM

    examples, tokenizer = _examples(student_dir, alpaca_file)
    student = AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32).eval()
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).eval()
    vocab = len(tokenizer)
    kd = {"kind": "jsd", "temperature": 2.0, "beta": 0.3, "skew": 0.1}
    got = evaluate.held_out(student, teacher, examples, pad_token_id=tokenizer.pad_token_id, vocab_size=vocab,
                            kd=Settings(**kd) if as_object else kd, batch_size=4, chunk_size=chunk_size)
    kl, jsd, agree, n = 0.0, 0.0, 0, 0
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
                p2, q2 = torch.softmax(t_logits[t] / 2.0, 0), torch.softmax(s_logits[t] / 2.0, 0)
                jsd += 4.0 * _hand_jsd(p2, q2, 0.3)
                agree += int(s_logits[t].argmax() == t_logits[t].argmax())
                n += 1
    assert got["tokens"] == n
    assert got["kl_to_teacher"] == pytest.approx(kl / n, rel=1e-4)
    assert got["kd_loss"] == pytest.approx(jsd / n, rel=1e-4)
    assert got["top1_agreement"] == pytest.approx(agree / n)
    assert got["kl_to_teacher"] > 0.1  # the fixture teacher is peaked: a real difference to measure
    assert got["ce_loss"] == pytest.approx(_hf_mean_ce(student, examples)[0], rel=1e-5)


def test_held_out_leaves_each_model_in_its_own_mode(student_dir, teacher_dir, alpaca_file):
    """Scored in eval mode (a model in training mode would apply dropout), then handed back as it came."""
    from transformers import AutoModelForCausalLM

    examples, tokenizer = _examples(student_dir, alpaca_file)
    student = AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32, attention_dropout=0.5)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).eval()
    student.train()
    kwargs = {"pad_token_id": tokenizer.pad_token_id, "vocab_size": len(tokenizer)}
    first = evaluate.held_out(student, teacher, examples, **kwargs)
    assert student.training and not teacher.training
    assert evaluate.held_out(student, teacher, examples, **kwargs) == first  # no dropout drew a different mask
    assert first["ce_loss"] == pytest.approx(_hf_mean_ce(student.eval(), examples)[0], rel=1e-5)


def test_perplexity_has_one_overflow_rule():
    assert evaluate.perplexity(60.0) == pytest.approx(math.exp(60.0))  # no cap at exp(50)
    assert evaluate.perplexity(709.0) == pytest.approx(math.exp(709.0))
    assert evaluate.perplexity(710.0) == math.inf  # exp overflows a float: infinite, not an error
    assert math.isnan(evaluate.perplexity(math.nan))


@pytest.mark.slow
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


@pytest.mark.slow
def test_eval_with_val_size_scores_the_held_out_rows(tmp_path, student_dir):
    """`llmneo eval val_size=...` scores the held-out split, not the training split.

    Each row's reply has its own length, so the scored token count says which rows were scored; the
    perplexity is recomputed with HF's own loss on the held-out examples alone.
    """
    from helpers import write_jsonl
    from transformers import AutoModelForCausalLM

    words = ["red", "fox", "blue", "sky", "cold", "tea", "warm", "sun"]
    rows = [{"instruction": f"Repeat {w}.", "input": "", "output": " ".join([w] * (3 * i + 1))}
            for i, w in enumerate(words)]
    dataset = write_jsonl(tmp_path / "rows.jsonl", rows)
    settings = {"model_name_or_path": str(student_dir), "dataset": str(dataset), "cutoff_len": 128, "val_size": 2}
    tokenizer = loading.load_tokenizer(str(student_dir), "model_name_or_path")
    splits = data.build(schema.load(overrides=settings), tokenizer)
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


def test_eval_shows_a_progress_bar_on_the_main_process(tmp_path, student_dir, alpaca_file, capsys, monkeypatch):
    args = ["eval", f"model_name_or_path={student_dir}", f"dataset={alpaca_file}", "per_device_eval_batch_size=3"]
    assert cli.main(args) == 0
    err = capsys.readouterr().err
    assert "llmneo held-out eval" in err and "3/3" in err  # 8 rows in batches of 3
    monkeypatch.setenv("RANK", "1")  # another process of a launch: no bar
    assert cli.main(args) == 0
    assert "llmneo held-out eval" not in capsys.readouterr().err


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


@pytest.mark.slow
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
    tokenizer = loading.load_tokenizer(str(student_dir), "model_name_or_path")
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


@pytest.mark.slow
def test_unknown_lm_eval_task(student_dir, capsys):
    pytest.importorskip("lm_eval")
    assert cli.main(["eval", f"model_name_or_path={student_dir}", "tasks=no_such_task_xyz"]) == 2
    assert "unknown lm-eval task" in capsys.readouterr().err
