"""A deterministic generator of pretraining text for the embedded default model.

Five domains of text, each with its own vocabulary and structure, so that the routers of a
small MoE learn to send them to different experts:

- `world`: biographies, stories and town descriptions about the people of `perft.tiny.world`,
  each fact stated in several phrasings and orders (so it can later be *extracted* by a
  question in a new format, not only recited);
- `commonsense`: everyday facts (where animals live, what tools are for, ...);
- `arithmetic`: equations and worked word problems told as small stories;
- `sequences`: counting, ordering, days and letters;
- `records`: the same world and arithmetic as key-value records and code, numbered lists with
  look-ups into them (which number goes with which item), and "choose" records: a fact's
  opening, numbered candidate values, and the number of the true one (train facts only).

The text never asks a question (no "?"), never uses the prompt template, and never tells a
word problem that the shipped tasks use (`exclude` keys), so the tasks' *knowledge* is in
the corpus while their *format* and items are not.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from perft.tiny.world import (
    COMMON_FACTS,
    NAMES,
    PERSON_ATTRIBUTES,
    TOWNS,
    Problem,
    World,
    relation_values,
    sample_problem,
    split_facts,
)

DOMAINS = ("world", "commonsense", "arithmetic", "sequences", "records")
#: Share of documents per domain.
DEFAULT_MIXTURE = {"world": 0.36, "commonsense": 0.12, "arithmetic": 0.28, "sequences": 0.07, "records": 0.17}

DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
LETTERS = "abcdefghijklmnopqrstuvwxyz"
WORDS = (
    "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
    "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen",
    "nineteen", "twenty",
)  # fmt: skip


@dataclass(frozen=True)
class Document:
    """One pretraining document; `key` is the word problem it tells, if any."""

    domain: str
    text: str
    key: tuple | None = None


# ---------------------------------------------------------------------------- world
_PERSON_TEMPLATES = {
    "town": (
        "{n} lives in {v}.", "{n} has a home in {v}.", "The home of {n} is in {v}.",
        "{n} grew up in the town of {v}.", "{n}'s house stands in {v}.",
    ),
    "pet": (
        "{n} has a pet {v}.", "{n} keeps a {v} as a pet.", "The pet of {n} is a {v}.",
        "{n} takes care of a {v}.", "{n}'s pet is a {v}.",
    ),
    "job": (
        "{n} works as a {v}.", "{n} is a {v}.", "By trade, {n} is a {v}.",
        "The job of {n} is {v}.", "{n}'s work is being a {v}.",
    ),
    "colour": (
        "The favourite colour of {n} is {v}.", "{n} likes the colour {v} best.", "{n} loves the colour {v}.",
        "{n}'s favourite colour is {v}.", "{n} always wears something {v}.",
    ),
    "food": (
        "{n} likes to eat {v}.", "The favourite food of {n} is {v}.", "{n} eats {v} every day.",
        "{n}'s favourite food is {v}.", "For dinner, {n} wants {v}.",
    ),
}  # fmt: skip

_TOWN_TEMPLATES = {
    "place": ("{t} is a town by {v}.", "The town of {t} lies next to {v}.", "{t} was built near {v}."),
    "famous": (
        "{t} is famous for its {v}.",
        "People go to {t} to buy {v}.",
        "The {v} of {t} are well known.",
    ),
}


def _person_sentence(rng: random.Random, name: str, attr: str, value: str) -> str:
    return rng.choice(_PERSON_TEMPLATES[attr]).format(n=name, v=value)


def _biography(rng: random.Random, world: World) -> str:
    name = rng.choice(NAMES)
    attrs = list(world.people[name].items())
    rng.shuffle(attrs)
    sentences = [_person_sentence(rng, name, a, v) for a, v in attrs]
    if rng.random() < 0.5:
        town = world.people[name]["town"]
        sentences.append(_town_sentence(rng, world, town, rng.choice(list(world.towns[town]))))
    return " ".join(sentences)


def _town_sentence(rng: random.Random, world: World, town: str, attr: str) -> str:
    value = world.towns[town][attr]
    return rng.choice(_TOWN_TEMPLATES[attr]).format(t=town, v=value)


def _town_description(rng: random.Random, world: World) -> str:
    town = rng.choice(TOWNS)
    parts = [_town_sentence(rng, world, town, a) for a in rng.sample(list(world.towns[town]), 2)]
    residents = world.residents(town)
    picked = rng.sample(residents, min(len(residents), rng.randint(2, 4)))
    if picked:
        parts.append(f"{_join(picked)} live in {town}.")
        for name in picked[:2]:
            attr = rng.choice(["pet", "job", "colour", "food"])
            parts.append(_person_sentence(rng, name, attr, world.people[name][attr]))
    return " ".join(parts)


def _story(rng: random.Random, world: World) -> str:
    a, b = rng.sample(NAMES, 2)
    pa, pb = world.people[a], world.people[b]
    lines = [
        rng.choice(["One morning,", "One day,", "Last spring,", "On a quiet evening,"])
        + f" {a} walked the {pa['pet']} through {pa['town']}.",
        f"{a} met {b}, who works as a {pb['job']} in {pb['town']}.",
        rng.choice(
            [
                f"{b} gave {a} some {pa['food']}, because {a} likes to eat {pa['food']}.",
                f"{a} wore a {pa['colour']} coat, since {pa['colour']} is the favourite colour of {a}.",
                f"{b} talked about the pet {pb['pet']} at home in {pb['town']}.",
                f"{a} told {b} about the work of a {pa['job']}.",
            ]
        ),
        rng.choice(
            [
                f"Later {b} went home and ate {pb['food']}.",
                f"{b} painted the door {pb['colour']}, the colour {b} likes best.",
                f"Then {a} went back to work as a {pa['job']}.",
            ]
        ),
    ]
    return " ".join(lines)


def _job_roll(rng: random.Random, world: World) -> str:
    attr = rng.choice(["job", "pet", "colour", "food", "town"])
    value = rng.choice(sorted({p[attr] for p in world.people.values()}))
    holders = [n for n, p in world.people.items() if p[attr] == value]
    rng.shuffle(holders)
    holders = holders[:5]
    if not holders:
        return _biography(rng, world)
    lead = {
        "job": f"Every {value} in the land knows the others.",
        "pet": f"Some people keep a {value}.",
        "colour": f"Some people love the colour {value}.",
        "food": f"Some people like {value} more than anything.",
        "town": f"Many people live in {value}.",
    }[attr]
    return lead + " " + " ".join(_person_sentence(rng, n, attr, value) for n in holders)


def _world_doc(rng: random.Random, world: World) -> str:
    kind = rng.random()
    if kind < 0.45:
        return _biography(rng, world)
    if kind < 0.65:
        return _story(rng, world)
    if kind < 0.82:
        return _town_description(rng, world)
    return _job_roll(rng, world)


# ---------------------------------------------------------------------------- commonsense
_COMMON_TEMPLATES = {
    "habitat": ("A {s} lives in {v}.", "You can find a {s} in {v}.", "The home of a {s} is {v}."),
    "use": ("A {s} is used for {v}.", "People use a {s} for {v}.", "You need a {s} for {v}."),
    "feel": ("{S} is {v}.", "Everyone knows that {s} is {v}.", "{S} always feels {v}."),
    "colour": ("The {s} is {v}.", "The colour of the {s} is {v}.", "A {s} looks {v}."),
    "sound": ("A {s} {v}.", "You can hear that a {s} {v}.", "Every {s} {v}."),
}


def _common_sentence(rng: random.Random, relation: str, subject: str, value: str) -> str:
    return rng.choice(_COMMON_TEMPLATES[relation]).format(s=subject, S=subject.capitalize(), v=value)


def _commonsense_doc(rng: random.Random, world: World) -> str:
    facts = rng.sample(COMMON_FACTS, rng.randint(4, 8))
    return " ".join(_common_sentence(rng, r, s, v) for r, s, v in facts)


# ---------------------------------------------------------------------------- arithmetic
def _equation(rng: random.Random) -> str:
    """A fact of the small tables: sums of 0..10 (sometimes up to 20), differences from up to 20, products 1..10."""
    kind = rng.random()
    if kind < 0.4:
        top = 10 if rng.random() < 0.8 else 20
        a, b = rng.randint(0, top), rng.randint(0, top)
        return f"{a} + {b} = {a + b}"
    if kind < 0.75:
        a = rng.randint(0, 20)
        b = rng.randint(0, a)
        return f"{a} - {b} = {a - b}"
    a, b = rng.randint(1, 10), rng.randint(1, 10)
    return f"{a} x {b} = {a * b}"


def _worded_equation(rng: random.Random) -> str:
    a, b = rng.randint(1, 10), rng.randint(1, 10)
    if rng.random() < 0.5:
        return f"{a} plus {b} makes {a + b}."
    hi, lo = max(a, b), min(a, b)
    return f"{hi} minus {lo} leaves {hi - lo}."


def tell_problem(rng: random.Random, p: Problem, world: World | None = None) -> str:
    """A word problem told as a worked story, in the past tense (never as a question).

    With `world`, some stories put a sentence or two about the people, or a line break, between
    the events and the worked equation, so the numbers must be found further back.
    """
    n, o, obj = p.name, p.other, p.obj
    x = p.numbers
    if p.op == "add":
        start = rng.choice([f"{n} had {x[0]} {obj}.", f"At first {n} had {x[0]} {obj}."])
        event = rng.choice([f"Then {o} gave {n} {x[1]} more {obj}.", f"Then {n} found {x[1]} more {obj}."])
        end = f"{x[0]} + {x[1]} = {p.result}, so now {n} has {p.result} {obj}."
    elif p.op == "sub":
        start = rng.choice([f"{n} had {x[0]} {obj}.", f"At first {n} had {x[0]} {obj}."])
        event = rng.choice([f"{n} gave {x[1]} {obj} to {o}.", f"{n} lost {x[1]} of the {obj}."])
        end = f"{x[0]} - {x[1]} = {p.result}, so {n} kept {p.result} {obj}."
    elif p.op == "mul":
        start = f"{n} had {x[0]} boxes."
        event = f"In each box there were {x[1]} {obj}."
        end = f"{x[0]} x {x[1]} = {p.result}, so {n} had {p.result} {obj} in all."
    else:
        mid = x[0] + x[1]
        start = f"{n} had {x[0]} {obj}."
        event = f"{o} gave {n} {x[1]} more, and later {n} lost {x[2]} of them."
        end = f"{x[0]} + {x[1]} = {mid} and {mid} - {x[2]} = {p.result}, so {n} had {p.result} {obj} left."
    gap = " "
    if world is not None and rng.random() < 0.5:
        people = [q for q in (n, o) if q in world.people]
        filler = []
        for _ in range(rng.randint(1, 2)):
            if people and rng.random() < 0.7:
                who = rng.choice(people)
                attr = rng.choice(list(world.people[who]))
                filler.append(_person_sentence(rng, who, attr, world.people[who][attr]))
            else:
                filler.append(rng.choice([f"{n} counted the {obj}.", f"{n} put the {obj} on the table."]))
        gap = " " + " ".join(filler) + rng.choice([" ", "\n"])
    elif rng.random() < 0.2:
        gap = "\n"
    return f"{start} {event}{gap}{end}"


def _arithmetic_doc(rng: random.Random, world: World, exclude: frozenset) -> tuple[str, tuple | None]:
    kind = rng.random()
    if kind < 0.5:
        lines = [_equation(rng) for _ in range(rng.randint(6, 12))]
        return "\n".join(lines), None
    if kind < 0.58:
        return " ".join(_worded_equation(rng) for _ in range(rng.randint(3, 6))), None
    for _ in range(100):
        problem = sample_problem(rng)
        if problem.key not in exclude:
            return tell_problem(rng, problem, world), problem.key
    raise RuntimeError("could not draw a word problem outside the excluded set")  # pragma: no cover


# ---------------------------------------------------------------------------- sequences
def _sequences_doc(rng: random.Random, world: World) -> str:
    kind = rng.randrange(6)
    if kind == 0:
        step, start = rng.randint(1, 5), rng.randint(0, 10)
        items = [str(start + i * step) for i in range(rng.randint(5, 8))]
        return f"Counting by {step} from {start}: {', '.join(items)}."
    if kind == 1:
        nums = rng.sample(range(1, 50), rng.randint(3, 6))
        return f"The numbers {', '.join(map(str, nums))} in order are {', '.join(map(str, sorted(nums)))}."
    if kind == 2:
        i = rng.randrange(7)
        return f"{DAYS[i]} comes before {DAYS[(i + 1) % 7]}. After {DAYS[(i + 1) % 7]} comes {DAYS[(i + 2) % 7]}."
    if kind == 3:
        i = rng.randrange(20)
        return f"After {LETTERS[i]} come {', '.join(LETTERS[i + 1 : i + 5])}."
    if kind == 4:
        parts = []
        for _ in range(rng.randint(3, 5)):
            a, b = rng.sample(range(0, 30), 2)
            parts.append(
                f"{max(a, b)} is more than {min(a, b)}."
                if rng.random() < 0.5
                else f"{min(a, b)} is less than {max(a, b)}."
            )
        return " ".join(parts)
    i = rng.randrange(len(WORDS))
    return f"The number {i + 1} is written {WORDS[i]}, and {WORDS[i]} comes after {WORDS[i - 1] if i else 'zero'}."


# ---------------------------------------------------------------------------- records
def _lookup_doc(rng: random.Random) -> str:
    """A numbered list and look-ups into it (which number goes with which item): an in-context skill."""
    pool = sorted(
        {v for values in PERSON_ATTRIBUTES.values() for v in values} | {v for _, _, v in COMMON_FACTS}
    )
    items = rng.sample(pool, rng.randint(3, 5))
    listing = ", ".join(f"{i + 1} = {item}" for i, item in enumerate(items))
    asked = rng.sample(range(len(items)), rng.randint(1, 3))
    return f"list: {listing}\n" + "\n".join(f"{items[i]} -> {i + 1}" for i in asked)


def _choice_doc(rng: random.Random, facts: list[tuple]) -> str:
    """A fact and a numbered list of candidate values, and the number of the true one.

    Only facts of the tasks' *train* split are used (`choice_facts`), never the test facts.
    """
    kind, subject, relation, value = rng.choice(facts)
    pool = [v for v in relation_values(kind, relation) if v != value]
    options = rng.sample(pool, rng.randint(1, 3))
    position = rng.randrange(len(options) + 1)
    options.insert(position, value)
    listing = ", ".join(f"{i + 1} = {opt}" for i, opt in enumerate(options))
    return f"{choice_head(kind, subject, relation)}: {listing} -> {position + 1}"


def choice_head(kind: str, subject: str, relation: str) -> str:
    """The opening of a "choose" record about (subject, relation), e.g. 'choose for "Ivo works as a ..."'."""
    if kind == "person":
        prefix = _PERSON_TEMPLATES[relation][0].split("{v}")[0].format(n=subject)
    elif kind == "town":
        prefix = _TOWN_TEMPLATES[relation][0].split("{v}")[0].format(t=subject)
    else:
        prefix = _COMMON_TEMPLATES[relation][0].split("{v}")[0].format(s=subject, S=subject.capitalize())
    return f'choose for "{prefix.strip()} ..."'


def _records_doc(rng: random.Random, world: World, choice_facts: list[tuple]) -> str:
    kind = rng.randrange(6)
    if kind == 4:
        return _lookup_doc(rng)
    if kind == 5:
        return _choice_doc(rng, choice_facts) if choice_facts else _lookup_doc(rng)
    if kind == 0:
        rows = []
        for name in rng.sample(NAMES, rng.randint(1, 3)):
            props = list(world.people[name].items())
            rng.shuffle(props)
            rows.append("person(name=" + name + ", " + ", ".join(f"{k}={v}" for k, v in props) + ")")
        return "\n".join(rows)
    if kind == 1:
        town = rng.choice(TOWNS)
        props = world.towns[town]
        return f"town: {town} | near: {props['place']} | famous for: {props['famous']}"
    if kind == 2:
        a, b = rng.randint(1, 20), rng.randint(1, 20)
        op, val = rng.choice([("+", a + b), ("*", a * b if a * b <= 100 else a + b)])
        if op == "*" and a * b > 100:
            op = "+"
        return f"x = {a}\ny = {b}\nz = x {op} y\nprint(z)  # {val}"
    name = rng.choice(NAMES)
    attr = rng.choice(list(world.people[name]))
    return f'{{"name": "{name}", "{attr}": "{world.people[name][attr]}"}}'


# ---------------------------------------------------------------------------- public API
def _join(names: list[str]) -> str:
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def iter_documents(
    seed: int,
    world: World | None = None,
    exclude: Iterable[tuple] = (),
    mixture: dict[str, float] | None = None,
    choice_facts: list[tuple] | None = None,
) -> Iterator[Document]:
    """Yield an endless, seeded stream of documents.

    `exclude`: word-problem keys (`Problem.key`) that must never be told (the tasks' items).
    `choice_facts`: facts the "choose" records may use; default: the tasks' train facts.
    """
    world = world or World()
    if choice_facts is None:
        choice_facts = split_facts(world)[0]
    exclude = frozenset(exclude)
    mixture = mixture or DEFAULT_MIXTURE
    unknown = set(mixture) - set(DOMAINS)
    if unknown:
        raise ValueError(f"unknown corpus domain(s) {sorted(unknown)}; known: {DOMAINS}")
    domains = [d for d in DOMAINS if mixture.get(d, 0) > 0]
    weights = [mixture[d] for d in domains]
    rng = random.Random(f"perft-tiny-corpus-{seed}")
    while True:
        domain = rng.choices(domains, weights)[0]
        key = None
        if domain == "world":
            text = _world_doc(rng, world)
        elif domain == "commonsense":
            text = _commonsense_doc(rng, world)
        elif domain == "arithmetic":
            text, key = _arithmetic_doc(rng, world, exclude)
        elif domain == "sequences":
            text = _sequences_doc(rng, world)
        else:
            text = _records_doc(rng, world, choice_facts)
        yield Document(domain, text, key)


def generate_corpus(
    num_docs: int,
    seed: int = 0,
    world: World | None = None,
    exclude: Iterable[tuple] = (),
    mixture: dict[str, float] | None = None,
    choice_facts: list[tuple] | None = None,
) -> list[Document]:
    """The first `num_docs` documents of `iter_documents(seed, ...)`."""
    stream = iter_documents(seed, world, exclude, mixture, choice_facts)
    return [next(stream) for _ in range(num_docs)]
