"""
Math answer verifier: is a model's final answer equal to the gold answer?

    verify(completion, gold) -> bool
    grade(completion, gold) -> Verdict(status, answer, reason)    status: correct | incorrect | no_answer |
                                                                           unparseable | timeout
    verify_batch([(completion, gold), ...], workers=None, timeout=1.0) -> list[Verdict]
    math_reward(completion, gold) -> 1.0 | 0.0;  format_reward(completion) -> 1.0 | 0.0

The reward of train_grpo.py and every number of eval.py come from here. Design rules:
  1. Extraction reads the text after the last </think>: the last brace-matched \\boxed{} / \\fbox{}, else
     "final answer"/"the answer is"/"Answer:"/"####" markers, else the last math span or number of the last
     sentence. Scans are linear and capped at the tail of the text.
  2. Hedging is wrong: two different boxed answers, "x or y", a list for a scalar gold, ± when the gold has none.
  3. Model output is never executed: no eval, no sympify, no parse_latex. A small recursive-descent parser builds
     sympy objects through their constructors, after hard limits on length, depth, node count, exponents and
     factorials. Anything beyond them is "unparseable", which counts as wrong.
  4. Integers and fractions compare exactly (3 is not 300), decimals at the gold's written precision, other
     numbers to a relative 1e-12, expressions by evaluation at fixed points plus sympy simplification,
     intervals with closedness, sets unordered, tuples and matrices in order, equations up to a factor.
  5. Time is bounded by the parent: the sympy work runs in pre-started worker processes with a wall-clock
     deadline per item; a stuck worker is killed and replaced and the item is "timeout". No signal.alarm, so any
     thread may call it. Exact strings, integers and fractions are decided in the caller without a process hop.
This file imports no torch.
"""

import cmath
import json
import math
import os
import re
import select
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from fractions import Fraction
from functools import lru_cache

import sympy

MAX_TEXT_TAIL = 4000  # characters of the completion (after </think>) that extraction scans
MAX_ANSWER_CHARS = 400  # a longer "answer" is not an answer
MAX_DEPTH = 30  # parser recursion
MAX_NODES = 400  # parsed operations per answer
MAX_RESULT_DIGITS = 2000  # a number with more digits is refused before it is computed
MAX_FACTORIAL = 500


@dataclass
class Verdict:
    status: str  # correct | incorrect | no_answer | unparseable | timeout
    answer: str | None
    reason: str

    @property
    def correct(self) -> bool:
        return self.status == "correct"


class ParseError(ValueError):
    pass


# -----------------------------------------------------------------------------
# 1. extraction


def _match_brace(text: str, open_index: int) -> int | None:
    """Index just past the brace that closes text[open_index] == '{', or None if it is never closed."""
    depth = 0
    for i in range(open_index, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return i + 1
    return None


def _closing_braces(text: str) -> dict[int, int]:
    """{index of a '{': index just past its closing '}'} for every closed brace, in one pass: a completion with
    hundreds of unclosed \\boxed{ would cost a scan to its end for each with _match_brace."""
    closing, open_braces = {}, []
    for match in re.finditer(r"[{}]", text):
        if match.group() == "{":
            open_braces.append(match.start())
        elif open_braces:
            closing[open_braces.pop()] = match.end()
    return closing


def _boxed_spans(text: str) -> list[tuple[int, int, str]]:
    """(start, end, content) of every \\boxed{...} / \\fbox{...} (also "\\boxed 5" and an unterminated last one)."""
    spans, closing = [], None
    for match in re.finditer(r"\\(?:boxed|fbox)\s*", text):
        start = match.end()
        if start < len(text) and text[start] == "{":
            closing = _closing_braces(text) if closing is None else closing
            end = closing.get(start)
            content = text[start + 1:] if end is None else text[start + 1: end - 1]
            end = len(text) if end is None else end
        else:
            word = re.match(r"[^\s$.,]+", text[start:])
            content, end = (word.group(0), start + word.end()) if word else ("", start)
        if not re.fullmatch(r"(?:\\phantom\{[^{}]*\}|\\[qh]?quad|\\[,;! ]|\s)*", content):  # the problem's blank
            spans.append((match.start(), end, content.strip()))
    return spans


def boxed_answers(text: str) -> list[str]:
    """Contents of every boxed answer, in order."""
    return [content for _, _, content in _boxed_spans(text)]


# words with which a model takes back what it boxed before ("... \\boxed{4}. Wait, that is wrong ... \\boxed{5}")
_REVISION = re.compile(r"(?:^|[.!?;:,)$\n])\s*(?:wait|actually|hmm|oops|hold on|correction|on second thought|"
                       r"let me (?:re-?check|check|verify|fix|redo|recompute|reconsider))\b|"
                       r"\b(?:made|there is|there's|i see) an? (?:mistake|error)\b|"
                       r"\bthat(?:'s| is| was) (?:wrong|incorrect|a mistake|not right)\b|\bdouble[- ]counts?\b",
                       re.IGNORECASE)


def committed_boxes(region: str) -> list[str]:
    """The boxed answers the model commits to: a box that follows a revision replaces every box before it;
    boxes offered side by side all stand (a hedge, unless the gold has several values)."""
    committed, previous_end = [], 0
    for start, end, content in _boxed_spans(region):
        if committed and _REVISION.search(region[previous_end:start]):
            committed = []
        committed.append(content)
        previous_end = end
    return committed


_MARKERS = re.compile(r"final answer\s*(?:is|of)?\s*[:=]?|(?:the|my) (?:final )?answer (?:is|would be|should be)\s*[:=]?|"
                      r"(?:the|my) (?:final )?answer(?=\s*(?:\$|\\\(|\\\[))|"
                      r"answer\s*[:=]|####|^[ \t]*(?:final )?(?:answer|result)s?[ \t]*:?[ \t]*$",
                      re.IGNORECASE | re.MULTILINE)
_MATH_SPAN = re.compile(r"\$\$(.+?)\$\$|(?<!\\)\$((?:\\\$|[^$])+?)\$|\\\((.+?)\\\)|\\\[(.+?)\\\]|"
                        r"\\begin\{(?:align|equation|gather)\*?\}(.+?)\\end\{(?:align|equation|gather)\*?\}", re.DOTALL)
# where an answer written in prose ends: a sentence end, or a comma before a clause ("7, which we check below")
_ANSWER_END = re.compile(r"\.(?:\s|$)|(?<!\\)[;!?]|,\s+(?!and\b|or\b)(?=[a-z]{2,}|i\.e\.|e\.g\.)|"
                         r"\s(?:which|since|because|as|so|where|when|for|if|with|at)\s")
# a number in prose: thousands groups (1 234 567), a mixed number (2 1/2, 2½, 2 ½), a fraction, a decimal
_NUMBER = (r"-?(?<![a-zA-Z\d.^])(?<!\d,)(?<!\^\{)"  # not glued to a word, a power, a thousands group: QX7B, m^2
           r"(?:\d{1,3}(?: \d{3})+(?![\d.])|\d+ \d+/\d+(?![\d/-])|\d+ ?[½⅓⅔¼¾⅕⅙⅛]|"
           r"\d[\d,]*(?:\.\d+)?(?:/\d+)?|\.\d+|[½⅓⅔¼¾⅕⅙⅛])")


def answer_region(text: str) -> str | None:
    """The part of a completion that holds the final answer: after the last </think>, capped at the tail, with
    markdown emphasis and heading marks removed. A completion that opened a think block and never closed it has
    not answered."""
    close = text.rfind("</think>")
    if close >= 0:
        text = text[close + len("</think>"):]
    elif "<think>" in text:
        return None
    text = text[-MAX_TEXT_TAIL:].replace("**", "").replace("__", "")
    text = re.sub(r"\[asy\].*?(?:\[/asy\]|$)", " ", text, flags=re.DOTALL)  # figure code holds no answer
    return re.sub(r"(?m)^[ \t]*#{1,6}[ \t]+(?=[A-Za-z])", "", text)


def extract_answer(text: str) -> str | None:
    """The final answer as written (not normalised), or None. Several different committed boxed answers are
    joined with ' ; ' so that grading sees them all."""
    region = answer_region(text)
    if region is None:
        return None
    boxed = committed_boxes(region)
    if boxed:
        return " ; ".join(dict.fromkeys(boxed))
    marked = _after_last_marker(region)
    if marked is not None:
        return marked or None
    return _bare_answer(region) or _last_math_in_final_sentence(region)


def _after_last_marker(region: str, strict: bool = False) -> str | None:
    """The answer after the last "final answer" / "the answer is" / "Answer:" / "####" / answer heading: the rest
    of the marker's line (or of the math span that opens right after it, over several lines if it must), cut where
    the sentence ends outside math, with math delimiters dropped ("$18$ or $19$" stays a hedge).
    None when there is no marker or what follows it is prose (strict: has prose at all); "" when the marker is followed
    by an empty answer."""
    markers = list(_MARKERS.finditer(region))
    if not markers:
        return None
    rest = region[markers[-1].end():].lstrip(" \t\n:=")
    opening = _MATH_SPAN.match(rest)
    line_end = rest.find("\n", opening.end() if opening else 0)
    line = rest if line_end < 0 else rest[:line_end]
    spans = [(m.start(), m.end()) for m in _math_spans(line)]
    cut = next((m.start() for m in _ANSWER_END.finditer(line) if not any(a <= m.start() < b for a, b in spans)),
               len(line))
    answer = _MATH_SPAN.sub(_span_text, line[:cut]).strip()
    answer = _END_MARKS.sub("", re.sub(r"\.\s*$", "", answer)).strip()  # "\\frac{14}{3} \\quad \\blacksquare"
    remark = re.search(r"(?<=\S)\s+\(([^()]*)\)$", answer)
    if remark and re.search(r"(?i)\b(?:or|and|but|maybe|perhaps|possibly|probably|could|might|actually|either)\b",
                            remark.group(1)):
        return answer  # "3 (or 4)", "3 (actually 4)": a hedge or a correction, which states no one value
    if remark and re.search(r"(?<![\\a-zA-Z])[a-zA-Z]{3,}", remark.group(1)):
        answer = answer[: remark.start()]  # "3 (not 0)", "12 (rounded)": a remark
    if not answer:
        return ""
    prose = _prose_words(answer) + _word_pairs(answer)  # "7 in all": short words side by side are prose too
    if strict and prose:
        return None
    if not prose or re.search(r"(?i)\b(?:or|and|but|either|perhaps|maybe)\b", answer):
        return answer  # no words to drop, or alternatives the hedge check must see ("18 or perhaps 19")
    before_prose = answer[: min(word.start() for word in prose)]
    if re.match(r"(?:times|plus|minus|divided by|multiplied by)\s[^=]*=", answer[len(before_prose):]):
        result = re.sub(r"(?:\s+[a-zA-Z]{2,})+$", "", answer.rsplit("=", 1)[-1]).strip()  # units dropped
        if result and not _has_prose(result) and not _word_pairs(result):
            return result  # a calculation that goes on from the value ("$5$ times $3$ = 15 apples"): its result
    span = _span_text(opening) if opening else ""
    if span and before_prose.strip() == span and not _has_prose(span) and not re.fullmatch(r"[a-zA-Z]", span):
        return span  # "$2n+1$ for odd n", "$1, -2$ in all cases": the span the marker opens on, not a digit in it
    if "\\" in before_prose:
        return re.sub(r"(?:[\s-]+[a-zA-Z]{1,3})*[\s-]*$", "", before_prose).strip()  # "\\frac{1}{2} of the total"
    number = re.search(_NUMBER, answer.rsplit("=", 1)[-1])  # the result of a calculation, else the first value
    if number and not _raised(answer.rsplit("=", 1)[-1], number):
        return number.group()  # "She has 6 apples left", "clearly 18", "The total is 12 + 25 = 37 apples"
    if number:
        return ""  # "2^10 - 1 subsets": a power, which prose does not spell well enough to read
    return answer if len(answer.split()) <= 3 else None


def _raised(text: str, number: re.Match) -> bool:
    """A number in prose with a power after it (2^10, 3 x 10^5): not the value, and prose powers are not read."""
    return bool(re.match(r"\s*\^", text[number.end():]))


def _stated_after_boxes(text: str) -> str | None:
    """A final answer stated after the last of several boxes ("= \\boxed{200} ... = \\boxed{255} ... Final Answer:
    The final answer is $10,455$."): the boxes were steps. Only "final answer" and "####" count, and only a value with
    no words in its sentence: "To check the answer: ..." or "the final answer: 12 plus 3 gives 15" state nothing."""
    region = answer_region(text)
    spans = _boxed_spans(region) if region is not None else []
    if not spans:
        return None
    tail = region[spans[-1][1]:]
    markers = list(re.finditer(r"final answer|####", tail, re.IGNORECASE))
    if not markers:
        return None
    return _after_last_marker(tail[markers[-1].start():], strict=True) or None


def _math_spans(text: str) -> list[re.Match]:
    """Math spans, less the ones two currency signs make ("pays $30 - $12 = $18"): a $-span that opens on a digit
    and closes after a space or an operator, or that holds prose."""
    spans = []
    for span in _MATH_SPAN.finditer(text):
        content = span.group(2)
        if content is not None and re.match(r"\d", content) and re.search(r"[\s=+*/-]$", content):
            continue
        if _has_prose(_span_text(span)) and not re.fullmatch(r"[A-Za-z]+", _span_text(span)):  # \( east \) stays
            continue
        if re.fullmatch(r"\\emph\s*\{[^{}]*\}", _span_text(span)):  # "9 and 50 $\emph{do}$ divide it": prose
            continue
        if re.fullmatch(r"\\(?:blacksquare|square|Box|qed)", _span_text(span)):  # "$4$. $\blacksquare$": the end
            continue
        spans.append(span)
    return spans


def _span_text(span: re.Match) -> str:
    """A math span's content; of a multi-line display (align), its last row without alignment marks."""
    content = next(group for group in span.groups() if group is not None)
    aligned = re.fullmatch(r"\s*\\begin\{(?:aligned|split|gathered)\}(.*)\\end\{(?:aligned|split|gathered)\}\s*", content, re.S)
    if span.group(5) is not None or aligned:  # align / equation / aligned: the last row (a matrix keeps its rows)
        content = aligned.group(1) if aligned else content
        rows = [row for row in re.split(r"\\\\", content) if row.strip()]
        content = re.sub(r"^\s*=", "", (rows[-1] if rows else content).replace("&", ""))
    return content.strip()


_PROSE_WORD = re.compile(r"(?<![\\a-zA-Z])[a-zA-Z]{4,}")
_ANSWER_WORDS = {"thousand", "million", "billion", "percent", "dollars", "cents", "units", "degrees"}


def _outside_commands(text: str) -> str:
    """text with \\text{...}, \\mbox{...}, \\begin{...} and the like blanked (their words are no prose)."""
    return re.sub(r"\\(?:text\w*|mbox|mathrm|operatorname)\s*\{[^{}]*\}|\\(?:begin|end)\{\w+\}",
                  lambda m: " " * len(m.group()), text)


def _prose_words(text: str) -> list[re.Match]:
    """Words of four letters or more outside LaTeX commands and \\text{}, other than units and number words."""
    return [word for word in _PROSE_WORD.finditer(_outside_commands(text))
            if word.group().lower() not in _ANSWER_WORDS and word.group().lower() not in _NUMBER_WORDS]


# two words side by side, of two letters or more: a sentence ("The sum is 12", "So it is 5") even when every word
# is too short to count as prose; number words ("twenty five", "three hundred") are a number
_WORD_PAIR = re.compile(r"(?<![\\a-zA-Z])([a-zA-Z]{2,})\s+(?=([a-zA-Z]{2,})(?![a-zA-Z]))")


def _word_pairs(text: str) -> list[re.Match]:
    return [pair for pair in _WORD_PAIR.finditer(_outside_commands(text))
            if not {pair.group(1).lower(), pair.group(2).lower()} <= _NUMBER_WORDS.keys() | _ANSWER_WORDS]


def _has_prose(text: str) -> bool:
    return bool(_prose_words(text))


def _bare_answer(region: str) -> str | None:
    """A completion that is only its answer (`\\frac{7}{3}`, `.25`, `$3\\pi$`): the whole of it, never its last
    number. Prose around it means it is not bare."""
    stripped = region.strip()
    if not stripped or len(stripped) > 200 or stripped.count("\n") > 4:
        return None
    inner = re.sub(r"^(?:\$\$|\$|\\\(|\\\[)|(?:\$\$|\$|\\\)|\\\])$", "", stripped).strip()
    if re.search(r"(?<!\\)\$", inner) or not inner:
        return None
    if re.fullmatch(r"[A-Za-z]+", inner):
        return inner
    if _has_prose(inner) or _word_pairs(inner):
        return None
    return inner.rstrip(".").strip()


# what may end a sentence after its value: spacing, an end-of-proof mark, a line break, the end of an alignment
# (not of a matrix)
_END_MARKS = re.compile(r"(?:\s*(?:\\(?:quad|qquad|hfill|blacksquare|square|Box|checkmark|qed)(?![a-zA-Z])|"
                        r"\\\\|[∎□■]|\\end\{(?:aligned|align|gathered|gather|equation|split)\*?\}))+\s*$")
_PLAIN_WORD = re.compile(r"[a-zA-Z]{2,}(?:/[a-zA-Z]+)?[,:;]?")  # "apples", "minutes/month", "is,"


def _sentence_answer(sentence: str) -> str | None:
    """The answer of a final sentence without math delimiters. Its last run of tokens that are no plain words (units
    and "is the answer" after it skipped), when the run holds a LaTeX command: after the run's last "=" ("So it is
    \\frac{14}{3}", "the area is 6\\sqrt{3} square units", "2 \\times 1,500 = 3,000"); after "and" or "or" it is
    one of two answers (None); after "not" the value it replaces comes before it; a parenthesis after a value is
    a remark ("12 (3 \\cdot 4)", "4 (at x = \\frac{1}{2})"). Otherwise the sentence's last number."""
    words = _END_MARKS.sub("", sentence).split()
    while words and _PLAIN_WORD.fullmatch(words[-1]):
        words.pop()
    run = []
    while words and not _PLAIN_WORD.fullmatch(words[-1]):
        run.insert(0, words.pop())
    remark = next((i for i, token in enumerate(run) if token.startswith("(")), None)
    if remark is not None and (remark > 0 or "\\" in "".join(run) and re.search(r"\d", " ".join(words))):
        run = run[:remark]
    text = " ".join(run)
    if text.count(")") > text.count("(") + text.count("["):  # it closes a remark opened before it
        source = sentence[: sentence.rfind(" (")] if " (" in sentence else ""
    elif "\\" not in text:
        source = " ".join(words + run) if remark is not None else sentence
    elif words and words[-1].lower().rstrip(",") in ("and", "or"):
        return None
    elif words and words[-1].lower().rstrip(",") == "not":
        source = " ".join(words)
    else:
        return text.rsplit("=", 1)[-1].strip()
    numbers = list(re.finditer(_NUMBER, source))
    if not numbers or _raised(source, numbers[-1]):
        return None
    return numbers[-1].group().rstrip(",")


def _last_math_in_final_sentence(region: str) -> str | None:
    """The last math span of the text if it stands in the final sentence or only words follow it (a lone
    variable such as "... values of $x.$" names, it does not answer); else the last number of the last sentence
    that has one. A span with prose in it is two currency signs, not math."""
    spans = _math_spans(region)
    if len(spans) > 1 and re.fullmatch(r"[a-zA-Z][.,]?", _span_text(spans[-1])) and \
            not re.search(r"\d|[.!?]\s+[A-Z]|\n\s*\S", region[spans[-2].end(): spans[-1].start()]):
        spans.pop()
    if spans:
        after = region[spans[-1].end():]
        if not re.search(r"\d", after) or not re.search(r"[.!?]\s+[A-Z\\$]|\n\s*\S", after):
            return _span_text(spans[-1]) or None
    text = re.sub(r"\b(Mr|Mrs|Ms|Dr|St|vs|etc|approx)\.", r"\1", region.strip().rstrip("."))
    for sentence in reversed(re.split(r"(?<=[.!?])\s+(?=[A-Z\\$])|\n", text)):
        if re.search(r"\d", sentence):  # the last sentence with a digit answers, or nothing does ("the area is s^2")
            return _sentence_answer(sentence)
    return None


# -----------------------------------------------------------------------------
# 2. normalisation (strings in, strings out)

_UNICODE = {
    "π": r"\pi ", "∞": r"\infty ", "√": r"\sqrt ", "×": r"\times ", "÷": r"\div ", "·": r"\cdot ", "⋅": r"\cdot ",
    "−": "-", "–": "-", "≤": r"\le ", "≥": r"\ge ", "≠": r"\ne ", "∪": r"\cup ", "±": r"\pm ", "°": r"^\circ ",
    "∈": r"\in ", "⌈": r"\lceil ", "⌉": r"\rceil ", "⌊": r"\lfloor ", "⌋": r"\rfloor ", "²": "^2", "³": "^3", "½": "(1/2)", "⅓": "(1/3)", "⅔": "(2/3)", "¼": "(1/4)", "¾": "(3/4)", "⅕": "(1/5)",
    "⅙": "(1/6)", "⅛": "(1/8)", "θ": r"\theta ", "α": r"\alpha ", "β": r"\beta ", "\u2009": " ", "\u00a0": " ",
}
_UNITS = (
    "m/s|km/h|per|degrees?|cents?|dollars?|units?|square|sq|cubic|inches|inch|feet|foot|ft|yards?|miles?|meters?|metres?|"
    "centimeters?|cm|mm|km|kg|grams?|seconds?|sec|minutes?|min|hours?|hrs?|days?|weeks?|months?|years?|mph|"
    "liters?|litres?|ml|pounds?|lbs?|ounces?|oz|points?|people|persons?|students?|apples?|eggs?|marbles?|"
    "percentage|percent|per cent|pct|pages?|boxes|books?|cookies?|games?|tickets?|times|ways?|numbers?|integers?|"
    "values?|solutions?|"
    "cups?|gallons?|bags?|hats?|pieces?|songs?|trees?|flowers?|dogs?|cats?|cars?"
)
_NUMBER_WORDS = {w: i for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen twenty".split())}
_NUMBER_WORDS.update({"thirty": 30, "forty": 40, "fifty": 50, "sixty": 60, "seventy": 70, "eighty": 80,
                      "ninety": 90, "hundred": 100, "thousand": 1000})


def _unwrap_text_commands(s: str) -> str:
    """\\text{...}, \\mathrm{...}, \\mbox{...}, \\textbf{...} -> their content (brace-matched)."""
    pattern = re.compile(r"\\(?:text|textbf|textit|textnormal|textrm|textsf|texttt|emph|mathrm|mathbf|mathit|mbox|"
                         r"hbox|operatorname)\s*\{")
    while True:
        match = pattern.search(s)
        if not match:
            return s
        end = _match_brace(s, match.end() - 1) or len(s) + 1
        s = s[: match.start()] + " " + s[match.end(): end - 1] + " " + s[end:]


def _number_word(s: str):
    words = s.lower().replace("-", " ").split()
    if not words or any(w not in _NUMBER_WORDS for w in words):
        return None
    total, current = 0, 0
    for w in words:
        value = _NUMBER_WORDS[w]
        if value in (100, 1000):
            current = max(current, 1) * value
            if value == 1000:
                total, current = total + current, 0
        else:
            current += value
    return str(total + current)


_SIMPLE_NUMBER = re.compile(r"-?[1-9]\d{0,15}(?:\.\d*[1-9])?|0")
_RELATIONS = ((r"\\leqslant|\\leq|<=|\\le(?![a-zA-Z])", r"\\le "), (r"\\geqslant|\\geq|>=|\\ge(?![a-zA-Z])", r"\\ge "),
              (r"\\neq|!=|\\ne(?![a-zA-Z])", r"\\ne "))
_SCALES = {"thousand": 1000, "million": 10 ** 6, "billion": 10 ** 9}


def normalize(s: str) -> str:
    """Canonical spelling of an answer: LaTeX noise, units, currency, degrees, percent and unicode removed."""
    s = s.strip()
    if _SIMPLE_NUMBER.fullmatch(s):  # most answers: nothing to remove
        return s
    s = re.sub(r"√\s*(\d+|[a-zA-Z])", r"\\sqrt{\1}", s)  # √13 is sqrt(13), not sqrt(1) times 3
    s = re.sub(r"(\d+)\s*([½⅓⅔¼¾⅕⅙⅛])", r"(\1+\2)", s)  # 2½ is two and a half, not 2 times a half
    for char, replacement in _UNICODE.items():
        s = s.replace(char, replacement)
    s = re.sub(r"\\(?:left|right|big|Big|bigg|Bigg)(?![a-zA-Z])", "", s)
    s = re.sub(r"(?<=\d),\\!\s*(?=\d{3}(?!\d))", ",", s)  # 11,\! 111,\! 100: thousands, not a list
    s = re.sub(r"(?<!\\)\\(?:displaystyle|!|,|;|:|quad|qquad| )(?![a-zA-Z])|~", " ", s)
    s = _exact_or_approximate(s)
    s = re.sub(r"\s*\{\s*,\s*\}\s*", ",", s)  # 12{,}500, 14 {, }916
    s = re.sub(r"\\[dtc]frac", r"\\frac", s)
    s = re.sub(r"\\equiv", "=", re.sub(r"\\pmod\s*\{?\s*\d+\s*\}?", " ", s))  # 24 \equiv 3 \pmod{7}
    for pattern, replacement in _RELATIONS:
        s = re.sub(pattern, replacement, s)
    s = s.replace(r"\$", "").replace("$", "").replace(r"\%", "").replace("%", "")
    s = re.sub(r"\^\s*(?:\{\s*\\circ\s*\}|\\circ)|\\circ|\\degree", "", s)
    s = re.sub(r"\\operatorname\s*\{\s*(arc(?:sin|cos|tan)|sinh|cosh|tanh|ln|log)\s*\}", r"\\\1 ", s)
    s = _unwrap_text_commands(s)
    s = re.sub(r"\\(?:mathbb|boldsymbol|bm)\s*\{([^{}]*)\}", r"\1", s)
    s = re.sub(rf"(?<![a-zA-Z\\])(?:{_UNITS})(?:\s*\^\s*(?:\{{[23]\}}|[23]))?(?![a-zA-Z])", " ", s) \
        if re.search(r"\d", s) else s  # units only follow numbers; a text answer keeps its words
    s = re.sub(r"(?<=\d)\s+[mgl](?:\s*\^\s*\{?[23]\}?)?\s*$", "", s)  # 5 m, 6 g; never the m of 2m+1
    s = re.sub(r"\(\s*\)", " ", s)  # what "18 (dollars)" leaves
    s = re.sub(r"\s+", " ", s).strip()
    s = re.sub(r"^(-?\d+(?:\.\d+)?)[eE]([-+]?\d+)$", r"\1\\times10^{\2}", s)  # 1.5e3
    s = re.sub(r"^[a-zA-Z]\s*(?:=|\\in)\s*(?=[^=]+$)(?!.*(?<![\\a-zA-Z])[a-zA-Z](?![a-zA-Z]))", "", s)  # "x = 5", not "y = 2x"
    s = re.sub(r"[.\s]+$", "", s)
    while _enclosed(s, "{", "}"):  # ${9}.$
        s = re.sub(r"[.\s]+$", "", s[1:-1].strip())
    return _number_spelling(s)


def _exact_or_approximate(s: str) -> str:
    """'a \\approx b' states b (24000 \\cdot 1.01^{30} \\approx 32348), unless b is a decimal rounding of an exact a
    (\\frac{1}{3} \\approx 0.333, \\frac{1}{6} \\approx 16.7\\%)."""
    parts = re.split(r"\\approx|≈", s)
    if len(parts) == 1:
        return s
    rounding = re.fullmatch(r"\s*-?\d*\.\d+\s*(?:\\?%)?\s*", parts[-1])
    return parts[0] if rounding and not re.fullmatch(r"\s*-?[\d.]+\s*", parts[0]) else parts[-1]


def _number_spelling(s: str) -> str:
    """Numbers spelled in words or in school notation, as a plain number or fraction: mixed numbers
    (3 1/4, 3\\frac{1}{4}), repeating decimals (0.\\overline{6}), scale words (2.5 thousand), number words."""
    mixed = re.fullmatch(r"(-?)(\d+)\s*(?:\\frac\{(\d+)\}\{(\d+)\}|\s(\d+)/(\d+))", s)
    if mixed:
        sign, whole = mixed.group(1), int(mixed.group(2))
        num, den = int(mixed.group(3) or mixed.group(5)), int(mixed.group(4) or mixed.group(6))
        if 0 < num < den:
            return f"{sign}\\frac{{{whole * den + num}}}{{{den}}}"
    repeating = re.fullmatch(r"(-?)(\d*)\.(\d*)\\overline\{?(\d{1,12})\}?", s)
    if repeating:
        sign, whole, fixed, period = repeating.groups()
        value = Fraction(int(whole or 0)) + Fraction(int(fixed or 0), 10 ** len(fixed)) + \
            Fraction(int(period), (10 ** len(period) - 1) * 10 ** len(fixed))
        return f"{sign}\\frac{{{value.numerator}}}{{{value.denominator}}}"
    scaled = re.fullmatch(r"(-?\d+(?:\.\d+)?) ?(thousand|million|billion)", s)
    if scaled:
        value = Fraction(scaled.group(1)) * _SCALES[scaled.group(2)]
        return str(value.numerator) if value.denominator == 1 else s
    word = _number_word(s)
    return word if word is not None else s


def _strip_thousands(s: str) -> str:
    """'10,080' -> '10080' only when every group after the first has exactly three digits."""
    return re.sub(r"(?<![\d.])\d{1,3}(?:,\d{3})+(?![\d])", lambda m: m.group(0).replace(",", ""), s)


_PLAIN_NUMBER = re.compile(r"^-?(?:\d+(?:\.\d*)?|\.\d+)$")
_DIGITS_AND_SPACES = re.compile(r"-?[\d,. ]+")
_PLAIN_FRACTION = re.compile(r"^(-?)\s*(?:\\frac\s*\{\s*(-?\d+)\s*\}\s*\{\s*(\d+)\s*\}|(\d+)\s*/\s*(\d+))$")


def plain_number(s: str):
    """Fraction for integers, decimals and simple fractions (the cheap path); None for anything else."""
    if _DIGITS_AND_SPACES.fullmatch(s):
        s = re.sub(r"^-\s+", "-", s.strip())  # - 1 000
        s = _strip_thousands(re.sub(r"(?<=[\d,]) (?=\d{3}(?!\d))", "", s))
    if _PLAIN_NUMBER.match(s):
        return Fraction(s)
    match = _PLAIN_FRACTION.match(s)
    if match:
        sign, num, den = match.group(1), match.group(2) or match.group(4), match.group(3) or match.group(5)
        if int(den) == 0:
            return None
        value = Fraction(int(num), int(den))
        return -value if sign else value
    return None


def round_half_up(value: Fraction, places: int) -> Fraction:
    """value at `places` decimals, halves away from zero (0.125 -> 0.13), as a gold's author rounded; Python's
    round() takes halves to even (0.12)."""
    scale = 10 ** places
    rounded = Fraction(math.floor(abs(value) * scale + Fraction(1, 2)), scale)
    return -rounded if value < 0 else rounded


def decimal_places(s: str):
    """Written precision of a plain decimal gold ('3.21' -> 2), else None."""
    match = re.fullmatch(r"-?\d*\.(\d+)", s.replace(",", ""))
    return len(match.group(1)) if match else None


# -----------------------------------------------------------------------------
# 3. parsing into sympy objects (no eval: a recursive-descent parser calling constructors)

_TOKEN = re.compile(r"\s*(\\[a-zA-Z]+|\\\{|\\\}|\d+\.\d*|\.\d+|\d+|[a-zA-Z]|[-+*/^_!(){}\[\]|,=<>'])")
_FUNCTIONS = {
    "sin": sympy.sin, "cos": sympy.cos, "tan": sympy.tan, "cot": sympy.cot, "sec": sympy.sec, "csc": sympy.csc,
    "arcsin": sympy.asin, "arccos": sympy.acos, "arctan": sympy.atan, "sinh": sympy.sinh, "cosh": sympy.cosh,
    "tanh": sympy.tanh, "ln": sympy.log, "exp": sympy.exp,
}
_INVERSES = {"sin": sympy.asin, "cos": sympy.acos, "tan": sympy.atan, "cot": sympy.acot, "sec": sympy.asec,
             "csc": sympy.acsc}
_GREEK = set("alpha beta gamma delta epsilon varepsilon zeta eta theta vartheta iota kappa lambda mu nu xi rho sigma "
             "tau upsilon phi varphi chi psi omega Gamma Delta Theta Lambda Xi Sigma Phi Psi Omega".split())
_ATOM_COMMANDS = {"frac", "sqrt", "pi", "infty", "binom", "lfloor", "lceil", "log"} | set(_FUNCTIONS) | _GREEK


def _tokenize(s: str) -> list[str]:
    tokens, position = [], 0
    s = s.strip()
    while position < len(s):
        match = _TOKEN.match(s, position)
        if not match:
            raise ParseError(f"unexpected character {s[position]!r}")
        tokens.append(match.group(1))
        position = match.end()
    return tokens


class _Parser:
    """expr := term (('+'|'-') term)* ; term := unary (('*'|'/'|implicit) factor)* ; unary := '-' unary | factor ;
    factor := postfix ('^' argument)? ; postfix := atom ('!')* ; atom := number | letter | group | command."""

    def __init__(self, text: str):
        self.tokens = _tokenize(text)
        self.position = 0
        self.depth = 0
        self.nodes = 0
        self.abs_depth = 0

    def peek(self):
        return self.tokens[self.position] if self.position < len(self.tokens) else None

    def take(self, expected=None):
        token = self.peek()
        if token is None or (expected is not None and token != expected):
            raise ParseError(f"expected {expected!r}, found {token!r}")
        self.position += 1
        return token

    def count(self):
        self.nodes += 1
        if self.nodes > MAX_NODES:
            raise ParseError("expression too large")

    def parse(self):
        value = self.expr()
        if self.peek() is not None:
            raise ParseError(f"unexpected {self.peek()!r}")
        return value

    def expr(self):
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise ParseError("expression nested too deeply")
        value = self.term()
        while self.peek() in ("+", "-"):
            op = self.take()
            right = self.term()
            self.count()
            value = sympy.Add(value, right if op == "+" else -right)
        self.depth -= 1
        return value

    def starts_atom(self, token):
        if token is None:
            return False
        if token == "|":
            return self.abs_depth == 0
        if token.startswith("\\"):
            return token[1:] in _ATOM_COMMANDS
        return token[0].isdigit() or token[0] == "." or token.isalpha() or token in ("(", "{", "[")

    def term(self):
        value = self.unary()
        while True:
            token = self.peek()
            if token in ("*", "/", r"\cdot", r"\times", r"\div"):
                self.take()
                right = self.unary()
                self.count()
                value = value * right if token != "/" and token != r"\div" else value / _nonzero(right)
            elif self.starts_atom(token):
                right = self.factor()
                self.count()
                value = value * right
            else:
                return value

    def unary(self):
        if self.peek() == "-":
            self.take()
            return -self.unary()
        if self.peek() == "+":
            self.take()
            return self.unary()
        return self.factor()

    def factor(self):
        base = self.postfix()
        if self.peek() == "^":
            self.take()
            exponent = self.argument(signed=True)
            self.count()
            return _power(base, exponent)
        return base

    def postfix(self):
        value = self.atom()
        while self.peek() == "!":
            self.take()
            if not (value.is_Integer and 0 <= value <= MAX_FACTORIAL):
                raise ParseError("factorial argument too large or not an integer")
            value = sympy.factorial(value)
        if self.peek() == "'":
            raise ParseError("derivative notation")
        return value

    def argument(self, signed=False):
        """A \\frac/\\sqrt/^ argument: a braced group, or a single digit, letter or command (\\frac43)."""
        token = self.peek()
        if token == "{":
            return self.group("{", "}")
        if signed and token == "-":
            self.take()
            return -self.argument()
        if token is not None and token[0].isdigit() and len(token) > 1 and "." not in token:
            self.tokens[self.position] = token[1:]  # split '43' into '4' and '3'
            return sympy.Integer(int(token[0]))
        return self.postfix()

    def group(self, opening, closing):
        self.take(opening)
        value = self.expr()
        self.take(closing)
        return value

    def atom(self):
        token = self.peek()
        if token is None:
            raise ParseError("unexpected end")
        if token[0].isdigit() or token[0] == ".":
            self.take()
            return sympy.Rational(Fraction(token)) if "." in token else sympy.Integer(int(token))
        if token in ("(", "{", "["):
            return self.group(token, {"(": ")", "{": "}", "[": "]"}[token])
        if token == "|":
            self.take()
            self.abs_depth += 1
            value = self.expr()
            self.abs_depth -= 1
            self.take("|")
            return sympy.Abs(value)
        if token.isalpha():
            self.take()
            return self.subscripted(token)
        if token.startswith("\\"):
            return self.command(self.take()[1:])
        raise ParseError(f"unexpected {token!r}")

    def subscripted(self, name):
        if self.peek() == "_":
            self.take()
            subscript = self.take()
            if subscript == "{":
                subscript = self.take()
                self.take("}")
            name = f"{name}_{subscript}"
        if name == "i":
            return sympy.I
        if name == "e":
            return sympy.E
        return sympy.Symbol(name)

    def command(self, name):
        if name == "frac":
            numerator = self.argument()
            return numerator / _nonzero(self.argument())
        if name == "sqrt":
            index = None
            if self.peek() == "[":
                index = self.group("[", "]")
            radicand = self.argument()
            return sympy.sqrt(radicand) if index is None else sympy.root(radicand, _small_integer(index))
        if name == "pi":
            return sympy.pi
        if name == "infty":
            return sympy.oo
        if name == "binom":
            n, k = self.argument(), self.argument()
            if not (n.is_Integer and k.is_Integer and 0 <= n <= MAX_FACTORIAL):
                raise ParseError("binomial arguments")
            return sympy.binomial(n, k)
        if name in ("lfloor", "lceil"):
            inner = self.expr()
            self.take(r"\rfloor" if name == "lfloor" else r"\rceil")
            return sympy.floor(inner) if name == "lfloor" else sympy.ceiling(inner)
        if name == "log":
            base = None
            if self.peek() == "_":
                self.take()
                base = self.argument()
            argument = self.function_argument()
            return sympy.log(argument) if base is None else sympy.log(argument, base)
        if name in _FUNCTIONS:
            power = None
            if self.peek() == "^":  # \sin^2 x
                self.take()
                power = self.argument(signed=True)
            if power == -1 and name in _INVERSES:  # \sin^{-1} x is arcsin x, not 1 / sin x
                return _INVERSES[name](self.function_argument())
            value = _FUNCTIONS[name](self.function_argument())
            return value if power is None else _power(value, power)
        if name in _GREEK:
            return self.subscripted(name)
        raise ParseError(f"unsupported command \\{name}")

    def function_argument(self):
        """(...) or {...}; else a factor and the letters after it, up to the next operator, bracket, number,
        function or power of e: \\sin 2x is sin(2x) and \\cos 2\\theta is cos(2 theta), while \\sin x \\cos x is
        sin(x) cos(x), \\cos x e^{\\sin x} is cos(x) e^(sin x) and \\ln 2 \\, 2^x is ln(2) 2^x."""
        if self.peek() in ("(", "{"):
            return self.atom()
        value = self.factor()
        while self.continues_the_argument():
            value = value * self.factor()
            self.count()
        return value

    def continues_the_argument(self):
        token = self.peek()
        if token is None or (token == "e" and self.tokens[self.position + 1: self.position + 2] == ["^"]):
            return False
        return token.isalpha() or token[1:] == "pi" or token[1:] in _GREEK


def _nonzero(value):
    if value == 0:
        raise ParseError("division by zero")
    return value


def _small_integer(value):
    if not (value.is_Integer and 1 <= value <= 100):
        raise ParseError("root index")
    return int(value)


def _power(base, exponent):
    """Pow with limits checked before sympy evaluates it: 9^{9^{9^9}} is refused, not computed."""
    if exponent.is_number and not exponent.is_finite:
        raise ParseError("infinite exponent")
    if exponent.is_Rational:
        total = exponent * base.exp if isinstance(base, sympy.Pow) and base.exp.is_Rational else exponent
        if abs(exponent) > 10_000 or abs(total) > 10_000:  # (x^{9999})^{9999} is x^{99980001}
            raise ParseError("exponent too large")
        if base.is_number and base.is_Rational and base not in (0, 1, -1):
            digits = abs(float(exponent)) * max(math.log10(abs(base.p)) + 1, math.log10(base.q) + 1)
            if digits > MAX_RESULT_DIGITS:
                raise ParseError("power too large")
    elif exponent.is_number:
        magnitude = abs(complex(exponent.evalf(15)))
        if magnitude > 10_000:
            raise ParseError("exponent too large")
    return sympy.Pow(base, exponent)


def parse_expression(s: str):
    if len(s) > MAX_ANSWER_CHARS:
        raise ParseError("answer too long")
    return _Parser(s).parse()


def _split_top_level(s: str, separator: str) -> list[str]:
    parts, depth, current, i = [], 0, [], 0
    while i < len(s):
        if s.startswith(separator, i) and depth == 0:
            parts.append("".join(current))
            current = []
            i += len(separator)
            continue
        char = s[i]
        if char in "([{":
            depth += 1
        elif char in ")]}":
            depth -= 1
        current.append(char)
        i += 1
    parts.append("".join(current))
    return [p.strip() for p in parts]


def _enclosed(s: str, opening: str, closing: str) -> bool:
    """True when s is one bracketed unit: the first bracket closes at the very end."""
    if not (s.startswith(opening) and s.endswith(closing)):
        return False
    depth = 0
    for i, char in enumerate(s):
        depth += char in "([{"
        depth -= char in ")]}"
        if depth == 0 and len(opening) <= i < len(s) - 1:
            return False
    return True


def parse_answer(s: str):
    """Structured value of a normalised answer:
    ("expr", e) | ("tuple", [v]) | ("interval", lo, hi, lo_closed, hi_closed) | ("union", [intervals]) |
    ("set", [v]) | ("matrix", [[e]]) | ("equation", e) | ("text", s)."""
    s = s.strip()
    if not s:
        raise ParseError("empty")
    if len(s) > MAX_ANSWER_CHARS:
        raise ParseError("answer too long")
    matrix = re.fullmatch(r"[(\[]?\s*\\begin\{(?:[pbvBV]?matrix|array)\}(?:\{[lcr|]*\})?(.*)"
                          r"\\end\{(?:[pbvBV]?matrix|array)\}\s*[)\]]?", s, re.S)
    if matrix:
        rows = [r for r in re.split(r"\\\\", matrix.group(1)) if r.strip()]
        return ("matrix", [[parse_expression(_strip_thousands(c)) for c in row.split("&")] for row in rows])
    set_builder = re.fullmatch(r"\\\{\s*([a-zA-Z])\s*(?:\\mid|:|\|)(.*(?:<|>|\\le|\\ge).*)\\\}", s)
    if set_builder:  # {x | x <= 6} is the interval (-oo, 6]
        return parse_answer(set_builder.group(2))
    if _enclosed(s, r"\{", r"\}"):
        return ("set", [parse_answer(p) for p in _split_top_level(s[2:-2], ",")])
    for opening in "([":
        for closing in ")]":
            if _enclosed(s, opening, closing):
                inner = _split_top_level(s[1:-1], ",")
                if len(inner) == 2:
                    return ("interval", parse_expression(inner[0]), parse_expression(inner[1]),
                            opening == "[", closing == "]")
                if len(inner) > 2 and opening == "(" and closing == ")":
                    return ("tuple", [parse_answer(p) for p in inner])
    if r"\cup" in s:
        parts = _split_top_level(s, r"\cup")
        return ("union", [parse_answer(p) for p in parts])
    grouped = _strip_thousands(s)
    items = _split_top_level(grouped, ",")
    if len(items) > 1:
        return ("set", [parse_answer(p) for p in items])
    if r"\pm" in s and s.count(r"\pm") == 1:
        return ("set", [parse_answer(s.replace(r"\pm", sign)) for sign in "+-"], "pm")
    comparison = _inequality(grouped)
    if comparison:
        return comparison
    sides = _split_top_level(grouped, "=")
    if len(sides) == 2:
        return ("equation", parse_expression(sides[0]) - parse_expression(sides[1]))
    if len(sides) > 2:
        raise ParseError("several equals signs")
    if re.fullmatch(r"[A-Za-z][A-Za-z ]*[A-Za-z]|\(?[A-Ea-e]\)?", grouped):
        return ("text", grouped.lower().strip("()"))
    base = re.fullmatch(r"(\d+)_\{?(\d+)\}?", grouped)  # 52_8: compare the digits as written
    if base:
        return ("expr", sympy.Integer(int(base.group(1))))
    return ("expr", parse_expression(grouped))


_COMPARATORS = {"<": "<", ">": ">", r"\lt": "<", r"\gt": ">", r"\le": "<=", r"\leq": "<=", r"\ge": ">=",
                r"\geq": ">="}


def _inequality(s: str):
    """'x > 3' -> (3, oo); '-2 \\le x \\le 7' -> [-2, 7]; other comparisons are not answers we grade."""
    parts = re.split(r"(\\leq|\\geq|\\le|\\ge|\\lt|\\gt|<|>)", s)
    if len(parts) == 1:
        return None
    values = [p.strip() for p in parts[0::2]]
    ops = [_COMPARATORS[o] for o in parts[1::2]]
    if len(values) == 2 and re.fullmatch(r"-\s*[a-zA-Z]", values[0]):  # -x > -3 is x < 3
        values = [values[0][1:].strip(), f"-({values[1]})"]
        ops = [{"<": ">", ">": "<", "<=": ">=", ">=": "<="}[ops[0]]]
    variable = [i for i, v in enumerate(values) if re.fullmatch(r"[a-zA-Z]", v)]
    if len(variable) != 1:
        raise ParseError("inequality without one variable")
    if len(values) == 2:
        bound = parse_expression(values[1 - variable[0]])
        op = ops[0] if variable[0] == 0 else {"<": ">", ">": "<", "<=": ">=", ">=": "<="}[ops[0]]
        if op.startswith("<"):
            return ("interval", -sympy.oo, bound, False, op == "<=")
        return ("interval", bound, sympy.oo, op == ">=", False)
    if len(values) == 3 and variable[0] == 1 and ops[0][0] == ops[1][0] == "<":
        return ("interval", parse_expression(values[0]), parse_expression(values[2]), ops[0] == "<=", ops[1] == "<=")
    raise ParseError("unsupported inequality")


# -----------------------------------------------------------------------------
# 4. equivalence

# Each variable gets its own irregular value at each of three probe points. Values that are affine in the
# variable's index would make 6x - 7y + z constant (its coefficients and their index moments sum to zero), so that
# 6x - 7y + z = 25 would pass for 6x - 7y + z = 24; these are fixed draws, so a verdict never depends on the run.
_PROBE_VALUES = tuple(tuple(sympy.Rational(value, 97) for value in row) for row in (
    (36, 119, -58, 211, 17, -143, 88, 265, -29, 154, 63, -190),
    (121, -77, 240, 9, -166, 95, 187, -41, 278, 52, -118, 131),
    (-263, 44, 158, -101, 226, 71, -15, 199, 107, -232, 13, 81)))


def _probe_substitutions(symbols):
    """One {symbol: value} per probe point; symbols in a fixed (name) order."""
    ordered = sorted(symbols, key=str)
    return [{s: row[k % len(row)] + k // len(row) for k, s in enumerate(ordered)} for row in _PROBE_VALUES]


def _numeric(expression, substitution):
    value = complex(expression.subs(substitution).evalf(30)) if substitution else complex(expression.evalf(30))
    return value


def _close(a: complex, b: complex) -> bool:
    """Relative closeness of two finite numbers. A value that overflowed to inf (pi^9999) or nan is close to
    nothing, itself included: the numeric shortcut may never accept what exact comparison would reject."""
    if not (cmath.isfinite(a) and cmath.isfinite(b)):
        return False
    return abs(a - b) <= 1e-12 * max(1.0, abs(a), abs(b))


def expressions_equal(answer, gold, gold_places=None) -> bool:
    if answer == gold:
        return True
    if answer.has(sympy.oo, -sympy.oo, sympy.zoo) or gold.has(sympy.oo, -sympy.oo, sympy.zoo):
        return False
    symbols = answer.free_symbols | gold.free_symbols
    if not symbols:
        if answer.is_Rational and gold.is_Rational:
            if gold_places is None:
                return False  # exact numbers: no tolerance
            return round_half_up(Fraction(answer.p, answer.q), gold_places) == Fraction(gold.p, gold.q)
        try:
            a, g = _numeric(answer, None), _numeric(gold, None)
        except (TypeError, ValueError):
            return False
        if gold_places is not None and abs(a.imag) < 1e-12:
            return round_half_up(Fraction(a.real), gold_places) == round_half_up(Fraction(g.real), gold_places)
        if not gold.is_Rational and answer.is_Rational:
            return False  # a decimal approximation of an exact irrational answer is not the answer
        return _close(a, g)
    # equal values at three fixed irregular points decide it; sympy's simplify (slow) is only for expressions
    # that cannot be evaluated there
    evaluated = 0
    for substitution in _probe_substitutions(symbols):
        try:
            if not _close(_numeric(answer, substitution), _numeric(gold, substitution)):
                return False
            evaluated += 1
        except (TypeError, ValueError, ZeroDivisionError):
            continue
    return evaluated == len(_PROBE_VALUES) or sympy.simplify(answer - gold) == 0


def _equations_equal(answer, gold) -> bool:
    """Equal up to a non-zero constant factor: 2x + 2y = 2 is x + y = 1."""
    ratio = None
    for substitution in _probe_substitutions(answer.free_symbols | gold.free_symbols):
        a, g = _numeric(answer, substitution), _numeric(gold, substitution)
        if abs(g) < 1e-12:
            if abs(a) > 1e-12:
                return False
            continue
        if ratio is None:
            ratio = a / g
            if abs(ratio) < 1e-12:
                return False
        elif not _close(a, ratio * g):
            return False
    return ratio is not None


def _as_tuple(value):
    """A matrix of one column or one row read as the tuple it writes (a vector answer given as (1, 2, 3))."""
    if value[0] == "matrix" and (len(value[1]) == 1 or all(len(row) == 1 for row in value[1])):
        return ("tuple", [("expr", e) for row in value[1] for e in row])
    return value


def values_equal(answer, gold, gold_places=None) -> bool:
    if {answer[0], gold[0]} == {"matrix", "tuple"}:
        answer, gold = _as_tuple(answer), _as_tuple(gold)
    kind = gold[0]
    if answer[0] == "expr" and kind == "equation" or answer[0] == "equation" and kind == "expr":
        return False
    if kind in ("set", "union") and answer[0] == kind:  # (3, oo) U (-oo, -2) is the gold's set in another order
        if len(answer[1]) != len(gold[1]):
            return False
        remaining = list(answer[1])
        for item in gold[1]:
            match = next((i for i, a in enumerate(remaining) if values_equal(a, item)), None)
            if match is None:
                return False
            remaining.pop(match)
        return True
    if answer[0] != kind:
        if kind == "tuple" and answer[0] == "set":  # 6, -1, 31 for (6, 31, -1): the order still counts
            return values_equal(("tuple", answer[1]), gold)
        if kind == "set" and answer[0] == "tuple":
            return values_equal(("set", answer[1]), gold)
        return False
    if kind == "expr":
        return expressions_equal(answer[1], gold[1], gold_places)
    if kind == "text":
        return answer[1] == gold[1]
    if kind == "equation":
        return _equations_equal(answer[1], gold[1])
    if kind == "interval":
        return answer[3:] == gold[3:] and expressions_equal(answer[1], gold[1]) and \
            expressions_equal(answer[2], gold[2])
    if kind == "tuple":
        return len(answer[1]) == len(gold[1]) and all(values_equal(a, g) for a, g in zip(answer[1], gold[1]))
    if kind == "matrix":
        shape = lambda m: [len(row) for row in m]
        return shape(answer[1]) == shape(gold[1]) and all(
            expressions_equal(a, g) for ra, rg in zip(answer[1], gold[1]) for a, g in zip(ra, rg))
    return False


# -----------------------------------------------------------------------------
# 5. grading


@lru_cache(maxsize=4096)
def normalize_gold(gold: str) -> str:
    """normalize, and the ways a gold lists values: "6 \\text{ and } 8", "19, 46, and 82", "-12; -11" (a European
    gold's list, its tuples too: "(0; -2)"), and a named tuple "(p, q) = (3, 2)" is its value."""
    gold = normalize(_gold_text(gold))
    thousands = re.search(r"(?:\band|;)\s*\d{3}(?![\d.])", gold)  # "6 and 100" would read as 6, 100: as 6,100
    if not thousands and re.fullmatch(r"[^a-zA-Z]+(?:,? and [^a-zA-Z]+)+", re.sub(r"\\[a-zA-Z]+", "", gold)):
        gold = re.sub(r",? and ", ", ", gold)
    if not thousands and ";" in gold and "=" not in gold:
        gold = re.sub(r"\s*;\s*", ", ", gold)
    return re.sub(r"^\((?:[a-zA-Z]\s*,\s*)+[a-zA-Z]\)\s*=\s*(?=\()", "", gold)


def _gold_text(gold: str) -> str:
    """The answer part of a gold: after a GSM8K solution's '####', a MATH solution's last box, else all of it."""
    gold = str(gold)
    if "####" in gold:
        gold = gold.split("####")[-1]
    if r"\boxed" in gold:
        gold = (boxed_answers(gold) or [gold])[-1]
    return gold


def _hedge_reason(answer: str, gold: str) -> str | None:
    """'x or y' and '±' offer alternatives, which is wrong unless the gold itself holds several values."""
    if _several_values(gold) or r"\cup" in gold:
        return None
    if re.search(r"(?<![a-zA-Z])or(?![a-zA-Z])", answer) and not re.search(r"(?<![a-zA-Z])or(?![a-zA-Z])", gold):
        return "hedged with 'or'"
    if r"\pm" in answer and r"\pm" not in gold:
        return "± where the gold has none"
    return None


def _several_values(gold: str) -> bool:
    """A gold that lists values (a solution set, a tuple, 'x, y'), as opposed to one value."""
    return len(_split_top_level(_strip_thousands(gold), ",")) > 1 or gold.startswith((r"\{", r"\pm"))


def _fit_to_gold(answer: str, gold: str) -> str:
    """Rewrites of the (normalised) answer that depend on what the gold is:
    - a gold with several values accepts them joined by 'and' / 'or' or in separate boxes, labelled or not
      ('x = 1 or x = 2', 'a=3, b=8'), and '2 \\pm \\sqrt{7}' for its two values;
    - a union of intervals accepts its inequalities joined by 'or';
    - otherwise each boxed answer is fitted on its own (_fit_one_value)."""
    if answer == gold:
        return answer
    if not _several_values(gold):
        if r"\cup" in gold:
            answer = re.sub(r"\s+or\s+", r" \\cup ", answer)
        return " ; ".join(_fit_one_value(part, gold) for part in answer.split(" ; "))
    answer = re.sub(r"\s*;\s*|\s+(?:and|or)\s+|\s*,\s*(?:and|or)\s+", ", ", answer)
    answer = _right_hand_side(answer, gold)
    items = _split_top_level(answer, ",")
    gold_labels = [re.match(_LABEL, item) for item in _split_top_level(gold, ",")]
    if all(gold_labels):  # "k = 45, n = 2": labelled answers compare as equations, unlabelled ones in the gold's order
        if len(items) == len(gold_labels) and not any("=" in item for item in items):
            return ", ".join(label.group() + item for label, item in zip(gold_labels, items))
        return ", ".join(items)
    answer = ", ".join(re.sub(_LABEL, "", item) for item in items)
    if r"\pm" not in gold and answer.count(r"\pm") == 1 and "," not in answer:
        left, right = answer.split(r"\pm")
        answer = f"{left}+{right}, {left}-{right}"
    return answer


def _fit_one_value(answer: str, gold: str) -> str:
    """A single-value gold: labelled values for a point; a restated quantity states its right-hand side; a gold
    that defines a name ('f(x) = 3x', 'y = 2x + 1') accepts its right-hand side alone and another variable name;
    a number gold reads its own spellings (below)."""
    answer = _right_hand_side(_labelled_point(answer, gold), gold)
    defined = re.fullmatch(_DEFINED_NAME + r"\s*=(.+)", gold)
    if defined and "=" not in answer:
        answer = f"{defined.group(1)} = {answer}"
    elif defined:
        answer = _rename_variable(answer, gold)
    return _number_for_number(answer) if plain_number(gold) is not None else answer


def _labelled_point(answer: str, gold: str) -> str:
    """'y = 3, x = 5' for the point (5, 3): the values in the order of their labels (x before y, a before b)."""
    items = _split_top_level(re.sub(r"\s+and\s+", ", ", answer), ",")
    if not (_enclosed(gold, "(", ")") and len(items) > 1 and all(re.match(_LABEL, item) for item in items)):
        return answer
    return "(" + ", ".join(re.sub(_LABEL, "", item) for item in sorted(items)) + ")"


def _number_for_number(answer: str) -> str:
    """For a number gold: '2,5' is a decimal comma (a comma before other than three digits), and an AMC answer
    '(C) 12' is its value."""
    answer = re.sub(r"^\(?[A-E]\)\s+(?=[-\d.])", "", answer)
    return re.sub(r"^(-?\d+),(\d{1,2}|\d{4,})$", r"\1.\2", answer)


_LABEL = r"^[a-zA-Z](?:_\{?\w+\}?)?\s*=\s*"  # "a = " in "a = 3, b = 8"
# the left-hand side that names what an answer defines: y, f(x), f^{-1}(x), g_1(t)
_DEFINED_NAME = r"([a-zA-Z](?:_\{?\w+\}?)?(?:\^\{?-1\}?)?(?:\(([a-zA-Z])\))?)"
_LETTER = r"(?<![\\a-zA-Z]){}(?![a-zA-Z])"


def _rename_variable(answer: str, gold: str) -> str:
    """f(t) = 3t for the gold f(x) = 3x, and f^{-1}(y) = y/3 for the gold x/3: the answer's declared variable
    renamed to the gold's only variable (when the answer does not use that letter already)."""
    declared = re.match(_DEFINED_NAME + r"\s*=", answer)
    if not declared or not declared.group(2):
        return answer
    gold_letters = set(re.findall(_LETTER.format("([a-zA-Z])"), gold.split("=")[-1])) - {"e", "i"}
    ours = declared.group(2)
    if len(gold_letters) != 1 or ours in gold_letters:
        return answer
    theirs = gold_letters.pop()
    if re.search(_LETTER.format(theirs), answer):
        return answer
    return re.sub(_LETTER.format(ours), theirs, answer)


def _right_hand_side(answer: str, gold: str) -> str:
    """'a+b = 61', 'k = 9', '(m, n) = (2, 9)', 'f^{-1}(y) = y/3' state their last side when the gold is a value,
    not an equation or a relation."""
    if "=" in gold or re.search(r"\\[lgn]e|<|>", gold):
        return answer
    sides = _split_top_level(_rename_variable(answer, gold), "=")
    if len(sides) < 2 or len(_split_top_level(answer, ",")) > 1:
        return answer
    *left, last = sides
    if any(re.search(r"(?:\d|\band|\bor)\s+[a-zA-Z]$", side) for side in left[1:]):
        return answer  # 'x = 2 \quad x = 7' (normalised to 'x = 2 x = 7'): two statements, not one chain
    value = lambda side: plain_number(normalize(side))
    if any(value(side) is not None and value(side) != value(last) for side in left):
        return answer  # '3 = 4' and '7 = 3 + 5' are no statement of 4 or of 8
    return normalize(last)  # the side may hold what normalising the whole could not reach: {(-2, 1)}


def cheap_grade(answer: str, gold: str, gold_is_percent: bool = False, answer_is_percent: bool = False):
    """Decides exact strings, integers, decimals and simple fractions without sympy; None when it cannot. A
    percentage (24\\%) also equals its value as a fraction (0.24) on either side, as Qwen2.5-Math's grader has it."""
    if answer == gold:
        return Verdict("correct", answer, "identical after normalisation")
    if " ; " in answer:
        return None
    a, g = plain_number(answer), plain_number(gold)
    if g is None:
        return None
    if a is None:  # digits that are no number ("3 4", "1.2.3") are wrong here: sympy would read "3 4" as 12
        return Verdict("incorrect", answer, "not one number") if _DIGITS_AND_SPACES.fullmatch(answer) else None
    if a == g:
        return Verdict("correct", answer, "equal numbers")
    if gold_is_percent != answer_is_percent and (a == g / 100 if gold_is_percent else a / 100 == g):
        return Verdict("correct", answer, "a percentage and its fraction")
    # a decimal gold is a value rounded at its places: an answer that rounds to it there is right, a more precise
    # decimal or an exact fraction alike, as on the sympy path (a coarser decimal rounds to itself: never to the gold)
    places = decimal_places(gold)
    if places is not None and round_half_up(a, places) == g:
        return Verdict("correct", answer, f"equal at the gold's {places} decimal places")
    return Verdict("incorrect", answer, "different number")


@lru_cache(maxsize=4096)
def _parsed_gold(gold: str):
    return parse_answer(gold)


def symbolic_grade(answer: str, gold: str) -> Verdict:
    """The sympy path (run inside a worker process when called through verify_batch)."""
    if " ; " in answer:  # several boxed answers: right only if every one of them is
        verdicts = [symbolic_grade(part, gold) for part in answer.split(" ; ")]
        if all(v.correct for v in verdicts):
            return Verdict("correct", answer, "every boxed answer is equivalent")
        return Verdict("incorrect", answer, "several different boxed answers")
    try:
        gold_value = _parsed_gold(gold)
    except (ParseError, TypeError, ValueError, ZeroDivisionError, RecursionError, AttributeError) as error:
        return Verdict("correct", answer, "same text") if answer.lower() == gold.lower() else \
            Verdict("unparseable", answer, f"gold not parseable: {error}")
    try:
        answer_value = parse_answer(answer)
    except (ParseError, TypeError, ValueError, ZeroDivisionError, RecursionError, AttributeError) as error:
        return Verdict("unparseable", answer, f"answer not parseable: {error}")
    if answer_value[0] == "set" and gold_value[0] not in ("set", "tuple", "interval"):
        return Verdict("incorrect", answer, "a list of answers for a single gold")
    try:
        equal = values_equal(answer_value, gold_value, decimal_places(gold))
    except (TypeError, ValueError, ZeroDivisionError, RecursionError, AttributeError, OverflowError) as error:
        return Verdict("incorrect", answer, f"comparison failed: {type(error).__name__}")
    return Verdict("correct" if equal else "incorrect", answer, "equivalent" if equal else "not equivalent")


def _prepare(completion: str, gold: str):
    """Extraction and the cheap checks, in the caller: returns a Verdict, or (answer, gold) for the sympy path."""
    if not isinstance(gold, str) or not normalize_gold(gold):
        raise ValueError(f"gold answer must be a non-empty string, got {gold!r}")
    gold_is_percent, gold = "%" in _gold_text(gold), normalize_gold(gold)
    raw = extract_answer(completion)
    if raw is None:
        return Verdict("no_answer", None, "no final answer found")
    if " ; " in raw and not _several_values(gold) and r"\cup" not in gold:  # several boxes: steps, then a statement?
        raw = _stated_after_boxes(completion) or raw
    if len(raw) > MAX_ANSWER_CHARS:
        return Verdict("unparseable", raw[:80], "answer too long")
    answer = " ; ".join(normalize(part) for part in raw.split(" ; "))
    hedge = _hedge_reason(answer, gold)  # before the rewrites below, which could hide 'x = 2 or x = 7'
    if hedge:
        return Verdict("incorrect", raw, hedge)
    answer = _fit_to_gold(answer, gold)
    if not answer.replace(";", "").strip():
        return Verdict("no_answer", raw, "the answer is empty")
    verdict = cheap_grade(answer, gold, gold_is_percent, "%" in raw)
    if verdict is not None:
        verdict.answer = raw
        return verdict
    return (raw, answer, gold)


def grade(completion: str, gold: str, timeout: float | None = 1.0) -> Verdict:
    """One item. The sympy path runs in the shared worker pool with a deadline; timeout=None runs it here."""
    if timeout is None:
        prepared = _prepare(completion, gold)
        if isinstance(prepared, Verdict):
            return prepared
        raw, answer, gold = prepared
        verdict = symbolic_grade(answer, gold)
        verdict.answer = raw
        return verdict
    return verify_batch([(completion, gold)], timeout=timeout)[0]


def verify(completion: str, gold: str) -> bool:
    return grade(completion, gold).correct


# -----------------------------------------------------------------------------
# 6. the worker pool: wall-clock deadlines enforced by the parent


class WorkerPool:
    """Pre-started `python verifier.py --worker` processes speaking JSON lines over pipes. Not multiprocessing:
    a worker never re-imports the training script (and torch), and killing one cannot corrupt a shared queue."""

    def __init__(self, workers: int):
        self.size = workers
        self.lock = threading.Lock()  # one batch at a time per pool; callers from any thread queue here
        self.processes = [self._launch() for _ in range(workers)]
        for process in self.processes:
            self._wait_ready(process)

    @staticmethod
    def _launch():
        return subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker"], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, bufsize=0)

    @staticmethod
    def _wait_ready(process):
        """Deadlines start once sympy is imported, so a fresh worker's start-up never times an item out."""
        if process.stdout.readline() != b"ready\n":
            raise RuntimeError("verifier worker failed to start")

    def _start(self):
        process = self._launch()
        self._wait_ready(process)
        return process

    def _replace(self, index):
        self.processes[index].kill()
        self.processes[index].wait()
        self.processes[index] = self._start()

    def run(self, jobs: list[tuple[str, str]], timeout: float) -> list[Verdict]:
        """jobs: (normalised answer, normalised gold). Each gets `timeout` seconds of wall clock once started."""
        with self.lock:
            results = [None] * len(jobs)
            pending = list(range(len(jobs)))[::-1]
            busy = {}  # worker index -> (job index, deadline, buffer)
            while pending or busy:
                for w in range(self.size):
                    if w not in busy and pending:
                        job = pending.pop()
                        line = json.dumps({"answer": jobs[job][0], "gold": jobs[job][1]}) + "\n"
                        try:
                            self.processes[w].stdin.write(line.encode())
                        except (BrokenPipeError, OSError):
                            self._replace(w)
                            self.processes[w].stdin.write(line.encode())
                        busy[w] = (job, time.monotonic() + timeout, b"")
                wait = max(0.0, min(deadline for _, deadline, _ in busy.values()) - time.monotonic())
                fds = {self.processes[w].stdout.fileno(): w for w in busy}
                ready, _, _ = select.select(list(fds), [], [], wait)
                for fd in ready:
                    w = fds[fd]
                    job, deadline, buffer = busy[w]
                    chunk = os.read(fd, 65536)
                    if not chunk:  # the worker died (out of memory, say): the item cannot be judged
                        results[job] = Verdict("timeout", None, "worker died")
                        del busy[w]
                        self._replace(w)
                        continue
                    buffer += chunk
                    if buffer.endswith(b"\n"):
                        results[job] = Verdict(**json.loads(buffer))
                        del busy[w]
                    else:
                        busy[w] = (job, deadline, buffer)
                now = time.monotonic()
                for w, (job, deadline, _) in list(busy.items()):
                    if now >= deadline:
                        results[job] = Verdict("timeout", None, f"no decision within {timeout:.1f}s")
                        del busy[w]
                        self._replace(w)
            return results

    def close(self):
        for process in self.processes:
            process.kill()
            process.wait()


_pools: dict[int, WorkerPool] = {}
_pools_lock = threading.Lock()


def get_pool(workers: int | None = None) -> WorkerPool:
    workers = workers or min(4, os.cpu_count() or 1)
    with _pools_lock:
        if workers not in _pools:
            _pools[workers] = WorkerPool(workers)
        return _pools[workers]


def verify_batch(pairs, workers=None, timeout=1.0) -> list[Verdict]:
    """Grades (completion, gold) pairs; identical (answer, gold) pairs are decided once."""
    verdicts = [None] * len(pairs)
    symbolic_jobs = {}  # (answer, gold) -> indices
    raw_answers = {}
    for i, (completion, gold) in enumerate(pairs):
        prepared = _prepare(completion, gold)
        if isinstance(prepared, Verdict):
            verdicts[i] = prepared
        else:
            raw, answer, normalized_gold = prepared
            symbolic_jobs.setdefault((answer, normalized_gold), []).append(i)
            raw_answers[i] = raw
    if symbolic_jobs:
        keys = list(symbolic_jobs)
        for key, verdict in zip(keys, get_pool(workers).run(keys, timeout)):
            for i in symbolic_jobs[key]:
                verdicts[i] = Verdict(verdict.status, raw_answers[i], verdict.reason)
    return verdicts


def _worker_loop():
    sys.setrecursionlimit(10_000)
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    for line in sys.stdin:
        request = json.loads(line)
        try:
            verdict = symbolic_grade(request["answer"], request["gold"])
        except Exception as error:  # a sympy bug on odd input must not kill the worker
            verdict = Verdict("incorrect", request["answer"], f"error: {type(error).__name__}")
        sys.stdout.write(json.dumps(verdict.__dict__) + "\n")
        sys.stdout.flush()


# -----------------------------------------------------------------------------
# 7. rewards (tasks.py scores through verify_batch and format_reward; math_reward is the one-completion form)


def math_reward(completion: str, gold: str) -> float:
    return 1.0 if verify(completion, gold) else 0.0


def format_reward(completion: str) -> float:
    """1.0 for the r1 layout: an optional <think> (the template may have opened it), reasoning, exactly one
    </think>, then an answer with a \\boxed{}. Otherwise 0.0."""
    if completion.count("</think>") != 1 or completion.count("<think>") > 1:
        return 0.0
    thinking, answer = completion.split("</think>")
    if "<think>" in thinking and not thinking.lstrip().startswith("<think>"):
        return 0.0
    return 1.0 if boxed_answers(answer) and thinking.replace("<think>", "").strip() else 0.0


if __name__ == "__main__" and sys.argv[1:] == ["--worker"]:
    _worker_loop()
