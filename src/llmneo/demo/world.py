"""The demo's toy world: market towns whose answers are partly fixed and partly random.

Deterministic from a seed. Each town has a fixed region and ruler (hard facts: one right answer) and
a market: a categorical distribution over goods, drawn from a Dirichlet, from which every answer to
"what does X sell?" is *sampled*. The best possible model predicts the distribution, not one answer.

Why distillation can matter here: the teacher is pretrained on many samples per town, so its soft
distribution over goods approximates the market. The student's fine-tuning set is small, one sampled
answer per row, so its hard labels carry a noisy estimate. Nothing forces KD to win: the student may
lack capacity, the teacher may be wrong, and the hard facts need no distribution at all.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

_SYLLABLES = ["ba", "ko", "ri", "mel", "dun", "sa", "tor", "vi", "len", "gar", "pe", "zu", "lo", "ni", "fa"]
GOODS = ["salt", "wool", "figs", "iron", "honey", "rice", "silk", "amber", "tea", "copper"]
REGIONS = ["north", "south", "east", "west", "coast", "hills"]
RULERS = ["queen", "king", "council", "abbot", "guild"]


@dataclass(frozen=True)
class Town:
    name: str
    region: str
    ruler: str
    market: tuple[float, ...]  # probability of each of GOODS


def make_towns(seed: int, count: int = 24, concentration: float = 0.6) -> list[Town]:
    rng = random.Random(seed)
    names: set[str] = set()
    while len(names) < count:
        names.add("".join(rng.choice(_SYLLABLES) for _ in range(2)).capitalize())
    towns = []
    for name in sorted(names):
        weights = [rng.gammavariate(concentration, 1.0) for _ in GOODS]  # Dirichlet(concentration)
        total = sum(weights)
        towns.append(Town(name, rng.choice(REGIONS), rng.choice(RULERS), tuple(w / total for w in weights)))
    return towns


def _sample_good(rng: random.Random, town: Town) -> str:
    return rng.choices(GOODS, weights=town.market, k=1)[0]


def conversation(rng: random.Random, town: Town) -> list[dict]:
    """One question about `town` and its answer (sampled when the question is about the market)."""
    kind = rng.random()
    if kind < 0.6:
        first, second = _sample_good(rng, town), _sample_good(rng, town)
        question = f"What does {town.name} sell?"
        answer = f"{town.name} sells {first} and {second}."
    elif kind < 0.8:
        question = f"Where is {town.name}?"
        answer = f"{town.name} lies in the {town.region}."
    else:
        question = f"Who rules {town.name}?"
        answer = f"The {town.ruler} rules {town.name}."
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


def rows(towns: list[Town], count: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [{"messages": conversation(rng, rng.choice(towns))} for _ in range(count)]


def corpus(towns: list[Town]) -> list[str]:
    """Text to train the world's tokenizer on: every name, good, region and phrase."""
    rng = random.Random(0)
    texts = [m["content"] for row in rows(towns, 2000, 0) for m in row["messages"]]
    texts += [" ".join(GOODS), " ".join(REGIONS), " ".join(RULERS), " ".join(t.name for t in towns)]
    rng.shuffle(texts)
    return texts


def market_entropy(towns: list[Town]) -> float:
    """Mean entropy (nats) of one sampled good: the irreducible part of the market answers."""
    import math

    return sum(-sum(p * math.log(p) for p in t.market if p > 0) for t in towns) / len(towns)


def write_jsonl(path: Path, data: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in data))
    return path
