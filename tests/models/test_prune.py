"""Depth pruning: named layers kept bit-exact, block influence finds a planted identity block."""

from __future__ import annotations

import json

import pytest
import torch

from llmneo import cli
from llmneo.demo import tiny
from llmneo.errors import LlmneoError
from llmneo.models import prune


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_keep_layers_bit_exact_and_runs(tmp_path, tokenizer, family):
    from transformers import AutoModelForCausalLM

    source = tiny.build_model(tokenizer, family=family, num_layers=4, seed=5)
    tiny.save_pair(source, tokenizer, tmp_path / "src")
    out = tmp_path / "pruned"
    assert cli.main(["prune", f"model_name_or_path={tmp_path / 'src'}", "keep_layers=0,3", f"output_dir={out}"]) == 0
    pruned = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert pruned.config.num_hidden_layers == 2 and len(pruned.model.layers) == 2
    if getattr(pruned.config, "layer_types", None) is not None:
        assert len(pruned.config.layer_types) == 2
    original = source.state_dict()
    for new, old in enumerate([0, 3]):
        for name, tensor in pruned.model.layers[new].state_dict().items():
            assert torch.equal(tensor, original[f"model.layers.{old}.{name}"]), name
    assert torch.equal(pruned.lm_head.weight, source.lm_head.weight)
    generated = pruned.generate(torch.tensor([[1, 20, 30]]), max_new_tokens=4, do_sample=False)
    assert generated.shape == (1, 7)
    assert (out / "tokenizer_config.json").is_file()
    assert json.loads((out / "prune_results.json").read_text())["kept_layers"] == [0, 3]


def test_block_influence_removes_planted_identity_layer(tmp_path, tokenizer, alpaca_file, capsys):
    model = tiny.build_model(tokenizer, num_layers=4, hidden_size=32, seed=6)
    with torch.no_grad():  # block 2 adds nothing to the residual stream: output == input
        model.model.layers[2].self_attn.o_proj.weight.zero_()
        model.model.layers[2].mlp.down_proj.weight.zero_()
    tiny.save_pair(model, tokenizer, tmp_path / "src")
    out = tmp_path / "pruned"
    assert cli.main(["prune", f"model_name_or_path={tmp_path / 'src'}", "num_layers=3",
                     f"dataset={alpaca_file}", f"output_dir={out}"]) == 0
    result = json.loads((out / "prune_results.json").read_text())
    assert result["kept_layers"] == [0, 1, 3]
    influence = result["block_influence"]
    assert influence[2] == pytest.approx(0.0, abs=1e-6)
    assert min(influence[i] for i in (0, 1, 3)) > 1e-3
    err = capsys.readouterr().err  # the calibration loop's progress bar (8 rows in batches of 8)
    assert "llmneo prune: block influence" in err and "1/1" in err


def test_prune_input_errors(tmp_path, student_dir, capsys):
    base = [f"model_name_or_path={student_dir}", f"output_dir={tmp_path / 'o'}"]
    assert cli.main(["prune", *base]) == 2
    assert "exactly one of keep_layers" in capsys.readouterr().err
    assert cli.main(["prune", *base, "keep_layers=0,9"]) == 2
    assert "out of range" in capsys.readouterr().err
    assert cli.main(["prune", *base, "num_layers=1"]) == 2
    assert "calibration dataset" in capsys.readouterr().err
    with pytest.raises(LlmneoError, match="num_layers must be in"):
        prune.least_influential([0.1, 0.2], 3)
