"""Final answers written as numbers: the normalised string form, and :func:`parse_numeral`.

A numeral is a *value*: an integer, a decimal, a fraction, a mixed number (``3\\frac{1}{2}``) or scientific
notation (``1.2 \\times 10^{6}``), with its decoration gone (math delimiters, ``\\boxed{}``, a leading
``x =``, a currency sign, a unit word, ``\\text{}`` or parenthesised unit, ``%``, degrees). An expression
still to compute (``12+30``, ``2^3``) or digits apart (``4 2``) is not one. Standard library only.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from fractions import Fraction

_THOUSANDS_RE = re.compile(r"[+-]?\d{1,3}(?:(?:,\d{3})+|(?: \d{3})+)(?:\.\d*)?")
_WHITESPACE_RE = re.compile(r"\s+")


def _squeeze_space(match: re.Match[str]) -> str:
    # Whitespace between two digits is kept: "4 2" is not the number 42.
    s, start, end = match.string, match.start(), match.end()
    return " " if start > 0 and end < len(s) and s[start - 1].isdecimal() and s[end].isdecimal() else ""


def normalize_answer(text: str) -> str:
    """The plain-string form used by the fallback comparison.

    Strip, drop ``$``, drop trailing ``.``, drop thousands separators (only when the whole answer is one
    number such as ``1,234,567.5`` or ``1 234 567`` -- ``1, 234`` or ``(1,234)`` are lists/tuples and keep
    their comma), drop whitespace except between two digits (``4 2`` stays two numbers), lowercase.
    """
    s = _WHITESPACE_RE.sub(" ", text.replace("$", "")).strip().rstrip(".").strip()
    if _THOUSANDS_RE.fullmatch(s):
        s = s.replace(",", "").replace(" ", "")
    return _WHITESPACE_RE.sub(_squeeze_space, s).lower()


# Longer text is never a plain number (and is not worth scanning).
MAX_NUMERAL_CHARS = 200
# Trailing words read as a unit ("7 square meters"); more is a sentence, not a value.
MAX_UNIT_WORDS = 3


@dataclass(frozen=True)
class Numeral:
    """A final answer written as a number, with its decoration gone."""

    value: Fraction
    text: str  # the bare number ("-3/4", "1234.5")
    parts: tuple[int, int] | None = None  # (numerator, denominator) as written, for a fraction
    percent: bool = False  # written with "%" (or "percent"): p% also reads as p/100
    places: int | None = None  # digits after the point, for a plain decimal ("0.333" -> 3)
    digits: int = 0  # significant digits, for a plain decimal ("0.0120" -> 3)

    @property
    def reduced(self) -> bool:
        """A fraction in lowest terms with a denominator above 1 (``1/2``, not ``2/4`` or ``4/1``)."""
        return self.parts is not None and self.parts[1] > 1 and math.gcd(*self.parts) == 1

    def readings(self) -> tuple[Fraction, ...]:
        """The values it may stand for: ``50%`` is 50 or 0.5; anything else is its value."""
        return (self.value, self.value / 100) if self.percent else (self.value,)


_WRAPPER_RE = re.compile(r"\\(?:boxed|fbox|text|textbf|textrm|mathrm|mathbf|mbox)\s*\{")
_DELIMITERS = ("\\$", "$", "\\(", "\\)", "\\[", "\\]", "\\displaystyle")
_VARIABLE_RE = re.compile(r"[A-Za-z](?:_\{?\w+\}?)?\s*=\s*")  # "x = 2", "a_{1}=2"
_CURRENCY_RE = re.compile(r"(?:[€£¥]|\\euro|\\pounds|\\yen)\s*")
_SPACING_RE = re.compile(r"(?:\\[,;:! ]|~|\s)+")
_UNIT_RE = re.compile(
    r"(?:\\(?:text|textrm|mathrm|mbox|rm)\s*\{(?P<text>[^{}]*)\}"  # \text{ dollars}
    r"|(?<![A-Za-z\\])(?P<word>[A-Za-z]++(?:\s*+/\s*+[A-Za-z]++)*+)\.?"  # dollars, km/h, sq.; not \pi
    r"|\((?P<paren>[^()]*)\)"  # ASDiv's "9 (apples)"
    r"|(?P<sign>\\%|%|°|\\circ|\\degree|\^\s*\{\s*\\circ\s*\}|\^\s*\\circ))"
    r"(?:\s*\^\s*(?:\{\s*-?\d\s*\}|-?\d)|[²³])?\s*$"  # cm^2
)
# Words that change the value they follow (7 hundred, 7 thirds, 7 squared): never units.
_VALUE_WORDS = frozenset(
    re.findall(
        r"\w+",
        "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
        "sixteen seventeen eighteen nineteen twenty thirty forty fifty sixty seventy eighty ninety hundred "
        "thousand million billion trillion dozen score half halves third thirds fourth fourths quarter "
        "quarters fifth fifths sixth sixths seventh sevenths eighth eighths ninth ninths tenth tenths "
        "hundredth hundredths thousandth thousandths squared cubed factorial power powers root roots sqrt "
        "log ln exp mod modulo pi times over plus minus divided by less more than and or of to",
    )
)
_FRACTION_RES = (
    re.compile(r"\\[dt]?frac\s*\{\s*([+-]?)\s*(\d+)\s*\}\s*\{\s*([+-]?)\s*(\d+)\s*\}"),
    re.compile(r"\\[dt]?frac\s*()(\d)()(\d)"),  # \frac12
    re.compile(r"()(\d+)\s*/\s*()(\d+)"),
)
_DECIMAL_RE = re.compile(r"\d{1,3}(?:(?:,\d{3})+|(?: \d{3})+)(?:\.\d+)?|\d+(?:\.\d*)?|\.\d+")


def _unwrap(s: str) -> str:
    """``\\boxed{X}`` / ``\\text{X}`` around the whole answer -> ``X``."""
    m = _WRAPPER_RE.match(s)
    if not m or not s.endswith("}"):
        return s
    depth = 0
    for i in range(m.end() - 1, len(s)):
        depth += {"{": 1, "}": -1}.get(s[i], 0)
        if depth == 0:
            return s[m.end() : i] if i == len(s) - 1 else s
    return s


def _strip_unit(s: str) -> tuple[str, str]:
    """``s`` without one trailing unit (``dollars``, ``\\text{cm}^2``, ``(apples)``, ``\\%``, ``^\\circ``),
    and that unit (``""`` when there is none)."""
    m = _UNIT_RE.search(s)
    if not m or m.start() == 0 or s[m.start() - 1] == "\\":  # "\pi" is not the unit "pi"
        return s, ""
    if m["paren"] is not None:  # a label in parentheses, letters only: "9 (apples)", "350 (g)"
        if not _LABEL_RE.fullmatch(m["paren"]):
            return s, ""
        return s[: m.start()], m["paren"]
    words = m["text"] if m["text"] is not None else m["word"]
    if words is not None:
        if any(ch.isdecimal() for ch in words):
            return s, ""
        names = re.findall(r"[A-Za-z]+", words)
        # One bare letter could be a variable ("7 x"); units written so are in \text{} ("7\text{ m}").
        if any(n.lower() in _VALUE_WORDS for n in names) or (
            m["word"] is not None and len("".join(names)) < 2
        ):
            return s, ""
        return s[: m.start()], words.strip()
    return s[: m.start()], m["sign"]


_LABEL_RE = re.compile(r"\s*[A-Za-z][A-Za-z '.-]*")
_PERCENT_UNITS = frozenset({"%", "\\%", "percent", "per cent"})
# "(-3)": a signed number in parentheses (an unsigned one, "(7)", stays a one-item tuple).
_SIGNED_PARENS_RE = re.compile(r"\(\s*([+-])\s*([^(),]+?)\s*\)")
_MIXED_RES = (
    re.compile(r"(\d+)\s*\\[dt]?frac\s*\{\s*(\d+)\s*\}\s*\{\s*(\d+)\s*\}"),  # 3\frac{1}{2}
    re.compile(r"(\d+)\s*\\[dt]?frac\s*(\d)(\d)"),  # 3\frac12
)
_SCIENTIFIC_RES = (  # 1.2 \times 10^{6}, 1.2e6; the mantissa in [1, 10)
    re.compile(r"(\d(?:\.\d+)?)\s*(?:\\times|\\cdot|×|·)\s*10\s*\^\s*(?:\{\s*([+-]?\d{1,3})\s*\}|([+-]?\d))"),
    re.compile(r"(\d(?:\.\d+)?)[eE]([+-]?\d{1,3})()"),
)


def parse_numeral(text: str) -> Numeral | None:
    """``text`` as a number when it is one, written as a value: ``None`` for anything else.

    Accepted around the number: math delimiters, ``\\boxed{}``/``\\text{}``, a leading ``x =``, a currency
    sign (``\\$7``), a trailing unit word or ``\\text{}`` unit (``7 dollars``), ``%`` and degrees, thousands
    separators (``1,000``, ``1 000``, ``1{,}000``, ``1\\,000``). Not a value: an expression (``12+30``,
    ``2^3``, ``\\sqrt{4}``), digits apart (``4 2``), number words (``7 hundred``). Linear in ``len(text)``.
    """
    s = text.strip()
    if len(s) > MAX_NUMERAL_CHARS:
        return None
    s = s.replace("\u2212", "-").replace("{,}", ",")
    for delimiter in _DELIMITERS:
        s = s.replace(delimiter, "")
    units = 0
    percent = False
    for _ in range(MAX_UNIT_WORDS + 4):  # each pass peels one layer: \boxed{}, "x =", a unit word
        before = s
        s = _unwrap(_SPACING_RE.sub(" ", s).strip().rstrip(".").strip())
        variable = _VARIABLE_RE.match(s)
        s = s[variable.end() :] if variable else s
        signed = _SIGNED_PARENS_RE.fullmatch(s)
        s = signed[1] + signed[2] if signed else s
        sign = s[:1] if s[:1] in ("+", "-") else ""
        currency = _CURRENCY_RE.match(s, len(sign))
        s = sign + s[currency.end() :] if currency else s
        if units < MAX_UNIT_WORDS:
            stripped, unit = _strip_unit(s)
            if unit:
                units += 1
                percent = percent or unit.lower() in _PERCENT_UNITS
            s = stripped
        if s == before:
            break
    sign, body = (s[0], s[1:].strip()) if s[:1] in ("+", "-") else ("", s)
    negative = sign == "-"
    for pattern in _FRACTION_RES:
        m = pattern.fullmatch(body)
        if m:
            num_sign, num, den_sign, den = m.groups()
            numerator, denominator = int(num), int(den)
            if denominator == 0:
                return None
            negative ^= (num_sign == "-") ^ (den_sign == "-")
            value = Fraction(numerator, denominator) * (-1 if negative else 1)
            written = f"{'-' if negative else ''}{numerator}/{denominator}"
            return Numeral(value, written, (numerator, denominator), percent)
    sign_factor = -1 if negative else 1
    for pattern in _MIXED_RES:  # a whole number and a proper fraction in lowest terms
        m = pattern.fullmatch(body)
        if m:
            whole, numerator, denominator = (int(g) for g in m.groups())
            if not (0 < numerator < denominator and math.gcd(numerator, denominator) == 1 and whole > 0):
                return None
            value = (whole + Fraction(numerator, denominator)) * sign_factor
            return Numeral(value, f"{value.numerator}/{value.denominator}", None, percent)
    for pattern in _SCIENTIFIC_RES:
        m = pattern.fullmatch(body)
        if m:
            mantissa, exponent = Fraction(m[1]), int(m[2] or m[3])
            value = mantissa * Fraction(10) ** exponent * sign_factor
            return Numeral(value, f"{sign}{m[1]}e{exponent}", None, percent)
    if _DECIMAL_RE.fullmatch(body):
        digits = body.replace(",", "").replace(" ", "")
        whole, _, fraction = digits.partition(".")
        significant = len((whole + fraction).lstrip("0")) if "." in digits else len(whole.lstrip("0"))
        return Numeral(
            Fraction(digits) * sign_factor,
            f"{'-' if negative else ''}{digits}",
            None,
            percent,
            len(fraction) if "." in digits else 0,
            significant,
        )
    return None
