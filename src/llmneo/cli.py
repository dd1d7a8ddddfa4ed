"""`llmneo <command> [CONFIG.yaml] [key=value ...]`: subcommands → functions; nothing else.

A user error (LlmneoError) prints one line, `llmneo: error: ...`, and exits 2.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from typing import Callable, NamedTuple

from llmneo.config import reference
from llmneo.config import schema as config_mod
from llmneo.errors import LlmneoError
from llmneo.models import trained_run
from llmneo.process import is_main_process
from llmneo.train.preemption import Preempted

_EPILOG = """\
Every config key can be set in the YAML file or as key=value after it (later wins).

Config keys:
{keys}
"""


def _parser() -> argparse.ArgumentParser:
    keys = reference.help_text()
    parser = argparse.ArgumentParser(
        prog="llmneo",
        description="Parameter-efficient knowledge distillation of LLMs (LLM-NEO: LoRA + KD).",
        epilog=_EPILOG.format(keys=keys),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, command in COMMANDS.items():
        cmd = sub.add_parser(name, help=command.summary, description=command.summary,
                             epilog=_EPILOG.format(keys=keys), formatter_class=argparse.RawDescriptionHelpFormatter)
        cmd.add_argument("args", nargs="*", metavar="CONFIG.yaml | key=value",
                         help="a YAML config file (first) and/or key=value settings")
    return parser


def _split(args: list[str]) -> tuple[str | None, list[str]]:
    """The first argument is a config file unless it is a key=value override."""
    if args and "=" not in args[0]:
        return args[0], args[1:]
    return None, args


def _flag_style(argv: list[str]) -> str | None:
    """The one-line error for a setting written as a flag, `--lora_rank 8` or `--lora_rank=8` (argparse alone
    would say only "unrecognized arguments"); None when there is none."""
    for i, arg in enumerate(argv[1:], 1):  # argv[0] is the command
        if not arg.startswith("--") or arg in ("--", "--help"):
            continue
        name, eq, value = arg[2:].partition("=")
        following = argv[i + 1] if i + 1 < len(argv) else ""
        if not eq and following and not following.startswith("-") and "=" not in following:
            arg, value = f"{arg} {following}", following
        name = name.replace("-", "_")
        if name.endswith("_api_key_env"):  # an API key pasted as its value is never echoed
            arg, value = f"--{name}", ""
        return f"'{arg}' is flag syntax; llmneo takes settings as key=value: {name}={value or 'VALUE'}"
    return None


def _cpu_defaults() -> None:
    """What the demo pins for speed, for every command: passive OpenMP waits, unless the user chose a policy.

    OpenMP's default spin-wait keeps idle threads busy at every barrier; on a CPU shared with other work a
    training step was 40x slower (20 s against 0.5 s passive). OpenMP reads the policy once, when torch loads
    it, so this runs before any command imports torch.
    """
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def _quiet_libraries() -> None:
    def show(message, category, filename, lineno, file=None, line=None):
        # Under torchrun every rank runs the same checks on the same config and data, so rank 0 says it all.
        if issubclass(category, (DeprecationWarning, FutureWarning)) or not is_main_process():
            return
        print(f"llmneo: warning: {str(message).splitlines()[0]}", file=sys.stderr)

    warnings.showwarning = show
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # llmneo shows its own progress bars; the libraries' per-file bars ("Loading weights") are noise.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    # Without network, huggingface_hub logs every retry; llmneo reports the failure itself, in one line.
    os.environ.setdefault("HF_HUB_VERBOSITY", "error")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


# Each command is one function of (config file, key=value overrides) -> exit code, named in COMMANDS below. It
# imports what it runs (and with it torch) inside, after loading its config (sweep and demo load theirs), so
# `llmneo --help` and a config error never load torch.
def _train(path: str | None, overrides: list[str]) -> int:
    cfg = config_mod.load(path, overrides)
    from llmneo.train import loop

    results = loop.run(cfg)
    if is_main_process():
        final = results["final_loss"]
        shown = "n/a" if final is None else f"{final:.4f}"
        print(f"llmneo: trained {results['method']} in {results['train_runtime']:.1f}s, "
              f"final loss {shown}; results in {cfg.output_dir}")
    return 0


# eval and export of a trained output_dir default to its saved keys (models/trained_run.py: template, cutoff_len, ...;
# eval also the run's held-out split when no dataset is given)
def _export(path: str | None, overrides: list[str]) -> int:
    cfg = trained_run.load(path, overrides, "export")
    from llmneo.models import export

    out = export.run(cfg)
    print(f"llmneo: merged model written to {out}")
    return 0


def _eval(path: str | None, overrides: list[str]) -> int:
    cfg = trained_run.load(path, overrides, "eval")
    from llmneo import evaluate

    print(evaluate.summary(evaluate.run(cfg)))
    return 0


def _prune(path: str | None, overrides: list[str]) -> int:
    cfg = config_mod.load(path, overrides)
    from llmneo.models import prune

    done = prune.run(cfg)
    print(f"llmneo: kept layers {done['kept_layers']} of {done['original_num_layers']} "
          f"({done['params']:,} parameters); pruned model written to {cfg.output_dir}")
    return 0


def _cache(path: str | None, overrides: list[str]) -> int:
    if path in CACHE_CONVERSIONS:  # `llmneo cache export|import ...`: the first word is the verb, not a config file
        return _convert_cache(path, overrides)
    cfg = config_mod.load(path, overrides)
    from llmneo.cache import write as cache

    done = cache.write(cfg)
    print(f"llmneo: cached top-{done['k']} teacher log-probs for {done['tokens']:,} response tokens of "
          f"{done['examples']} examples in {done['dir']} ({done['bytes_per_token']:.0f} bytes per token)"
          + (f"; {done['aligned_fraction']:.1%} of them aligned to a teacher span" if "aligned_fraction" in done
             else ""))
    return 0


def _sweep(path: str | None, overrides: list[str]) -> int:
    from llmneo.sweep import grid

    return grid.run(path, overrides)


def _demo(path: str | None, overrides: list[str]) -> int:
    from llmneo.demo import runner as demo

    demo.run(path, overrides)
    return 0


CACHE_CONVERSIONS = ("export", "import")


def _convert_cache(verb: str, args: list[str]) -> int:
    """`llmneo cache export|import FORMAT [CONFIG.yaml] FILE [key=value ...]`."""
    from llmneo.cache import axolotl

    usage = f"llmneo cache {verb} FORMAT [CONFIG.yaml] FILE [key=value ...], e.g. llmneo cache {verb} axolotl " \
            f"config.yaml {'out' if verb == 'export' else 'in'}.jsonl"
    if not args or "=" in args[0] or args[0].endswith((".yaml", ".yml", ".jsonl", ".parquet")):
        raise LlmneoError(f"llmneo cache {verb} needs a format ({', '.join(axolotl.FORMATS)}): {usage}")
    fmt, rest = args[0], args[1:]
    axolotl.check_format(fmt, verb)
    files = [a for a in rest if "=" not in a]
    overrides = [a for a in rest if "=" in a]
    if len(files) not in (1, 2):
        raise LlmneoError(f"llmneo cache {verb} takes a config file (optional) and the dataset file, got "
                          f"{len(files)} file names: {usage}")
    path, file = (None, files[0]) if len(files) == 1 else files
    cfg = config_mod.load(path, overrides)
    if verb == "export":
        done = axolotl.export_cache(cfg, fmt, file)
        print(f"llmneo: exported {done['examples']} examples ({done['tokens']:,} teacher rows, top-{done['k']}) from "
              f"{cfg.teacher_cache} to {done['file']} as {fmt}'s KD dataset; target_logprobs at kd_temperature "
              f"{done['temperature']:g}, renormalized over the top-{done['k']}; the tail mass dropped (axolotl keeps "
              f"none) was {100 * done['tail_mass']:.2f} % on average at T = 1 (more at a higher kd_temperature)")
    else:
        done = axolotl.import_cache(cfg, fmt, file)
        print(f"llmneo: imported top-{done['k']} teacher log-probs for {done['tokens']:,} response tokens of "
              f"{done['examples']} examples from {file} into {done['dir']} ({done['bytes_per_token']:.0f} bytes "
              f"per token; tail mass 0, as axolotl keeps none)")
    return 0


class Command(NamedTuple):
    summary: str
    needs_settings: bool  # a YAML file and/or key=value (both work alone)
    run: Callable[[str | None, list[str]], int]  # (config file, overrides) -> exit code


COMMANDS = {
    "train": Command("Train a student (Neo, KD, LoRA or SFT, chosen by the config).", True, _train),
    "export": Command("Merge a LoRA adapter into its base model and save a plain HF model.", False, _export),
    "eval": Command("Perplexity, KL to a teacher and top-1 agreement on a dataset; lm-eval tasks.", False, _eval),
    "prune": Command("Derive a shallower student from a model by depth pruning (block influence).", False, _prune),
    "cache": Command("Run the teacher once over the training data and cache its top-k log-probs. `llmneo cache "
                     "export|import axolotl [CONFIG.yaml] FILE [key=value ...]` converts teacher_cache to or from "
                     "axolotl's KD dataset (.jsonl or .parquet).", True, _cache),
    "sweep": Command("Train and score a grid of settings (key=v1,v2 ...), one run per cell; sweep.csv + heatmap.",
                     True, _sweep),
    "demo": Command("The four-arm comparison (SFT, LoRA, KD, Neo) on a toy world, on CPU, in minutes.", False, _demo),
}


def dispatch(command: str, args: list[str]) -> int:
    if COMMANDS[command].needs_settings and not args:
        raise LlmneoError(f"llmneo {command} needs a config: a YAML file and/or key=value settings, e.g. llmneo "
                          f"{command} config.yaml, or llmneo {command} model_name_or_path=... dataset=... "
                          "output_dir=...")
    return COMMANDS[command].run(*_split(args))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    _cpu_defaults()
    parser = _parser()
    flag = _flag_style(argv)
    if flag is not None and argv[0] in COMMANDS:
        print(f"llmneo: error: {flag}", file=sys.stderr)
        return 2
    ns = parser.parse_args(argv)
    if ns.command is None:
        parser.print_help()
        return 2
    _quiet_libraries()
    try:
        return dispatch(ns.command, ns.args)
    except LlmneoError as exc:
        print(f"llmneo: error: {exc}", file=sys.stderr)
        return 2
    except Preempted as stop:
        if is_main_process():
            print(f"llmneo: stopped by {stop.signal_name} after step {stop.step}; checkpoint written to "
                  f"{stop.checkpoint_dir}. Resume with the same command plus resume_from_checkpoint=auto",
                  file=sys.stderr)
        return stop.exit_code
    except KeyboardInterrupt:
        print("llmneo: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
