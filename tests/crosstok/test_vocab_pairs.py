"""The vocabulary map pairs each side's EOS and end-of-turn token with the other's although their texts differ.

Matching by text alone leaves such tokens unshared (a special token matches only its exact text), and the
KD loss moves little without them (one position per reply): so the map itself is checked here.
"""

from __future__ import annotations

import pytest

from llmneo.config import schema
from llmneo.crosstok import offsets as crosstok
from llmneo.crosstok import vocab as crossvocab
from llmneo.demo import tiny

# a Llama-3-like teacher: its own EOS and end-of-turn markers, neither of which the student's vocabulary holds
TEACHER_TEMPLATE = ("{% for m in messages %}{{ '<|start|>' + m['role'] + '\n' + m['content'] + '<|eot_id|>' }}"
                    "{% endfor %}{% if add_generation_prompt %}{{ '<|start|>assistant\n' }}{% endif %}")


def teacher_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<|start|>", "<|eot_id|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator(["The quick brown fox jumps over the lazy dog.", "Say hello. Hello there!"],
                                trainer=trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    tok.chat_template = TEACHER_TEMPLATE
    return tok


@pytest.fixture(scope="module")
def pair():
    student, teacher = tiny.build_tokenizer(), teacher_tokenizer()
    student_ids = {name: student.convert_tokens_to_ids(name) for name in ("</s>", "<|im_end|>")}
    teacher_ids = {name: teacher.convert_tokens_to_ids(name) for name in ("<|endoftext|>", "<|eot_id|>")}
    # the premise: no text of one side's markers is a token of the other's
    assert "</s>" not in teacher.get_vocab() and "<|im_end|>" not in teacher.get_vocab()
    assert "<|endoftext|>" not in student.get_vocab() and "<|eot_id|>" not in student.get_vocab()
    return student, teacher, student_ids, teacher_ids


def test_eos_and_end_of_turn_are_paired_across_tokenizers_whose_texts_differ(pair):
    student, teacher, s, t = pair
    vocab = crosstok.vocab_for(schema.load(overrides={}), student, teacher)
    assert crosstok.turn_end(student, student.chat_template) == [s["<|im_end|>"]]
    assert crosstok.turn_end(teacher, teacher.chat_template) == [t["<|eot_id|>"]]
    assert int(vocab.to_student[t["<|eot_id|>"]]) == s["<|im_end|>"]  # end of turn with end of turn
    assert int(vocab.to_student[t["<|endoftext|>"]]) == s["</s>"]  # EOS with EOS
    pairs = dict(zip(vocab.student_ids.tolist(), vocab.teacher_ids.tolist()))
    assert pairs[s["<|im_end|>"]] == t["<|eot_id|>"] and pairs[s["</s>"]] == t["<|endoftext|>"]
    for i in s.values():
        assert not bool(vocab.student_only[i])
    for i in t.values():
        assert not bool(vocab.teacher_only[i])


def test_without_pairs_the_same_markers_stay_unshared(pair):
    """What the pairing adds: by their text alone none of the four markers is shared."""
    student, teacher, s, t = pair
    vocab = crossvocab.vocab_map(student, teacher)
    assert all(bool(vocab.student_only[i]) for i in s.values())
    assert all(bool(vocab.teacher_only[i]) for i in t.values())
    paired = crossvocab.vocab_map(student, teacher, paired=[(s["<|im_end|>"], t["<|eot_id|>"]),
                                                            (s["</s>"], t["<|endoftext|>"])])
    assert paired.shared == vocab.shared + 2
