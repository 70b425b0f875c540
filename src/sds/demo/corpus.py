"""A deterministic English-like corpus, generated from a seeded grammar.

The embedded default model is trained on this text, so the pipeline runs offline with no copied data.
The grammar is built so that a small LM has something real to learn (and to lose when pruned):
documents have a topic that biases word choice, subjects agree with verbs in number, named entities
recur within a document, and some clauses carry long-range structure (an opening "because" needs
a matching main clause, a list's length is announced before it).
"""
from __future__ import annotations

import json
import random
from pathlib import Path

from ..core.tasksets import BUILTIN_TASKS

# Each topic's words (topics.json beside this file: data, kept out of the code).
TOPICS = json.loads((Path(__file__).with_name("topics.json")).read_text(encoding="utf-8"))
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


# --- the embedded default's own zero-shot tasks -----------------------------------------------------------
# Multiple-choice items drawn from the same grammar, in lm-eval-harness's multiple_choice shape: a
# `context` (a document's title and opening sentences), `choices` (continuations, each starting with a
# space) and the index of the right one in `label`. Built from a seed stream disjoint from the corpus's.

CHOICE_TASKS = BUILTIN_TASKS


def _title(doc: _Document) -> str:
    return f" = The {doc.topic['adjs'][0].capitalize()} {doc.topic['nouns'][0].capitalize()} of " \
           f"{doc.people[0].split()[-1]} = "


def _context(doc: _Document) -> str:
    return _title(doc) + "\n" + " ".join(doc.sentence() for _ in range(doc.rng.randint(1, 3)))


def _sentence(words: str) -> str:
    return " " + words[0].upper() + words[1:] + " ."


def _agreement_item(doc: _Document) -> dict:
    """The next sentence (present tense) against the same sentence with the verb's number flipped."""
    rng = doc.rng
    context = _context(doc)
    subj, plural = doc.subject()
    verb = rng.choice(doc.topic["verbs"])
    obj, _ = doc.noun_phrase()
    tail = f" near {rng.choice(doc.topic['places'])}" if rng.random() < 0.3 else ""
    right, wrong = (verb, _third_person(verb)) if plural else (_third_person(verb), verb)
    choices = [_sentence(f"{subj} {v} {obj}{tail}") for v in (right, wrong)]
    label = rng.randrange(2)
    if label:
        choices.reverse()
    return {"context": context, "choices": choices, "label": label}


def _topic_item(doc: _Document) -> dict:
    """A sentence about one of the document's people in its topic's words, against the same sentence in
    the words of three other topics."""
    rng = doc.rng
    context = _context(doc)
    person = rng.choice(doc.people)
    past = rng.random() < 0.6
    plural = rng.random() < 0.35
    adj_i, noun_i, verb_i, place_i = (rng.randrange(10), rng.randrange(20), rng.randrange(10), rng.randrange(5))
    with_place = rng.random() < 0.5
    others = rng.sample([t for t in sorted(TOPICS) if t != doc.topic_name], 3)

    def words(topic: dict) -> str:
        verb = topic["verbs"][verb_i]
        noun = topic["nouns"][noun_i]
        obj = f"the {topic['adjs'][adj_i]} {_plural(noun) if plural else noun}"
        tail = f" near {topic['places'][place_i]}" if with_place else ""
        return _sentence(f"{person} {_past(verb) if past else _third_person(verb)} {obj}{tail}")

    choices = [words(doc.topic)] + [words(TOPICS[t]) for t in others]
    order = list(range(4))
    rng.shuffle(order)
    return {"context": context, "choices": [choices[i] for i in order], "label": order.index(0)}


def _count_item(doc: _Document) -> dict:
    """A list announced with its length ("There were three things at ... :") completed with 2, 3 or 4
    items: the long-range structure of the corpus's list sentences."""
    rng = doc.rng
    n = rng.randint(2, 4)
    items = [_plural(x) for x in rng.sample(doc.topic["nouns"], 4)]
    context = _context(doc) + f" There were {NUMBERS[n - 2]} things at {rng.choice(doc.topic['places'])} :"
    choices = [" " + " , ".join(items[:k - 1]) + " and " + items[k - 1] + " ." for k in (2, 3, 4)]
    return {"context": context, "choices": choices, "label": n - 2}


def choice_items(task: str, n_items: int, seed: int) -> list[dict]:
    """`n_items` multiple-choice items of one built-in task (see CHOICE_TASKS); deterministic in the seed.

    sds_agreement: subject–verb number agreement (2 choices, chance 1/2).
    sds_topic: the continuation that keeps the document's topic (4 choices, chance 1/4).
    sds_count: the list whose length matches the announced number (3 choices, chance 1/3).
    """
    make = {"sds_agreement": _agreement_item, "sds_topic": _topic_item, "sds_count": _count_item}.get(task)
    if make is None:
        raise ValueError(f"unknown built-in task {task!r}; expected one of {', '.join(CHOICE_TASKS)}")
    rng = random.Random(f"{task}:{seed}")
    return [make(_Document(rng)) for _ in range(n_items)]
