"""The README's commands, run as written on tiny models.

The README's worked example names Hub models (`meta-llama/...`) and files under `data/`. This test builds a
folder where those names are local: tiny real checkpoints saved at `meta-llama/Llama-3.2-1B-Instruct` etc. and
small data files, writes the README's own `neo.yaml` there, and runs every `llmneo` command of the README's
bash blocks through the CLI, in order, unchanged. Only commands that need what no test machine has are left
out, each with its reason (SKIPPED). Then it checks that each command did what its comment says.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from llmneo import cli
from llmneo.demo import tiny

README = Path(__file__).resolve().parents[1] / "README.md"

# Commands the test cannot run here, by a prefix of the command; every other README command runs.
SKIPPED = {
    "llmneo eval model_name_or_path=out/llama3-neo tasks=": "lm-eval's arc_easy / hellaswag data sets come "
                                                           "from the Hub (tests/test_evaluate.py runs a local task)",
}


def readme_yaml() -> dict:
    """The worked example's neo.yaml: the first yaml block of the README."""
    block = re.search(r"```yaml\n(.*?)```", README.read_text(), re.S).group(1)
    return yaml.safe_load(block)


def readme_commands() -> list[str]:
    """Every `llmneo ...` line of the README's bash blocks, continuation lines joined, comments dropped."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", README.read_text(), re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("#", 1)[0].strip()
            if line.startswith("llmneo "):
                commands.append(" ".join(line.split()))
    return commands


def _alpaca(n: int, seed: int) -> list[dict]:
    words = ["fox", "dog", "teacher", "student", "hello", "four", "red", "branch"]
    return [{"instruction": f"Say the word {words[(i + seed) % len(words)]} {i % 5} times.", "input": "",
             "output": " ".join([words[(i + seed) % len(words)]] * (i % 5 + 1)) + "."} for i in range(n)]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """A working directory in which the README's model names and data paths exist locally."""
    root = tmp_path_factory.mktemp("readme")
    tokenizer = tiny.build_tokenizer()
    tiny.save_pair(tiny.build_model(tokenizer, hidden_size=32, num_layers=2, seed=1),
                   tokenizer, root / "meta-llama/Llama-3.2-1B-Instruct")
    # The teacher is larger than the student and deep enough for the README's num_layers=16 prune.
    tiny.save_pair(tiny.build_model(tokenizer, hidden_size=32, num_layers=17, seed=2),
                   tokenizer, root / "meta-llama/Llama-3.1-8B-Instruct")
    tiny.save_pair(tiny.build_model(tokenizer, family="qwen2", hidden_size=32, num_layers=28, seed=3),
                   tokenizer, root / "Qwen/Qwen2.5-7B-Instruct")
    (root / "data").mkdir()
    (root / "data/alpaca_en.json").write_text(json.dumps(_alpaca(48, 0)))
    (root / "data/heldout.json").write_text(json.dumps(_alpaca(8, 3)))
    (root / "data/calib.json").write_text(json.dumps(_alpaca(8, 5)))
    (root / "neo.yaml").write_text(yaml.safe_dump(readme_yaml()))
    return root


def test_readme_lists_the_commands_this_test_checks():
    commands = readme_commands()
    assert commands[:4] == [
        "llmneo train neo.yaml",
        "llmneo train neo.yaml kd_ratio=0 output_dir=out/llama3-lora",
        "llmneo train neo.yaml finetuning_type=full learning_rate=2e-5 output_dir=out/kd",
        "llmneo export adapter_name_or_path=out/llama3-neo export_dir=out/llama3-neo-merged",
    ]
    assert len(commands) >= 15
    assert all(any(c.startswith(prefix) for c in commands) for prefix in SKIPPED)  # no stale skip


def test_every_readme_command_runs_as_written(world, monkeypatch):
    monkeypatch.chdir(world)
    ran: list[str] = []
    snapshots: dict[str, dict] = {}
    for command in readme_commands():
        if any(command.startswith(prefix) for prefix in SKIPPED):
            continue
        assert cli.main(shlex.split(command)[1:]) == 0, command
        ran.append(command)
        if command == "llmneo train neo.yaml":
            snapshots["neo"] = load_file("out/llama3-neo/adapter_model.safetensors")
            snapshots["neo_results"] = json.loads(Path("out/llama3-neo/train_results.json").read_text())
        if command.startswith("llmneo export"):
            _check_export_is_the_neo_adapter(world, snapshots["neo"])
        if command.startswith("llmneo sweep"):
            # the sweep has its own folder: the Neo run next to it is untouched
            assert (world / "out/sweep/sweep.csv").is_file()
            assert not any(Path("out/llama3-neo").glob("lora_rank=*"))
    assert len(ran) == len(readme_commands()) - len(SKIPPED)

    neo = snapshots["neo_results"]
    lora = json.loads(Path("out/llama3-lora/train_results.json").read_text())
    kd = json.loads(Path("out/kd/train_results.json").read_text())
    assert (neo["method"], lora["method"], kd["method"]) == ("neo", "lora", "kd")
    assert neo["epoch"] == lora["epoch"] == kd["epoch"] == 1.0  # num_train_epochs: 1.0, not more
    assert yaml.safe_load(Path("out/kd/llmneo_config.yaml").read_text())["learning_rate"] == 2e-5
    assert (world / "out/llama3-neo/eval_results.json").is_file()
    assert json.loads((world / "out/llama3-8b-16l/config.json").read_text())["num_hidden_layers"] == 16
    assert json.loads((world / "out/q8/config.json").read_text())["num_hidden_layers"] == 8
    assert (world / "cache/llama8b-alpaca/index.json").is_file()
    assert (world / "cache/from-axolotl/index.json").is_file()
    for cached in ("out/neo-cached", "out/neo-from-axolotl"):
        assert json.loads((world / cached / "train_results.json").read_text())["kd_loss_kind"] == "fkl"
    # Nothing after the Neo run (and its resume, last) replaced its adapter.
    final = load_file(str(world / "out/llama3-neo/adapter_model.safetensors"))
    assert all(torch.equal(final[k], snapshots["neo"][k]) for k in final)


def _check_export_is_the_neo_adapter(world: Path, neo_adapter: dict) -> None:
    """The merged export holds base + the Neo adapter's B·A (not another run's adapter)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(world / "meta-llama/Llama-3.2-1B-Instruct")
    merged = AutoModelForCausalLM.from_pretrained(world / "out/llama3-neo-merged")
    saved = load_file(str(world / "out/llama3-neo/adapter_model.safetensors"))
    assert saved.keys() == neo_adapter.keys()
    assert all(torch.equal(saved[k], neo_adapter[k]) for k in saved)  # later runs did not replace it
    expected = PeftModel.from_pretrained(base, world / "out/llama3-neo").merge_and_unload()
    ids = torch.tensor([[1, 5, 9, 12, 30]])
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, expected(ids).logits, atol=1e-5)
