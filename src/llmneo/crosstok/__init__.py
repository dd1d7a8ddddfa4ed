"""Knowledge distillation across tokenizers: `offsets` (the teacher's tokens of each example and the alignment
by characters), `vocab` (shared tokens, the GOLD hybrid and ULD losses)."""
