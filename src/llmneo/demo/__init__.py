"""The demo, kept apart from the library: a toy world (`world`), tiny Llama-style models and tokenizers
built in-process (`tiny`, also what the tests and benchmarks build on), the comparison of the paper's four
arms plus on-policy Neo that `llmneo demo` runs on them (`runner`), and what it writes (`report`). Nothing
here imports torch at import time, so the runner can pin the numerics before torch loads."""
