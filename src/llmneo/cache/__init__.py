"""Offline teacher caches (`llmneo cache`). Below: the folder's format, writing and reading it (`shards`) and what it
is keyed to (`fingerprint`), neither importing teachers/. Above: the writers, from a loaded teacher (`write`, the
command), an endpoint (`capture`) or a teacher with another tokenizer (`cross`), and axolotl's KD format
(`axolotl`). `teachers.cached` reads caches through `shards`."""
