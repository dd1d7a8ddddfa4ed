"""Offline teacher caches (`llmneo cache`): writing top-k rows from a live teacher (`write`) or an endpoint
(`capture`), cross-tokenizer caches (`cross`), and axolotl's KD format (`axolotl`). `teachers.cached` reads them."""
