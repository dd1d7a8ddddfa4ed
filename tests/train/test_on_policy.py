"""On-policy distillation (lmbda, seq_kd, sampled_rkl): the step's replies, its loss, its accounting.

- lmbda = 0 is today's off-policy run, and off-policy steps of a generating run are untouched by it;
- greedy on-policy step 1 equals an independent computation (own greedy loop, both models' full logits);
- sampled_rkl's mean gradient over samples approaches the exact reverse-KL gradient;
- resume is exact and 2 processes equal 1 with lmbda > 0;
- the generator: prompts of multi-turn rows, EOS cut, merged shadow LoRA weights (same tokens, weights
  untouched), a padded head never sampled;
- what cannot work is one line and exit 2.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from helpers import assert_same_training, read_metrics, resumed_from, write_yaml

from llmneo import cli
from llmneo.config import schema
from llmneo.data import dataset
from llmneo.data.labels import IGNORE_INDEX
from llmneo.loss import divergences
from llmneo.loss.chunked import fused_loss
from llmneo.loss.rows import SampledRows
from llmneo.loss.spec import LossSpec
from llmneo.models import generate as rollout
from llmneo.train import setup as training_setup
from llmneo.train import steps as step_source
from llmneo.train.window import Window

BIN = Path(sys.executable).parent


# --- off-policy stays as it was ------------------------------------------------------------------------

@pytest.mark.slow
def test_lmbda_zero_is_the_off_policy_run_and_off_policy_steps_are_untouched(tmp_path, base_overrides):
    plain, zero, never = tmp_path / "plain", tmp_path / "zero", tmp_path / "never"
    assert cli.main(["train", write_yaml(tmp_path, "a.yaml", {**base_overrides, "output_dir": str(plain)})]) == 0
    assert cli.main(["train", write_yaml(tmp_path, "b.yaml", {**base_overrides, "output_dir": str(zero), "lmbda": 0})]) == 0
    # a generating run whose draws all fall off-policy (lmbda tiny): its steps are the dataset's, bit for bit
    assert not any(step_source.on_policy_draw(0, s, 1e-9) for s in range(1, 4))
    assert cli.main(["train", write_yaml(tmp_path, "c.yaml", {**base_overrides, "output_dir": str(never),
                                                         "lmbda": 1e-9})]) == 0
    rows = [read_metrics(p) for p in (plain, zero, never)]
    strip = lambda r: {k: v for k, v in r.items() if k != "tokens_per_second"}  # noqa: E731
    assert [strip(r) for r in rows[0]] == [strip(r) for r in rows[1]]  # identical, keys included
    assert all("on_policy" not in r for r in rows[1])
    for ra, rc in zip(rows[0], rows[2]):
        assert {k: rc[k] for k in ra if k != "tokens_per_second"} == strip(ra)
        assert rc["on_policy"] is False and rc["on_policy_steps"] == 0
    results = json.loads((never / "train_results.json").read_text())
    assert results["on_policy_fraction"] == 0.0 and "on_policy_fraction" not in json.loads(
        (zero / "train_results.json").read_text())


# --- greedy on-policy step 1, computed independently --------------------------------------------------

def _greedy(model, prompt: list[int], steps: int, vocab: int, eos: set[int]) -> list[int]:
    """The plainest greedy decoder: the whole sequence through the model for each new token."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            nxt = int(model(input_ids=torch.tensor([ids])).logits[0, -1, :vocab].argmax())
            ids.append(nxt)
            if nxt in eos:
                break
    return ids[len(prompt):]


@pytest.mark.slow
def test_greedy_on_policy_step_one_equals_an_independent_computation(tmp_path, base_overrides, tokenizer):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "op"
    values = {**base_overrides, "output_dir": str(out), "lmbda": 1, "temperature": 0, "max_new_tokens": 6,
              "max_steps": 1, "per_device_train_batch_size": 8, "kd_loss": "fkl"}
    assert cli.main(["train", write_yaml(tmp_path, "op.yaml", values)]) == 0
    row = read_metrics(out)[0]
    assert row["on_policy"] is True and row["ce_loss"] is None and row["loss"] == row["kd_loss"]

    cfg = schema.load(overrides=values)
    examples = dataset.build(cfg, tokenizer).train
    student = AutoModelForCausalLM.from_pretrained(base_overrides["model_name_or_path"]).eval()  # LoRA B = 0
    teacher = AutoModelForCausalLM.from_pretrained(base_overrides["teacher_model_name_or_path"]).eval()
    vocab = len(tokenizer)
    eos = {tokenizer.eos_token_id} | set([student.generation_config.eos_token_id or tokenizer.eos_token_id])
    eos.add(tokenizer.convert_tokens_to_ids("<|im_end|>"))  # the chat template's end of turn ends the replies
    kl_sum, tokens = 0.0, 0
    for example in examples:
        first = next(i for i, label in enumerate(example["labels"]) if label != IGNORE_INDEX)
        prompt = example["input_ids"][:first]
        reply = _greedy(student, prompt, 6, vocab, eos)
        sequence = torch.tensor([prompt + reply])
        with torch.no_grad():
            s = student(input_ids=sequence).logits[0, len(prompt) - 1:-1, :vocab].double()
            t = teacher(input_ids=sequence).logits[0, len(prompt) - 1:-1, :vocab].double()
        p_t = t.softmax(-1)
        kl_sum += float((p_t * (t.log_softmax(-1) - s.log_softmax(-1))).sum())
        tokens += len(reply)
    assert tokens > len(examples)  # replies of several tokens
    assert row["kd_loss"] == pytest.approx(kl_sum / tokens, rel=1e-4)


def test_seq_kd_trains_on_the_teachers_greedy_replies(tmp_path, base_overrides, tokenizer):
    from transformers import AutoModelForCausalLM

    cfg = schema.load(overrides={**base_overrides, "seq_kd": True, "temperature": 0, "max_new_tokens": 5,
                                 "per_device_train_batch_size": 2})
    setup = training_setup.prepare(cfg)
    try:
        assert isinstance(setup.steps, step_source.RolloutSteps)
        step = setup.steps.next_step()
        assert step.replies == "teacher" and not step.on_policy
        teacher = AutoModelForCausalLM.from_pretrained(base_overrides["teacher_model_name_or_path"]).eval()
        eos = {tokenizer.eos_token_id}
        for ids, labels, mask in zip(step.micro[0]["input_ids"], step.micro[0]["labels"],
                                     step.micro[0]["attention_mask"]):
            n = int(mask.sum())
            start = int((labels[:n] != IGNORE_INDEX).nonzero()[0])
            expected = _greedy(teacher, ids[:start].tolist(), 5, len(tokenizer), eos)
            assert ids[start:n].tolist() == expected and labels[start:n].tolist() == expected
            assert (labels[n:] == IGNORE_INDEX).all()
    finally:
        setup.accelerator.end_training()


# --- sampled_rkl ---------------------------------------------------------------------------------------

def test_sampled_rkl_mean_gradient_approaches_the_exact_reverse_kl_gradient():
    """Tolerance: 4 standard errors of the sample mean, per logit (the estimator is unbiased)."""
    generator = torch.Generator().manual_seed(0)
    vocab, n = 6, 40000
    student = torch.randn(vocab, generator=generator, dtype=torch.float64)
    teacher = 2 * torch.randn(vocab, generator=generator, dtype=torch.float64)
    exact_z = student.clone().requires_grad_(True)
    exact = divergences.token_divergence(exact_z[None], teacher[None], "rkl")[0]
    exact.backward()

    samples = torch.multinomial(student.softmax(-1), n, replacement=True, generator=generator)
    z = student.expand(n, vocab).clone().requires_grad_(True)
    teacher_logprobs = teacher.log_softmax(-1)[samples]
    values = divergences.sampled_reverse_kl(z, samples, teacher_logprobs)
    values.sum().backward()  # row i's gradient is sample i's
    per_sample = z.grad  # (n, V)
    error = 4 * per_sample.std(0) / n ** 0.5
    assert ((per_sample.mean(0) - exact_z.grad).abs() <= error).all(), (per_sample.mean(0), exact_z.grad, error)
    assert float(values.mean()) == pytest.approx(float(exact), abs=4 * float(values.std()) / n ** 0.5)
    # a single sample's gradient is not the exact one: the test above is about the mean
    assert not torch.allclose(per_sample[0], exact_z.grad, atol=1e-3)

    # the fused chunked loss over SampledRows gives the same KD sum and gradient as the function itself
    hidden = torch.eye(vocab, dtype=torch.float64)[samples[:50]].clone().requires_grad_(True)  # logits = hidden @ W
    weight = torch.randn(vocab, vocab, generator=generator, dtype=torch.float64)
    head = lambda h: h @ weight.T  # noqa: E731
    rows = SampledRows(samples[:50], teacher_logprobs[:50])
    loss, _, kd = fused_loss(hidden, samples[:50], head, [], rows,
                             LossSpec(vocab, 1.0, divergences.KDSettings("sampled_rkl"), chunk_size=7))
    loss.backward()
    direct_h = hidden.detach().clone().requires_grad_(True)
    direct = divergences.sampled_reverse_kl(head(direct_h), samples[:50], teacher_logprobs[:50]).sum()
    direct.backward()
    assert float(kd) == pytest.approx(float(direct), rel=1e-6)
    assert torch.allclose(hidden.grad, direct_h.grad, atol=1e-6)


def test_a_full_distribution_divergence_refuses_sampled_rkl():
    with pytest.raises(Exception, match="sampled tokens only"):
        divergences.token_divergence(torch.zeros(2, 4), torch.zeros(2, 4), "sampled_rkl")


# --- resume and data parallelism ------------------------------------------------------------------------

@pytest.mark.slow
def test_resume_with_sampled_on_policy_steps_is_exact(tmp_path, base_overrides):
    # logging every 3 steps, checkpoints every 2: the logging windows mix on- and off-policy steps, and the
    # checkpoint at step 2 holds a window with both kinds in it
    values = {**base_overrides, "per_device_train_batch_size": 2, "gradient_accumulation_steps": 3, "max_steps": 6,
              "save_steps": 2, "learning_rate": 5e-3, "lora_dropout": 0.1, "lmbda": 0.5, "temperature": 1.0,
              "max_new_tokens": 6, "seed": 1, "logging_steps": 3}
    draws = [step_source.on_policy_draw(values["seed"], s, 0.5) for s in range(3, 7)]
    assert any(draws) and not all(draws)  # the resumed part has both kinds of step
    full = tmp_path / "full"
    assert cli.main(["train", write_yaml(tmp_path, "full.yaml", {**values, "output_dir": str(full)})]) == 0
    cut = resumed_from(tmp_path, full, "checkpoint-2", values)
    assert_same_training(full, cut, tol=1e-6)
    draws = [step_source.on_policy_draw(values["seed"], s, 0.5) for s in range(1, 7)]
    rows = read_metrics(full)
    assert [r["step"] for r in rows] == [3, 6]
    assert [r["on_policy_steps"] for r in rows] == [sum(draws[:3]), sum(draws[3:])]
    assert [r["on_policy"] for r in rows] == [all(draws[:3]), all(draws[3:])]
    assert 0 < rows[0]["on_policy_steps"] < 3 and rows[0]["ce_loss"] is not None  # a mixed window
    state = json.loads((full / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["window"]["steps"] == 2 and state["window"]["op_steps"] == sum(draws[:2])
    a, b = (json.loads((p / "train_results.json").read_text()) for p in (full, cut))
    assert a["on_policy_fraction"] == b["on_policy_fraction"] == sum(draws) / 6


@pytest.mark.slow
def test_two_processes_equal_one_with_on_policy_steps(tmp_path, student_dir, teacher_dir):
    rows = [{"instruction": f"Question {i} about the fox?", "input": "", "output": "Answer " * (1 + i % 4) + "done."}
            for i in range(8)]
    data_file = tmp_path / "rows.jsonl"
    data_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    values = {"model_name_or_path": str(student_dir), "teacher_model_name_or_path": str(teacher_dir),
              "dataset": str(data_file), "lora_rank": 4, "per_device_train_batch_size": 2, "max_steps": 4,
              "logging_steps": 1, "cutoff_len": 64, "learning_rate": 5e-3, "seed": 3, "lmbda": 0.5,
              "temperature": 0, "max_new_tokens": 5}
    assert {step_source.on_policy_draw(3, s, 0.5) for s in range(1, 5)} == {True, False}
    path = write_yaml(tmp_path, "ddp.yaml", values)
    ddp, single = tmp_path / "ddp", tmp_path / "single"
    done = subprocess.run([str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", "-m", "llmneo", "train",
                           path, f"output_dir={ddp}"], capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert cli.main(["train", path, f"output_dir={single}", "gradient_accumulation_steps=2"]) == 0
    assert_same_training(single, ddp, tol=1e-5)


# --- the generator -----------------------------------------------------------------------------------------

def test_prompts_are_cut_before_the_last_reply_and_replies_are_labelled_up_to_eos():
    # a two-turn row: prompt 1..3, reply 4 5, user 6 7, reply 8 9; and a one-turn row
    examples = [{"input_ids": [1, 2, 3, 4, 5, 6, 7, 8, 9], "labels": [-100, -100, -100, 4, 5, -100, -100, 8, 9]},
                {"input_ids": [1, 2, 7, 8], "labels": [-100, -100, 7, 8]}]
    batch = dataset.collate(examples, pad_token_id=0)
    prompts = rollout.prompts(batch)
    assert [p.tolist() for p in prompts] == [[1, 2, 3, 4, 5, 6, 7], [1, 2]]
    replies = [rollout.cut_at_eos(torch.tensor([11, 12, 2, 13, 14]), {2}), rollout.cut_at_eos(torch.tensor([15]), {2})]
    assert [r.tolist() for r in replies] == [[11, 12, 2], [15]]
    rebuilt = rollout.with_replies(prompts, replies, 0, torch.device("cpu"))
    assert rebuilt["input_ids"].tolist() == [[1, 2, 3, 4, 5, 6, 7, 11, 12, 2], [1, 2, 15, 0, 0, 0, 0, 0, 0, 0]]
    assert rebuilt["labels"].tolist() == [[-100] * 7 + [11, 12, 2], [-100, -100, 15] + [-100] * 7]
    assert rebuilt["attention_mask"].sum(1).tolist() == [10, 3]


@pytest.mark.parametrize("variant", ["lora", "moslora", "dora"])
def test_merged_shadow_weights_generate_the_same_tokens_and_leave_the_weights_untouched(
        student_dir, tokenizer, variant):
    from llmneo.models import adapters, loading

    cfg = schema.load(overrides={"model_name_or_path": str(student_dir), "lora_rank": 4, "lora_variant": variant})
    model = adapters.apply(loading.load(cfg, loading.resolve_precision(cfg), with_teacher=False).student, cfg)
    with torch.no_grad():  # a trained-looking adapter: B != 0
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn_like(p))
    before = {n: (p.data_ptr(), p.detach().clone()) for n, p in model.named_parameters()}
    prompts = [torch.tensor([1, 5, 9, 11]), torch.tensor([1, 7])]
    sampling = rollout.Sampling(max_new_tokens=8, temperature=0)
    merged = rollout.HFGenerator(model, tokenizer, sampling).generate(prompts)
    unmerged = rollout.HFGenerator(model, tokenizer, sampling, merge_lora=False).generate(prompts)
    assert [m.tolist() for m in merged] == [u.tolist() for u in unmerged]
    assert bool(rollout._foldable_layers(model)) == (variant != "dora")  # DoRA generates unmerged
    for name, p in model.named_parameters():
        pointer, value = before[name]
        assert p.data_ptr() == pointer and torch.equal(p.detach(), value), name
    assert model.training  # back in the mode it was in


def test_a_padded_teacher_head_never_emits_padding_ids(teacher_dir, tokenizer):
    from transformers import AutoModelForCausalLM

    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir)
    assert teacher.get_output_embeddings().weight.shape[0] > len(tokenizer)
    torch.manual_seed(0)
    replies = rollout.HFGenerator(teacher, tokenizer, rollout.Sampling(max_new_tokens=40, temperature=50.0)).generate(
        [torch.tensor([1, 5, 9])] * 8)
    generated = torch.cat(replies)
    assert generated.numel() > 40 and int(generated.max()) < len(tokenizer)


# --- what cannot work ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("extra, message", [
    ({"kd_loss": "sampled_rkl", "lmbda": 0.5}, "set lmbda: 1"),
    ({"lmbda": 0.5, "teacher_cache": "somewhere"}, "teacher cache cannot score"),
    ({"lmbda": 0.5, "stage": "pt"}, "stage: pt"),
    ({"lmbda": 0.5, "kd_ratio": 0}, "needs a teacher"),
    ({"seq_kd": True, "temperature": -1}, "temperature must be"),
    ({"lmbda": 0.5, "packing": True}, "packing: true"),
    ({"lmbda": 0.5, "neat_packing": True}, "neat_packing: true puts several examples"),
    ({"seq_kd": True, "padding_free": True}, "neat_packing: true puts several examples"),
])
def test_impossible_on_policy_configs_are_one_line_errors(tmp_path, base_overrides, capsys, extra, message):
    assert cli.main(["train", write_yaml(tmp_path, "bad.yaml", {**base_overrides, **extra})]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not Path(base_overrides["output_dir"]).exists()


def test_plain_text_rows_have_no_prompt_to_continue(tmp_path, base_overrides, capsys):
    text = tmp_path / "text.jsonl"
    text.write_text("".join(json.dumps({"text": f"some raw text number {i}"}) + "\n" for i in range(4)))
    assert cli.main(["train", write_yaml(tmp_path, "t.yaml", {**base_overrides, "dataset": str(text), "lmbda": 1})]) == 2
    err = capsys.readouterr().err.strip()
    assert "plain text" in err and len(err.splitlines()) == 1
    out = Path(base_overrides["output_dir"])
    assert not (out / "adapter_model.safetensors").exists() and not (out / "metrics.jsonl").exists()


def test_a_sampled_rkl_run_scores_held_out_data_by_the_exact_reverse_kl(tmp_path, base_overrides):
    """Held-out rows have no sampled tokens: eval_kd_loss is the rkl that sampled_rkl estimates."""
    from llmneo import evaluate

    out = tmp_path / "srkl"
    values = {**base_overrides, "output_dir": str(out), "lmbda": 1, "kd_loss": "sampled_rkl", "val_size": 2,
              "max_steps": 2, "max_new_tokens": 4}
    assert cli.main(["train", write_yaml(tmp_path, "s.yaml", values)]) == 0
    results = json.loads((out / "train_results.json").read_text())
    assert results["on_policy_fraction"] == 1.0 and results["kd_loss_kind"] == "sampled_rkl"
    assert results["eval_kd_loss"] is not None and results["eval_kd_loss"] > 0
    assert evaluate.kd_settings(divergences.KDSettings("sampled_rkl"))["kind"] == "rkl"


def test_replies_stop_at_the_templates_end_of_turn_not_only_at_eos(tokenizer, student_dir, alpaca_file):
    """The tiny tokenizer's EOS is </s> but its chat template ends each reply with <|im_end|>: generation must
    stop there, as the labelled replies do."""
    from transformers import AutoModelForCausalLM

    cfg = schema.load(overrides={"model_name_or_path": str(student_dir), "dataset": str(alpaca_file)})
    examples = dataset.build(cfg, tokenizer).train
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert im_end != tokenizer.eos_token_id and all(im_end in e["labels"] for e in examples)
    assert rollout.turn_end_ids(examples, tokenizer) == {im_end}
    model = AutoModelForCausalLM.from_pretrained(student_dir)
    with torch.no_grad():  # a student that always says <|im_end|> next
        model.get_output_embeddings().weight[im_end] += 100.0
    sampling = rollout.Sampling(max_new_tokens=6, temperature=0)
    prompt = [torch.tensor(examples[0]["input_ids"][:5])]
    stopped = rollout.HFGenerator(model, tokenizer, sampling, stop_ids={im_end}).generate(prompt)[0].tolist()
    assert stopped[-1] == im_end and im_end not in stopped[:-1] and len(stopped) < 6
    ran_on = rollout.HFGenerator(model, tokenizer, sampling).generate(prompt)[0].tolist()  # without: past the turn
    assert len(ran_on) == 6 and ran_on[:len(stopped)] == stopped
    # truncated replies (cut by cutoff_len mid-text) do not make an ordinary token a stop token
    cut = [{"input_ids": e["input_ids"][:-3], "labels": e["labels"][:-3]} for e in examples]
    assert rollout.turn_end_ids(cut, tokenizer) <= {im_end}


def test_a_logging_window_mixing_on_and_off_policy_steps():
    """Off-policy steps: ce 10 and kd 4 summed over 5 tokens; on-policy: kd 6 over 3 tokens (KD alone)."""
    window = Window(ce=10.0, kd=4.0, tokens=5, seen=20, op_kd=6.0, op_tokens=3, op_steps=1, steps=2)
    logged = {"learning_rate": 1e-4, "grad_norm": 1.0, "elapsed": 2.0, "kd_ratio": 0.5}
    row = window.row(4, 1.0, **logged, generates=True)
    assert row["loss"] == pytest.approx((0.5 * 10 + 0.5 * 4 + 6) / 8)
    assert row["kd_loss"] == pytest.approx((4 + 6) / 8) and row["ce_loss"] == pytest.approx(10 / 5)
    assert row["on_policy"] is False and row["on_policy_steps"] == 1 and row["tokens_per_second"] == 10
    only_on = replace(window, ce=0.0, kd=0.0, tokens=0, op_steps=2)
    row = only_on.row(4, 1.0, **logged, generates=True)
    assert row["ce_loss"] is None and row["loss"] == row["kd_loss"] == pytest.approx(2.0) and row["on_policy"] is True
    plain = replace(window, op_kd=0.0, op_tokens=0, op_steps=0).row(4, 1.0, **logged)
    assert "on_policy" not in plain and plain["loss"] == pytest.approx(0.5 * 2 + 0.5 * 0.8)


def test_generation_ignores_the_models_own_generation_config(tokenizer, student_dir):
    """A checkpoint's generation_config (repetition_penalty, no_repeat_ngram_size, min_new_tokens, ...) must not
    change what is sampled: greedy replies must be the argmax continuation whatever it says."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(student_dir)
    with torch.no_grad():  # a student that soon says EOS, so min_new_tokens would have to change its reply
        model.get_output_embeddings().weight[tokenizer.eos_token_id] += 100.0
    prompt = [torch.tensor([1, 5, 9, 11])]
    sampling = rollout.Sampling(max_new_tokens=8, temperature=0)
    plain = rollout.HFGenerator(model, tokenizer, sampling).generate(prompt)[0].tolist()
    assert plain[-1] == tokenizer.eos_token_id and len(plain) < 8
    model.generation_config.repetition_penalty = 5.0
    model.generation_config.no_repeat_ngram_size = 1
    model.generation_config.min_new_tokens = 8
    assert rollout.HFGenerator(model, tokenizer, sampling).generate(prompt)[0].tolist() == plain
    assert model.generation_config.min_new_tokens == 8  # the model's own settings are back afterwards
    expected = _greedy(model, [1, 5, 9, 11], 8, len(tokenizer), {tokenizer.eos_token_id})
    assert plain == expected


def test_shadow_weights_round_once_like_peft_merge_in_bf16(student_dir):
    """A bf16 base with float32 adapters: the shadow weight is W0 + scaling·B·A rounded once to bf16, bit for
    bit what PEFT's merge (and so `llmneo export`) gives; rounding the delta first would differ."""
    import copy

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(student_dir, torch_dtype=torch.bfloat16)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(0.05 * torch.randn_like(p))
    assert next(p for n, p in model.named_parameters() if "lora_A" in n).dtype == torch.float32
    merged = copy.deepcopy(model).merge_and_unload()
    expected = {n: p for n, p in merged.named_parameters() if n.endswith(("q_proj.weight", "v_proj.weight"))}
    with rollout.merged_lora(model):
        shadow = {n.replace("base_model.model.", "").replace(".base_layer", ""): p.detach().clone()
                  for n, p in model.named_parameters() if n.endswith("base_layer.weight")}
    assert shadow.keys() == expected.keys() and len(shadow) == 4
    for name in shadow:
        assert shadow[name].dtype == torch.bfloat16 and torch.equal(shadow[name], expected[name]), name
