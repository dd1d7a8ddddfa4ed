"""Other tools' config keys and what they are called here; the hint for an unknown key.

Users arrive with TRL, axolotl, torchtune or LLaMA-Factory configs in their heads. Edit distance alone
sends them to keys that exist but do something else (`max_seq_length` to `max_new_tokens`, `batch_size`
to `val_size`), so an unknown key is looked up in PEERS first: its llmneo name, or a plain "llmneo has no
equivalent". Then the same words in another order (`temperature_kd`), a close typo, a unique prefix;
and no hint at all rather than a far-fetched one.
"""

from __future__ import annotations

import difflib
from collections.abc import Collection
from dataclasses import dataclass

TRL_SFT = "TRL's SFTConfig, GKDConfig and DistillationConfig"
TRL_KD = "TRL's GKDConfig, GOLDConfig and DistillationConfig"
TRL_GOLD = "TRL's GOLDConfig"
TRL_DIST = "TRL's DistillationConfig"
AXOLOTL = "axolotl"
AXOLOTL_KD = "axolotl's KD plugin"
TORCHTUNE = "torchtune's recipes"
PEFT = "PEFT's LoraConfig"
LLAMA_FACTORY = "LLaMA-Factory"


@dataclass(frozen=True)
class PeerKey:
    owner: str  # whose key it is
    ours: str | None  # the llmneo key that does the same thing; None: there is none
    note: str = ""  # how to set ours, or what to do instead


PEERS: dict[str, PeerKey] = {
    # --- models ---------------------------------------------------------------------------------
    "base_model": PeerKey(AXOLOTL, "model_name_or_path"),
    "model": PeerKey(TORCHTUNE, "model_name_or_path", "a local HF model dir or a Hub id; LoRA settings are "
        "lora_rank, lora_alpha, lora_target"),
    "checkpointer": PeerKey(TORCHTUNE, "model_name_or_path", "the HF model dir, checkpoint_dir there"),
    "teacher_model": PeerKey(f"{TORCHTUNE} and TRL's trainers", "teacher_model_name_or_path"),
    "teacher_checkpointer": PeerKey(TORCHTUNE, "teacher_model_name_or_path", "the HF model dir, checkpoint_dir "
        "there"),
    "lora_model_dir": PeerKey(AXOLOTL, "adapter_name_or_path"),
    "tokenizer_config": PeerKey(AXOLOTL, None, "the tokenizer loads from model_name_or_path (or the adapter's dir)"),
    "tokenizer": PeerKey(TORCHTUNE, None, "the tokenizer loads from model_name_or_path (or the adapter's dir)"),
    "teacher_tokenizer_name_or_path": PeerKey(TRL_GOLD, None, "the teacher's tokenizer loads from "
        "teacher_model_name_or_path"),
    "model_init_kwargs": PeerKey(TRL_SFT, None, "the dtype is torch_dtype; trust_remote_code is its own key"),
    "teacher_model_init_kwargs": PeerKey(TRL_KD, None, "the teacher's dtype is torch_dtype; trust_remote_code is "
        "its own key"),
    "dtype": PeerKey(TORCHTUNE, "torch_dtype", "or bf16: true for mixed precision"),
    "load_in_8bit": PeerKey(AXOLOTL, None, "quantized training (QLoRA) is not supported"),
    "load_in_4bit": PeerKey(AXOLOTL, None, "quantized training (QLoRA) is not supported"),
    # --- the loss -------------------------------------------------------------------------------
    "kd_alpha": PeerKey(AXOLOTL_KD, "kd_ratio", "loss = (1 - kd_ratio)*CE + kd_ratio*KD"),
    "kd_ce_alpha": PeerKey(AXOLOTL_KD, "kd_ratio", "the CE weight is 1 - kd_ratio"),
    "kd_trainer": PeerKey(AXOLOTL_KD, None, "a teacher (teacher_model_name_or_path, teacher_cache or "
        "teacher_endpoint) turns KD on"),
    "kd_normalize_topk": PeerKey(AXOLOTL_KD, None),
    "kd_online_server_base_url": PeerKey(AXOLOTL_KD, "teacher_endpoint"),
    "kd_online_server_model": PeerKey(AXOLOTL_KD, "teacher_endpoint_model"),
    "kd_online_topk": PeerKey(AXOLOTL_KD, "teacher_topk"),
    "beta": PeerKey(TRL_KD, "kd_beta", "with kd_loss: jsd (0 = fkl, 1 = rkl)"),
    "loss_top_k": PeerKey(TRL_DIST, "teacher_topk", "the top-k a cache or a served teacher keeps, plus a tail "
        "bucket; a live teacher gives the full vocabulary"),
    "loss_add_tail": PeerKey(TRL_DIST, None, "the tail bucket is always kept"),
    "use_teacher_server": PeerKey(TRL_DIST, "teacher_endpoint", "set it to the server's URL"),
    "teacher_model_server_url": PeerKey(TRL_DIST, "teacher_endpoint"),
    "use_uld_loss": PeerKey(TRL_GOLD, "kd_cross_tokenizer", "auto or true: GOLD's hybrid loss across tokenizers"),
    "uld_use_hybrid_loss": PeerKey(TRL_GOLD, "kd_cross_tokenizer", "auto or true: GOLD's hybrid loss across "
        "tokenizers"),
    "uld_hybrid_unmatched_weight": PeerKey(TRL_GOLD, "kd_uld_weight"),
    "uld_hybrid_matched_weight": PeerKey(TRL_GOLD, "kd_uld_weight", "the matched tokens' weight is 1 - "
        "kd_uld_weight"),
    "uld_crossentropy_weight": PeerKey(TRL_GOLD, "kd_ratio", "the CE weight is 1 - kd_ratio"),
    "uld_distillation_weight": PeerKey(TRL_GOLD, "kd_ratio"),
    "uld_teacher_temperature": PeerKey(TRL_GOLD, "kd_temperature", "one temperature for both sides"),
    "uld_student_temperature": PeerKey(TRL_GOLD, "kd_temperature", "one temperature for both sides"),
    "use_liger_kernel": PeerKey(TRL_SFT, None, "the chunked CE+KD loss (kd_chunk_size) already keeps the logits "
        "small"),
    # --- on-policy ------------------------------------------------------------------------------
    "max_completion_length": PeerKey(f"{TRL_GOLD} and DistillationConfig", "max_new_tokens"),
    "num_generations": PeerKey(TRL_KD, None, "one reply per prompt"),
    "use_vllm": PeerKey(TRL_KD, "rollout_endpoint", "the /v1 URL of a vLLM server of the student's base model "
        "(started with --enable-lora); a teacher served by vLLM is teacher_endpoint"),
    "vllm_mode": PeerKey(TRL_KD, "rollout_endpoint", "server mode only: give the server's /v1 URL; colocate has no "
        "equivalent"),
    "vllm_server_base_url": PeerKey(TRL_KD, "rollout_endpoint", "the same URL with /v1 at the end"),
    "vllm_server_host": PeerKey(TRL_KD, "rollout_endpoint", "http://HOST:PORT/v1"),
    "vllm_server_port": PeerKey(TRL_KD, "rollout_endpoint", "http://HOST:PORT/v1"),
    "vllm_sync_frequency": PeerKey("ms-swift", "rollout_sync_steps"),
    "disable_dropout": PeerKey(TRL_KD, None),
    # --- LoRA -----------------------------------------------------------------------------------
    "adapter": PeerKey(AXOLOTL, "finetuning_type", "lora (qlora is not supported)"),
    "lora_r": PeerKey(AXOLOTL, "lora_rank"),
    "r": PeerKey(PEFT, "lora_rank"),
    "lora_target_modules": PeerKey(AXOLOTL, "lora_target", "comma-separated module names, or all"),
    "target_modules": PeerKey(PEFT, "lora_target", "comma-separated module names, or all"),
    "lora_target_linear": PeerKey(AXOLOTL, "lora_target", "lora_target: all"),
    "lora_attn_modules": PeerKey(TORCHTUNE, "lora_target", "comma-separated module names, or all"),
    "apply_lora_to_mlp": PeerKey(TORCHTUNE, "lora_target", "all covers the MLP's linear layers"),
    "additional_target": PeerKey(LLAMA_FACTORY, None, "add a module to lora_target to adapt it"),
    "loraplus_lr_ratio": PeerKey(LLAMA_FACTORY, None),
    "use_galore": PeerKey(LLAMA_FACTORY, None, "finetuning_type is lora or full"),
    "use_badam": PeerKey(LLAMA_FACTORY, None, "finetuning_type is lora or full"),
    "use_apollo": PeerKey(LLAMA_FACTORY, None, "finetuning_type is lora or full"),
    "freeze_trainable_layers": PeerKey(LLAMA_FACTORY, None, "finetuning_type is lora or full"),
    # --- data -----------------------------------------------------------------------------------
    "max_length": PeerKey(TRL_SFT, "cutoff_len"),
    "max_seq_length": PeerKey("TRL's older SFTConfig", "cutoff_len"),
    "max_seq_len": PeerKey(TORCHTUNE, "cutoff_len"),
    "sequence_len": PeerKey(AXOLOTL, "cutoff_len"),
    "datasets": PeerKey(AXOLOTL, "dataset", "comma-separated names, files or Hub ids"),
    "test_datasets": PeerKey(AXOLOTL, "eval_dataset"),
    "val_set_size": PeerKey(AXOLOTL, "val_size"),
    "sample_packing": PeerKey(AXOLOTL, "packing"),
    "chat_template": PeerKey(AXOLOTL, "template", "a built-in template's name; the tokenizer's own chat template "
        "wins"),
    "train_on_inputs": PeerKey(AXOLOTL, None, "with stage: sft only the replies are targets; stage: pt trains on "
        "every token"),
    "train_on_prompt": PeerKey(LLAMA_FACTORY, None, "with stage: sft only the replies are targets; stage: pt trains "
        "on every token"),
    "completion_only_loss": PeerKey(TRL_SFT, None, "with stage: sft only the replies are targets; stage: pt trains "
        "on every token"),
    "assistant_only_loss": PeerKey(TRL_SFT, None, "with stage: sft only the replies are targets; stage: pt trains "
        "on every token"),
    "mask_history": PeerKey(LLAMA_FACTORY, None, "every reply of a conversation is a target"),
    "dataset_text_field": PeerKey(TRL_SFT, None, "a dataset's columns are found by name, or mapped in "
        "dataset_info.json"),
    "dataset_prepared_path": PeerKey(AXOLOTL, None),
    "special_tokens": PeerKey(AXOLOTL, None),
    "shuffle": PeerKey(TORCHTUNE, None, "the data is always shuffled, by seed"),
    "rope_scaling": PeerKey(LLAMA_FACTORY, None),
    # --- training -------------------------------------------------------------------------------
    "micro_batch_size": PeerKey(AXOLOTL, "per_device_train_batch_size"),
    "batch_size": PeerKey(TORCHTUNE, "per_device_train_batch_size"),
    "eval_batch_size": PeerKey(AXOLOTL, "per_device_eval_batch_size"),
    "num_epochs": PeerKey(AXOLOTL, "num_train_epochs"),
    "epochs": PeerKey(TORCHTUNE, "num_train_epochs"),
    "max_steps_per_epoch": PeerKey(TORCHTUNE, "max_steps", "a total over the run, not per epoch"),
    "lr": PeerKey(TORCHTUNE, "learning_rate"),
    "lr_scheduler": PeerKey(AXOLOTL, "lr_scheduler_type"),
    "num_warmup_steps": PeerKey(TORCHTUNE, "warmup_steps"),
    "optimizer": PeerKey(f"{AXOLOTL} and {TORCHTUNE}", None, "llmneo trains with AdamW: adam_beta1, adam_beta2, "
        "adam_epsilon, weight_decay"),
    "clip_grad_norm": PeerKey(TORCHTUNE, "max_grad_norm"),
    "enable_activation_checkpointing": PeerKey(TORCHTUNE, "gradient_checkpointing"),
    "compile": PeerKey(TORCHTUNE, None),
    "torch_compile": PeerKey(AXOLOTL, None),
    "log_every_n_steps": PeerKey(TORCHTUNE, "logging_steps"),
    "saves_per_epoch": PeerKey(AXOLOTL, "save_steps", "in optimizer steps"),
    "wandb_project": PeerKey(AXOLOTL, "report_to", "report_to: wandb (the project comes from WANDB_PROJECT)"),
    "export_quantization_bit": PeerKey(LLAMA_FACTORY, None, "llmneo exports unquantized weights"),
    "infer_backend": PeerKey(LLAMA_FACTORY, None),
}

# A close typo: difflib's ratio at least this (kd_ration, lora_rnak, learnin_rate are all above 0.85; the
# misleading hints it must not give, max_seq_length -> max_new_tokens or batch_size -> val_size, are below 0.7).
TYPO_CUTOFF = 0.8


def unknown_key(key: str, known: Collection[str]) -> str:
    """The one-line error for `key`, which is not among `known` (llmneo's keys)."""
    peer = PEERS.get(key) or PEERS.get(_normal(key))
    if peer is not None:
        where = f"unknown config key '{key}' (the name in {peer.owner})"
        note = f" ({peer.note})" if peer.note else ""
        if peer.ours is not None:
            return f"{where}; llmneo calls it {peer.ours}{note}"
        return f"{where}: llmneo has no equivalent{note}; remove it"
    close = _closest(key, known)
    if close:
        return f"unknown config key '{key}'; did you mean {' or '.join(repr(c) for c in close)}?"
    return f"unknown config key '{key}'; run `llmneo train --help` for the list of keys"


def _normal(key: str) -> str:
    return key.strip().lstrip("-").lower().replace("-", "_")


def _closest(key: str, known: Collection[str]) -> list[str]:
    """The keys `key` most likely meant: the same words in another order, a close typo, or a unique prefix."""
    name = _normal(key)
    if name in known:
        return [name]
    words = sorted(w for w in name.split("_") if w)
    reordered = [k for k in known if sorted(k.split("_")) == words]
    if reordered:
        return reordered[:2]
    scored = sorted(((difflib.SequenceMatcher(None, name, k).ratio(), k) for k in known), reverse=True)
    typos = [(score, k) for score, k in scored[:2] if score >= TYPO_CUTOFF]
    if typos:
        # Two about equally close (per_device_batch_size): name both rather than pick one.
        return [k for score, k in typos if score >= typos[0][0] - 0.02]
    prefixed = sorted(k for k in known if len(name) >= 4 and k.startswith(name))
    return prefixed if len(prefixed) <= 2 else []
