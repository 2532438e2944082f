"""
Differential test of verifier.py against Math-Verify on generated (completion, gold) pairs.

    python bench/verifier_diff.py [--data_dir ../shared/data] [--seed 0] [--examples 2] [--json out.json]

Every gold answer of MATH-500, GSM8K (test), AIME 2024/2025 and AMC 2023 is rendered into completions a model
might write: answer layouts (boxed, markdown headings, the Minerva sentence, display math over several lines, a bare
answer, a self-correction), equivalent notations of the value (thousands groups, currency, fractions written
four ways, mixed numbers, repeating decimals, unicode, relations, sets, tuples, ...) and wrong-but-close variants
(off by one, sign, a dropped factor, hedges, a number that overflows a float). Each pair carries its label (does
the completion state the gold?) and its family. The label comes from how the pair was built, not from either
verifier, so both are scored against it: precision, recall, and every family where the two disagree, with a
count and an example. Math-Verify (pip install math-verify) is a bench/test-only peer; without it only ours runs.
"""

import argparse
import json
import os
import random
import re
import sys
import time
import warnings
from collections import defaultdict
from fractions import Fraction

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from verifier import verify_batch  # noqa: E402

REASONING = ("<think>\nLet me work through this. First I set up the quantities: 3 + 4 = 7, and 12 / 4 = 3. "
             "Then I combine them and check the arithmetic once more.\n</think>\n\n")


# -----------------------------------------------------------------------------
# golds


def load_golds(data_dir):
    """(source, gold) for every row of the benchmarks present under data_dir."""
    golds = []
    for source, name, field in (("math500", "math500", "answer"), ("gsm8k", "gsm8k", "answer"),
                                ("aime", "aime2024", "answer"), ("aime", "aime2025", "answer"),
                                ("amc", "amc2023", "answer")):
        path = os.path.join(data_dir, name, "test.jsonl")
        if not os.path.exists(path):
            continue
        for line in open(path):
            gold = str(json.loads(line)[field])
            golds.append((source, gold.split("####")[-1].strip() if source == "gsm8k" else gold))
    return golds


def as_fraction(gold):
    """Fraction for integer, decimal and \\frac{p}{q} golds; None otherwise."""
    text = gold.replace("{,}", ",").replace("\\!", "").replace("\\$", "").replace(" ", "")
    if re.fullmatch(r"-?\d{1,3}(,\d{3})+", text):
        text = text.replace(",", "")
    if re.fullmatch(r"-?\d+|-?\d*\.\d+", text):
        return Fraction(text)
    match = re.fullmatch(r"(-?)\\[dt]?frac\{(\d+)\}\{(\d+)\}", text)
    if match and int(match.group(3)):
        value = Fraction(int(match.group(2)), int(match.group(3)))
        return -value if match.group(1) else value
    return None


# -----------------------------------------------------------------------------
# layouts: where the answer stands in the completion (every one of them states the gold)


def layouts(answer):
    """(family, completion) for an answer written in LaTeX without delimiters."""
    return [
        ("layout:boxed", f"{REASONING}The answer is $\\boxed{{{answer}}}$."),
        ("layout:bold answer", f"{REASONING}**Answer:** ${answer}$"),
        ("layout:bold heading", f"{REASONING}**Final Answer**\n\n${answer}$"),
        ("layout:markdown heading", f"{REASONING}### Final Answer\n${answer}$\n"),
        ("layout:markdown result", f"{REASONING}### Result\n\n$$\n{answer}\n$$"),
        ("layout:minerva", f"{REASONING}Final Answer: The final answer is ${answer}$. I hope it is correct."),
        ("layout:answer then words", f"{REASONING}So the answer is ${answer}$, which we double-check below: "
                                     f"substituting back gives 12 = 12 and 5 = 5, as required."),
        ("layout:display over lines", f"{REASONING}Putting it together, the result is\n\\[\n{answer}\n\\]"),
        ("layout:dollars over lines", f"{REASONING}Therefore\n$$\n{answer}\n$$"),
        ("layout:inline paren", f"{REASONING}Hence the value is \\( {answer} \\)."),
        ("layout:bare", answer),
        ("layout:bare in dollars", f"${answer}$"),
        ("layout:self-correction", f"{REASONING}So $\\boxed{{{_wrong_value(answer)}}}$. Wait, that is wrong: I "
                                   f"dropped a term. Redoing the last step, the answer is $\\boxed{{{answer}}}$."),
        ("layout:no think", f"We compute step by step and find that the answer is ${answer}$."),
    ]


def extra_layouts(answer):
    """Layouts added on 2026-12-02 after extraction bugs: short words around the answer, and a value written without
    math delimiters at the end of the text (kept out of layouts() so that the random draws of the other pairs stay
    as they were)."""
    undelimited = [("layout:short sentence", f"{REASONING}So it is {answer}."),
                   ("layout:proof end", f"{REASONING}Therefore we get {answer} \\qquad \\blacksquare")]
    return ([("layout:answer then short words", f"{REASONING}The answer is ${answer}$ in all of the cases."),
             ("layout:undelimited", f"{REASONING}Therefore we get {answer}.")]
            + (undelimited if as_fraction(answer) is not None else []))


def _wrong_value(answer):
    value = as_fraction(answer)
    return str(value + 1) if value is not None else "0"


# -----------------------------------------------------------------------------
# notations: other ways to write the same value


def _thousands(n, sep):
    text = f"{abs(n):,}".replace(",", sep)
    return ("-" if n < 0 else "") + text


def integer_notations(n):
    rows = [("int:trailing .0", f"{n}.0"), ("int:text", f"\\text{{{n}}}"), ("int:textbf", f"\\textbf{{{n}}}"),
            ("int:units textnormal", f"{n} \\textnormal{{ units}}"), ("int:dollar sign", f"\\${n}"),
            ("int:cents", f"\\${n}.00"), ("int:currency word", f"{n} dollars"),
            ("int:variable", f"x = {n}"), ("int:restated sum", f"a+b={n}"), ("int:restated k", f"k = {n}")]
    if abs(n) >= 1000:
        rows += [("int:thousands comma", _thousands(n, ",")), ("int:latex thousands", _thousands(n, "{,}")),
                 ("int:space thousands", _thousands(n, " ")), ("int:thin space thousands", _thousands(n, "\\,")),
                 ("int:latex thousands currency", "\\$" + _thousands(n, "{,}") + ".00")]
    if 1000 <= n < 10 ** 6 and n % 100 == 0:
        rows.append(("int:scale word", f"{n / 1000:g} thousand"))
    if 1000 <= n < 10 ** 6 and n % 1000 == 0:
        rows.append(("int:e-notation in text", f"\\text{{{n // 1000}e3}}"))
    if 0 < n <= 100:
        rows += [("int:percent sign", f"{n}\\%"), ("int:percent word", f"{n} percent"),
                 ("int:percent abbreviation", f"{n} pct")]
    if 0 <= n <= 20:
        rows.append(("int:number word", ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight",
                                         "nine", "ten", "eleven", "twelve", "thirteen", "fourteen", "fifteen",
                                         "sixteen", "seventeen", "eighteen", "nineteen", "twenty"][n]))
    return rows


def _repeating(value):
    """0.\\overline{6} for 2/3-like fractions with a one- or two-digit period; None otherwise."""
    if value.denominator in (3, 9, 11, 33, 99) and 0 < value < 1:
        for period in (1, 2):
            digits = str(int(value * (10 ** period - 1))).zfill(period)
            if Fraction(int(digits), 10 ** period - 1) == value:
                return f"0.\\overline{{{digits}}}"
    return None


def fraction_notations(value):
    p, q = value.numerator, value.denominator
    sign = "-" if p < 0 else ""
    p = abs(p)
    rows = [("frac:slash", f"{sign}{p}/{q}"), ("frac:dfrac", f"{sign}\\dfrac{{{p}}}{{{q}}}"),
            ("frac:negative numerator", f"\\frac{{{-p}}}{{{q}}}" if sign else f"\\frac{{{p}}}{{{q}}}"),
            ("frac:bare frac", f"{sign}\\frac{{{p}}}{{{q}}}")]
    if p < 10 and q < 10:
        rows.append(("frac:braceless", f"{sign}\\frac{p}{q}"))
    if p > q:
        rows.append(("frac:mixed number", f"{sign}{p // q} {p % q}/{q}"))
        rows.append(("frac:mixed latex", f"{sign}{p // q}\\frac{{{p % q}}}{{{q}}}"))
    decimal = Fraction(p, q)
    if 10 ** 6 % q == 0:
        text = f"{float(decimal):.6f}".rstrip("0").rstrip(".")
        rows.append(("frac:decimal", sign + text))
        if text.startswith("0."):
            rows.append(("frac:decimal without leading zero", sign + text[1:]))
        if "." in text and not sign:
            rows.append(("frac:decimal comma", text.replace(".", ",") if len(text.split(".")[1]) != 3 else text))
    repeating = _repeating(decimal)
    if repeating and not sign:
        rows.append(("frac:repeating decimal", repeating))
    return rows


# textual rewrites that keep the value, applied to any LaTeX gold they fit
REWRITES = [
    ("latex:pi unicode", r"\\pi(?![a-zA-Z])", "π"),
    ("latex:sqrt unicode", r"\\sqrt\{(\d+)\}", r"√\1"),
    ("latex:sqrt braceless", r"\\sqrt\{(\d)\}", r"\\sqrt\1"),
    ("latex:sqrt as power", r"^\\sqrt\{(\d+)\}$", r"\1^{1/2}"),
    ("latex:dfrac", r"\\frac", r"\\dfrac"),
    ("latex:leq ascii", r"\\le(?:q)?(?![a-zA-Z])", "<="),
    ("latex:leq unicode", r"\\le(?:q)?(?![a-zA-Z])", "≤"),
    ("latex:geq ascii", r"\\ge(?:q)?(?![a-zA-Z])", ">="),
    ("latex:neq unicode", r"\\ne(?:q)?(?![a-zA-Z])", "≠"),
    ("latex:degrees unicode", r"\^\\circ", "°"),
    ("latex:degrees dropped", r"\^\\circ", ""),
    ("latex:degrees word", r"\^\\circ", " degrees"),
    ("latex:ln as log", r"\\ln(?![a-zA-Z])", r"\\log"),
    ("latex:pmatrix as bmatrix", r"pmatrix", "bmatrix"),
    ("latex:text dropped", r"^\\text\{([^{}]*)\}$", r"\1"),
    ("latex:left right", r"^\((.*)\)$", r"\\left(\1\\right)"),
    ("latex:tfrac", r"\\frac", r"\\tfrac"),
    ("latex:spaces", r",\s*", ", "),
    ("latex:pi after fraction", r"^\\frac\{(\d+)\\pi\}\{(\d+)\}$", r"\\frac{\1}{\2}\\pi"),
    ("latex:pi over", r"^\\frac\{\\pi\}\{(\d+)\}$", r"\\pi/\1"),
]


def latex_notations(gold):
    rows = []
    for family, pattern, replacement in REWRITES:
        rewritten = re.sub(pattern, replacement, gold)
        if rewritten != gold:
            rows.append((family, rewritten))
    items = [] if as_fraction(gold) is not None else _top_level_items(gold)
    if len(items) > 1 and not gold.startswith(("(", "[", "\\{")):
        rows += [("several:reversed", ", ".join(items[::-1])), ("several:braces", "\\{" + ", ".join(items) + "\\}"),
                 ("several:and", " and ".join(items)), ("several:separate boxes", None)]
    if gold.startswith("\\{") and gold.endswith("\\}"):
        rows.append(("several:set without braces", gold[2:-2]))
    if len(items) > 1 and gold.startswith("(") and gold.endswith(")") and len(items) <= 4:
        names = "abcd"[: len(items)]
        rows.append(("several:labelled tuple", f"({', '.join(names)}) = {gold}"))
    if len(items) == 2 and not gold.startswith(("(", "[", "\\{")):
        pm = re.fullmatch(r"(.+?)\s*\+\s*(.+)", items[0])
        if pm and items[1].replace(" ", "") == f"{pm.group(1)}-{pm.group(2)}".replace(" ", ""):
            rows.append(("several:plus-minus", f"{pm.group(1)} \\pm {pm.group(2)}"))
    return [(f, r) for f, r in rows if r is None or r != gold]


def _top_level_items(s):
    inner = s[1:-1] if s[:1] in "([" and s[-1:] in ")]" else s
    items, depth, current = [], 0, ""
    for char in inner:
        depth += char in "([{"
        depth -= char in ")]}"
        if char == "," and depth == 0:
            items.append(current.strip())
            current = ""
        else:
            current += char
    return [i for i in items + [current.strip()] if i]


# -----------------------------------------------------------------------------
# wrong-but-close variants (none of them states the gold)


def wrong_variants(gold, value):
    rows = []
    if value is not None:
        rows += [("wrong:off by one", str(value + 1)), ("wrong:sign", str(-value)) if value else None,
                 ("wrong:doubled", str(2 * value)) if value else None,
                 ("wrong:halved", _fraction_latex(value / 2)) if value else None]
        if value.denominator > 1:
            rows.append(("wrong:numerator only", str(abs(value.numerator))))
            rows.append(("wrong:denominator only", str(value.denominator)))
            rows.append(("wrong:inverted", _fraction_latex(1 / value)))
        if value.denominator == 1 and abs(value) >= 10:
            rows.append(("wrong:digit dropped", str(value)[:-1]))
    else:
        rows += [("wrong:sign", f"-({gold})" if not gold.startswith("-") else gold[1:]),
                 ("wrong:factor", f"2({gold})" if "=" not in gold and "," not in gold else None)]
    rows += [("wrong:overflow pi power", "\\pi^{9999}"), ("wrong:overflow e power", "e^{9999}"),
             ("wrong:empty box", "."), ("wrong:hedge or", f"{gold} \\text{{ or }} {_other(gold, value)}")]
    return [r for r in rows if r is not None and r[1] is not None and r[1] != gold]


def _fraction_latex(value):
    if value.denominator == 1:
        return str(value.numerator)
    sign = "-" if value < 0 else ""
    return f"{sign}\\frac{{{abs(value.numerator)}}}{{{value.denominator}}}"


def _other(gold, value):
    return str(value + 1) if value is not None else "0"


# -----------------------------------------------------------------------------
# families no benchmark gold shows often: built from templates with random numbers


def synthetic_families(rng):
    """(family, gold, equivalent answers, wrong answers) with fresh random numbers on every call."""
    a, b, c = rng.randint(2, 9), rng.randint(10, 30), rng.randint(2, 7)
    lo, hi = -rng.randint(1, 9), rng.randint(1, 9)
    return [
        ("relation:interval vs inequality", f"[{lo}, {hi})",
         [f"{lo} \\le t < {hi}", f"{lo} <= t < {hi}", f"{lo} ≤ t < {hi}", f"{lo} \\leq x < {hi}"],
         [f"({lo}, {hi})", f"[{lo}, {hi}]", f"{lo} < t < {hi}"]),
        ("relation:inequality vs interval", f"x \\ge {a}", [f"[{a}, \\infty)", f"x >= {a}", f"x ≥ {a}", f"{a} \\le x"],
         [f"({a}, \\infty)", f"x > {a}", f"x \\le {a}"]),
        ("relation:multiplied by -1", f"x < {a}", [f"-x > -{a}", f"(-\\infty, {a})"], [f"-x < -{a}", f"x > {a}"]),
        ("relation:set-builder", f"(-\\infty, {a}]", [f"\\{{x \\mid x \\le {a}\\}}", f"\\{{x : x \\leq {a}\\}}"],
         [f"\\{{x \\mid x < {a}\\}}"]),
        ("relation:not equal", f"x \\neq {a}", [f"x \\ne {a}", f"x != {a}", f"x ≠ {a}"], [f"x \\neq {a + 1}"]),
        ("relation:union", f"(-\\infty, {lo}) \\cup ({hi}, \\infty)",
         [f"(-\\infty,{lo})\\cup({hi},\\infty)", f"x < {lo} \\text{{ or }} x > {hi}"],
         [f"(-\\infty, {lo}] \\cup [{hi}, \\infty)", f"({lo}, {hi})"]),
        ("equation:line up to a factor", f"y = {a}x + {b}",
         [f"{a}x - y + {b} = 0", f"y - {a}x = {b}", f"{2 * a}x - 2y + {2 * b} = 0", f"y={a}x+{b}"],
         [f"y = {a}x - {b}", f"y = {b}x + {a}"]),
        ("equation:plane up to a factor", f"{a}x - {c}y + z = {b}",
         [f"{2 * a}x - {2 * c}y + 2z - {2 * b} = 0", f"-{a}x + {c}y - z + {b} = 0"],
         [f"{a}x - {c}y + z = {b + 1}"]),
        ("several:unordered solutions", f"{a}, -{c}", [f"-{c}, {a}", f"x = -{c} \\text{{ or }} x = {a}",
                                                       f"x = {a}, x = -{c}", f"\\{{-{c}, {a}\\}}"],
         [f"{a}", f"{a}, {c}", f"{a}, -{c}, 0"]),
        ("several:tuples in any order", f"({a}, {b}), ({c}, {a})", [f"({c}, {a}), ({a}, {b})"],
         [f"({b}, {a}), ({c}, {a})"]),
        ("several:labelled values", f"{a}, {b}", [f"a={a}, b={b}", f"a = {a} \\text{{ and }} b = {b}"],
         [f"a={b}, b={b}"]),
        ("several:labelled tuple", f"({a}, {b})", [f"(m, n) = ({a}, {b})", f"(m,n)=({a},{b})"],
         [f"(m, n) = ({b}, {a})"]),
        ("several:plus-minus", f"{a} + \\sqrt{{{c}}}, {a} - \\sqrt{{{c}}}", [f"{a} \\pm \\sqrt{{{c}}}",
                                                                             f"{a} ± √{c}"],
         [f"{a} + \\sqrt{{{c}}}"]),
        ("symbolic:ln vs log", f"\\ln {a}", [f"\\log {a}", f"\\log({a})", f"\\ln({a})"], [f"\\ln {a + 1}"]),
        ("symbolic:inverse trig", f"\\arcsin(\\frac{{1}}{{{c}}})", [f"\\sin^{{-1}}(\\frac{{1}}{{{c}}})",
                                                                    f"\\operatorname{{arcsin}}(1/{c})"],
         [f"\\sin(\\frac{{1}}{{{c}}})", f"\\arccos(\\frac{{1}}{{{c}}})"]),
        ("symbolic:radical vs power", f"\\sqrt[3]{{{c}}}", [f"{c}^{{1/3}}", f"{c}^{{\\frac{{1}}{{3}}}}"],
         [f"{c}^{{1/2}}", f"\\sqrt{{{c}}}"]),
        ("symbolic:pi after fraction", f"\\frac{{{a}\\pi}}{{{b}}}", [f"\\frac{{{a}}}{{{b}}}\\pi",
                                                                     f"{a}\\pi/{b}", f"\\frac{{{a}}}{{{b}}}π"],
         [f"\\frac{{{a}}}{{{b}}}", f"\\frac{{{b}\\pi}}{{{a}}}"]),
        ("symbolic:function of another variable", f"f(x) = {a}x^2 + {c}",
         [f"f(t) = {a}t^2 + {c}", f"{a}x^2+{c}"], [f"f(t) = {a}t^2 - {c}"]),
        ("symbolic:inverse function", f"\\frac{{x - {c}}}{{{a}}}",
         [f"f^{{-1}}(x) = \\frac{{x-{c}}}{{{a}}}", f"f^{{-1}}(y) = \\frac{{y - {c}}}{{{a}}}"],
         [f"\\frac{{x + {c}}}{{{a}}}"]),
        ("symbolic:ceiling and floor", f"\\lceil \\frac{{{b}}}{{{c}}} \\rceil",
         [str(-(-b // c)), f"⌈{b}/{c}⌉"], [str(b // c) if b % c else str(b // c + 1)]),
        ("symbolic:matrix notations", f"\\begin{{pmatrix}} {a} & {b} \\\\ {c} & 1 \\end{{pmatrix}}",
         [f"\\begin{{bmatrix}} {a} & {b} \\\\ {c} & 1 \\end{{bmatrix}}",
          f"\\left(\\begin{{array}}{{cc}} {a} & {b} \\\\ {c} & 1 \\end{{array}}\\right)"],
         [f"\\begin{{pmatrix}} {b} & {a} \\\\ {c} & 1 \\end{{pmatrix}}"]),
        ("symbolic:vector as tuple", f"\\begin{{pmatrix}} {a} \\\\ -{c} \\\\ {b} \\end{{pmatrix}}",
         [f"({a}, -{c}, {b})", f"\\begin{{bmatrix}} {a} \\\\ -{c} \\\\ {b} \\end{{bmatrix}}"],
         [f"({a}, {c}, {b})"]),
        ("symbolic:degrees", f"{b * 3}^\\circ", [f"{b * 3}°", f"{b * 3} degrees", f"{b * 3}^{{\\circ}}"],
         [f"{b * 3 + 1}^\\circ"]),
        ("symbolic:complex", f"{a} - {c}i", [f"-{c}i + {a}", f"{a}-{c}\\cdot i"], [f"{a} + {c}i"]),
        ("number:currency with cents", f"{a}{b}.50", [f"\\${a}{b}.50", f"{a}{b}.5 dollars", f"\\${a}{b}.50"],
         [f"{a}{b}.05", f"{a}{b}"]),
        ("number:percent", f"{b}\\%", [f"{b}", f"{b} percent", f"{b}%", f"0.{b}"], [f"{b + 1}\\%", f"{b / 1000}"]),
        ("number:decimal gold rounding", f"{a}.{c}", [f"{a}.{c}0", f"{a}.{c}"], [f"{a}.{c + 1}", f"{a}"]),
    ]


def synthetic_pairs(rng, rounds):
    pairs = []
    for _ in range(rounds):
        for family, gold, equivalents, wrongs in synthetic_families(rng):
            for answer in equivalents:
                layout_family, completion = rng.choice(layouts(answer)[:10])
                pairs.append((f"synthetic {family} / {layout_family}", completion, gold, True))
            for answer in wrongs:
                layout_family, completion = rng.choice(layouts(answer)[:10])
                pairs.append((f"synthetic wrong:{family} / {layout_family}", completion, gold, False))
        hedge = f"{REASONING}It is $\\boxed{{{a}}}$ or $\\boxed{{{a + 1}}}$." if (a := rng.randint(1, 99)) else ""
        pairs.append(("synthetic wrong:hedge boxes side by side", hedge, str(a), False))
        pairs.append(("synthetic wrong:two boxes for one value",
                      f"{REASONING}The values are $\\boxed{{{a}}}$, $\\boxed{{{a + 2}}}$.", str(a), False))
    return pairs


# -----------------------------------------------------------------------------
# the generated set


def make_pairs(golds, seed=0, gsm8k_golds=300):
    """(family, completion, gold, label) for every gold: all layouts of the gold as written, each notation boxed
    and in one other layout drawn at random, and each wrong variant in one layout. GSM8K golds (integers, 1,319 of
    them) are sampled down so that they do not drown the other sources."""
    rng = random.Random(seed)
    gsm8k = [g for g in golds if g[0] == "gsm8k"]
    golds = [g for g in golds if g[0] != "gsm8k"] + rng.sample(gsm8k, min(gsm8k_golds, len(gsm8k)))
    pairs = []
    for source, gold in golds:
        value = as_fraction(gold)
        pairs += [(f"{source} {family}", completion, gold, True)
                  for family, completion in layouts(gold) + extra_layouts(gold)]
        notations = latex_notations(gold)
        if value is not None and value.denominator == 1:
            notations += integer_notations(value.numerator)
        elif value is not None:
            notations += fraction_notations(value)
        for family, answer in notations:
            if answer is None:  # several answers, each in its own box
                boxes = ", ".join(f"\\boxed{{{item}}}" for item in _top_level_items(gold))
                pairs.append((f"{source} {family}", f"{REASONING}The solutions are {boxes}.", gold, True))
                continue
            boxed, *others = layouts(answer)
            for layout_family, completion in (boxed, rng.choice(others)):
                pairs.append((f"{source} {family} / {layout_family}", completion, gold, True))
        for family, answer in wrong_variants(gold, value):
            layout_family, completion = rng.choice(layouts(answer))
            pairs.append((f"{source} {family} / {layout_family}", completion, gold, False))
        if value is not None:
            hedge = f"{REASONING}It is either $\\boxed{{{gold}}}$ or $\\boxed{{{value + 1}}}$."
            pairs.append((f"{source} wrong:hedge boxes", hedge, gold, False))
    return pairs + synthetic_pairs(rng, rounds=40)


# -----------------------------------------------------------------------------
# real text: reference solutions with their final line rewritten, and sampled model outputs


def solution_pairs(data_dir, rng, gsm8k_solutions=300):
    """Reference solutions of GSM8K (their '#### N' line replaced by the ways a model ends) and MATH-500 (the box
    taken off, so the answer must be found in the prose), and the Qwen2.5-Math chain-of-thought samples of
    sft_demo/ as they are and with their boxed value changed."""
    pairs = []
    path = os.path.join(data_dir, "gsm8k", "test.jsonl")
    if os.path.exists(path):
        rows = [json.loads(line) for line in open(path)]
        for row in rng.sample(rows, min(gsm8k_solutions, len(rows))):
            body, gold = row["answer"].split("####")
            body, gold = re.sub(r"<<[^>]*>>", "", body).strip(), gold.strip()
            value = int(gold.replace(",", ""))
            for family, ending in (("no marker", ""), ("the answer is", f"The answer is {gold}."),
                                   ("bold answer", f"**Answer:** {gold}"), ("boxed", f"So \\boxed{{{gold}}}."),
                                   ("minerva", f"Final Answer: The final answer is ${gold}$. I hope it is correct.")):
                pairs.append((f"gsm8k solution:{family}", f"{body}\n{ending}".strip(), gold, True))
            pairs.append(("gsm8k wrong:solution off by one", f"{body}\nThe answer is {value + 1}.", gold, False))
    path = os.path.join(data_dir, "math500", "test.jsonl")
    if os.path.exists(path):
        for row in map(json.loads, open(path)):
            unboxed = re.sub(r"\\boxed\{", "{", row["solution"])
            pairs.append(("math500 solution:box taken off", unboxed, row["answer"], True))
    path = os.path.join(data_dir, "sft_demo", "math_cot_qwen25math.jsonl")
    if os.path.exists(path):
        for row in map(json.loads, open(path)):
            pairs.append(("qwen25math sample:as written", row["response"], row["answer"], True))
            wrong = row["response"].replace(f"\\boxed{{{row['answer']}}}", "\\boxed{0}")
            if wrong != row["response"] and row["answer"] != "0":
                pairs.append(("qwen25math wrong:sample with another boxed value", wrong, row["answer"], False))
    return pairs


# -----------------------------------------------------------------------------
# the two verifiers and the report


def run_ours(pairs):
    start = time.perf_counter()
    verdicts = verify_batch([(completion, gold) for _, completion, gold, _ in pairs], timeout=2.0)
    return [v.correct for v in verdicts], time.perf_counter() - start


def run_math_verify(pairs):
    from math_verify import parse, verify

    warnings.simplefilter("ignore")  # its LaTeX parser's sympy deprecation notices, hundreds of them
    start, results = time.perf_counter(), []
    for _, completion, gold, _ in pairs:
        try:
            results.append(bool(verify(parse(f"${gold}$"), parse(completion))))
        except Exception:  # a peer crash is its wrong answer, as a timeout is ours
            results.append(False)
    return results, time.perf_counter() - start


def confusion(judged, labels):
    tp = sum(j and l for j, l in zip(judged, labels))
    fp = sum(j and not l for j, l in zip(judged, labels))
    fn = sum(l and not j for j, l in zip(judged, labels))
    return dict(precision=tp / max(tp + fp, 1), recall=tp / max(tp + fn, 1), false_positives=fp,
                false_negatives=fn, accuracy=sum(j == l for j, l in zip(judged, labels)) / len(labels))


def family_of(name):
    """'math500 frac:slash / layout:bare' -> 'frac:slash / layout:bare' (the source is reported apart)."""
    return name.split(" ", 1)[1]


def report(pairs, ours, peer, examples):
    labels = [label for *_, label in pairs]
    print(f"{len(pairs):,} pairs ({sum(labels):,} stating the gold, {len(labels) - sum(labels):,} not)")
    rows = [("ours", ours)] + ([("Math-Verify", peer)] if peer is not None else [])
    for name, judged in rows:
        c = confusion(judged, labels)
        print(f"{name:12s} precision {c['precision']:.4f}  recall {c['recall']:.4f}  accuracy {c['accuracy']:.4f}  "
              f"false positives {c['false_positives']}  false negatives {c['false_negatives']}")
    for source in sorted({p[0].split(" ")[0] for p in pairs}):
        index = [i for i, p in enumerate(pairs) if p[0].startswith(source + " ")]
        line = f"  {source:8s} {len(index):5d} pairs: ours recall {_recall(ours, labels, index):.3f}"
        if peer is not None:
            line += f", Math-Verify recall {_recall(peer, labels, index):.3f}"
        print(line)
    classes = defaultdict(list)
    for i, (name, completion, gold, label) in enumerate(pairs):
        key = (family_of(name).split(" / ")[0], "ours right" if ours[i] == label else "ours wrong",
               "peer not run" if peer is None else "peer right" if peer[i] == label else "peer wrong")
        if key[1] == "ours wrong" or key[2] == "peer wrong":
            classes[key].append((completion, gold, label))
    if peer is not None:
        agreement = sum(a == b for a, b in zip(ours, peer)) / len(pairs)
        print(f"agreement ours vs Math-Verify: {agreement:.4f}")
    print("classes where a verifier is wrong (family, ours, peer): count, example")
    for key, items in sorted(classes.items(), key=lambda kv: -len(kv[1])):
        print(f"  {len(items):5d}  {key[0]} | {key[1]} | {key[2]}")
        for completion, gold, label in items[:examples]:
            print(f"         gold {gold!r} label {label}: {completion[-120:]!r}")
    return classes


def _recall(judged, labels, index):
    positives = [i for i in index if labels[i]]
    return sum(judged[i] for i in positives) / max(len(positives), 1)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--data_dir", default=os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--examples", type=int, default=2, help="examples printed per disagreement class")
    parser.add_argument("--no_peer", action="store_true", help="run ours only")
    parser.add_argument("--json", default=None, help="write the figures and classes here")
    args = parser.parse_args()
    golds = load_golds(args.data_dir)
    if not golds:
        sys.exit(f"no benchmark files under {args.data_dir}: point --data_dir at the folder with math500/, gsm8k/")
    pairs = make_pairs(golds, args.seed) + solution_pairs(args.data_dir, random.Random(args.seed))
    ours, our_seconds = run_ours(pairs)
    print(f"ours: {len(pairs) / our_seconds:,.0f} pairs/s (verify_batch)")
    peer = None
    if not args.no_peer:
        try:
            peer, peer_seconds = run_math_verify(pairs)
            print(f"Math-Verify: {len(pairs) / peer_seconds:,.0f} pairs/s (one process)")
        except ImportError:
            print("Math-Verify is not installed (pip install math-verify): ours only")
    classes = report(pairs, ours, peer, args.examples)
    if args.json:
        labels = [p[-1] for p in pairs]
        result = dict(pairs=len(pairs), ours=confusion(ours, labels),
                      math_verify=confusion(peer, labels) if peer is not None else None,
                      classes={" | ".join(k): len(v) for k, v in classes.items()})
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
