"""Training data: the datasets' rows tokenized with label masks into the training and held-out splits, and batched.

Rows come from `llmneo.data.sources` (finding and reading the datasets, every row normalised to a
conversation or text). Tool schemas, calls and results: `llmneo.data.tool_calls`. Rendering and label masks:
`llmneo.data.templates`. Examples hold `input_ids` and unshifted `labels` (the token itself where trained,
-100 elsewhere); the loop shifts them (`llmneo.data.labels`). Held-out data is `eval_dataset` (resolved like
`dataset`) or `val_size` rows, held out by a shuffle seeded with `seed` (both splits keep the original row
order). Each split is tokenized, then packed when `config.effective_packing` (`llmneo.data.packing`).
A cross-tokenizer run also gives each example the teacher's tokens and the alignment (`llmneo.crosstok`).
"""

from __future__ import annotations

import random
import warnings
from dataclasses import dataclass

import torch

from llmneo.crosstok.offsets import Rendered, collate_teacher, require_fast
from llmneo.data import packing, sources, templates
from llmneo.data import tool_calls as tool_data
from llmneo.data.labels import IGNORE_INDEX, has_response
from llmneo.errors import LlmneoError


@dataclass
class Splits:
    train: list[dict]  # {"input_ids": list[int], "labels": list[int]}; labels -100 except on reply tokens
    eval: list[dict] | None  # the held-out examples (eval_dataset, or val_size > 0), else None


def build(config, tokenizer, teacher_side=None) -> Splits:
    """Load `config.dataset` and the held-out data, tokenize both with label masks, and pack them if asked.

    `teacher_side` (crosstok.TeacherSide, cross-tokenizer KD): each training example also gets the teacher's
    tokens of its conversation and, per student token, the teacher span covering the same text."""
    template, own = templates.resolve(tokenizer, config.template)
    if own and config.template:
        warnings.warn(f"the tokenizer has its own chat template, which is used; template='{config.template}' "
                      f"is ignored", stacklevel=2)
    rows = _numbered(sources.load_rows(config))
    train_rows, eval_rows = ((rows, _numbered(sources.load_rows(config, config.eval_dataset, "eval_dataset")))
                             if config.eval_dataset else _split(rows, config.val_size, config.seed))
    if any("messages" in row for _, _, row in train_rows + eval_rows):
        templates.check_for_conversations(tokenizer, config.template)
    # Packed text is cut into blocks after concatenation, so it is not truncated first.
    cutoff = None if config.effective_packing and config.stage == "pt" else config.cutoff_len
    encoder = _Encoder(tokenizer, template, own, cutoff)
    train, evaluation = encoder.encode(train_rows, teacher_side), encoder.encode(eval_rows, split="held-out")
    if not train:
        raise LlmneoError(f"no trainable tokens: every example's prompt is longer than cutoff_len="
                          f"{config.cutoff_len} (or every response is masked); raise cutoff_len")
    if config.eval_dataset and not evaluation:
        raise LlmneoError(f"eval_dataset '{config.eval_dataset}' has no example with a response token within "
                          f"cutoff_len={config.cutoff_len}; raise cutoff_len or choose other held-out data")
    if encoder.dropped:
        warnings.warn(f"dropped {encoder.dropped} of {len(train_rows) + len(eval_rows)} examples with no trainable "
                      f"token within cutoff_len={config.cutoff_len}; raise cutoff_len to keep them", stacklevel=2)
    cut = [f"{n} of {total} {split} examples ({lost:,} {'response ' if config.stage == 'sft' else ''}tokens lost)"
           for split, (n, lost, total) in encoder.cut.items() if n]
    if cut:
        warnings.warn(f"cutoff_len={config.cutoff_len} cut {'the replies of ' if config.stage == 'sft' else ''}"
                      f"{' and '.join(cut)}; raise cutoff_len to keep them", stacklevel=2)
    if encoder.tools_as_text:
        warnings.warn(f"the tokenizer's chat template ignores tool schemas, tool calls or tool results in "
                      f"{encoder.tools_as_text} examples; those are rendered as text instead (schemas in the "
                      f"system prompt, calls as 'Action: ... / Action Input: ...')", stacklevel=2)
    if config.effective_packing:
        pack = packing.concatenate if config.stage == "pt" else packing.best_fit
        neat = config.effective_neat_packing
        train, evaluation = pack(train, config.cutoff_len, neat), pack(evaluation, config.cutoff_len, neat)
    return Splits(train=train, eval=evaluation if eval_rows and evaluation else None)


def _numbered(loaded: list[tuple[str, list[dict]]]) -> list[tuple[str, int, dict]]:
    return [(source, n, row) for source, dataset in loaded for n, row in enumerate(dataset, 1)]


def _split(rows: list, val_size: float, seed: int) -> tuple[list, list]:
    if not val_size:
        return rows, []
    held_out = int(val_size) if val_size >= 1 else max(1, round(val_size * len(rows)))
    if held_out >= len(rows):
        raise LlmneoError(f"val_size={val_size} holds out {held_out} of {len(rows)} rows, leaving none to "
                          f"train on; lower val_size or add data")
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    chosen = set(order[:held_out])
    return ([r for i, r in enumerate(rows) if i not in chosen], [r for i, r in enumerate(rows) if i in chosen])


class _Encoder:
    """Rows → examples; counts what it drops, what cutoff_len cuts (per split: examples kept but cut, trained tokens
    they lost, rows) and the tool rows its chat template could not render."""

    def __init__(self, tokenizer, template: str, own: bool, cutoff_len: int | None):
        self.tokenizer, self.template, self.own, self.cutoff_len = tokenizer, template, own, cutoff_len
        self.dropped = self.tools_as_text = 0
        self.cut: dict[str, tuple[int, int, int]] = {}

    def encode(self, rows: list, teacher_side=None, split: str = "training") -> list[dict]:
        import jinja2

        examples, cut, lost = [], 0, 0
        if teacher_side is not None:
            require_fast(self.tokenizer, "student")
        for source, n, row in rows:
            rendered = None
            if "text" in row:
                if teacher_side is not None:
                    raise LlmneoError(f"{source} row {n} is plain text; cross-tokenizer KD aligns the replies of "
                                      f"conversations, so give conversation rows (or a teacher with the student's "
                                      f"tokenizer)")
                ids, labels = templates.encode_text(self.tokenizer, row["text"])
            else:
                try:
                    messages, tools = self._tools_rendered(row)
                    if teacher_side is None:
                        ids, labels = templates.encode_conversation(self.tokenizer, self.template, messages, tools)
                    else:
                        rendered, ids, labels = self._rendered(messages, tools)
                except jinja2.TemplateError as exc:
                    raise LlmneoError(f"{source} row {n}: the chat template failed: {exc}; fix the row or "
                                      f"the template") from None
            beyond = 0 if self.cutoff_len is None else sum(label != IGNORE_INDEX for label in labels[self.cutoff_len:])
            ids, labels = ids[:self.cutoff_len], labels[:self.cutoff_len]  # [:None] keeps all
            if has_response(labels):  # a token to train on (labels[0] is never scored)
                example = {"input_ids": ids, "labels": labels, **({"route": row["route"]} if "route" in row else {})}
                if rendered is not None:
                    try:
                        example.update(teacher_side.view(messages, tools, rendered, len(ids)))
                    except LlmneoError as exc:
                        raise LlmneoError(f"{source} row {n}: {exc}") from None
                examples.append(example)
                cut, lost = cut + (beyond > 0), lost + beyond
            else:
                self.dropped += 1
        self.cut[split] = (cut, lost, len(rows))
        return examples

    def _rendered(self, messages, tools):
        """(crosstok.Rendered, ids, labels): the student's rendering with its token offsets (cross-tokenizer KD)."""
        text, replies = templates.render_replies(self.tokenizer, self.template, messages, tools)
        ids, labels, offsets = templates.encode_by_offsets(self.tokenizer, text, [(a, b) for _, a, b in replies])
        return Rendered(text, offsets, replies), ids, labels

    def _tools_rendered(self, row: dict) -> tuple[list[dict], list[dict] | None]:
        """(messages, tools) for the template: as they are when it renders them, else in the text form."""
        import jinja2

        messages, tools = row["messages"], row.get("tools")
        if not tool_data.involved(messages, tools):
            return messages, None
        if self.own:
            def render(m, t):
                return templates.render(self.tokenizer, self.template, m, t)

            try:
                if tool_data.honoured(render, messages, tools):
                    return messages, tools
            except jinja2.TemplateError:
                pass  # e.g. a template that raises on the `tool` role: the text form has none
            self.tools_as_text += 1
        return tool_data.as_text(messages, tools), None


def collate(examples: list[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch: input_ids with pad_token_id, attention_mask 0 and labels -100 on padding; neat-packed
    rows' position_ids restart at 0 on their padding, which is then a separate example (models.inputs)."""
    width = max(len(e["input_ids"]) for e in examples)

    def pad(rows: list[list[int]], value: int) -> torch.Tensor:  # (B, width)
        return torch.tensor([row + [value] * (width - len(row)) for row in rows], dtype=torch.long)

    batch = {"input_ids": pad([list(e["input_ids"]) for e in examples], pad_token_id),
             "attention_mask": pad([[1] * len(e["input_ids"]) for e in examples], 0),
             "labels": pad([list(e["labels"]) for e in examples], IGNORE_INDEX)}
    if "position_ids" in examples[0]:  # neat packing: positions restart per example; the padding is one more
        batch["position_ids"] = torch.tensor([list(e["position_ids"]) + list(range(width - len(e["position_ids"])))
                                              for e in examples], dtype=torch.long)
    if "index" in examples[0]:  # position in the split: how a teacher cache finds the example's rows
        batch["index"] = torch.tensor([e["index"] for e in examples], dtype=torch.long)
    if "teacher" in examples[0]:  # which teacher scores the example (teacher_column routing)
        batch["teacher"] = torch.tensor([e["teacher"] for e in examples], dtype=torch.long)
    if "teacher_input_ids" in examples[0]:  # cross-tokenizer KD: the teacher's tokens and the alignment
        batch.update(collate_teacher(examples, width))
    return batch


class EpochSampler(torch.utils.data.Sampler):
    """A shuffle that depends only on (seed, epoch), so a resumed run can rebuild any epoch's order."""

    def __init__(self, size: int, seed: int):
        self.size, self.seed, self.epoch = size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.size, generator=generator).tolist())


def micro_batches(loader, accelerator, start: int = 0):
    """Micro-batches across epochs from micro-batch number `start` on (per rank), reshuffled each epoch.

    Resuming mid-epoch skips the consumed batches of that epoch by index only: nothing before them is
    read or collated.
    """
    per_epoch = len(loader)
    epoch, skip = divmod(start, per_epoch)
    while True:
        loader.set_epoch(epoch)
        for batch in accelerator.skip_first_batches(loader, skip) if skip else loader:
            yield batch
        epoch, skip = epoch + 1, 0
