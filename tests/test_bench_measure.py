"""The benchmarks' allocator-independent memory measure (benchmarks/measure.py: tensor_peak) on cases whose
answer is known by hand, and the loss benchmark that reports it, end to end on a tiny size."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
from measure import tensor_peak  # noqa: E402

MiB = 2**20


def _mib_tensor() -> torch.Tensor:
    return torch.ones(MiB // 4)  # 1 MiB of fp32, written (so its pages are real)


def test_peak_is_the_running_sum_of_allocations_and_frees():
    def three_free_one_then_one_more():
        a, b, c = _mib_tensor(), _mib_tensor(), _mib_tensor()
        del b
        d = _mib_tensor()
        del a, c, d

    result = tensor_peak(three_free_one_then_one_more)
    assert result["tensor_peak_bytes"] == 3 * MiB  # 4 MiB if frees were ignored
    assert result["tensor_end_bytes"] == 0


def test_a_free_of_the_previous_calls_tensor_counts():
    # As `x.grad = None` at the top of a training step: the profiler drops frees of blocks it did not see
    # allocated, so measuring a first call alone would report 2 MiB here.
    held = [_mib_tensor()]

    def replace_held():
        held.clear()
        scratch = _mib_tensor()
        held.append(_mib_tensor())
        del scratch

    result = tensor_peak(replace_held)
    assert result["tensor_peak_bytes"] == MiB
    assert result["tensor_end_bytes"] == 0


def test_kernel_temporaries_and_autograd_buffers_count():
    rows, vocab = 64, 4000
    buffer = rows * vocab * 4
    logits = torch.randn(rows, vocab)
    # logsumexp allocates exp(x - max) as a full temporary inside the kernel, invisible to a dispatch hook.
    assert tensor_peak(lambda: torch.logsumexp(logits, dim=-1))["tensor_peak_bytes"] >= buffer

    weights = torch.randn(rows, vocab, requires_grad=True)

    def exp_backward():
        weights.grad = None  # frees last call's gradient: -1
        saved = weights.exp()  # kept by autograd for the backward: +1
        (saved * 2).sum().backward()  # temporary (+1, freed), grad·2 (+1), grad·exp (+1, becomes .grad)

    result = tensor_peak(exp_backward)
    assert buffer * 2 <= result["tensor_peak_bytes"] < buffer * 2 + 4096
    assert result["tensor_end_bytes"] == 0


def test_chunked_forward_kl_stays_within_the_documented_buffers_per_chunk():
    # docs/benchmarks.md counts the chunked loss's peak as five chunk x V fp32 buffers (student and teacher
    # logits, p_S -> gradient, log p_T, p_T) plus small vectors; a sixth (such as a copy of the teacher's
    # logits at T = 1) costs a fifth more memory, and a seventh breaks the README's 0.10 budget.
    from llmneo.loss.chunked import fused_loss
    from llmneo.loss.divergences import KDSettings
    from llmneo.loss.rows import DenseRows
    from llmneo.loss.spec import LossSpec

    torch.manual_seed(0)
    tokens, hidden_size, vocab, chunk = 512, 32, 4000, 64
    hidden = torch.randn(tokens, hidden_size, requires_grad=True)
    student_head = torch.randn(vocab, hidden_size) / hidden_size**0.5
    teacher_hidden = torch.randn(tokens, hidden_size)
    teacher_head = torch.randn(vocab, hidden_size) / hidden_size**0.5
    labels = torch.randint(0, vocab, (tokens,))
    settings = KDSettings("fkl", temperature=1.0, beta=0.5, skew=0.1)

    def step():
        hidden.grad = None
        rows = DenseRows(teacher_hidden, lambda h: h @ teacher_head.T, vocab)
        loss, _, _ = fused_loss(hidden, labels, lambda h: h @ student_head.T, [], rows,
                                LossSpec(vocab, 0.5, settings, chunk))
        loss.backward()

    peak = tensor_peak(step)["tensor_peak_bytes"]
    buffer = chunk * vocab * 4
    assert 3 * buffer < peak <= 5 * buffer + chunk * hidden_size * 4 + 16 * chunk * 4


def test_loss_bench_prints_a_table_with_tensor_peaks_and_spread():
    done = subprocess.run([sys.executable, str(BENCHMARKS / "loss_bench.py"), "--tokens", "256", "--hidden", "32",
                           "--vocab", "2000", "--chunks", "64", "--runs", "1"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [line for line in done.stdout.splitlines() if line.startswith("| 2000 |")]
    assert [row.split("|")[2].strip() for row in rows][:2] == ["official", "llmneo"]
    official, chunked = (row.split("|") for row in rows[:2])
    assert official[7].strip().startswith("1.000")  # official vs itself, tensor-peak ratio
    buffers = float(chunked[6])
    assert 3.0 < buffers < 7.0, chunked
