"""Tool-calling data shaped like LLaMA-Factory's glaive_toolcall_en_demo: schemas, calls, results, masks."""

from __future__ import annotations

import json
import warnings

import pytest

from llmneo.config.schema import Config
from llmneo.data import dataset as data
from llmneo.data import sources
from llmneo.demo import tiny
from llmneo.errors import LlmneoError

IGNORE = -100

# Modelled on Qwen2.5's chat template: tools listed in the system turn, calls as <tool_call> JSON,
# results in a user turn as <tool_response> (consecutive results share one turn).
QWEN_TOOLS_TEMPLATE = (
    "{%- if tools %}{{- '<|im_start|>system\\n' }}"
    "{%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] }}"
    "{%- else %}{{- 'You are a helpful assistant.' }}{%- endif %}"
    "{{- '\\n\\n# Tools\\n\\n<tools>' }}{%- for tool in tools %}{{- '\\n' }}{{- tool | tojson }}{%- endfor %}"
    "{{- '\\n</tools><|im_end|>\\n' }}"
    "{%- elif messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'user' or (message.role == 'assistant' and not message.tool_calls) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- elif message.role == 'assistant' %}{{- '<|im_start|>assistant' }}"
    "{%- if message.content %}{{- '\\n' + message.content }}{%- endif %}"
    "{%- for tool_call in message.tool_calls %}"
    "{%- if tool_call.function is defined %}{%- set tool_call = tool_call.function %}{%- endif %}"
    "{{- '\\n<tool_call>\\n{\"name\": \"' }}{{- tool_call.name }}{{- '\", \"arguments\": ' }}"
    "{{- tool_call.arguments | tojson }}{{- '}\\n</tool_call>' }}{%- endfor %}{{- '<|im_end|>\\n' }}"
    "{%- elif message.role == 'tool' %}"
    "{%- if loop.index0 == 0 or messages[loop.index0 - 1].role != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}"
    "{{- '\\n<tool_response>\\n' }}{{- message.content }}{{- '\\n</tool_response>' }}"
    "{%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}{{- '<|im_end|>\\n' }}{%- endif %}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

AREA = {"name": "calculate_area", "description": "Calculate the area of a given shape",
        "parameters": {"type": "object", "properties": {
            "shape": {"type": "string", "description": "The shape"},
            "dimensions": {"type": "array", "items": {"type": "number"}, "description": "The dimensions"}},
            "required": ["shape", "dimensions"]}}
DISCOUNT = {"name": "calculate_discount", "description": "Calculate the discounted price",
            "parameters": {"type": "object", "properties": {"price": {"type": "number"}}, "required": ["price"]}}
GLAIVE_ROW = {  # as in glaive_toolcall_en_demo.json: tools is a JSON *string*
    "conversations": [
        {"from": "human", "value": "Area of a 5 by 3 rectangle?"},
        {"from": "function_call", "value": json.dumps({"name": "calculate_area",
                                                       "arguments": {"shape": "rectangle", "dimensions": [5, 3]}})},
        {"from": "observation", "value": "{\"area\": 15}"},
        {"from": "gpt", "value": "The area is 15."}],
    "tools": json.dumps([AREA, DISCOUNT])}
PLAIN_ROW = {"conversations": [{"from": "human", "value": "Say hello."}, {"from": "gpt", "value": "Hello there!"}],
             "tools": "[]"}
CALL_TEXT = '{"name": "calculate_area", "arguments": {"shape": "rectangle", "dimensions": [5, 3]}}'


def registered(tmp_path, rows) -> Config:
    (tmp_path / "glaive.json").write_text(json.dumps(rows, indent=1))
    entry = {"file_name": "glaive.json", "formatting": "sharegpt",
             "columns": {"messages": "conversations", "tools": "tools"}}  # as in LLaMA-Factory's dataset_info.json
    (tmp_path / "dataset_info.json").write_text(json.dumps({"glaive_toolcall_en_demo": entry}))
    return Config(dataset="glaive_toolcall_en_demo", dataset_dir=str(tmp_path))


def split(tok, example) -> tuple[str, str]:
    """(the decoded labelled tokens, the decoded unlabelled tokens), after checking labels copy input_ids."""
    assert all(label in (IGNORE, token) for token, label in zip(example["input_ids"], example["labels"]))
    pairs = list(zip(example["input_ids"], example["labels"]))
    return (tok.decode([t for t, label in pairs if label != IGNORE]),
            tok.decode([t for t, label in pairs if label == IGNORE]))


def test_rows_normalise_to_the_hf_tool_calling_shape(tmp_path):
    [(_, [tooled, plain])] = sources.load_rows(registered(tmp_path, [GLAIVE_ROW, PLAIN_ROW]))
    assert tooled["tools"] == [{"type": "function", "function": AREA}, {"type": "function", "function": DISCOUNT}]
    assert tooled["messages"] == [
        {"role": "user", "content": "Area of a 5 by 3 rectangle?"},
        {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {
            "name": "calculate_area", "arguments": {"shape": "rectangle", "dimensions": [5, 3]}}}]},
        {"role": "tool", "content": "{\"area\": 15}"},
        {"role": "assistant", "content": "The area is 15."}]
    assert "tools" not in plain  # "[]": no tools


def test_a_tools_aware_chat_template_renders_schemas_calls_and_results(tmp_path):
    tok = tiny.build_tokenizer(chat_template=QWEN_TOOLS_TEMPLATE)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a tools-aware template needs no fallback
        [example, _] = data.build(registered(tmp_path, [GLAIVE_ROW, PLAIN_ROW]), tok).train
    text = tok.decode(example["input_ids"])
    assert '<tools>\n{"type": "function", "function": {"name": "calculate_area", "description": ' in text
    assert '"name": "calculate_discount"' in text
    trained, prompt = split(tok, example)
    assert trained == f"<tool_call>\n{CALL_TEXT}\n</tool_call><|im_end|>The area is 15.<|im_end|>"
    assert "<tool_response>\n{\"area\": 15}\n</tool_response>" in prompt and "calculate_discount" in prompt


def test_a_builtin_template_puts_schemas_in_the_system_prompt_and_calls_as_text(tmp_path):
    tok = tiny.build_tokenizer(chat_template=None)
    config = registered(tmp_path, [GLAIVE_ROW])
    [example] = data.build(config, tok).train
    text = tok.decode(example["input_ids"])
    assert text.startswith("<s>System: You can call the following tools")
    assert json.dumps(AREA) in text and json.dumps(DISCOUNT) in text
    trained, prompt = split(tok, example)
    call = 'Action: calculate_area\nAction Input: {"shape": "rectangle", "dimensions": [5, 3]}'
    assert trained.split() == f"{call}</s>The area is 15.</s>".split()
    assert 'Human: Observation: {"area": 15}\n' in prompt and json.dumps(AREA) in prompt


def test_a_chat_template_that_ignores_tools_falls_back_to_text_with_one_warning(tmp_path):
    tok = tiny.build_tokenizer()  # plain ChatML: renders every message's content, knows nothing of tools
    with pytest.warns(UserWarning, match="ignores tool schemas, tool calls or tool results in 2 examples") as caught:
        examples = data.build(registered(tmp_path, [GLAIVE_ROW, GLAIVE_ROW, PLAIN_ROW]), tok).train
    assert len([w for w in caught if "tool" in str(w.message)]) == 1
    text = tok.decode(examples[0]["input_ids"])
    assert "<|im_start|>system\nYou can call the following tools" in text and json.dumps(AREA) in text
    trained, prompt = split(tok, examples[0])
    assert trained == ('Action: calculate_area\nAction Input: {"shape": "rectangle", "dimensions": [5, 3]}'
                       '<|im_end|>The area is 15.<|im_end|>')
    assert '<|im_start|>user\nObservation: {"area": 15}<|im_end|>' in prompt
    assert split(tok, examples[2])[0] == "Hello there!<|im_end|>"  # rows without tools are untouched


def test_parallel_calls_in_one_function_call_turn(tmp_path):
    calls = [{"name": "calculate_area", "arguments": {"shape": "square", "dimensions": [7]}},
             {"name": "calculate_discount", "arguments": "{\"price\": 10}"}]  # string arguments are read as JSON
    row = {"conversations": [
        {"from": "human", "value": "Both, please."},
        {"from": "function_call", "value": json.dumps(calls)},
        {"from": "observation", "value": "{\"area\": 49}, {\"price\": 9}"},
        {"from": "gpt", "value": "49 and 9."}], "tools": json.dumps([AREA, DISCOUNT])}
    tok = tiny.build_tokenizer(chat_template=QWEN_TOOLS_TEMPLATE)
    [example] = data.build(registered(tmp_path, [row]), tok).train
    trained, _ = split(tok, example)
    assert trained == ('<tool_call>\n{"name": "calculate_area", "arguments": {"shape": "square", "dimensions": [7]}}'
                       '\n</tool_call>\n<tool_call>\n{"name": "calculate_discount", "arguments": {"price": 10}}\n'
                       '</tool_call><|im_end|>49 and 9.<|im_end|>')


def test_openai_messages_with_tool_calls_and_several_tool_results(tmp_path):
    row = {"messages": [
        {"role": "user", "content": "Two areas?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "a", "type": "function", "function": {"name": "calculate_area", "arguments": "{\"shape\": \"a\"}"}},
            {"id": "b", "type": "function", "function": {"name": "calculate_area", "arguments": {"shape": "b"}}}]},
        {"role": "tool", "tool_call_id": "a", "content": "1"},
        {"role": "tool", "tool_call_id": "b", "content": "2"},
        {"role": "assistant", "content": "1 and 2."}], "tools": [AREA], "id": 7}
    (tmp_path / "openai.jsonl").write_text(json.dumps(row) + "\n")
    tok = tiny.build_tokenizer(chat_template=QWEN_TOOLS_TEMPLATE)
    [example] = data.build(Config(dataset=str(tmp_path / "openai.jsonl")), tok).train
    trained, prompt = split(tok, example)
    assert trained.count("<tool_call>") == 2 and trained.endswith("1 and 2.<|im_end|>")
    assert "<|im_start|>user\n<tool_response>\n1\n</tool_response>\n<tool_response>\n2\n</tool_response>" in prompt


@pytest.mark.parametrize("change, needle", [
    ({"tools": "[{oops"}, "row 1: 'tools' must be a JSON list of tool schemas"),
    ({"tools": json.dumps([{"description": "no name"}])}, "every tool needs a name"),
    ({"conversations": [{"from": "human", "value": "hi"}, {"from": "function_call", "value": "get_weather()"}]},
     "row 1: turn 2 of 'conversations' has tool calls that cannot be read"),
    ({"conversations": [{"from": "human", "value": "hi"}, {"from": "observation", "value": "{}"}]},
     "turn 2 of 'conversations' is 'observation' where a assistant turn was expected"),
])
def test_malformed_tool_rows_are_one_line_errors(tmp_path, change, needle):
    with pytest.raises(LlmneoError) as info:
        sources.load_rows(registered(tmp_path, [{**GLAIVE_ROW, **change}]))
    assert needle in str(info.value) and "\n" not in str(info.value)

