"""Word problems in GSM8K's style, built from templates, each with a worked solution whose every
line is computed: training data for teaching a real model to reason step by step.

A problem is two to four operations on small numbers wrapped in a story::

    Mia has 5 boxes with 12 pencils in each. She gives away 17 pencils. How many pencils does
    Mia have left?

    Pencils in the boxes: 5*12=60
    Left after giving 17 away: 60-17=43          (answer 43)

A problem's solution is data (:class:`dami_jax.toy.steps.Step`: later steps refer to earlier
results), so it can be written out in several styles and worked with a deliberate slip. Numbers
are drawn so that every step is exact (divisions have no remainder, nothing goes below zero). None of these questions is a GSM8K question: the stories are ours, and
:func:`question_hash` lets a training script check that against a benchmark's questions too.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Callable, Iterator

import numpy as np

from dami_jax.toy.steps import Step, work

NAMES = ("Mia", "Noah", "Ava", "Liam", "Zoe", "Omar", "Lena", "Ravi", "Sofia", "Ken", "Ines", "Tom", "Maya", "Eli", "Nora", "Sam")
PRONOUNS = {"Mia": "she", "Ava": "she", "Zoe": "she", "Lena": "she", "Sofia": "she", "Ines": "she", "Maya": "she", "Nora": "she"}
ITEMS = ("pencils", "apples", "stickers", "marbles", "books", "shells", "cards", "eggs")
PARTS = ("toys", "bottles", "chairs", "bricks", "cups")


@dataclasses.dataclass(frozen=True)
class WordProblem:
    question: str
    steps: tuple[Step, ...]
    answer: int
    template: str

    @property
    def lines(self) -> tuple[str, ...]:
        """The worked lines, ``what: expression=value``."""
        worked = work(self.steps)
        return tuple(s.line(e, v) for s, e, v in zip(self.steps, worked.expressions, worked.values))


def question_hash(question: str) -> str:
    """sha256 of the question with case and whitespace normalized: how held-out sets are compared."""
    return hashlib.sha256(" ".join(question.lower().split()).encode()).hexdigest()


def _pronoun(name: str) -> str:
    return PRONOUNS.get(name, "he")


def _int(rng: np.random.Generator, low: int, high: int) -> int:
    """A uniform integer in low..high, both included."""
    return int(rng.integers(low, high + 1))


def _pick(rng: np.random.Generator, options: tuple[str, ...]) -> str:
    return options[int(rng.integers(len(options)))]


def _s(name: str, expression: str) -> Step:
    """A word problem's step, written ``name: expression=value``."""
    return Step(name, ": ", expression)


def _boxes(rng):
    name, item = _pick(rng, NAMES), _pick(rng, ITEMS)
    n, k = _int(rng, 2, 9), _int(rng, 3, 15)
    g = _int(rng, 1, n * k - 1)
    q = (f"{name} has {n} boxes with {k} {item} in each. {_pronoun(name).capitalize()} gives away {g} {item}. "
         f"How many {item} does {name} have left?")  # fmt: skip
    return q, (_s(f"{item.capitalize()} in the boxes", f"{n}*{k}"), _s(f"Left after giving {g} away", f"{{0}}-{g}"))


def _change(rng):
    name, item = _pick(rng, NAMES), _pick(rng, ITEMS)
    n, price = _int(rng, 2, 8), _int(rng, 2, 12)
    bill = next(b for b in (10, 20, 50, 100) if b > n * price)
    q = f"{name} buys {n} {item} at ${price} each and pays with a ${bill} bill. How many dollars of change does {name} get?"
    return q, (_s("Cost", f"{n}*{price}"), _s("Change", f"{bill}-{{0}}"))


def _machine(rng):
    part = _pick(rng, PARTS)
    rate, hours = _int(rng, 3, 25), _int(rng, 4, 10)
    stop = _int(rng, 1, hours - 2)
    q = f"A machine makes {rate} {part} per hour. It runs for {hours} hours but stops for {stop} of them. How many {part} does it make?"
    return q, (_s("Hours working", f"{hours}-{stop}"), _s(part.capitalize(), f"{{0}}*{rate}"))


def _sharing(rng):
    name = _pick(rng, NAMES)
    friends, each, kept = _int(rng, 2, 8), _int(rng, 2, 9), _int(rng, 1, 9)
    total = friends * each + kept
    q = (f"{name} bakes {total} cookies, keeps {kept} and shares the rest equally among {friends} friends. "
         "How many cookies does each friend get?")  # fmt: skip
    return q, (_s("Cookies shared", f"{total}-{kept}"), _s("Each friend", f"{{0}}/{friends}"))


def _ages(rng):
    first, second = rng.choice(len(NAMES), 2, replace=False)
    a, b = NAMES[first], NAMES[second]
    age, older, years = _int(rng, 4, 40), _int(rng, 2, 20), _int(rng, 2, 15)
    q = f"{a} is {age} years old. {b} is {older} years older than {a}. How old will {b} be in {years} years?"
    return q, (_s(f"{b}'s age now", f"{age}+{older}"), _s(f"In {years} years", f"{{0}}+{years}"))


def _reading(rng):
    name = _pick(rng, NAMES)
    pages, weeks = _int(rng, 3, 15), _int(rng, 2, 5)
    q = f"{name} reads {pages} pages every day. How many pages does {_pronoun(name)} read in {weeks} weeks?"
    return q, (_s("Days", f"{weeks}*7"), _s("Pages", f"{{0}}*{pages}"))


def _sale(rng):
    item = _pick(rng, ("shirt", "lamp", "jacket", "game", "bike"))
    percent = _pick(rng, ("10", "20", "25", "50"))
    price = int(100 // int(percent)) * _int(rng, 1, 12)
    q = f"A {item} costs ${price}. It is on sale for {percent}% off. What is the sale price in dollars?"
    return q, (_s("Discount", f"{price}*{percent}/100"), _s("Sale price", f"{price}-{{0}}"))


def _marbles(rng):
    name = _pick(rng, NAMES)
    red, blue = _int(rng, 5, 30), _int(rng, 5, 30)
    taken = _int(rng, 1, min(red, blue) - 1)
    q = f"A bag has {red} red and {blue} blue marbles. {name} takes out {taken} marbles of each color. How many marbles are left in the bag?"
    return q, (_s("Marbles in all", f"{red}+{blue}"), _s("Taken out", f"{taken}*2"), _s("Left", "{0}-{1}"))


def _saving(rng):
    name = _pick(rng, NAMES)
    spend, save, weeks = _int(rng, 2, 20), _int(rng, 3, 15), _int(rng, 2, 9)
    earn, goal = spend + save, save * weeks
    q = f"{name} earns ${earn} a week and spends ${spend} of it. How many weeks does it take {name} to save ${goal}?"
    return q, (_s("Saved each week", f"{earn}-{spend}"), _s("Weeks", f"{goal}/{{0}}"))


def _trip(rng):
    v1, h1, v2, h2 = _int(rng, 20, 60), _int(rng, 1, 4), _int(rng, 20, 60), _int(rng, 1, 4)
    q = f"A car drives at {v1} miles per hour for {h1} hours, then at {v2} miles per hour for {h2} hours. How many miles does it drive?"
    return q, (_s("First part", f"{v1}*{h1}"), _s("Second part", f"{v2}*{h2}"), _s("Total", "{0}+{1}"))


def _farm(rng):
    chickens, cows = _int(rng, 2, 20), _int(rng, 2, 15)
    q = f"A farm has {chickens} chickens and {cows} cows. How many legs do the animals have in total?"
    return q, (_s("Chicken legs", f"{chickens}*2"), _s("Cow legs", f"{cows}*4"), _s("Total", "{0}+{1}"))


def _restock(rng):
    name, item = _pick(rng, NAMES), _pick(rng, ITEMS)
    have, boxes, per, used = _int(rng, 2, 30), _int(rng, 2, 6), _int(rng, 4, 12), _int(rng, 1, 9)
    q = (f"{name} has {have} {item} and buys {boxes} packs of {per} {item}. Then {_pronoun(name)} uses {used} of them. "
         f"How many {item} does {name} have now?")  # fmt: skip
    return q, (_s("Bought", f"{boxes}*{per}"), _s("After buying", f"{have}+{{0}}"), _s(f"After using {used}", f"{{1}}-{used}"))


TEMPLATES: dict[str, Callable[[np.random.Generator], tuple[str, tuple[Step, ...]]]] = {
    f.__name__.lstrip("_"): f
    for f in (_boxes, _change, _machine, _sharing, _ages, _reading, _sale, _marbles, _saving, _trip, _farm, _restock)
}


def word_problem(rng: np.random.Generator, template: str | None = None) -> WordProblem:
    """One problem from ``template`` (a name in :data:`TEMPLATES`), or from a random one."""
    name = template or list(TEMPLATES)[int(rng.integers(len(TEMPLATES)))]
    if name not in TEMPLATES:
        raise ValueError(f"unknown word-problem template {name!r}; known: {', '.join(TEMPLATES)}")
    question, steps = TEMPLATES[name](rng)
    return WordProblem(question, steps, work(steps).values[-1], name)


def word_problem_stream(seed: int) -> Iterator[WordProblem]:
    """An endless, deterministic stream of problems over all templates."""
    rng = np.random.default_rng([seed, 2])
    while True:
        yield word_problem(rng)
