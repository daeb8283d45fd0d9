"""A small probabilistic grammar of English-like sentences, the text ``python -m subq.train`` learns from.

Subjects agree in number with their verbs, across adjectives, prepositional phrases and relative clauses
("the dog near the birds that sing sleeps"), so beyond spelling a few dozen words a model has structure at several
distances to learn. Words are drawn with Zipf-like weights, as in natural text, and recursion thins out with depth
so sentences stay short. Deterministic for a seed: only ``random.Random.random`` is used, whose stream Python keeps
stable across versions.
"""

from __future__ import annotations

import bisect
import itertools
import random

# (singular, plural) forms; the singular verb is the third person -s form.
NOUNS = [("dog", "dogs"), ("cat", "cats"), ("child", "children"), ("bird", "birds"), ("teacher", "teachers"),
         ("farmer", "farmers"), ("mouse", "mice"), ("king", "kings"), ("robot", "robots"), ("student", "students")]
INTRANSITIVE = [("sleeps", "sleep"), ("runs", "run"), ("sings", "sing"), ("waits", "wait"), ("laughs", "laugh"),
                ("falls", "fall")]
TRANSITIVE = [("sees", "see"), ("likes", "like"), ("follows", "follow"), ("helps", "help"), ("finds", "find"),
              ("watches", "watch"), ("remembers", "remember")]
CLAUSAL = [("thinks", "think"), ("says", "say"), ("knows", "know")]
DETERMINERS = (["the", "a", "every", "this"], ["the", "some", "many", "these", "two"])
ADJECTIVES = ["small", "old", "happy", "red", "quiet", "clever", "tired"]
PREPOSITIONS = ["near", "behind", "with", "under"]
ADVERBS = ["today", "again", "slowly", "at night", "quietly"]
CONJUNCTIONS = ["and", "but", "because"]

MAX_DEPTH = 2  # phrases nested deeper than this stop branching


class Grammar:
    def __init__(self, seed: int):
        self.rng = random.Random(seed)

    def pick(self, words: list, *, zipf: bool = True):
        """One of ``words``, the i-th with weight 1/(i+1) (Zipf) or all alike."""
        cumulative = list(itertools.accumulate(1 / (i + 1) if zipf else 1.0 for i in range(len(words))))
        return words[bisect.bisect(cumulative, self.rng.random() * cumulative[-1])]

    def chance(self, p: float) -> bool:
        return self.rng.random() < p

    def noun_phrase(self, plural: bool, depth: int) -> list[str]:
        words = [self.pick(DETERMINERS[plural])]
        if self.chance(0.3):
            words.append(self.pick(ADJECTIVES))
        words.append(self.pick(NOUNS)[plural])
        if depth < MAX_DEPTH and self.chance(0.2):
            words += [self.pick(PREPOSITIONS, zipf=False), *self.noun_phrase(self.chance(0.5), depth + 1)]
        if depth < MAX_DEPTH and self.chance(0.15):
            words += ["that", *self.verb_phrase(plural, depth + 1)]  # the relative clause agrees with its head
        return words

    def verb_phrase(self, plural: bool, depth: int) -> list[str]:
        kind = self.pick(["transitive", "intransitive", "clausal"] if depth < MAX_DEPTH else
                         ["transitive", "intransitive"])
        if kind == "intransitive":
            words = [self.pick(INTRANSITIVE)[plural]]
            return words + [self.pick(ADVERBS)] if self.chance(0.4) else words
        if kind == "transitive":
            return [self.pick(TRANSITIVE)[plural], *self.noun_phrase(self.chance(0.5), depth + 1)]
        return [self.pick(CLAUSAL)[plural], "that", *self.clause(depth + 1)]

    def clause(self, depth: int) -> list[str]:
        plural = self.chance(0.5)
        return self.noun_phrase(plural, depth) + self.verb_phrase(plural, depth)

    def sentence(self) -> str:
        words = self.clause(0)
        if self.chance(0.15):
            words += [self.pick(CONJUNCTIONS, zipf=False), *self.clause(1)]
        text = " ".join(words)
        return text[0].upper() + text[1:] + "."


def generate_text(n_chars: int, seed: int) -> str:
    """At least ``n_chars`` characters of sentences (a few to a line), the same for the same seed."""
    grammar = Grammar(seed)
    parts, length = [], 0
    while length < n_chars:
        sentence = grammar.sentence()
        separator = "\n" if grammar.chance(0.25) else " "
        parts += [sentence, separator]
        length += len(sentence) + 1
    return "".join(parts)
