"""Cross-tokenizer alignment (#13): which teacher tokens cover the text of each student token.

Alignment (as TRL's GOLD does it, by the text): each tokenizer's tokens cover character spans of the same
string (HF fast tokenizers' offset mappings). Both sequences are cut at the character positions where
*both* have a token boundary; between two such cuts lies a block. A block holding exactly one student
token aligns that token with the block's teacher tokens (one or more); a block with several student
tokens cannot be aligned token by token, and its student tokens are counted as unaligned. Tokens whose
spans coincide (byte-fallback pieces of one character) move together, so a character is never split.

Each side renders a conversation with its own chat template, so the texts differ outside the replies. Each
reply is aligned on its own: the message's content, found in each side's reply span, is aligned by the
offsets relative to where it starts (a system prompt on one side only shifts nothing); what follows the
content in the reply span (the end-of-turn marker, `<|im_end|>` on one side and `<|eot_id|>` on the
other) is paired as a unit when the student has exactly one such token. `TeacherSide` does this for every
training example; `Retokenizer` does it for replies the student generated (on-policy steps): their text is
decoded and tokenized again by the teacher.

A teacher span a..b-1 gives the student token its distribution as GOLD does: the teacher's distribution of
the span's first token (at position a-1) times the probabilities of the actual continuation tokens
(teachers.aligner.teacher_spans computes it; the loss is crosstok.vocab.hybrid_divergence).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llmneo.config.checks import SAMPLED_KD_LOSSES
from llmneo.crosstok import vocab as crossvocab
from llmneo.data import templates
from llmneo.data.labels import response_indices
from llmneo.errors import LlmneoError


@dataclass(frozen=True)
class Alignment:
    """`pairs[i] = (s, a, b)`: student token s covers the same text as teacher tokens a..b-1."""

    pairs: tuple[tuple[int, int, int], ...]
    unaligned: int  # student tokens (with text) in blocks of several student tokens

    @property
    def aligned_fraction(self) -> float:
        total = len(self.pairs) + self.unaligned
        return len(self.pairs) / total if total else 1.0


def _ends(offsets: list[tuple[int, int]]) -> list[int]:
    """Each token's end, moved to the end of the run of tokens sharing its span (byte pieces of a character)."""
    ends = [end for _, end in offsets]
    for i in range(len(offsets) - 2, -1, -1):
        if offsets[i] == offsets[i + 1]:
            ends[i] = ends[i + 1]
    return ends


def align(student_offsets: list[tuple[int, int]], teacher_offsets: list[tuple[int, int]]) -> Alignment:
    """Align two tokenizations of one text from their character offsets (tokens with an empty span, such as
    special tokens, are skipped on both sides)."""
    student = [(i, span) for i, span in enumerate(student_offsets) if span[1] > span[0]]
    teacher = [(j, span) for j, span in enumerate(teacher_offsets) if span[1] > span[0]]
    s_ends = _ends([span for _, span in student])
    t_ends = _ends([span for _, span in teacher])
    common = sorted(set(s_ends) & set(t_ends))
    pairs, unaligned = [], 0
    si = ti = 0
    for cut in common:
        block_s, block_t = [], []
        while si < len(student) and s_ends[si] <= cut:
            block_s.append(student[si][0])
            si += 1
        while ti < len(teacher) and t_ends[ti] <= cut:
            block_t.append(teacher[ti][0])
            ti += 1
        if len(block_s) == 1 and block_t:
            pairs.append((block_s[0], block_t[0], block_t[-1] + 1))
        else:
            unaligned += len(block_s)
    unaligned += len(student) - si  # text after the last common boundary (a truncated side)
    return Alignment(tuple(pairs), unaligned)


def clip(offsets: list[tuple[int, int]], start: int, end: int) -> list[tuple[int, int]]:
    """Offsets clipped to the text [start, end) and made relative to `start`; tokens outside get an empty span
    (skipped by `align`). A token that carries template text as well (Llama 2's "▁A" after "[/INST]") keeps
    its part inside."""
    return [(max(a, start) - start, min(b, end) - start) if a < end and b > start else (0, 0) for a, b in offsets]


def content_span(text: str, reply: tuple[int, int], content) -> tuple[int, int]:
    """Where a reply's message content lies in its rendered reply span (the whole span when not found)."""
    found = text.find(content.strip(), *reply) if isinstance(content, str) and content.strip() else -1
    return (found, found + len(content.strip())) if found >= 0 else reply


def pair_reply(student_offsets, student_content, student_reply, teacher_offsets, teacher_content,
               teacher_reply) -> tuple[list[tuple[int, int, int]], int]:
    """(pairs (s, a, b), unaligned) for one reply: its content by the text, then the end-of-turn marker as a
    unit. Offsets are each side's own (absolute); content and reply are (start, end) character spans."""
    found = align(clip(student_offsets, *student_content), clip(teacher_offsets, *teacher_content))
    pairs, unaligned = list(found.pairs), found.unaligned

    def marks(offsets, content, reply):
        return [i for i, (a, b) in enumerate(offsets) if b > a and content[1] <= a < reply[1]]

    student_marks = marks(student_offsets, student_content, student_reply)
    teacher_marks = marks(teacher_offsets, teacher_content, teacher_reply)
    if len(student_marks) == 1 and teacher_marks:
        pairs.append((student_marks[0], teacher_marks[0], teacher_marks[-1] + 1))
    else:
        unaligned += len(student_marks)
    return pairs, unaligned


def turn_end(tokenizer, template: str) -> list[int]:
    """The tokens a template puts after a reply's content inside the reply (its end of turn: <|im_end|>,
    <|eot_id|>, EOS ...), found by rendering a one-turn conversation."""
    messages = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]
    full, replies = templates.render_replies(tokenizer, template, messages)
    if not replies:
        return []
    _, start, end = replies[-1]
    ids, _, offsets = templates.encode_by_offsets(tokenizer, full, [])
    content_end = content_span(full, (start, end), "y")[1]
    return [i for i, (a, b) in zip(ids, offsets) if b > a and content_end <= a < end]


def require_fast(tokenizer, side: str) -> None:
    """Alignment needs each token's character offsets, which only fast tokenizers report."""
    if not getattr(tokenizer, "is_fast", False):
        raise LlmneoError(f"cross-tokenizer KD aligns tokens by their character offsets, which only fast "
                          f"tokenizers report; give the {side} a tokenizer.json (a fast tokenizer)")


class TeacherSide:
    """The teacher's view of each training conversation: its own template's rendering, tokenized by its own
    tokenizer, and for every student token the teacher span covering the same text (-1 when none)."""

    def __init__(self, tokenizer, template_name: str | None):
        require_fast(tokenizer, "teacher")
        self.tokenizer = tokenizer
        self.template, _ = templates.resolve(tokenizer, template_name)
        templates.check_tokens(tokenizer, template_name, whose="the teacher's tokenizer")

    def view(self, messages: list[dict], tools, student: "Rendered", kept: int) -> dict:
        """The example's teacher fields for a student rendering of which the first `kept` tokens are kept."""
        import jinja2

        try:
            full, replies = templates.render_replies(self.tokenizer, self.template, messages, tools)
        except jinja2.TemplateError as exc:
            raise LlmneoError(f"the teacher's chat template failed: {exc}; fix the row, or give the teacher a "
                              f"tokenizer whose chat template renders it (teacher_template applies to a teacher "
                              f"tokenizer without one)") from None
        ids, _, offsets = templates.encode_by_offsets(self.tokenizer, full, [])
        teacher_replies = {i: (a, b) for i, a, b in replies}
        start, end = [-1] * kept, [-1] * kept
        for i, a, b in student.replies:
            if i not in teacher_replies:
                continue
            content = messages[i].get("content")
            pairs, _ = pair_reply(student.offsets, content_span(student.text, (a, b), content), (a, b), offsets,
                                  content_span(full, teacher_replies[i], content), teacher_replies[i])
            for s, first, last in pairs:
                if s < kept:
                    start[s], end[s] = first, last
        last_reply = teacher_replies.get(student.replies[-1][0]) if student.replies else None
        prompt_len = next((t for t, (a, b) in enumerate(offsets) if b > last_reply[0]), len(ids)) if last_reply \
            else len(ids)
        width = max([prompt_len, 1] + end)  # the teacher tokens the kept student tokens need
        return {"teacher_input_ids": ids[:width], "teacher_start": start, "teacher_end": end,
                "teacher_prompt_len": min(prompt_len, width)}


@dataclass
class Rendered:
    """One side's rendering of a conversation: its text, token offsets and (message index, start, end) replies."""

    text: str
    offsets: list[tuple[int, int]]
    replies: list[tuple[int, int, int]]


def decoded_offsets(tokenizer, ids: list[int]) -> tuple[str, list[tuple[int, int]]]:
    """The text of generated `ids` and each token's character span in it. The pieces of a character split across
    tokens (byte-level or byte-fallback) all get that character's span.

    Incremental, as inference servers detokenize: each token's text is what decoding a short window gains by
    it, so the cost grows with the reply's length, not its square. Should the pieces not add up to the decoded
    whole (a decoder that rewrites earlier text), every prefix is decoded instead."""
    def decode(part: list[int]) -> str:
        return tokenizer.decode(part, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    offsets: list[tuple[int, int]] = []
    text, pending, prefix, read = "", 0, 0, 0
    for i in range(len(ids)):
        before, after = decode(ids[prefix:read]), decode(ids[prefix:i + 1])
        if after.endswith("\ufffd") and i + 1 < len(ids):
            pending += 1  # an incomplete character: its span is known once a later token completes it
            continue
        if not after.startswith(before):
            return _decoded_offsets_by_prefixes(decode, ids)
        start, text = len(text), text + after[len(before):]
        offsets += [(start, len(text))] * (pending + 1)
        pending, prefix, read = 0, read, i + 1
    if text != decode(ids):
        return _decoded_offsets_by_prefixes(decode, ids)
    return text, offsets


def _decoded_offsets_by_prefixes(decode, ids: list[int]) -> tuple[str, list[tuple[int, int]]]:
    """`decoded_offsets` from the decode of every prefix (quadratic in the length; always consistent)."""
    offsets: list[tuple[int, int]] = []
    pending, done = 0, 0
    text = ""
    for i in range(len(ids)):
        text = decode(ids[:i + 1])
        if text.endswith("\ufffd") and i + 1 < len(ids):
            pending += 1
            continue
        end = max(len(text), done)
        offsets += [(done, end)] * (pending + 1)
        pending, done = 0, end
    return text, offsets


class Retokenizer:
    """Teacher fields for sequences the student generated (on-policy): each reply is decoded to text, tokenized
    by the teacher after the teacher's own rendering of the prompt, and aligned; a reply the student ended
    with its end of turn ends with the teacher's."""

    def __init__(self, student_tok, teacher_tok, student_stops: set[int], teacher_turn_end: list[int]):
        self.student_tok, self.teacher_tok = student_tok, teacher_tok
        self.student_stops, self.teacher_turn_end = set(student_stops), list(teacher_turn_end)

    def fields(self, teacher_prompt: list[int], prompt_len: int, reply: list[int]) -> dict:
        """The teacher fields of one row: `teacher_prompt` (teacher ids), the student's prompt length, its reply."""
        ended = bool(reply) and reply[-1] in self.student_stops
        content = reply[:-1] if ended else reply
        text, student_offsets = decoded_offsets(self.student_tok, content)
        encoded = self.teacher_tok(text, add_special_tokens=False, return_offsets_mapping=True)
        teacher_ids, teacher_offsets = list(encoded["input_ids"]), [tuple(o) for o in encoded["offset_mapping"]]
        length = len(text)
        if ended:  # the end-of-turn marker, after the content, on both sides
            student_offsets.append((length, length + 1))
            teacher_ids += self.teacher_turn_end
            teacher_offsets += [(length, length + 1)] * len(self.teacher_turn_end)
        span = (0, length)
        pairs, _ = pair_reply(student_offsets, span, (0, length + 1), teacher_offsets, span, (0, length + 1))
        total = prompt_len + len(reply)
        start, end = [-1] * total, [-1] * total
        for s, a, b in pairs:
            start[prompt_len + s], end[prompt_len + s] = len(teacher_prompt) + a, len(teacher_prompt) + b
        return {"teacher_input_ids": teacher_prompt + teacher_ids, "teacher_start": start, "teacher_end": end,
                "teacher_prompt_len": len(teacher_prompt)}


def check_supported(config) -> None:
    """What cross-tokenizer KD does not do yet, refused in one line each."""
    refusals = [
        (config.effective_packing, "packing or neat_packing (a packed row holds several conversations, and the "
         "alignment maps one conversation's student tokens onto its teacher tokens; set packing: false and "
         "neat_packing: false)"),
        (config.stage == "pt", "stage: pt (raw text has no replies to align; use conversation data with stage: sft)"),
        (config.teacher_endpoint is not None, "a served teacher (teacher_endpoint); load the teacher here with "
         "teacher_model_name_or_path, or cache it with llmneo cache"),
        (config.kd_loss in SAMPLED_KD_LOSSES, f"kd_loss: {config.kd_loss} (it needs the teacher's log-prob of the "
         f"student's own tokens); use rkl"),
        (config.seq_kd, "seq_kd (the teacher's replies would be in its own tokens); use lmbda for on-policy steps"),
        (len(config.teachers) > 1, "several teachers; give one teacher"),
    ]
    for refused, what in refusals:
        if refused:
            raise LlmneoError(f"cross-tokenizer KD (the teacher's tokenizer differs from the student's) does not "
                              f"support {what}")


def vocab_for(config, student_tok, teacher_tok, template_name: str | None = None):
    """The run's crosstok.vocab.VocabMap: shared tokens, plus EOS and the end-of-turn tokens paired."""
    student_end = turn_end(student_tok, templates.resolve(student_tok, config.template)[0])
    teacher_end = turn_end(teacher_tok, templates.resolve(teacher_tok, template_name or config.teacher_template
                                                         or config.template)[0])
    paired = [(student_tok.eos_token_id, teacher_tok.eos_token_id)]
    if student_end and teacher_end:
        paired.insert(0, (student_end[0], teacher_end[0]))
    return crossvocab.vocab_map(student_tok, teacher_tok, config.kd_uld_weight, paired)


def aligned_share(examples: list[dict]) -> float:
    """The share of the examples' reply tokens (past the first) that have a teacher span."""
    labelled = aligned = 0
    for example in examples:
        for t in response_indices(example["labels"]):  # the reply token t + 1 is aligned when it has a span
            labelled += 1
            aligned += example["teacher_start"][t + 1] >= 1
    return aligned / max(labelled, 1)


def announce(vocab, student_tok, teacher_tok, source: str, aligned: float | None = None) -> str:
    """The one line a cross-tokenizer run starts with."""
    return (f"llmneo: cross-tokenizer KD: {source} has its own tokenizer ({len(teacher_tok):,} tokens; the "
            f"student's has {len(student_tok):,}); {vocab.shared:,} tokens shared ({100 * vocab.overlap:.1f}% "
            f"overlap), ULD weight {vocab.uld_weight:.3f}; replies aligned by their text"
            + ("" if aligned is None else f": {100 * aligned:.1f}% of the training replies' tokens have a teacher "
               f"span"))


def collate_teacher(examples: list[dict], width: int) -> dict[str, torch.Tensor]:
    """The teacher's own tokens right-padded (id 0 under a zero mask), and per student token (padded to `width`)
    the first and end teacher token of its aligned span (-1: unaligned), each row's teacher prompt length, and
    whether its replies are the data's."""
    teacher_width = max(len(e["teacher_input_ids"]) for e in examples)

    def pad(rows, size, value):
        return torch.tensor([list(row) + [value] * (size - len(row)) for row in rows], dtype=torch.long)

    return {"teacher_input_ids": pad([e["teacher_input_ids"] for e in examples], teacher_width, 0),
            "teacher_attention_mask": pad([[1] * len(e["teacher_input_ids"]) for e in examples], teacher_width, 0),
            "teacher_start": pad([e["teacher_start"] for e in examples], width, -1),
            "teacher_end": pad([e["teacher_end"] for e in examples], width, -1),
            "teacher_prompt_len": torch.tensor([e["teacher_prompt_len"] for e in examples], dtype=torch.long),
            # the replies are the data's (not the student's samples): an unaligned token may fall back to its CE
            "reply_is_data": torch.tensor([e.get("reply_is_data", True) for e in examples], dtype=torch.bool)}
