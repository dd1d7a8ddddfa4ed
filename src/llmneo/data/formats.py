"""Row formats: normalise alpaca, sharegpt, messages, prompt/completion and text rows to conversations.

Every conversation becomes {"messages": [system?, user, assistant, ...], "tools"?: [...]}; a text row
becomes {"text": ...}. A row that cannot is an error naming the file, the row (1-based) and the field.

Turns alternate a user side (user, or tool results: sharegpt `observation`, OpenAI `tool`) and an
assistant side (a reply, or tool calls: sharegpt `function_call`, OpenAI `tool_calls`); see
`llmneo.data.tool_calls` for how tool turns are rendered.

What llmneo cannot train on is refused, never dropped: multimodal data (`images` / `videos` / `audios`
fields or columns, `<image>` / `<video>` / `<audio>` placeholders in turns), preference data (`chosen` /
`rejected`) and KTO data (`kto_tag`, a boolean `label`). Other extra fields (`id`, `source`, ...) are
metadata and are ignored.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from llmneo.data import tool_calls as tool_data
from llmneo.errors import LlmneoError

_ROLES = {"system": "system", "user": "user", "human": "user", "observation": "tool", "tool": "tool",
          "assistant": "assistant", "gpt": "assistant", "model": "assistant", "function_call": "function_call"}
_ASSISTANT_SIDE = ("assistant", "function_call")

# LLaMA-Factory's dataset_info.json `columns` that llmneo reads, per formatting, and `tags`.
COLUMNS = {"alpaca": ("prompt", "query", "response", "system", "history", "tools"),
           "sharegpt": ("messages", "system", "tools")}
TAGS = ("role_tag", "content_tag", "user_tag", "assistant_tag", "observation_tag", "function_tag", "system_tag")

# Columns and row fields whose meaning llmneo cannot honour: what they hold.
UNSUPPORTED = {"images": "image inputs (multimodal data)", "videos": "video inputs (multimodal data)",
               "audios": "audio inputs (multimodal data)", "chosen": "a preferred response (preference data)",
               "rejected": "a rejected response (preference data)",
               "kto_tag": "KTO's desirable/undesirable tag (KTO data)"}
_PLACEHOLDERS = ("<image>", "<video>", "<audio>")
_MEDIA_PARTS = ("image", "image_url", "video", "video_url", "audio", "input_audio")
SUPPORTED = ("llmneo distils on text-only supervised data (alpaca, sharegpt with optional tools, messages, "
             "prompt/completion) or raw text")


@dataclass
class Layout:
    """How a dataset's rows are laid out: LLaMA-Factory's `formatting`, `columns` and `tags`."""
    formatting: str | None = None  # None: detect from the columns
    columns: dict = field(default_factory=dict)
    tags: dict = field(default_factory=dict)

    def check(self, where: str) -> None:
        """Refuse registry columns and tags that llmneo would not use (they would silently change nothing)."""
        allowed = COLUMNS[self.formatting]
        for key in self.columns:
            if key in UNSUPPORTED:
                raise LlmneoError(f"{where}: column '{key}' holds {UNSUPPORTED[key]}, which llmneo does not "
                                  f"support: {SUPPORTED}; use a dataset without it")
            if key not in allowed:
                raise LlmneoError(f"{where}: column '{key}' is not used by {self.formatting} datasets in llmneo; "
                                  f"{self.formatting} columns are {', '.join(allowed)}; remove or rename it")
        for key in self.tags:
            if key not in TAGS:
                raise LlmneoError(f"{where}: tag '{key}' is unknown; tags are {', '.join(TAGS)}")


class BadRow(Exception):
    """One row's problem; `_normalise` adds the file and row number."""


# --- normalising rows to conversations -------------------------------------------------------

def normalise(source: str, rows: list, layout: Layout, route: str | None = None) -> list[dict]:
    """Rows as conversations (or text); with `route`, each keeps that column's value as "route" (which
    teacher it goes to), and a row without it is an error."""
    if not rows:
        return []
    formatting = layout.formatting or _detect(source, rows[0])
    if layout.formatting == "alpaca" and _is_text_registration(rows[0], layout):
        formatting = "text"
    convert = {"alpaca": _alpaca, "prompt_completion": _prompt_completion, "text": _text,
               "sharegpt": lambda row, lay: _conversation(row, lay.columns.get("messages", "conversations"), lay),
               "messages": lambda row, lay: _conversation(row, "messages", lay)}[formatting]
    out = []
    for n, row in enumerate(rows, 1):
        try:
            if not isinstance(row, dict):
                raise BadRow(f"expected an object with named fields, got {type(row).__name__}")
            _refuse_unsupported_fields(row, layout)
            normalised = convert(row, layout)
            if normalised is not None and "messages" in normalised:
                _refuse_placeholders(normalised["messages"])
            if route is not None and normalised is not None:
                if row.get(route) is None:
                    raise BadRow(f"has no '{route}' (teacher_column): every row must name its teacher")
                normalised["route"] = row[route]
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


def _is_text_registration(first_row, layout: Layout) -> bool:
    """LLaMA-Factory registers raw text as alpaca with only a prompt column (`columns: {prompt: text}`)."""
    if not isinstance(first_row, dict) or "response" in layout.columns or "output" in first_row:
        return False
    return layout.columns.get("prompt", "text") in first_row


def _refuse_unsupported_fields(row: dict, layout: Layout) -> None:
    used = set(layout.columns.values())
    for name, what in UNSUPPORTED.items():
        value = row.get(name)
        empty = value is None or (isinstance(value, (str, list, tuple, dict)) and not value)
        if not empty and name not in used:
            raise BadRow(f"field '{name}' holds {what}, which llmneo does not support: {SUPPORTED}; remove the "
                         f"field or use another dataset")
    if isinstance(row.get("label"), bool) and "label" not in used:
        raise BadRow(f"field 'label' is a KTO desirable/undesirable tag (KTO data), which llmneo does not "
                     f"support: {SUPPORTED}; remove the field or use another dataset")


def _refuse_placeholders(messages: list[dict]) -> None:
    for k, message in enumerate(messages, 1):
        for placeholder in _PLACEHOLDERS:
            if placeholder in message["content"]:
                raise BadRow(f"message {k} has a {placeholder} placeholder (multimodal data), which llmneo does "
                             f"not support: {SUPPORTED}; use text-only rows")


def _content(value):
    """A turn's text: a string, or OpenAI-style content parts [{"type": "text", "text": ...}]."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(p, dict) and isinstance(p.get("text"), str) for p in value):
        return "".join(p["text"] for p in value)
    parts = value if isinstance(value, list) else []
    media = next((p["type"] for p in parts if isinstance(p, dict) and p.get("type") in _MEDIA_PARTS), None)
    if media:
        raise BadRow(f"a turn has a '{media}' content part (multimodal data), which llmneo does not support: "
                     f"{SUPPORTED}; use text-only rows")
    return None


def _tools(row: dict, layout: Layout) -> list[dict]:
    column = layout.columns.get("tools", "tools")
    try:
        return tool_data.parse_tools(row.get(column))
    except ValueError as exc:
        raise BadRow(f"'{column}' must be a JSON list of tool schemas {{name, description, parameters}}: "
                     f"{exc}") from None


def _with_tools(messages: list[dict], row: dict, layout: Layout) -> dict:
    schemas = _tools(row, layout)
    return {"messages": messages, "tools": schemas} if schemas else {"messages": messages}


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
    return _with_tools(messages, row, layout)


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
    # Raw text: a `text` field, or LLaMA-Factory's registration `columns: {prompt: text}` (its query, if
    # mapped, follows on a new line, as LLaMA-Factory's pretraining reads it).
    parts = []
    for column in (layout.columns.get("prompt", "text"), layout.columns.get("query")):
        value = row.get(column) if column else None
        if value is not None and not isinstance(value, str):
            raise BadRow(f"'{column}' must be a string, got {type(value).__name__}")
        if value and value.strip():
            parts.append(value)
    return {"text": "\n".join(parts)} if parts else None  # blank lines teach nothing: skip them


def _conversation(row: dict, column: str, layout: Layout) -> dict:
    """row[column]'s turns → [system?, user, assistant, ...], checking they alternate and end with a reply."""
    turns = row.get(column)
    if not isinstance(turns, list) or not turns:
        raise BadRow(f"missing '{column}' (a non-empty list of turns)")
    tags = layout.tags
    roles = dict(_ROLES)
    for tag, role in (("user_tag", "user"), ("assistant_tag", "assistant"), ("system_tag", "system"),
                      ("observation_tag", "tool"), ("function_tag", "function_call")):
        if tag in tags:
            roles[tags[tag]] = role
    messages: list[dict] = []
    expected = "user"  # the side whose turn it is: user (user, tool results) or assistant (replies, calls)
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
        calls = turn.get("tool_calls") if role == "assistant" else None  # OpenAI style
        if content is None and not calls:
            raise BadRow(f"turn {k} of '{column}' has no text in '{content_key}'")
        if role == "system" and k == 1:
            messages.append({"role": "system", "content": content})
            continue
        side = "assistant" if role in _ASSISTANT_SIDE else "user"
        parallel_result = role == "tool" and messages and messages[-1]["role"] == "tool"
        if side != expected and not parallel_result:
            raise BadRow(f"turn {k} of '{column}' is '{raw_role}' where a {expected} turn was expected; turns "
                          f"must alternate user, assistant after an optional first system turn (observation "
                          f"and tool turns count as user turns, function_call as assistant)")
        if role == "function_call" or calls:
            try:
                parsed = tool_data.parse_calls(content if role == "function_call" else calls)
            except ValueError as exc:
                raise BadRow(f"turn {k} of '{column}' has tool calls that cannot be read: {exc}") from None
            text = "" if role == "function_call" else (content or "")
            messages.append({"role": "assistant", "content": text, "tool_calls": parsed})
        else:
            if role == "assistant" and not content.strip():
                raise BadRow(f"turn {k} of '{column}' is an empty assistant response")
            messages.append({"role": role, "content": content})
        expected = "assistant" if side == "user" else "user"
    if not any(m["role"] == "assistant" for m in messages):
        raise BadRow(f"no assistant turn in '{column}' (a conversation needs a response to train on)")
    if expected == "assistant":
        raise BadRow(f"'{column}' ends with a user turn; a conversation must end with an assistant response")
    system = row.get(layout.columns.get("system", "system"))
    if isinstance(system, str) and system.strip() and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system})
    return _with_tools(messages, row, layout)
