"""LLaMA-Factory keys that are not llmneo's own: those accepted and ignored, and those of missing features.

llmneo reads LLaMA-Factory YAML files unchanged. Keys of LLaMA-Factory or TrainingArguments that change
nothing here (`flash_attn`, `preprocessing_num_workers`, ...) are accepted with one warning. Keys of
features llmneo does not have (preference training, multimodal data, quantized training) and other
training stages are refused in one line, before any unknown-key suggestion: `pref_beta` means DPO, not
a typo of `kd_beta`.
"""

from __future__ import annotations

from typing import Any

from llmneo.errors import LlmneoError

SUPPORTED = "llmneo distils text-only causal LMs with stage: sft (supervised) or pt (raw text)"

UNSUPPORTED_STAGES = {"dpo": "DPO preference training", "kto": "KTO preference training",
                      "rm": "reward-model training", "ppo": "PPO reinforcement learning"}
UNSUPPORTED_FEATURES = {
    "preference / RLHF training (DPO, KTO, ORPO, SimPO, reward models, PPO)": (
        "pref_beta", "pref_ftx", "pref_loss", "pref_bco_weight", "dpo_label_smoothing", "simpo_gamma",
        "kto_chosen_weight", "kto_rejected_weight", "ld_alpha", "ref_model", "ref_model_adapters",
        "ref_model_quantization_bit", "reward_model", "reward_model_adapters", "reward_model_quantization_bit",
        "reward_model_type", "ppo_buffer_size", "ppo_epochs", "ppo_score_norm", "ppo_target",
        "ppo_whiten_rewards"),
    "multimodal training (images, videos, audio)": (
        "image_max_pixels", "image_min_pixels", "image_resolution", "image_do_pan_and_scan", "crop_to_patches",
        "video_max_pixels", "video_min_pixels", "video_resolution", "video_fps", "video_maxlen",
        "use_audio_in_video", "audio_sampling_rate", "freeze_vision_tower", "freeze_multi_modal_projector",
        "freeze_language_model", "train_mm_proj_only", "visual_inputs", "media_dir"),
    "quantized training (QLoRA)": (
        "quantization_bit", "quantization_method", "quantization_type", "double_quantization",
        "quantization_device_map"),
}
_FEATURE_OF_KEY = {key: feature for feature, keys in UNSUPPORTED_FEATURES.items() for key in keys}

# Keys llmneo accepts so that existing YAMLs run, but does not use.
IGNORED_KEYS = frozenset({
    "overwrite_cache", "preprocessing_num_workers", "flash_attn",
    "use_fast_tokenizer", "ddp_find_unused_parameters", "dataloader_num_workers",
    "save_strategy", "logging_strategy", "export_size", "export_legacy_format",
    "export_device", "do_eval", "do_predict", "plot_loss_keys", "include_num_input_tokens_seen",
    "save_only_model", "disable_tqdm", "push_to_hub", "hub_model_id", "tokenized_path", "streaming",
    "new_special_tokens", "resize_vocab", "upcast_layernorm",
    "enable_liger_kernel", "use_unsloth", "optim", "lora_bias", "create_new_adapter",
    "ddp_backend", "deepspeed", "fsdp", "fsdp_config", "tf32", "dataloader_pin_memory",
})


def check_supported(raw: dict[str, Any]) -> None:
    """Refuse an unsupported stage, then keys of unsupported features, in one line each."""
    stage = raw.get("stage")
    if isinstance(stage, str) and stage.strip().lower() in UNSUPPORTED_STAGES:
        name = stage.strip().lower()
        raise LlmneoError(f"stage '{name}' is not supported ({UNSUPPORTED_STAGES[name]}); {SUPPORTED}")
    for key in raw:
        feature = _FEATURE_OF_KEY.get(str(key))
        if feature is not None:
            raise LlmneoError(f"config key '{key}' is for {feature}, which llmneo does not support "
                              f"({SUPPORTED}); remove {key}")
