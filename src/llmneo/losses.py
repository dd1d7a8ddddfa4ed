"""The earlier path of the public losses: `llmneo.losses.divergence` is `llmneo.loss.divergences.divergence`."""
from llmneo.loss.divergences import *  # noqa: F401,F403
