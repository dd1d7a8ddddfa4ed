"""Data llmneo cannot train on is a one-line error, never silently trained: multimodal, KTO, preference
data, registry columns it would not use, and files that are not UTF-8 text."""

from __future__ import annotations

import json
import random

import pytest
import yaml

from llmneo import cli
from llmneo.config.schema import Config
from llmneo.data import dataset as data
from llmneo.data import sources
from llmneo.errors import LlmneoError

ROLE_TAGS = {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"}
MLLM_ROW = {  # as in LLaMA-Factory's data/mllm_demo.json
    "messages": [{"content": "<image>Who are they?", "role": "user"},
                 {"content": "They're Kane and Gretzka from Bayern Munich.", "role": "assistant"},
                 {"content": "What are they doing?<image>", "role": "user"},
                 {"content": "They are celebrating on the soccer field.", "role": "assistant"}],
    "images": ["mllm_demo_data/1.jpg", "mllm_demo_data/1.jpg"]}
KTO_ROWS = [  # as in LLaMA-Factory's data/kto_en_demo.json: label false marks an undesirable reply
    {"messages": [{"content": "Say hello.", "role": "user"}, {"content": "Hello there!", "role": "assistant"}],
     "label": True},
    {"messages": [{"content": "Say hello.", "role": "user"}, {"content": "Go away.", "role": "assistant"}],
     "label": False}]
REGISTRY = {
    "mllm_demo": {"file_name": "mllm_demo.json", "formatting": "sharegpt",
                  "columns": {"messages": "messages", "images": "images"}, "tags": ROLE_TAGS},
    "mllm_text_only_registration": {"file_name": "mllm_demo.json", "formatting": "sharegpt",
                                    "columns": {"messages": "messages"}, "tags": ROLE_TAGS},
    "kto_en_demo": {"file_name": "kto_en_demo.json", "formatting": "sharegpt",
                    "columns": {"messages": "messages", "kto_tag": "label"}, "tags": ROLE_TAGS},
    "kto_without_kto_tag": {"file_name": "kto_en_demo.json", "formatting": "sharegpt",
                            "columns": {"messages": "messages"}, "tags": ROLE_TAGS},
    "typo": {"file_name": "kto_en_demo.json", "formatting": "sharegpt", "columns": {"mesages": "messages"}},
    "bad_tag": {"file_name": "kto_en_demo.json", "formatting": "sharegpt", "tags": {"role": "role"}},
    "sampled": {"file_name": "kto_en_demo.json", "formatting": "sharegpt", "num_samples": 100, "tags": ROLE_TAGS},
}


@pytest.fixture
def data_dir(tmp_path):
    (tmp_path / "mllm_demo.json").write_text(json.dumps([MLLM_ROW], indent=2))
    (tmp_path / "kto_en_demo.json").write_text(json.dumps(KTO_ROWS, indent=2))
    (tmp_path / "dataset_info.json").write_text(json.dumps(REGISTRY, indent=2))
    return tmp_path


def error(dataset, data_dir) -> str:
    with pytest.raises(LlmneoError) as info:
        sources.load_rows(Config(dataset=dataset, dataset_dir=str(data_dir)))
    message = str(info.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("dataset, needles", [
    ("mllm_demo", ["entry 'mllm_demo'", "column 'images'", "multimodal", "sharegpt"]),
    ("mllm_text_only_registration", ["mllm_demo.json row 1: field 'images'", "multimodal"]),
    ("mllm_demo.json", ["mllm_demo.json row 1: field 'images'", "multimodal"]),
    ("kto_en_demo", ["entry 'kto_en_demo'", "column 'kto_tag'", "KTO"]),
    ("kto_without_kto_tag", ["kto_en_demo.json row 1: field 'label'", "KTO"]),
    ("kto_en_demo.json", ["kto_en_demo.json row 1: field 'label'", "KTO"]),
    ("typo", ["entry 'typo'", "column 'mesages' is not used", "messages, system, tools"]),
    ("bad_tag", ["entry 'bad_tag'", "tag 'role' is unknown", "role_tag"]),
    ("sampled", ["entry 'sampled'", "num_samples", "max_samples"]),
])
def test_unsupported_registrations_and_rows_name_what_and_say_what_is_supported(data_dir, dataset, needles):
    message = error(dataset, data_dir)
    assert all(needle in message for needle in needles), message
    if "is not used" not in message and "tag" not in message and "num_samples" not in message:
        assert "llmneo distils on text-only supervised data" in message


@pytest.mark.parametrize("row, needle", [
    ({"messages": [{"role": "user", "content": "<image>Who?"}, {"role": "assistant", "content": "Kane."}]},
     "message 1 has a <image> placeholder"),
    ({"instruction": "Describe <video>", "output": "A goal."}, "message 1 has a <video> placeholder"),
    ({"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "<audio>"}]},
     "message 2 has a <audio> placeholder"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x.png"}},
                                                {"type": "text", "text": "Who?"}]},
                   {"role": "assistant", "content": "Kane."}]}, "'image_url' content part"),
    ({"instruction": "Which is better?", "chosen": "This.", "rejected": "That."}, "field 'chosen'"),
    ({"instruction": "Hi", "output": "Yo", "videos": ["clip.mp4"]}, "field 'videos'"),
    ({"instruction": "Hi", "output": "Yo", "audios": ["a.wav"]}, "field 'audios'"),
    ({"instruction": "Hi", "output": "Yo", "kto_tag": False}, "field 'kto_tag'"),
])
def test_unsupported_rows_are_errors(tmp_path, row, needle):
    (tmp_path / "rows.jsonl").write_text(json.dumps(row) + "\n")
    message = error(str(tmp_path / "rows.jsonl"), tmp_path)
    assert "rows.jsonl row 1" in message and needle in message, message


def test_harmless_metadata_fields_still_load(tmp_path):
    rows = [{"id": 1, "source": "web", "label": "greeting", "images": [], "instruction": "Say hello.",
             "output": "Hello there!"},
            {"id": "b", "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]}]
    (tmp_path / "a.jsonl").write_text(json.dumps(rows[0]) + "\n")
    (tmp_path / "b.jsonl").write_text(json.dumps(rows[1]) + "\n")
    loaded = sources.load_rows(Config(dataset="a.jsonl,b.jsonl", dataset_dir=str(tmp_path)))
    assert [len(rows) for _, rows in loaded] == [1, 1]


def test_the_cli_refuses_kto_data_with_one_line_and_exit_2(tmp_path, data_dir, base_overrides, capsys):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({**base_overrides, "dataset": "kto_en_demo", "dataset_dir": str(data_dir)}))
    assert cli.main(["train", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("llmneo: error: ") and "kto_tag" in err[0]


# --- files that are not UTF-8 text ------------------------------------------------------------

@pytest.mark.parametrize("name, content", [
    ("train.json", random.Random(0).randbytes(512)),  # a binary file with a data file's name
    ("train.jsonl", '{"instruction": "Café?", "output": "Oui."}\n'.encode("latin-1")),
    ("corpus.txt", "Grüße aus Köln\n".encode("latin-1")),
    ("rows.csv", "instruction,output\nCafé?,Oui.\n".encode("latin-1")),
])
def test_a_file_that_is_not_utf8_is_one_line_naming_it(tmp_path, name, content):
    (tmp_path / name).write_bytes(content)
    message = error(str(tmp_path / name), tmp_path)
    assert message.startswith(f"{tmp_path / name} is not UTF-8 text") and "save it as UTF-8" in message


def test_a_dataset_info_that_is_not_utf8_is_one_line_naming_it(tmp_path):
    (tmp_path / "dataset_info.json").write_bytes('{"café": {"file_name": "a.json"}}'.encode("latin-1"))
    message = error("café", tmp_path)
    assert message.startswith(f"{tmp_path / 'dataset_info.json'} is not UTF-8 text")


def test_utf8_with_a_byte_order_mark_still_loads(tmp_path):
    (tmp_path / "bom.csv").write_bytes("instruction,output\nCafé?,Oui.\n".encode("utf-8-sig"))
    [(_, [row])] = sources.load_rows(Config(dataset=str(tmp_path / "bom.csv")))
    assert row["messages"][0]["content"] == "Café?"
