"""The demo's toy world: market towns whose answers are partly fixed and partly random.

Deterministic from a seed. Each town has a fixed region and ruler (hard facts: one right answer) and
a market: a categorical distribution over goods, drawn from a Dirichlet, from which every answer to
"what does X sell?" is *sampled*. The best possible model predicts the distribution, not one answer.

Each town also has roads to a few other towns, each taken with its own probability. "Where does the road
from X lead?" is answered with a walk of ROAD_HOPS towns, each drawn from the roads of the town named just
before it: "From X to A, then B, then C." So a reply's later tokens depend on what it said earlier, and a
model that continues its own walk meets towns it chose itself, not only the walks of the data: the
situation (exposure bias) that on-policy distillation is meant for.

Why distillation can matter here: the teacher is pretrained on many samples per town, so its soft
distribution over goods approximates the market. The student's fine-tuning set is small, one sampled
answer per row, so its hard labels carry a noisy estimate. Nothing forces KD to win: the student may
lack capacity, the teacher may be wrong, and the hard facts need no distribution at all.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
from dataclasses import dataclass
from pathlib import Path

_SYLLABLES = ["ba", "ko", "ri", "mel", "dun", "sa", "tor", "vi", "len", "gar", "pe", "zu", "lo", "ni", "fa"]
GOODS = ["salt", "wool", "figs", "iron", "honey", "rice", "silk", "amber", "tea", "copper"]
REGIONS = ["north", "south", "east", "west", "coast", "hills"]
RULERS = ["queen", "king", "council", "abbot", "guild"]
ROADS_PER_TOWN = 3
ROAD_HOPS = 3
# The share of each question kind; market, region and ruler keep their 3 : 1 : 1 of the world before roads.
KINDS = (("market", 0.45), ("region", 0.15), ("ruler", 0.15), ("road", 0.25))


@dataclass(frozen=True)
class Town:
    name: str
    region: str
    ruler: str
    market: tuple[float, ...]  # probability of each of GOODS
    roads: tuple[tuple[str, float], ...] = ()  # (the town a road leads to, the probability a walk takes it)


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
    # Roads are drawn from a stream of their own, so names, markets, regions and rulers stay those of the
    # world before it had roads.
    roads_rng = random.Random(f"roads-{seed}")
    with_roads = []
    for town in towns:
        others = [t.name for t in towns if t.name != town.name] or [town.name]
        ends = roads_rng.sample(others, min(ROADS_PER_TOWN, len(others)))
        weights = [roads_rng.gammavariate(1.0, 1.0) for _ in ends]  # Dirichlet(1)
        total = sum(weights)
        with_roads.append(dataclasses.replace(town, roads=tuple((end, w / total) for end, w in zip(ends, weights))))
    return with_roads


def _sample_good(rng: random.Random, town: Town) -> str:
    return rng.choices(GOODS, weights=town.market, k=1)[0]


def walk(rng: random.Random, town: Town, by_name: dict[str, Town], hops: int = ROAD_HOPS) -> list[str]:
    """`hops` towns, each reached by one of the roads of the town before it."""
    names, here = [], town
    for _ in range(hops):
        ends, weights = zip(*here.roads)
        here = by_name[rng.choices(ends, weights=weights, k=1)[0]]
        names.append(here.name)
    return names


def conversation(rng: random.Random, town: Town, by_name: dict[str, Town]) -> list[dict]:
    """One question about `town` and its answer (sampled when it is about the market or the roads)."""
    draw, kind = rng.random(), KINDS[-1][0]
    for name, share in KINDS:
        if draw < share:
            kind = name
            break
        draw -= share
    if kind == "market":
        first, second = _sample_good(rng, town), _sample_good(rng, town)
        question = f"What does {town.name} sell?"
        answer = f"{town.name} sells {first} and {second}."
    elif kind == "region":
        question = f"Where is {town.name}?"
        answer = f"{town.name} lies in the {town.region}."
    elif kind == "ruler":
        question = f"Who rules {town.name}?"
        answer = f"The {town.ruler} rules {town.name}."
    else:
        first, *rest = walk(rng, town, by_name)
        question = f"Where does the road from {town.name} lead?"
        answer = f"From {town.name} to {first}" + "".join(f", then {name}" for name in rest) + "."
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


def rows(towns: list[Town], count: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    by_name = {t.name: t for t in towns}
    return [{"messages": conversation(rng, rng.choice(towns), by_name)} for _ in range(count)]


def corpus(towns: list[Town]) -> list[str]:
    """Text to train the world's tokenizer on: every name, good, region and phrase."""
    rng = random.Random(0)
    texts = [m["content"] for row in rows(towns, 2000, 0) for m in row["messages"]]
    texts += [" ".join(GOODS), " ".join(REGIONS), " ".join(RULERS), " ".join(t.name for t in towns)]
    rng.shuffle(texts)
    return texts


def market_entropy(towns: list[Town]) -> float:
    """Mean entropy (nats) of one sampled good: the irreducible part of the market answers."""
    return sum(_entropy(t.market) for t in towns) / len(towns)


def road_entropy(towns: list[Town]) -> float:
    """Mean entropy (nats) of one step of a walk, over the towns it leaves from."""
    return sum(_entropy([p for _, p in t.roads]) for t in towns) / len(towns)


def _entropy(probabilities) -> float:
    return -sum(p * math.log(p) for p in probabilities if p > 0)


def write_jsonl(path: Path, data: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in data))
    return path
