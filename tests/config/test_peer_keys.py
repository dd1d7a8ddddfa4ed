"""Unknown keys: other tools' names point at llmneo's, typos at the key meant, and nothing at a far-fetched one."""

from __future__ import annotations

import pytest

from llmneo import cli
from llmneo.config import peer_keys, schema
from llmneo.config.llamafactory import IGNORED_KEYS, UNSUPPORTED_FEATURES
from llmneo.errors import LlmneoError


def _error(key: str) -> str:
    with pytest.raises(LlmneoError) as err:
        schema.load(overrides={key: "1"})
    message = str(err.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("key, meant, misleading", [
    ("max_seq_length", "llmneo calls it cutoff_len", "max_new_tokens"),  # older TRL SFTConfig
    ("max_length", "llmneo calls it cutoff_len", "max_samples"),  # TRL
    ("teacher_model", "llmneo calls it teacher_model_name_or_path", "teacher_endpoint_model"),
    ("base_model", "llmneo calls it model_name_or_path", "save_only_model"),  # axolotl
    ("batch_size", "llmneo calls it per_device_train_batch_size", "val_size"),  # torchtune
    ("sequence_len", "llmneo calls it cutoff_len", "did you mean"),
    ("micro_batch_size", "llmneo calls it per_device_train_batch_size", "did you mean"),
    ("lora_r", "llmneo calls it lora_rank", "did you mean"),
    ("kd_alpha", "llmneo calls it kd_ratio", "lora_alpha"),
    ("num_epochs", "llmneo calls it num_train_epochs", "did you mean"),
    ("max_seq_len", "llmneo calls it cutoff_len", "did you mean"),
    ("use_vllm", "llmneo calls it rollout_endpoint", "did you mean"),  # TRL's on-policy trainers
    ("vllm_server_base_url", "llmneo calls it rollout_endpoint", "did you mean"),
])
def test_a_peers_key_names_its_llmneo_equivalent(key, meant, misleading):
    message = _error(key)
    assert message.startswith(f"unknown config key '{key}' (the name in ") and meant in message
    assert misleading not in message


def test_the_message_says_whose_key_it_is():
    assert "(the name in axolotl); llmneo calls it cutoff_len" in _error("sequence_len")
    assert "torchtune" in _error("batch_size") and "TRL" in _error("max_length")


@pytest.mark.parametrize("key", ["optimizer", "train_on_inputs", "kd_trainer"])
def test_a_peers_key_without_an_equivalent_says_so_plainly(key):
    message = _error(key)
    assert "llmneo has no equivalent" in message and "remove it" in message and "did you mean" not in message


def test_the_same_words_in_another_order_find_the_key():
    """temperature_kd means kd_temperature, not the sampling temperature that edit distance picks."""
    message = _error("temperature_kd")
    assert "did you mean 'kd_temperature'?" in message


@pytest.mark.parametrize("key, meant", [("kd_ration", "'kd_ratio'"), ("lora_rnak", "'lora_rank'"),
                                        ("learnin_rate", "'learning_rate'"), ("outputdir", "'output_dir'"),
                                        ("cutoff", "'cutoff_len'"), ("resume", "'resume_from_checkpoint'")])
def test_typos_and_prefixes_still_get_their_hint(key, meant):
    assert f"did you mean {meant}" in _error(key)


def test_two_equally_close_keys_are_both_named():
    message = _error("per_device_batch_size")
    assert "'per_device_train_batch_size'" in message and "'per_device_eval_batch_size'" in message


@pytest.mark.parametrize("key", ["foobarbaz", "teacher", "student", "lr_rate"])
def test_no_close_key_gives_no_hint(key):
    message = _error(key)
    assert "did you mean" not in message and "llmneo train --help" in message


def test_the_table_names_only_real_llmneo_keys_and_no_llmneo_key_is_in_it():
    refused = {key for keys in UNSUPPORTED_FEATURES.values() for key in keys}
    for key, peer in peer_keys.PEERS.items():
        assert key not in schema.FIELDS and key not in IGNORED_KEYS and key not in refused, key
        assert peer.ours is None or peer.ours in schema.FIELDS, (key, peer.ours)


@pytest.mark.parametrize("argv, said", [
    (["--lora_rank", "8"], "'--lora_rank 8' is flag syntax; llmneo takes settings as key=value: lora_rank=8"),
    (["--lora_rank=8"], "'--lora_rank=8' is flag syntax; llmneo takes settings as key=value: lora_rank=8"),
    (["--lora-rank", "8"], "key=value: lora_rank=8"),
])
def test_flag_syntax_says_settings_are_key_value(capsys, argv, said):
    assert cli.main(["train", "model_name_or_path=m", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("llmneo: error: '--lora") and said in err
    assert "\n" not in err and "unrecognized arguments" not in err


def test_flag_syntax_never_echoes_an_api_key(capsys):
    assert cli.main(["train", "--teacher_api_key_env", "hf_PastedKey123"]) == 2
    err = capsys.readouterr().err
    assert "teacher_api_key_env=VALUE" in err and "PastedKey" not in err


def test_help_flags_still_work(capsys):
    with pytest.raises(SystemExit) as done:
        cli.main(["train", "--help"])
    assert done.value.code == 0 and "lora_rank" in capsys.readouterr().out


def test_a_key_and_its_value_as_two_words_shows_the_key_value_form(capsys):
    assert cli.main(["train", "model_name_or_path=m", "lora_rank", "8"]) == 2
    assert "e.g. lora_rank=8" in capsys.readouterr().err
