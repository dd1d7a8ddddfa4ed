"""The one training loop: `loop` (steps, accumulation, logging), `setup` (everything before the first step),
`steps` (where a step's sequences come from), `checkpoint`, `preemption`, `tracking`, `memory`,
`periodic_eval`, `recorded_config` (the config as saved in the run folder)."""
