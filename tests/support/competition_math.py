"""Synthetic rows shaped like hendrycks/competition_math (MATH): ``problem``, ``level``, ``type``,
``solution`` ending in ``\\boxed{...}``.

The text is made up, but its shape is MATH's: problems of 50 to 400 words (log-uniform, so most are
short) written in LaTeX, some with an Asymptote diagram (``[asy] ... [/asy]``, 1,000-2,000 characters),
and a worked solution whose last ``\\boxed{}`` holds the answer (an integer, a fraction or a radical).
Deterministic for a seed.
"""

from __future__ import annotations

import random

TYPES = (
    "Algebra",
    "Counting & Probability",
    "Geometry",
    "Intermediate Algebra",
    "Number Theory",
    "Prealgebra",
    "Precalculus",
)

_SENTENCES = (
    "Let $f(x) = {a}x^2 - {b}x + {c}$.",
    "What is the smallest positive integer $n$ such that $n^2 - {a}n + {c}$ is divisible by ${b}$?",
    "Find the sum of all real values of $x$ that satisfy $\\frac{{x+{a}}}{{x-{b}}} = {c}$.",
    "In triangle $ABC$, $AB = {a}$, $BC = {b}$, and $\\angle ABC = {c}^\\circ$.",
    "A bag contains {a} red marbles and {b} blue marbles, and {c} marbles are drawn without replacement.",
    "Compute $\\displaystyle \\sum_{{k=1}}^{{{a}}} \\left( k^2 + {b}k \\right)$.",
    "The points $({a}, {b})$ and $(-{c}, {a})$ lie on a circle whose center is on the $x$-axis.",
    "Express your answer as a common fraction.",
    "How many ordered pairs $(m, n)$ of positive integers satisfy $m + {a}n \\le {b}{c}$?",
    "Simplify $\\sqrt{{{a}}} \\cdot \\sqrt{{{b}}} \\cdot \\sqrt{{{c}}}$ and express it in simplest radical form.",
    "The remainder when $2^{{{a}}}$ is divided by ${b}$ is $r$; what is $r + {c}$?",
    "A regular polygon has interior angles of ${a}{b}^\\circ$ each.",
    "If $\\log_{{{a}}} (x - {b}) = {c}$, what is $x$?",
    "Two fair {a}-sided dice are rolled, and the product of the numbers shown is recorded.",
    "The matrix $\\begin{{pmatrix}} {a} & {b} \\\\ {c} & 1 \\end{{pmatrix}}$ is its own inverse up to a scalar.",
    "Suppose that $a$, $b$ and $c$ are the roots of $x^3 - {a}x^2 + {b}x - {c} = 0$.",
)

_STEPS = (
    "Substituting $x = {a}$ gives ${b} - {c} = {a}$, so the equation holds.",
    "By the Pythagorean theorem, the hypotenuse is $\\sqrt{{{a}^2 + {b}^2}}$.",
    "There are $\\binom{{{a}}}{{{b}}} = {c}$ ways to choose the marbles.",
    "Multiplying both sides by ${a}$ and rearranging, we get $x^2 - {b}x + {c} = 0$.",
    "Vieta's formulas give $a + b + c = {a}$ and $abc = {c}$.",
    "Reducing modulo ${b}$, the powers of $2$ repeat with period ${a}$.",
)


def _fill(template: str, rng: random.Random) -> str:
    return template.format(a=rng.randint(2, 19), b=rng.randint(2, 19), c=rng.randint(2, 99))


def _words(text: str) -> int:
    return len(text.split())


def asymptote(rng: random.Random, chars: int) -> str:
    """An ``[asy]`` block of about ``chars`` characters: points, segments, labels, as MATH's figures."""
    lines = ["[asy]", "unitsize(0.8 cm);", "pair A, B, C, D, O;"]
    names = "ABCDEFGHO"
    while sum(len(line) + 1 for line in lines) < chars - 8:
        kind = rng.randrange(4)
        p, q = rng.choice(names), rng.choice(names)
        x, y = rng.randint(-9, 9), rng.randint(-9, 9)
        if kind == 0:
            lines.append(f"{p} = ({x},{y});")
        elif kind == 1:
            lines.append(f"draw({p}--{q}--({x},{y})--cycle);")
        elif kind == 2:
            lines.append(f'label("${p}$", {p}, {rng.choice(["N", "S", "E", "W", "NE", "SW"])});')
        else:
            lines.append(f"draw(Circle(({x},{y}),{rng.randint(1, 5)}));")
    lines.append("[/asy]")
    return "\n".join(lines)


def answer_text(rng: random.Random) -> str:
    kind = rng.randrange(3)
    if kind == 0:
        return str(rng.randint(0, 999))
    if kind == 1:
        den = rng.randint(2, 17)
        num = rng.choice([n for n in range(1, 4 * den) if _gcd(n, den) == 1])
        return f"\\frac{{{num}}}{{{den}}}"
    return f"{rng.randint(2, 9)}\\sqrt{{{rng.choice([2, 3, 5, 6, 7])}}}"


def _gcd(a: int, b: int) -> int:
    while b:
        a, b = b, a % b
    return a


def competition_math_row(
    rng: random.Random, words: int | None = None, diagram_chars: int | None = None
) -> dict:
    """One row; ``words`` (the problem's length without its diagram) and ``diagram_chars`` (0: none)
    default to random: 50-400 words, a 1,000-2,000 character diagram for Geometry and 5% of the rest."""
    target = words if words is not None else int(50 * 8 ** rng.random())
    kind = rng.choice(TYPES)
    if diagram_chars is None:
        diagram_chars = rng.randint(1000, 2000) if kind == "Geometry" or rng.random() < 0.05 else 0
    parts: list[str] = []
    while sum(_words(p) for p in parts) < target:
        parts.append(_fill(rng.choice(_SENTENCES), rng))
    problem = " ".join(parts)
    if diagram_chars:
        problem += "\n\n" + asymptote(rng, diagram_chars)
    answer = answer_text(rng)
    steps = " ".join(_fill(rng.choice(_STEPS), rng) for _ in range(rng.randint(2, 6)))
    return {
        "problem": problem,
        "level": f"Level {rng.randint(1, 5)}",
        "type": kind,
        "solution": f"{steps} Therefore the answer is $\\boxed{{{answer}}}$.",
    }


def competition_math_rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [competition_math_row(rng) for _ in range(n)]
