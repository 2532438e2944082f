# python -m pytest tests/test_tasks.py -q
"""tasks.py: one path from a data file to a prompt and a reward, shared by training and evaluation."""
import json
import math
import os
import pickle
import re
import types

import pytest

import eval as evaluation
import tasks
import train_grpo
from conftest import ROOT
from data import render_prompt
from tasks import (INSTRUCTION, Benchmark, DemoTask, JsonlTask, Task, check_problems, get_task, overlong_penalty,
                   score)
from verifier import Verdict


@pytest.fixture(scope="module")
def demo_model(tmp_path_factory):
    return str(tasks.build_demo_model(tmp_path_factory.mktemp("demo")))


@pytest.fixture(scope="module")
def tokenizer(demo_model):
    from data import Tokenizer

    return Tokenizer.from_pretrained(demo_model)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def test_get_task_resolves_every_kind_of_name(tmp_path):
    assert isinstance(get_task("demo"), DemoTask)
    assert [p["id"] for p in get_task("demo", demo_problems=3).test_problems()] == ["demo-0", "demo-1", "demo-2"]
    assert isinstance(get_task("math500", data_dir=str(tmp_path)), Benchmark)
    file = write_jsonl(tmp_path / "mine.jsonl", [{"question": "1+1?", "answer": "work\n#### 2"}])
    task = get_task(file)
    assert isinstance(task, JsonlTask) and task.name == "mine.jsonl"
    assert task.train_problems(0) == task.test_problems() == [{"id": "mine-1", "problem": "1+1?", "answer": "2"}]
    other = write_jsonl(tmp_path / "other.txt", [{"problem": "2+2?", "answer": "4"}])  # a JSONL by any other name
    assert isinstance(get_task(other), JsonlTask) and get_task(other).test_problems()[0]["answer"] == "4"
    with pytest.raises(SystemExit, match=r"^--eval_data=gsm9k: unknown task"):
        get_task("gsm9k", flag="--eval_data")
    with pytest.raises(SystemExit, match=r"^--task=nowhere.py:X: nowhere.py is not a file"):
        get_task("nowhere.py:X")
    (tmp_path / "not_a_task.py").write_text("class Thing:\n    pass\n")
    with pytest.raises(SystemExit, match="has no Task subclass named 'Thing'"):
        get_task(f"{tmp_path / 'not_a_task.py'}:Thing")


def test_demo_splits_never_share_a_problem_and_smaller_counts_are_prefixes():
    train = {p["problem"] for p in DemoTask().train_problems(seed=0)[:3000]}
    assert len(train) == 3000  # distinct problems: the stream repeats some
    heldout = DemoTask(test_size=500).test_problems()
    assert not train & {p["problem"] for p in heldout}
    assert DemoTask(test_size=20).test_problems() == heldout[:20]


def test_a_benchmark_is_test_only_and_a_missing_file_says_where_to_get_it(tmp_path):
    with pytest.raises(SystemExit, match="has no training problems"):
        Benchmark("gsm8k", str(tmp_path)).train_problems(0)
    with pytest.raises(SystemExit, match="gsm8k/test.jsonl is missing"):
        Benchmark("gsm8k", str(tmp_path)).test_problems()


def test_problems_of_a_users_task_are_checked_with_their_index():
    task = Task()
    with pytest.raises(SystemExit, match="returned no problems"):
        check_problems([], task)
    with pytest.raises(SystemExit, match="problem 1 needs a field 'problem'"):
        check_problems([{"problem": "a", "answer": "1"}, {"question": "b", "answer": "2"}], task)
    with pytest.raises(SystemExit, match=r"not unique \('1' occurs 2 times\)"):
        check_problems([{"id": 1, "problem": "a", "answer": "1"}, {"id": "1", "problem": "b", "answer": "2"}], task)
    assert check_problems([{"problem": "a", "answer": "1"}], task) == [{"id": "task-0", "problem": "a", "answer": "1"}]
    # the default judge reads "answer": refused at load, not after the first batch has been sampled, and so is an
    # answer the verifier would refuse then (a number, a blank, nothing left once normalised)
    for answer in ({}, {"answer": 4}, {"answer": " "}, {"answer": "$"}, {"answer": "\\text{}"}):
        with pytest.raises(SystemExit, match="problem 1 needs a field 'answer', a non-empty string"):
            check_problems([{"problem": "a", "answer": "1"}, {"problem": "b", **answer}], task)

    class OwnJudge(Task):
        def grade(self, completions, problems):
            return [Verdict("correct", c, "any") for c in completions]

    assert check_problems([{"problem": "a"}], OwnJudge()) == [{"id": "task-0", "problem": "a"}]


def test_a_missing_file_and_two_names_for_the_tasks_are_refused_naming_the_flags(tmp_path):
    with pytest.raises(SystemExit, match=r"^--eval_data=nowhere/p.jsonl: no such file"):
        get_task("nowhere/p.jsonl", flag="--eval_data")
    with pytest.raises(SystemExit, match=r"^--task=gsm8k and --benchmarks=math500: name the tasks once"):
        evaluation.main(["--task=gsm8k", "--benchmarks=math500"])


def test_a_users_task_file_is_imported_as_a_module(tmp_path):
    """Its module is registered while it runs, as an import's is: a dataclass with postponed annotations (which
    looks its module up) defines, and its tasks pickle."""
    (tmp_path / "dataclass_task.py").write_text(
        "from __future__ import annotations\n\nimport dataclasses\n\nfrom tasks import Task\n\n\n"
        "@dataclasses.dataclass\nclass Sums(Task):\n    size: int = 3\n\n"
        "    def test_problems(self) -> list[dict]:\n"
        "        return [{'problem': f'{i}+1?', 'answer': str(i + 1)} for i in range(self.size)]\n")
    task = get_task(f"{tmp_path / 'dataclass_task.py'}:Sums")
    assert task.name == "Sums" and len(check_problems(task.test_problems(), task)) == 3
    assert pickle.loads(pickle.dumps(task)).size == 3


def test_evaluate_grades_each_completion_against_its_own_problem(tokenizer, monkeypatch):
    """Completions that answer their own prompt right are all graded correct, over several chunks, n > 1 and
    each rank's share: a completion checked against another problem's answer would read as wrong."""
    from sampler import Completion

    task = DemoTask(test_size=5)
    problems = task.test_problems()
    answers = {tuple(task.prompt(tokenizer, p)): p["answer"] for p in problems}
    assert len(set(answers.values())) > 1  # a mix-up of problems changes the verdicts

    def answering_generate(model, prompts, max_new_tokens, n=1, **kwargs):
        return [Completion(i, tokenizer.encode(f"\\boxed{{{answers[tuple(prompt)]}}}"), finish_reason="stop")
                for i, prompt in enumerate(prompts) for _ in range(n)]

    monkeypatch.setattr(tasks, "generate", answering_generate)
    for rank, world_size in [(0, 1), (1, 2)]:
        records = tasks.evaluate(None, tokenizer, task, problems, n=2, chunk=2, rank=rank, world_size=world_size,
                                 show_progress=False)
        assert [r["id"] for r in records] == [p["id"] for p in problems[rank::world_size]]
        assert all(s["status"] == "correct" for r in records for s in r["samples"]), (rank, world_size)


def test_grpo_evaluates_the_first_eval_problems_of_the_held_out_task(tmp_path):
    _, problems, eval_task, heldout = train_grpo.load_tasks(train_grpo.Config(eval_problems=3), master=False)
    assert eval_task.name == "demo" and len(problems) == tasks.DEMO_TRAIN_SIZE
    assert heldout == DemoTask(test_size=3).test_problems()
    assert train_grpo.load_tasks(train_grpo.Config(eval_problems=0), master=False)[3] == []
    assert len(train_grpo.load_tasks(train_grpo.Config(eval_problems=600), master=False)[3]) == 600  # > the default
    # a held-out file longer than --eval_problems (the demo task is built at that size): its first ones
    held = write_jsonl(tmp_path / "held.jsonl", [{"problem": f"What is {i}+1?", "answer": str(i + 1)} for i in range(5)])
    heldout = train_grpo.load_tasks(train_grpo.Config(eval_data=str(held), eval_problems=3), master=False)[3]
    assert [problem["answer"] for problem in heldout] == ["1", "2", "3"]
    # a benchmark by name, read from --data_dir
    os.makedirs(tmp_path / "bench" / "math500")
    write_jsonl(tmp_path / "bench" / "math500" / "test.jsonl",
                [{"problem": f"What is {i}+2?", "answer": str(i + 2), "unique_id": str(i)} for i in range(4)])
    heldout = train_grpo.load_tasks(train_grpo.Config(eval_data="math500", data_dir=str(tmp_path / "bench"),
                                                      eval_problems=2), master=False)[3]
    assert [problem["answer"] for problem in heldout] == ["2", "3"]


def test_grpo_asks_held_out_problems_with_the_training_prompts_instruction(tmp_path, demo_model, monkeypatch):
    """Training on a file (no instruction) and evaluating on a task whose own default is an instruction: the
    held-out eval asks with the training prompts' instruction, so the model is scored on the prompt it learned."""
    train = write_jsonl(tmp_path / "train.jsonl", [{"problem": "What is 1+1?", "answer": "2"}])
    (tmp_path / "held.py").write_text("from tasks import Task\n\n\nclass Held(Task):\n    instruction = 'Shout.'\n\n"
                                      "    def test_problems(self):\n        return [{'problem': '2+2?', 'answer': '4'}]\n")
    asked = []
    monkeypatch.setattr(train_grpo, "heldout_accuracy", lambda *args: asked.append((args[6], args[4])) or 0.0)
    base = [f"--data={train}", f"--eval_data={tmp_path / 'held.py'}:Held", f"--model={demo_model}",
            "--prompts_per_step=2", "--group_size=2", "--max_steps=1", "--max_new_tokens=4", "--temperature=0.7",
            "--eval_temperature=0"]
    train_grpo.main(base + [f"--out_dir={tmp_path / 'a'}"])
    train_grpo.main(base + [f"--out_dir={tmp_path / 'b'}", "--instruction=Think."])
    # at the start and the end of each run, at --eval_temperature, not the rollouts' temperature
    assert asked == [("none", 0.0), ("none", 0.0), ("Think.", 0.0), ("Think.", 0.0)]


def test_training_and_evaluation_send_the_same_prompt_for_every_kind_of_task(tmp_path, tokenizer, monkeypatch):
    """The prompt of a problem is Task.prompt's, whichever script asks, with the task's own instruction by default
    (the r1 instruction for a benchmark, none for the demo and a JSONL file) or the one a flag gives."""
    write_jsonl(tmp_path / "gsm8k.jsonl", [{"question": "What is 3+4?", "answer": "#### 7"}])
    os.makedirs(tmp_path / "gsm8k")
    os.replace(tmp_path / "gsm8k.jsonl", tmp_path / "gsm8k" / "test.jsonl")
    sent = []

    def fake_generate(model, prompts, *args, **kwargs):
        sent.append(list(prompts[0]))
        raise StopIteration

    monkeypatch.setattr(tasks, "generate", fake_generate)
    monkeypatch.setattr(train_grpo, "generate", fake_generate)
    jsonl = JsonlTask(write_jsonl(tmp_path / "p.jsonl", [{"problem": "What is 3+4?", "answer": "7"}]))
    for task, instruction in [(Benchmark("gsm8k", str(tmp_path)), INSTRUCTION), (DemoTask(), "none"),
                              (jsonl, "none")]:
        problem = task.test_problems()[0]
        for flag in (None, "Think."):
            config = train_grpo.Config(instruction=flag, group_size=2)
            sent.clear()
            for call in (lambda: train_grpo.rollout(None, tokenizer, task, [problem], config, 0),
                         lambda: tasks.evaluate(None, tokenizer, task, [problem], instruction=flag,
                                                show_progress=False)):
                with pytest.raises(StopIteration):
                    call()
            expected = render_prompt(tokenizer, problem["problem"], instruction if flag is None else flag)
            assert sent == [expected, expected], (task.name, flag)


def test_score_adds_the_format_reward_and_the_overlong_penalty_to_the_task_reward():
    class Halves(Task):  # a reward of its own, to see that score uses it
        def reward(self, completion, problem, verdict):
            return 0.5 if verdict.correct else 0.0

    problems = [{"id": "a", "problem": "2+2?", "answer": "4"}] * 3
    completions = ["<think>\nsum\n</think>\n\n\\boxed{4}", "\\boxed{4}", "<think>\nx\n</think>\n\n\\boxed{5}"]
    rewards, verdicts = score(Halves(), completions, problems, [10, 60, 64], max_new_tokens=64, format_weight=0.25,
                              overlong_buffer=8, overlong_max_penalty=2.0)
    assert [v.status for v in verdicts] == ["correct", "correct", "incorrect"]
    assert rewards == pytest.approx([0.5 + 0.25, 0.5 + 0 - 1.0, 0 + 0.25 - 2.0])
    plain, _ = score(Task(), completions, problems, [10, 60, 64], max_new_tokens=64)
    assert plain == [1.0, 1.0, 0.0]
    assert overlong_penalty([10, 60, 64, 62], 64, 4, 1.0).tolist() == [0.0, 0.0, -1.0, -0.5]


def test_only_a_correct_verdict_earns_the_task_reward():
    """No answer, an unparseable one and a wrong one all score 0 (a reward for 'not incorrect' would pay the
    policy for never answering)."""
    problems = [{"id": "a", "problem": "2+2?", "answer": "4"}] * 4
    completions = ["\\boxed{4}", "I am not sure.", "\\boxed{@@@}", "\\boxed{5}"]
    rewards, verdicts = score(Task(), completions, problems, [1] * 4, max_new_tokens=64)
    assert [v.status for v in verdicts] == ["correct", "no_answer", "unparseable", "incorrect"]
    assert rewards == [1.0, 0.0, 0.0, 0.0]


def test_a_zero_answer_is_an_answer(tmp_path):
    """JSON's 0 (an AIME answer can be 0) is a gold "0" in a file, and "0" one from a user's task; only a missing or
    blank answer is refused."""
    file = write_jsonl(tmp_path / "zero.jsonl", [{"problem": "1-1?", "answer": 0}, {"problem": "2-2?", "answer": "0"}])
    assert [p["answer"] for p in get_task(file).test_problems()] == ["0", "0"]
    assert check_problems([{"problem": "1-1?", "answer": "0"}], Task())[0]["answer"] == "0"
    with pytest.raises(ValueError, match="field 'answer' is missing or empty"):
        get_task(write_jsonl(tmp_path / "blank.jsonl", [{"problem": "1-1?", "answer": " "}])).test_problems()


def test_a_custom_judge_grades_completions_made_elsewhere(tmp_path):
    class Exact(Task):
        name = "exact"

        def test_problems(self):
            return [{"id": "a", "problem": "Say ok."}, {"id": "b", "problem": "Say no."}]

        def grade(self, completions, problems):
            return [Verdict("correct" if c == "ok" else "incorrect", c, "exact") for c in completions]

    task = Exact()
    completions = write_jsonl(tmp_path / "c.jsonl", [{"id": "a", "completions": ["ok", "ok"]},
                                                     {"id": "b", "completions": ["ok", "no"]}])
    records = evaluation.grade_completions_file(completions, {"exact": task}, {"exact": task.test_problems()})
    assert [[s["status"] for s in r["samples"]] for r in records["exact"]] == [["correct"] * 2, ["correct",
                                                                                                  "incorrect"]]


def readme_task_source():
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    section = readme[readme.index("## Your own task"):]
    return re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1)


def test_the_readme_task_trains_and_evaluates_without_editing_either_script(tmp_path, demo_model):
    """The README's complete example, run as a user would: train_grpo.py --task=reverse.py:ReverseWord and eval.py
    --task=... on the demo model. Its partial-credit reward reaches GRPO, its judge reaches eval.py."""
    source = readme_task_source()
    assert 20 <= len(source.strip().splitlines()) <= 35
    (tmp_path / "reverse.py").write_text(source)
    spec = f"{tmp_path / 'reverse.py'}:ReverseWord"
    metrics = train_grpo.main([f"--task={spec}", f"--model={demo_model}", f"--out_dir={tmp_path / 'grpo'}",
                               "--prompts_per_step=2", "--group_size=2", "--max_steps=2", "--max_new_tokens=8",
                               "--eval_problems=2", "--log_every=100", "--sample_every=100"])
    assert 0 <= metrics["reward"] <= 1 and math.isfinite(metrics["heldout_accuracy"])
    results = evaluation.main([f"--task={spec}", f"--model={tmp_path / 'grpo' / 'final'}", "--n=2",
                               f"--out_dir={tmp_path / 'eval'}"])
    assert list(results) == ["reverse"] and results["reverse"]["problems"] == 2
    assert results["reverse"]["mean_length"] <= 16  # the task's own max_new_tokens
    graded = [json.loads(line) for line in open(tmp_path / "eval" / "completions.jsonl")]
    assert all(s["reason"] == "exact match" for r in graded for s in r["samples"])


def test_a_jsonl_training_file_has_no_held_out_eval_unless_one_is_named(tmp_path, demo_model, capsys):
    problems = write_jsonl(tmp_path / "train.jsonl", [{"problem": f"What is {i}+1?", "answer": str(i + 1)}
                                                      for i in range(4)])
    base = [f"--data={problems}", f"--model={demo_model}", "--prompts_per_step=2", "--group_size=2", "--max_steps=1",
            "--max_new_tokens=4", "--eval_problems=3"]
    metrics = train_grpo.main(base + [f"--out_dir={tmp_path / 'a'}"])
    assert "heldout_accuracy" not in metrics and "no held-out eval" in capsys.readouterr().out
    metrics = train_grpo.main(base + [f"--out_dir={tmp_path / 'b'}", "--eval_data=demo"])
    assert "heldout_accuracy" in metrics
    with pytest.raises(SystemExit, match="name the problems once"):
        train_grpo.main(base + ["--task=demo2.jsonl"])


def test_evaluate_keeps_each_problems_own_samples_in_order(tokenizer, monkeypatch):
    """With n > 1 over several chunks, a record holds its own problem's n samples in the order they were drawn
    (a window into the wrong completions would mix problems: grading stays right, the records do not)."""
    from sampler import Completion

    task = DemoTask(test_size=5)
    problems = task.test_problems()
    answers = {tuple(task.prompt(tokenizer, p)): p["answer"] for p in problems}

    def generate(model, prompts, max_new_tokens, n=1, **kwargs):  # sample s of each prompt: right for s = 0 only
        return [Completion(i, tokenizer.encode(f"\\boxed{{{answers[tuple(prompt)] if s == 0 else 100 + s}}}"),
                           finish_reason="length" if s == n - 1 else "stop")
                for i, prompt in enumerate(prompts) for s in range(n)]

    monkeypatch.setattr(tasks, "generate", generate)
    records = tasks.evaluate(None, tokenizer, task, problems, n=3, chunk=2, show_progress=False)
    assert [r["id"] for r in records] == [p["id"] for p in problems]
    for record in records:
        assert [s["status"] for s in record["samples"]] == ["correct", "incorrect", "incorrect"]
        assert [s["extracted"] for s in record["samples"]][1:] == ["101", "102"]
        assert [s["finish"] for s in record["samples"]] == ["stop", "stop", "length"]


def test_evaluation_samples_at_the_settings_it_is_given(monkeypatch):
    """evaluate hands its temperature and top_p to the sampler; heldout_accuracy its temperature to evaluate."""
    from sampler import Completion

    seen = []

    def generate(model, prompts, max_new_tokens, **kwargs):
        seen.append((max_new_tokens, kwargs["temperature"], kwargs["top_p"]))
        return [Completion(0, [5], [0.0], "stop")]

    monkeypatch.setattr(tasks, "generate", generate)
    tokenizer = types.SimpleNamespace(eos_token_ids=[2], path=None,
                                      decode=lambda tokens, skip_special_tokens=True: "\\boxed{1}")
    task = type("OneTokenPrompt", (tasks.Task,), {"prompt": lambda self, tokenizer, problem, instruction=None: [1]})()
    tasks.evaluate(None, tokenizer, task, [{"id": "a", "problem": "x", "answer": "1"}], n=1, temperature=0.6,
                   top_p=0.5, max_new_tokens=9, show_progress=False)
    assert seen == [(9, 0.6, 0.5)]
    temperatures = []
    monkeypatch.setattr(tasks, "evaluate", lambda *args, **kwargs: temperatures.append(kwargs["temperature"]) or [
        {"samples": [{"status": "correct", "extracted": "1", "length": 1, "finish": "stop"}]}])
    tasks.heldout_accuracy(None, None, tasks.DemoTask(), [{}], 0.0, 64, "none", 0, 0, 1)
    assert temperatures == [0.0]
