# python -m pytest tests/test_eval.py -q
import itertools
import json
import math
import os
import random
import re
import shutil
import sys
import types

import pytest

import eval as evaluation
import tasks
from conftest import SHARED, requires_shared
from eval import DEEPSEEK_V3, combined_score
from tasks import DemoTask, build_demo_model, get_task, majority_vote, pass_at_k
from tasks import metrics as benchmark_metrics


def load_benchmark(name, data_dir, limit=None, demo_count=500):
    return get_task(name, str(data_dir), demo_count).test_problems()[:limit]


def test_pass_at_k_known_values():
    assert pass_at_k(10, 0, 1) == 0.0
    assert pass_at_k(10, 10, 5) == 1.0
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    assert pass_at_k(4, 1, 2) == pytest.approx(0.5)  # 1 - C(3,2)/C(4,2) = 1 - 3/6
    assert pass_at_k(5, 2, 3) == pytest.approx(1 - math.comb(3, 3) / math.comb(5, 3))  # 0.9
    assert pass_at_k(8, 7, 2) == 1.0  # every pair holds a correct sample


def sample(extracted, status):
    return {"extracted": extracted, "status": status, "length": 10, "finish": "stop"}


def test_majority_vote_ties_and_missing_answers():
    samples = [sample(None, "no_answer"), sample("5", "correct"), sample("6", "incorrect"),
               sample("6", "incorrect"), sample("5.0", "correct")]
    assert majority_vote(samples)["extracted"] == "5"  # "5" and "5.0" are one answer: a 2-2 tie, "5" came first
    tie = [sample("7", "incorrect"), sample("8", "correct"), sample("8", "correct"), sample("7", "incorrect")]
    assert majority_vote(tie)["extracted"] == "7"  # a tie goes to the answer seen first
    assert majority_vote([sample(None, "no_answer")]) is None
    assert majority_vote([sample("\\frac{1}{2}", "correct"), sample("\\dfrac{1}{2}", "correct"),
                          sample("3", "incorrect")])["status"] == "correct"  # normalised before voting


def test_benchmark_metrics_and_combined_score():
    records = [{"samples": [sample("1", "correct"), sample("2", "incorrect")]},
               {"samples": [sample("3", "incorrect"), sample("3", "incorrect")]}]
    metrics = benchmark_metrics(records, n=2)
    assert metrics["pass@1"] == 25.0 and metrics["pass@2"] == 50.0 and metrics["maj@2"] == 50.0
    assert combined_score({"gsm8k": 89.3, "math500": 90.2}) is None
    assert combined_score({"gsm8k": 92.3, "math500": 80.2, "aime24": 40.2}) == pytest.approx((3 - 10 + 1) / 3)
    assert DEEPSEEK_V3 == {"gsm8k": 89.3, "math500": 90.2, "aime24": 39.2}


def write_fixtures(folder):
    files = {
        "gsm8k/test.jsonl": [{"question": f"What is {i}+1?", "answer": f"{i}+1={i + 1}\n#### {i + 1}"} for i in range(5)],
        "math500/test.jsonl": [{"problem": f"Compute {i}/2.", "solution": f"$\\boxed{{\\frac{{{i}}}{{2}}}}$",
                                "answer": f"\\frac{{{i}}}{{2}}", "unique_id": f"test/{i}.json"} for i in range(5)],
        "aime2024/test.jsonl": [{"id": f"2024-I-{i}", "problem": f"Find {i}.", "answer": str(i)} for i in range(5)],
    }
    for relative, rows in files.items():
        os.makedirs(os.path.dirname(os.path.join(folder, relative)), exist_ok=True)
        with open(os.path.join(folder, relative), "w") as f:
            f.write("\n".join(json.dumps(r) for r in rows) + "\n")


def test_loaders_accept_each_format(tmp_path):
    write_fixtures(tmp_path)
    gsm8k = load_benchmark("gsm8k", tmp_path)
    assert gsm8k[2] == {"id": "gsm8k-3", "problem": "What is 2+1?", "answer": "3"}
    assert load_benchmark("math500", tmp_path)[1]["answer"] == "\\frac{1}{2}"
    assert load_benchmark("math500", tmp_path)[1]["id"] == "test/1.json"
    assert load_benchmark("aime24", tmp_path, limit=2)[1] == {"id": "2024-I-1", "problem": "Find 1.", "answer": "1"}
    assert len(load_benchmark("demo", tmp_path, demo_count=7)) == 7


def test_loader_names_file_line_and_field(tmp_path):
    write_fixtures(tmp_path)
    with open(tmp_path / "gsm8k/test.jsonl", "a") as f:
        f.write(json.dumps({"question": "no marker", "answer": "42"}) + "\n")
    with pytest.raises(ValueError, match=r"gsm8k/test.jsonl:6: field 'answer' has no '#### N'"):
        load_benchmark("gsm8k", tmp_path)
    with open(tmp_path / "aime2024/test.jsonl", "a") as f:
        f.write('{"id": "x", "answer": "3"}\n')
    with pytest.raises(ValueError, match=r"aime2024/test.jsonl:6: field 'problem'"):
        load_benchmark("aime24", tmp_path)
    with pytest.raises(SystemExit, match="missing"):
        load_benchmark("amc23", tmp_path)


@requires_shared("data", "math500")
def test_loaders_on_the_real_files():
    data = os.path.join(SHARED, "data")
    assert len(load_benchmark("gsm8k", data)) == 1319
    assert len(load_benchmark("math500", data)) == 500
    assert [len(load_benchmark(b, data)) for b in ("aime24", "aime25", "amc23")] == [30, 30, 40]


@pytest.fixture(scope="module")
def random_model(tmp_path_factory):
    return build_demo_model(tmp_path_factory.mktemp("model"))


def test_end_to_end_eval_writes_every_output(tmp_path, random_model, capsys):
    write_fixtures(tmp_path / "data")
    out = tmp_path / "out"
    results = evaluation.main([f"--model={random_model}", "--benchmarks=gsm8k,math500,aime24,demo",
                               f"--data_dir={tmp_path / 'data'}", "--n=2", "--max_new_tokens=8", "--limit=5",
                               f"--out_dir={out}"])
    assert set(results) == {"gsm8k", "math500", "aime24", "demo"}
    saved = json.loads((out / "results.json").read_text())
    assert saved["combined_score"] == pytest.approx(sum(results[b]["pass@1"] - DEEPSEEK_V3[b] for b in DEEPSEEK_V3) / 3)
    lines = (out / "completions.jsonl").read_text().splitlines()
    assert len(lines) == 20 and all(len(json.loads(l)["samples"]) == 2 for l in lines)
    assert "status" in json.loads(lines[0])["samples"][0]
    assert (out / "accuracy_vs_length.svg").read_text().startswith("<svg")
    assert "combined score" in capsys.readouterr().out


def test_sharded_equals_unsharded(random_model, monkeypatch):
    from data import Tokenizer
    from model import Transformer

    model, tokenizer = Transformer.from_pretrained(random_model), Tokenizer.from_pretrained(random_model)
    problems = DemoTask(test_size=6).test_problems()
    kwargs = dict(n=1, temperature=0, max_new_tokens=6, instruction="none", show_progress=False)
    whole = tasks.evaluate(model, tokenizer, DemoTask(), problems, **kwargs)
    parts = [tasks.evaluate(model, tokenizer, DemoTask(), problems, rank=r, world_size=2, **kwargs) for r in range(2)]
    merged = sorted(parts[0] + parts[1], key=lambda r: int(r["id"].split("-")[1]))
    assert [r["samples"] for r in merged] == [r["samples"] for r in whole]


def test_killed_eval_resumes(tmp_path, random_model, monkeypatch):
    from data import Tokenizer
    from model import Transformer

    model, tokenizer = Transformer.from_pretrained(random_model), Tokenizer.from_pretrained(random_model)
    problems = DemoTask(test_size=6).test_problems()
    partial = str(tmp_path / "partial.jsonl")
    kwargs = dict(n=1, temperature=0, max_new_tokens=6, instruction="none", show_progress=False, chunk=2,
                  partial_file=partial)
    calls = []
    original = tasks.generate

    def dying_generate(*args, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")
        return original(*args, **kw)

    monkeypatch.setattr(tasks, "generate", dying_generate)
    with pytest.raises(KeyboardInterrupt):
        tasks.evaluate(model, tokenizer, DemoTask(), problems, **kwargs)
    assert len(open(partial).readlines()) == 2  # the first chunk was kept
    monkeypatch.setattr(tasks, "generate", lambda *a, **kw: calls.append(1) or original(*a, **kw))
    calls.clear()
    resumed = tasks.evaluate(model, tokenizer, DemoTask(), problems, **kwargs)
    assert len(calls) == 2 and [r["id"] for r in resumed] == [p["id"] for p in problems]
    assert not os.path.exists(partial)


def write_math500(data_dir, rows):
    os.makedirs(data_dir / "math500", exist_ok=True)
    with open(data_dir / "math500" / "test.jsonl", "w") as f:
        for unique_id, problem, answer in rows:
            f.write(json.dumps({"problem": problem, "answer": answer, "unique_id": unique_id}) + "\n")


def test_completions_made_elsewhere_are_graded_without_a_model(tmp_path, capsys):
    write_math500(tmp_path, [("p1", "What is 1/2 + 1/3?", "\\frac{5}{6}"), ("p2", "Solve x^2 = 4.", "-2, 2"),
                             ("p3", "What is 2 + 2?", "4")])
    rows = [{"id": "p1", "completions": ["**Final Answer**\n\n$\\frac{5}{6}$", "The answer is 5/6.",
                                         "\\boxed{\\frac{1}{6}}", "no idea"]},
            {"problem": "Solve x^2 = 4.", "completions": ["$x = 2$ or $x = -2$, so \\boxed{2} and \\boxed{-2}",
                                                          "\\boxed{2}", "x = \\pm 2, i.e. \\boxed{\\pm 2}",
                                                          "\\boxed{2, -2}"]},
            {"id": "p3", "benchmark": "math500", "completions": ["\\boxed{4}"] * 3 + ["\\boxed{5}"]}]
    with open(tmp_path / "completions.jsonl", "w") as f:
        f.write("\n".join(json.dumps(r) for r in rows) + "\n")
    results = evaluation.main([f"--completions={tmp_path / 'completions.jsonl'}", "--benchmarks=math500",
                               f"--data_dir={tmp_path}", f"--out_dir={tmp_path / 'out'}"])
    assert results["math500"]["problems"] == 3 and results["math500"]["n"] == 4
    assert results["math500"]["pass@1"] == pytest.approx(100 * (2 / 4 + 3 / 4 + 3 / 4) / 3)
    assert results["math500"]["maj@4"] == 100.0  # p1: 5/6 and \frac{5}{6} are one vote of two
    graded = [json.loads(line) for line in open(tmp_path / "out" / "completions.jsonl")]
    assert [s["status"] for s in graded[0]["samples"]] == ["correct", "correct", "incorrect", "no_answer"]
    assert json.load(open(tmp_path / "out" / "results.json"))["results"]["math500"]["pass@1"] == \
        results["math500"]["pass@1"]
    printed = capsys.readouterr().out
    assert "math500" in printed
    try:
        import math_verify  # noqa: F401
        assert "by Math-Verify" in printed
    except ImportError:
        pass


def test_download_fetches_the_named_benchmarks_and_evaluates_only_a_model(tmp_path, monkeypatch, capsys):
    """The README's data command (no --model): each named benchmark is fetched and nothing is evaluated; with no
    benchmark named there is nothing to fetch, which is said, naming the flags; a missing file says how to fetch it."""
    fetched = []
    monkeypatch.setattr(evaluation, "download", lambda name, data_dir: fetched.append((name, data_dir)))
    monkeypatch.setattr(evaluation, "evaluate", lambda *a, **k: pytest.fail("evaluated without a model"))
    assert evaluation.main(["--download=true", "--benchmarks=gsm8k,math500", f"--data_dir={tmp_path}",
                            f"--model={tmp_path / 'none'}", f"--out_dir={tmp_path / 'out'}"]) == {}
    assert fetched == [("gsm8k", str(tmp_path)), ("math500", str(tmp_path))]
    assert "nothing is evaluated" in capsys.readouterr().out
    with pytest.raises(SystemExit, match=r"--download=true: --benchmarks=demo names no benchmark file to fetch"):
        evaluation.main(["--download=true", f"--model={tmp_path / 'none'}"])
    with pytest.raises(SystemExit, match=r"run eval.py with --download=true --benchmarks=aime24"):
        get_task("aime24", str(tmp_path)).test_problems()


def test_wandb_is_asked_for_before_any_sampling_and_graded_completions_are_logged_too(tmp_path, monkeypatch):
    """Without wandb installed, --wandb_project stops eval.py at start (before the model is even read), not after
    the sampling; with it, the graded completions' scores reach it and metrics.jsonl as a model's would, and an eval
    that fails touches neither."""
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb raises ImportError
    monkeypatch.setattr(evaluation, "evaluate", lambda *a, **k: pytest.fail("sampled before checking for wandb"))
    with pytest.raises(SystemExit, match="wandb_project=r1: wandb is not installed"):
        evaluation.main(["--wandb_project=r1", f"--model={tmp_path / 'no_model'}", f"--out_dir={tmp_path / 'a'}"])
    logged = []
    fake = types.ModuleType("wandb")
    fake.init = lambda **kwargs: types.SimpleNamespace(log=lambda values, step=None: logged.append(values),
                                                       finish=lambda: None)
    monkeypatch.setitem(sys.modules, "wandb", fake)
    write_math500(tmp_path, [("p1", "What is 2 + 2?", "4")])
    with open(tmp_path / "completions.jsonl", "w") as f:
        f.write(json.dumps({"id": "p1", "completions": ["\\boxed{4}", "\\boxed{5}"]}) + "\n")
    evaluation.main([f"--completions={tmp_path / 'completions.jsonl'}", "--benchmarks=math500", "--wandb_project=r1",
                     f"--data_dir={tmp_path}", f"--out_dir={tmp_path / 'b'}"])
    assert logged[0]["math500/pass@1"] == 50.0
    assert [json.loads(line) for line in open(tmp_path / "b" / "metrics.jsonl")] == [dict(step=0, **logged[0])]
    # a later eval into the same folder that fails leaves the last one's metrics line and starts no wandb run
    with open(tmp_path / "broken.jsonl", "w") as f:
        f.write('{"id": "nowhere", "completion": "4"}\n')
    with pytest.raises(ValueError, match="no problem of --benchmarks has this row"):
        evaluation.main([f"--completions={tmp_path / 'broken.jsonl'}", "--benchmarks=math500", "--wandb_project=r1",
                         f"--data_dir={tmp_path}", f"--out_dir={tmp_path / 'b'}"])
    assert len(logged) == 1 and len(open(tmp_path / "b" / "metrics.jsonl").readlines()) == 1


@pytest.mark.parametrize("flag, message", [("--limit=0", "leave the flag out for every problem"),
                                           ("--max_new_tokens=0", "leave the flag out for the task's default"),
                                           ("--limit=-2", "must be greater than 0")])
def test_a_zero_that_used_to_mean_the_default_says_what_to_do(flag, message):
    with pytest.raises(SystemExit, match=f"^{flag}: {message}"):
        evaluation.main([flag])


def test_completions_rows_that_match_no_problem_are_refused_with_the_line(tmp_path):
    write_math500(tmp_path, [("p1", "What is 2 + 2?", "4")])
    with open(tmp_path / "completions.jsonl", "w") as f:
        f.write(json.dumps({"id": "p1", "completion": "\\boxed{4}"}) + "\n")
        f.write(json.dumps({"id": "p9", "completion": "\\boxed{4}"}) + "\n")
    with pytest.raises(ValueError, match=r"completions.jsonl:2: no problem"):
        evaluation.main([f"--completions={tmp_path / 'completions.jsonl'}", "--benchmarks=math500",
                         f"--data_dir={tmp_path}", f"--out_dir={tmp_path / 'out'}"])
    with open(tmp_path / "completions.jsonl", "w") as f:
        f.write(json.dumps({"id": "p1", "completion": 4}) + "\n")
    with pytest.raises(ValueError, match=r"completions.jsonl:1: field 'completion'"):
        evaluation.main([f"--completions={tmp_path / 'completions.jsonl'}", "--benchmarks=math500",
                         f"--data_dir={tmp_path}", f"--out_dir={tmp_path / 'out'}"])


def test_completions_that_cover_part_of_a_benchmark_are_marked_and_left_out_of_the_combined_score(tmp_path, capsys):
    write_math500(tmp_path, [("p1", "What is 2 + 2?", "4"), ("p2", "What is 3 + 3?", "6")])
    with open(tmp_path / "completions.jsonl", "w") as f:
        f.write(json.dumps({"id": "p1", "completion": "\\boxed{4}"}) + "\n")
    results = evaluation.main([f"--completions={tmp_path / 'completions.jsonl'}", "--benchmarks=math500",
                               f"--data_dir={tmp_path}", f"--out_dir={tmp_path / 'out'}"])
    assert results["math500"]["partial"] is True and results["math500"]["problems"] == 1
    assert "covers 1 of the 2 math500 problems" in capsys.readouterr().err


# -----------------------------------------------------------------------------
# the reported numbers against independent computations (mutation audit)


def brute_force_metrics(records, n):
    """What metrics() must report, computed another way: pass@k as the share of all k-subsets of a problem's samples
    that hold a correct one, maj@n by counting votes by hand (a tie to the answer seen first), and the length and
    truncation shares over samples."""
    result = {"problems": len(records), "n": n}
    for k in (1, 2, 4, 8, 16):
        if k <= n:
            shares = []
            for r in records:
                subsets = list(itertools.combinations(r["samples"], k))
                shares.append(sum(any(s["status"] == "correct" for s in subset) for subset in subsets) / len(subsets))
            result[f"pass@{k}"] = 100 * sum(shares) / len(records)
    wins = 0
    for r in records:
        votes = {}  # answer -> its samples, in the order answers were first seen
        for s in r["samples"]:
            if s["extracted"] is not None:
                votes.setdefault(s["extracted"], []).append(s)
        if votes:
            top = max(len(v) for v in votes.values())
            wins += next(v for v in votes.values() if len(v) == top)[0]["status"] == "correct"
    result[f"maj@{n}"] = 100 * wins / len(records)
    samples = [s for r in records for s in r["samples"]]
    result["mean_length"] = sum(s["length"] for s in samples) / len(samples)
    result["truncated"] = sum(s["finish"] == "length" for s in samples) / len(samples)
    return result


def test_metrics_equal_a_brute_force_count_on_random_records():
    rng = random.Random(0)
    for n in (1, 2, 3, 4, 5, 8):
        records = []
        for _ in range(25):
            samples = []
            for _ in range(n):
                answer = rng.choice(["7", "7", "8", "8", "9", None])  # "7" is right
                status = "no_answer" if answer is None else "correct" if answer == "7" else "incorrect"
                samples.append({"extracted": answer, "status": status, "length": rng.randint(1, 60),
                                "finish": "length" if rng.random() < 0.3 else "stop"})
            records.append({"samples": samples})
        got, expected = benchmark_metrics(records, n), brute_force_metrics(records, n)
        assert set(got) == set(expected), n
        for key, value in expected.items():
            assert got[key] == pytest.approx(value), (n, key)


PATTERNS = {  # per problem, its 4 samples: c right answer, w and v two wrong ones, - no answer (cut by the budget)
    "gsm8k": ["cwwv", "ccw-", "cccc", "wvw-", "wccc"],
    "math500": ["cccc", "cccw", "wwcc", "-c--", "vwvw"],
    "aime24": ["wwwc", "c---", "wwcc", "vvvv", "cwcw"],
}


def pattern_records(problems, patterns):
    words = {"c": ("right", "correct"), "w": ("wrong", "incorrect"), "v": ("other", "incorrect"),
             "-": (None, "no_answer")}
    return [dict(p, samples=[{"text": f"sample {j}", "extracted": words[c][0], "status": words[c][1], "reason": "",
                              "length": 10 * (j + 1) + i, "finish": "length" if c == "-" else "stop"}
                             for j, c in enumerate(pattern)])
            for i, (p, pattern) in enumerate(zip(problems, patterns))]


def test_eval_reports_every_metric_of_every_benchmark_in_each_output(tmp_path, random_model, monkeypatch, capsys):
    """eval.py's main over three benchmarks with the sampling replaced by known samples: results, results.json,
    metrics.jsonl and the printed table carry each benchmark's numbers, and the combined score is of pass@1."""
    write_fixtures(tmp_path / "data")

    def fake_evaluate(model, tokenizer, task, problems, n, temperature, top_p, max_new_tokens, *args, **kwargs):
        assert n == 4
        assert (temperature, top_p, max_new_tokens) == (0.6, 0.95, 4096)  # DeepSeek-R1's sampling, the tasks' default
        return pattern_records(problems, PATTERNS[task.name])

    monkeypatch.setattr(evaluation, "evaluate", fake_evaluate)
    out = tmp_path / "out"
    results = evaluation.main([f"--model={random_model}", "--benchmarks=gsm8k,math500,aime24", "--n=4",
                               f"--data_dir={tmp_path / 'data'}", f"--out_dir={out}"])
    printed = capsys.readouterr().out
    expected = {name: brute_force_metrics(pattern_records(load_benchmark(name, tmp_path / "data"), patterns), 4)
                for name, patterns in PATTERNS.items()}
    combined = sum(expected[name]["pass@1"] - reference for name, reference in
                   {"gsm8k": 89.3, "math500": 90.2, "aime24": 39.2}.items()) / 3
    assert any(e["maj@4"] != e["pass@1"] for e in expected.values())  # the combined score is of pass@1, not maj@n
    saved = json.loads((out / "results.json").read_text())
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(logged) == 1 and logged[0]["step"] == 0
    assert saved["combined_score"] == pytest.approx(combined) and logged[0]["combined_score"] == pytest.approx(combined)
    assert f"{combined:+.2f} points" in printed
    for name, values in expected.items():
        for key, value in values.items():
            assert results[name][key] == pytest.approx(value), (name, key)
            assert saved["results"][name][key] == pytest.approx(value), (name, key)
            assert logged[0][f"{name}/{key}"] == pytest.approx(value), (name, key)
        row = next(line.split() for line in printed.splitlines() if line.startswith(name + " "))
        assert row[-1] == f"{values['pass@1'] - DEEPSEEK_V3[name]:+.1f}"  # the "vs DeepSeek-V3" column
        assert row[2:-1] == [f"{values[c]:.1f}" for c in ("pass@1", "maj@4", "pass@2", "pass@4", "mean_length")] + \
            [f"{values['truncated']:.3f}"]
    header = next(line.split() for line in printed.splitlines() if line.startswith("benchmark"))
    assert header[:8] == ["benchmark", "problems", "pass@1", "maj@4", "pass@2", "pass@4", "mean_length", "truncated"]


def test_aime_gets_the_long_budget_only_for_models_whose_template_opens_think(tmp_path, random_model, monkeypatch):
    """R1-style models (a chat template with <think>) reason for tens of thousands of tokens on AIME: eval.py gives
    AIME 32,768 new tokens for them, the task's default otherwise, and --max_new_tokens overrides both."""
    write_fixtures(tmp_path / "data")
    thinking_model = tmp_path / "thinking_model"
    shutil.copytree(random_model, thinking_model)
    config_path = thinking_model / "tokenizer_config.json"
    tokenizer_config = json.loads(config_path.read_text())
    tokenizer_config["chat_template"] = tokenizer_config["chat_template"].replace("assistant\n' }}",
                                                                                "assistant\n<think>\n' }}")
    assert "<think>" in tokenizer_config["chat_template"]
    config_path.write_text(json.dumps(tokenizer_config))
    budgets = {}

    def fake_evaluate(model, tokenizer, task, problems, n, temperature, top_p, max_new_tokens, *args, **kwargs):
        budgets[task.name] = max_new_tokens
        return pattern_records(problems, PATTERNS[task.name])

    monkeypatch.setattr(evaluation, "evaluate", fake_evaluate)
    for model, extra, expected in [(thinking_model, [], {"gsm8k": 4096, "aime24": 32768}),
                                   (random_model, [], {"gsm8k": 4096, "aime24": 4096}),
                                   (thinking_model, ["--max_new_tokens=100"], {"gsm8k": 100, "aime24": 100})]:
        budgets.clear()
        evaluation.main([f"--model={model}", "--benchmarks=gsm8k,aime24", "--n=4", f"--data_dir={tmp_path / 'data'}",
                         f"--out_dir={tmp_path / 'out'}"] + extra)
        assert budgets == expected, (model, extra)


def write_completions(path, rows):
    with open(path, "w") as f:
        f.write("\n".join(json.dumps(r) for r in rows) + "\n")


def test_completions_of_every_problem_enter_the_combined_score_and_a_partial_benchmark_does_not(tmp_path, capsys):
    write_fixtures(tmp_path / "data")
    patterns = {"gsm8k": ["cc", "cw", "ww", "wc", "cc"], "math500": ["cw", "cc", "cc", "ww", "cc"],
                "aime24": ["ww", "ww", "cw", "ww", "wc"]}
    rows = []
    for name, marks in patterns.items():
        for problem, mark in zip(load_benchmark(name, tmp_path / "data"), marks):
            rows.append({"id": problem["id"], "benchmark": name,
                         "completions": [f"So the answer is \\boxed{{{problem['answer'] if c == 'c' else 999}}}."
                                         for c in mark]})
    pass1 = {name: 100 * sum(mark.count("c") / 2 for mark in marks) / 5 for name, marks in patterns.items()}
    combined = sum(pass1[name] - DEEPSEEK_V3[name] for name in DEEPSEEK_V3) / 3
    args = ["--benchmarks=gsm8k,math500,aime24", f"--data_dir={tmp_path / 'data'}"]

    write_completions(tmp_path / "all.jsonl", rows)
    results = evaluation.main([f"--completions={tmp_path / 'all.jsonl'}", f"--out_dir={tmp_path / 'all'}"] + args)
    printed = capsys.readouterr().out
    assert not any(m.get("partial") for m in results.values())
    assert {name: m["pass@1"] for name, m in results.items()} == pytest.approx(pass1)
    assert json.loads((tmp_path / "all" / "results.json").read_text())["combined_score"] == pytest.approx(combined)
    assert f"{combined:+.2f} points" in printed
    try:
        import math_verify  # noqa: F401
        for name, value in pass1.items():  # boxed integers and fractions: the two verifiers agree
            assert f"{name}: pass@1 {value:.1f} by our verifier, {value:.1f} by Math-Verify" in printed
    except ImportError:
        pass

    write_completions(tmp_path / "part.jsonl", rows[:4] + rows[5:])  # gsm8k's last problem has no completions
    results = evaluation.main([f"--completions={tmp_path / 'part.jsonl'}", f"--out_dir={tmp_path / 'part'}"] + args)
    assert results["gsm8k"]["partial"] is True and results["gsm8k"]["problems"] == 4
    assert not results["math500"].get("partial") and not results["aime24"].get("partial")
    assert json.loads((tmp_path / "part" / "results.json").read_text())["combined_score"] is None
    printed = capsys.readouterr().out
    assert "combined score" not in printed
    table = {line.split()[0]: line.split() for line in printed.splitlines() if line.split()[:1] in (["gsm8k"],
                                                                                                  ["math500"])}
    assert table["gsm8k"][-1] == "partial"  # a part of gsm8k is no score against DeepSeek-V3's
    assert table["math500"][-1] == f"{pass1['math500'] - DEEPSEEK_V3['math500']:+.1f}"

    uneven = [dict(rows[0], completions=rows[0]["completions"] + ["\\boxed{1}"])] + rows[1:]
    write_completions(tmp_path / "uneven.jsonl", uneven)
    with pytest.raises(SystemExit, match="gsm8k has 2 to 3 completions per problem"):
        evaluation.main([f"--completions={tmp_path / 'uneven.jsonl'}", f"--out_dir={tmp_path / 'uneven'}"] + args)


def test_accuracy_vs_length_plots_the_share_of_correct_samples_per_length_bin(tmp_path):
    def s(length, status, extracted):
        return {"length": length, "status": status, "extracted": extracted, "finish": "stop"}

    records = {"math500": [{"samples": [s(10, "correct", "1"), s(10, "incorrect", "2")]},
                           {"samples": [s(20, "no_answer", None), s(20, "incorrect", "3")]},
                           {"samples": [s(40, "correct", "1"), s(40, "correct", "1")]}]}
    path = tmp_path / "plot.svg"
    evaluation.accuracy_vs_length_svg(records, str(path), bins=3)
    # width 560, height 320, margin 48: x = 48 + 464 * length / 40, y = 272 - 224 * accuracy
    assert 'points="164.0,160.0 280.0,272.0 512.0,48.0"' in path.read_text()
    # 7 samples in 3 bins: 3, 3 and 1, never a fourth point
    records = {"math500": [{"samples": [s(10 * k, "correct" if k % 2 else "incorrect", "1") for k in range(1, 8)]}]}
    evaluation.accuracy_vs_length_svg(records, str(path), bins=3)
    points = re.search(r'points="([^"]*)"', path.read_text()).group(1).split()
    assert len(points) == 3


def test_completions_keep_their_length_finish_and_benchmark_and_follow_the_limit(tmp_path):
    """--completions: a row's own "length" (tokens) and "finish" make mean_length and truncated, its "benchmark"
    picks between problems that share an id, and --limit cuts the problems a file must cover to be complete."""
    for name, answers in (("a", ["1", "2", "3"]), ("b", ["4", "5", "6"])):
        with open(tmp_path / f"{name}.jsonl", "w") as f:
            f.writelines(json.dumps({"id": f"q{i}", "problem": f"{name}: question {i}?", "answer": answer}) + "\n"
                         for i, answer in enumerate(answers))
    rows = [{"id": "q0", "benchmark": "a.jsonl", "completion": "\\boxed{1}", "length": 30, "finish": "length"},
            {"id": "q1", "benchmark": "a.jsonl", "completion": "\\boxed{7}", "length": 10},
            {"id": "q0", "benchmark": "b.jsonl", "completion": "\\boxed{4}", "length": 50, "finish": "stop"},
            {"id": "q1", "benchmark": "b.jsonl", "completions": ["\\boxed{5}"], "length": 70}]
    write_completions(tmp_path / "c.jsonl", rows)
    results = evaluation.main([f"--completions={tmp_path / 'c.jsonl'}", "--limit=2", f"--out_dir={tmp_path / 'out'}",
                               f"--benchmarks={tmp_path / 'a.jsonl'},{tmp_path / 'b.jsonl'}"])
    assert not any(m.get("partial") for m in results.values())  # the first 2 problems of each: all there
    assert (results["a.jsonl"]["pass@1"], results["a.jsonl"]["mean_length"], results["a.jsonl"]["truncated"]) == \
        (50.0, 20.0, 0.5)
    assert (results["b.jsonl"]["pass@1"], results["b.jsonl"]["mean_length"], results["b.jsonl"]["truncated"]) == \
        (100.0, 60.0, 0.0)


def test_math_verify_pass_at_1_is_the_mean_share_of_verified_samples_in_percent(monkeypatch):
    """The peer's number, with a stand-in Math-Verify (exact match of the last box), so it is checked whether or
    not the real one is installed."""
    fake = types.ModuleType("math_verify")
    fake.parse = lambda text: text.strip("$").split("\\boxed{")[-1].rstrip("}.")
    fake.verify = lambda gold, answer: gold == answer
    monkeypatch.setitem(sys.modules, "math_verify", fake)
    records = [{"answer": "1", "samples": [{"text": "\\boxed{1}"}, {"text": "\\boxed{2}"}]},
               {"answer": "3", "samples": [{"text": "\\boxed{3}"}, {"text": "\\boxed{3}"}]},
               {"answer": "5", "samples": [{"text": "\\boxed{4}"}, {"text": "\\boxed{6}"}]}]
    assert evaluation.math_verify_pass_at_1(records) == pytest.approx(100 * (1 / 2 + 1 + 0) / 3)
