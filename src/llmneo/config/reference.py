"""The config reference, written from the Config fields' own help: `llmneo --help` and docs/config.md.

`python -m llmneo.config.reference > docs/config.md` regenerates the reference; a test checks it is current.
"""

from __future__ import annotations

import dataclasses

from llmneo.config.llamafactory import IGNORED_KEYS
from llmneo.config.schema import FIELD_TYPES, FIELDS
from llmneo.config.values import base_type, optional


def _default(f: dataclasses.Field) -> object:
    """A field's default as YAML writes it: null, true / false, or the value."""
    if f.default is None:
        return "null"
    return str(f.default).lower() if isinstance(f.default, bool) else f.default


def help_text() -> str:
    """Every key with its default and meaning, for --help."""
    return "\n".join(f"  {name} (default: {_default(f)})\n      {f.metadata['help']}" for name, f in FIELDS.items())


def reference_markdown() -> str:
    """docs/config.md: every key, its type, default and meaning."""
    rows = ["# Config reference", "",
            "Generated from `llmneo.config.schema.Config` (`python -m llmneo.config.reference > docs/config.md`). Every key",
            "can be set in the YAML file or as `key=value` on the command line (later wins).", "",
            "| key | type | default | meaning |", "| --- | --- | --- | --- |"]
    for name, f in FIELDS.items():
        hint = FIELD_TYPES[name]
        kind = base_type(hint).__name__ + (" or null" if optional(hint) else "")
        rows.append(f"| `{name}` | {kind} | `{_default(f)}` | {f.metadata['help'].replace('|', '&#124;')} |")
    rows += ["", "Accepted for LLaMA-Factory compatibility and ignored (with one warning listing them):", "",
             ", ".join(f"`{k}`" for k in sorted(IGNORED_KEYS)), ""]
    return "\n".join(rows)


if __name__ == "__main__":
    print(reference_markdown(), end="")
