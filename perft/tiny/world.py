"""The small, fixed world that the embedded default's pretraining text and tasks talk about.

Everything here is deterministic: people with properties, towns with properties, a handful of
hand-written everyday facts, and the structure of small arithmetic word problems. The corpus
(`perft.tiny.corpus`) states these facts in many surface forms; the tasks (`perft.tiny.tasks`)
ask about them in a question format the corpus never uses.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

WORLD_SEED = 1234
TASK_SEED = 2024  # the seed of the shipped tasks' splits
TEST_FACT_SHARE = 0.3  # share of each kind of fact held out for the test split

NAMES = (
    "Ada", "Ben", "Cara", "Dan", "Eva", "Finn", "Gus", "Hana", "Ivo", "Jade", "Kai", "Lena",
    "Milo", "Nora", "Otto", "Pia", "Quin", "Rosa", "Sam", "Tara", "Ugo", "Vera", "Wes", "Xena",
    "Yara", "Zack", "Alma", "Bruno", "Clara", "Dora", "Emil", "Flora",
)  # fmt: skip

TOWNS = ("Oakvale", "Riverton", "Stonebridge", "Millbrook", "Ashford", "Pinehill", "Redcliff", "Lakeside")

#: Attribute -> possible values, for people.
PERSON_ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "town": TOWNS,
    "pet": ("dog", "cat", "rabbit", "parrot", "horse", "goat", "turtle", "hamster"),
    "job": ("baker", "farmer", "teacher", "doctor", "painter", "fisher", "builder", "tailor"),
    "colour": ("red", "blue", "green", "yellow", "purple", "orange", "black", "white"),
    "food": ("apples", "bread", "soup", "rice", "cheese", "fish", "cake", "plums"),
}

#: Town attribute -> one distinct value per town (a permutation is drawn per world).
TOWN_ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "place": (
        "the sea",
        "a river",
        "the mountains",
        "a forest",
        "a lake",
        "the desert",
        "a canyon",
        "the hills",
    ),
    "famous": ("wool", "glass", "pottery", "honey", "boats", "bells", "candles", "rope"),
}

#: Everyday facts: (relation, subject, value). Values of one relation are the distractor pool.
COMMON_FACTS: tuple[tuple[str, str, str], ...] = (
    ("habitat", "fish", "water"), ("habitat", "camel", "the desert"), ("habitat", "owl", "the forest"),
    ("habitat", "whale", "the ocean"), ("habitat", "cow", "a farm"), ("habitat", "bee", "a hive"),
    ("habitat", "frog", "a pond"), ("habitat", "penguin", "the ice"), ("habitat", "bat", "a cave"),
    ("habitat", "monkey", "the jungle"), ("habitat", "mole", "the ground"), ("habitat", "goat", "the hills"),
    ("use", "hammer", "hitting nails"), ("use", "broom", "sweeping floors"), ("use", "spoon", "eating soup"),
    ("use", "key", "opening doors"), ("use", "pen", "writing letters"), ("use", "saw", "cutting wood"),
    ("use", "bucket", "carrying water"), ("use", "needle", "sewing cloth"), ("use", "ladder", "climbing walls"),
    ("use", "oven", "baking bread"), ("use", "net", "catching fish"), ("use", "lamp", "lighting rooms"),
    ("use", "shovel", "digging holes"), ("use", "comb", "tidying hair"),
    ("feel", "ice", "cold"), ("feel", "fire", "hot"), ("feel", "sugar", "sweet"), ("feel", "lemon", "sour"),
    ("feel", "feather", "light"), ("feel", "rock", "heavy"), ("feel", "silk", "smooth"), ("feel", "sand", "dry"),
    ("feel", "rain", "wet"), ("feel", "salt", "salty"), ("feel", "glue", "sticky"), ("feel", "knife", "sharp"),
    ("colour", "grass", "green"), ("colour", "snow", "white"), ("colour", "coal", "black"),
    ("colour", "sky", "blue"), ("colour", "banana", "yellow"), ("colour", "tomato", "red"),
    ("colour", "carrot", "orange"), ("colour", "plum", "purple"),
    ("sound", "dog", "barks"), ("sound", "cat", "meows"), ("sound", "cow", "moos"), ("sound", "duck", "quacks"),
    ("sound", "lion", "roars"), ("sound", "snake", "hisses"), ("sound", "horse", "neighs"),
    ("sound", "sheep", "bleats"), ("sound", "owl", "hoots"), ("sound", "bee", "buzzes"),
)  # fmt: skip

#: Countable things for word problems.
OBJECTS = ("apples", "pens", "coins", "eggs", "cards", "marbles", "books", "cups", "shells", "stamps")

MATH_OPS = ("add", "sub", "mul", "add_sub")


@dataclass(frozen=True)
class Problem:
    """One small arithmetic word problem: who, what, which operation, which numbers."""

    op: str
    name: str
    other: str
    obj: str
    numbers: tuple[int, ...]

    @property
    def key(self) -> tuple:
        """Identity of the problem independent of its wording (used to keep test items out of the corpus)."""
        return (self.op, self.name, self.obj, self.numbers)

    @property
    def result(self) -> int:
        n = self.numbers
        if self.op == "add":
            return n[0] + n[1]
        if self.op == "sub":
            return n[0] - n[1]
        if self.op == "mul":
            return n[0] * n[1]
        return n[0] + n[1] - n[2]

    def steps(self) -> list[tuple[int, str, int, int]]:
        """The worked solution as (a, sign, b, result) equations."""
        n = self.numbers
        if self.op == "add":
            return [(n[0], "+", n[1], self.result)]
        if self.op == "sub":
            return [(n[0], "-", n[1], self.result)]
        if self.op == "mul":
            return [(n[0], "x", n[1], self.result)]
        return [(n[0], "+", n[1], n[0] + n[1]), (n[0] + n[1], "-", n[2], self.result)]


def sample_problem(rng: random.Random, op: str | None = None) -> Problem:
    """Draw a word problem with small numbers (sums of two numbers up to 10, differences from up to 20,
    products of 2..9), so every step is a fact of the corpus's small addition and times tables."""
    op = op or rng.choice(MATH_OPS)
    name, other = rng.sample(NAMES, 2)
    obj = rng.choice(OBJECTS)
    if op == "add":
        numbers: tuple[int, ...] = (rng.randint(1, 10), rng.randint(1, 10))
    elif op == "sub":
        a = rng.randint(2, 20)
        numbers = (a, rng.randint(1, a - 1))
    elif op == "mul":
        numbers = (rng.randint(2, 9), rng.randint(2, 9))
    else:
        a, b = rng.randint(1, 10), rng.randint(1, 10)
        numbers = (a, b, rng.randint(1, a + b - 1))
    return Problem(op, name, other, obj, numbers)


@dataclass
class World:
    """People and towns with properties, drawn once from `seed`."""

    seed: int = WORLD_SEED
    people: dict[str, dict[str, str]] = field(default_factory=dict)
    towns: dict[str, dict[str, str]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        rng = random.Random(self.seed)
        # Each value goes to the same number of people, so no value is a better guess than another.
        decks = {}
        for attr, values in PERSON_ATTRIBUTES.items():
            deck = list(values) * -(-len(NAMES) // len(values))
            rng.shuffle(deck)
            decks[attr] = deck
        for i, name in enumerate(NAMES):
            self.people[name] = {attr: decks[attr][i] for attr in PERSON_ATTRIBUTES}
        shuffled = {attr: rng.sample(values, len(values)) for attr, values in TOWN_ATTRIBUTES.items()}
        for i, town in enumerate(TOWNS):
            self.towns[town] = {attr: shuffled[attr][i] for attr in TOWN_ATTRIBUTES}

    def residents(self, town: str) -> list[str]:
        return [name for name, props in self.people.items() if props["town"] == town]

    def facts(self) -> list[tuple[str, str, str, str]]:
        """Every fact as (kind, subject, relation, value); kind is person, town or common."""
        out = [("person", n, a, v) for n, props in self.people.items() for a, v in props.items()]
        out += [("town", t, a, v) for t, props in self.towns.items() for a, v in props.items()]
        out += [("common", s, r, v) for r, s, v in COMMON_FACTS]
        return out


def relation_values(kind: str, relation: str) -> list[str]:
    """The value pool of a relation (where distractors for a question about it come from)."""
    if kind == "person":
        return list(PERSON_ATTRIBUTES[relation])
    if kind == "town":
        return list(TOWN_ATTRIBUTES[relation])
    return sorted({v for r, _, v in COMMON_FACTS if r == relation})


def split_facts(world: World, seed: int = TASK_SEED) -> tuple[list[tuple], list[tuple]]:
    """Split the world's facts into (train facts, test facts), disjoint, stratified by kind."""
    rng = random.Random(f"facts-{seed}")
    train, test = [], []
    for kind in ("person", "town", "common"):
        facts = [f for f in world.facts() if f[0] == kind]
        rng.shuffle(facts)
        cut = max(1, round(len(facts) * TEST_FACT_SHARE))
        test += facts[:cut]
        train += facts[cut:]
    return train, test
