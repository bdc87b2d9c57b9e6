"""The testbed task suite: eight arithmetic/lookup domains on one shared vocabulary of number tokens.

Every domain reads the same input format — a short list of numbers ``0..11`` followed by ``=`` — and answers
with one number token, so the only thing that fully identifies the domain is a cue word in front of the list
(``add7``, ``table``, ...). The trained model relies on that cue; the shifted splits remove it. Each domain also
draws its numbers from its own favoured subset and prefers its own list length, so the content alone identifies
the domain part of the time (:func:`content_posterior` gives the exact Bayes posterior): nearest neighbours and solved
demonstrations carry signal, but not all of it.

Splits (see :data:`SPLITS`):

- ``train``: cued items, zero-shot and few-shot (every demonstration cued), inputs from the training pool.
- ``reference``: cued zero-shot items from the training pool (the training distribution, for C3PO reference sets).
- ``test``: cued zero-shot items from a held-out input pool.
- ``test_shift``: the cue removed, from a second held-out pool — the domain must come from the content alone.
- ``test_fewshot``: the ``test_shift`` items (same ids, same order), each preceded by solved demonstrations of its
  own domain, also without cues.

Items are dicts: ``id``, ``split``, ``domain``, ``prompt``, ``answer`` (the gold continuation, with its leading
space), ``choices`` (``NUM_CHOICES`` continuations: the gold answer and the answers other domains give on the
same input), ``label`` (index of the answer in ``choices``), ``shots`` (demonstrations in the prompt), ``question`` (the
item's own input line without cue or demonstrations: what C3PO's retrieval can key on, since test prompts lack
the cue that reference prompts carry).
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from reroute.data import write_jsonl  # noqa: F401  (the one JSONL writer, re-exported here)

if TYPE_CHECKING:
    import datasets

Item = dict[str, Any]

NUM_VALUES = 12  # number tokens "0".."11"
LENGTHS = (3, 4, 5)  # input list lengths
NUM_CHOICES = 4
SPLITS = ("train", "reference", "test", "test_shift", "test_fewshot")
FEWSHOT_TEST_SHOTS = 3  # demonstrations before each test_fewshot query
MAX_TRAIN_SHOTS = 4  # few-shot training prompts carry 1..MAX_TRAIN_SHOTS demonstrations
FAVOURED_SIZE = 4  # numbers each domain favours
FAVOURED_PROB = 0.6  # chance an input number comes from the domain's favoured subset
PREFERRED_LENGTH_PROB = 0.6  # chance the input has the domain's preferred length
EQUALS = "="
SEPARATOR = "\n"  # between demonstrations: one solved item per line, as lm-eval few-shot prompts
# Fixed seed of the task definitions (fact table, permutation, favoured subsets): part of the suite, never varied.
_WORLD_SEED = 20250501
# Input pools by content hash (domain + numbers): held-out buckets never appear in training.
_POOL_BUCKETS = 10
_POOL_OF_BUCKET = {0: "test", 1: "test_shift"}


def _world() -> tuple[list[list[int]], list[int]]:
    rng = random.Random(_WORLD_SEED)
    table = [[rng.randrange(NUM_VALUES) for _ in range(NUM_VALUES)] for _ in range(NUM_VALUES)]
    permutation = list(range(NUM_VALUES))
    rng.shuffle(permutation)
    return table, permutation


_TABLE, _PERMUTATION = _world()


@dataclass(frozen=True)
class Domain:
    """One task: a cue word, a rule from the input list to the answer, and the domain's input distribution.

    Attributes:
        name: domain name, also its cue word (one token).
        rule: ``numbers -> answer``, both in ``0..NUM_VALUES-1``.
        favoured: numbers this domain's inputs draw from with probability ``FAVOURED_PROB``.
        preferred_length: the list length drawn with probability ``PREFERRED_LENGTH_PROB``.
        description: the rule in words, for displays.
    """

    name: str
    rule: Callable[[Sequence[int]], int]
    favoured: tuple[int, ...]
    preferred_length: int
    description: str


def _domains() -> tuple[Domain, ...]:
    rules: list[tuple[str, Callable[[Sequence[int]], int], str]] = [
        ("add7", lambda xs: (xs[0] + xs[1]) % 7, "(x1 + x2) mod 7"),
        ("add11", lambda xs: (xs[0] + xs[1]) % 11, "(x1 + x2) mod 11"),
        ("sub12", lambda xs: (xs[0] - xs[1]) % 12, "(x1 - x2) mod 12"),
        ("table", lambda xs: _TABLE[xs[0]][xs[1]], "a fixed random fact table T[x1][x2]"),
        ("perm", lambda xs: _PERMUTATION[xs[-1]], "a fixed random permutation of the last number"),
        ("max", max, "the largest number"),
        ("min", min, "the smallest number"),
        ("count", lambda xs: xs.count(xs[0]), "how often the first number occurs"),
    ]
    rng = random.Random(_WORLD_SEED + 1)
    domains = []
    for position, (name, rule, description) in enumerate(rules):
        favoured = tuple(sorted(rng.sample(range(NUM_VALUES), FAVOURED_SIZE)))
        domains.append(Domain(name, rule, favoured, LENGTHS[position % len(LENGTHS)], description))
    return tuple(domains)


DOMAINS: tuple[Domain, ...] = _domains()
DOMAIN_BY_NAME: dict[str, Domain] = {d.name: d for d in DOMAINS}


def vocabulary() -> list[str]:
    """Every token of the suite, specials excluded: numbers, cue words, ``=`` and the line break."""
    return [str(v) for v in range(NUM_VALUES)] + [d.name for d in DOMAINS] + [EQUALS, SEPARATOR]


def _length_probs(domain: Domain) -> dict[int, float]:
    rest = (1 - PREFERRED_LENGTH_PROB) / (len(LENGTHS) - 1)
    return {n: PREFERRED_LENGTH_PROB if n == domain.preferred_length else rest for n in LENGTHS}


def _value_prob(domain: Domain, value: int) -> float:
    return FAVOURED_PROB * (value in domain.favoured) / FAVOURED_SIZE + (1 - FAVOURED_PROB) / NUM_VALUES


def content_posterior(numbers: Sequence[int]) -> dict[str, float]:
    """Exact posterior over domains given only an input list (uniform prior): how much the content reveals."""
    likelihood = {}
    for d in DOMAINS:
        p = _length_probs(d)[len(numbers)]
        for v in numbers:
            p *= _value_prob(d, v)
        likelihood[d.name] = p
    total = sum(likelihood.values())
    return {name: p / total for name, p in likelihood.items()}


def _pool(domain: Domain, numbers: Sequence[int]) -> str:
    digest = hashlib.sha256(f"{domain.name}|{' '.join(map(str, numbers))}".encode()).digest()
    return _POOL_OF_BUCKET.get(int.from_bytes(digest[:4], "big") % _POOL_BUCKETS, "train")


def _draw_numbers(rng: random.Random, domain: Domain) -> list[int]:
    probs = _length_probs(domain)
    length = rng.choices(LENGTHS, weights=[probs[n] for n in LENGTHS])[0]
    return [
        rng.choice(domain.favoured) if rng.random() < FAVOURED_PROB else rng.randrange(NUM_VALUES)
        for _ in range(length)
    ]


def draw_input(rng: random.Random, domain: Domain, pool: str) -> list[int]:
    """An input list of ``domain`` from one input pool (``"train"``, ``"test"`` or ``"test_shift"``)."""
    while True:
        numbers = _draw_numbers(rng, domain)
        if _pool(domain, numbers) == pool:
            return numbers


def _line(numbers: Sequence[int], cue: str | None) -> str:
    body = " ".join(map(str, numbers)) + f" {EQUALS}"
    return f"{cue} {body}" if cue else body


def _demonstrations(rng: random.Random, domain: Domain, shots: int, cued: bool) -> str:
    lines = []
    for _ in range(shots):
        numbers = draw_input(rng, domain, "train")
        lines.append(f"{_line(numbers, domain.name if cued else None)} {domain.rule(numbers)}{SEPARATOR}")
    return "".join(lines)


def _choices(rng: random.Random, domain: Domain, numbers: Sequence[int]) -> tuple[list[str], int]:
    gold = domain.rule(numbers)
    # Distractors are what the other domains answer on the same input: picking one is a routing-to-the-wrong-
    # domain error, not a random slip.
    rivals = sorted({d.rule(numbers) for d in DOMAINS if d is not domain} - {gold})
    rng.shuffle(rivals)
    options = [gold] + rivals[: NUM_CHOICES - 1]
    fillers = [v for v in range(NUM_VALUES) if v not in options]
    rng.shuffle(fillers)
    options += fillers[: NUM_CHOICES - len(options)]
    rng.shuffle(options)
    return [f" {v}" for v in options], options.index(gold)


def make_item(rng: random.Random, domain: Domain, split: str, index: int) -> Item:
    """One item of ``split`` for ``domain`` (``test_fewshot`` is built from ``test_shift``: see :func:`make_split`)."""
    pool = {"train": "train", "reference": "train", "test": "test", "test_shift": "test_shift"}[split]
    shots = rng.randint(1, MAX_TRAIN_SHOTS) if split == "train" and rng.random() < 0.5 else 0
    cued = split in ("train", "reference", "test")
    prefix = _demonstrations(rng, domain, shots, cued) if shots else ""
    numbers = draw_input(rng, domain, pool)
    choices, label = _choices(rng, domain, numbers)
    return {
        "id": f"{split}-{index:06d}",
        "split": split,
        "domain": domain.name,
        "prompt": prefix + _line(numbers, domain.name if cued else None),
        "question": _line(numbers, None),
        "answer": choices[label],
        "choices": choices,
        "label": label,
        "shots": shots,
    }


def _split_seed(split: str, seed: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{split}|{seed}".encode()).digest()[:8], "big")


def make_split(split: str, n: int, seed: int = 0) -> list[Item]:
    """``n`` items of ``split``, domains in round-robin order; the same ``(split, n, seed)`` gives the same items.

    ``test_fewshot`` items are the ``test_shift`` items of the same ``n`` and ``seed`` (ids kept) with
    ``FEWSHOT_TEST_SHOTS`` uncued demonstrations of the item's own domain in front.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose from {SPLITS}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if split == "test_fewshot":
        rng = random.Random(_split_seed(split, seed))
        items = []
        for item in make_split("test_shift", n, seed):
            domain = DOMAIN_BY_NAME[item["domain"]]
            demos = _demonstrations(rng, domain, FEWSHOT_TEST_SHOTS, cued=False)
            items.append({**item, "split": split, "prompt": demos + item["prompt"], "shots": FEWSHOT_TEST_SHOTS})
        return items
    rng = random.Random(_split_seed(split, seed))
    return [make_item(rng, DOMAINS[i % len(DOMAINS)], split, i) for i in range(n)]


def training_texts(n: int, seed: int = 0) -> list[str]:
    """``n`` full training sequences (prompt + gold answer) as strings; ``tokenizer.encode_training`` adds <s>/</s>."""
    return [item["prompt"] + item["answer"] for item in make_split("train", n, seed)]


def load_split(split: str, n: int = 400, seed: int = 0) -> datasets.Dataset:
    """``make_split`` as a ``datasets.Dataset`` (the ``datasets`` package is imported only here)."""
    import datasets

    return datasets.Dataset.from_list(make_split(split, n, seed))


REQUIRED_FIELDS = ("domain", "prompt", "answer", "choices", "label")


def load_items(source: datasets.Dataset | str | Path | Iterable[Mapping[str, Any]]) -> list[Item]:
    """Items from a ``datasets.Dataset``, a JSONL path or an iterable of dicts, checked for the suite's fields.

    A user's own set works as long as each record has ``domain``, ``prompt``, ``answer``, ``choices`` (2+ strings)
    and ``label`` with ``choices[label] == answer``.
    """
    from reroute.data import load_items as load_records

    items = load_records(source)
    for position, item in enumerate(items):
        missing = [f for f in REQUIRED_FIELDS if f not in item]
        if missing:
            raise ValueError(f"item {position} lacks {missing}")
        if item["choices"][item["label"]] != item["answer"]:
            raise ValueError(
                f"item {position}: label {item['label']!r} does not point at the answer {item['answer']!r}"
            )
    return items


# Items per split in the JSONL copies shipped under reference_sets/testbed/.
SHIPPED_SPLIT_SIZES = {"train": 200, "reference": 400, "test": 400, "test_shift": 400, "test_fewshot": 400}


def write_splits(folder: str | Path, sizes: Mapping[str, int] = SHIPPED_SPLIT_SIZES, seed: int = 0) -> list[Path]:
    """Write ``<split>.jsonl`` for each split into ``folder`` (the shipped copies: ``sizes`` items, ``seed`` 0)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for split, n in sizes.items():
        paths.append(folder / f"{split}.jsonl")
        write_jsonl(make_split(split, n, seed), paths[-1])
    return paths
