"""`python -m llmneo` (and so `accelerate launch -m llmneo`, `torchrun -m llmneo`)."""

from llmneo.cli import main

raise SystemExit(main())
