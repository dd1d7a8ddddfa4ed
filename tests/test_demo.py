"""The embedded demo: a shortened run writes its report (five arms, on-policy Neo among them); the teacher is
cached; the verdict is honest; the figures do not depend on the machine's thread count or CPU kernels (the
README's determinism claim); the world's road walks depend on what was said before."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from llmneo import cli
from llmneo.demo import runner as demo
from llmneo.errors import LlmneoError

EXAMPLES = Path(__file__).parent.parent / "examples" / "sweep"
SHORT = ["max_steps=3", "teacher_steps=4", "teacher_rows=64", "train_rows=24", "heldout_rows=16",
         "hidden_size=32", "towns=6"]


@pytest.mark.slow
def test_short_demo_writes_report_and_reuses_teacher(tmp_path, capsys):
    out = tmp_path / "demo"
    assert cli.main(["demo", f"output_dir={out}", *SHORT]) == 0
    report = (out / "report.md").read_text()
    table = [line for line in report.splitlines() if line.startswith("| ")]
    assert len(table) == 1 + 7  # header + teacher, pruned student, five arms
    for name in ("teacher", "pruned student", "| sft", "| lora", "| kd", "| neo |", "| neo on-policy |",
                 "teacher log-prob of greedy answers"):
        assert name in report
    assert "**Verdict.**" in report and "On-policy Neo" in report
    assert (out / "curves.png").stat().st_size > 5000
    results = json.loads((out / "results.json").read_text())
    rows = {r["model"]: r for r in results["rows"]}
    assert rows["neo"]["trainable_params"] < rows["kd"]["trainable_params"]
    assert rows["neo"]["trainable_params"] == rows["lora"]["trainable_params"]
    assert rows["neo on-policy"]["trainable_params"] == rows["neo"]["trainable_params"]
    assert all(r["perplexity"] > 1.0 for r in results["rows"])
    assert all(r["teacher_logprob"] < 0 and r["generated_tokens"] > 0 for r in results["rows"])
    # on-policy Neo is Neo plus lmbda 0.5 and a reply budget from the world's answers; some steps were on-policy
    assert results["on_policy"]["lmbda"] == 0.5 and results["on_policy"]["max_new_tokens"] > 0
    assert rows["neo on-policy"]["on_policy_fraction"] > 0
    on_policy = (out / "arms" / "neo-on-policy" / "llmneo_config.yaml").read_text()
    assert "lmbda: 0.5" in on_policy and "lmbda: 0.0" in (out / "arms" / "neo" / "llmneo_config.yaml").read_text()
    assert "reusing" not in capsys.readouterr().out
    assert cli.main(["demo", f"output_dir={out}", *SHORT]) == 0
    assert "reusing the cached teacher" in capsys.readouterr().out
    # examples/sweep name the demo's outputs by stable paths: each must exist after a demo run
    teacher = (out / "teacher").resolve()
    assert teacher.parent == (out / "cache").resolve() and teacher.name.startswith("teacher-")
    assert (teacher / "config.json").is_file()
    for example in ("demo_neo.yaml", "demo_lora.yaml"):
        settings = yaml.safe_load((EXAMPLES / example).read_text())
        for key in ("model_name_or_path", "teacher_model_name_or_path", "dataset"):
            for path in str(settings.get(key) or "").split(","):
                if path:
                    assert path.startswith("demo_out/"), (example, key, path)
                    assert (out / path.removeprefix("demo_out/")).exists(), (example, key, path)


def test_demo_settings_are_validated(capsys):
    assert cli.main(["demo", "max_stepz=3"]) == 2
    assert "unknown demo setting" in capsys.readouterr().err
    assert cli.main(["demo", "lmbda=0"]) == 2  # the on-policy arm would not generate
    assert "needs lmbda > 0" in capsys.readouterr().err
    with pytest.raises(LlmneoError, match="student_layers must be smaller"):
        demo.parse(None, ["student_layers=4", "teacher_layers=4"])
    with pytest.raises(LlmneoError, match="kd_ratio must be in"):
        demo.parse(None, ["kd_ratio=3"])
    settings, shared = demo.parse(None, ["max_steps=7", "kd_loss=jsd"])
    assert settings.max_steps == 7 and shared == {"kd_loss": "jsd"}
    # generation keys go to on-policy Neo alone, so lmbda needs no teacher in the arms that have none
    _, shared = demo.parse(None, ["lmbda=1", "temperature=0.7", "kd_loss=jsd"])
    assert demo.split_shared(shared) == ({"kd_loss": "jsd"}, {"lmbda": "1", "temperature": "0.7"})
    with pytest.raises(LlmneoError, match="lmbda must be in"):
        demo.parse(None, ["lmbda=2"])


def test_road_walks_follow_the_roads_of_the_town_said_before():
    from llmneo.demo import world

    towns = world.make_towns(0, 24)
    by_name = {t.name: t for t in towns}
    before = [(t.name, t.region, t.ruler, t.market) for t in towns]
    assert all(len(t.roads) == world.ROADS_PER_TOWN and t.name not in dict(t.roads) for t in towns)
    assert all(abs(sum(p for _, p in t.roads) - 1) < 1e-9 for t in towns)
    walks = 0
    for row in world.rows(towns, 400, 1):
        question, answer = (m["content"] for m in row["messages"])
        if "road" not in question:
            continue
        walks += 1
        start = question.removeprefix("Where does the road from ").removesuffix(" lead?")
        path = answer.removeprefix(f"From {start} to ").removesuffix(".").split(", then ")
        assert len(path) == world.ROAD_HOPS
        for here, there in zip([start, *path], path):
            assert there in dict(by_name[here].roads)  # each town is one the town before leads to
    assert 60 < walks < 140  # a quarter of the questions
    # the roads come from a stream of their own: the towns' other facts are what they were without roads
    assert [(t.name, t.region, t.ruler, t.market) for t in world.make_towns(0, 24)] == before


def _rows(neo_ppl, neo_kl, lora_ppl, lora_kl, kd_kl, on_policy=(1.45, 0.25, -0.2)):
    base = {"model": "pruned", "perplexity": 3.0, "kl_to_teacher": 1.0}
    op_ppl, op_kl, op_logprob = on_policy
    return [{"model": "teacher", "teacher_logprob": -0.1}, base,
            {"model": "lora", "perplexity": lora_ppl, "kl_to_teacher": lora_kl, "trainable_params": 10},
            {"model": "kd", "perplexity": 1.5, "kl_to_teacher": kd_kl, "trainable_params": 100},
            {"model": "neo", "perplexity": neo_ppl, "kl_to_teacher": neo_kl, "trainable_params": 10,
             "teacher_logprob": -0.3},
            {"model": "neo on-policy", "perplexity": op_ppl, "kl_to_teacher": op_kl, "trainable_params": 10,
             "teacher_logprob": op_logprob}]


def test_verdict_says_what_happened_either_way():
    good = demo.verdict(_rows(1.4, 0.2, 1.5, 0.3, 0.1))
    assert "Neo beats LoRA" in good and "is closer to the teacher" in good and "recovers 89%" in good
    bad = demo.verdict(_rows(1.6, 0.4, 1.5, 0.3, 0.1))
    assert "does not beat LoRA" in bad and "is not closer to" in bad and "recovers 67%" in bad
    none = demo.verdict(_rows(1.6, 0.4, 1.5, 0.3, 1.2))
    assert "no KD gain to compare with" in none and "Neo reduced the KL to the teacher" in none
    worse = demo.verdict(_rows(1.6, 1.5, 1.5, 0.3, 0.1))  # Neo's KL above the untrained student's (1.0)
    assert "Neo did not reduce the KL" in worse and "recovers" not in worse
    # on-policy Neo against (off-policy) Neo, whose row here has perplexity 1.4, KL 0.2, log-prob -0.3
    wins = demo.verdict(_rows(1.4, 0.2, 1.5, 0.3, 0.1, on_policy=(1.3, 0.1, -0.2)))
    assert ("On-policy Neo beats off-policy Neo" in wins and "(KL 0.1000 vs 0.2000)" in wins
            and "answers score higher" in wins and "wins on all three" in wins and "-0.1000" in wins)
    loses = demo.verdict(_rows(1.4, 0.2, 1.5, 0.3, 0.1, on_policy=(1.5, 0.3, -0.4)))
    assert ("On-policy Neo does not beat off-policy Neo" in loses and "is not closer to the teacher (KL 0.3000" in loses
            and "do not score higher" in loses and "wins on none of the three" in loses)
    mixed = demo.verdict(_rows(1.4, 0.2, 1.5, 0.3, 0.1, on_policy=(1.5, 0.3, -0.2)))
    assert "does not beat off-policy Neo" in mixed and "wins on teacher log-prob only" in mixed
    tie = demo.verdict(_rows(1.4, 0.2, 1.5, 0.3, 0.1, on_policy=(1.4, 0.2, -0.3)))
    assert "wins on none of the three" in tie  # a tie is not a win


def _demo_in_fresh_process(out, env_overrides: dict) -> dict:
    env = {**os.environ, **env_overrides}
    done = subprocess.run([sys.executable, "-m", "llmneo", "demo", f"output_dir={out}", *SHORT],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads((out / "results.json").read_text())


@pytest.mark.slow
def test_figures_are_the_same_under_thread_counts_and_kernels_that_otherwise_differ(tmp_path):
    """Each environment alone changes the last bits of an unpinned run (thread count splits reductions
    differently, ATen's and MKL's ISA change rounding), which 600 teacher steps make visible in the table.
    The demo pins them before torch loads, so two fresh processes must agree exactly."""
    first = _demo_in_fresh_process(tmp_path / "a", {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
                                                    "ATEN_CPU_CAPABILITY": "default", "MKL_CBWR": "COMPATIBLE"})
    second = _demo_in_fresh_process(tmp_path / "b", {"OMP_NUM_THREADS": "3", "ATEN_CPU_CAPABILITY": "avx512",
                                                     "MKL_CBWR": "AUTO"})
    figures = [{(r["model"], key): r[key] for r in results["rows"]
                for key in ("perplexity", "kl_to_teacher", "top1_agreement")} for results in (first, second)]
    assert figures[0] == figures[1]  # exact: the claim is bit for bit, not within a tolerance
    for results in (first, second):
        assert results["numerics"]["missed"] == []
        assert results["numerics"]["threads"] == 2 and results["numerics"]["aten_cpu_capability"] == "AVX2"


def test_loading_the_demo_does_not_load_torch():
    """The pins must be in the environment before torch loads; the CLI's demo path must not load it earlier."""
    probe = ("import sys; from llmneo import cli; from llmneo.demo import runner as demo; cli._quiet_libraries(); demo.parse(None, ['max_steps=3']); "
             "print('torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "False"


def test_pinned_numerics_restores_the_callers_settings(monkeypatch):
    import torch

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.delenv("MKL_CBWR", raising=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with demo.pinned_numerics() as numerics:
            assert torch.get_num_threads() == 2 and os.environ["MKL_CBWR"] == "AVX2"
            assert os.environ["CUDA_VISIBLE_DEVICES"] == ""
            # torch was loaded before the pins here (by this test process), which the demo must say
            assert any("loaded before" in reason for reason in numerics["missed"])
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
    assert os.environ["OMP_NUM_THREADS"] == "1" and "MKL_CBWR" not in os.environ


def test_fingerprint_separates_teachers_trained_under_other_numerics():
    settings = demo.DemoSettings()
    pinned = {"threads": 2, "aten_cpu_capability": "AVX2", "mkl_cbwr": "AVX2", "device": "cpu"}
    assert demo._fingerprint(settings, pinned) == demo._fingerprint(settings, dict(pinned))
    assert demo._fingerprint(settings, pinned) != demo._fingerprint(settings, pinned | {"aten_cpu_capability": "AVX512"})


def test_the_library_does_not_import_the_demo():
    """llmneo/demo/ holds the demo and its fixtures; the library's modules, in every subpackage (bar the CLI's
    `demo` command), must not import them."""
    import ast

    package = Path(demo.__file__).parent.parent
    modules = [m for m in sorted(package.rglob("*.py")) if m.relative_to(package).parts[0] != "demo"]
    subpackages = {d for d in package.iterdir() if (d / "__init__.py").exists() and d.name != "demo"}
    assert {m.parent for m in modules} == subpackages | {package}  # every room is looked at
    offenders = []
    for module in modules:
        for node in ast.walk(ast.parse(module.read_text())):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            if any(n == "llmneo.demo" or n.startswith("llmneo.demo.") for n in names) and module != package / "cli.py":
                offenders.append(str(module.relative_to(package)))
    assert offenders == []
    assert not (package / "tiny.py").exists() and not (package / "world.py").exists()
