"""Prompt templates, and turning one conversation into `input_ids` plus `labels` that train only replies.

A tokenizer's own chat template always wins. For tokenizers without one (base models), `template`
names a built-in jinja template, applied through `tokenizer.apply_chat_template(chat_template=...)`
exactly like a native one. Every built-in starts with the tokenizer's BOS (when it has one) and ends
each assistant turn with EOS or the format's native end-of-turn token, so the student learns to stop.

The `default` template, for a system message S, then user U1, assistant A1, user U2, assistant A2:

    {bos}System: S
    Human: U1
    Assistant: A1{eos}
    Human: U2
    Assistant: A2{eos}

`chatml`/`qwen` use `<|im_start|>role\\n...<|im_end|>`, `llama3` the `<|start_header_id|>` headers
closed by `<|eot_id|>`, `llama2` and `mistral` `[INST] ... [/INST]`, `gemma` `<start_of_turn>` closed
by `<end_of_turn>`, `alpaca` `### Instruction:` / `### Response:`, `vicuna` `USER: ... ASSISTANT:`.

Label masks. Most real chat templates have no `{% generation %}` markers, so the assistant tokens are
found by rendering: for assistant message i, `render(messages[:i], add_generation_prompt=True)` and
`render(messages[:i+1])` are prefixes of the full rendering, and the characters between them are the
reply (with its end-of-turn marker; trailing whitespace after the marker stays prompt). The full text
is tokenized once (`return_offsets_mapping`) and tokens overlapping a reply span are labelled.
Templates that rewrite earlier turns (e.g. dropping old reasoning) break the prefix property; then
each reply is searched for, in order, in the full rendering, and a reply rewritten beyond recognition
stays prompt. The token sequence is always the template's own rendering of the whole conversation.
"""

from __future__ import annotations

import os
import warnings

from llmneo.data.labels import IGNORE_INDEX
from llmneo.errors import LlmneoError

# Expressions, not `{% if %}` blocks: HF renders with trim_blocks, which eats a newline after a block tag.
_BOS = "{{ bos_token or '' }}"
_EOS = "{{ eos_token or '' }}"
# Templates that have no system slot fold the system message into the first user turn.
_FOLD_SYSTEM = (
    "{% if messages and messages[0]['role'] == 'system' %}"
    "{% set system = messages[0]['content'] %}{% set messages = messages[1:] %}"
    "{% else %}{% set system = '' %}{% endif %}"
)

_CHATML = (
    _BOS + "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

BUILTIN_TEMPLATES: dict[str, str] = {
    "default": (
        _BOS + "{% for m in messages %}"
        "{% if m['role'] == 'system' %}System: {{ m['content'] }}\n"
        "{% elif m['role'] == 'user' %}Human: {{ m['content'] }}\n"
        "{% else %}Assistant: {{ m['content'] }}" + _EOS + "\n{% endif %}"
        "{% endfor %}{% if add_generation_prompt %}Assistant: {% endif %}"
    ),
    "chatml": _CHATML,
    "qwen": _CHATML,
    "llama3": (
        _BOS + "{% for m in messages %}"
        "<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n{{ m['content'] }}<|eot_id|>"
        "{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
    ),
    "llama2": (
        _FOLD_SYSTEM + "{% for m in messages %}"
        "{% if m['role'] == 'user' %}" + _BOS + "[INST] "
        "{% if loop.first and system %}<<SYS>>\n{{ system }}\n<</SYS>>\n\n{% endif %}{{ m['content'] }} [/INST]"
        "{% else %} {{ m['content'] }} " + _EOS + "{% endif %}{% endfor %}"
    ),
    "mistral": (
        _BOS + _FOLD_SYSTEM + "{% for m in messages %}"
        "{% if m['role'] == 'user' %}[INST] {% if loop.first and system %}{{ system }}\n\n{% endif %}"
        "{{ m['content'] }} [/INST]{% else %} {{ m['content'] }}" + _EOS + "{% endif %}{% endfor %}"
    ),
    "gemma": (
        _BOS + _FOLD_SYSTEM + "{% for m in messages %}"
        "{% if m['role'] == 'user' %}<start_of_turn>user\n{% if loop.first and system %}{{ system }}\n\n"
        "{% endif %}{{ m['content'] }}<end_of_turn>\n"
        "{% else %}<start_of_turn>model\n{{ m['content'] }}<end_of_turn>\n{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
    ),
    "alpaca": (
        _BOS + _FOLD_SYSTEM + "{{ system or 'Below is an instruction that describes a task. "
        "Write a response that appropriately completes the request.' }}\n\n"
        "{% for m in messages %}{% if m['role'] == 'user' %}### Instruction:\n{{ m['content'] }}\n\n"
        "{% else %}### Response:\n{{ m['content'] }}" + _EOS + "\n\n{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}### Response:\n{% endif %}"
    ),
    "vicuna": (
        _BOS + _FOLD_SYSTEM + "{{ system or 'A chat between a curious user and an artificial intelligence "
        "assistant. The assistant gives helpful, detailed, and polite answers to the user\\'s questions.' }} "
        "{% for m in messages %}{% if m['role'] == 'user' %}USER: {{ m['content'] }} "
        "{% else %}ASSISTANT: {{ m['content'] }}" + _EOS + "{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
    ),
}


# The special tokens each built-in template writes as markers; the last one ends its turns (the other templates
# end them with the tokenizer's EOS). A tokenizer must hold each marker as one token: spelled out in characters, a
# marker is noise to learn, and a reply would end in a dozen ordinary tokens that nothing stops on.
MARKERS: dict[str, tuple[str, ...]] = {
    "chatml": ("<|im_start|>", "<|im_end|>"),
    "qwen": ("<|im_start|>", "<|im_end|>"),
    "llama3": ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
    "gemma": ("<start_of_turn>", "<end_of_turn>"),
}
TURN_END = {name: markers[-1] for name, markers in MARKERS.items()}


def missing_tokens(tokenizer, name: str | None) -> list[str]:
    """The markers of built-in template `name` that `tokenizer` does not hold as one token (none when the
    tokenizer has its own chat template, which is the one used)."""
    if getattr(tokenizer, "chat_template", None):
        return []
    return [marker for marker in MARKERS.get(name or "default", ()) if not _single(tokenizer, marker)]


def _single(tokenizer, marker: str) -> bool:
    ids = _tokens(tokenizer, marker)
    # In context too: a marker that is an ordinary vocabulary entry could merge with its neighbours.
    return len(ids) == 1 and ids[0] in _tokens(tokenizer, f"a{marker}\n")


def check_tokens(tokenizer, name: str | None, whose: str = "the tokenizer", fixes: str = "") -> None:
    """Refuse, in one line, a built-in template whose markers `tokenizer` lacks (see MARKERS)."""
    missing = missing_tokens(tokenizer, name)
    if not missing:
        return
    fitting = [n for n in BUILTIN_TEMPLATES if not missing_tokens(tokenizer, n)]
    raise LlmneoError(
        f"template '{name}' writes the special tokens {', '.join(missing)}, which {whose} "
        f"('{tokenizer.name_or_path}') lacks: each would be split into characters and replies would not end in "
        f"one end-of-turn token; use a template whose tokens it has ({', '.join(fitting)}) or a tokenizer with its "
        f"own chat template{fixes}")


def check_for_conversations(tokenizer, name: str | None) -> None:
    """Before conversations are rendered: refuse missing markers (check_tokens); warn when a tokenizer without a
    chat template meets an unset template, which is a guess of the model's format."""
    check_tokens(tokenizer, name)
    if not name and not getattr(tokenizer, "chat_template", None):
        warnings.warn(f"template is unset and the tokenizer has no chat template: conversations are rendered with the "
                      f"built-in 'default' template (System: / Human: / Assistant:, replies end with EOS "
                      f"{tokenizer.eos_token!r}); set template to the format the model knows", stacklevel=3)


def turn_end_id(tokenizer, name: str | None) -> int | None:
    """The token that ends a reply under built-in template `name` (its end-of-turn marker, else EOS)."""
    marker = TURN_END.get(name or "default")
    return tokenizer.convert_tokens_to_ids(marker) if marker else tokenizer.eos_token_id


def describe(tokenizer, name: str | None) -> str:
    """Which template renders the conversations, in words (the training announcement says it)."""
    if getattr(tokenizer, "chat_template", None):
        return "the tokenizer's chat template"
    return f"built-in template {name}" if name else "built-in template default (template unset)"


def resolve(tokenizer, name: str | None) -> tuple[str, bool]:
    """The chat template to render with, and whether it is the tokenizer's own."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.chat_template, True
    name = name or "default"
    if name not in BUILTIN_TEMPLATES:
        raise LlmneoError(f"unknown template '{name}'; use one of {', '.join(BUILTIN_TEMPLATES)} "
                          f"(or a tokenizer that has its own chat template)")
    return BUILTIN_TEMPLATES[name], False


# Llama 3.x templates put "Today Date" in the system prompt from strftime_now() unless date_string is
# given; a fixed date keeps tokenized data (and a teacher cache's fingerprint) the same on every day.
FIXED_DATE = "26 Jul 2024"


def render(tokenizer, template: str, messages: list[dict], tools: list[dict] | None = None,
           generation_prompt: bool = False) -> str:
    """The template's text for a conversation (with tool schemas, when given)."""
    return tokenizer.apply_chat_template(messages, tools=tools or None, chat_template=template, tokenize=False,
                                         add_generation_prompt=generation_prompt, date_string=FIXED_DATE)


def _tokens(tokenizer, text: str) -> list[int]:
    # Templates emit BOS and markers as text; letting the tokenizer add specials would double BOS.
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _reply_spans(full: str, messages: list[dict], pairs: list[tuple[int, str, str]]) -> list[tuple[int, int, int]]:
    """(message index, start, end): the character span [start, end) in `full` of each assistant message that
    can be found."""
    spans = []
    cursor = 0
    for i, prompt, upto in pairs:
        if upto.startswith(prompt) and full.startswith(upto):
            start, reply = len(prompt), upto[len(prompt):]
        else:
            # The template rewrote an earlier turn: look for the reply text itself, in order.
            reply = upto[len(os.path.commonprefix([prompt, upto])):]
            start = full.find(reply.rstrip(), cursor) if reply.strip() else -1
            if start < 0:
                reply = messages[i]["content"].strip()
                start = full.find(reply, cursor) if reply else -1
            if start < 0:
                continue  # rendered beyond recognition (e.g. reasoning dropped): it stays prompt
        # Whitespace after the end-of-turn marker separates turns; it belongs to no reply.
        spans.append((i, start, start + len(reply.rstrip())))
        cursor = spans[-1][2]
    return spans


def encode_conversation(tokenizer, template: str, messages: list[dict],
                        tools: list[dict] | None = None) -> tuple[list[int], list[int]]:
    """Token ids of the rendered conversation, and labels equal to them on reply tokens, -100 elsewhere.

    Assistant messages (replies and tool calls) are the replies; `tools` are passed to every rendering.
    """
    full, replies = render_replies(tokenizer, template, messages, tools)
    spans = [(start, end) for _, start, end in replies]
    if getattr(tokenizer, "is_fast", False):
        return encode_by_offsets(tokenizer, full, spans)[:2]
    return _encode_by_segments(tokenizer, full, spans)


def render_replies(tokenizer, template: str, messages: list[dict],
                   tools: list[dict] | None = None) -> tuple[str, list[tuple[int, int, int]]]:
    """The whole conversation's text, and (message index, start, end) of each reply found in it."""
    full = render(tokenizer, template, messages, tools)
    pairs = [(i, render(tokenizer, template, messages[:i], tools, generation_prompt=True),
              render(tokenizer, template, messages[:i + 1], tools))
             for i, m in enumerate(messages) if m["role"] == "assistant"]
    return full, _reply_spans(full, messages, pairs)


def encode_by_offsets(tokenizer, full: str,
                      spans: list[tuple[int, int]]) -> tuple[list[int], list[int], list[tuple[int, int]]]:
    """(ids, labels, character offsets) of `full` tokenized once by a fast tokenizer, labels on reply `spans`."""
    encoded = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids = encoded["input_ids"]
    labels = [IGNORE_INDEX] * len(ids)
    for t, (start, end) in enumerate(encoded["offset_mapping"]):
        # A token straddling the boundary (e.g. " yo" after "Assistant:") carries reply text: train it.
        if end > start and any(start < span_end and end > span_start for span_start, span_end in spans):
            labels[t] = ids[t]
    return ids, labels, [tuple(span) for span in encoded["offset_mapping"]]


def _encode_by_segments(tokenizer, full: str, spans: list[tuple[int, int]]) -> tuple[list[int], list[int]]:
    # Tokenizers without offsets: tokenize prompt and reply pieces separately, in order.
    ids: list[int] = []
    labels: list[int] = []
    cursor = 0
    for start, end in spans + [(len(full), len(full))]:
        prompt_ids, reply_ids = _tokens(tokenizer, full[cursor:start]), _tokens(tokenizer, full[start:end])
        ids += prompt_ids + reply_ids
        labels += [IGNORE_INDEX] * len(prompt_ids) + reply_ids
        cursor = end
    return ids, labels


def encode_text(tokenizer, text: str) -> tuple[list[int], list[int]]:
    """Pretraining-style text: BOS (if any) + text + EOS, every token trained."""
    ids = _tokens(tokenizer, text)
    if tokenizer.bos_token_id is not None:
        ids = [tokenizer.bos_token_id] + ids
    if tokenizer.eos_token_id is not None:
        ids = ids + [tokenizer.eos_token_id]
    return ids, list(ids)
