"""Row formats: normalise alpaca, sharegpt, messages, prompt/completion and text rows to conversations.

Every conversation becomes {"messages": [system?, user, assistant, user, assistant, ...]}; a text row
becomes {"text": ...}. A row that cannot is an error naming the file, the row (1-based) and the field.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from llmneo.errors import LlmneoError

_ROLES = {"system": "system", "user": "user", "human": "user", "observation": "user", "tool": "user",
          "assistant": "assistant", "gpt": "assistant", "model": "assistant", "function_call": "assistant"}


@dataclass
class Layout:
    """How a dataset's rows are laid out: LLaMA-Factory's `formatting`, `columns` and `tags`."""
    formatting: str | None = None  # None: detect from the columns
    columns: dict = field(default_factory=dict)
    tags: dict = field(default_factory=dict)


class BadRow(Exception):
    """One row's problem; `_normalise` adds the file and row number."""


# --- normalising rows to conversations -------------------------------------------------------

def normalise(source: str, rows: list, layout: Layout) -> list[dict]:
    if not rows:
        return []
    formatting = layout.formatting or _detect(source, rows[0])
    convert = {"alpaca": _alpaca, "prompt_completion": _prompt_completion, "text": _text,
               "sharegpt": lambda row, lay: _conversation(row, lay.columns.get("messages", "conversations"), lay),
               "messages": lambda row, lay: _conversation(row, "messages", lay)}[formatting]
    out = []
    for n, row in enumerate(rows, 1):
        try:
            if not isinstance(row, dict):
                raise BadRow(f"expected an object with named fields, got {type(row).__name__}")
            normalised = convert(row, layout)
        except BadRow as bad:
            raise LlmneoError(f"{source} row {n}: {bad}") from None
        if normalised is not None:
            out.append(normalised)
    return out


def _detect(source: str, first_row) -> str:
    keys = set(first_row) if isinstance(first_row, dict) else set()
    if "messages" in keys:
        return "messages"
    if "conversations" in keys:
        return "sharegpt"
    if "instruction" in keys or "output" in keys:
        return "alpaca"
    if {"prompt", "completion"} <= keys:
        return "prompt_completion"
    if "text" in keys:
        return "text"
    found = ", ".join(sorted(map(str, keys))) or "none"
    raise LlmneoError(f"{source}: unknown data format, columns found: {found}; expected alpaca (instruction, "
                      f"input, output), sharegpt (conversations), messages (messages), prompt/completion "
                      f"(prompt, completion) or text (text)")


def _content(value):
    """A turn's text: a string, or OpenAI-style content parts [{"type": "text", "text": ...}]."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(p, dict) and isinstance(p.get("text"), str) for p in value):
        return "".join(p["text"] for p in value)
    return None


def _alpaca(row: dict, layout: Layout) -> dict:
    cols = {"prompt": "instruction", "query": "input", "response": "output", "system": "system",
            "history": "history", **layout.columns}
    need = f"(alpaca format needs {cols['prompt']} and {cols['response']})"
    instruction, response = row.get(cols["prompt"]), row.get(cols["response"])
    for column, value in ((cols["prompt"], instruction), (cols["response"], response)):
        if value is None:
            raise BadRow(f"missing '{column}' {need}")
        if not isinstance(value, str):
            raise BadRow(f"'{column}' must be a string, got {type(value).__name__}")
    if not response.strip():
        raise BadRow(f"empty '{cols['response']}' (the response to train on)")
    query = row.get(cols["query"]) or ""
    if not isinstance(query, str):
        raise BadRow(f"'{cols['query']}' must be a string, got {type(query).__name__}")
    messages = []
    system = row.get(cols["system"])
    if isinstance(system, str) and system.strip():
        messages.append({"role": "system", "content": system})
    history = row.get(cols["history"]) or []
    if not (isinstance(history, list) and all(isinstance(pair, (list, tuple)) and len(pair) == 2
                                              and all(isinstance(t, str) for t in pair) for pair in history)):
        raise BadRow(f"'{cols['history']}' must be a list of [user, assistant] string pairs")
    for user, assistant in history:
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    user = f"{instruction}\n{query}" if query.strip() else instruction
    messages += [{"role": "user", "content": user}, {"role": "assistant", "content": response}]
    return {"messages": messages}


def _prompt_completion(row: dict, layout: Layout) -> dict:
    prompt, completion = row.get("prompt"), row.get("completion")
    if isinstance(prompt, list) and isinstance(completion, list):
        return _conversation({**row, "prompt + completion": prompt + completion}, "prompt + completion", layout)
    if not isinstance(prompt, str) or not isinstance(completion, str):
        raise BadRow("'prompt' and 'completion' must both be strings or both be lists of messages")
    if not completion.strip():
        raise BadRow("empty 'completion' (the response to train on)")
    return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]}


def _text(row: dict, layout: Layout) -> dict | None:
    text = row.get("text")
    if text is not None and not isinstance(text, str):
        raise BadRow(f"'text' must be a string, got {type(text).__name__}")
    return {"text": text} if text and text.strip() else None  # blank lines teach nothing: skip them


def _conversation(row: dict, column: str, layout: Layout) -> dict:
    """row[column]'s turns → [system?, user, assistant, ...], checking they alternate and end with a reply."""
    turns = row.get(column)
    if not isinstance(turns, list) or not turns:
        raise BadRow(f"missing '{column}' (a non-empty list of turns)")
    tags = layout.tags
    roles = dict(_ROLES)
    for tag, role in (("user_tag", "user"), ("assistant_tag", "assistant"), ("system_tag", "system"),
                      ("observation_tag", "user"), ("function_tag", "assistant")):
        if tag in tags:
            roles[tags[tag]] = role
    messages: list[dict] = []
    expected = "user"
    for k, turn in enumerate(turns, 1):
        if not isinstance(turn, dict):
            raise BadRow(f"turn {k} of '{column}' is not an object")
        role_key = tags.get("role_tag") or ("role" if "role" in turn else "from")
        content_key = tags.get("content_tag") or ("content" if "content" in turn else "value")
        raw_role, content = turn.get(role_key), _content(turn.get(content_key))
        role = roles.get(raw_role) if isinstance(raw_role, str) else None
        if role is None:
            raise BadRow(f"turn {k} of '{column}' has role '{raw_role}' (key '{role_key}'); expected one of "
                          f"{', '.join(roles)}")
        if content is None:
            raise BadRow(f"turn {k} of '{column}' has no text in '{content_key}'")
        if role == "system" and k == 1:
            messages.append({"role": "system", "content": content})
            continue
        if role != expected:
            raise BadRow(f"turn {k} of '{column}' is '{raw_role}' where a {expected} turn was expected; turns "
                          f"must alternate user, assistant after an optional first system turn")
        if role == "assistant" and not content.strip():
            raise BadRow(f"turn {k} of '{column}' is an empty assistant response")
        messages.append({"role": role, "content": content})
        expected = "assistant" if role == "user" else "user"
    if not any(m["role"] == "assistant" for m in messages):
        raise BadRow(f"no assistant turn in '{column}' (a conversation needs a response to train on)")
    if expected == "assistant":
        raise BadRow(f"'{column}' ends with a user turn; a conversation must end with an assistant response")
    system = row.get(layout.columns.get("system", "system"))
    if isinstance(system, str) and system.strip() and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system})
    return {"messages": messages}
