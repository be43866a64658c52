"""The built-in LEGO / addition / math generators produce correct answers.

Each record is checked by a solver written here from the task definitions (Skill-It §4; LEGO of
Zhang et al. 2022), independent of the generator's own bookkeeping: LEGO by resolving the
shuffled assignment clauses as equations, addition by integer arithmetic on the parsed operands,
math by re-evaluating every worked line.
"""

from __future__ import annotations

import re

import pytest

from mixtrain.data.builtin import ADDITION_SKILLS, LEGO_SKILLS, generate

N = 150


def solve_lego(prompt: str) -> tuple[dict[str, int], list[str], str]:
    """Values of all variables, the chain order (root first) and the asked variable."""
    body, _, question = prompt.partition(". What is ")
    asked = question.rstrip("?").strip()
    eqs: dict[str, tuple[int, str | None]] = {}
    for clause in body.split(";"):
        m = re.fullmatch(r"\s*([a-z])\s*=\s*([+-])(1|[a-z])\s*", clause)
        assert m, f"unparseable clause {clause!r} in {prompt!r}"
        sign = 1 if m.group(2) == "+" else -1
        eqs[m.group(1)] = (sign, None if m.group(3) == "1" else m.group(3))
    values: dict[str, int] = {}
    while len(values) < len(eqs):  # fixed-point resolution; fails if the clauses are cyclic
        progressed = False
        for var, (sign, ref) in eqs.items():
            if var in values:
                continue
            if ref is None:
                values[var] = sign
                progressed = True
            elif ref in values:
                values[var] = sign * values[ref]
                progressed = True
        assert progressed, f"clauses do not resolve: {prompt!r}"
    root = next(v for v, (_, ref) in eqs.items() if ref is None)
    chain = [root]
    while len(chain) < len(eqs):
        chain.append(next(v for v, (_, ref) in eqs.items() if ref == chain[-1]))
    return values, chain, asked


@pytest.mark.parametrize("skill", range(1, LEGO_SKILLS + 1))
def test_lego_answers_are_correct(skill: int) -> None:
    recs = generate(f"lego_{skill}", N, seed=3)
    assert len(recs) == N
    for r in recs:
        (role_u, prompt), (role_a, response) = r.messages
        assert (role_u, role_a) == ("user", "assistant")
        values, chain, asked = solve_lego(prompt)
        assert len(values) == LEGO_SKILLS
        # skill k asks for the k-th variable of the chain (k hops from the constant)
        assert chain.index(asked) == skill - 1, (prompt, skill)
        steps = [s.strip() for s in response.split(",")]
        assert len(steps) == skill
        for var, step in zip(chain, steps):
            m = re.fullmatch(r"([a-z]) = ([+-])1", step)
            assert m and m.group(1) == var, (step, var, prompt)
            assert (1 if m.group(2) == "+" else -1) == values[var], (prompt, response)
        assert steps[-1].startswith(asked)


def test_lego_prompts_are_shuffled_and_varied() -> None:
    recs = generate("lego_5", N, seed=0)
    first_is_constant = sum(bool(re.match(r"[a-z] = [+-]1[;.]", r.messages[0][1])) for r in recs)
    assert 0 < first_is_constant < N  # the constant clause is not always first: order is shuffled
    assert len({r.messages[1][1] for r in recs}) > 10


@pytest.mark.parametrize("skill", range(1, ADDITION_SKILLS + 1))
def test_addition_answers_are_correct(skill: int) -> None:
    for r in generate(f"addition_{skill}", N, seed=5):
        prompt, response = r.messages[0][1], r.messages[1][1]
        m = re.fullmatch(r"(\d+) \+ (\d+)\. Digit (\d) of the sum, counting from the right\?", prompt)
        assert m, prompt
        a, b, k = int(m.group(1)), int(m.group(2)), int(m.group(3))
        assert k == skill and 100 <= a <= 999 and 100 <= b <= 999
        total = a + b
        work, _, digit = response.rpartition("->")
        assert int(digit.strip()) == total // 10 ** (k - 1) % 10, (prompt, response)
        # every worked column: digits of a and b at that place, the incoming carry, their sum
        cols = [c.strip() for c in work.strip().split(";")]
        assert len(cols) == k
        carry = 0
        for place, col in enumerate(cols):
            da, db, c, s = map(int, re.fullmatch(r"(\d)\+(\d)\+(\d)=(\d+)", col).groups())
            assert (da, db, c) == (a // 10**place % 10, b // 10**place % 10, carry)
            assert s == da + db + c
            carry = s // 10


def test_math_worked_answers_are_consistent() -> None:
    for r in generate("math", N, seed=1):
        lines = r.messages[1][1].splitlines()
        answer = int(re.fullmatch(r"Answer: (-?\d+)", lines[-1]).group(1))
        last = None
        for line in lines[:-1]:
            m = re.match(r"(-?\d+) ([-+*/]) (-?\d+) = (-?\d+)", line)
            assert m, line
            x, op, y, z = int(m.group(1)), m.group(2), int(m.group(3)), int(m.group(4))
            expect = {"+": x + y, "-": x - y, "*": x * y, "/": x // y}[op]
            if op == "/":
                assert x % y == 0
            assert z == expect, line
            last = z
        assert answer == last
        assert answer >= 0 or "gives" in r.messages[0][1]


def test_generators_are_deterministic() -> None:
    assert generate("lego_2", 20, 7) == generate("lego_2", 20, 7)
    assert generate("addition_3", 20, 7) != generate("addition_3", 20, 8)
