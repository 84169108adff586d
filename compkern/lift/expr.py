"""Composition expressions: ``parse("A AND (B OR C) AND NOT D")``.

Grammar (operators case-insensitive, NOT binds tightest, then AND, then OR):

    expr   := and ("OR" and)*
    and    := unary ("AND" unary)*
    unary  := "NOT" unary | "(" expr ")" | [number "*"] name
    name   := identifier | "quoted text"

Components are numbered by first appearance; that is the order of the K conditions given to
``estimate_lift`` and of ``.weights()``. Acceptance follows CompLift: a component holds when its
lift is > 0; AND = all hold (min > 0), OR = any holds (max > 0), NOT = does not hold (<= 0).
Weights ("0.7*A AND NOT 1.5*D") only shape generation: ``.weights()`` gives the composed-eps
weights, negative under an odd number of NOTs, divided by m inside an OR of m terms (Composable
Diffusion has no mixture; the OR itself is enforced by the rejection step).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch

_TOKEN = re.compile(r"""\s*(?:(?P<num>\d+(?:\.\d*)?|\.\d+)\s*\*|(?P<lp>\()|(?P<rp>\))|"(?P<q>[^"]*)"|(?P<word>[A-Za-z_][A-Za-z0-9_.\-]*)|(?P<bad>\S))""")
_OPS = {"AND", "OR", "NOT"}


@dataclass(frozen=True)
class _Tok:
    kind: str  # num, lp, rp, name, op, bad
    text: str
    pos: int


def _tokenize(s: str) -> list[_Tok]:
    toks, i = [], 0
    s = s.rstrip()
    while i < len(s):
        m = _TOKEN.match(s, i)
        if m is None or m.end() == i:
            break
        pos = m.start() + (len(m.group(0)) - len(m.group(0).lstrip()))
        kind = m.lastgroup
        text = m.group(kind)
        if kind == "q":
            if not text.strip():
                raise ValueError(f"empty component \"\" at position {pos} in {s!r}")
            kind = "name"
        elif kind == "word":
            kind = "op" if text.upper() in _OPS else "name"
            text = text.upper() if kind == "op" else text
        elif kind == "bad":
            raise ValueError(f"unknown operator or character {text!r} at position {pos} in {s!r} "
                             "(use AND, OR, NOT, parentheses and weights like 0.5*A)")
        toks.append(_Tok(kind, text, pos))
        i = m.end()
    return toks


class Expr:
    """A parsed composition. ``accept(lift (K, B)) -> (B,) bool``; ``weights() -> (K,)``."""

    def __init__(self, node, names: list[str], source: str):
        self._node, self.names, self.source = node, names, source

    @property
    def num_components(self) -> int:
        return len(self.names)

    def __repr__(self) -> str:
        return f"Expr({self.source!r}, components={self.names})"

    def weights(self) -> torch.Tensor:
        """(K,) composed-eps weights for generation (see the module docstring)."""
        w = torch.zeros(len(self.names))
        _weights(self._node, 1.0, w)
        return w

    def required(self) -> list[int]:
        """Components every satisfying assignment needs to hold (in order): the positive atoms of
        the top-level AND; under an OR only those all of its branches require; none under a NOT.
        ``"A AND (B OR C) AND NOT D"`` -> [A]; ``"(A AND B) OR (A AND C)"`` -> [A]."""
        return sorted(_required(self._node))

    def sample_weights(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """(n, K) per-sample weights: like ``weights()``, except that every OR picks one operand
        per sample at random (ancestral sampling of a mixture, which weights alone cannot express)."""
        out = torch.zeros(n, len(self.names))
        _sample_weights(self._node, 1.0, out, torch.arange(n), generator)
        return out

    def decide(self, pos: torch.Tensor, neg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Three-valued evaluation. pos, neg (K, B) bool: lift surely > 0 / surely <= 0.
        Returns (known (B,), value (B,)): whether the expression's value is already certain."""
        self._check(pos, "pos")
        self._check(neg, "neg")
        t, f = _eval3(self._node, pos.bool(), neg.bool())
        return t | f, t

    def accept(self, lift: torch.Tensor) -> torch.Tensor:
        """lift (K, B) -> (B,) bool: the expression evaluated on the signs of the lifts."""
        self._check(lift, "lift")
        if not torch.isfinite(lift).all():
            raise ValueError("lift holds NaN or inf")
        pos = lift > 0
        return _eval3(self._node, pos, ~pos)[0]

    def margin(self, scores: torch.Tensor) -> torch.Tensor:
        """scores (K, B), positive where component k holds -> (B,) fp32: the expression's value as
        a number, positive exactly where ``accept(scores)`` is True (for scores that are never 0):
        a component's score, its negation under NOT, the minimum over an AND, the maximum over an OR.
        How far a candidate is from flipping its decision, in the scores' units."""
        self._check(scores, "scores")
        if not torch.isfinite(scores).all():
            raise ValueError("scores hold NaN or inf")
        return _margin(self._node, scores.float())

    def _check(self, x: torch.Tensor, name: str) -> None:
        if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.shape[0] != len(self.names):
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"{name} must have shape (K, B) with K = {len(self.names)} components {self.names}, got {shape}")


def _eval3(node, pos, neg):
    """(surely true (B,), surely false (B,))."""
    op = node[0]
    if op == "atom":
        return pos[node[1]], neg[node[1]]
    if op == "not":
        t, f = _eval3(node[1], pos, neg)
        return f, t
    parts = [_eval3(c, pos, neg) for c in node[1]]
    ts = torch.stack([p[0] for p in parts])
    fs = torch.stack([p[1] for p in parts])
    if op == "and":
        return ts.all(0), fs.any(0)
    return ts.any(0), fs.all(0)  # or


def _margin(node, scores):
    op = node[0]
    if op == "atom":
        return scores[node[1]]
    if op == "not":
        return -_margin(node[1], scores)
    parts = torch.stack([_margin(c, scores) for c in node[1]])
    return parts.amin(0) if op == "and" else parts.amax(0)


def _required(node) -> set[int]:
    op = node[0]
    if op == "atom":
        return {node[1]}
    if op == "not":
        return set()
    sets = [_required(c) for c in node[1]]
    return set().union(*sets) if op == "and" else set.intersection(*sets)


def _weights(node, scale: float, w: torch.Tensor) -> None:
    op = node[0]
    if op == "atom":
        w[node[1]] += scale * node[2]
    elif op == "not":
        _weights(node[1], -scale, w)
    elif op == "and":
        for c in node[1]:
            _weights(c, scale, w)
    else:
        for c in node[1]:
            _weights(c, scale / len(node[1]), w)


def _sample_weights(node, scale: float, out: torch.Tensor, rows: torch.Tensor, g) -> None:
    op = node[0]
    if len(rows) == 0:
        return
    if op == "atom":
        out[rows, node[1]] += scale * node[2]
    elif op == "not":
        _sample_weights(node[1], -scale, out, rows, g)
    elif op == "and":
        for c in node[1]:
            _sample_weights(c, scale, out, rows, g)
    else:
        pick = torch.randint(0, len(node[1]), (len(rows),), generator=g)
        for i, c in enumerate(node[1]):
            _sample_weights(c, scale, out, rows[pick == i], g)


class _Parser:
    def __init__(self, source: str):
        self.source = source
        self.toks = _tokenize(source)
        self.i = 0
        self.names: list[str] = []

    def peek(self):
        return self.toks[self.i] if self.i < len(self.toks) else None

    def where(self) -> str:
        t = self.peek()
        return f"at position {t.pos}" if t else "at the end"

    def parse(self):
        if not self.toks:
            raise ValueError("empty expression: give at least one component, e.g. 'A AND NOT B'")
        node = self.expr()
        t = self.peek()
        if t is not None:
            if t.kind == "rp":
                raise ValueError(f"unbalanced parentheses: ')' at position {t.pos} has no matching '(' in {self.source!r}")
            if t.kind == "name":
                raise ValueError(f"unknown operator {t.text!r} at position {t.pos} in {self.source!r} "
                                 "(components must be joined by AND / OR)")
            raise ValueError(f"unexpected {t.text!r} at position {t.pos} in {self.source!r}")
        return node

    def expr(self):
        kids = [self.and_()]
        while (t := self.peek()) is not None and t.kind == "op" and t.text == "OR":
            self.i += 1
            kids.append(self.and_())
        return kids[0] if len(kids) == 1 else ("or", kids)

    def and_(self):
        kids = [self.unary()]
        while (t := self.peek()) is not None and t.kind == "op" and t.text == "AND":
            self.i += 1
            kids.append(self.unary())
        return kids[0] if len(kids) == 1 else ("and", kids)

    def unary(self):
        t = self.peek()
        if t is None:
            raise ValueError(f"empty component at the end of {self.source!r}: an operator needs an operand")
        if t.kind == "op" and t.text == "NOT":
            self.i += 1
            return ("not", self.unary())
        if t.kind == "lp":
            self.i += 1
            if (u := self.peek()) is not None and u.kind == "rp":
                raise ValueError(f"empty component '()' at position {t.pos} in {self.source!r}")
            node = self.expr()
            u = self.peek()
            if u is None or u.kind != "rp":
                raise ValueError(f"unbalanced parentheses: '(' at position {t.pos} is never closed in {self.source!r}")
            self.i += 1
            return node
        weight = 1.0
        if t.kind == "num":
            weight = float(t.text)
            self.i += 1
            t = self.peek()
            if t is None or t.kind != "name":
                raise ValueError(f"empty component: weight {weight:g}* {self.where()} must be followed by a component name "
                                 f"in {self.source!r}")
        if t.kind == "name":
            self.i += 1
            if t.text not in self.names:
                self.names.append(t.text)
            return ("atom", self.names.index(t.text), weight)
        if t.kind == "rp":
            raise ValueError(f"empty component before ')' at position {t.pos} in {self.source!r}")
        raise ValueError(f"empty component: operator {t.text!r} at position {t.pos} needs an operand before it "
                         f"in {self.source!r}")


def parse(source: str) -> Expr:
    """Parse a composition such as ``"A AND (B OR C) AND NOT D"`` or ``"0.7*A AND NOT 1.5*D"``.

    Raises ValueError for unbalanced parentheses, unknown operators and empty components."""
    if not isinstance(source, str):
        raise TypeError(f"source must be a str, got {type(source).__name__}")
    p = _Parser(source)
    node = p.parse()
    return Expr(node, p.names, source)
