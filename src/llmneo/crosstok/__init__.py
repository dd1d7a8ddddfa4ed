"""Knowledge distillation across tokenizers: `offsets` (the teacher's tokens of each example and the alignment
by characters), `vocab` (shared tokens, the GOLD hybrid and ULD losses), `span_rows` (the teacher rows they give
the loss)."""
