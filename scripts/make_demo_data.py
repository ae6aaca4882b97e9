#!/usr/bin/env python3
"""Generate phitune's bundled demo chat data set and its plain-text pretraining corpus.

    python scripts/make_demo_data.py            # writes the files below, deterministically

Writes
    src/phitune/assets/demo_chat/train.jsonl    chat conversations, one {"messages": [...]} per line
    src/phitune/assets/demo_chat/eval.jsonl     held-out conversations (no duplicates of train)
    src/phitune/assets/corpus.txt               plain English sentences with the same facts, no chat form

The data is made to be learnable by a tiny (~1M-parameter) model in a minute or two on a CPU: a
handful of task families, a few hundred distinct words, and one fixed answer template per family,
while the user's phrasing varies (3-5 paraphrases per family). Eval conversations are built from
held-out items (countries, number pairs, words) where a family has enough of them, and otherwise
from held-out (item, phrasing) combinations, so no eval question is ever asked in train.

Standard library only; the same seed gives byte-identical files.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "src" / "phitune" / "assets"

SYSTEM_PROMPTS = [
    "You are a concise assistant.",
    "You are a friendly tutor. Answer in one sentence.",
    "You are a helpful assistant.",
    "Answer the question in one short sentence.",
]
THANKS = ["Thanks!", "Thank you.", "Great, thanks.", "Thanks a lot!"]
WELCOME = "You are welcome."

# --------------------------------------------------------------------------------------------- facts

CAPITALS = [
    ("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"),
    ("Portugal", "Lisbon"), ("Japan", "Tokyo"), ("China", "Beijing"), ("India", "New Delhi"),
    ("Russia", "Moscow"), ("Egypt", "Cairo"), ("Kenya", "Nairobi"), ("Canada", "Ottawa"),
    ("Mexico", "Mexico City"), ("Brazil", "Brasilia"), ("Argentina", "Buenos Aires"), ("Peru", "Lima"),
    ("Chile", "Santiago"), ("Australia", "Canberra"), ("Greece", "Athens"), ("Turkey", "Ankara"),
    ("Poland", "Warsaw"), ("Norway", "Oslo"), ("Sweden", "Stockholm"), ("Finland", "Helsinki"),
    ("Denmark", "Copenhagen"), ("Ireland", "Dublin"), ("Austria", "Vienna"), ("Hungary", "Budapest"),
    ("Belgium", "Brussels"), ("Switzerland", "Bern"), ("Thailand", "Bangkok"), ("Vietnam", "Hanoi"),
    ("South Korea", "Seoul"), ("Indonesia", "Jakarta"), ("Iran", "Tehran"), ("Nigeria", "Abuja"),
    ("Ghana", "Accra"), ("Cuba", "Havana"), ("Colombia", "Bogota"), ("Morocco", "Rabat"),
    ("Czechia", "Prague"), ("Romania", "Bucharest"),
]

OPPOSITES = [
    ("hot", "cold"), ("big", "small"), ("up", "down"), ("open", "closed"), ("fast", "slow"),
    ("happy", "sad"), ("light", "dark"), ("young", "old"), ("wet", "dry"), ("full", "empty"),
    ("early", "late"), ("hard", "soft"), ("rich", "poor"), ("strong", "weak"), ("loud", "quiet"),
    ("clean", "dirty"), ("thick", "thin"), ("long", "short"), ("high", "low"), ("left", "right"),
    ("in", "out"), ("on", "off"), ("yes", "no"), ("day", "night"), ("black", "white"),
    ("good", "bad"), ("true", "false"), ("win", "lose"), ("push", "pull"), ("buy", "sell"),
    ("give", "take"), ("start", "finish"), ("first", "last"), ("near", "far"), ("inside", "outside"),
    ("above", "below"), ("before", "after"), ("easy", "difficult"), ("cheap", "expensive"),
    ("friend", "enemy"), ("love", "hate"), ("sweet", "sour"), ("wide", "narrow"), ("deep", "shallow"),
    ("safe", "dangerous"), ("awake", "asleep"), ("front", "back"), ("smooth", "rough"),
    ("north", "south"), ("east", "west"), ("question", "answer"), ("arrive", "leave"),
    ("laugh", "cry"), ("remember", "forget"), ("always", "never"), ("everything", "nothing"),
]

PLURALS = [
    ("cat", "cats"), ("dog", "dogs"), ("box", "boxes"), ("bus", "buses"), ("fox", "foxes"),
    ("child", "children"), ("man", "men"), ("woman", "women"), ("mouse", "mice"), ("goose", "geese"),
    ("tooth", "teeth"), ("foot", "feet"), ("person", "people"), ("sheep", "sheep"), ("fish", "fish"),
    ("deer", "deer"), ("baby", "babies"), ("city", "cities"), ("lady", "ladies"), ("story", "stories"),
    ("knife", "knives"), ("leaf", "leaves"), ("wolf", "wolves"), ("wife", "wives"), ("half", "halves"),
    ("potato", "potatoes"), ("tomato", "tomatoes"), ("hero", "heroes"), ("ox", "oxen"),
    ("cactus", "cacti"), ("book", "books"), ("apple", "apples"), ("house", "houses"), ("tree", "trees"),
    ("car", "cars"), ("bird", "birds"), ("church", "churches"), ("watch", "watches"), ("dish", "dishes"),
    ("glass", "glasses"), ("key", "keys"), ("toy", "toys"), ("bench", "benches"), ("star", "stars"),
]

# (thing as used mid-sentence, colour)
COLOURS = [
    ("grass", "green"), ("the sky", "blue"), ("snow", "white"), ("coal", "black"), ("a banana", "yellow"),
    ("a tomato", "red"), ("a lemon", "yellow"), ("a lime", "green"), ("milk", "white"), ("blood", "red"),
    ("a strawberry", "red"), ("a carrot", "orange"), ("chocolate", "brown"), ("the sun", "yellow"),
    ("a frog", "green"), ("a crow", "black"), ("a plum", "purple"), ("a pumpkin", "orange"),
    ("the sea", "blue"), ("a flamingo", "pink"), ("an elephant", "grey"), ("soil", "brown"),
    ("a cloud", "white"), ("a cherry", "red"), ("an eggplant", "purple"), ("a leaf", "green"),
]

# (animal with article, plural, sound)
SOUNDS = [
    ("a cow", "cows", "moo"), ("a dog", "dogs", "woof"), ("a cat", "cats", "meow"),
    ("a duck", "ducks", "quack"), ("a sheep", "sheep", "baa"), ("a pig", "pigs", "oink"),
    ("a horse", "horses", "neigh"), ("a lion", "lions", "roar"), ("a snake", "snakes", "hiss"),
    ("an owl", "owls", "hoot"), ("a bee", "bees", "buzz"), ("a frog", "frogs", "croak"),
    ("a mouse", "mice", "squeak"), ("a rooster", "roosters", "cock-a-doodle-doo"),
    ("a donkey", "donkeys", "hee-haw"), ("a wolf", "wolves", "howl"), ("a crow", "crows", "caw"),
    ("a turkey", "turkeys", "gobble"), ("a dove", "doves", "coo"), ("a bird", "birds", "tweet"),
    ("a chick", "chicks", "cheep"), ("a goat", "goats", "bleat"),
]

WORDS = [
    "cat", "dog", "sun", "tree", "house", "apple", "river", "moon", "bird", "fish", "green", "water",
    "table", "chair", "book", "music", "light", "garden", "window", "flower", "school", "paper",
    "stone", "cloud", "horse", "lemon", "bread", "milk", "road", "star", "hand", "door", "snow",
    "rain", "ship", "train", "clock", "pencil", "orange", "bottle", "cow", "sea",
]

DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September",
          "October", "November", "December"]

# (how many of these, in this, number)
UNITS = [
    ("seconds", "a minute", 60), ("minutes", "an hour", 60), ("hours", "a day", 24),
    ("days", "a week", 7), ("months", "a year", 12), ("weeks", "a year", 52), ("days", "a year", 365),
    ("days", "a leap year", 366), ("years", "a decade", 10), ("years", "a century", 100),
    ("centimetres", "a metre", 100), ("millimetres", "a centimetre", 10), ("metres", "a kilometre", 1000),
    ("grams", "a kilogram", 1000), ("millilitres", "a litre", 1000), ("minutes", "half an hour", 30),
    ("hours", "half a day", 12), ("days", "a fortnight", 14),
]

ONES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
        "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen",
        "nineteen"]
TENS = {20: "twenty", 30: "thirty", 40: "forty", 50: "fifty", 60: "sixty"}


def number_word(n: int) -> str:
    if n < 20:
        return ONES[n]
    tens, ones = divmod(n, 10)
    return TENS[tens * 10] + ("" if ones == 0 else "-" + ONES[ones])


def cap(text: str) -> str:
    return text[:1].upper() + text[1:]


# ------------------------------------------------------------------------------------------ families
#
# Each family knows its items, 3-5 question phrasings, one answer template, a short follow-up form
# ("And Germany?") and the plain sentences the corpus uses for an item.


class Family:
    name = ""
    weight = 1.0
    hold_out_items = True  # False: items shared, (item, phrasing) combinations held out instead

    def items(self) -> list:
        raise NotImplementedError

    def phrasings(self, item) -> list[str]:
        raise NotImplementedError

    def answer(self, item) -> str:
        raise NotImplementedError

    def follow_up(self, item, rng: random.Random) -> str:
        raise NotImplementedError

    def facts(self, item, rng: random.Random) -> list[str]:
        raise NotImplementedError


class Capitals(Family):
    name, weight = "capitals", 3.0

    def items(self):
        return CAPITALS

    def phrasings(self, item):
        c = item[0]
        return [f"What is the capital of {c}?", f"What is the capital city of {c}?",
                f"Which city is the capital of {c}?", f"Tell me the capital of {c}.",
                f"Do you know the capital of {c}?"]

    def answer(self, item):
        return f"The capital of {item[0]} is {item[1]}."

    def follow_up(self, item, rng):
        return rng.choice([f"And {item[0]}?", f"What about {item[0]}?", f"How about {item[0]}?"])

    def facts(self, item, rng):
        c, city = item
        return [f"The capital of {c} is {city}.", f"{city} is the capital of {c}.",
                f"{city} is the capital city of {c}.", f"{c} has {city} as its capital.",
                f"{city} is a big city in {c}.", f"If you ask for the capital of {c}, the answer is {city}.",
                f"The capital city of {c} is {city}.", f"{c} is a country and {city} is its capital."]


class Arithmetic(Family):
    name, weight = "arithmetic", 3.0

    def items(self):
        out = [("plus", a, b, a + b) for a in range(1, 11) for b in range(1, 11)]
        out += [("minus", a, b, a - b) for a in range(2, 16) for b in range(1, 10) if b < a]
        out += [("times", a, b, a * b) for a in range(1, 7) for b in range(1, 7)]
        return out

    def phrasings(self, item):
        op, a, b, _ = item
        e = f"{a} {op} {b}"
        return [f"What is {e}?", f"How much is {e}?", f"What does {e} make?", f"Please work out {e}.",
                f"Can you tell me what {e} is?"]

    def answer(self, item):
        op, a, b, r = item
        return f"{a} {op} {b} is {r}."

    def follow_up(self, item, rng):
        op, a, b, _ = item
        return rng.choice([f"And {a} {op} {b}?", f"What about {a} {op} {b}?", f"How about {a} {op} {b}?"])

    def facts(self, item, rng):
        op, a, b, r = item
        wa, wb, wr = number_word(a), number_word(b), number_word(r)
        out = [f"{a} {op} {b} is {r}.", f"{cap(wa)} {op} {wb} is {wr}.", f"{cap(wa)} {op} {wb} makes {wr}.",
               f"{a} {op} {b} makes {r}.", f"If you work out {a} {op} {b}, you get {r}."]
        if op == "plus":
            out += [f"The sum of {a} and {b} is {r}.", f"If you add {b} to {a}, you get {r}.",
                    f"{cap(wa)} and {wb} together make {wr}."]
        elif op == "minus":
            out += [f"If you take {b} away from {a}, you get {r}.", f"{r} is {b} less than {a}."]
        else:
            out += [f"{a} groups of {b} make {r}.", f"The product of {a} and {b} is {r}."]
        return out


class Opposites(Family):
    name, weight = "opposites", 3.0

    def items(self):  # a pair is one item, asked in either direction
        return OPPOSITES

    def phrasings(self, item):
        # items are (word, other); both directions are generated by directed_items() below
        w = item[0]
        return [f"What is the opposite of {w}?", f"What is the opposite of the word {w}?",
                f"Tell me the opposite of {w}.", f"Which word means the opposite of {w}?",
                f"Give me the opposite of {w}."]

    def answer(self, item):
        return f"The opposite of {item[0]} is {item[1]}."

    def follow_up(self, item, rng):
        return rng.choice([f"And {item[0]}?", f"What about {item[0]}?", f"How about {item[0]}?"])

    def facts(self, item, rng):
        w, o = item
        return [f"The opposite of {w} is {o}.", f"{cap(o)} is the opposite of {w}.",
                f"{cap(w)} and {o} are opposites.", f"The word {w} means the opposite of {o}.",
                f"Something that is not {w} may be {o}."]


class Colours(Family):
    name, weight, hold_out_items = "colours", 1.5, False

    def items(self):
        return COLOURS

    def phrasings(self, item):
        t = item[0]
        return [f"What colour is {t}?", f"What is the colour of {t}?", f"Which colour is {t}?",
                f"Tell me the colour of {t}.", f"What color is {t}?"]

    def answer(self, item):
        return f"{cap(item[0])} is {item[1]}."

    def follow_up(self, item, rng):
        return rng.choice([f"And {item[0]}?", f"What about {item[0]}?", f"How about {item[0]}?"])

    def facts(self, item, rng):
        t, c = item
        return [f"{cap(t)} is {c}.", f"The colour of {t} is {c}.", f"{cap(t)} is usually {c}.",
                f"If you look at {t}, you see that it is {c}.", f"{cap(c)} is the colour of {t}."]


class Sounds(Family):
    name, weight, hold_out_items = "animal sounds", 1.5, False

    def items(self):
        return SOUNDS

    def phrasings(self, item):
        a = item[0]
        return [f"What sound does {a} make?", f"What does {a} say?", f"What noise does {a} make?",
                f"Which sound does {a} make?"]

    def answer(self, item):
        return f"{cap(item[0])} says {item[2]}."

    def follow_up(self, item, rng):
        return rng.choice([f"And {item[0]}?", f"What about {item[0]}?", f"How about {item[0]}?"])

    def facts(self, item, rng):
        a, many, s = item
        return [f"{cap(a)} says {s}.", f"{cap(many)} say {s}.", f"The sound {a} makes is {s}.",
                f"{cap(a)} makes the sound {s}.", f"When {a} speaks, it says {s}."]


class Plurals(Family):
    name, weight = "plurals", 2.0

    def items(self):
        return PLURALS

    def phrasings(self, item):
        w = item[0]
        return [f"What is the plural of {w}?", f"What is the plural of the word {w}?",
                f"Tell me the plural of {w}.", f"How do you say more than one {w}?"]

    def answer(self, item):
        return f"The plural of {item[0]} is {item[1]}."

    def follow_up(self, item, rng):
        return rng.choice([f"And {item[0]}?", f"What about {item[0]}?", f"How about {item[0]}?"])

    def facts(self, item, rng):
        w, p = item
        return [f"The plural of {w} is {p}.", f"One {w}, two {p}.", f"More than one {w} are called {p}.",
                f"We say one {w} but many {p}.", f"{cap(p)} is the plural of {w}."]


class Letters(Family):
    name, weight = "letter counts", 1.5

    def items(self):
        return WORDS

    def phrasings(self, item):
        return [f"How many letters are in the word {item}?", f"How many letters does the word {item} have?",
                f"Count the letters in {item}.", f"How many letters are in {item}?"]

    def answer(self, item):
        return f"The word {item} has {len(item)} letters."

    def follow_up(self, item, rng):
        return rng.choice([f"And {item}?", f"What about {item}?", f"And the word {item}?"])

    def facts(self, item, rng):
        n = len(item)
        spelled = ", ".join(item)
        return [f"The word {item} has {n} letters.", f"The word {item} is spelled {spelled}.",
                f"The word {item} has {number_word(n)} letters: {spelled}.",
                f"{cap(item)} is a word with {n} letters.", f"The first letter of {item} is {item[0]}."]


class Calendar(Family):
    name, weight, hold_out_items = "days and months", 1.5, False

    def items(self):
        out = []
        for seq, kind in ((DAYS, "day"), (MONTHS, "month")):
            for i, x in enumerate(seq):
                out.append((kind, "after", x, seq[(i + 1) % len(seq)]))
                out.append((kind, "before", x, seq[(i - 1) % len(seq)]))
        return out

    def phrasings(self, item):
        kind, rel, x, _ = item
        verb = "follows" if rel == "after" else "comes just before"
        return [f"What {kind} comes {rel} {x}?", f"Which {kind} is {rel} {x}?",
                f"What is the {kind} {rel} {x}?", f"Which {kind} {verb} {x}?"]

    def answer(self, item):
        kind, rel, x, y = item
        return f"The {kind} {rel} {x} is {y}."

    def follow_up(self, item, rng):
        kind, rel, x, _ = item
        return rng.choice([f"And {rel} {x}?", f"What about {rel} {x}?", f"And the {kind} {rel} {x}?"])

    def facts(self, item, rng):
        kind, rel, x, y = item
        out = [f"The {kind} {rel} {x} is {y}.", f"{y} comes {rel} {x}."]
        if rel == "after":
            out += [f"{x} is followed by {y}.", f"After {x} comes {y}."]
        else:
            out += [f"{y} is the {kind} before {x}.", f"Before {x} comes {y}."]
        return out


class Units(Family):
    name, weight, hold_out_items = "units", 1.5, False

    def items(self):
        return UNITS

    def phrasings(self, item):
        many, whole, _ = item
        return [f"How many {many} are in {whole}?", f"How many {many} are there in {whole}?",
                f"Tell me how many {many} are in {whole}.", f"How many {many} make {whole}?"]

    def answer(self, item):
        many, whole, n = item
        return f"There are {n} {many} in {whole}."

    def follow_up(self, item, rng):
        many, whole, _ = item
        return rng.choice([f"And how many {many} are in {whole}?", f"What about {many} in {whole}?"])

    def facts(self, item, rng):
        many, whole, n = item
        return [f"There are {n} {many} in {whole}.", f"{cap(whole)} has {n} {many}.",
                f"{n} {many} make {whole}.", f"{cap(whole)} is {n} {many} long."
                if many in ("seconds", "minutes", "hours", "days", "weeks", "months", "years")
                else f"{cap(whole)} is the same as {n} {many}."]


FAMILIES: list[Family] = [Capitals(), Arithmetic(), Opposites(), Colours(), Sounds(), Plurals(),
                          Letters(), Calendar(), Units()]


def directed(family: Family, items: list) -> list:
    """Opposites are stored as pairs; ask them in both directions."""
    if isinstance(family, Opposites):
        return [d for a, b in items for d in ((a, b), (b, a))]
    return items


# ---------------------------------------------------------------------------------------- the split


class Pool:
    """The (item, phrasing index) questions one split may ask for one family."""

    def __init__(self, family: Family, items: list, combos: set | None):
        self.family, self.items, self.combos = family, items, combos

    def questions(self) -> list[tuple]:
        out = []
        for i, item in enumerate(self.items):
            for p in range(len(self.family.phrasings(item))):
                if self.combos is None or (i, p) in self.combos:
                    out.append((item, p))
        return out


def make_pools(rng: random.Random, eval_fraction: float = 0.2) -> tuple[dict, dict]:
    train, evals = {}, {}
    for fam in FAMILIES:
        items = list(fam.items())
        if fam.hold_out_items:
            order = items[:]
            rng.shuffle(order)
            k = max(1, round(len(order) * eval_fraction))
            held = set(map(repr, order[:k]))
            ev = [x for x in items if repr(x) in held]
            tr = [x for x in items if repr(x) not in held]
            train[fam.name] = Pool(fam, directed(fam, tr), None)
            evals[fam.name] = Pool(fam, directed(fam, ev), None)
        else:
            items = directed(fam, items)
            combos = [(i, p) for i, it in enumerate(items) for p in range(len(fam.phrasings(it)))]
            rng.shuffle(combos)
            k = max(1, round(len(combos) * 0.25))
            evals[fam.name] = Pool(fam, items, set(combos[:k]))
            train[fam.name] = Pool(fam, items, set(combos[k:]))
    return train, evals


# -------------------------------------------------------------------------------------- conversations


def conversation(rng: random.Random, pools: dict, multi: bool, system: bool) -> list[dict]:
    fams = FAMILIES
    fam = rng.choices(fams, weights=[f.weight for f in fams])[0]
    pool = pools[fam.name]
    item, p = rng.choice(pool.questions())
    msgs = []
    if system:
        msgs.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
    msgs += [{"role": "user", "content": fam.phrasings(item)[p]},
             {"role": "assistant", "content": fam.answer(item)}]
    if multi:
        n_more = rng.choices([1, 2], weights=[0.65, 0.35])[0]
        for k in range(n_more):
            last = k == n_more - 1
            kind = rng.choices(["follow", "new", "thanks"], weights=[0.55, 0.25, 0.2 if last else 0.0])[0]
            if kind == "follow":
                others = [x for x in pool.items if x != item]
                item = rng.choice(others)
                user, reply = fam.follow_up(item, rng), fam.answer(item)
            elif kind == "new":
                fam = rng.choices(fams, weights=[f.weight for f in fams])[0]
                pool = pools[fam.name]
                item, p = rng.choice(pool.questions())
                user, reply = fam.phrasings(item)[p], fam.answer(item)
            else:
                user, reply = rng.choice(THANKS), WELCOME
            msgs += [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]
    return msgs


def key(msgs: list[dict]) -> str:
    return json.dumps(msgs, sort_keys=True)


def first_question(msgs: list[dict]) -> str:
    return next(m["content"] for m in msgs if m["role"] == "user")


def make_split(rng: random.Random, pools: dict, n: int, seen: set[str]) -> list[list[dict]]:
    n_multi, n_system = round(n * 0.20), round(n * 0.25)
    multi = set(rng.sample(range(n), n_multi))
    system = set(rng.sample(range(n), n_system))
    out = []
    for i in range(n):
        for _ in range(50):  # avoid exact duplicates where the question space allows
            msgs = conversation(rng, pools, i in multi, i in system)
            if key(msgs) not in seen:
                break
        seen.add(key(msgs))
        out.append(msgs)
    return out


def check(conv: list[dict]) -> None:
    roles = [m["role"] for m in conv]
    body = roles[1:] if roles[0] == "system" else roles
    assert body and len(body) % 2 == 0, roles
    assert all(r == ("user" if j % 2 == 0 else "assistant") for j, r in enumerate(body)), roles
    assert all(isinstance(m["content"], str) and m["content"].strip() for m in conv), conv
    assert sum(len(m["content"].split()) for m in conv) < 60, conv


# ------------------------------------------------------------------------------------------- corpus

FILLER = [
    "This is a simple fact.", "It is good to know this.", "Many people know this.", "Children learn this at school.",
    "That is easy to remember.", "Here is another fact.", "Now you know.", "It is true.",
]
POLITE = [
    "When someone says thanks, you can say you are welcome.", "Thank you. You are welcome.",
    "A good answer is short and clear.", "A question asks for something, and an answer gives it.",
    "A concise answer uses one short sentence.", "A friendly tutor answers in one sentence.",
]


def calendar_lines() -> list[str]:
    return [
        "The days of the week are " + ", ".join(DAYS[:-1]) + " and Sunday.",
        "The months of the year are " + ", ".join(MONTHS[:-1]) + " and December.",
        "There are seven days in a week and twelve months in a year.",
        "A week starts on Monday and ends on Sunday.", "A year starts in January and ends in December.",
    ]


def make_corpus(rng: random.Random, target_bytes: int) -> str:
    facts: list[str] = []
    for fam in FAMILIES:
        for item in directed(fam, fam.items()):
            facts += fam.facts(item, rng)
    facts += calendar_lines() + POLITE
    for a, b in OPPOSITES:
        facts.append(f"{cap(a)} and {b} are a pair of opposite words.")
    for c, _ in CAPITALS:
        facts.append(f"{c} is a country.")
    for t, _ in COLOURS:
        facts.append(f"We can see {t}.")
    paragraphs, size = [], 0
    while size < target_bytes:
        rng.shuffle(facts)
        i = 0
        while i < len(facts) and size < target_bytes:
            n = rng.randint(4, 9)
            sents = facts[i:i + n]
            i += n
            if rng.random() < 0.3:
                sents.insert(rng.randrange(len(sents) + 1), rng.choice(FILLER))
            para = " ".join(sents)
            paragraphs.append(para)
            size += len(para) + 2
    return "\n\n".join(paragraphs) + "\n"


# --------------------------------------------------------------------------------------------- main


def write_jsonl(path: Path, convs: list[list[dict]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="\n") as f:
        for c in convs:
            f.write(json.dumps({"messages": c}, ensure_ascii=False) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--train", type=int, default=720, help="train conversations")
    ap.add_argument("--eval", type=int, default=100, help="eval conversations")
    ap.add_argument("--corpus-kb", type=int, default=300, help="approximate corpus size in KB")
    ap.add_argument("--out", type=Path, default=ASSETS, help="assets folder to write into")
    args = ap.parse_args()

    rng = random.Random(args.seed)
    train_pools, eval_pools = make_pools(rng)
    seen: set[str] = set()
    train = make_split(rng, train_pools, args.train, seen)
    train_keys = {key(c) for c in train}
    evals = make_split(rng, eval_pools, args.eval, set(train_keys))

    for c in train + evals:
        check(c)
    assert not train_keys & {key(c) for c in evals}, "an eval conversation duplicates a train one"
    # Stronger: no eval conversation opens with a question that train ever asks first.
    train_first = {first_question(c) for c in train}
    assert not any(first_question(c) in train_first for c in evals), "an eval question is asked in train"

    write_jsonl(args.out / "demo_chat" / "train.jsonl", train)
    write_jsonl(args.out / "demo_chat" / "eval.jsonl", evals)
    corpus = make_corpus(random.Random(args.seed + 1), args.corpus_kb * 1000)
    (args.out / "corpus.txt").write_text(corpus, encoding="utf-8", newline="\n")

    for name, convs in (("train", train), ("eval", evals)):
        n_multi = sum(1 for c in convs if sum(m["role"] == "user" for m in c) > 1)
        n_sys = sum(1 for c in convs if c[0]["role"] == "system")
        n_unique = len({key(c) for c in convs})
        print(f"{name}: {len(convs)} conversations, {n_unique} unique, {n_multi} multi-turn, "
              f"{n_sys} with a system prompt")
    words = {w.strip(".,?!:").lower() for w in corpus.split()}
    print(f"corpus: {len(corpus.encode())} bytes, {len(words)} distinct words")


if __name__ == "__main__":
    main()
