"""Expand a prompt bank into a deterministic, concept-balanced list of distinct captions."""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from prompts.bank import Bank, BankError, template_slots

# Banks with at most this many slot combinations are enumerated, so "not enough distinct captions" is exact;
# larger ones are sampled with rejection of repeats (fine while count is well below the space).
ENUMERATE_LIMIT = 200_000
# Rejected draws allowed for one caption before a sampled bank is declared exhausted.
MAX_TRIES = 10_000


@dataclass(frozen=True)
class Caption:
    """One caption of an expanded bank; prompt_id names the template and slot values that made it."""

    index: int
    prompt_id: str
    text: str
    concept: str | None


def fill(template: str, values: Mapping[str, str]) -> str:
    """The template with its slots replaced by `values` (extra values are ignored)."""
    missing = [slot for slot in template_slots(template) if slot not in values]
    if missing:
        raise BankError(f"template {template!r} needs a value for slot(s) {', '.join(missing)}")
    return template.format_map(values)


def random_caption(bank: Bank, values: Mapping[str, str], rng: np.random.Generator) -> str:
    """Pick one of the bank's templates with `rng` and fill it with the given slot values."""
    if not bank.templates:
        raise BankError(f"{bank.source}: bank {bank.name!r} has no templates (a text bank cannot be filled)")
    return fill(bank.templates[int(rng.integers(len(bank.templates)))], values)


def combination_count(bank: Bank) -> int:
    """How many (template, slot values) combinations the bank has; an upper bound on distinct captions."""
    return sum(plan.size for plan in _plans(bank))


def expand(bank: Bank, count: int, seed: int, allow_duplicates: bool = False) -> list[Caption]:
    """`count` captions from `bank`, a pure function of (bank, count, seed).

    Concept values appear equally often (counts differ by at most one, in every prefix too), and a shorter
    list is a prefix of a longer one with the same seed. Texts are distinct unless `allow_duplicates`, in which
    case every caption is an independent draw.
    """
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise BankError(f"count must be a non-negative integer, got {count!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise BankError(f"seed must be a non-negative integer, got {seed!r}")
    plans = _plans(bank)
    n_groups = max(len(bank.concepts), 1)
    if allow_duplicates:
        source: _Enumerated | _Sampled = _Sampled(bank, plans, seed, dedupe=False)
    elif sum(plan.size for plan in plans) <= ENUMERATE_LIMIT:
        source = _Enumerated(bank, plans, seed, n_groups)
    else:
        source = _Sampled(bank, plans, seed, dedupe=True)
    capacities = [source.capacity(g) for g in range(n_groups)]
    _check_capacity(bank, count, capacities)
    captions = []
    for index, group in enumerate(_concept_order(count, capacities, seed)):
        prompt_id, text = source.draw(group)
        concept = bank.concepts[group] if bank.concept else None
        captions.append(Caption(index=index, prompt_id=prompt_id, text=text, concept=concept))
    return captions


@dataclass(frozen=True)
class _Plan:
    """One template (or one caption of a text bank) and the slots it uses, in bank order."""

    label: str
    template: str | None  # None: `label`'s caption is literal text
    caption: str
    slots: tuple[str, ...]
    values: tuple[tuple[str, ...], ...]
    concept_pos: int | None

    @property
    def size(self) -> int:
        return math.prod(len(v) for v in self.values)

    def group_size(self) -> int:
        return self.size // len(self.values[self.concept_pos]) if self.concept_pos is not None else self.size

    def render(self, idx: tuple[int, ...]) -> tuple[str, str]:
        """(prompt id, text) for slot value indices `idx`."""
        if self.template is None:
            return self.label, self.caption
        chosen = list(zip(self.slots, self.values, idx, strict=True))
        # "color2" + index 1 would read "color21"; such names get a separator: "color2_1".
        parts = [f"{name}{'_' if name[-1].isdigit() else ''}{i}" for name, _, i in chosen]
        text = self.template.format_map({name: values[i] for name, values, i in chosen})
        return "-".join([self.label, *parts]), text


def _plans(bank: Bank) -> list[_Plan]:
    if not bank.templates:
        lines = bank.caption_lines or tuple(range(1, len(bank.captions) + 1))
        return [_Plan(f"line{n}", None, text, (), (), None) for n, text in zip(lines, bank.captions, strict=True)]
    plans = []
    for t, template in enumerate(bank.templates):
        used = set(template_slots(template))
        slots = tuple(name for name in bank.slots if name in used)
        pos = slots.index(bank.concept) if bank.concept in slots else None
        plans.append(_Plan(f"t{t}", template, "", slots, tuple(bank.slots[s] for s in slots), pos))
    return plans


def _group_rng(seed: int, group: int) -> np.random.Generator:
    # One stream per concept value, so a concept's captions do not depend on how many others were drawn.
    return np.random.default_rng([seed, 1, group])


class _Enumerated:
    """Every distinct caption of a small bank, grouped by concept, drawn without replacement."""

    def __init__(self, bank: Bank, plans: list[_Plan], seed: int, n_groups: int) -> None:
        self.plans, self.seed = plans, seed
        self.items: list[list[list[tuple[int, ...]]]] = [[[] for _ in plans] for _ in range(n_groups)]
        seen: set[str] = set()
        for t, plan in enumerate(plans):
            for idx in itertools.product(*(range(len(v)) for v in plan.values)):
                text = plan.render(idx)[1]
                if text not in seen:  # the first combination (in bank order) giving a text keeps it
                    seen.add(text)
                    self.items[idx[plan.concept_pos] if plan.concept_pos is not None else 0][t].append(idx)
        self.queues: dict[int, tuple[np.random.Generator, dict[int, list[tuple[int, ...]]]]] = {}

    def capacity(self, group: int) -> int:
        return sum(len(items) for items in self.items[group])

    def draw(self, group: int) -> tuple[str, str]:
        if group not in self.queues:
            rng = _group_rng(self.seed, group)
            shuffled = {t: [items[j] for j in rng.permutation(len(items))]
                        for t, items in enumerate(self.items[group]) if items}
            self.queues[group] = (rng, shuffled)
        rng, queues = self.queues[group]
        # A template chosen uniformly among those with captions left, so short templates are not drowned out.
        t = list(queues)[int(rng.integers(len(queues)))]
        idx = queues[t].pop()
        if not queues[t]:
            del queues[t]
        return self.plans[t].render(idx)


class _Sampled:
    """Random (template, slot values) draws: uniform template, uniform values, repeats rejected if `dedupe`."""

    def __init__(self, bank: Bank, plans: list[_Plan], seed: int, dedupe: bool) -> None:
        self.bank, self.plans, self.seed, self.dedupe = bank, plans, seed, dedupe
        self.rngs: dict[int, np.random.Generator] = {}
        self.seen: set[str] = set()

    def capacity(self, group: int) -> int | None:
        return sum(plan.group_size() for plan in self.plans) if self.dedupe else None

    def draw(self, group: int) -> tuple[str, str]:
        rng = self.rngs.setdefault(group, _group_rng(self.seed, group))
        for _ in range(MAX_TRIES):
            plan = self.plans[int(rng.integers(len(self.plans)))]
            idx = [int(i) for i in rng.integers(0, [len(v) for v in plan.values])] if plan.values else []
            if plan.concept_pos is not None:
                idx[plan.concept_pos] = group
            prompt_id, text = plan.render(tuple(idx))
            if not self.dedupe or text not in self.seen:
                self.seen.add(text)
                return prompt_id, text
        what = f" for {self.bank.concept} {self.bank.concepts[group]!r}" if self.bank.concept else ""
        raise BankError(
            f"{self.bank.source}: bank {self.bank.name!r} found no new distinct caption{what} in {MAX_TRIES} "
            f"tries after {len(self.seen)} captions; ask for fewer, add templates or slot values, "
            "or allow duplicates"
        )


def _check_capacity(bank: Bank, count: int, capacities: list[int | None]) -> None:
    if capacities[0] is None:
        return
    least = min(capacities)
    most_balanced = least * len(capacities) + sum(c > least for c in capacities)
    if count <= most_balanced:
        return
    balance = f" balanced over {bank.concept!r} ({len(capacities)} values)" if bank.concept else ""
    raise BankError(
        f"{bank.source}: bank {bank.name!r} can give at most {most_balanced} distinct captions{balance}, "
        f"asked for {count}; ask for fewer, add templates or slot values, or allow duplicates"
    )


def _concept_order(count: int, capacities: list[int | None], seed: int) -> list[int]:
    """Concept index of each caption: rounds over a fresh permutation of the concepts, so every prefix is
    balanced; a concept whose distinct captions are used up sits out (only the last round, after the check)."""
    rng = np.random.default_rng([seed, 0])
    order: list[int] = []
    round_number = 0
    while len(order) < count:
        eligible = [int(g) for g in rng.permutation(len(capacities))
                    if capacities[g] is None or capacities[g] > round_number]
        if not eligible:
            raise AssertionError("concept order ran out of captions after the capacity check")
        order.extend(eligible[: count - len(order)])
        round_number += 1
    return order
