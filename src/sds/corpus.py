"""A deterministic English-like corpus, generated from a seeded grammar.

The embedded default model is trained on this text, so the pipeline runs offline with no copied data.
The grammar is built so that a small LM has something real to learn (and to lose when pruned):
documents have a topic that biases word choice, subjects agree with verbs in number, named entities
recur within a document, and some clauses carry long-range structure (an opening "because" needs
a matching main clause, a list's length is announced before it).
"""
from __future__ import annotations

import random

TOPICS = {
    "sea": dict(
        nouns=["ship", "sailor", "harbour", "wave", "island", "captain", "storm", "net", "fish", "lighthouse",
               "anchor", "tide", "gull", "boat", "crew", "reef", "shore", "map", "compass", "cargo"],
        verbs=["sail", "steer", "anchor", "drift", "fish", "row", "signal", "chart", "load", "repair"],
        adjs=["salty", "stormy", "calm", "distant", "wooden", "grey", "rough", "deep", "bright", "cold"],
        places=["the northern bay", "the old port", "the outer reef", "the harbour wall", "the open sea"],
    ),
    "farm": dict(
        nouns=["farmer", "field", "barn", "cow", "harvest", "tractor", "orchard", "goat", "fence", "seed",
               "hen", "plough", "meadow", "horse", "well", "granary", "lamb", "crop", "shepherd", "mill"],
        verbs=["plant", "harvest", "feed", "plough", "milk", "water", "gather", "sow", "herd", "mend"],
        adjs=["green", "muddy", "golden", "fertile", "quiet", "dusty", "early", "ripe", "wide", "gentle"],
        places=["the lower field", "the village market", "the hill farm", "the river meadow", "the old barn"],
    ),
    "city": dict(
        nouns=["engineer", "street", "tower", "train", "market", "bridge", "council", "lamp", "clerk", "bank",
               "station", "tram", "office", "square", "museum", "printer", "factory", "mayor", "bus", "library"],
        verbs=["build", "open", "repair", "close", "visit", "design", "print", "manage", "inspect", "paint"],
        adjs=["busy", "modern", "narrow", "crowded", "tall", "noisy", "electric", "public", "new", "iron"],
        places=["the central square", "the east district", "the river quarter", "the main station", "the old town"],
    ),
    "science": dict(
        nouns=["scientist", "experiment", "theory", "sample", "laboratory", "telescope", "result", "model",
               "student", "journal", "crystal", "signal", "star", "cell", "engine", "measure", "lens", "field",
               "equation", "instrument"],
        verbs=["measure", "observe", "test", "predict", "publish", "record", "analyse", "compare", "repeat",
               "calibrate"],
        adjs=["precise", "careful", "surprising", "early", "strong", "weak", "novel", "stable", "faint", "clear"],
        places=["the northern observatory", "the university", "the field station", "the national institute",
                "the small laboratory"],
    ),
    "war": dict(
        nouns=["army", "general", "soldier", "fort", "battle", "treaty", "king", "castle", "rider", "wall",
               "banner", "siege", "guard", "messenger", "sword", "camp", "duke", "enemy", "river", "gate"],
        verbs=["defend", "attack", "march", "guard", "capture", "surrender", "besiege", "lead", "retreat",
               "sign"],
        adjs=["brave", "ancient", "bitter", "royal", "loyal", "fierce", "broken", "long", "northern", "proud"],
        places=["the western border", "the royal castle", "the river crossing", "the mountain pass",
                "the capital"],
    ),
}
FIRST = ["Anna", "Boris", "Clara", "David", "Elena", "Felix", "Greta", "Hugo", "Irene", "Jonas", "Karl", "Lena",
         "Marta", "Nils", "Olga", "Peter", "Rosa", "Simon", "Tomas", "Vera"]
LAST = ["Adler", "Berg", "Costa", "Dahl", "Engel", "Frost", "Gray", "Holm", "Ivanov", "Jensen", "Klein", "Lund",
        "Moreau", "Novak", "Olsen", "Petrov", "Quinn", "Rossi", "Stone", "Weber"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]
NUMBERS = ["two", "three", "four", "five", "six", "seven"]
FUNCTION_ADVS = ["slowly", "quickly", "carefully", "often", "rarely", "again", "together", "alone"]
CONNECT = ["However ,", "Later ,", "After that ,", "In the end ,", "Meanwhile ,", "At first ,"]


def _plural(noun: str) -> str:
    if noun.endswith(("s", "sh", "ch", "x")):
        return noun + "es"
    if noun.endswith("y") and noun[-2] not in "aeiou":
        return noun[:-1] + "ies"
    if noun.endswith("f"):
        return noun[:-1] + "ves"
    return noun + "s"


def _third_person(verb: str) -> str:
    if verb.endswith(("s", "sh", "ch", "x", "o")):
        return verb + "es"
    if verb.endswith("y") and verb[-2] not in "aeiou":
        return verb[:-1] + "ies"
    return verb + "s"


def _past(verb: str) -> str:
    if verb.endswith("e"):
        return verb + "d"
    if verb.endswith("y") and verb[-2] not in "aeiou":
        return verb[:-1] + "ied"
    return verb + "ed"


class _Document:
    """One document: a topic, a cast of named people, and the sentences that use them."""

    def __init__(self, rng: random.Random):
        self.rng = rng
        self.topic_name = rng.choice(sorted(TOPICS))
        self.topic = TOPICS[self.topic_name]
        self.people = [f"{rng.choice(FIRST)} {rng.choice(LAST)}" for _ in range(rng.randint(1, 3))]
        self.year = rng.randint(1820, 1990)

    def noun_phrase(self) -> tuple[str, bool]:
        """Returns (phrase, is_plural)."""
        rng, t = self.rng, self.topic
        noun = rng.choice(t["nouns"])
        plural = rng.random() < 0.35
        adj = rng.choice(t["adjs"]) + " " if rng.random() < 0.5 else ""
        if plural:
            det = rng.choice(["the", "many", "some", rng.choice(NUMBERS)])
            return f"{det} {adj}{_plural(noun)}", True
        det = rng.choice(["the", "the", "a", "this", "that"])
        if det == "a" and (adj or noun)[0] in "aeiou":
            det = "an"
        return f"{det} {adj}{noun}", False

    def subject(self) -> tuple[str, bool]:
        if self.rng.random() < 0.4:
            person = self.rng.choice(self.people)
            if self.rng.random() < 0.3:
                person = person.split()[0]
            return person, False
        return self.noun_phrase()

    def clause(self, tense: str) -> str:
        rng, t = self.rng, self.topic
        subj, plural = self.subject()
        verb = rng.choice(t["verbs"])
        if tense == "past":
            v = _past(verb)
        else:
            v = verb if plural else _third_person(verb)
        obj, _ = self.noun_phrase()
        tail = ""
        r = rng.random()
        if r < 0.3:
            tail = f" near {rng.choice(t['places'])}"
        elif r < 0.45:
            tail = f" {rng.choice(FUNCTION_ADVS)}"
        elif r < 0.55:
            tail = f" in {rng.choice(MONTHS)} {self.year}"
        return f"{subj} {v} {obj}{tail}"

    def sentence(self) -> str:
        rng = self.rng
        tense = "past" if rng.random() < 0.6 else "present"
        kind = rng.random()
        if kind < 0.15:
            s = f"Because {self.clause(tense)} , {self.clause(tense)}"
        elif kind < 0.25:
            n = rng.randint(2, 4)
            items = [_plural(x) for x in rng.sample(self.topic["nouns"], n)]
            listed = " , ".join(items[:-1]) + " and " + items[-1]
            s = f"There were {NUMBERS[n - 2]} things at {rng.choice(self.topic['places'])} : {listed}"
        elif kind < 0.35:
            s = f"{rng.choice(CONNECT)} {self.clause(tense)}"
        elif kind < 0.45:
            s = f"{self.clause(tense)} , and {self.clause(tense)}"
        elif kind < 0.52:
            who = rng.choice(self.people)
            s = f"{who} said that {self.clause(tense)}"
        else:
            s = self.clause(tense)
        return s[0].upper() + s[1:] + " ."

    def text(self) -> str:
        rng = self.rng
        title = f" = The {self.topic['adjs'][0].capitalize()} {self.topic['nouns'][0].capitalize()} of " \
                f"{self.people[0].split()[-1]} = "
        paragraphs = [title]
        for _ in range(rng.randint(2, 4)):
            paragraphs.append(" ".join(self.sentence() for _ in range(rng.randint(3, 7))))
        return "\n".join(paragraphs)


def generate_corpus(n_documents: int, seed: int) -> str:
    """`n_documents` documents of generated English-like text, separated by blank lines.

    The same (n_documents, seed) always gives the same text, on any machine.
    """
    rng = random.Random(seed)
    return "\n\n".join(_Document(rng).text() for _ in range(n_documents)) + "\n"


def builtin_splits(n_train_documents: int, n_test_documents: int, seed: int) -> dict[str, str]:
    """Train and held-out test text; the test split comes from a disjoint seed stream."""
    return {
        "train": generate_corpus(n_train_documents, seed),
        "test": generate_corpus(n_test_documents, seed + 1_000_003),
    }
