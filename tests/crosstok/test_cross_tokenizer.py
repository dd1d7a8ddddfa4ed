"""Cross-tokenizer KD (#13): a teacher with another tokenizer, aligned by the text, GOLD's hybrid loss.

The identity: with one tokenizer forced through the cross-tokenizer path, every token aligns one to one,
every token is shared and the ULD weight is 0, so losses and gradients must equal the same-tokenizer path.
Then alignment on real (tiny) tokenizers that split words differently, the hybrid against a hand
computation, and the whole CLI with a teacher whose tokenizer and vocabulary size differ.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import ALPACA_ROWS, assert_same_training, read_metrics, resumed_from, write_jsonl, write_yaml

from llmneo import cli
from llmneo.cache import write
from llmneo.config import schema
from llmneo.crosstok import offsets as crosstok
from llmneo.crosstok import vocab as crossvocab
from llmneo.data import dataset, formats
from llmneo.data.labels import response_positions
from llmneo.demo import tiny
from llmneo.loss import divergences as losses
from llmneo.loss.divergences import KDSettings
from llmneo.loss.rows import SparseRows
from llmneo.loss.spec import LossSpec
from llmneo.models import adapters, loading
from llmneo.teachers import aligner as alignment
from llmneo.teachers.live import LiveTeacher
from llmneo.train import loop, steps


def _setup(overrides: dict):
    cfg = schema.load(overrides=overrides)
    loaded = loading.load(cfg, loading.resolve_precision(cfg), with_teacher=True)
    return cfg, loaded


def _grads(model) -> list[torch.Tensor]:
    grads = [p.grad.detach().clone() for p in model.parameters() if p.requires_grad]
    model.zero_grad(set_to_none=True)
    return grads


@pytest.mark.parametrize("kind, temperature, chunk", [("fkl", 1.0, 16), ("rkl", 1.0, 16), ("jsd", 2.0, 16),
                                                      ("tvd", 1.0, 0), ("skew_fkl", 1.0, 0)])
def test_one_tokenizer_forced_through_the_cross_path_equals_the_same_tokenizer_path(base_overrides, kind,
                                                                                     temperature, chunk):
    cfg, loaded = _setup({**base_overrides, "kd_cross_tokenizer": True, "kd_loss": kind,
                          "kd_temperature": temperature, "kd_chunk_size": chunk})
    assert loaded.teacher_tokenizer is not None and loaded.teacher_tokenizer is not loaded.tokenizer
    side = crosstok.TeacherSide(loaded.teacher_tokenizer, None)
    examples = dataset.build(cfg, loaded.tokenizer, side).train
    batch = dataset.collate(examples[:4], loaded.tokenizer.pad_token_id)
    vocab = crosstok.vocab_for(cfg, loaded.tokenizer, loaded.teacher_tokenizer)
    assert vocab.overlap == 1.0 and vocab.uld_weight == 0.0
    assert torch.equal(vocab.student_ids, vocab.teacher_ids)  # every token shared with itself
    model = adapters.apply(loaded.student, cfg)
    teacher = LiveTeacher(loaded.teacher, len(loaded.tokenizer))
    loss_spec = LossSpec(loaded.vocab_size, 0.5, KDSettings.from_config(cfg), cfg.kd_chunk_size)
    aligner = alignment.choose(vocab)
    crossed = loop.micro_batch_sums(model, teacher, batch, loss_spec, aligner=aligner)
    crossed[0].backward()
    crossed_grads = _grads(model)
    assert aligner.take_counts() == (crossed[3], crossed[3])  # every response position aligned
    same = loop.micro_batch_sums(model, teacher, batch, loss_spec)
    same[0].backward()
    same_grads = _grads(model)
    for a, b in zip(crossed[:3], same[:3]):
        assert float(a) == pytest.approx(float(b), abs=1e-5, rel=1e-5)
    assert max(float((a - b).abs().max()) for a, b in zip(crossed_grads, same_grads)) <= 1e-5
    assert any(float(g.abs().max()) > 1e-4 for g in same_grads)  # gradients that could differ


# --- a teacher from another family: its own tokenizer, vocabulary size and chat template -------------------

TEACHER_TEMPLATE = (  # another end-of-turn marker, and a system prompt the student's template never has
    "{{ '<|im_start|>system\nYou are a careful teacher.<|eot|>\n' }}"
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + ':\n' + message['content'] + '<|eot|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant:\n' }}{% endif %}"
)


def other_family_tokenizer(template: str = TEACHER_TEMPLATE):
    corpus = [row["instruction"] + " " + row["output"] for row in ALPACA_ROWS] * 3 + [
        "knowledge teacher student distillation tokenizer vocabulary alignment"]
    other = tiny.build_tokenizer(corpus=corpus, vocab_size=420, chat_template=template)
    other.add_special_tokens({"additional_special_tokens": ["<|eot|>"]})
    return other


@pytest.fixture(scope="module")
def other_teacher_dir(tmp_path_factory) -> Path:
    other = other_family_tokenizer()
    model = tiny.build_model(other, hidden_size=48, num_layers=3, seed=5,
                             vocab_size=len(other) + 64 - len(other) % 64)  # a padded head, too
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(40.0)
    return tiny.save_pair(model, other, tmp_path_factory.mktemp("other_family"))


def _views(student_tok, teacher_tok, rows=ALPACA_ROWS, cutoff=64):
    cfg = schema.load(overrides={"dataset": "x", "cutoff_len": cutoff})
    side = crosstok.TeacherSide(teacher_tok, None)
    template, own = dataset.templates.resolve(student_tok, None)
    encoder = dataset._Encoder(student_tok, template, own, cfg.cutoff_len)
    numbered = [("rows", n, r) for n, r in enumerate(formats.normalise("rows", rows, formats.Layout()), 1)]
    return encoder.encode(numbered, side)


def test_aligned_student_tokens_cover_the_same_text_as_their_teacher_spans(tokenizer):
    teacher_tok = other_family_tokenizer()
    examples = _views(tokenizer, teacher_tok)
    end_of_turn = teacher_tok.convert_tokens_to_ids("<|eot|>")
    aligned = total = markers = 0
    for example in examples:
        ids, teacher_ids = example["input_ids"], example["teacher_input_ids"]
        for s, label in enumerate(example["labels"]):
            if label == -100:
                assert example["teacher_start"][s] == -1  # only reply tokens are aligned
                continue
            total += 1
            a, b = example["teacher_start"][s], example["teacher_end"][s]
            if a < 0:
                continue
            aligned += 1
            if ids[s] == tokenizer.convert_tokens_to_ids("<|im_end|>"):
                assert teacher_ids[a:b] == [end_of_turn]  # the end of turn, paired as a unit
                markers += 1
            else:
                assert tokenizer.decode([ids[s]]) == teacher_tok.decode(teacher_ids[a:b])
    assert markers == len(examples) and 0.3 < aligned / total < 1.0  # the tokenizers really differ


def test_a_system_prompt_on_the_teacher_side_only_shifts_no_alignment(tokenizer):
    """The same teacher tokenizer with and without the system prompt: the same student tokens align, to
    teacher spans moved by exactly the system prompt's tokens."""
    with_system = _views(tokenizer, other_family_tokenizer())
    plain = _views(tokenizer, other_family_tokenizer(TEACHER_TEMPLATE.split("}}", 1)[1]))
    for a, b in zip(with_system, plain):
        shift = len(a["teacher_input_ids"]) - len(b["teacher_input_ids"])
        assert shift > 0
        assert [s >= 0 for s in a["teacher_start"]] == [s >= 0 for s in b["teacher_start"]]
        assert [s - shift for s in a["teacher_start"] if s >= 0] == [s for s in b["teacher_start"] if s >= 0]
        assert a["teacher_input_ids"][shift:] == b["teacher_input_ids"]


def byte_fallback_tokenizer():
    """A SentencePiece-style tokenizer (metaspace, byte fallback for what it lacks), built by hand."""
    from tokenizers import Tokenizer, decoders
    from tokenizers import models as token_models
    from tokenizers import pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
    for piece in ["▁", "o", "k", "c", "a", "f", "é", "京", "▁o", "▁ok", "ca", "caf", "▁caf"]:
        vocab[piece] = len(vocab)
    merges = [("▁", "o"), ("▁o", "k"), ("c", "a"), ("ca", "f"), ("▁", "caf")]
    backend = Tokenizer(token_models.BPE(vocab=vocab, merges=merges, byte_fallback=True, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def test_unicode_whitespace_and_byte_fallback_align_by_the_text_and_map_by_their_bytes(tokenizer):
    teacher_tok = byte_fallback_tokenizer()
    text = "東京 café 🙂 ok"
    student = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    teacher = teacher_tok(text, add_special_tokens=False, return_offsets_mapping=True)
    found = crosstok.align(student["offset_mapping"], teacher["offset_mapping"])
    assert found.pairs and found.aligned_fraction < 1.0
    for s, a, b in found.pairs:  # the same characters on both sides, never part of one
        student_text = tokenizer.decode(student["input_ids"][s:s + 1])
        assert student_text.strip() == teacher_tok.decode(teacher["input_ids"][a:b]).strip()
        assert "\ufffd" not in student_text
    vocab = crossvocab.vocab_map(tokenizer, teacher_tok)
    to_student = dict(zip(vocab.teacher_ids.tolist(), vocab.student_ids.tolist()))
    byte_e6 = teacher_tok.convert_tokens_to_ids("<0xE6>")  # a byte-fallback piece = the byte-level token for it
    assert tokenizer.convert_ids_to_tokens(to_student[byte_e6]) == "æ"  # GPT-2's stand-in for byte 0xE6
    space_o = teacher_tok.convert_tokens_to_ids("▁o")
    assert tokenizer.convert_ids_to_tokens(to_student[space_o]) == "Ġo"  # "▁o" and "Ġo" are both " o"


def test_the_hybrid_equals_a_hand_computation():
    """Student vocabulary 4, teacher 5; tokens 0↔1 and 2↔0 shared. KD = (1-w)·KL over the shared tokens
    (each side renormalised there) + w·Σ|sorted unshared probabilities|, with the span's shift in q."""
    vocab = crossvocab.VocabMap(torch.tensor([0, 2]), torch.tensor([1, 0]), torch.tensor([2, 0, -1, -1, -1]),
                                torch.tensor([False, True, False, True]),
                                torch.tensor([False, False, True, True, True]), uld_weight=0.3)
    student = torch.tensor([[0.5, -1.0, 2.0, 0.0]], requires_grad=True)
    teacher = torch.tensor([[1.0, 0.0, -2.0, 0.5, 3.0]])
    shift = torch.tensor([-0.4])
    value = crossvocab.hybrid_divergence(student, teacher, shift, vocab, KDSettings("fkl"))
    p = torch.softmax(student.detach()[0], -1).tolist()
    q = [x * float(torch.exp(shift)) for x in torch.softmax(teacher[0], -1).tolist()]
    p_shared = [p[0] / (p[0] + p[2]), p[2] / (p[0] + p[2])]
    q_shared = [q[1] / (q[1] + q[0]), q[0] / (q[1] + q[0])]
    kl = sum(a * (torch.log(torch.tensor(a)) - torch.log(torch.tensor(b))).item() for a, b in zip(q_shared, p_shared))
    p_rest, q_rest = sorted([p[1], p[3]], reverse=True) + [0.0], sorted([q[2], q[3], q[4]], reverse=True)
    uld = sum(abs(a - b) for a, b in zip(p_rest, q_rest))
    assert float(value.detach()) == pytest.approx(0.7 * kl + 0.3 * uld, rel=1e-5)
    value.sum().backward()
    assert student.grad.abs().sum() > 0
    # the same teacher as top-k rows over its whole vocabulary (a cross-tokenizer cache at k = V) is the same value
    logq = torch.log_softmax(teacher, -1)
    sparse = SparseRows(torch.arange(5)[None], logq, torch.tensor([-float("inf")]))
    assert float(crossvocab.hybrid_divergence(student, sparse, shift, vocab, KDSettings("fkl"))) == pytest.approx(
        float(value), rel=1e-5)


@pytest.mark.parametrize("temperature, weight, wider, unaligned", [
    (1.0, 0.3, "teacher", "ce"), (2.0, 0.5, "student", "skip"), (1.0, 0.0, "teacher", "skip"),
    (0.5, 1.0, "student", "ce"), (1.0, 0.3, "student", "none")])
@pytest.mark.parametrize("top_k", [None, 20])
def test_the_closed_form_hybrid_equals_autograd(temperature, weight, wider, unaligned, top_k):
    """fkl against a dense teacher takes crossvocab.hybrid_fkl_grad: the same CE, KD and gradient as autograd
    through hybrid_divergence, with unaligned positions (KD 0, or their CE under kd_unaligned: ce), continuation
    shifts and either side's unshared tokens the wider (ULD's topk of the wider side); against dense teacher
    logits and against top-k rows (a cross-tokenizer cache: the shared tokens outside the top-k one bucket)."""
    from llmneo.crosstok.span_rows import SpanRows
    from llmneo.loss.divergences import token_cross_entropy
    from llmneo.loss.rows import LogitRows

    generator = torch.Generator().manual_seed(1)
    v_s, v_t, shared = (50, 80, 30) if wider == "teacher" else (80, 50, 30)
    student_ids = torch.randperm(v_s, generator=generator)[:shared].sort().values
    teacher_ids = torch.randperm(v_t, generator=generator)[:shared]
    to_student = torch.full((v_t,), -1)
    to_student[teacher_ids] = student_ids
    student_only = torch.ones(v_s, dtype=torch.bool)
    student_only[student_ids] = False
    vocab = crossvocab.VocabMap(student_ids, teacher_ids, to_student, student_only, to_student < 0, weight)
    logits = torch.randn(6, v_s, generator=generator) * 3
    targets = torch.randint(v_s, (6,), generator=generator)
    aligned = torch.tensor([True, True, False, True, True, False]) if unaligned != "none" else torch.ones(6, dtype=bool)
    teacher_logits = torch.randn(6, v_t, generator=generator) * 3
    first = LogitRows(teacher_logits) if top_k is None else write.topk_rows(teacher_logits, top_k)
    rows = SpanRows(first, torch.tensor([0.0, -0.5, 0.0, -1.2, 0.0, 0.0]), aligned, vocab, targets,
                    ~aligned if unaligned == "ce" else None)
    settings = KDSettings("fkl", temperature)
    ce, kd, grad = rows.closed_form(logits, targets, 0.4, settings)
    student = logits.clone().requires_grad_(True)
    ce_ref = token_cross_entropy(student, targets).sum()
    kd_ref = rows.divergence(student, settings).sum()
    (0.6 * ce_ref + 0.4 * kd_ref).backward()
    assert float(ce) == pytest.approx(float(ce_ref), rel=1e-5)
    assert float(kd) == pytest.approx(float(kd_ref), rel=1e-5) and float(kd) > 0
    assert torch.allclose(grad, student.grad, atol=1e-6)
    assert rows.closed_form(logits, targets, 0.4, KDSettings("rkl")) is None  # other kinds: autograd
    per_position = rows.divergence(logits, settings)
    ce_unaligned = token_cross_entropy(logits[~aligned], targets[~aligned])
    if unaligned == "none":  # every position aligned: no row gathered
        return
    if unaligned == "ce":  # the position's loss is (1 - r)·CE + r·CE: its CE, as if it had no teacher at all
        assert torch.allclose(per_position[~aligned], ce_unaligned)
        assert torch.allclose(grad[~aligned], torch.softmax(logits[~aligned], -1)
                              - torch.nn.functional.one_hot(targets[~aligned], v_s), atol=1e-6)
    else:
        assert torch.equal(per_position[~aligned], torch.zeros(2))


# --- the CLI, end to end -----------------------------------------------------------------------------------

@pytest.fixture
def cross_overrides(base_overrides, other_teacher_dir, tmp_path) -> dict:
    """Four rows in one batch: every step sees the same batch, so the KD loss must fall on it."""
    rows = write_jsonl(tmp_path / "four.jsonl", ALPACA_ROWS[:4])
    return {**base_overrides, "teacher_model_name_or_path": str(other_teacher_dir), "dataset": str(rows),
            "max_steps": 8, "learning_rate": 1e-2, "lora_rank": 8}


def test_a_teacher_of_another_family_trains_a_student_through_the_cli(tmp_path, cross_overrides, capsys,
                                                                       tokenizer, other_teacher_dir):
    # KD alone, every weight trained: the fixed batch's KD loss must fall step after step
    values = {**cross_overrides, "finetuning_type": "full", "learning_rate": 3e-3, "kd_ratio": 1.0}
    assert cli.main(["train", write_yaml(tmp_path, "cross.yaml", values)]) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if "cross-tokenizer KD" in x)  # announced in one line
    assert f"{len(other_family_tokenizer()):,} tokens" in line and "ULD weight" in line
    rows = read_metrics(Path(cross_overrides["output_dir"]))
    assert len(rows) == 8 and all(0.3 < r["kd_aligned_fraction"] < 1.0 for r in rows)
    # one batch holds every row: the announced share of the data is each step's
    assert f"{100 * rows[0]['kd_aligned_fraction']:.1f}% of the training replies' tokens have a teacher span" in line
    kd = [r["kd_loss"] for r in rows]  # step 1 has a learning rate of 0 (warm-up)
    assert all(b < a for a, b in zip(kd[1:], kd[2:])) and kd[-1] < 0.9 * kd[0]
    results = json.loads(Path(cross_overrides["output_dir"], "train_results.json").read_text())
    assert results["kd_aligned_fraction"] == pytest.approx(rows[0]["kd_aligned_fraction"])  # one batch, every step
    assert "eval_kl_to_teacher" not in results  # token-by-token held-out scores need one tokenizer
    # llmneo eval with the same config: CE and perplexity, and a warning instead of teacher scores
    evaluated = {**values, "model_name_or_path": values["output_dir"], "output_dir": str(tmp_path / "eval")}
    capsys.readouterr()
    assert cli.main(["eval", write_yaml(tmp_path, "eval.yaml", evaluated)]) == 0
    err = capsys.readouterr().err
    assert "llmneo: warning: teacher" in err and "another tokenizer" in err
    scores = json.loads((tmp_path / "eval" / "eval_results.json").read_text())
    assert scores["perplexity"] > 1 and scores["kl_to_teacher"] is None


def test_kd_cross_tokenizer_false_keeps_the_one_line_refusal(tmp_path, cross_overrides, capsys):
    values = {**cross_overrides, "kd_cross_tokenizer": False}
    assert cli.main(["train", write_yaml(tmp_path, "no.yaml", values)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "tokenizers differ" in err and "kd_cross_tokenizer" in err
    assert not Path(values["output_dir"], "train_results.json").exists()


@pytest.mark.parametrize("change, needle", [
    ({"packing": True}, "packing"),
    ({"neat_packing": True}, "neat_packing (a packed row holds several conversations"),
    ({"lmbda": 1.0, "kd_loss": "sampled_rkl"}, "sampled_rkl"),
    ({"seq_kd": True}, "seq_kd"),
    ({"kd_cross_tokenizer": "sometimes"}, "kd_cross_tokenizer must be auto, true or false"),
    ({"kd_uld_weight": 1.5}, "kd_uld_weight must be in [0, 1]"),
])
def test_what_cross_tokenizer_kd_does_not_support_is_one_line(tmp_path, cross_overrides, capsys, change, needle):
    assert cli.main(["train", write_yaml(tmp_path, "bad.yaml", {**cross_overrides, **change})]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and needle in err, err


@pytest.mark.parametrize("layout", ["exact", "compact"])
def test_a_cross_tokenizer_cache_trains_as_the_live_teacher_does(tmp_path, cross_overrides, capsys, other_teacher_dir,
                                                                 layout):
    """At k = the teacher's whole vocabulary an exact cache loses nothing: training from it equals the live run;
    a compact one (8-bit log-probs) stays within 1e-3."""
    teacher_vocab = len(other_family_tokenizer())
    cache_dir = tmp_path / "cache"
    values = {**cross_overrides, "max_steps": 3, "teacher_cache": str(cache_dir), "teacher_topk": teacher_vocab,
              "cache_format": layout}
    assert cli.main(["cache", write_yaml(tmp_path, "cache.yaml", values)]) == 0
    index = json.loads((cache_dir / "index.json").read_text())
    assert index["cross_tokenizer"] is True and index["k"] == teacher_vocab
    assert f"{index['aligned_fraction']:.1%} of them aligned to a teacher span" in capsys.readouterr().out
    assert (cache_dir / "teacher_tokenizer" / "tokenizer.json").is_file()
    live = {**values, "teacher_cache": None, "output_dir": str(tmp_path / "live")}
    cached = {**values, "teacher_model_name_or_path": None, "output_dir": str(tmp_path / "cached")}
    assert cli.main(["train", write_yaml(tmp_path, "live.yaml", live)]) == 0
    assert cli.main(["train", write_yaml(tmp_path, "cached.yaml", cached)]) == 0
    assert "cross-tokenizer KD: teacher cache" in capsys.readouterr().out
    a, b = (read_metrics(tmp_path / name) for name in ("live", "cached"))
    if layout == "exact":
        assert_same_training(tmp_path / "live", tmp_path / "cached", tol=1e-5)
    else:
        assert index["layout"] == "compact" and index["vocab"] == teacher_vocab
        for x, y in zip(a, b):
            for key in ("loss", "ce_loss", "kd_loss", "grad_norm"):
                assert y[key] == pytest.approx(x[key], rel=1e-3), (x["step"], key)
    assert [r["kd_aligned_fraction"] for r in a] == [r["kd_aligned_fraction"] for r in b]
    assert index["aligned_fraction"] == pytest.approx(a[0]["kd_aligned_fraction"])  # one batch holds every row
    # the cache is tied to the teacher's side too: another teacher template is a stale cache
    other = {**cached, "output_dir": str(tmp_path / "stale"), "teacher_template": "llama3"}
    (cache_dir / "teacher_tokenizer" / "chat_template.jinja").unlink(missing_ok=True)
    config_file = cache_dir / "teacher_tokenizer" / "tokenizer_config.json"
    settings = json.loads(config_file.read_text())
    settings.pop("chat_template", None)
    config_file.write_text(json.dumps(settings))
    assert cli.main(["train", write_yaml(tmp_path, "stale.yaml", other)]) == 2
    assert "teacher template differs" in capsys.readouterr().err
    refused = {**cached, "output_dir": str(tmp_path / "refused"), "kd_cross_tokenizer": False}
    assert cli.main(["train", write_yaml(tmp_path, "refused.yaml", refused)]) == 2
    assert "kd_cross_tokenizer: false refuses" in capsys.readouterr().err
    # axolotl's KD format has no place for teacher-space ids aligned to student positions: refused, nothing written
    assert cli.main(["cache", "export", "axolotl", write_yaml(tmp_path, "export.yaml", cached),
                     str(tmp_path / "kd.jsonl")]) == 2
    assert "is a cross-tokenizer cache" in capsys.readouterr().err and not (tmp_path / "kd.jsonl").exists()


def test_on_policy_steps_retokenize_the_students_replies_for_the_teacher(tmp_path, cross_overrides, capsys):
    values = {**cross_overrides, "max_steps": 3, "lmbda": 1.0, "max_new_tokens": 12}
    assert cli.main(["train", write_yaml(tmp_path, "op.yaml", values)]) == 0
    rows = read_metrics(Path(values["output_dir"]))
    assert all(r["on_policy"] for r in rows)
    assert all(0.0 < r["kd_aligned_fraction"] <= 1.0 and r["kd_loss"] > 0 for r in rows)


def test_retokenized_replies_align_by_their_text(tokenizer):
    teacher_tok = other_family_tokenizer()
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    eot = teacher_tok.convert_tokens_to_ids("<|eot|>")
    retokenize = crosstok.Retokenizer(tokenizer, teacher_tok, {end}, [eot])
    reply = tokenizer("Two plus two is four, café!", add_special_tokens=False)["input_ids"] + [end]
    prompt_teacher = [7, 8, 9]
    fields = retokenize.fields(prompt_teacher, 5, reply)
    teacher_ids = fields["teacher_input_ids"]
    assert teacher_ids[:3] == prompt_teacher and teacher_ids[-1] == eot
    assert len(fields["teacher_start"]) == 5 + len(reply) and fields["teacher_start"][:5] == [-1] * 5
    assert fields["teacher_start"][-1] == len(teacher_ids) - 1  # end of turn ↔ end of turn
    pairs = [(s, a, b) for s, (a, b) in enumerate(zip(fields["teacher_start"], fields["teacher_end"])) if a >= 0]
    assert len(pairs) >= len(reply) // 2
    for s, a, b in pairs[:-1]:
        assert tokenizer.decode([reply[s - 5]]) == teacher_tok.decode(teacher_ids[a:b])


def test_resume_of_a_cross_tokenizer_run_with_on_policy_steps_is_exact(tmp_path, cross_overrides):
    """A checkpoint mid-window: the aligned counts of the window and of the run are resumed with the rest."""
    values = {**cross_overrides, "per_device_train_batch_size": 2, "max_steps": 4, "save_steps": 2,
              "logging_steps": 3, "lmbda": 0.5, "max_new_tokens": 6, "seed": 1, "learning_rate": 5e-3}
    full = tmp_path / "full"
    assert cli.main(["train", write_yaml(tmp_path, "full.yaml", {**values, "output_dir": str(full)})]) == 0
    cut = resumed_from(tmp_path, full, "checkpoint-2", values)
    assert_same_training(full, cut, tol=1e-6)
    assert [r["kd_aligned_fraction"] for r in read_metrics(full)] == [r["kd_aligned_fraction"]
                                                                       for r in read_metrics(cut)]
    a, b = (json.loads((p / "train_results.json").read_text()) for p in (full, cut))
    assert a["kd_aligned_fraction"] == b["kd_aligned_fraction"]


def test_two_processes_equal_one_across_tokenizers(tmp_path, cross_overrides):
    """DDP: each rank aligns its own rows; the aligned counts and the KD sums are reduced over ranks."""
    rows = [{"instruction": f"Question {i} about the fox?", "input": "", "output": "Answer " * (1 + i % 4) + "done."}
            for i in range(8)]
    values = {**cross_overrides, "dataset": str(write_jsonl(tmp_path / "rows.jsonl", rows)),
              "per_device_train_batch_size": 2, "max_steps": 3, "learning_rate": 5e-3, "seed": 3}
    path = write_yaml(tmp_path, "ddp.yaml", values)
    ddp, single = tmp_path / "ddp", tmp_path / "single"
    done = subprocess.run([str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node", "2",
                           "-m", "llmneo", "train", path, f"output_dir={ddp}"], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert cli.main(["train", path, f"output_dir={single}", "gradient_accumulation_steps=2"]) == 0
    assert_same_training(single, ddp, tol=1e-5)
    assert [r["kd_aligned_fraction"] for r in read_metrics(single)] == pytest.approx(
        [r["kd_aligned_fraction"] for r in read_metrics(ddp)])


def test_several_teachers_with_another_tokenizer_are_refused_live_and_cached(tmp_path, cross_overrides, teacher_dir,
                                                                             capsys):
    teachers = [str(teacher_dir), cross_overrides["teacher_model_name_or_path"]]
    values = {**cross_overrides, "teacher_model_name_or_path": teachers, "teacher_weights": [0.5, 0.5]}
    assert cli.main(["train", write_yaml(tmp_path, "mix.yaml", values)]) == 2
    assert "takes one teacher" in capsys.readouterr().err
    routed = {**cross_overrides, "teacher_model_name_or_path": teachers, "teacher_column": "domain",
              "teacher_cache": str(tmp_path / "caches")}
    assert cli.main(["cache", write_yaml(tmp_path, "caches.yaml", routed)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "several teachers must share the student's tokenizer" in err
    assert not (tmp_path / "caches").exists()


# --- hand-made tokenizers: one keeps words whole, the other splits them -------------------------------------

HAND_TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'user' %}U: {{ m['content'] }}\n"
                 "{% else %}A: {{ m['content'] }}END\n{% endif %}{% endfor %}"
                 "{% if add_generation_prompt %}A: {% endif %}")


def word_tokenizer():
    """Whole words (whitespace split); its end of turn is <e>."""
    from tokenizers import Tokenizer
    from tokenizers import models as token_models
    from tokenizers import pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<e>", "U:", "A:", "say", "it", "unbelievable", "day"]
    backend = Tokenizer(token_models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="<e>")
    tok.add_special_tokens({"additional_special_tokens": ["<e>"]})
    tok.chat_template = HAND_TEMPLATE.replace("END", "<e>")
    return tok


def piece_tokenizer():
    """Word pieces (BPE with hand-written merges: "unbelievable" = un + believ + able, " day" whole); <end>."""
    from tokenizers import Tokenizer, decoders
    from tokenizers import models as token_models
    from tokenizers import pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    merges = [("u", "n"), ("b", "e"), ("be", "l"), ("bel", "i"), ("beli", "e"), ("belie", "v"), ("a", "b"),
              ("ab", "l"), ("abl", "e"), ("d", "a"), ("da", "y"), ("▁", "day")]
    vocab = {"<unk>": 0, "<end>": 1, "▁": 2, **{c: 3 + i for i, c in enumerate(sorted(set("unbelievabledaysitUA:")))}}
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    backend = Tokenizer(token_models.BPE(vocab=vocab, merges=merges, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never")
    backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="never")
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="<end>")
    tok.add_special_tokens({"additional_special_tokens": ["<end>"]})
    tok.chat_template = HAND_TEMPLATE.replace("END", "<end>")
    return tok


def _spans(student, teacher) -> list[tuple[str, str | None]]:
    """(student token, the teacher text aligned to it or None) for the reply tokens of one conversation."""
    messages = [{"role": "user", "content": "say it"}, {"role": "assistant", "content": "unbelievable day"}]
    text, replies = dataset.templates.render_replies(student, student.chat_template, messages)
    ids, labels, offsets = dataset.templates.encode_by_offsets(student, text, [(a, b) for _, a, b in replies])
    view = crosstok.TeacherSide(teacher, None).view(messages, None, crosstok.Rendered(text, offsets, replies), len(ids))
    teacher_ids = view["teacher_input_ids"]
    return [(student.convert_ids_to_tokens(ids[s]),
             None if view["teacher_start"][s] < 0 else "".join(
                 teacher.convert_ids_to_tokens(teacher_ids[view["teacher_start"][s]:view["teacher_end"][s]])))
            for s in range(len(ids)) if labels[s] != -100]


def test_a_word_the_teacher_splits_aligns_to_its_pieces():
    assert _spans(word_tokenizer(), piece_tokenizer()) == [
        ("unbelievable", "unbelievable"),  # = "un" + "believ" + "able": a span of three teacher tokens
        ("day", "▁day"),  # the space is no token's on the student side
        ("<e>", "<end>"),  # the end of turn, paired
    ]


def test_a_word_the_student_splits_is_unaligned():
    assert _spans(piece_tokenizer(), word_tokenizer()) == [
        ("un", None), ("believ", None), ("able", None),  # three student tokens for one teacher token: skipped
        ("▁day", "day"), ("<end>", "<e>")]


@pytest.mark.parametrize("unaligned", ["ce", "skip"])
def test_unaligned_tokens_of_the_datas_replies_fall_back_to_ce_and_the_students_own_never_do(
        tokenizer, other_teacher_dir, unaligned):
    teacher_tok = other_family_tokenizer()
    examples = _views(tokenizer, teacher_tok)[:2]
    examples[1]["reply_is_data"] = False  # as rollout.teacher_fields marks the student's own replies
    batch = dataset.collate(examples, tokenizer.pad_token_id)
    teacher = LiveTeacher(loading.load_model(str(other_teacher_dir), "teacher", torch.float32).eval(), len(teacher_tok))
    aligner = alignment.choose(crosstok.vocab_for(schema.load(overrides={}), tokenizer, teacher_tok),
                               unaligned=unaligned)
    positions, targets = response_positions(batch["labels"])
    rows = aligner.rows(teacher, batch, positions)
    row_of = positions.nonzero()[:, 0]
    assert torch.equal(rows.targets, targets)
    expected = ~rows.aligned & (row_of == 0) if unaligned == "ce" else torch.zeros_like(rows.aligned)
    assert torch.equal(rows.fallback, expected) and bool((~rows.aligned & (row_of == 1)).any())


def metaspace_tokenizer():
    """A SentencePiece-style student tokenizer (Llama 2, Mistral, Gemma): metaspace pieces, byte fallback,
    the first space stripped when decoding; trained on the test rows."""
    from tokenizers import Tokenizer, decoders
    from tokenizers import models as token_models
    from tokenizers import pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(token_models.BPE(unk_token="<unk>", byte_fallback=True))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
    specials = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"] + [f"<0x{b:02X}>" for b in range(256)]
    corpus = [row["instruction"] + " " + row["output"] for row in ALPACA_ROWS] * 3
    backend.train_from_iterator(corpus, trainer=trainers.BpeTrainer(vocab_size=360, special_tokens=specials,
                                                                     show_progress=False))
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                  pad_token="<unk>")
    tok.chat_template = tiny.CHATML_TEMPLATE
    return tok


def test_a_sentencepiece_student_learns_from_a_byte_level_teacher_on_and_off_policy(tmp_path, cross_overrides,
                                                                                      other_teacher_dir):
    """The usual real pair (a Llama 2 / Mistral style student, a Llama 3 / Qwen style teacher): "▁word" and
    "Ġword" are one token to the map, and the student's sampled replies (decoded with the first space stripped)
    are aligned again for the teacher."""
    student_tok = metaspace_tokenizer()
    vocab = crosstok.vocab_for(schema.load(overrides={}), student_tok, other_family_tokenizer())
    shared = dict(zip(vocab.student_ids.tolist(), vocab.teacher_ids.tolist()))
    plus = student_tok.convert_tokens_to_ids("▁plus")
    assert other_family_tokenizer().convert_ids_to_tokens(shared[plus]) == "Ġplus"
    student = tiny.save_pair(tiny.build_model(student_tok, seed=7), student_tok, tmp_path / "sp_student")
    values = {**cross_overrides, "model_name_or_path": str(student), "max_steps": 4, "lmbda": 0.5, "seed": 2,
              "max_new_tokens": 8}
    assert {steps.on_policy_draw(2, s, 0.5) for s in range(1, 5)} == {True, False}  # both kinds of step
    assert cli.main(["train", write_yaml(tmp_path, "sp.yaml", values)]) == 0
    rows = read_metrics(Path(values["output_dir"]))
    assert {r["on_policy"] for r in rows} == {True, False}
    assert all(0.3 < r["kd_aligned_fraction"] <= 1.0 and r["kd_loss"] > 0 for r in rows)


def test_incremental_decoded_offsets_equal_those_of_every_prefix(tokenizer):
    """Replies are cut into tokens at any byte: characters split over byte pieces, a first space SentencePiece
    strips. The incremental decode must give what decoding every prefix gives."""
    text = "Two plus two is four. 東京 café 🙂!\n  The quick brown fox "
    for tok in (tokenizer, metaspace_tokenizer()):
        ids = tok(text * 3, add_special_tokens=False)["input_ids"]
        decoded, offsets = crosstok.decoded_offsets(tok, ids)
        assert decoded.strip() == (text * 3).strip() and len(offsets) == len(ids)
        assert (decoded, offsets) == crosstok._decoded_offsets_by_prefixes(
            lambda part: tok.decode(part, skip_special_tokens=False, clean_up_tokenization_spaces=False), ids)
        assert any(a == b for a, b in zip(offsets, offsets[1:]))  # some character came in several pieces


def test_a_compact_cross_tokenizer_cache_keeps_each_spans_continuation(tmp_path, cross_overrides):
    """A span of several teacher tokens moves its row by the continuation's log-prob, so the row's top-k mass is
    below 1 - exp(tail): the compact codes keep the top-k mass at 1 - exp(tail), so the move is stored apart
    (`shift`) and added back on reading. Compact rows must give the exact rows' masses."""
    from helpers import cache_rows

    rows = {}
    for layout in ("exact", "compact"):
        values = {**cross_overrides, "teacher_cache": str(tmp_path / layout), "teacher_topk": 16,
                  "cache_format": layout}
        assert cli.main(["cache", write_yaml(tmp_path, f"{layout}.yaml", values)]) == 0
        rows[layout] = cache_rows(tmp_path / layout)[1]
    exact, coded = rows["exact"], rows["compact"]
    mass = {name: torch.logsumexp(r["logprobs"], dim=1) for name, r in rows.items()}  # top-k log-mass per row
    aligned = mass["exact"] <= 1e-5  # unaligned rows hold zeros (never read): their "mass" is log k
    spans = mass["exact"] < -0.01  # rows whose span continues: their top-k holds less than 1 - exp(tail)
    assert spans.sum() >= 3 and aligned.sum() > spans.sum(), "the test data must hold multi-token spans"
    torch.testing.assert_close(mass["compact"][aligned], mass["exact"][aligned], rtol=0, atol=1e-5)
    torch.testing.assert_close(coded["tail"][aligned], exact["tail"][aligned], rtol=0, atol=1e-5)
