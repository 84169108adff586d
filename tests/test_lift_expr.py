"""Composition expressions: parsing, acceptance truth tables, generation weights, errors."""
import itertools

import pytest
import torch

from compkern.lift import parse


def _all_signs(k: int) -> torch.Tensor:
    """(K, 2^K) lifts: every combination of +1 / -1."""
    return torch.tensor(list(itertools.product([1.0, -1.0], repeat=k))).t()


@pytest.mark.parametrize("source, truth", [
    ("A AND B", lambda a, b: a and b),
    ("A OR B", lambda a, b: a or b),
    ("A AND NOT B", lambda a, b: a and not b),
    ("NOT A OR B", lambda a, b: (not a) or b),
    ("NOT (A OR B)", lambda a, b: not (a or b)),
    ("NOT NOT A AND B", lambda a, b: a and b),
])
def test_truth_tables_two(source, truth):
    e = parse(source)
    assert e.names == ["A", "B"]
    lift = _all_signs(2)
    got = e.accept(lift).tolist()
    want = [truth(bool(a > 0), bool(b > 0)) for a, b in lift.t().tolist()]
    assert got == want


def test_truth_table_precedence_four():
    e = parse("A AND (B OR C) AND NOT D")
    assert e.names == ["A", "B", "C", "D"]
    lift = _all_signs(4)
    want = [a > 0 and (b > 0 or c > 0) and not d > 0 for a, b, c, d in lift.t().tolist()]
    assert e.accept(lift).tolist() == want
    # without parentheses AND binds tighter than OR
    e2 = parse("A AND B OR C AND NOT D")
    want2 = [(a > 0 and b > 0) or (c > 0 and not d > 0) for a, b, c, d in lift.t().tolist()]
    assert e2.accept(lift).tolist() == want2


def test_thresholds_min_max_and_zero():
    lift = torch.tensor([[0.5, 0.0, -0.1, 2.0], [0.1, 3.0, 1.0, 0.0]])
    assert parse("A AND B").accept(lift).tolist() == (lift.min(0).values > 0).tolist()
    assert parse("A OR B").accept(lift).tolist() == (lift.max(0).values > 0).tolist()
    assert parse("NOT A").accept(lift[:1]).tolist() == (lift[0] <= 0).tolist()  # NOT: <= 0


def test_weights_in_string_and_signs():
    e = parse("0.7*A AND NOT 1.5*D")
    assert e.names == ["A", "D"]
    torch.testing.assert_close(e.weights(), torch.tensor([0.7, -1.5]))
    torch.testing.assert_close(parse("A AND (B OR C) AND NOT D").weights(), torch.tensor([1.0, 0.5, 0.5, -1.0]))
    # a repeated component is one condition; quoted names hold spaces
    e = parse('"a red car" and not "a dog" and "a red car"')
    assert e.names == ["a red car", "a dog"]
    torch.testing.assert_close(e.weights(), torch.tensor([2.0, -1.0]))
    # weights never change acceptance
    lift = _all_signs(2)
    assert parse("0.1*A AND NOT 9*B").accept(lift).tolist() == parse("A AND NOT B").accept(lift).tolist()


def test_decide_three_valued():
    e = parse("A AND NOT B")
    pos = torch.tensor([[True, False, False, True], [False, False, True, False]])
    neg = torch.tensor([[False, True, False, False], [True, False, False, False]])
    known, value = e.decide(pos, neg)
    # sample 0: A surely >0, B surely <=0 -> known True; 1: A surely <=0 -> known False;
    # 2: B surely >0 -> known False; 3: B open -> unknown
    assert known.tolist() == [True, True, True, False]
    assert value[known].tolist() == [True, False, False]


@pytest.mark.parametrize("source, match", [
    ("A AND (B OR C", "unbalanced parentheses"),
    ("A AND B)", "unbalanced parentheses"),
    ("((A)", "unbalanced parentheses"),
    ("A XOR B", "unknown operator 'XOR'"),
    ("A & B", "unknown operator"),
    ("A B", "unknown operator"),
    ("", "empty expression"),
    ("   ", "empty expression"),
    ("A AND", "empty component"),
    ("A AND ()", "empty component"),
    ("0.7* AND B", "empty component"),
    ("A OR OR B", "empty component"),
    ('"" AND A', "empty component"),
])
def test_errors(source, match):
    with pytest.raises(ValueError, match=match.replace("(", r"\(").replace(")", r"\)")):
        parse(source)


def test_bad_lift_shape_and_type():
    e = parse("A AND B")
    with pytest.raises(ValueError, match=r"\(K, B\) with K = 2"):
        e.accept(torch.zeros(3, 4))
    with pytest.raises(ValueError, match="NaN"):
        e.accept(torch.tensor([[float("nan")], [1.0]]))
    with pytest.raises(TypeError):
        parse(None)


def test_required_components_are_what_every_satisfying_assignment_needs():
    """Expr.required (the joint caption's terms) against brute force over all sign patterns: exact
    on these forms, and never more than brute force (it is conservative where a requirement only
    follows from combining branches, as in the last one)."""
    import itertools

    import torch

    from compkern.lift import parse

    for src in ["A AND (B OR C) AND NOT D", "(A AND B) OR (A AND C)", "A OR B", "NOT A", "A AND B AND NOT C",
                "(A OR B) AND (A OR NOT B)"]:
        e = parse(src)
        K = e.num_components
        pats = torch.tensor(list(itertools.product([1.0, -1.0], repeat=K))).T  # (K, 2^K)
        sat = pats[:, e.accept(pats)]
        brute = [k for k in range(K) if sat.shape[1] and bool((sat[k] > 0).all())]
        assert set(e.required()) <= set(brute), src
        if src != "(A OR B) AND (A OR NOT B)":
            assert e.required() == brute, src


@pytest.mark.parametrize("source", ["A AND B", "A OR B", "A AND NOT B", "NOT (A OR B) AND C", "(A AND B) OR (C AND NOT A)"])
def test_margin_has_the_sign_of_accept_and_its_distance(source):
    """margin > 0 exactly where accept is True, on fresh random scores of every sign."""
    e = parse(source)
    scores = torch.randn(e.num_components, 500, generator=torch.Generator().manual_seed(1))
    m = e.margin(scores)
    assert m.shape == (500,)
    assert torch.equal(m > 0, e.accept(scores))
    # min / max / negation are 1-Lipschitz: moving every score by less than |margin| flips nothing
    shift = 0.99 * m.abs()[None] * torch.sign(torch.randn(scores.shape, generator=torch.Generator().manual_seed(2)))
    assert torch.equal(e.accept(scores + shift), e.accept(scores))


def test_margin_by_hand_and_bad_input():
    e = parse("A AND NOT B")
    assert e.margin(torch.tensor([[3.0, 1.0], [-2.0, 4.0]])).tolist() == [2.0, -4.0]
    with pytest.raises(ValueError, match="shape"):
        e.margin(torch.zeros(3, 1))
    with pytest.raises(ValueError, match="NaN"):
        e.margin(torch.tensor([[float("nan")], [1.0]]))
