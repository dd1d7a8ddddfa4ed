"""teacher_weights are normalised to sum 1 (README, docs/config.md): the mixture's weights as the run reads them.

The loss renormalises the mixed distribution anyway, so unnormalised weights would train the same today;
the documented weights are pinned here, where nothing downstream hides them.
"""

from __future__ import annotations

import pytest

from llmneo.config import schema


@pytest.mark.parametrize("weights", ["3, 1", [3, 1], [0.75, 0.25]])
def test_teacher_weights_are_normalised_to_sum_one(weights):
    cfg = schema.load(overrides={"dataset": "x", "teacher_model_name_or_path": "a,b", "teacher_weights": weights})
    assert cfg.mixture_weights == pytest.approx([0.75, 0.25], abs=1e-12)
