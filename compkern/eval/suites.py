"""Evaluation suites: prompt rows generated deterministically from a list of object classes, in
GenEval's metadata format, plus compkern's NOT / OR / three-term suites; JSONL read and write;
user prompt files.

A row is a JSON object::

    {"suite": "not", "tag": "not", "index": 0,
     "prompt": "a photo of a dog",                                # the plain prompt (method "none")
     "expression": "a photo of a dog AND NOT a photo of a cat",   # what compositional methods compose
     "include": [{"class": "dog", "count": 1}],                   # GenEval: every clause must hold (AND)
     "exclude": [{"class": "cat", "count": 1}],                   # GenEval: fails if any holds (>= count found)
     "any": []}                                                   # compkern: at least one clause holds (OR)

``include`` clauses may carry ``"color"`` and ``"position": [relation, index of the include
clause it is relative to]`` exactly as GenEval's ``evaluation_metadata.jsonl``, so that file
loads as it is (``load_prompts``). The rules that score a row are ``compkern.eval.rules``.

Suites (``SUITES``): ``geneval`` (its six tasks, ``GENEVAL_TAGS``), each GenEval task by its tag,
``not`` ("A AND NOT B"), ``or`` ("A OR B") and ``three`` ("A AND B AND NOT C", "(A OR B) AND NOT C").
A ``Vocabulary`` says which words a model knows: tasks that need color, number or relation
words it lacks are left out of ``geneval`` and refused when named.
"""
from __future__ import annotations

import json
import os
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

__all__ = ["COCO_CLASSES", "GENEVAL_COLORS", "GENEVAL_TAGS", "SUITES", "Vocabulary", "dumps_jsonl", "load_prompts",
           "make_suites", "read_jsonl", "row_expression", "shapes_vocabulary", "write_jsonl"]

# GenEval's object_names.txt (the 80 COCO classes) and its colors, numbers and relations
COCO_CLASSES: tuple[str, ...] = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow", "elephant",
    "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard",
    "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange", "broccoli",
    "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant", "bed", "dining table", "toilet",
    "tv", "laptop", "computer mouse", "tv remote", "computer keyboard", "cell phone", "microwave", "oven", "toaster",
    "sink", "refrigerator", "book", "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush")
GENEVAL_COLORS: tuple[str, ...] = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")
NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
RELATIONS = ("left of", "right of", "above", "below")
GENEVAL_TAGS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
SUITES: dict[str, tuple[str, ...]] = {"geneval": GENEVAL_TAGS, **{t: (t,) for t in GENEVAL_TAGS},
                                      "not": ("not",), "or": ("or",), "three": ("and_not", "or_not")}
_NEEDS = {"counting": "numbers", "colors": "colors", "color_attr": "colors", "position": "relations"}


@dataclass(frozen=True)
class Vocabulary:
    """The words a model's prompts may use.

    classes: object class names (the detector's labels); colors: color words a class can take
    (() when a class name already fixes its color, as in the shapes world); numbers / relations:
    whether counting ("two dogs") and position ("a dog left of a cat") prompts can be written;
    template: wraps every phrase ("a photo of {}"); negatives: the class a NOT suite excludes for
    a class (a known co-occurring partner, e.g. the shapes world's uncaptioned companion; classes
    not in it get a random other class); pairs: the allowed (A, B) of two-class prompts (None: any
    two distinct classes)."""

    classes: tuple[str, ...]
    colors: tuple[str, ...] = GENEVAL_COLORS
    numbers: bool = True
    relations: bool = True
    template: str = "a photo of {}"
    negatives: dict[str, str] = field(default_factory=dict)
    pairs: tuple[tuple[str, str], ...] | None = None

    def __post_init__(self):
        classes = tuple(self.classes)
        if len(classes) < 3 or any(not isinstance(c, str) or not c.strip() for c in classes):
            raise ValueError(f"classes must be at least 3 non-empty names, got {list(classes)[:5]}")
        if len(set(classes)) != len(classes):
            raise ValueError("classes must be distinct")
        if "{}" not in self.template:
            raise ValueError(f"template must contain '{{}}', got {self.template!r}")
        object.__setattr__(self, "classes", classes)

    def supports(self, tag: str) -> bool:
        need = _NEEDS.get(tag)
        return need is None or bool(getattr(self, need))

    def phrase(self, cls: str, color: str | None = None) -> str:
        """'a photo of a red car' (the template around the class with its article and color)."""
        return self.template.format(_article(f"{color} {cls}" if color else cls))


def _article(name: str) -> str:
    return f"an {name}" if name[0] in "aeiou" else f"a {name}"


def _plural(name: str) -> str:
    return f"{name}es" if name.endswith("s") else f"{name}s"


def shapes_vocabulary() -> Vocabulary:
    """The shapes world trained with ``--naming nouns``: the nine one-word objects ('red_square'),
    captions without a template ('a red_square and a blue_ring'), no color / number / relation
    words; NOT excludes each object's uncaptioned companion; pairs differ in color and shape."""
    from compkern.data import shapes

    names = shapes.NOUNS
    return Vocabulary(names, colors=(), numbers=False, relations=False, template="{}",
                      negatives={names[o]: names[shapes.companion(o)] for o in range(len(names))},
                      pairs=tuple((names[a], names[b]) for a, b in shapes.distinct_pairs()))


def _pair(rng: random.Random, vocab: Vocabulary, avoid: Sequence[str] = ()) -> tuple[str, str]:
    if vocab.pairs is not None:
        ok = [p for p in vocab.pairs if not set(p) & set(avoid)] or list(vocab.pairs)
        a, b = rng.choice(ok)
        return (a, b) if rng.random() < 0.5 else (b, a)
    a, b = rng.sample([c for c in vocab.classes if c not in avoid], 2)
    return a, b


def _negative(rng: random.Random, vocab: Vocabulary, keep: Sequence[str]) -> str:
    neg = vocab.negatives.get(keep[0])
    if neg is not None and neg not in keep:
        return neg
    return rng.choice([c for c in vocab.classes if c not in keep])


def _one(cls: str, **kw) -> dict:
    return {"class": cls, "count": 1, **kw}


def _tag_row(tag: str, rng: random.Random, vocab: Vocabulary, single: str) -> dict:
    """One row of ``tag`` drawn from ``rng`` (the tag's own stream); ``single``: the class of a
    single_object or NOT row (GenEval sweeps every class once: the caller deals them out)."""
    P, T = vocab.phrase, vocab.template.format
    if tag == "single_object":
        return {"prompt": P(single), "expression": P(single), "include": [_one(single)]}
    if tag == "two_object":
        a, b = _pair(rng, vocab)
        return {"prompt": T(f"{_article(a)} and {_article(b)}"), "expression": f"{P(a)} AND {P(b)}",
                "include": [_one(a), _one(b)]}
    if tag == "counting":
        a, num = rng.choice(vocab.classes), rng.randint(2, 4)
        text = T(f"{NUMBERS[num]} {_plural(a)}")
        return {"prompt": text, "expression": text, "include": [{"class": a, "count": num}],
                "exclude": [{"class": a, "count": num + 1}]}
    if tag == "colors":
        a, c = rng.choice(vocab.classes), rng.choice(vocab.colors)
        return {"prompt": P(a, c), "expression": P(a, c), "include": [_one(a, color=c)]}
    if tag == "position":
        a, b = _pair(rng, vocab)
        rel = rng.choice(RELATIONS)
        text = T(f"{_article(a)} {rel} {_article(b)}")
        return {"prompt": text, "expression": text, "include": [_one(b), _one(a, position=[rel, 0])]}
    if tag == "color_attr":
        a, b = _pair(rng, vocab)
        ca, cb = rng.sample(list(vocab.colors), 2) if len(vocab.colors) > 1 else (vocab.colors[0],) * 2
        return {"prompt": T(f"{_article(f'{ca} {a}')} and {_article(f'{cb} {b}')}"),
                "expression": f"{P(a, ca)} AND {P(b, cb)}", "include": [_one(a, color=ca), _one(b, color=cb)]}
    if tag == "not":
        a = single
        b = _negative(rng, vocab, [a])
        return {"prompt": P(a), "expression": f"{P(a)} AND NOT {P(b)}", "include": [_one(a)], "exclude": [_one(b)]}
    if tag == "or":
        a, b = _pair(rng, vocab)
        return {"prompt": P(a), "expression": f"{P(a)} OR {P(b)}", "any": [_one(a), _one(b)]}
    if tag == "and_not":
        a, b = _pair(rng, vocab)
        c = _negative(rng, vocab, [a, b])
        return {"prompt": T(f"{_article(a)} and {_article(b)}"), "expression": f"{P(a)} AND {P(b)} AND NOT {P(c)}",
                "include": [_one(a), _one(b)], "exclude": [_one(c)]}
    if tag == "or_not":
        a, b = _pair(rng, vocab)
        c = _negative(rng, vocab, [a, b])
        return {"prompt": P(a), "expression": f"({P(a)} OR {P(b)}) AND NOT {P(c)}", "any": [_one(a), _one(b)],
                "exclude": [_one(c)]}
    raise ValueError(f"unknown tag {tag!r}")


def make_suites(suites: Sequence[str] | str, vocab: Vocabulary, n: int, seed: int = 0) -> list[dict]:
    """Rows of ``suites`` (names of ``SUITES``, or one comma-separated string): ``n`` prompts per
    task (tag), drawn from a stream seeded by (seed, tag) alone, so a suite's rows do not depend on
    which other suites are asked for. ``geneval`` expands to the tasks ``vocab`` supports; a task
    named on its own that the vocabulary cannot write raises ValueError."""
    names = [s.strip() for s in suites.split(",")] if isinstance(suites, str) else list(suites)
    if not names or any(not s for s in names):
        raise ValueError(f"suites must name at least one of {sorted(SUITES)}, got {suites!r}")
    bad = [s for s in names if s not in SUITES]
    if bad:
        raise ValueError(f"suites: unknown {bad}; choose from {sorted(SUITES)}")
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"n (prompts per task) must be an int >= 1, got {n!r}")
    rows: list[dict] = []
    for suite in dict.fromkeys(names):
        tags = SUITES[suite]
        for tag in tags:
            if not vocab.supports(tag):
                if len(tags) == 1:
                    raise ValueError(f"suite {suite!r} needs {_NEEDS[tag]} words, which this vocabulary has none of "
                                     "(e.g. the shapes world's captions); drop it or use a vocabulary that has them")
                continue
            rng = random.Random(f"{seed}/{tag}")
            deck = rng.sample(vocab.classes, len(vocab.classes))
            seen: set[str] = set()
            for i in range(n):
                for _ in range(100):  # draw again on a repeat (while fresh prompts remain)
                    row = _tag_row(tag, rng, vocab, deck[i % len(deck)])
                    if row["expression"] not in seen:
                        break
                seen.add(row["expression"])
                rows.append({"suite": suite, "tag": tag, "index": i, "prompt": row["prompt"],
                             "expression": row["expression"], "include": row.get("include", []),
                             "exclude": row.get("exclude", []), "any": row.get("any", [])})
    return rows


# -- files ------------------------------------------------------------------------------------------
def dumps_jsonl(rows: Sequence[dict]) -> str:
    """One JSON object a line, keys sorted: the same rows give the same bytes."""
    return "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows)


def write_jsonl(rows: Sequence[dict], path: str | os.PathLike) -> Path:
    """Write ``rows`` atomically as JSONL (``dumps_jsonl``); returns the path."""
    from compkern.utils.checkpoint import _atomic_write

    path = Path(path)
    text = dumps_jsonl(rows)
    _atomic_write(path, lambda f: f.write(text.encode()))
    return path


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """The JSON objects of a JSONL file (blank lines skipped); ValueError naming a bad line."""
    rows = []
    for k, line in enumerate(Path(path).read_text().splitlines(), 1):
        if line.strip():
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{k}: not JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{k}: expected a JSON object, got {type(row).__name__}")
            rows.append(row)
    return rows


def row_expression(row: dict, vocab: Vocabulary) -> str:
    """A row's compositional expression: its own ``expression``, else one term per include
    clause (AND), exclude clause (AND NOT) and an OR group of its ``any`` clauses; a row with a
    count above one or a position (GenEval's counting / position) is one term, its prompt."""
    if row.get("expression"):
        return row["expression"]
    inc, exc, any_ = row.get("include", []), row.get("exclude", []), row.get("any", [])
    if any(c.get("count", 1) != 1 or "position" in c for c in inc) or (row.get("tag") == "counting"):
        return row["prompt"]
    terms = [vocab.phrase(c["class"], c.get("color")) for c in inc]
    if any_:
        alts = " OR ".join(vocab.phrase(c["class"], c.get("color")) for c in any_)
        terms.append(f"({alts})" if terms or exc else alts)
    terms += [f"NOT {vocab.phrase(c['class'], c.get('color'))}" for c in exc]
    return " AND ".join(terms) if terms else row["prompt"]


_CLAUSE_KEYS = {"class", "count", "color", "position"}


def _check_row(row: dict, where: str, vocab: Vocabulary | None) -> None:
    if not isinstance(row.get("prompt"), str) or not row["prompt"].strip():
        raise ValueError(f"{where}: a row needs a non-empty 'prompt'")
    clauses = [c for k in ("include", "exclude", "any") for c in row.get(k, [])]
    if not clauses:
        raise ValueError(f"{where}: a row needs at least one 'include', 'exclude' or 'any' clause to be scored")
    for c in clauses:
        if not isinstance(c, dict) or not isinstance(c.get("class"), str) or set(c) - _CLAUSE_KEYS:
            raise ValueError(f"{where}: a clause must be {{'class': name, 'count': n, ['color'], ['position']}}, got {c!r}")
        if vocab is not None and c["class"] not in vocab.classes:
            raise ValueError(f"{where}: class {c['class']!r} is not a class of the scorer's vocabulary "
                             f"({list(vocab.classes)[:6]}...)")
        if not isinstance(c.get("count", 1), int) or c.get("count", 1) < 1:
            raise ValueError(f"{where}: a clause's count must be an int >= 1, got {c.get('count')!r}")


_SPLIT_AND = re.compile(r"\s+AND\s+")


def _text_row(line: str, where: str, vocab: Vocabulary) -> dict:
    """A plain-text prompt line: an expression over the vocabulary's phrases ("a photo of a dog
    AND NOT a photo of a cat", "(A OR B) AND NOT C")."""
    names = {vocab.phrase(c): c for c in vocab.classes}
    names.update({vocab.phrase(c, col): (c, col) for c in vocab.classes for col in vocab.colors})

    def clause(term: str) -> dict:
        term = term.strip()
        if term not in names:
            raise ValueError(f"{where}: {term!r} is not a phrase of the vocabulary (form: {vocab.phrase(vocab.classes[0])!r})")
        v = names[term]
        return _one(v) if isinstance(v, str) else _one(v[0], color=v[1])

    row: dict = {"include": [], "exclude": [], "any": []}
    for part in _SPLIT_AND.split(line.strip()):
        part = part.strip()
        if part.startswith("NOT "):
            row["exclude"].append(clause(part[4:]))
        elif " OR " in part:
            if row["any"]:
                raise ValueError(f"{where}: one OR group per prompt line")
            row["any"] = [clause(t) for t in part.strip("()").split(" OR ")]
        else:
            row["include"].append(clause(part.strip("()")))
    first = (row["include"] or row["any"] or [None])[0]
    if first is None:
        raise ValueError(f"{where}: a prompt needs a term that is not negated")
    plain = " and ".join(vocab.phrase(c["class"], c.get("color")) for c in row["include"]) or \
        vocab.phrase(first["class"], first.get("color"))
    return {"prompt": plain, "expression": line.strip(), **row}


def load_prompts(path: str | os.PathLike, vocab: Vocabulary | None = None) -> list[dict]:
    """Rows of a user prompt file: JSONL rows (this module's format or GenEval's
    ``evaluation_metadata.jsonl``: tag, include, exclude, prompt) or, in any other file, one
    expression a line over ``vocab``'s phrases. Rows get suite "file" (unless they have one),
    their tag (default "prompt"), their line index, and an ``expression`` (``row_expression``).
    A missing or empty file, a bad line or a class outside ``vocab`` raises ValueError."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"prompt file {str(p)!r} does not exist")
    text = p.read_text()
    lines = [ln for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    if not lines:
        raise ValueError(f"prompt file {str(p)!r} is empty: expected JSONL rows or one prompt expression a line")
    jsonl = lines[0].lstrip().startswith("{")
    if not jsonl and vocab is None:
        raise ValueError(f"prompt file {str(p)!r} holds plain-text prompts: a vocabulary is needed to read their classes")
    raw = read_jsonl(p) if jsonl else [_text_row(ln, f"{p}:{k + 1}", vocab) for k, ln in enumerate(lines)]
    rows = []
    for i, row in enumerate(raw):
        where = f"{p}: row {i + 1}"
        _check_row(row, where, vocab)
        out = {"suite": row.get("suite", "file"), "tag": row.get("tag", "prompt"), "index": i, "prompt": row["prompt"],
               "include": row.get("include", []), "exclude": row.get("exclude", []), "any": row.get("any", [])}
        out["expression"] = row.get("expression") or (row_expression(row, vocab) if vocab else row["prompt"])
        rows.append(out)
    return rows
