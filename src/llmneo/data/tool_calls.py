"""Tool-calling data: tool schemas and calls as chat templates take them, and a text form for the rest.

Datasets give tools the way LLaMA-Factory's glaive demo does: a `tools` column holding a JSON list of
{name, description, parameters}, and sharegpt turns `function_call` (a JSON {name, arguments}, or a
list of them for parallel calls) and `observation` (the tool's result). OpenAI-style `messages` with
assistant `tool_calls` and `tool` turns are read too. Rows are normalised to what HF chat templates
expect: `tools=[{"type": "function", "function": {...}}]`, assistant messages with
`tool_calls=[{"type": "function", "function": {"name", "arguments": dict}}]`, and role `tool`.

A tokenizer chat template that renders them (Qwen2.5, Llama 3.1, Mistral, ...) is used as it is. For
built-in templates, and for a tokenizer template that ignores tools or tool calls (detected by
rendering, see `honoured`), the conversation is rewritten into plain turns, as LLaMA-Factory does for
its templates: the schemas go into the system prompt, each call becomes assistant text
`Action: NAME` / `Action Input: {JSON arguments}`, and each tool result a user turn `Observation: ...`.
Calls are targets either way; tool results never are.
"""

from __future__ import annotations

import json

TOOL_PROMPT = (
    "You can call the following tools, described as JSON schemas:\n{schemas}\n"
    "To call a tool, answer with a line `Action: ` and the tool's name, then a line `Action Input: ` and "
    "the arguments as a JSON object; one such pair per call."
)


def parse_tools(value) -> list[dict]:
    """Tool schemas from a `tools` cell (a JSON string, a list, or one schema), wrapped as HF templates want.

    Raises ValueError saying what is wrong; an empty cell ("", "[]", None) means no tools.
    """
    if value is None or (isinstance(value, str) and not value.strip()):
        return []
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise ValueError(f"invalid JSON ({exc.msg})") from None
    schemas = [value] if isinstance(value, dict) else value
    if not isinstance(schemas, list):
        raise ValueError(f"expected a list of tool schemas, got {type(value).__name__}")
    wrapped = []
    for schema in schemas:
        function = schema.get("function") if isinstance(schema, dict) and schema.get("type") == "function" else schema
        if not (isinstance(function, dict) and isinstance(function.get("name"), str) and function["name"]):
            raise ValueError("every tool needs a name: {name, description, parameters}")
        wrapped.append({"type": "function", "function": function})
    return wrapped


def parse_calls(value) -> list[dict]:
    """Tool calls from a function_call turn (JSON {name, arguments} or a list) or an OpenAI `tool_calls` list.

    Arguments given as a JSON string become a dict, which is what chat templates render (`| tojson`).
    """
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise ValueError(f"invalid JSON ({exc.msg}); expected {{\"name\": ..., \"arguments\": {{...}}}} or a "
                             f"list of them") from None
    calls = [value] if isinstance(value, dict) else value
    if not isinstance(calls, list) or not calls:
        raise ValueError("expected {\"name\": ..., \"arguments\": {...}} or a non-empty list of them")
    parsed = []
    for call in calls:
        function = call.get("function") if isinstance(call, dict) and "function" in call else call
        if not (isinstance(function, dict) and isinstance(function.get("name"), str) and function["name"]):
            raise ValueError("every call needs a name: {\"name\": ..., \"arguments\": {...}}")
        arguments = function.get("arguments", function.get("parameters", {}))
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments) if arguments.strip() else {}
            except json.JSONDecodeError:
                pass  # kept as written: templates print a string argument as it is
        parsed.append({"type": "function", "function": {"name": function["name"], "arguments": arguments}})
    return parsed


def involved(messages: list[dict], tools: list[dict] | None) -> bool:
    """Whether a conversation has anything a template must render specially: schemas, calls or results."""
    return bool(tools) or any(m.get("tool_calls") or m["role"] == "tool" for m in messages)


def honoured(render, messages: list[dict], tools: list[dict] | None) -> bool:
    """Whether a chat template renders the tool schemas, the calls and the results it is given.

    `render(messages, tools)` returns the template's text. A template that ignores `tools` renders the
    same with and without them; one that ignores `tool_calls` renders the same when they are removed;
    one that drops `tool` turns loses their text.
    """
    full = render(messages, tools)
    if tools and render(messages, None) == full:
        return False
    if any(m.get("tool_calls") for m in messages):
        without_calls = [{k: v for k, v in m.items() if k != "tool_calls"} for m in messages]
        if render(without_calls, tools) == full:
            return False
    # Some templates (Llama 3.1) print a result through `tojson`, quoted and escaped.
    return all(m["content"] in full or json.dumps(m["content"], ensure_ascii=False) in full
               or json.dumps(m["content"]) in full for m in messages if m["role"] == "tool")


def as_text(messages: list[dict], tools: list[dict] | None) -> list[dict]:
    """The conversation in plain system/user/assistant turns: schemas in the system prompt, calls as text."""
    out: list[dict] = []
    for message in messages:
        if message["role"] == "tool":
            observation = f"Observation: {message['content']}"
            if out and out[-1].get("tool_result"):  # parallel results: one user turn
                out[-1]["content"] += "\n" + observation
            else:
                out.append({"role": "user", "content": observation, "tool_result": True})
        elif message.get("tool_calls"):
            calls = "\n".join(f"Action: {call['function']['name']}\nAction Input: {_arguments(call)}"
                              for call in message["tool_calls"])
            text = f"{message['content']}\n{calls}" if message["content"].strip() else calls
            out.append({"role": "assistant", "content": text})
        else:
            out.append({"role": message["role"], "content": message["content"]})
    for message in out:
        message.pop("tool_result", None)
    if tools:
        prompt = TOOL_PROMPT.format(schemas="\n".join(json.dumps(t["function"], ensure_ascii=False) for t in tools))
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": f"{out[0]['content']}\n\n{prompt}"}
        else:
            out.insert(0, {"role": "system", "content": prompt})
    return out


def _arguments(call: dict) -> str:
    arguments = call["function"]["arguments"]
    return arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
