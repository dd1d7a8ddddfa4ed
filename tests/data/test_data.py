"""data.build / load_rows / collate: file types, formats, label masks, templates, splits, and errors."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from llmneo.config.schema import Config, load
from llmneo.data import dataset as data
from llmneo.data import formats, sources, templates
from llmneo.demo import tiny
from llmneo.errors import LlmneoError

IGNORE = -100


@pytest.fixture(scope="module")
def chatml():
    return tiny.build_tokenizer()


@pytest.fixture(scope="module")
def plain():
    return tiny.build_tokenizer(chat_template=None)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def config(tmp_path, dataset, **kw):
    return Config(dataset=str(dataset), dataset_dir=str(tmp_path), **kw)


def trained(tok, example):
    """The decoded runs of consecutive labelled tokens, after checking labels copy input_ids or are -100."""
    runs, run = [], []
    for token, label in zip(example["input_ids"], example["labels"]):
        assert label in (IGNORE, token)
        if label != IGNORE:
            run.append(token)
        elif run:
            runs, run = runs + [tok.decode(run)], []
    return runs + ([tok.decode(run)] if run else [])


def prompt_text(tok, example):
    return tok.decode([t for t, label in zip(example["input_ids"], example["labels"]) if label == IGNORE])


ALPACA = {"instruction": "Say hello.", "input": "", "output": "Hello there!"}
SHAREGPT = {"conversations": [{"from": "human", "value": "Say hello."}, {"from": "gpt", "value": "Hello there!"}]}
MESSAGES = {"messages": [{"role": "user", "content": "Say hello."}, {"role": "assistant", "content": "Hello there!"}]}
MULTI_TURN = {"conversations": [
    {"from": "system", "value": "Be brief."},
    {"from": "human", "value": "What is two plus two?"}, {"from": "gpt", "value": "Four."},
    {"from": "human", "value": "Say hello."}, {"from": "gpt", "value": "Hello there!"}]}


# --- label masks --------------------------------------------------------------------------------

@pytest.mark.parametrize("row", [ALPACA, SHAREGPT, MESSAGES], ids=["alpaca", "sharegpt", "messages"])
def test_only_the_response_is_trained_with_the_tokenizer_template(tmp_path, chatml, row):
    path = write_jsonl(tmp_path / "train.jsonl", [row])
    [example] = data.build(config(tmp_path, path), chatml).train
    assert trained(chatml, example) == ["Hello there!<|im_end|>"]
    assert prompt_text(chatml, example) == "<|im_start|>user\nSay hello.<|im_end|>\n<|im_start|>assistant\n\n"


def test_alpaca_input_and_history_become_turns(tmp_path, chatml):
    row = {"instruction": "Add.", "input": "2 2", "output": "Four.", "system": "Be brief.",
           "history": [["Say hello.", "Hello there!"]]}
    [(_, [normalised])] = sources.load_rows(config(tmp_path, write_jsonl(tmp_path / "a.jsonl", [row])))
    assert normalised["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Say hello."}, {"role": "assistant", "content": "Hello there!"},
        {"role": "user", "content": "Add.\n2 2"}, {"role": "assistant", "content": "Four."}]


def test_multi_turn_trains_both_replies_and_neither_user_turn(tmp_path, chatml):
    [example] = data.build(config(tmp_path, write_jsonl(tmp_path / "c.jsonl", [MULTI_TURN])), chatml).train
    assert trained(chatml, example) == ["Four.<|im_end|>", "Hello there!<|im_end|>"]
    prompt = prompt_text(chatml, example)
    assert "What is two plus two?" in prompt and "Say hello." in prompt and "Be brief." in prompt


END_OF_TURN = {"default": "</s>", "chatml": "<|im_end|>", "qwen": "<|im_end|>", "llama3": "<|eot_id|>",
               "llama2": "</s>", "mistral": "</s>", "gemma": "<end_of_turn>", "alpaca": "</s>", "vicuna": "</s>"}


def test_every_builtin_template_is_checked():
    assert set(END_OF_TURN) == set(templates.BUILTIN_TEMPLATES)


@pytest.fixture(scope="module")
def every_marker():
    """A tokenizer without a chat template that holds every built-in template's special tokens."""
    tok = tiny.build_tokenizer(chat_template=None)
    tok.add_tokens(sorted({t for m in templates.MARKERS.values() for t in m}), special_tokens=True)
    return tok


@pytest.mark.parametrize("name", sorted(END_OF_TURN))
def test_builtin_templates_mask_prompts_without_generation_markers(tmp_path, every_marker, name):
    assert "{% generation %}" not in templates.BUILTIN_TEMPLATES[name]
    path = write_jsonl(tmp_path / "c.jsonl", [MULTI_TURN])
    [example] = data.build(config(tmp_path, path, template=name), every_marker).train
    runs = ["".join(run.split()) for run in trained(every_marker, example)]  # llama2 etc. put a space before replies
    assert runs == [f"Four.{END_OF_TURN[name]}", f"Hellothere!{END_OF_TURN[name]}"]
    assert example["input_ids"][0] == every_marker.bos_token_id
    end = templates.turn_end_id(every_marker, name)  # one token ends each reply
    assert every_marker.convert_ids_to_tokens(end) == END_OF_TURN[name]
    assert [label for label in example["labels"] if label != IGNORE][-1] == end


def test_default_template_renders_the_documented_format(tmp_path, plain):
    [example] = data.build(config(tmp_path, write_jsonl(tmp_path / "c.jsonl", [MULTI_TURN])), plain).train
    assert plain.decode(example["input_ids"]) == (
        "<s>System: Be brief.\nHuman: What is two plus two?\nAssistant: Four.</s>\n"
        "Human: Say hello.\nAssistant: Hello there!</s>\n")


def test_text_rows_train_every_token_between_bos_and_eos(tmp_path, plain):
    (tmp_path / "corpus.txt").write_text("The quick brown fox.\n\nHello there!\n")
    splits = data.build(config(tmp_path, tmp_path / "corpus.txt"), plain)
    assert [plain.decode(e["input_ids"]) for e in splits.train] == ["<s>The quick brown fox.</s>",
                                                                     "<s>Hello there!</s>"]
    assert all(e["labels"] == e["input_ids"] for e in splits.train)


def test_the_tokenizer_template_wins_over_template_with_a_warning(tmp_path, chatml):
    path = write_jsonl(tmp_path / "a.jsonl", [ALPACA])
    with pytest.warns(UserWarning, match="own chat template"):
        [example] = data.build(config(tmp_path, path, template="llama3"), chatml).train
    assert chatml.decode(example["input_ids"]).startswith("<|im_start|>user")


def test_masks_survive_a_template_that_rewrites_earlier_turns(tmp_path):
    # Like Mistral's newer templates: the system prompt goes into the LAST user turn, so rendering a
    # prefix of the conversation is not a prefix of the full rendering.
    rewriting = ("{% set system = messages[0]['content'] if messages[0]['role'] == 'system' else '' %}"
                 "{% set ns = namespace(last=0) %}{% for m in messages %}{% if m['role'] == 'user' %}"
                 "{% set ns.last = loop.index0 %}{% endif %}{% endfor %}"
                 "{% for m in messages %}{% if m['role'] == 'user' %}[INST] "
                 "{% if loop.index0 == ns.last and system %}{{ system }} {% endif %}{{ m['content'] }} [/INST]"
                 "{% elif m['role'] == 'assistant' %}{{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}")
    tok = tiny.build_tokenizer(chat_template=rewriting)
    [example] = data.build(config(tmp_path, write_jsonl(tmp_path / "c.jsonl", [MULTI_TURN])), tok).train
    assert tok.decode(example["input_ids"]) == ("[INST] What is two plus two? [/INST]Four.</s>"
                                                "[INST] Be brief. Say hello. [/INST]Hello there!</s>")
    assert trained(tok, example) == ["Four.</s>", "Hello there!</s>"]


def test_a_reply_the_template_rewrites_beyond_recognition_stays_prompt(tmp_path):
    # Like Qwen3: reasoning is dropped from every reply but the last, so the first reply as trained
    # ("<think>...</think>Four.") never appears in the full rendering; only the last reply is trained.
    drops_old_reasoning = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
        "{% if m['role'] == 'assistant' and not loop.last %}{{ m['content'].split('</think>')[-1] }}"
        "{% else %}{{ m['content'] }}{% endif %}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    tok = tiny.build_tokenizer(chat_template=drops_old_reasoning)
    row = {"messages": [{"role": "user", "content": "What is two plus two?"},
                        {"role": "assistant", "content": "<think>2+2</think>Four."},
                        {"role": "user", "content": "Say hello."},
                        {"role": "assistant", "content": "<think>greet</think>Hello there!"}]}
    [example] = data.build(config(tmp_path, write_jsonl(tmp_path / "r.jsonl", [row])), tok).train
    assert "<think>2+2</think>" not in tok.decode(example["input_ids"])
    assert trained(tok, example) == ["<think>greet</think>Hello there!<|im_end|>"]


class _SlowTokenizer:
    """A tokenizer without offset mappings (like a Python-only one)."""
    is_fast = False

    def __init__(self, tok):
        self._tok = tok

    def __getattr__(self, name):
        return getattr(self._tok, name)

    def __call__(self, text, **kwargs):
        assert "return_offsets_mapping" not in kwargs
        return self._tok(text, **kwargs)


def test_tokenizers_without_offsets_get_the_same_masks(plain):
    messages = formats._conversation(MULTI_TURN, "conversations", formats.Layout())["messages"]
    template = templates.BUILTIN_TEMPLATES["chatml"]
    fast = templates.encode_conversation(plain, template, messages)
    slow = templates.encode_conversation(_SlowTokenizer(plain), template, messages)
    assert slow == fast


# --- files, folders and registrations ---------------------------------------------------------

def _write_csv(path, rows):
    import csv

    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def _write_parquet(path, rows):
    import pyarrow
    import pyarrow.parquet

    pyarrow.parquet.write_table(pyarrow.Table.from_pylist(rows), path)


WRITERS = {
    "list.json": lambda p, rows: p.write_text(json.dumps(rows, indent=1)),
    "lines.json": write_jsonl,
    "rows.jsonl": write_jsonl,
    "rows.parquet": _write_parquet,
    "rows.csv": _write_csv,
}
ROWS = [ALPACA, {"instruction": "What is two plus two?", "input": "", "output": "Four."}]
EXPECTED = [[{"role": "user", "content": "Say hello."}, {"role": "assistant", "content": "Hello there!"}],
            [{"role": "user", "content": "What is two plus two?"}, {"role": "assistant", "content": "Four."}]]


@pytest.mark.parametrize("filename", sorted(WRITERS))
def test_each_file_type_loads(tmp_path, filename):
    WRITERS[filename](tmp_path / filename, ROWS)
    [(source, rows)] = sources.load_rows(config(tmp_path, tmp_path / filename))
    assert source.endswith(filename)
    assert [r["messages"] for r in rows] == EXPECTED


def test_parquet_keeps_nested_conversations(tmp_path):
    _write_parquet(tmp_path / "c.parquet", [MULTI_TURN])
    [(_, [row])] = sources.load_rows(config(tmp_path, tmp_path / "c.parquet"))
    assert [m["role"] for m in row["messages"]] == ["system", "user", "assistant", "user", "assistant"]


def test_a_folder_loads_its_files_sorted_and_max_samples_spans_them(tmp_path):
    folder = tmp_path / "folder"
    folder.mkdir()
    write_jsonl(folder / "b.jsonl", [ROWS[1]])
    write_jsonl(folder / "a.jsonl", [ROWS[0]])
    (folder / "notes.md").write_text("not data")
    [(_, rows)] = sources.load_rows(config(tmp_path, folder))
    assert [r["messages"] for r in rows] == EXPECTED
    [(_, rows)] = sources.load_rows(config(tmp_path, folder, max_samples=1))
    assert [r["messages"] for r in rows] == EXPECTED[:1]


def test_comma_separated_datasets_concatenate_in_order_and_resolve_under_dataset_dir(tmp_path, monkeypatch):
    write_jsonl(tmp_path / "a.jsonl", [ROWS[1]])
    (tmp_path / "b.txt").write_text("Hello there!\n")
    monkeypatch.chdir(tmp_path.parent)  # "a.jsonl" is not in the working directory, only in dataset_dir
    loaded = sources.load_rows(config(tmp_path, "a.jsonl, b.txt"))
    assert [rows for _, rows in loaded] == [[{"messages": EXPECTED[1]}], [{"text": "Hello there!"}]]


def test_dataset_info_registrations_with_column_and_tag_mappings(tmp_path):
    write_jsonl(tmp_path / "qa.jsonl", [{"q": "Add.", "ctx": "2 2", "a": "Four.", "sys": "Be brief.",
                                         "past": [["Say hello.", "Hello there!"]]}])
    write_jsonl(tmp_path / "chat.jsonl", [{"dialog": [{"speaker": "me", "text": "Say hello."},
                                                      {"speaker": "bot", "text": "Hello there!"}],
                                           "sys": "Be brief."}])
    (tmp_path / "dataset_info.json").write_text(json.dumps({
        "qa": {"file_name": "qa.jsonl", "columns": {"prompt": "q", "query": "ctx", "response": "a",
                                                    "system": "sys", "history": "past"}},
        "chat": {"file_name": "chat.jsonl", "formatting": "sharegpt",
                 "columns": {"messages": "dialog", "system": "sys"},
                 "tags": {"role_tag": "speaker", "content_tag": "text", "user_tag": "me", "assistant_tag": "bot"}},
    }))
    [(_, [qa]), (_, [chat])] = sources.load_rows(load(overrides={"dataset": "qa,chat", "dataset_dir": str(tmp_path)}))
    system = {"role": "system", "content": "Be brief."}
    assert qa["messages"] == [system, *EXPECTED[0], {"role": "user", "content": "Add.\n2 2"},
                              {"role": "assistant", "content": "Four."}]
    assert chat["messages"] == [system, *EXPECTED[0]]


def _in_datasets_cache(tmp_path, monkeypatch, *repo_ids: str) -> None:
    """These Hub ids have a folder in datasets' cache, so the offline check lets them through to load_dataset."""
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets_cache"))
    for repo_id in repo_ids:
        (tmp_path / "datasets_cache" / repo_id.replace("/", "___")).mkdir(parents=True)


def test_hub_datasets_go_through_load_dataset(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    calls = []

    def fake_load_dataset(path, name=None, split=None, data_dir=None):
        calls.append((path, name, split, data_dir))
        return datasets.Dataset.from_list(ROWS)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    _in_datasets_cache(tmp_path, monkeypatch, "someone/direct", "someone/registered")
    (tmp_path / "dataset_info.json").write_text(json.dumps(
        {"hub": {"hf_hub_url": "someone/registered", "subset": "en", "split": "validation"}}))
    loaded = sources.load_rows(config(tmp_path, "someone/direct,hub"))
    assert calls == [("someone/direct", None, "train", None), ("someone/registered", "en", "validation", None)]
    assert [[r["messages"] for r in rows] for _, rows in loaded] == [EXPECTED, EXPECTED]
    [(source, rows)] = sources.load_rows(config(tmp_path, "someone/direct", max_samples=1))
    assert source == "someone/direct" and [r["messages"] for r in rows] == EXPECTED[:1]


# --- errors ------------------------------------------------------------------------------------

def error(call, *args) -> str:
    """The message of the LlmneoError that call(*args) raises; user errors are one line."""
    with pytest.raises(LlmneoError) as info:
        call(*args)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_missing_file_names_it_and_where_it_looked(tmp_path):
    message = error(sources.load_rows, config(tmp_path, "nope.jsonl"))
    assert "'nope.jsonl' not found" in message and str(tmp_path / "nope.jsonl") in message
    assert "dataset_info.json" in message


def test_hub_failure_says_not_found_locally_or_on_the_hub(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")

    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    _in_datasets_cache(tmp_path, monkeypatch, "someone/missing")  # past llmneo's own offline check (hub.require)
    message = error(sources.load_rows, config(tmp_path, "someone/missing"))
    assert "'someone/missing'" in message and "Hub" in message


def test_unknown_format_names_the_file_and_columns(tmp_path):
    path = write_jsonl(tmp_path / "odd.jsonl", [{"question": "q", "answer": "a"}])
    message = error(sources.load_rows, config(tmp_path, path))
    assert str(path) in message and "answer, question" in message and "alpaca" in message


def test_row_missing_its_response_names_file_row_and_field(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", [ALPACA, ALPACA, {"instruction": "Say hello.", "input": ""}])
    assert error(sources.load_rows, config(tmp_path, path)) == (
        f"{path} row 3: missing 'output' (alpaca format needs instruction and output)")


@pytest.mark.parametrize("row, needle", [
    ({"conversations": [{"from": "human", "value": "Say hello."}]}, "row 1: no assistant turn"),
    ({"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": " "}]}, "empty assistant"),
    ({"conversations": [{"from": "gpt", "value": "hi"}]}, "row 1: turn 1 of 'conversations' is 'gpt'"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
                   {"role": "user", "content": "and?"}]}, "ends with a user turn"),
    ({"instruction": "Say hello.", "output": ""}, "row 1: empty 'output'"),
])
def test_malformed_conversations_are_errors(tmp_path, row, needle):
    assert needle in error(sources.load_rows, config(tmp_path, write_jsonl(tmp_path / "bad.jsonl", [row])))


def test_invalid_json_lines_name_the_line(tmp_path):
    (tmp_path / "bad.jsonl").write_text(json.dumps(ALPACA) + "\n{oops\n")
    assert "bad.jsonl line 2: invalid JSON" in error(sources.load_rows, config(tmp_path, tmp_path / "bad.jsonl"))


def test_empty_dataset_is_an_error(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    message = error(sources.load_rows, config(tmp_path, tmp_path / "empty.jsonl"))
    assert f"'{tmp_path / 'empty.jsonl'}'" in message and "no rows" in message


def test_every_response_past_cutoff_len_is_an_error(tmp_path, chatml):
    path = write_jsonl(tmp_path / "a.jsonl", [ALPACA])
    assert error(data.build, config(tmp_path, path, cutoff_len=5), chatml) == (
        "no trainable tokens: every example's prompt is longer than cutoff_len=5 (or every response is "
        "masked); raise cutoff_len")


def test_unknown_template_lists_the_builtins(tmp_path, plain):
    path = write_jsonl(tmp_path / "a.jsonl", [ALPACA])
    message = error(data.build, config(tmp_path, path, template="nope"), plain)
    assert "'nope'" in message and all(name in message for name in ("default", "llama3", "chatml", "vicuna"))


def test_val_size_that_leaves_nothing_to_train_is_an_error(tmp_path, chatml):
    path = write_jsonl(tmp_path / "a.jsonl", ROWS)
    assert "val_size=2" in error(data.build, config(tmp_path, path, val_size=2), chatml)


# --- truncation, sampling, splits, batching ------------------------------------------------------

def test_cutoff_len_keeps_the_start_and_drops_examples_left_without_a_response(tmp_path, chatml):
    long_prompt = {"instruction": "The quick brown fox jumps over the lazy dog. " * 3, "output": "Four."}
    path = write_jsonl(tmp_path / "a.jsonl", [ALPACA, long_prompt])
    [full] = data.build(config(tmp_path, path, max_samples=1), chatml).train
    with pytest.warns(UserWarning, match="dropped 1 of 2 examples"):
        [cut] = data.build(config(tmp_path, path, cutoff_len=len(full["input_ids"]) - 3), chatml).train
    assert cut["input_ids"] == full["input_ids"][:-3] and cut["labels"] == full["labels"][:-3]
    assert trained(chatml, cut) == ["Hello there"]


def test_max_samples_takes_the_first_rows_of_each_dataset(tmp_path, chatml):
    write_jsonl(tmp_path / "a.jsonl", [ALPACA, ROWS[1], ALPACA])
    write_jsonl(tmp_path / "b.jsonl", [ROWS[1], ALPACA])
    loaded = sources.load_rows(config(tmp_path, "a.jsonl,b.jsonl", max_samples=1))
    assert [[r["messages"] for r in rows] for _, rows in loaded] == [EXPECTED[:1], EXPECTED[1:]]


def _numbered(tmp_path, n=10):
    return write_jsonl(tmp_path / "n.jsonl", [{"instruction": f"Say {i}.", "output": f"{i}"} for i in range(n)])


def _replies(tok, examples):
    return [int(trained(tok, e)[0].removesuffix("<|im_end|>")) for e in examples]


@pytest.mark.parametrize("val_size, held_out", [(0.2, 2), (3, 3)])
def test_val_size_holds_out_a_seeded_split(tmp_path, chatml, val_size, held_out):
    path = _numbered(tmp_path)
    splits = data.build(config(tmp_path, path, val_size=val_size, seed=1), chatml)
    train, held = _replies(chatml, splits.train), _replies(chatml, splits.eval)
    assert len(held) == held_out and sorted(train + held) == list(range(10)) and train == sorted(train)
    again = data.build(config(tmp_path, path, val_size=val_size, seed=1), chatml)
    assert _replies(chatml, again.eval) == held
    others = {tuple(_replies(chatml, data.build(config(tmp_path, path, val_size=val_size, seed=s), chatml).eval))
              for s in range(2, 6)}
    assert others - {tuple(held)}  # other seeds choose other rows


def test_no_val_size_means_no_eval_split(tmp_path, chatml):
    assert data.build(config(tmp_path, _numbered(tmp_path)), chatml).eval is None


def test_collate_right_pads_with_masks():
    batch = data.collate([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]},
                          {"input_ids": [8], "labels": [8]}], pad_token_id=0)
    assert {k: v.dtype for k, v in batch.items()} == dict.fromkeys(("input_ids", "attention_mask", "labels"),
                                                                   torch.int64)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]


def test_build_output_collates_into_a_model_ready_batch(tmp_path, chatml):
    write_jsonl(tmp_path / "a.jsonl", [ALPACA])
    write_jsonl(tmp_path / "c.jsonl", [MULTI_TURN])
    splits = data.build(config(tmp_path, "a.jsonl,c.jsonl"), chatml)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        batch = data.collate(splits.train, chatml.pad_token_id)
    assert batch["input_ids"].shape == batch["labels"].shape == (2, max(len(e["input_ids"]) for e in splits.train))
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE).all()


def test_llama3_style_date_is_fixed(tmp_path):
    """Templates that stamp today's date (Llama 3.x: date_string or strftime_now) render a fixed date, so
    tokenized data, and a teacher cache's fingerprint, do not change from day to day."""
    stamped = ("{{ bos_token }}{% if date_string is defined %}Today: {{ date_string }}\n{% endif %}"
               "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}{{ eos_token }}\n{% endfor %}"
               "{% if add_generation_prompt %}assistant: {% endif %}")
    tok = tiny.build_tokenizer(chat_template=stamped)
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"instruction": "hi", "output": "yo"}) + "\n")
    example = data.build(load(overrides={"dataset": str(path)}), tok).train[0]
    assert f"Today: {templates.FIXED_DATE}" in tok.decode(example["input_ids"])
