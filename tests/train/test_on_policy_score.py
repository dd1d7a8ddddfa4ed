"""evaluate.greedy_teacher_logprob against an independent computation: a plain greedy loop (one prompt at
a time, full forward per token, no cache, no padding) and one teacher forward over prompt + reply."""

from __future__ import annotations

import math

import pytest
import torch

from llmneo import evaluate
from llmneo.config import schema as config_mod
from llmneo.data import dataset
from llmneo.data.labels import IGNORE_INDEX
from llmneo.models import loading


def _examples(alpaca_file, tokenizer) -> list[dict]:
    return dataset.build(config_mod.load(overrides={"dataset": str(alpaca_file), "cutoff_len": 64}), tokenizer).train


def _prompt(example: dict) -> list[int]:
    """The tokens before the example's (single) reply."""
    return example["input_ids"][:next(i for i, label in enumerate(example["labels"]) if label != IGNORE_INDEX)]


def _greedy(model, prompt: list[int], stop: set[int], max_new_tokens: int, vocab_size: int) -> list[int]:
    ids, reply = list(prompt), []
    for _ in range(max_new_tokens):
        logits = model(input_ids=torch.tensor([ids])).logits[0, -1, :vocab_size]  # (V,): padded rows never chosen
        token = int(logits.argmax())
        ids.append(token)
        reply.append(token)
        if token in stop:
            break
    return reply


def _reference(model, teacher, examples, tokenizer, max_new_tokens: int) -> tuple[float, int, int]:
    vocab_size = len(tokenizer)
    configured = model.generation_config.eos_token_id
    stop = {tokenizer.eos_token_id, *(configured if isinstance(configured, list) else [configured])}
    total, tokens, ended = 0.0, 0, 0
    with torch.no_grad():
        for example in examples:
            prompt = _prompt(example)
            reply = _greedy(model, prompt, stop, max_new_tokens, vocab_size)
            ended += reply[-1] in stop
            logits = teacher(input_ids=torch.tensor([prompt + reply])).logits[0, :, :vocab_size].double()  # (T, V)
            logp = torch.log_softmax(logits, dim=-1)
            for offset, token in enumerate(reply):  # token at len(prompt) + offset, predicted one position before
                total += float(logp[len(prompt) + offset - 1, token])
            tokens += len(reply)
    return total / tokens, tokens, ended


def _load(path):
    model, _ = loading.load_trained(config_mod.load(overrides={"model_name_or_path": str(path)}), torch.float32)
    return model.eval()


def _lora(model):
    """The student with a LoRA whose B is non-zero, so the adapter changes what it generates."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(5)
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                            init_lora_weights=False)).eval()


@pytest.mark.parametrize("adapter", [False, True], ids=["plain", "lora"])
def test_greedy_teacher_logprob_matches_a_plain_greedy_loop(student_dir, teacher_dir, alpaca_file, tokenizer,
                                                            adapter):
    student, teacher = _load(student_dir), _load(teacher_dir)
    if adapter:
        student = _lora(student)
    examples = _examples(alpaca_file, tokenizer)
    # A stop token the student actually writes (its 3rd greedy token for the first prompt), so replies of
    # different lengths, cut at a stop, are batched together and some stop before max_new_tokens.
    writes = _greedy(student, _prompt(examples[0]), set(), 3, len(tokenizer))[-1]
    generation = (student.base_model.model if adapter else student).generation_config
    generation.eos_token_id = [tokenizer.eos_token_id, writes]
    expected, tokens, ended = _reference(student, teacher, examples, tokenizer, max_new_tokens=6)
    got = evaluate.greedy_teacher_logprob(student, teacher, examples, tokenizer, max_new_tokens=6, batch_size=3)
    assert got["generated_tokens"] == tokens
    assert 0 < ended < len(examples)  # the batches mix stopped and cut-off replies
    assert got["replies_ended"] == pytest.approx(ended / len(examples))
    assert got["teacher_logprob"] == pytest.approx(expected, rel=1e-5, abs=1e-5)
    assert got["teacher_logprob"] < 0
    assert not student.training and not teacher.training


def test_a_model_scoring_its_own_greedy_replies_scores_them_at_its_greedy_log_probs(student_dir, alpaca_file,
                                                                                   tokenizer):
    """Teacher = model: each scored token is the argmax of the very distribution that scores it."""
    model = _load(student_dir)
    examples = _examples(alpaca_file, tokenizer)[:4]
    got = evaluate.greedy_teacher_logprob(model, model, examples, tokenizer, max_new_tokens=5, batch_size=4)
    other = evaluate.greedy_teacher_logprob(model, _load(student_dir), examples, tokenizer, max_new_tokens=5,
                                            batch_size=1)
    # one prompt at a time (no padding) and a second copy of the weights as the scorer change nothing
    assert other["generated_tokens"] == got["generated_tokens"]
    assert other["teacher_logprob"] == pytest.approx(got["teacher_logprob"], rel=1e-6)
    assert got["generated_tokens"] <= 4 * 5
    assert -math.log(len(tokenizer)) <= got["teacher_logprob"] < 0  # an argmax has at least 1/V of the mass


def test_greedy_teacher_logprob_needs_examples(student_dir, tokenizer):
    from llmneo.errors import LlmneoError

    model = _load(student_dir)
    with pytest.raises(LlmneoError, match="nothing to evaluate"):
        evaluate.greedy_teacher_logprob(model, model, [], tokenizer, max_new_tokens=4)
