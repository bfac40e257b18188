"""The demo world's knowledge: what each shape-and-colour *means*, the rules, and the questions.

The pixels say "red triangle"; only the knowledge base says that a red triangle marks a hazard.
The mapping below is fixed (not seeded) so that the shipped teachers stay valid for every seed:
the seed draws scenes and questions, never meanings.

A question needs three things to be answered: the detector's counts per class, the documents that
say which classes carry the meanings it names, and a few steps of arithmetic or comparison. The
``large`` questions also need the segmenter: an object is large when its visible *mask* covers at
least ``LARGE_AREA`` of the image, which its box does not tell (a triangle fills about half of its
box, a circle three quarters), so the detector's summary carries the large counts the masks give.
``render_trace`` writes those steps out as ``<think> step ; step ... </think> answer``.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from distillery.teachers.nodes.yolo import describe_detections  # noqa: F401  (the detector node's `summary`)

COLOURS = ("red", "green", "blue", "yellow")
SHAPES = ("circle", "square", "triangle")
CLASSES = tuple(f"{c} {s}" for c in COLOURS for s in SHAPES)  # 12 labels, id = index

# meaning -> the classes that carry it (two classes mean nothing at all)
MEANINGS: dict[str, tuple[str, ...]] = {
    "hazard": ("red triangle", "yellow triangle"),
    "exit": ("green square", "green circle"),
    "valve": ("blue circle", "red circle"),
    "sensor": ("blue square",),
    "beacon": ("yellow circle",),
    "pump": ("red square", "blue triangle"),
}
PLURAL = {m: m + "s" for m in MEANINGS}
DECORATION = ("yellow square", "green triangle")

LARGE_AREA = 0.03
"""An object is large when its visible mask covers at least this fraction of the image (the yolo
node's ``large_area``)."""

PROMPT_TEMPLATE = "objects: {detector.summary}\nfacts: {retriever.context}\nquestion: {request.question}\nanswer:"
"""The reasoner's prompt, exactly as the demo spec writes it (the lead's spec uses this string)."""


def build_prompt(summary: str, context: str, question: str) -> str:
    """Render ``PROMPT_TEMPLATE`` the way the teacher graph does."""
    return (PROMPT_TEMPLATE.replace("{detector.summary}", summary)
            .replace("{retriever.context}", context).replace("{request.question}", question))


# ---------------------------------------------------------------------------------------------
# Knowledge base
# ---------------------------------------------------------------------------------------------

def _join(classes: tuple[str, ...]) -> str:
    return " or a ".join(classes)


MEANING_DOCS = {
    "hazard": "Hazards make an area unsafe. A hazard is marked by a {}.",
    "exit": "Exits make an area safe. An exit is marked by a {}.",
    "valve": "Valves control the flow of water. A valve is marked by a {}.",
    "sensor": "Sensors watch and monitor the site. A sensor is marked by a {}.",
    "beacon": "Beacons light up and monitor the site. A beacon is marked by a {}.",
    "pump": "Pumps push water through the pipes. A pump is marked by a {}.",
}

RULES = {
    "safe": ("The area is safe when there are at least as many exits as hazards; "
             "when hazards outnumber exits the area is unsafe.", ("hazard", "exit")),
    "alarm": ("The hazard alarm sounds when there are two or more hazards in the area.", ("hazard",)),
    "monitored": ("The site is monitored when sensors and beacons together number at least two.",
                  ("sensor", "beacon")),
    "balanced": ("The water system is balanced when the number of valves equals the number of pumps.",
                 ("valve", "pump")),
}
RULE_QUESTIONS = {
    "safe": "Is the area safe?",
    "alarm": "Does the hazard alarm sound?",
    "monitored": "Is the site monitored?",
    "balanced": "Is the water system balanced?",
}

DISTRACTORS = (
    "A purple hexagon marks a storage room.",
    "An orange star marks a meeting point.",
    "A white diamond marks a first aid kit.",
    "A black pentagon marks a locked door.",
    "Pink ovals mark the visitor parking.",
    "A brown cross marks a tool shed.",
    "Grey arrows point towards the loading dock.",
    "The plant opened in 1998 and was rebuilt in 2011.",
    "Visitors must sign in at the front desk.",
    "Safety training takes place every spring.",
    "The night shift starts at ten in the evening.",
    "Maps of the site are printed on blue paper.",
    "Circles, squares and triangles are the three basic shapes.",
    "A triangle has three corners and a square has four.",
    "Red, green, blue and yellow paint is bought in bulk.",
    "The canteen serves lunch from noon to two.",
    "Old pumps are recycled by an outside company.",
    "Valve maintenance is logged in the green book.",
    "Fire drills are announced one week ahead.",
    "Sensor batteries are replaced every six months.",
    "The exit signs were repainted last year.",
    "Beacons were first installed in the north wing.",
    "Hazard reports go to the site manager.",
    "The water tank holds ten thousand litres.",
    "Helmets are required in the workshop.",
    "The alarm is tested on the first monday of each month.",
    "Parking is free for employees.",
    "The site has its own weather station.",
    "Forklifts must keep to the marked lanes.",
    "Deliveries arrive between six and eight in the morning.",
)


@dataclass(frozen=True)
class Doc:
    id: str
    text: str


def knowledge_base() -> list[Doc]:
    """All documents: meaning docs, decoration doc, rule docs, then distractors (fixed order)."""
    docs = [Doc(f"meaning-{m}", MEANING_DOCS[m].format(_join(MEANINGS[m]))) for m in MEANINGS]
    docs.append(Doc("decoration", f"A {DECORATION[0]} or a {DECORATION[1]} is decoration and marks nothing."))
    docs += [Doc(f"rule-{name}", text) for name, (text, _) in RULES.items()]
    docs += [Doc(f"note-{i:02d}", text) for i, text in enumerate(DISTRACTORS)]
    return docs


def write_kb(path: Path) -> None:
    """Write the knowledge base as JSONL ``{"id", "text"}`` (the rag node's documents format)."""
    path.write_text("".join(json.dumps({"id": d.id, "text": d.text}) + "\n" for d in knowledge_base()))


# ---------------------------------------------------------------------------------------------
# Questions and their ground truth
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Question:
    text: str
    type: str  # count | large | compare | which | sum | rule
    meanings: tuple[str, ...]  # the meanings it counts, in the order the question names them
    rule: str | None = None

    @property
    def needed_docs(self) -> list[str]:
        """Documents the question cannot be answered without."""
        docs = [f"rule-{self.rule}"] if self.rule else []
        return docs + [f"meaning-{m}" for m in self.meanings]


def question_bank() -> list[Question]:
    """Every question the templates can produce (fixed order; about 70)."""
    names = list(MEANINGS)
    pairs = [(a, b) for a in names for b in names if a != b]
    qs = [Question(f"How many {PLURAL[m]} are there?", "count", (m,)) for m in names]
    qs += [Question(f"How many large {PLURAL[m]} are there?", "large", (m,)) for m in names]
    qs += [Question(f"Are there more {PLURAL[a]} than {PLURAL[b]}?", "compare", (a, b)) for a, b in pairs]
    qs += [Question(f"Which are there more of, {PLURAL[a]} or {PLURAL[b]}?", "which", (a, b))
           for a, b in pairs if a < b]
    qs += [Question(f"How many {PLURAL[a]} and {PLURAL[b]} are there in total?", "sum", (a, b))
           for a, b in pairs if a < b]
    qs += [Question(RULE_QUESTIONS[r], "rule", RULES[r][1], r) for r in RULES]
    return qs


QUESTION_TYPES = ("count", "large", "compare", "which", "sum", "rule")


def sample_questions(rng: np.random.Generator, n: int) -> list[Question]:
    """``n`` distinct questions, question type drawn uniformly first, then a question of that type."""
    bank = question_bank()
    by_type = {t: [q for q in bank if q.type == t] for t in QUESTION_TYPES}
    out: list[Question] = []
    while len(out) < n:
        pool = by_type[QUESTION_TYPES[rng.integers(len(QUESTION_TYPES))]]
        q = pool[rng.integers(len(pool))]
        if q not in out:
            out.append(q)
    return out


def meaning_counts(labels: list[str]) -> dict[str, int]:
    counts = Counter(labels)
    return {m: sum(counts[c] for c in classes) for m, classes in MEANINGS.items()}


def _rule_holds(rule: str, n: dict[str, int]) -> bool:
    if rule == "safe":
        return n["exit"] >= n["hazard"]
    if rule == "alarm":
        return n["hazard"] >= 2
    if rule == "monitored":
        return n["sensor"] + n["beacon"] >= 2
    if rule == "balanced":
        return n["valve"] == n["pump"]
    raise KeyError(f"unknown rule {rule!r}")


def answer(question: Question, labels: list[str], large: list[str] = ()) -> str:
    """The ground-truth answer (a number, yes/no, or a word) for a scene's object labels and the
    labels of its large objects."""
    n = meaning_counts(labels)
    m = question.meanings
    if question.type == "count":
        return str(n[m[0]])
    if question.type == "large":
        return str(meaning_counts(list(large))[m[0]])
    if question.type == "sum":
        return str(n[m[0]] + n[m[1]])
    if question.type == "compare":
        return "yes" if n[m[0]] > n[m[1]] else "no"
    if question.type == "which":
        if n[m[0]] == n[m[1]]:
            return "neither"
        return PLURAL[m[0]] if n[m[0]] > n[m[1]] else PLURAL[m[1]]
    return "yes" if _rule_holds(question.rule, n) else "no"


def find_question(text: str) -> Question:
    """The bank's question with this text (clear error for a question the world cannot ask)."""
    for q in question_bank():
        if q.text == text:
            return q
    raise KeyError(f"question {text!r} is not one of the demo world's templates")


# ---------------------------------------------------------------------------------------------
# Reasoning traces
# ---------------------------------------------------------------------------------------------

def _count_steps(meaning: str, labels: list[str], prefix: str = "") -> tuple[list[str], int]:
    """'hazard is red triangle , yellow triangle' ; 'hazards = red triangle 2 + yellow triangle 0 = 2'
    (``prefix`` 'large ': 'large hazards = ...', counting the large objects' labels)."""
    counts = Counter(labels)
    classes = MEANINGS[meaning]
    total = sum(counts[c] for c in classes)
    terms = " + ".join(f"{c} {counts[c]}" for c in classes)
    return [f"{meaning} is {' , '.join(classes)}", f"{prefix}{PLURAL[meaning]} = {terms} = {total}"], total


def _rule_steps(rule: str, n: dict[str, int]) -> list[str]:
    if rule == "safe":
        return ["safe when exits >= hazards", f"{n['exit']} >= {n['hazard']}"]
    if rule == "alarm":
        return ["alarm when hazards >= 2", f"{n['hazard']} >= 2"]
    if rule == "monitored":
        s = n["sensor"] + n["beacon"]
        return ["monitored when sensors + beacons >= 2", f"{n['sensor']} + {n['beacon']} = {s}", f"{s} >= 2"]
    return ["balanced when valves = pumps", f"{n['valve']} = {n['pump']}"]


def render_trace(labels: list[str], question: Question | str, large: list[str] = ()) -> str:
    """``<think> step ; step ... </think> answer`` for a scene's labels (and its large objects'
    labels) and a question.

    The steps look up which classes carry each meaning the question names (the facts), count them
    in the scene (the detections, or the large ones), then add, compare or apply the rule.
    Lowercase, words and symbols separated by spaces so a word-level tokenizer sees one token per
    word or number."""
    q = find_question(question) if isinstance(question, str) else question
    if q.type == "large":
        steps = _count_steps(q.meanings[0], list(large), "large ")[0]
        return f"<think> {' ; '.join(steps)} </think> {answer(q, labels, large)}"
    steps: list[str] = []
    for m in q.meanings:
        steps += _count_steps(m, labels)[0]
    n = meaning_counts(labels)
    a, b = (q.meanings + (None,))[:2]
    if q.type == "sum":
        steps.append(f"{n[a]} + {n[b]} = {n[a] + n[b]}")
    elif q.type in ("compare", "which"):
        steps.append(f"{n[a]} > {n[b]}" if n[a] > n[b] else f"{n[a]} < {n[b]}" if n[a] < n[b] else f"{n[a]} = {n[b]}")
    elif q.type == "rule":
        steps += _rule_steps(q.rule, n)
    return f"<think> {' ; '.join(steps)} </think> {answer(q, labels)}"


def parse_answer(text: str) -> str:
    """The answer after ``</think>`` (or the whole text when there is none), stripped."""
    return text.split("</think>")[-1].strip()
