"""From files to token ids: `sources` (finding and reading datasets), `formats` (alpaca, sharegpt, OpenAI
messages), `dataset` (tokenizing the splits, batching), `templates` (chat templates), `tool_calls`, `packing`, and
`labels` (IGNORE_INDEX and the next-token shift, decided once)."""
