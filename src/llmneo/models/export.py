"""Merge a trained adapter into its base model and save a plain Hugging Face model.

The merge uses PEFT's safe merge (it checks the merged weights for NaN/inf before committing).
The result loads with `AutoModelForCausalLM.from_pretrained(export_dir)`, no PEFT needed. An adapter
trained with a built-in `template` (for a tokenizer without a chat template) is exported with that
template as the tokenizer's chat template; `llmneo export` reads it from the run's llmneo_config.yaml. The
merged model's generation_config then stops on the template's end-of-turn token as well as on EOS.
"""

from __future__ import annotations

from pathlib import Path

from llmneo import run_dir
from llmneo.config.schema import Config, input_paths
from llmneo.data import templates
from llmneo.errors import LlmneoError
from llmneo.models import loading, trained_run


def base_model_of(adapter_dir: str) -> str:
    """The base model recorded in an adapter's config (what `model_name_or_path` defaults to)."""
    if trained_run.adapter_base(adapter_dir) is not None:
        return trained_run.recorded_base(adapter_dir)
    if Path(adapter_dir, "config.json").is_file():
        raise LlmneoError(f"adapter_name_or_path '{adapter_dir}' is a full model, not an adapter; "
                          f"it already loads with AutoModelForCausalLM, nothing to merge")
    raise LlmneoError(f"adapter_name_or_path '{adapter_dir}' has no adapter_config.json; "
                      f"point it at the output_dir of a LoRA run")


def run(config: Config) -> Path:
    """Merge `adapter_name_or_path` into `model_name_or_path` and save to `export_dir`."""
    from peft import PeftModel

    adapter = config.adapter_name_or_path
    if not adapter:
        raise LlmneoError("adapter_name_or_path is not set; give the adapter to merge, e.g. "
                          "adapter_name_or_path=out/neo")
    if config.model_name_or_path:
        base_path = config.model_name_or_path
        if trained_run.adapter_base(adapter) is None:
            base_model_of(adapter)  # one line: a full model or no adapter at all
    else:
        base_path = base_model_of(adapter)
    inputs = {**input_paths(config), "model_name_or_path": base_path, "adapter_name_or_path": adapter}
    # Checked now, written only once the merge succeeded: an earlier export stays until this one replaces it.
    output = run_dir.check(config.export_dir, config.overwrite_output_dir, run_dir.MODEL_FILES, key="export_dir",
                           inputs=inputs)
    dtype = loading.weight_dtype(config, "merge")
    tokenizer_source = adapter if Path(adapter, "tokenizer_config.json").is_file() else base_path
    tokenizer = loading.load_tokenizer(tokenizer_source, "model_name_or_path", config.trust_remote_code)
    shipped = config.template if config.template and not getattr(tokenizer, "chat_template", None) else None
    if shipped:
        # The run trained with a built-in template (given, or from its llmneo_config.yaml): the merged model
        # carries it as its chat template, so apply_chat_template formats prompts as in training. A template
        # whose end-of-turn marker the tokenizer lacks would never stop: refused.
        templates.check_tokens(tokenizer, shipped)
        chat_template = templates.resolve(tokenizer, shipped)[0]
    base = loading.load_model(base_path, "model_name_or_path", dtype, config.trust_remote_code)
    try:
        peft_model = PeftModel.from_pretrained(base, adapter)
    except (ValueError, RuntimeError, KeyError) as exc:
        raise LlmneoError(f"adapter '{adapter}' does not fit base model '{base_path}': "
                          f"{str(exc).splitlines()[0]}") from None
    try:
        merged = peft_model.merge_and_unload(safe_merge=True)
    except ValueError as exc:
        raise LlmneoError(f"merging '{adapter}' produced non-finite weights: {exc}") from None
    if shipped:
        loading.stop_on_turn_end(merged, tokenizer, shipped)  # generate() stops at the template's end of turn
        tokenizer.chat_template = chat_template
    saved_dtype = loading.saved_dtype(config, base_path)
    if saved_dtype is not None:
        merged = merged.to(saved_dtype)
    with run_dir.replacing(output) as staging:
        merged.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
    return output.path
