"""The models: `loading` (student, teacher, tokenizer, precision), `heads` (final hidden states, the output head
sliced to the vocabulary), `adapters` (PEFT LoRA and its variants), `engines` (accelerate, DDP, FSDP, teacher
placement), `generate` (HF rollouts), `prune`, `export`, and `trained_run` (what a run folder holds)."""
