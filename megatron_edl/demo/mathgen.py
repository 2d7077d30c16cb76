"""Generated mathematics for the offline corpus: worked problems (plain text) and LaTeX derivations.

Every document is a short worksheet of exercises whose answers sympy computes, so the text is
correct mathematics, not random symbols. Two styles, two corpus domains:

* :func:`problem_documents`: plain-text problems with worked solutions (arithmetic, fractions,
  percentages, prime factorisation, linear and quadratic equations, linear systems,
  derivatives in ``sympy`` notation, arithmetic series).
* :func:`latex_documents`: LaTeX derivations (derivatives with the product rule, definite
  integrals, determinants, binomial expansions, partial fractions, sums) in ``align*``
  environments, with ``\\section*`` headings.

Both are infinite generators driven by one ``random.Random``: the same seed gives the same
documents (sympy's printers are deterministic). sympy is imported lazily; it is installed with
torch. Each exercise costs a few milliseconds of sympy time.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from fractions import Fraction

__all__ = ["latex_documents", "problem_documents"]

_NAMES = ("Ada", "Ben", "Chloe", "Dmitri", "Emma", "Farid", "Grace", "Hiro", "Ines", "Jonas")
_ITEMS = ("apples", "books", "marbles", "stamps", "coins", "pencils", "tickets", "cards")


def _nonzero(rng: random.Random, low: int, high: int) -> int:
    value = 0
    while value == 0:
        value = rng.randint(low, high)
    return value


# ----------------------------------------------------------------------------------------------
# Plain-text problems
# ----------------------------------------------------------------------------------------------


def _linear_equation(rng: random.Random, sp) -> str:
    x = sp.Symbol("x")
    a, solution = _nonzero(rng, -9, 9), rng.randint(-12, 12)
    b = rng.randint(-20, 20)
    c = a * solution + b
    lhs = sp.sstr(a * x + b)
    step = f"Subtract {b} from" if b >= 0 else f"Add {-b} to"
    return (
        f"Solve for x: {lhs} = {c}.\n"
        f"{step} both sides: {sp.sstr(a * x)} = {c - b}.\n"
        f"Divide both sides by {a}: x = {solution}.\n"
        f"Check: {a}*({solution}) + {b} = {c}. Answer: x = {solution}."
    )


def _quadratic(rng: random.Random, sp) -> str:
    x = sp.Symbol("x")
    r1, r2 = rng.randint(-9, 9), rng.randint(-9, 9)
    k = rng.randint(1, 3)
    poly = sp.expand(k * (x - r1) * (x - r2))
    factored = sp.factor(poly)
    roots = sorted({r1, r2})
    answer = " or ".join(f"x = {r}" for r in roots)
    disc = sp.discriminant(poly, x)
    return (
        f"Solve the quadratic equation {sp.sstr(poly)} = 0.\n"
        f"The discriminant is {disc}. Factoring gives {sp.sstr(factored)} = 0.\n"
        f"A product is zero when a factor is zero, so {answer}."
    )


def _fractions(rng: random.Random, sp) -> str:
    p = Fraction(rng.randint(1, 9), rng.randint(2, 12))
    q = Fraction(rng.randint(1, 9), rng.randint(2, 12))
    op = rng.choice("+-*")
    result = {"+": p + q, "-": p - q, "*": p * q}[op]
    lcm = sp.ilcm(p.denominator, q.denominator)
    lines = [f"Compute {p} {op} {q}."]
    if op in "+-":
        a, b = p.numerator * lcm // p.denominator, q.numerator * lcm // q.denominator
        lines.append(f"The common denominator is {lcm}: {a}/{lcm} {op} {b}/{lcm}.")
    else:
        lines.append(
            f"Multiply numerators and denominators: {p.numerator * q.numerator}/"
            f"{p.denominator * q.denominator}."
        )
    lines.append(f"In lowest terms the result is {result}.")
    return "\n".join(lines)


def _percent(rng: random.Random, sp) -> str:
    name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    total = rng.randint(2, 40) * 10
    pct = rng.choice((5, 10, 15, 20, 25, 30, 40, 50, 60, 75))
    part = sp.Rational(pct * total, 100)
    return (
        f"{name} has {total} {item} and gives away {pct}% of them. How many are left?\n"
        f"{pct}% of {total} is {pct}/100 * {total} = {part}.\n"
        f"{total} - {part} = {total - part}. Answer: {total - part} {item}."
    )


def _factorisation(rng: random.Random, sp) -> str:
    n = rng.randint(12, 5000)
    factors = sp.factorint(n)
    text = " * ".join(f"{p}^{e}" if e > 1 else str(p) for p, e in sorted(factors.items()))
    m = rng.randint(12, 5000)
    return (
        f"Find the prime factorisation of {n}, and gcd({n}, {m}) and lcm({n}, {m}).\n"
        f"{n} = {text}.\n"
        f"gcd({n}, {m}) = {sp.igcd(n, m)} and lcm({n}, {m}) = {sp.ilcm(n, m)}."
    )


def _linear_system(rng: random.Random, sp) -> str:
    x, y = sp.symbols("x y")
    sx, sy = rng.randint(-9, 9), rng.randint(-9, 9)
    while True:
        a, b, c, d = (rng.randint(-6, 6) for _ in range(4))
        if a * d - b * c != 0:
            break
    e1, e2 = a * x + b * y, c * x + d * y
    return (
        f"Solve the system {sp.sstr(e1)} = {a * sx + b * sy} and "
        f"{sp.sstr(e2)} = {c * sx + d * sy}.\n"
        f"The determinant of the coefficients is {a}*{d} - ({b})*({c}) = {a * d - b * c}, "
        f"so the solution is unique.\n"
        f"Elimination gives x = {sx} and y = {sy}."
    )


def _derivative_text(rng: random.Random, sp) -> str:
    x = sp.Symbol("x")
    f = _random_function(rng, sp, x)
    return (
        f"Differentiate f(x) = {sp.sstr(f)}.\n"
        f"f'(x) = {sp.sstr(sp.diff(f, x))}.\n"
        f"At x = 0 the slope is {sp.sstr(sp.diff(f, x).subs(x, 0))}."
    )


def _series_sum(rng: random.Random, sp) -> str:
    first, step, n = rng.randint(-10, 20), _nonzero(rng, -5, 9), rng.randint(5, 60)
    last = first + (n - 1) * step
    total = n * (first + last) // 2
    return (
        f"Find the sum of the arithmetic sequence {first}, {first + step}, "
        f"{first + 2 * step}, ... with {n} terms.\n"
        f"The last term is {first} + ({n} - 1)*{step} = {last}.\n"
        f"The sum is {n}*({first} + {last})/2 = {total}."
    )


_PROBLEMS: tuple[Callable[[random.Random, object], str], ...] = (
    _linear_equation,
    _quadratic,
    _fractions,
    _percent,
    _factorisation,
    _linear_system,
    _derivative_text,
    _series_sum,
)


# ----------------------------------------------------------------------------------------------
# LaTeX derivations
# ----------------------------------------------------------------------------------------------


def _random_function(rng: random.Random, sp, x):
    kind = rng.randrange(4)
    a, b = _nonzero(rng, -5, 5), _nonzero(rng, 1, 4)
    if kind == 0:
        return x ** rng.randint(2, 5) * sp.sin(b * x) + a
    if kind == 1:
        return (a * x + rng.randint(-5, 5)) * sp.exp(b * x)
    if kind == 2:
        return sp.log(x**2 + b) * x ** rng.randint(1, 3)
    return sp.cos(a * x) ** 2 + x ** rng.randint(1, 4) / b


def _latex_derivative(rng: random.Random, sp) -> str:
    x = sp.Symbol("x")
    u = x ** rng.randint(1, 4) + rng.randint(-5, 5)
    v = rng.choice((sp.sin, sp.cos, sp.exp))(_nonzero(rng, -4, 4) * x)
    du, dv = sp.diff(u, x), sp.diff(v, x)
    result = sp.expand(du * v + u * dv)

    def factor(expr) -> str:
        text = sp.latex(expr)
        return f"\\left({text}\\right)" if text.startswith("-") or expr.is_Add else text

    return (
        "By the product rule $(uv)' = u'v + uv'$:\n"
        "\\begin{align*}\n"
        f"\\frac{{d}}{{dx}}\\left[{sp.latex(u * v)}\\right]\n"
        f"  &= {factor(du)} \\cdot {factor(v)} + {factor(u)} \\cdot {factor(dv)} \\\\\n"
        f"  &= {sp.latex(result)}.\n"
        "\\end{align*}"
    )


def _latex_integral(rng: random.Random, sp) -> str:
    x = sp.Symbol("x")
    poly = sum(rng.randint(-6, 6) * x**k for k in range(rng.randint(2, 4)))
    poly = poly + _nonzero(rng, 1, 5) * x ** rng.randint(3, 5)
    lo, hi = sorted(rng.sample(range(-3, 5), 2))
    antiderivative = sp.integrate(poly, x)
    value = antiderivative.subs(x, hi) - antiderivative.subs(x, lo)
    return (
        "\\begin{align*}\n"
        f"\\int_{{{lo}}}^{{{hi}}} \\left({sp.latex(poly)}\\right) dx\n"
        f"  &= \\left[{sp.latex(antiderivative)}\\right]_{{{lo}}}^{{{hi}}} \\\\\n"
        f"  &= {sp.latex(value)}.\n"
        "\\end{align*}"
    )


def _latex_determinant(rng: random.Random, sp) -> str:
    size = rng.choice((2, 3))
    matrix = sp.Matrix(size, size, [rng.randint(-5, 5) for _ in range(size * size)])
    det = matrix.det()
    text = (
        f"The determinant of a ${size} \\times {size}$ matrix, expanded along the first row:\n"
        f"\\[\n\\det {sp.latex(matrix)} = {det}.\n\\]"
    )
    if det != 0:
        text += (
            f"\nSince the determinant is non-zero the matrix is invertible, and\n"
            f"\\[\n{sp.latex(matrix)}^{{-1}} = {sp.latex(matrix.inv())}.\n\\]"
        )
    return text


def _latex_binomial(rng: random.Random, sp) -> str:
    a, b = sp.symbols("a b")
    n = rng.randint(3, 6)
    c = _nonzero(rng, -3, 3)
    expr = (a + c * b) ** n
    return (
        "By the binomial theorem "
        "$(a + b)^n = \\sum_{k=0}^{n} \\binom{n}{k} a^{n-k} b^k$:\n"
        f"\\[\n{sp.latex(expr)} = {sp.latex(sp.expand(expr))}.\n\\]"
    )


def _latex_partial_fractions(rng: random.Random, sp) -> str:
    x = sp.Symbol("x")
    r1, r2 = rng.sample(range(-6, 7), 2)
    numerator = rng.randint(1, 6) * x + rng.randint(-6, 6)
    expr = numerator / ((x - r1) * (x - r2))
    return (
        "Decompose into partial fractions:\n"
        "\\begin{align*}\n"
        f"{sp.latex(expr)} &= {sp.latex(sp.apart(expr, x))}.\n"
        "\\end{align*}"
    )


def _latex_sum(rng: random.Random, sp) -> str:
    k, n = sp.symbols("k n", integer=True, positive=True)
    power = rng.randint(1, 3)
    closed = sp.factor(sp.summation(k**power, (k, 1, n)))
    m = rng.randint(5, 30)
    return (
        "A closed form, proved by induction on $n$:\n"
        f"\\[\n\\sum_{{k=1}}^{{n}} {sp.latex(k**power)} = {sp.latex(closed)},\n\\]\n"
        f"so for $n = {m}$ the sum is ${closed.subs(n, m)}$."
    )


_DERIVATIONS: tuple[Callable[[random.Random, object], str], ...] = (
    _latex_derivative,
    _latex_integral,
    _latex_determinant,
    _latex_binomial,
    _latex_partial_fractions,
    _latex_sum,
)


def _worksheets(
    rng: random.Random,
    makers: tuple[Callable[[random.Random, object], str], ...],
    title: Callable[[int], str],
    items: tuple[int, int],
) -> Iterator[str]:
    import sympy as sp

    number = 0
    while True:
        number += 1
        count = rng.randint(*items)
        parts = [title(number)] + [rng.choice(makers)(rng, sp) for _ in range(count)]
        yield "\n\n".join(parts)


def problem_documents(rng: random.Random) -> Iterator[str]:
    """Endless plain-text worksheets of worked problems (3 to 6 per document).

    Args:
        rng: The source of randomness (the documents are a function of its state).

    Yields:
        One worksheet per document.
    """
    counter = iter(range(1, 1 << 62))

    def numbered(rng_: random.Random, sp) -> str:
        return f"Problem {next(counter)}. " + rng.choice(_PROBLEMS)(rng_, sp)

    yield from _worksheets(rng, (numbered,), lambda i: f"Exercise set {i}", (3, 6))


def latex_documents(rng: random.Random) -> Iterator[str]:
    """Endless LaTeX worksheets of derivations (2 to 4 per document).

    Args:
        rng: The source of randomness (the documents are a function of its state).

    Yields:
        One worksheet per document.
    """
    yield from _worksheets(
        rng, _DERIVATIONS, lambda i: f"\\section*{{Worked derivations {i}}}", (2, 4)
    )
