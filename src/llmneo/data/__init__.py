"""From files to token ids: `dataset` (finding, reading and building the splits), `formats` (alpaca, sharegpt,
OpenAI messages), `templates` (chat templates), `tool_calls`, `packing`, and `labels` (IGNORE_INDEX and the
next-token shift, decided once)."""
