"""Data order across epochs: each epoch is a fresh permutation of the split (data.EpochSampler, micro_batches)."""

from __future__ import annotations

import itertools

import torch

from llmneo.data import dataset


def test_epoch_sampler_reshuffles_each_epoch_and_each_epoch_is_a_permutation():
    sampler = dataset.EpochSampler(16, seed=3)
    orders = []
    for epoch in range(4):
        sampler.set_epoch(epoch)
        orders.append(list(sampler))
    assert all(sorted(order) == list(range(16)) for order in orders)
    assert len({tuple(order) for order in orders}) == 4  # no two epochs share an order
    sampler.set_epoch(1)
    assert list(sampler) == orders[1]  # a pure function of (seed, epoch): resume can rebuild it


def test_the_training_stream_changes_order_between_epochs(tmp_path):
    """The path train.run uses: DataLoader(EpochSampler) prepared by accelerate, read via micro_batches."""
    from accelerate import Accelerator

    size, batch_size = 12, 4
    examples = [{"input_ids": [i + 5], "labels": [i + 5], "index": i} for i in range(size)]
    loader = torch.utils.data.DataLoader(examples, batch_size=batch_size, sampler=dataset.EpochSampler(size, seed=0),
                                         collate_fn=lambda b: dataset.collate(b, pad_token_id=0),
                                         generator=torch.Generator().manual_seed(0))
    accelerator = Accelerator(cpu=True)
    loader = accelerator.prepare(loader)
    per_epoch = size // batch_size
    stream = dataset.micro_batches(loader, accelerator)
    seen = [batch["index"].tolist() for batch in itertools.islice(stream, 3 * per_epoch)]
    epochs = [list(itertools.chain(*seen[e * per_epoch:(e + 1) * per_epoch])) for e in range(3)]
    assert all(sorted(order) == list(range(size)) for order in epochs)
    assert len({tuple(order) for order in epochs}) == 3
    # Resuming at a micro-batch of the second epoch continues that epoch's order, not the first's.
    resumed = dataset.micro_batches(loader, accelerator, start=per_epoch + 1)
    assert next(resumed)["index"].tolist() == seen[per_epoch + 1]
