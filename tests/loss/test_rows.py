"""Teacher rows are polymorphic: the fused loss asks each row type for its own divergence (and closed form),
so a new kind of teacher signal needs no branch in the loss. KD settings are one frozen, validated type."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llmneo.config import schema
from llmneo.data import labels, templates
from llmneo.errors import LlmneoError
from llmneo.loss import divergences as losses
from llmneo.loss.chunked import fused_loss
from llmneo.loss.divergences import KDSettings
from llmneo.loss.rows import DenseRows, LogitRows
from llmneo.loss.spec import LossSpec

N, H, V = 9, 8, 11


@dataclasses.dataclass
class MixedRows:
    """Two teachers' logits mixed per position with a weight: a row type the loss has never heard of."""

    first: LogitRows
    second: LogitRows
    weight: float

    def __len__(self):
        return len(self.first)

    def __getitem__(self, rows):
        return MixedRows(self.first[rows], self.second[rows], self.weight)

    def check_vocab(self, vocab_size):
        self.first.check_vocab(vocab_size)
        self.second.check_vocab(vocab_size)

    def divergence(self, student_logits, settings):
        return (self.weight * self.first.divergence(student_logits, settings)
                + (1 - self.weight) * self.second.divergence(student_logits, settings))

    def closed_form(self, logits, targets, kd_ratio, settings):
        return None  # autograd on the chunk


def test_a_new_row_type_plugs_into_the_fused_loss():
    torch.manual_seed(0)
    hidden, targets = torch.randn(N, H), torch.randint(0, V, (N,))
    head = torch.nn.Linear(H, V, bias=False)
    first, second = torch.randn(N, V), torch.randn(N, V) * 2
    settings = KDSettings("jsd", temperature=1.5, beta=0.3)
    rows = MixedRows(LogitRows(first), LogitRows(second), 0.25)
    leaf = hidden.clone().requires_grad_(True)
    total, ce, kd = fused_loss(leaf, targets, head, list(head.parameters()), rows,
                               LossSpec(V, 0.4, settings, chunk_size=4))
    total.backward()
    want_leaf = hidden.clone().requires_grad_(True)
    student = head(want_leaf)
    kw = settings.keywords()
    want_kd = (0.25 * losses.token_divergence(student, first, **kw)
               + 0.75 * losses.token_divergence(student, second, **kw)).sum()
    want = 0.6 * losses.token_cross_entropy(student, targets).sum() + 0.4 * want_kd
    want.backward()
    torch.testing.assert_close(kd, want_kd.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(total.detach(), want.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(leaf.grad, want_leaf.grad, rtol=1e-5, atol=1e-5)


def test_dense_rows_project_a_slice_into_logit_rows():
    teacher_hidden, head = torch.randn(N, H), torch.nn.Linear(H, V + 3, bias=False)
    part = DenseRows(teacher_hidden, head, V)[2:5]
    assert isinstance(part, LogitRows)
    torch.testing.assert_close(part.logits, head(teacher_hidden[2:5])[:, :V].detach())


@pytest.mark.parametrize("bad", [{"kind": "kl"}, {"temperature": 0.0}, {"beta": 1.5}, {"skew": -0.1}])
def test_kd_settings_are_validated_once_when_built(bad):
    with pytest.raises(LlmneoError):
        KDSettings(**bad)
    settings = KDSettings.from_config(schema.load(overrides={"kd_loss": "skew_rkl", "kd_skew": 0.2}))
    assert settings == KDSettings("skew_rkl", 1.0, 0.5, 0.2)
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.kind = "fkl"


def test_one_list_of_kinds_and_one_ignore_index():
    assert losses.KINDS is schema.DIVERGENCES
    assert losses.IGNORE_INDEX is labels.IGNORE_INDEX and templates.IGNORE_INDEX is labels.IGNORE_INDEX
    source = Path(labels.__file__).parents[1]
    defined = [p.relative_to(source).as_posix() for p in source.rglob("*.py")
               if re.search(r"^IGNORE_INDEX\s*=", p.read_text(), re.MULTILINE)]
    assert defined == ["data/labels.py"]


def test_the_fused_loss_does_not_import_the_teacher_side():
    """Teachers produce rows and losses consume them: chunked.py (and rows.py) never load teachers/, cache/ or
    crosstok/ (the cross-tokenizer rows live in crosstok.span_rows)."""
    code = ("import sys, llmneo.loss.chunked, llmneo.loss.rows; "
            "print(sorted(m for m in sys.modules if m.startswith(('llmneo.teachers', 'llmneo.cache', "
            "'llmneo.crosstok'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
