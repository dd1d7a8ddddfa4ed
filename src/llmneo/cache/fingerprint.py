"""What a teacher cache is keyed to: its fingerprint, and the cache folder of each of several teachers.

The fingerprint ties the cache to the teacher (its config and weight files), the tokenizer vocabulary,
the chat template, stage, packing, neat packing, cutoff_len and the tokenized dataset rows (a cross-tokenizer cache also
the teacher's vocabulary and template); training refuses a cache whose fingerprint differs from the run's
and names the part that differs (settings before rows, `refuse_mismatch`). k is recorded beside it in
index.json: any k trains, so it is not compared. Writers (write.py, capture.py, cross.py, axolotl.py) record
it and teachers.choose computes the run's; this module knows nothing of teachers.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

from llmneo.config.schema import Config
from llmneo.data import templates
from llmneo.errors import LlmneoError


def _sha(payload: bytes) -> str:
    return hashlib.sha256(payload).hexdigest()[:16]


def teacher_identity(path: str) -> str:
    """A content-based id of a teacher: its config plus the names and sizes of its weight files."""
    root = Path(path)
    if not root.is_dir():
        return f"hub:{path}"
    parts = [(root / "config.json").read_bytes() if (root / "config.json").is_file() else b""]
    for weight in sorted(root.glob("*.safetensors")):
        parts.append(f"{weight.name}:{weight.stat().st_size}".encode())
    return _sha(b"\n".join(parts))


def served_identity(model: str) -> str:
    """The fingerprint's teacher part for a served teacher: the served model's name."""
    return f"endpoint-model:{model}"


def fingerprint(config: Config, tokenizer, examples: list[dict], teacher: str | None = None,
                teacher_tokenizer=None) -> dict:
    """What a cache's rows depend on that training compares, config-level parts first (k is not one).

    The order is the order of comparison: a changed setting that changes tokenization (cutoff_len, stage,
    packing, template) also changes the tokenized rows, so the settings are compared, and named, before the
    rows, whose difference is then only reported when no named setting explains it.
    """
    vocab = json.dumps(sorted(tokenizer.get_vocab().items())).encode()
    template = str(getattr(tokenizer, "chat_template", None) or config.template or "default").encode()
    rows = hashlib.sha256()
    for example in examples:
        rows.update(json.dumps([example["input_ids"], example["labels"]]).encode())
    if teacher is None and config.teacher_model_name_or_path:
        teacher = teacher_identity(config.teacher_model_name_or_path)
    elif teacher is None and config.teacher_endpoint and config.teacher_endpoint_model:
        teacher = served_identity(config.teacher_endpoint_model)
    found = {
        "teacher": teacher,  # None: not known to this run (then not compared)
        "tokenizer vocabulary": _sha(vocab),
        "template": _sha(template),
        "stage": config.stage,
        "packing": config.effective_packing,
        "neat_packing": config.effective_neat_packing,  # the rows' positions restart per example
        "cutoff_len": config.cutoff_len,
    }
    if teacher_tokenizer is not None:  # a cross-tokenizer cache: the alignment depends on the teacher's side too
        found["teacher tokenizer vocabulary"] = _sha(json.dumps(sorted(teacher_tokenizer.get_vocab().items())).encode())
        found["teacher template"] = _sha(templates.resolve(teacher_tokenizer, config.teacher_template
                                                           or config.template)[0].encode())
    found["dataset rows"] = rows.hexdigest()[:16]
    return found


# Parts added later, with what a cache written before them holds: the dataset rows do not tell a neat-packed
# cache from a plainly packed one (same ids and labels), so an older cache counts as neat_packing false.
RECORDED_SINCE = {"neat_packing": False}


def refuse_mismatch(root: Path, found: dict, expected: dict) -> None:
    """Refuse the cache at `root` when its recorded fingerprint `found` differs from the run's `expected`,
    naming the first part that differs (in fingerprint order: named settings before the dataset rows)."""
    for part, value in expected.items():
        if part == "teacher" and (value is None or found.get(part) is None):
            continue  # no teacher named in this run: nothing to compare
        if part not in found and part not in RECORDED_SINCE:
            continue  # a cache written before this part was recorded; the dataset rows still guard it
        recorded = found.get(part, RECORDED_SINCE.get(part))
        if recorded != value:
            raise LlmneoError(f"teacher_cache '{root}' does not match this run: the {part} differs "
                              f"(cache {recorded}, run {value}); rebuild it with llmneo cache CONFIG.yaml")


def one_teacher(config: Config, i: int) -> Config:
    """The config of teacher `i` of several alone, with its own cache folder (teacher_cache/teacher-i)."""
    key = "teacher_model_name_or_path" if config.teacher_model_name_or_path else "teacher_endpoint"
    return dataclasses.replace(config, **{key: config.teachers[i]}, teacher_weights=None, teacher_column=None,
                               teacher_cache=str(Path(config.teacher_cache) / f"teacher-{i}"))
