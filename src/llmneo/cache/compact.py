"""The compact cache row: a top-k row of token ids and log-probs in about 2.7 bytes per entry at V = 128k.

One row (one response position) holds k (id, log-prob) pairs and the tail log-mass. Stored per row:
  ids       uint8 (id_bytes(k, V),)  Elias–Fano code of the k ids sorted by id: each id's low `L` bits at fixed
                                     width (k·L bits), then a bitvector of k + ((V − 1) >> L) + 1 bits with a
                                     one at high_j + j for the j-th id's high part high_j = id_j >> L (unary
                                     gaps); L minimises the total (`low_bits`). 17-bit ids bit-packed would
                                     take 17·k bits; this takes about k·(2 + log2(V / k)) bits: 831 for k = 64
                                     at V = 128,256 (104 B), 1,534 for k = 128 (192 B).
  logprobs  uint8 (k,)               each entry's distance d = top − log-prob below the row's top log-prob,
                                     as code round(254·sqrt(d / d_max)) (255: a log-prob of −inf)
  scale     float16 ()               d_max, the row's largest distance, capped at D_CAP = 50 (one far entry,
                                     such as vLLM's -9999 for -inf, would otherwise coarsen every code)
  tail      float32 ()               log of the probability mass outside the top-k (−inf when none)
So a row costs id_bytes + k + 6 bytes: 174 B at k = 64 and 326 B at k = 128 for V = 128,256.

Why these choices (docs/benchmarks.md §5 has the measurements):
- ids in id order: the set of top-k ids is what matters, not their order, and sorted ids are cheaper to code
  than ranks; decoding sorts the entries back by log-prob.
- the row's top log-prob is not stored: decoding puts the entries back on the log scale so the top-k mass is
  exactly 1 − exp(tail). The k rounding errors of the probabilities then sum to zero, so the KD loss moves
  only by their correlation with log p_T − log p_S, a second-order amount.
- sqrt companding gives the large probabilities, which carry the KD loss, the finest steps: near the top a
  step is 2·d_max/254² per code, at the far end 2·d_max/254.
Decoding is a few vectorised torch operations per batch (bit unpacking, one `nonzero`, a gather, a sort), on
whatever device the bytes are moved to.
"""

from __future__ import annotations

import math

import torch

from llmneo.loss.rows import SparseRows

CODES = 254  # finite distances are coded 0..254; 255 marks a log-prob of -inf
NEG_INF_CODE = 255
# Distances are capped here: d_max sets every entry's step, so one far entry (vLLM sends -9999 for -inf, a masked
# logit is -3e38) would coarsen its whole row; below the top by 50 an entry's probability is under 2e-22 of it.
D_CAP = 50.0
_BIT = torch.arange(8, dtype=torch.uint8)


def low_bits(k: int, vocab_size: int) -> int:
    """The number of low bits L per id that makes the Elias–Fano code of k ids below vocab_size smallest."""
    return min(range(max(vocab_size - 1, 1).bit_length() + 1), key=lambda low: k * low + ((vocab_size - 1) >> low))


def id_bits(k: int, vocab_size: int) -> int:
    low = low_bits(k, vocab_size)
    return k * low + k + ((vocab_size - 1) >> low) + 1


def id_bytes(k: int, vocab_size: int) -> int:
    return math.ceil(id_bits(k, vocab_size) / 8)


def row_bytes(k: int, vocab_size: int) -> int:
    """Bytes of one compact row: coded ids, k log-prob codes, the float16 scale and the float32 tail."""
    return id_bytes(k, vocab_size) + k + 2 + 4


def to_code(unit: torch.Tensor) -> torch.Tensor:
    """Distances as fractions of d_max, in [0, 1] → uint8 codes 0..254 (sqrt companding)."""
    return torch.round(unit.sqrt() * CODES).to(torch.uint8)


def from_code(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes → distances as fractions of d_max (float32); `to_code`'s inverse up to rounding."""
    unit = codes.float() / CODES
    return unit * unit


def error_bound(logprobs: torch.Tensor) -> torch.Tensor:
    """(M,) the most a decoded log-prob of each row of `logprobs` (M, k) can be off: a code rounds the distance's
    square root by half a step, at most d_max / 254 of distance, and renormalising moves every entry by a
    weighted mean of those errors, at most as much again. Entries more than D_CAP below the top come back at
    D_CAP below it (the bound holds for the others)."""
    finite = torch.where(torch.isfinite(logprobs), logprobs, torch.nan)
    spread = (finite.nan_to_num(-math.inf).amax(dim=1) - finite.nan_to_num(math.inf).amin(dim=1)).clamp(0, D_CAP)
    return 2 * spread * 1.001 / CODES + 1e-5  # 1.001: d_max is rounded to float16; 1e-5: float32 arithmetic


def encode(rows: SparseRows, vocab_size: int) -> dict[str, torch.Tensor]:
    """The shard tensors (ids, logprobs, scale, tail) of `rows` (ids (M, k) below vocab_size, log-probs (M, k))."""
    ids, logprobs, tail = rows.ids.long().cpu(), rows.logprobs.float().cpu(), rows.tail.float().cpu()
    count, k = ids.shape
    ids, order = ids.sort(dim=1)  # (M, k): id order
    logprobs = logprobs.gather(1, order)
    if count and k and (int(ids[:, 0].min()) < 0 or int(ids[:, -1].max()) >= vocab_size):
        # an id outside the vocabulary would set a bit of another id (or none): the rows would decode wrong
        raise ValueError(f"compact rows code ids 0..{vocab_size - 1}; got ids {int(ids.min())}..{int(ids.max())}")
    low = low_bits(k, vocab_size)
    bits = torch.zeros(count, id_bytes(k, vocab_size) * 8, dtype=torch.uint8)
    if low:
        bits[:, :k * low] = ((ids[:, :, None] >> torch.arange(low)) & 1).reshape(count, k * low).to(torch.uint8)
    bits.scatter_(1, k * low + (ids >> low) + torch.arange(k), 1)  # the high parts, in unary
    packed = (bits.view(count, id_bytes(k, vocab_size), 8) << _BIT).sum(dim=-1, dtype=torch.int32).to(torch.uint8)  # little-endian bits

    finite = torch.isfinite(logprobs)
    top = torch.where(finite, logprobs, -math.inf).amax(dim=1, keepdim=True)  # (M, 1)
    top = torch.where(torch.isfinite(top), top, 0.0)  # a row of -inf only (no entry has mass)
    # float16 holds d_max; a log-prob further below the top than its largest value has probability 0 in float32
    # (e^-104 already does), so it is kept there
    distance = torch.where(finite, top - logprobs, 0.0).clamp(max=D_CAP)
    widest = distance.amax(dim=1)
    scale = widest.half()  # rounded up, never down, so that no distance is beyond d_max (no code clips)
    scale = torch.where(scale.float() < widest, torch.nextafter(scale, torch.tensor(math.inf, dtype=torch.half)),
                        scale)
    unit = (distance / scale.float().clamp_min(torch.finfo(torch.float32).tiny)[:, None]).clamp(0, 1)
    codes = to_code(unit)
    codes = torch.where(finite, codes, torch.tensor(NEG_INF_CODE, dtype=torch.uint8))
    return {"ids": packed.contiguous(), "logprobs": codes.contiguous(), "scale": scale.contiguous(),
            "tail": tail.contiguous()}


def decode(ids: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, tail: torch.Tensor,
           vocab_size: int) -> SparseRows:
    """SparseRows (rank order, log-probs float32) from shard tensors, on the device they are on."""
    count, k = codes.shape
    device = ids.device
    low = low_bits(k, vocab_size)
    bits = (ids[:, :, None] >> _BIT.to(device)) & 1  # (M, B, 8)
    bits = bits.reshape(count, ids.shape[1] * 8)
    token = torch.zeros(count, k, dtype=torch.long, device=device)
    if low:
        weights = (1 << torch.arange(low, device=device))
        token = (bits[:, :k * low].view(count, k, low).long() * weights).sum(dim=-1)
    ones = bits[:, k * low:].nonzero()[:, 1].view(count, k)  # row-major: each row's k set bits, in order
    token |= (ones - torch.arange(k, device=device)) << low

    tail = tail.float()
    relative = -from_code(codes) * scale.float()[:, None]  # (M, k): log-prob minus the row's top
    relative = relative.masked_fill(codes == NEG_INF_CODE, -math.inf)
    # top-k mass = 1 - exp(tail): log of it, -inf tail giving 0
    mass = torch.log(-torch.expm1(tail.clamp(max=-torch.finfo(torch.float32).tiny)))
    mass = torch.where(torch.isinf(tail), torch.zeros_like(tail), mass)
    total = torch.logsumexp(relative, dim=1, keepdim=True)
    total = torch.where(torch.isfinite(total), total, 0.0)  # a row of -inf only stays -inf, not NaN
    logprobs = relative - total + mass[:, None]
    logprobs, order = logprobs.sort(dim=1, descending=True, stable=True)
    return SparseRows(token.gather(1, order), logprobs, tail)
