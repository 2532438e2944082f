# python -m pytest tests/test_verifier.py -q
import json
import os
import random
import re
import threading
import time

import pytest

from conftest import ROOT, SHARED, requires_shared
from verifier import extract_answer, format_reward, grade, math_reward, normalize_gold, verify_batch
from verifier_cases import CASES


def test_there_are_at_least_300_cases_each_with_a_reason():
    assert len(CASES) >= 300
    assert all(len(case) == 4 and case[3] for case in CASES)


@pytest.fixture(scope="module")
def verdicts(tmp_path_factory):
    canary_dir = tmp_path_factory.mktemp("canary")
    cwd = os.getcwd()
    os.chdir(canary_dir)  # an executed 'touch CANARY' would create the file here
    try:
        start = time.monotonic()
        results = verify_batch([(completion, gold) for completion, gold, _, _ in CASES], timeout=2.0)
        elapsed = time.monotonic() - start
    finally:
        os.chdir(cwd)
    assert not os.path.exists(canary_dir / "CANARY"), "model output was executed"
    return results, elapsed


@pytest.mark.parametrize("index", range(len(CASES)), ids=[c[3] for c in CASES])
def test_case(verdicts, index):
    completion, gold, expected, why = CASES[index]
    verdict = verdicts[0][index]
    assert verdict.status != "timeout", why
    assert verdict.correct == expected, f"{why}: {verdict}"


def test_whole_table_within_deadline(verdicts):
    assert verdicts[1] < 2.0 * len(CASES) / 2  # every item well inside its 2 s budget


def test_grade_statuses():
    assert grade("no numbers", "5").status == "no_answer"
    assert grade("<think>still thinking", "5").status == "no_answer"
    assert grade("\\boxed{@@@}", "5").status == "unparseable"
    assert grade("\\boxed{5}", "5").status == "correct"
    verdict = grade("\\boxed{6}", "5")
    assert verdict.status == "incorrect" and verdict.answer == "6" and verdict.reason


def test_stuck_item_times_out_and_the_pool_recovers():
    # forty sines evaluated at 30 digits take the worker ~10 ms: far past a 2 ms deadline
    sines = "+".join(f"\\sin({k}x)" for k in range(1, 40))
    verdicts = verify_batch([(f"\\boxed{{{sines}}}", sines + "+0"), ("\\boxed{5}", "5")], timeout=0.002)
    assert verdicts[0].status == "timeout" and verdicts[1].correct
    assert verify_batch([("\\boxed{\\frac{\\sqrt{8}}{2}}", "\\sqrt{2}")])[0].correct


def test_verify_batch_from_several_threads():
    results = {}

    def work(k):
        results[k] = verify_batch([(f"\\boxed{{\\frac{{{2 * k}}}{{2}}}}", str(k)), ("\\boxed{x+1}", "1+x")])

    threads = [threading.Thread(target=work, args=(k,)) for k in range(1, 6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(v.correct for k in results for v in results[k])


def test_extract_answer():
    assert extract_answer("<think>a</think> so \\boxed{\\frac{1}{2}}") == "\\frac{1}{2}"
    assert extract_answer("#### 1,234") == "1,234"
    assert extract_answer("<think>no end") is None
    assert extract_answer("x" * 10_000_000 + "\\boxed{3}") == "3"


def test_rewards():
    assert math_reward("<think>a</think>\\boxed{3}", "3") == 1.0
    assert math_reward("<think>a</think>\\boxed{4}", "3") == 0.0
    assert format_reward("<think>\nreason\n</think>\n\n\\boxed{3}") == 1.0
    assert format_reward("reason\n</think>\n\n\\boxed{3}") == 1.0  # the template opened the think block
    assert format_reward("<think>\nreason\n</think>\n\n3") == 0.0
    assert format_reward("\\boxed{3}") == 0.0
    assert format_reward("<think>a</think><think>b</think>\\boxed{3}") == 0.0
    assert format_reward("<think></think>\\boxed{3}") == 0.0


def test_verifier_never_calls_eval_or_sympify():
    with open(os.path.join(ROOT, "verifier.py")) as f:
        source = f.read()
    assert not re.search(r"\b(eval|exec|sympify|parse_expr|parse_latex|S)\s*\(", source)
    assert "import torch" not in source


@requires_shared("data", "math500")
def test_math500_reference_solutions_verify_and_perturbed_answers_do_not():
    rows = [json.loads(line) for line in open(os.path.join(SHARED, "data", "math500", "test.jsonl"))]
    verdicts = verify_batch([(r["solution"], r["answer"]) for r in rows], timeout=2.0)
    assert [r["unique_id"] for r, v in zip(rows, verdicts) if not v.correct] == []
    integers = [r for r in rows if re.fullmatch(r"\d+", r["answer"])]
    perturbed = verify_batch([(f"\\boxed{{{int(r['answer']) + 1}}}", r["answer"]) for r in integers])
    assert not any(v.correct for v in perturbed)
    neighbours = [(r["answer"], rows[(i + 1) % len(rows)]["answer"]) for i, r in enumerate(rows)]
    swapped = verify_batch([(f"\\boxed{{{a}}}", b) for a, b in neighbours
                            if normalize_gold(a) != normalize_gold(b)],  # '5' and 'x=5' are rightly equal
                           timeout=2.0)
    assert sum(v.correct for v in swapped) == 0


@requires_shared("data", "gsm8k")
def test_gsm8k_reference_solutions_verify_and_perturbed_answers_do_not():
    rows = [json.loads(line) for line in open(os.path.join(SHARED, "data", "gsm8k", "test.jsonl"))]
    golds = [r["answer"].split("####")[-1].strip() for r in rows]
    assert all(v.correct for v in verify_batch([(r["answer"], g) for r, g in zip(rows, golds)]))
    rng = random.Random(0)
    perturbed = [(f"#### {int(g.replace(',', '')) + rng.choice([-10, -1, 1, 10])}", g) for g in golds]
    assert not any(v.correct for v in verify_batch(perturbed))
