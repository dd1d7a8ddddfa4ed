"""data.labels: the one next-token shift, in its tensor and list forms."""

from __future__ import annotations

import torch

from llmneo.data.labels import (IGNORE_INDEX, has_response, response_count, response_indices, response_positions,
                                targets_at)

LABELS = [[IGNORE_INDEX, IGNORE_INDEX, 7, 8, IGNORE_INDEX], [5, IGNORE_INDEX, 6, 9, 4]]


def test_every_form_of_the_shift_selects_the_positions_before_a_trained_label():
    labels = torch.tensor(LABELS)
    positions, targets = response_positions(labels)
    # logits at t predict token t+1; labels[0] (row 2's 5) is never scored
    assert positions.tolist() == [[False, True, True, False, False], [False, True, True, True, False]]
    assert targets.tolist() == [7, 8, 6, 9, 4]
    assert [response_indices(row) for row in LABELS] == [row.nonzero().flatten().tolist() for row in positions]
    assert response_count(labels) == int(positions.sum()) == 5
    assert response_indices([IGNORE_INDEX, 3]) == [0] and response_indices([3]) == []
    # an example is kept when it has a position to score: a lone first label (never scored) is not one
    assert [has_response(row) for row in LABELS] == [True, True]
    assert not has_response([5, IGNORE_INDEX, IGNORE_INDEX]) and not has_response([3]) and has_response([3, 4])


def test_targets_at_a_subset_of_the_positions_are_the_tokens_they_predict():
    labels = torch.tensor(LABELS)
    positions, targets = response_positions(labels)
    assert torch.equal(targets_at(labels, positions), targets)
    chosen = positions & torch.tensor([False, True])[:, None]  # the second row's positions only
    assert targets_at(labels, chosen).tolist() == [6, 9, 4]
