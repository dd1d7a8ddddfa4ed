"""The demo, kept apart from the library: a toy world (`world`), tiny Llama-style models and tokenizers
built in-process (`tiny`, also what the tests and benchmarks build on), and the four-arm comparison that
`llmneo demo` runs on them (`runner`). Nothing here imports torch at import time, so the runner can pin
the numerics before torch loads."""
