"""The run's settings: `schema` (the typed `Config`, `load`), `values` (parsing one value), `checks` (the checks
that span several keys), `llamafactory` and `peer_keys` (LLaMA-Factory's and other tools' key names), `reference`
(docs/config.md and `--help` from the field docstrings). Imports nothing heavy: the CLI's `--help` reads it."""
