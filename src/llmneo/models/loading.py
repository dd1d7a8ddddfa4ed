"""Load the student, the teacher and the tokenizer; decide dtypes; check the vocabularies once.

Teacher and student share a tokenizer (`tokenizers_match` is the one test), unless the run distils across
tokenizers (crosstok/): then the teacher's own tokenizer is loaded beside it. Embedding matrices may be
padded differently (Qwen2.5: 151,665 tokens, 151,936 or 152,064 rows): losses then run over the real
`len(tokenizer)` entries only, so padding rows never receive probability mass.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from llmneo import hub
from llmneo.config.schema import Config, looks_like_hub_id, looks_local
from llmneo.data import templates
from llmneo.errors import LlmneoError
from llmneo.models import inputs, trained_run

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class Precision:
    """What mixed precision the run uses, after checking what the device supports."""

    mixed_precision: str  # accelerate's name: "no" | "bf16" | "fp16"
    compute_dtype: torch.dtype


def resolve_precision(config: Config) -> Precision:
    """bf16/fp16 only where the device supports them; otherwise fp32 with a warning."""
    if config.bf16:
        if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return Precision("bf16", torch.bfloat16)
        warnings.warn("bf16: true but this machine has no bf16-capable GPU; training in float32 instead")
    if config.fp16:
        if torch.cuda.is_available():
            return Precision("fp16", torch.float16)
        warnings.warn("fp16: true but there is no CUDA device; training in float32 instead")
    return Precision("no", torch.float32)


ROLES = ("student", "teacher", "eval", "merge", "prune")


def weight_dtype(config: Config, role: str, precision: Precision | None = None) -> torch.dtype:
    """The dtype `role`'s weights load in: every command asks here. `torch_dtype` wins when it is set.

    With torch_dtype auto:
      student  training: fp32 master weights when fully trained, else the run's compute dtype
      teacher  training and `llmneo cache`: the run's compute dtype (bf16 with bf16: true on a bf16 GPU)
      eval     `llmneo eval`: bf16 on a bf16-capable GPU (an 8B teacher in fp32 would double the memory),
               else fp32, whatever the bf16 key says
      merge    `llmneo export`: fp32, so adapters merge at full precision (the result is saved in the
               base's own dtype, see export.py)
      prune    `llmneo prune`: fp32 (block importance is measured, and the model saved, at full precision)
    `precision` is training's (resolve_precision); it is resolved here when not given.
    """
    if role not in ROLES:
        raise ValueError(f"unknown weight role {role!r}; one of {ROLES}")
    if config.torch_dtype != "auto":
        return DTYPES[config.torch_dtype]
    if role in ("merge", "prune") or (role == "student" and config.finetuning_type == "full"):
        return torch.float32
    if role == "eval":
        return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
    return (precision or resolve_precision(config)).compute_dtype


def saved_dtype(config: Config, base_path: str) -> torch.dtype | None:
    """The dtype `llmneo export` saves a merged model in, when it differs from the merge dtype: under auto
    the base model's own recorded dtype (a bf16 base stays bf16, after merging in fp32); None: keep it."""
    if config.torch_dtype != "auto":
        return None  # merged in torch_dtype already
    from transformers import AutoConfig

    original = AutoConfig.from_pretrained(base_path, trust_remote_code=config.trust_remote_code)
    recorded = getattr(original, "dtype", None) or getattr(original, "torch_dtype", None)
    if isinstance(recorded, str):
        recorded = DTYPES.get(recorded)
    return recorded if isinstance(recorded, torch.dtype) and recorded != torch.float32 else None


def _check_exists(path: str, key: str) -> None:
    if os.path.exists(path):
        return
    if looks_like_hub_id(path) and not looks_local(path):
        hub.require(path, "model", key)  # one line, not the library's retries, when the Hub cannot be reached
        return  # a Hub id that can be fetched: from_pretrained will fetch it or fail with its own reason
    # A missing local path must not reach from_pretrained, which would try it as a Hub id (and retry for long).
    raise LlmneoError(f"{key}: '{path}' does not exist; give a local model directory or a Hub id (owner/name)")


def _local_or_hub(path: str) -> str:
    """An existing local path made absolute, so what a model records as its `name_or_path` (and PEFT
    writes into adapter_config.json as the base model) still resolves from any working directory."""
    return os.path.abspath(path) if os.path.exists(path) else path


def load_tokenizer(path: str, key: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    _check_exists(path, key)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, TypeError) as exc:
        raise LlmneoError(f"{key}: could not load a tokenizer from '{path}': {_first_line(exc)}") from None
    if tokenizer.pad_token_id is None:
        # Padding positions are masked out of every loss, so any id works; eos is the usual choice.
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
        if tokenizer.pad_token_id is None:
            raise LlmneoError(f"{key}: tokenizer of '{path}' has no pad, eos or unk token; add a pad token")
    return tokenizer


def load_model(path: str, key: str, dtype: torch.dtype, trust_remote_code: bool = False):
    """`AutoModelForCausalLM` from a path or Hub id, with one-line errors for the usual mistakes."""
    from transformers import AutoConfig, AutoModelForCausalLM

    _check_exists(path, key)
    if os.path.isdir(path) and not Path(path, "config.json").is_file():
        if Path(path, "adapter_config.json").is_file():
            raise LlmneoError(f"{key}: '{path}' is a PEFT adapter, not a model; set {key} to its base "
                              f"model and adapter_name_or_path={path}")
        raise LlmneoError(f"{key}: '{path}' has no config.json; point it at a Hugging Face model directory")
    try:
        model_config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as exc:
        raise LlmneoError(f"{key}: could not read the model config of '{path}': {_first_line(exc)}") from None
    source = _local_or_hub(path)
    try:
        with _weights_only(source) as weights:
            model = AutoModelForCausalLM.from_pretrained(
                weights, config=model_config, dtype=dtype, trust_remote_code=trust_remote_code)
        model.name_or_path = model.config._name_or_path = source  # the folder, not _weights_only's view of it
    except ValueError as exc:
        if "Unrecognized configuration class" in str(exc) or "AutoModelForCausalLM" in str(exc):
            raise LlmneoError(f"{key}: '{path}' is not a causal language model (model type "
                              f"'{model_config.model_type}'); llmneo distils decoder-only causal LMs") from None
        raise LlmneoError(f"{key}: could not load '{path}': {_first_line(exc)}") from None
    except OSError as exc:
        raise LlmneoError(f"{key}: could not load weights from '{path}': {_first_line(exc)}") from None
    return model


@contextlib.contextmanager
def _weights_only(path: str):
    """`path`, or where it holds a model and adapter files side by side (an earlier LoRA run's, kept by a full
    run into the same folder, or a LoRA run into a model's folder), a view of it without the adapter files.

    transformers' from_pretrained applies an adapter_config.json it finds beside a model's weights; llmneo
    applies adapters explicitly (adapters.py, load_trained), so a model path loads the model's own weights."""
    folder = Path(path)
    if not (folder.is_dir() and (folder / "adapter_config.json").is_file() and (folder / "config.json").is_file()):
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="llmneo-model-") as view:
        for child in folder.iterdir():
            if not child.name.startswith("adapter_"):
                os.symlink(child.resolve(), Path(view, child.name))
        yield view


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def check_vocab(tokenizer, model, key: str, path: str) -> None:
    rows = model.get_output_embeddings().weight.shape[0]
    if rows < len(tokenizer):
        raise LlmneoError(f"{key}: '{path}' has {rows} output rows but its tokenizer has {len(tokenizer)} "
                          f"tokens; the model and tokenizer do not belong together")


def tokenizers_match(student_tok, teacher_tok) -> bool:
    """Whether two tokenizers index one vocabulary (every token at the same id): the one answer to "do these
    tokenizers match?" that training, eval, the cache and the sweep ask, so KD can compare them token by token."""
    return student_tok.get_vocab() == teacher_tok.get_vocab()


def check_same_tokenizer(student_tok, teacher_tok, student_path: str, teacher_path: str) -> None:
    """KD compares distributions token by token, so both sides must index the same vocabulary."""
    if tokenizers_match(student_tok, teacher_tok):
        return
    raise LlmneoError(
        f"teacher and student tokenizers differ: teacher '{teacher_path}' has {len(teacher_tok)} tokens, "
        f"student '{student_path}' has {len(student_tok)} tokens (or other ids); KD needs one shared "
        f"vocabulary, so pick a student built on the teacher's tokenizer (or set kd_cross_tokenizer: auto to "
        f"distil across tokenizers)")


def crosses_tokenizers(config: Config, student_tok, teacher_tok, teacher_path: str) -> bool:
    """Whether KD runs across tokenizers: the vocabularies differ (kd_cross_tokenizer auto or true), or they are
    the same and true forces it. false keeps the one-line refusal of a different tokenizer."""
    same = tokenizers_match(student_tok, teacher_tok)
    if same or config.cross_tokenizer == "false":
        if not same:
            check_same_tokenizer(student_tok, teacher_tok, config.model_name_or_path or teacher_path, teacher_path)
        return config.cross_tokenizer == "true"
    return True


def config_crosses_tokenizers(config: Config) -> bool:
    """`crosses_tokenizers` for a config before any model is loaded (llmneo sweep checks every cell first): what
    kd_cross_tokenizer decides alone (true, false; several teachers or no student never cross under auto), else
    the answer for the two tokenizers, loaded here."""
    if config.cross_tokenizer != "auto" or len(config.teachers) != 1 or not config.model_name_or_path:
        return config.cross_tokenizer == "true"
    student = load_tokenizer(config.model_name_or_path, "model_name_or_path", config.trust_remote_code)
    teacher_path = config.teachers[0]
    teacher = load_tokenizer(teacher_path, "teacher_model_name_or_path", config.trust_remote_code)
    return crosses_tokenizers(config, student, teacher, teacher_path)


@dataclass
class Loaded:
    student: torch.nn.Module
    teacher: torch.nn.Module | None  # the first (or only) teacher
    tokenizer: object
    vocab_size: int  # the real vocabulary, len(tokenizer): losses run over these entries only
    teachers: list = dataclasses.field(default_factory=list)  # every teacher, in config order
    teacher_tokenizer: object = None  # cross-tokenizer KD only: the teacher's own tokenizer


def load(config: Config, precision: Precision, *, with_teacher: bool) -> Loaded:
    """Tokenizer, student and (optionally) teacher, with every compatibility check done here, once."""
    student_path = config.model_name_or_path
    if not student_path:
        raise LlmneoError("model_name_or_path is not set; give the student model, e.g. "
                          "model_name_or_path=meta-llama/Llama-3.2-1B-Instruct")
    remote = config.trust_remote_code
    tokenizer = load_tokenizer(config.adapter_name_or_path if _has_tokenizer(config.adapter_name_or_path)
                               else student_path, "model_name_or_path", remote)
    missing = templates.missing_tokens(tokenizer, config.template) if config.stage == "sft" else []
    if missing and (config.finetuning_type != "full" or config.uses_kd):
        # LLaMA-Factory adds such tokens and resizes the embeddings; here only where the new rows can train: a
        # LoRA adapter leaves them at their initial values, and a teacher has no distribution over them.
        templates.check_tokens(tokenizer, config.template, fixes=(
            "; only full fine-tuning without a teacher (finetuning_type: full) can add them, since a LoRA "
            "adapter does not train new embedding rows and a teacher has none"))
    dtype = weight_dtype(config, "teacher", precision)
    teachers, teacher_tokenizer = [], None
    for path in config.teachers if with_teacher else []:
        teacher, own = load_teacher(config, tokenizer, dtype, path, with_tokenizer=True)
        teachers.append(teacher)
        if own is not tokenizer:
            if len(config.teachers) > 1:
                raise LlmneoError(f"teacher '{path}' has another tokenizer than the student; cross-tokenizer KD "
                                  f"takes one teacher, not a mixture or routing of {len(config.teachers)}")
            teacher_tokenizer = own
    student = load_model(student_path, "model_name_or_path", weight_dtype(config, "student", precision), remote)
    if missing:
        add_template_tokens(tokenizer, student, config.template, missing)
    check_vocab(tokenizer, student, "model_name_or_path", student_path)
    check_packing(config, student, "model_name_or_path")
    if config.stage == "sft":
        stop_on_turn_end(student, tokenizer, config.template)
    warn_about_sizes(config, student, teachers)
    return Loaded(student, teachers[0] if teachers else None, tokenizer, len(tokenizer), teachers, teacher_tokenizer)


def add_template_tokens(tokenizer, model, template: str, missing: list[str]) -> None:
    """Add the built-in template's `missing` markers to `tokenizer` as special tokens, make its end-of-turn
    marker the EOS, and give `model` an embedding and output row for each, initialised to the mean of the
    existing rows (LLaMA-Factory's resize_vocab and replace_eos; the model must train every weight)."""
    first = len(tokenizer)
    tokenizer.add_tokens(missing, special_tokens=True)  # never split, skipped when decoding
    if templates.TURN_END.get(template) in missing:
        tokenizer.eos_token = templates.TURN_END[template]
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    with torch.no_grad():
        matrices = {id(m.weight): m.weight for m in (model.get_input_embeddings(), model.get_output_embeddings())}
        for weight in matrices.values():  # (rows, H); a padded model's spare rows are reused, from `first` on
            weight[first:len(tokenizer)] = weight[:first].mean(dim=0)
    model.config.eos_token_id = tokenizer.eos_token_id
    warnings.warn(f"template '{template}': added {', '.join(missing)} to the tokenizer as special tokens, with "
                  f"embedding rows initialised to the mean embedding; {tokenizer.eos_token} ends replies (EOS); the "
                  f"trained model and tokenizer are saved with them")


def stop_on_turn_end(model, tokenizer, template: str | None) -> None:
    """Generation stops where a built-in template ends a reply: its end-of-turn token joins the model's
    generation_config EOS ids (a tokenizer's own chat template comes with the model's own stop tokens)."""
    if getattr(tokenizer, "chat_template", None):
        return
    current = model.generation_config.eos_token_id
    ids = [] if current is None else [current] if isinstance(current, int) else list(current)
    for stop in (tokenizer.eos_token_id, templates.turn_end_id(tokenizer, template)):
        if stop is not None and stop not in ids:
            ids.append(stop)
    model.generation_config.eos_token_id = ids[0] if len(ids) == 1 else ids or None


def same_model(a: str | None, b: str | None) -> bool:
    """Whether two model paths (or Hub ids) name the same model."""
    if not a or not b:
        return False
    if os.path.exists(a) and os.path.exists(b):
        return os.path.samefile(a, b)
    return a.rstrip("/") == b.rstrip("/")


def warn_about_sizes(config: Config, student: torch.nn.Module, teachers: list[torch.nn.Module]) -> None:
    """One line each: a cutoff_len past a model's positions, and a teacher smaller than the student."""
    roles = [("student", config.model_name_or_path, student)] + [
        ("teacher", path, model) for path, model in zip(config.teachers, teachers)]
    for role, path, model in roles:
        positions = getattr(model.config, "max_position_embeddings", None)
        if isinstance(positions, int) and config.cutoff_len > positions:
            warnings.warn(f"cutoff_len={config.cutoff_len} is above the {role}'s max_position_embeddings={positions} "
                          f"('{path}'): examples longer than {positions} tokens reach positions it was not built for; "
                          f"lower cutoff_len to {positions} or less")
    size = student.num_parameters()
    for path, model in zip(config.teachers, teachers):
        if model.num_parameters() < size and not same_model(path, config.model_name_or_path):
            warnings.warn(f"teacher '{path}' has {model.num_parameters():,} parameters, fewer than the student's "
                          f"{size:,}: KD distils a larger teacher into a smaller student; check that "
                          f"teacher_model_name_or_path and model_name_or_path are not swapped")


def load_teacher(config: Config, tokenizer, dtype: torch.dtype, path: str | None = None, *,
                 with_tokenizer: bool = False):
    """The frozen teacher at `path` (default: the config's one teacher; eval mode, no grad), after checking it
    shares `tokenizer`'s vocabulary. `with_tokenizer`: return (teacher, tokenizer), where the tokenizer is
    `tokenizer` itself unless KD crosses tokenizers (models.crosses_tokenizers), then the teacher's own."""
    if path is None and len(config.teachers) > 1:
        raise LlmneoError(f"this command uses one teacher, but teacher_model_name_or_path lists {len(config.teachers)};"
                          f" give one")
    path = path or config.teacher_model_name_or_path
    if not path:
        raise LlmneoError("teacher_model_name_or_path is not set; give the teacher model")
    remote = config.trust_remote_code
    teacher_tok = load_tokenizer(path, "teacher_model_name_or_path", remote)
    if with_tokenizer and crosses_tokenizers(config, tokenizer, teacher_tok, path):
        own = teacher_tok
    else:
        check_same_tokenizer(tokenizer, teacher_tok, config.model_name_or_path or path, path)
        own = tokenizer
    teacher = load_model(path, "teacher_model_name_or_path", dtype, remote)
    check_vocab(own, teacher, "teacher_model_name_or_path", path)
    check_packing(config, teacher, "teacher_model_name_or_path")
    return (freeze(teacher), own) if with_tokenizer else freeze(teacher)


def check_packing(config: Config, model: torch.nn.Module, key: str) -> None:
    """With neat_packing, refuse a model that would let packed examples attend to each other (models.inputs)."""
    if config.effective_neat_packing:
        rows = max(config.per_device_train_batch_size, config.per_device_eval_batch_size)
        inputs.check_isolates(model, key, rows)


def freeze(teacher: torch.nn.Module) -> torch.nn.Module:
    """Eval mode and no gradients: the one place a teacher is frozen (load_teacher calls it; the teacher
    signal, the evaluator and engines.place_teacher rely on it)."""
    return teacher.eval().requires_grad_(False)


def _has_tokenizer(path: str | None) -> bool:
    return bool(path) and Path(path, "tokenizer_config.json").is_file()


def load_trained(config: Config, dtype: torch.dtype):
    """(model, tokenizer) for evaluation: a model dir / Hub id, an adapter dir, or base + adapter."""
    from peft import PeftModel

    path = config.model_name_or_path
    if not path:
        raise LlmneoError("model_name_or_path is not set; give a model dir, a Hub id or a trained adapter dir")
    adapter = config.adapter_name_or_path
    if adapter is None and trained_run.adapter_base(path) is not None:
        path, adapter = trained_run.recorded_base(path), path
    remote = config.trust_remote_code
    tokenizer = load_tokenizer(adapter if _has_tokenizer(adapter) else path, "model_name_or_path", remote)
    model = load_model(path, "model_name_or_path", dtype, remote)
    check_vocab(tokenizer, model, "model_name_or_path", path)
    check_packing(config, model, "model_name_or_path")
    if adapter is not None:
        if trained_run.adapter_base(adapter) is None:
            raise trained_run.not_an_adapter(adapter)
        try:
            model = PeftModel.from_pretrained(model, adapter)
        except (ValueError, RuntimeError, KeyError) as exc:
            raise LlmneoError(f"adapter '{adapter}' does not fit base model '{path}': "
                              f"{str(exc).splitlines()[0]}") from None
    return model.eval(), tokenizer
