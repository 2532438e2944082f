# python -m pytest tests/test_experiments.py -q
"""experiments/: each question's script (and headline.py, the README's main command over seeds) runs end to end on
its --quick budget (one seed, a couple of steps) so it cannot rot; each reported number (rows, paired differences,
mean ± std, the flags each run gets) is checked with the trainers and measurements faked (FakeRuns); plot.py draws
metrics.jsonl files; MetricsLog logs to Weights & Biases when asked (a fake wandb module); the demo's difficulty knob
leaves the default distribution as it was."""

import json
import os
import random
import subprocess
import sys
import types

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "experiments"))  # the questions import harness as a sibling

import plot  # noqa: E402
import tasks  # noqa: E402
from common import MetricsLog  # noqa: E402
from model import Transformer  # noqa: E402
from tasks import DemoTask, build_demo_model, demo_level, demo_problem, demo_problems  # noqa: E402

QUESTIONS = ["kl_removal", "recipes", "extrapolation", "kl_form", "faked_traces"]


# -----------------------------------------------------------------------------
# the demo's difficulty knob


def test_demo_defaults_are_the_old_distribution():
    """demo_problem(rng) with the default knobs makes the draws it always made: the held-out set and the training
    stream (which the demo's results and other tests rest on) are unchanged, pinned by a digest."""
    import hashlib

    digest = lambda problems: hashlib.sha256(json.dumps(problems).encode()).hexdigest()[:16]
    assert demo_problems(500, 1234, heldout=True) == demo_problems(500, 1234, heldout=True, level=None)
    assert DemoTask().test_problems() == DemoTask(level=None).test_problems()
    rng_a, rng_b = random.Random(5), random.Random(5)
    assert [demo_problem(rng_a) for _ in range(50)] == [demo_problem(rng_b, steps=(2, 4), max_operand=9)
                                                         for _ in range(50)]
    assert digest(DemoTask().test_problems()) == "87b70b6e5e24c1d1"
    assert digest(DemoTask().train_problems(0)[:200]) == "ebef2f278575ad7b"


def test_demo_levels():
    assert demo_level(None) == {} and demo_level("") == {}
    assert demo_level("5") == dict(steps=(5, 5), max_operand=9)
    assert demo_level("2-3:19") == dict(steps=(2, 3), max_operand=19)
    for bad in ("x", "3-2", "0", "2:0"):
        with pytest.raises(SystemExit):
            demo_level(bad)
    for level, steps in (("2", 2), ("6", 6)):
        task = DemoTask(test_size=20, level=level)
        problems = demo_problems(20, 1234, heldout=True, level=level)
        assert all(len(p["steps"]) == steps for p in problems)
        assert task.name == f"demo-{level}" and len(task.test_problems()) == 20
    big = demo_problems(200, 1, heldout=False, level="3:19")
    assert max(k for p in big for _, op, k, _ in p["steps"] if op == "+") > 9
    # a level's held-out problems never meet its training stream (the split is the text's hash)
    train = {p["problem"] for p in DemoTask(level="5").train_problems(0)[:2000]}
    assert not train & {p["problem"] for p in DemoTask(test_size=200, level="5").test_problems()}


# -----------------------------------------------------------------------------
# Weights & Biases through MetricsLog


class FakeConfig:
    def __init__(self, **values):
        self.__dict__.update(values)


def test_metrics_log_wandb(tmp_path, monkeypatch):
    calls = []
    run = types.SimpleNamespace(log=lambda values, step=None: calls.append(("log", values, step)),
                                finish=lambda: calls.append(("finish",)))
    fake = types.ModuleType("wandb")
    fake.init = lambda **kwargs: calls.append(("init", kwargs)) or run
    monkeypatch.setitem(sys.modules, "wandb", fake)
    config = FakeConfig(wandb_project="r1-demo", wandb_run_name="", lr=0.1)
    log = MetricsLog(str(tmp_path / "run" / "metrics.jsonl"), enabled=True, config=config)
    log.write(step=1, loss=2.5)
    log.write(step=2, heldout_accuracy=40.0)
    log.close()
    assert calls[0] == ("init", dict(project="r1-demo", name="run", config={"wandb_project": "r1-demo",
                                                                           "wandb_run_name": "", "lr": 0.1}))
    assert calls[1:] == [("log", {"loss": 2.5}, 1), ("log", {"heldout_accuracy": 40.0}, 2), ("finish",)]
    assert len(plot.read_metrics(str(tmp_path / "run" / "metrics.jsonl"))) == 2  # the file is written as before
    # off: no project, or not rank 0
    calls.clear()
    MetricsLog(str(tmp_path / "a" / "m.jsonl"), config=FakeConfig(wandb_project="")).write(step=1, loss=1.0)
    MetricsLog(str(tmp_path / "b" / "m.jsonl"), enabled=False, config=config).write(step=1, loss=1.0)
    assert calls == []


def test_metrics_log_wandb_missing(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb raises ImportError
    with pytest.raises(SystemExit, match="wandb_project=r1-demo: wandb is not installed"):
        MetricsLog(str(tmp_path / "metrics.jsonl"), config=FakeConfig(wandb_project="r1-demo"))


def test_trainers_take_the_wandb_flags():
    import train_grpo
    import train_sft
    from common import parse_config

    for module in (train_sft, train_grpo):
        config = parse_config(module.Config, module.PRESETS, ["--wandb_project=p", "--wandb_run_name=n"])
        assert (config.wandb_project, config.wandb_run_name) == ("p", "n")
        assert module.Config().wandb_project == ""


# -----------------------------------------------------------------------------
# plot.py


def write_metrics(path, rows):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
        f.write('{"step": 9, "torn')  # a line torn by a kill is skipped
    return path


def test_plot_cli_and_runs(tmp_path):
    a = write_metrics(str(tmp_path / "a" / "metrics.jsonl"),
                      [{"step": 0, "heldout_accuracy": 10.0}] + [{"step": s, "kl": 0.01 * s, "entropy": 1.0 - 0.1 * s,
                                                                  "reward": 0.1} for s in range(1, 5)]
                      + [{"step": 4, "heldout_accuracy": 20.0}])
    b = write_metrics(str(tmp_path / "b" / "metrics.jsonl"), [{"step": s, "kl": 0.02 * s} for s in range(1, 4)])
    assert plot.series(plot.read_metrics(a), "heldout_accuracy") == [(0, 10.0), (4, 20.0)]
    assert plot.mean_series([[(1, 1.0), (2, 3.0)], [(1, 3.0), (3, 5.0)]]) == [(1, 2.0)]
    out = subprocess.run([sys.executable, os.path.join(ROOT, "plot.py"), a, "--keys=heldout_accuracy,kl,entropy"],
                         capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    svg = open(tmp_path / "a" / "metrics.svg").read()
    assert svg.startswith("<svg") and svg.count("<polyline") == 3 and "heldout_accuracy" in svg
    assert plot.main([a, b, "--keys=kl", f"--out={tmp_path / 'both.svg'}"]) == str(tmp_path / "both.svg")
    assert open(tmp_path / "both.svg").read().count("<polyline") == 2
    path = plot.plot_runs({"x": [a, b], "y": [b]}, ["kl"], str(tmp_path / "runs.svg"), title="t")
    svg = open(path).read()
    assert svg.count("<polyline") == 3 + 2 and "x (mean of 2)" in svg  # a thin line per run, a thick mean each
    with pytest.raises(SystemExit):
        plot.main([str(tmp_path / "missing.jsonl")])


# -----------------------------------------------------------------------------
# each question on its --quick budget


@pytest.fixture(scope="module")
def quick_root(tmp_path_factory):
    return tmp_path_factory.mktemp("experiments")  # the questions share its _sft cache, as the real runs do


@pytest.mark.slow
@pytest.mark.parametrize("question", QUESTIONS)
def test_question_runs_quick(question, quick_root):
    import importlib

    module = importlib.import_module(question)
    out = quick_root / question
    summary = module.main(["--quick", "--seeds=0", f"--out={out}"])
    assert summary and all(stats["runs"] == 1 for stats in summary.values())
    results = json.loads((out / "results.json").read_text())
    assert results["quick"] and results["seeds"] == [0] and results["rows"]
    markdown = (out / "results.md").read_text()
    assert "QUICK RUN" in markdown and "| setting |" in markdown
    assert any(name.endswith(".svg") for name in os.listdir(out))


def test_sft_steps_flag_keeps_its_runs_apart():
    """--sft_steps=N: the budget's SFT length, and a tag that names its own shared SFT and GRPO runs and its default
    folder, so that no run trained from the default SFT is read back as one from another length."""
    from harness import BUDGET, QUICK, parse_args

    default = parse_args("kl_removal", [])
    assert default.budget == BUDGET and default.sft_tag == ""
    assert default.out.endswith(os.path.join("results", "kl_removal"))
    assert parse_args("kl_removal", [f"--sft_steps={BUDGET['sft_steps']}"]).sft_tag == ""  # the default, named
    shorter = parse_args("kl_removal", ["--sft_steps=600"])
    assert shorter.budget == dict(BUDGET, sft_steps=600) and shorter.sft_tag == "_sft600"
    assert shorter.out.endswith(os.path.join("results", "kl_removal_sft600"))
    quick = parse_args("recipes", ["--quick", "--sft_steps=6"])
    assert quick.budget == dict(QUICK, sft_steps=6) and quick.out.endswith("recipes_sft6")
    for bad in ("0", "-3", "x", ""):
        with pytest.raises(SystemExit, match="sft_steps"):
            parse_args("kl_removal", [f"--sft_steps={bad}"])
        with pytest.raises(SystemExit, match="jobs"):
            parse_args("kl_removal", [f"--jobs={bad}"])
    assert default.jobs == min(3, os.cpu_count() + 1) and parse_args("recipes", ["--seeds=4", "--jobs=2"]).jobs == 2
    assert parse_args("recipes", [f"--seeds={','.join(map(str, range(20)))}"]).jobs == min(20, os.cpu_count() + 1)


def test_cache_reads_a_run_back_only_while_its_inputs_are_the_same(tmp_path):
    """A finished step is read back when asked again with the same key (across invocations too); another key, or a
    remade run it measured, makes it again; --rerun remakes each step once per invocation, not each time a script
    asks for it (base_grpo asks for base_sft again); a trainer's flags carry the make of the run they start from."""
    from harness import Experiment

    made = []
    step = lambda tag: lambda run_dir: made.append(tag) or dict(tag=tag, final=os.path.join(run_dir, "final"))
    exp = Experiment("kl_removal", "t", ["--quick", "--seeds=0", f"--out={tmp_path}"])
    sft = exp.cached_step("sft", 0, step("sft 1"), key=["flags"])
    measured = exp.cached_step("measured", 0, step("measured 1"), key=[sft])
    assert exp.cached_step("sft", 0, step("sft 2"), key=["flags"]) == sft
    again = Experiment("kl_removal", "t", ["--quick", "--seeds=0", f"--out={tmp_path}"])
    assert again.cached_step("measured", 0, step("measured 2"), key=[sft]) == measured
    assert again.cached_step("sft", 0, step("sft 3"), key=["other flags"])["tag"] == "sft 3" and made[-1] == "sft 3"
    rerun = Experiment("kl_removal", "t", ["--quick", "--seeds=0", f"--out={tmp_path}", "--rerun"])
    new_sft = rerun.cached_step("sft", 0, step("sft 4"), key=["other flags"])
    assert rerun.cached_step("sft", 0, step("sft 5"), key=["other flags"]) == new_sft  # once per invocation
    later = Experiment("kl_removal", "t", ["--quick", "--seeds=0", f"--out={tmp_path}"])
    assert later.cached_step("measured", 0, step("measured 3"), key=[new_sft])["tag"] == "measured 3"
    assert made == ["sft 1", "measured 1", "sft 3", "sft 4", "measured 3"]
    stamps = Experiment._made_stamps([f"--model={new_sft['final']}", f"--data={tmp_path}/elsewhere.jsonl", "--lr=1"])
    assert stamps == [new_sft["made"]]


def test_another_demo_model_makes_the_inits_and_the_runs_from_them_again(tmp_path, monkeypatch):
    """The untrained init is a cached step keyed on tasks.DEMO_MODEL, and an SFT's flags carry its make: retuning the
    demo model remakes the init and every run started from it instead of reading back runs of the old model."""
    import harness

    exp = harness.Experiment("kl_removal", "t", ["--quick", "--seeds=0", f"--out={tmp_path}"])
    init = exp.init(0)
    first = Transformer.from_pretrained(init).config
    stamps = harness.Experiment._made_stamps([f"--model={init}"])
    assert first.hidden_size == harness.DEMO_MODEL["hidden_size"] and len(stamps) == 1
    assert exp.init(0) == init and harness.Experiment._made_stamps([f"--model={init}"]) == stamps
    monkeypatch.setattr(harness, "DEMO_MODEL", dict(harness.DEMO_MODEL, hidden_size=64, intermediate_size=128))
    monkeypatch.setattr(tasks, "DEMO_MODEL", harness.DEMO_MODEL)
    later = harness.Experiment("kl_removal", "t", ["--quick", "--seeds=0", f"--out={tmp_path}"])
    assert later.init(0) == init and Transformer.from_pretrained(init).config.hidden_size == 64
    assert harness.Experiment._made_stamps([f"--model={init}"]) != stamps


@pytest.mark.slow
def test_sft_steps_runs_its_own_shared_sft(tmp_path):
    """A question with --sft_steps beside the default in one folder tree: the longer SFT is trained for its own
    steps (not read back from the default's cache), and the shared GRPO starts from it."""
    import kl_removal

    kl_removal.main(["--quick", "--seeds=0", f"--out={tmp_path / 'kl_removal'}"])
    kl_removal.main(["--quick", "--seeds=0", "--sft_steps=6", f"--out={tmp_path / 'kl_removal_sft6'}"])
    shared = tmp_path / "_sft" / "runs"
    steps = lambda run: max(r["step"] for r in plot.read_metrics(str(shared / run / "seed0" / "metrics.jsonl")))
    assert steps("sft") == 4 and steps("sft_sft6") == 6
    flags = json.loads((shared / "grpo_sft6" / "seed0" / "done.json").read_text())["flags"]
    assert f"--model={shared / 'sft_sft6' / 'seed0' / 'final'}" in flags


@pytest.mark.slow
def test_seeds_side_by_side_give_the_rows_of_one_after_another(tmp_path):
    """--jobs=2: each seed's runs are made in a child process (its log in runs/seed<k>.log); the parent reads them
    back and writes the same rows as a run of the seeds one after another in one process."""
    import kl_removal

    kl_removal.main(["--quick", "--seeds=0,1", "--jobs=2", f"--out={tmp_path / 'side' / 'kl_removal'}"])
    kl_removal.main(["--quick", "--seeds=0,1", "--jobs=1", f"--out={tmp_path / 'serial' / 'kl_removal'}"])
    side, serial = (json.loads((tmp_path / name / "kl_removal" / "results.json").read_text())
                    for name in ("side", "serial"))
    assert (side["jobs"], serial["jobs"]) == (2, 1)
    drop_walls = lambda rows: [{k: v for k, v in r.items() if k != "wall_s"} for r in rows]
    assert drop_walls(side["rows"]) == drop_walls(serial["rows"]) and {r["seed"] for r in side["rows"]} == {0, 1}
    for seed in (0, 1):
        assert "train_grpo" in (tmp_path / "side" / "kl_removal" / "runs" / f"seed{seed}.log").read_text()
    assert not (tmp_path / "serial" / "kl_removal" / "runs" / "seed0.log").exists()


@pytest.mark.slow
def test_headline_runs_quick(tmp_path):
    """experiments/headline.py: the README's two commands and eval.py per seed, on a tiny budget; a second call reads
    the finished seed back instead of training again, unless it was made from other inputs (another demo model)."""
    import headline

    stats = headline.main(["--quick", "--seeds=3", f"--out={tmp_path}"])
    run = json.loads((tmp_path / "runs" / "seed_3" / "result.json").read_text())
    assert run["seed"] == 3 and run["eval_problems"] == 16 and run["gain"] == run["grpo_accuracy"] - run["sft_accuracy"]
    assert stats["gain"][0] == run["gain"]
    for checkpoint in ("sft", "grpo"):  # pass@1 over 4 samples per problem: half the sampling noise of one
        scores = json.loads((tmp_path / "runs" / "seed_3" / f"eval_{checkpoint}" / "results.json").read_text())
        assert scores["results"]["demo"]["n"] == run["eval_samples"] == 4
    assert "QUICK RUN" in (tmp_path / "results.md").read_text()
    assert (tmp_path / "runs" / "seed_3" / "grpo" / "final" / "config.json").exists()
    assert run["commit"] in (tmp_path / "results.md").read_text() and run["started"] <= run["finished"]
    os.remove(tmp_path / "runs" / "seed_3" / "sft.log")
    headline.main(["--quick", "--seeds=3", f"--out={tmp_path}"])
    assert not (tmp_path / "runs" / "seed_3" / "sft.log").exists()  # not trained again
    run["inputs"]["demo_model"]["hidden_size"] += 64  # as if made with another demo model: trained again
    (tmp_path / "runs" / "seed_3" / "result.json").write_text(json.dumps(run))
    headline.main(["--quick", "--seeds=3", f"--out={tmp_path}"])
    assert (tmp_path / "runs" / "seed_3" / "sft.log").exists()


def test_eval_logs_to_wandb(tmp_path, monkeypatch):
    """eval.py --wandb_project: the scores go to the run as one line (and to out_dir/metrics.jsonl)."""
    import eval as eval_script

    calls = []
    fake = types.ModuleType("wandb")
    fake.init = lambda **kwargs: calls.append(("init", kwargs)) or types.SimpleNamespace(
        log=lambda values, step=None: calls.append(("log", values, step)), finish=lambda: None)
    monkeypatch.setitem(sys.modules, "wandb", fake)
    model = build_demo_model(str(tmp_path / "init"))
    eval_script.main([f"--model={model}", "--demo_problems=2", "--max_new_tokens=4", f"--out_dir={tmp_path / 'eval'}",
                      "--wandb_project=r1-eval"])
    assert calls[0][0] == "init" and calls[0][1]["project"] == "r1-eval" and calls[0][1]["config"]["demo_problems"] == 2
    assert calls[1][0] == "log" and calls[1][1]["demo/problems"] == 2 and "demo/pass@1" in calls[1][1]


def test_plot_series_reads_every_line_keeps_a_steps_last_value_and_orders_by_step(tmp_path):
    rows = [{"step": 2, "loss": 3.0}, {"step": 1, "loss": 4.0}, {"step": 2, "loss": 2.5},
            {"step": 3, "loss": float("nan")}, {"step": 4, "loss": 1.0}, {"step": 0, "combined_score": -12.5}]
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))  # whole lines only: the last one too
    records = plot.read_metrics(str(path))
    assert len(records) == len(rows)
    assert plot.series(records, "loss") == [(1, 4.0), (2, 2.5), (4, 1.0)]  # by step, step 2's last value, no NaN
    assert plot.series(records, "combined_score") == [(0, -12.5)]  # an eval's one line, last in the file


# -----------------------------------------------------------------------------
# the numbers each question reports, through the real harness with the trainers and measurements faked


def fake_value(*parts) -> float:
    """A number in [0, 100) that is a fixed function of its parts: what a fake run or measurement reports."""
    import hashlib

    digest = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()
    return int(digest[:12], 16) / 16 ** 12 * 100


class FakeRuns:
    """Stands in for train_sft.main, train_grpo.main, make_traces.main and the measurements (accuracy, drift), so
    that a question's main() runs in a moment through the real harness (its cache, rows, paired rows and summary).
    A fake trainer writes a metrics.jsonl and a final/ folder holding what it was asked; every number a fake reports
    is fake_value of what it was asked (the trainer's flags; the checkpoints' own flags, level, seed, budget), with
    the temporary folder's path written as ROOT so that the numbers are the same on every run of a test. A test can
    so compute what each row should hold from the run folders it should come from."""

    STEPS = 8

    def __init__(self, root, monkeypatch):
        import harness
        import make_traces
        import train_grpo
        import train_sft

        self.root, self.calls = str(root), []
        monkeypatch.setattr(train_sft, "main", lambda argv: self.trainer("train_sft", argv))
        monkeypatch.setattr(train_grpo, "main", lambda argv: self.trainer("train_grpo", argv))
        monkeypatch.setattr(make_traces, "main", self.make_traces)
        monkeypatch.setattr(harness, "accuracy", self.accuracy)
        monkeypatch.setattr(harness, "drift", self.drift)
        for question in ("kl_removal", "kl_form", "faked_traces", "extrapolation", "recipes"):
            module = __import__(question)
            for name in ("accuracy", "drift"):
                if hasattr(module, name):
                    monkeypatch.setattr(module, name, getattr(self, name))

    def relative(self, value):
        return json.loads(json.dumps(value).replace(self.root, "ROOT"))

    def identity(self, path):
        """What made a checkpoint: the trainer and its flags (as the fake trainer wrote them), else its path."""
        asked = os.path.join(path, "asked.json")
        return json.load(open(asked)) if os.path.exists(asked) else self.relative(path)

    def trainer(self, name, argv):
        flags = dict(a[2:].split("=", 1) for a in argv)  # later flags win, as common.parse_config
        out = flags.pop("out_dir")
        asked = self.relative([name, flags])
        self.calls.append(asked)
        os.makedirs(os.path.join(out, "final"), exist_ok=True)
        with open(os.path.join(out, "final", "asked.json"), "w") as f:
            json.dump(asked, f)
        rows = [] if flags.get("eval_problems") == "0" else [dict(step=0, heldout_accuracy=fake_value("start", asked))]
        rows += [dict(step=s, loss=fake_value("loss", s, asked), **{key: fake_value(key, s, asked) for key in (
            ["reward", "kl", "entropy", "length"] if name == "train_grpo" else [])}) for s in range(1, self.STEPS + 1)]
        if flags.get("eval_problems") != "0":
            rows.append(dict(step=self.STEPS, heldout_accuracy=fake_value("end", asked)))
        write_metrics(os.path.join(out, "metrics.jsonl"), rows)

    def make_traces(self, argv):
        flags = dict(a[2:].split("=", 1) for a in argv)
        asked = [self.identity(flags["teacher"]), flags["hint"], flags["seed"], flags["demo_problems"]]
        self.calls.append(["make_traces", asked])
        rows = [dict(prompt=f"p{i}", completion=f"1 + {i} = {1 + i + (i % 3 == 0)}", answer=str(i))
                for i in range(int(fake_value("traces", asked) // 20) + 1)]
        os.makedirs(flags["out_dir"], exist_ok=True)
        with open(os.path.join(flags["out_dir"], "traces.jsonl"), "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)
        return {"teacher_pass@1": fake_value("pass1", asked), "hinted_pass@1": fake_value("hinted", asked),
                "rejected": {}}

    def accuracy(self, path, level=None, problems=200, max_new_tokens=64, seed=0):
        return fake_value("accuracy", self.identity(path), level, problems, max_new_tokens, seed)

    def drift(self, path, start_path, problems=64, max_new_tokens=64, seed=0):
        asked = [self.identity(path), self.identity(start_path), problems, max_new_tokens, seed]
        return {key: fake_value(key, asked) for key in ("kl_reverse", "kl_forward", "entropy", "length")}

    def last_eval(self, run_dir):
        return fake_value("end", json.load(open(os.path.join(run_dir, "final", "asked.json"))))

    def flags(self, run_dir):
        return json.load(open(os.path.join(run_dir, "final", "asked.json")))[1]


def question_rows(out):
    results = json.loads((out / "results.json").read_text())
    return {(r["setting"], r["seed"]): r for r in results["rows"]}, results["summary"]


def test_mean_std_is_the_sample_std_over_the_finite_numbers_and_the_table_prints_both():
    """The results' error bars: mean ± the sample std (n - 1) over seeds, of the finite numbers only (a NaN or a
    missing value of one run does not turn the setting's cell into NaN); results.md prints the mean and the std."""
    from harness import format_mean_std, mean_std

    assert mean_std([1.0, 2.0, 4.0, None, float("nan"), "x"]) == dict(mean=7 / 3, std=pytest.approx(1.5275252, 1e-6),
                                                                       n=3)
    assert mean_std([5]) == dict(mean=5.0, std=0.0, n=1) and mean_std([None, float("inf")]) is None
    assert format_mean_std(dict(mean=61.25, std=2.5, n=3), "heldout_accuracy") == "61.2 ± 2.5"
    assert format_mean_std(dict(mean=0.012345, std=0.5, n=3), "kl_reverse") == "0.0123 ± 0.5000"
    assert format_mean_std(None, "kl_reverse") == "-"


def test_a_row_holds_the_last_eval_the_mean_of_the_last_five_steps_and_measured_values_win(tmp_path):
    """Experiment.add: heldout_accuracy is the run's last held-out eval (heldout_start its step-0 one, None when it
    has none: a later eval is not the start), train_<key> the mean of the last 5 training steps' values, and values
    the script measured or summed override the run's."""
    from harness import Experiment

    records = [dict(step=0, heldout_accuracy=10.0)] + [dict(step=s, loss=1.0, reward=float(s), kl=0.1 * s)
                                                        for s in range(1, 11)] + [dict(step=10, heldout_accuracy=30.0)]
    metrics = write_metrics(str(tmp_path / "run" / "metrics.jsonl"), records)
    exp = Experiment("kl_removal", "t", ["--quick", "--seeds=0", f"--out={tmp_path / 'q'}"])
    row = exp.add("a", 0, dict(metrics=metrics, wall_s=7.0))
    assert (row["heldout_start"], row["heldout_accuracy"], row["wall_s"]) == (10.0, 30.0, 7.0)
    assert row["train_reward"] == 8.0 and row["train_kl"] == pytest.approx(0.8) and "train_entropy" not in row
    row = exp.add("b", 0, dict(metrics=metrics, wall_s=7.0), wall_s=12.0, heldout_accuracy=55.0, kl_reverse=0.3)
    assert (row["wall_s"], row["heldout_accuracy"], row["kl_reverse"]) == (12.0, 55.0, 0.3)
    late = write_metrics(str(tmp_path / "late" / "metrics.jsonl"), records[1:])  # no eval of the start
    assert exp.add("c", 0, dict(metrics=late, wall_s=1.0))["heldout_start"] is None


def test_paired_rows_are_the_per_seed_difference_a_minus_b(tmp_path):
    """Experiment.paired(label, a, b): per seed, a's value minus b's (a setting better than b gives a positive
    difference), only for seeds both have; its summary is the mean ± sample std of those differences."""
    from harness import Experiment

    exp = Experiment("kl_removal", "t", ["--quick", "--seeds=0,1,2", "--jobs=1", f"--out={tmp_path}"])
    for seed, (a, b) in enumerate([(50.0, 40.0), (60.0, 45.0), (55.0, 50.0)]):
        exp.add("a", seed, heldout_accuracy=a, kl=None)
        if seed != 1:
            exp.add("b", seed, heldout_accuracy=b, kl=1.0)
    exp.paired("a minus b", "a", "b", ["heldout_accuracy", "kl"])
    assert [r for r in exp.rows if r["setting"] == "a minus b"] == [
        dict(setting="a minus b", seed=0, heldout_accuracy=10.0),
        dict(setting="a minus b", seed=2, heldout_accuracy=5.0)]
    summary = exp.finish(["heldout_accuracy"], plots={})
    assert summary["a minus b"]["heldout_accuracy"] == dict(mean=7.5, std=pytest.approx(3.5355339), n=2)
    assert "| a minus b | 2 | 7.5 ± 3.5 |" in (tmp_path / "results.md").read_text()


def test_each_seed_gets_its_own_untrained_init_and_run_folders(tmp_path):
    """The seeds are independent replicates: each seed's init has its own weights in its own folder, and each
    seed's run folder is its own (a seed never reads back, or overwrites, another seed's run)."""
    import torch

    from harness import Experiment

    exp = Experiment("kl_removal", "t", ["--quick", "--seeds=0,1", "--jobs=1", f"--out={tmp_path}"])
    inits = [exp.init(seed) for seed in (0, 1)]
    assert inits[0] != inits[1]
    weights = [Transformer.from_pretrained(path).state_dict() for path in inits]
    assert any(not torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert len({exp.run_dir("sft", seed) for seed in (0, 1, 2)}) == 3


def test_the_training_flags_carry_the_questions_overrides_the_data_and_the_make_of_the_start(tmp_path, monkeypatch):
    """Experiment.grpo/sft: the question's own flags come after the budget's (later flags win, so --lr and
    --prompts_per_step of kl_form take effect), data= reaches the SFT as --data, and a run started from another
    run is made again when that run is made again (not read back as if trained from the new one)."""
    fake = FakeRuns(tmp_path, monkeypatch)
    from harness import Experiment

    exp = Experiment("kl_removal", "t", ["--quick", "--seeds=0", f"--out={tmp_path / 'q'}"])
    sft = exp.sft("sft", 0, data=str(tmp_path / "traces.jsonl"))
    assert fake.flags(exp.run_dir("sft", 0))["data"] == "ROOT/traces.jsonl"
    exp.grpo("grpo", 0, sft["final"], extra=["--lr=1e-3", "--prompts_per_step=16"])
    flags = fake.flags(exp.run_dir("grpo", 0))
    assert (flags["lr"], flags["prompts_per_step"], flags["seed"]) == ("1e-3", "16", "0")
    made = len(fake.calls)
    Experiment("kl_removal", "t", ["--quick", "--seeds=0", f"--out={tmp_path / 'q'}", "--rerun"]).sft(
        "sft", 0, data=str(tmp_path / "traces.jsonl"))
    later = Experiment("kl_removal", "t", ["--quick", "--seeds=0", f"--out={tmp_path / 'q'}"])
    later.grpo("grpo", 0, sft["final"], extra=["--lr=1e-3", "--prompts_per_step=16"])
    assert len(fake.calls) == made + 2  # the SFT again, and the GRPO from it again


def test_seeds_side_by_side_pass_the_flags_to_each_childs_runs(tmp_path, monkeypatch):
    """--jobs: each seed's child process gets the question's flags (--quick, --rerun, --sft_steps, --out) and its
    own seed, so that what the parent reads back from the cache is what it was asked for."""
    import harness

    started = []

    class Child:
        returncode = 0

        def __init__(self, argv, **kwargs):
            started.append(argv)

        def poll(self):
            return 0

    monkeypatch.setattr(harness.subprocess, "Popen", Child)
    monkeypatch.setattr(harness.time, "sleep", lambda s: None)
    exp = harness.Experiment("recipes", "t", ["--quick", "--seeds=3,4", "--jobs=2", "--rerun", "--sft_steps=6",
                                              f"--out={tmp_path}"])
    assert [argv[2] for argv in started] == ["--seeds=3", "--seeds=4"]
    for argv in started:
        assert argv[1].endswith(os.path.join("experiments", "recipes.py"))
        assert {f"--out={tmp_path}", "--jobs=1", "--fill_cache", "--sft_steps=6", "--quick", "--rerun"} <= set(argv)
    assert not exp.args.rerun  # the children's runs are this invocation's


def test_drift_is_the_exact_per_token_kl_both_ways_and_entropy_of_each_completion_token(tmp_path, monkeypatch):
    """harness.drift against a token-by-token computation: at each completion token, the full next-token
    distributions of the policy (pi) and of the start (q) given everything before it; KL(pi||q), KL(q||pi) and
    H(pi) averaged over all completion tokens of all completions (an empty one adds none), and the mean length."""
    import torch

    import harness
    from sampler import Completion

    policy, start = build_demo_model(str(tmp_path / "pi"), seed=1), build_demo_model(str(tmp_path / "q"), seed=2)
    task = DemoTask(test_size=3)
    tokenizer = harness.load(policy)[1]
    prompts = [task.prompt(tokenizer, p) for p in task.test_problems()]
    completions = [Completion(0, [5, 9, 7, 11]), Completion(1, []), Completion(2, [8, 6])]
    monkeypatch.setattr(harness, "generate", lambda model, asked, *args, **kwargs: completions
                        if asked == prompts else pytest.fail("drift sampled other prompts"))
    measured = harness.drift(policy, start, problems=3, max_new_tokens=4, seed=0)
    pi_model, q_model = harness.load(policy)[0], harness.load(start)[0]
    reverse = forward = entropy = 0.0
    tokens = 0
    with torch.no_grad():
        for c in completions:
            for j in range(len(c.tokens)):
                prefix = torch.tensor([prompts[c.prompt_index] + c.tokens[:j]])
                pi = torch.softmax(pi_model(prefix)[0, -1].double(), -1)
                q = torch.softmax(q_model(prefix)[0, -1].double(), -1)
                reverse += float((pi * (pi.log() - q.log())).sum())
                forward += float((q * (q.log() - pi.log())).sum())
                entropy -= float((pi * pi.log()).sum())
                tokens += 1
    assert tokens == 6 and reverse > 0.01 and abs(reverse - forward) > 1e-4
    assert measured["kl_reverse"] == pytest.approx(reverse / tokens, rel=1e-4)
    assert measured["kl_forward"] == pytest.approx(forward / tokens, rel=1e-4)
    assert measured["entropy"] == pytest.approx(entropy / tokens, rel=1e-4)
    assert measured["length"] == 2.0


def test_accuracy_evaluates_the_levels_held_out_problems_with_the_seed_it_is_given(monkeypatch):
    """harness.accuracy(path, level, problems, max_new_tokens, seed): one sample at temperature 1 on that many
    held-out problems of that level, with that token budget and that sampling seed (a seed's measurement is its own)."""
    import harness

    asked = []
    monkeypatch.setattr(harness, "load", lambda path: ("model", "tokenizer"))
    monkeypatch.setattr(harness, "evaluate", lambda model, tokenizer, task, problems, **kwargs: asked.append(
        (problems, kwargs)) or "records")
    monkeypatch.setattr(harness, "metrics", lambda records, n: {"pass@1": 42.0} if records == "records" else None)
    assert harness.accuracy("m", level="6", problems=5, max_new_tokens=96, seed=3) == 42.0
    (problems, kwargs), = asked
    assert problems == DemoTask(test_size=5, level="6").test_problems() != DemoTask(test_size=5).test_problems()
    assert (kwargs["n"], kwargs["temperature"], kwargs["max_new_tokens"], kwargs["seed"]) == (1, 1.0, 96, 3)


def test_kl_removal_rows_measure_each_arms_own_run_against_its_sft(tmp_path, monkeypatch):
    """kl_removal with fake runs: each arm's GRPO run gets the arm's flags; its row's held-out accuracy is that run's
    last eval and its KL is drift(run, its seed's SFT); an arm's run made again is measured again; the paired rows
    are the arm minus beta=0."""
    fake = FakeRuns(tmp_path, monkeypatch)
    import kl_removal
    import train_grpo

    out = tmp_path / "kl_removal"
    argv = ["--quick", "--seeds=0,1", "--jobs=1", f"--out={out}"]
    kl_removal.main(argv)
    rows, _ = question_rows(out)
    runs = lambda setting, seed: os.path.join(out, "runs", setting.replace(" ", "_"), f"seed{seed}")
    shared = lambda name, seed: os.path.join(tmp_path, "_sft", "runs", name, f"seed{seed}")
    for seed in (0, 1):
        sft = os.path.join(shared("sft", seed), "final")
        for setting, flags in kl_removal.ARMS.items():
            run_dir = shared("grpo", seed) if flags == ["--beta=0"] else runs(setting, seed)
            asked = dict({"beta": str(train_grpo.Config().beta)}, **fake.flags(run_dir))  # beta=0: the default
            assert all(float(asked[k]) == float(v) if k == "beta" else asked[k] == v
                       for k, v in (f[2:].split("=") for f in flags)) and asked["seed"] == str(seed)
            assert asked["model"] == fake.relative(sft)
            row = rows[setting, seed]
            assert row["heldout_accuracy"] == fake.last_eval(run_dir)
            assert row["kl_reverse"] == fake.drift(os.path.join(run_dir, "final"), sft, 4, seed=seed)["kl_reverse"]
        for setting in list(kl_removal.ARMS)[1:]:
            paired = rows[f"{setting.split(', ')[1]} minus beta=0 (paired)", seed]
            for c in ("heldout_accuracy", "kl_reverse", "length"):
                assert paired[c] == rows[setting, seed][c] - rows["beta=0 (no reference)", seed][c]
    arm = list(kl_removal.ARMS)[1]
    monkeypatch.setitem(kl_removal.ARMS, arm, kl_removal.ARMS[arm] + ["--clip_eps=0.1"])  # that arm's run is remade
    kl_removal.main(argv)
    rows, _ = question_rows(out)
    sft = os.path.join(shared("sft", 0), "final")
    assert rows[arm, 0]["kl_reverse"] == fake.drift(os.path.join(runs(arm, 0), "final"), sft, 4, seed=0)["kl_reverse"]


def test_recipes_rows_come_from_each_seeds_own_runs_and_sum_the_walls_of_sft_then_grpo(tmp_path, monkeypatch):
    """recipes with fake runs: recipe 1 starts from its own seed's init, recipe 3's wall time is the SFT's plus the
    GRPO's (as is recipe 2 +RL's sequences'), "3 minus 2" is recipe 3's accuracy minus recipe 2's per seed, and RFT
    teaches the SFT checkpoint the traces it sampled itself on GRPO's number of problems."""
    fake = FakeRuns(tmp_path, monkeypatch)
    import recipes

    out = tmp_path / "recipes"
    recipes.main(["--quick", "--seeds=0,1", "--jobs=1", f"--out={out}"])
    rows, summary = question_rows(out)
    wall = lambda run_dir: json.load(open(os.path.join(run_dir, "done.json")))["wall_s"]
    for seed in (0, 1):
        rl_only = os.path.join(out, "runs", "1:_GRPO_from_the_untrained_model", f"seed{seed}")
        assert fake.flags(rl_only)["model"] == fake.relative(os.path.join(out, "runs", "init", f"seed{seed}"))
        sft, grpo = (os.path.join(tmp_path, "_sft", "runs", name, f"seed{seed}") for name in ("sft", "grpo"))
        assert rows["3: SFT then GRPO", seed]["wall_s"] == pytest.approx(wall(sft) + wall(grpo), rel=1e-12)
        assert rows["3: SFT then GRPO", seed]["heldout_accuracy"] == fake.last_eval(grpo)
        assert rows["2: SFT only", seed]["heldout_accuracy"] == fake.last_eval(sft)
        assert rows["3 minus 2 (paired by seed)", seed]["heldout_accuracy"] == \
            fake.last_eval(grpo) - fake.last_eval(sft)
        # RFT: the SFT checkpoint samples GRPO's problems x group size, and is taught its own kept traces
        asked = [call[1] for call in fake.calls if call[0] == "make_traces" and call[1][2] == str(seed)]
        assert asked == [[fake.identity(os.path.join(sft, "final")), "never", str(seed), "4"]]
        rft = os.path.join(out, "runs", "2:_SFT_then_RFT", f"seed{seed}")
        assert fake.flags(rft)["model"] == fake.relative(os.path.join(sft, "final"))
        assert fake.flags(rft)["data"] == fake.relative(
            os.path.join(out, "runs", "2:_RFT_traces", f"seed{seed}", "traces", "traces.jsonl"))
        rft_accuracy = fake.accuracy(os.path.join(rft, "final"), None, 8, seed=seed)  # measured: no eval of its own
        assert rows["2: SFT then RFT", seed]["heldout_accuracy"] == rft_accuracy
        assert rows["3 minus RFT (paired)", seed]["heldout_accuracy"] == fake.last_eval(grpo) - rft_accuracy
    import statistics

    gains = [rows["3 minus 2 (paired by seed)", seed]["heldout_accuracy"] for seed in (0, 1)]
    assert summary["3 minus 2 (paired by seed)"]["heldout_accuracy"]["std"] == pytest.approx(statistics.stdev(gains))


def test_kl_form_runs_each_form_with_its_flags_and_measures_the_trained_policy(tmp_path, monkeypatch):
    """kl_form with fake runs: each form's GRPO run gets its direction, estimator and place of the KL term, and its
    row's held-out accuracy and KL are measured on that run's final policy (not on the SFT start)."""
    fake = FakeRuns(tmp_path, monkeypatch)
    import kl_form

    out = tmp_path / "kl_form"
    kl_form.main(["--quick", "--seeds=0", f"--out={out}"])
    rows, _ = question_rows(out)
    sft = os.path.join(tmp_path, "_sft", "runs", "sft", "seed0", "final")
    assert len(rows) == len(kl_form.RUN)
    for form in kl_form.RUN:
        setting = f"{form}, 2 prompts/step"
        run_dir = os.path.join(out, "runs", setting.replace(" ", "_").replace("/", "-"), "seed0")
        flags = fake.flags(run_dir)
        assert (flags["kl_direction"], flags["kl_estimator"], flags["kl_in"]) == kl_form.FORMS[form]
        assert (flags["beta"], flags["prompts_per_step"], flags["lr"]) == (str(kl_form.BETA), "2", "0.00015")
        final = os.path.join(run_dir, "final")
        assert rows[setting, 0]["heldout_accuracy"] == fake.accuracy(final, None, 8, seed=0)
        assert rows[setting, 0]["kl_forward"] == fake.drift(final, sft, 4, seed=0)["kl_forward"]


def test_slipped_finds_a_wrong_line_of_each_operation():
    """faked_traces.slipped: a trace slipped when one of its `a op b = c` lines is wrong, for +, - and *."""
    from faked_traces import slipped

    assert not slipped("7 + 5 = 12\n12 - 4 = 8\n8 * 3 = 24\nThe answer is 24")
    for wrong in ("7 + 5 = 13", "12 - 4 = 16", "12 - 4 = 9", "8 * 3 = 11", "8 * 3 = 25"):
        assert slipped(f"2 + 2 = 4\n{wrong}\n"), wrong


def test_faked_traces_students_learn_their_own_set_and_a_remade_weak_model_makes_its_sets_again(tmp_path,
                                                                                                 monkeypatch):
    """faked_traces with fake runs: each set's student is taught that set (--data), its sft_accuracy is the
    student's own, and the distilled and faked sets are made again when the weak model that wrote them is."""
    fake = FakeRuns(tmp_path, monkeypatch)
    import faked_traces

    out = tmp_path / "faked_traces"
    faked_traces.main(["--quick", "--seeds=0", f"--out={out}"])
    rows, _ = question_rows(out)
    run = lambda setting: os.path.join(out, "runs", setting.replace(" ", "_"), "seed0")
    paths = dict(teacher=os.path.join(run("data"), "traces.jsonl"),
                 distilled=os.path.join(run("distilled traces"), "traces", "traces.jsonl"),
                 faked=os.path.join(run("faked traces"), "traces", "traces.jsonl"))
    for name, path in paths.items():
        student = run(f"{name}: SFT")
        assert fake.flags(student)["data"] == fake.relative(path)
        row = rows[f"{name} traces", 0]
        assert row["sft_accuracy"] == fake.accuracy(os.path.join(student, "final"), None, 8, seed=0)
        assert row["heldout_accuracy"] == fake.last_eval(run(f"{name}: SFT then GRPO"))
        assert row["traces"] == len(open(path).readlines())
    made = [c for c in fake.calls if c[0] == "make_traces"]
    assert len(made) == 2
    faked_traces.main(["--quick", "--seeds=0", "--sft_steps=5", f"--out={out}"])  # another base: another weak model
    remade = [c for c in fake.calls if c[0] == "make_traces"][2:]
    assert len(remade) == 2 and remade[0][1][0] != made[0][1][0]


def test_extrapolation_gain_is_grpo_minus_sft_per_seed_at_every_level_with_the_long_budget(tmp_path, monkeypatch):
    """extrapolation with fake measurements: each level's cell is accuracy(model, level, 96 new tokens, the seed),
    and the GRPO gain row is the SFT then GRPO cell minus the SFT cell of the same seed."""
    fake = FakeRuns(tmp_path, monkeypatch)
    import extrapolation

    out = tmp_path / "extrapolation"
    extrapolation.main(["--quick", "--seeds=0,1", "--jobs=1", f"--out={out}"])
    rows, _ = question_rows(out)
    for seed in (0, 1):
        finals = {name: os.path.join(tmp_path, "_sft", "runs", name, f"seed{seed}", "final")
                  for name in ("sft", "grpo")}
        for name, level in extrapolation.LEVELS.items():
            sft, grpo = (fake.accuracy(finals[name], level, 8, 96, seed) for name in ("sft", "grpo"))
            assert rows["SFT", seed][f"level {name}"] == sft and rows["SFT then GRPO", seed][f"level {name}"] == grpo
            assert rows["GRPO gain (points)", seed][f"level {name}"] == grpo - sft


def test_headline_reports_each_seeds_own_runs_and_the_sample_std_over_seeds(tmp_path, monkeypatch):
    """headline.py with its steps faked: each seed's SFT and GRPO get its --seed (GRPO from that seed's SFT), the
    GRPO accuracy is the GRPO checkpoint's, results.json and the table's last row give mean ± sample std (n - 1)
    of each column, and --rerun runs every seed again instead of reading its result back."""
    import statistics

    import headline

    commands = []
    monkeypatch.setattr(headline, "run", lambda command, log: commands.append(command) or 60.0 * len(commands))
    monkeypatch.setattr(headline, "commit", lambda: "abc1234")
    accuracy = {("sft", 1): 50.0, ("grpo", 1): 70.0, ("sft", 2): 60.0, ("grpo", 2): 71.0, ("sft", 3): 58.0,
                ("grpo", 3): 75.5}

    def held_out(model, out_dir, problems, log):
        run, final = os.path.split(os.path.dirname(os.path.normpath(model))), os.path.basename(model)
        assert final == "final" and os.path.basename(out_dir) == f"eval_{run[1]}"
        return accuracy[run[1], int(os.path.basename(run[0]).removeprefix("seed_"))], 1.0

    monkeypatch.setattr(headline, "held_out", held_out)
    stats = headline.main(["--seeds=1,2,3", f"--out={tmp_path}"])
    assert len(commands) == 6
    for seed, (sft, grpo) in zip((1, 2, 3), zip(commands[::2], commands[1::2])):
        folder = os.path.join(str(tmp_path), "runs", f"seed_{seed}")
        assert "train_sft.py" in sft and f"--seed={seed}" in sft and f"--out_dir={folder}/sft" in sft
        assert "train_grpo.py" in grpo and f"--seed={seed}" in grpo and f"--model={folder}/sft/final" in grpo
    columns = {key: [accuracy[name, seed] for seed in (1, 2, 3)] for key, name in (("sft_accuracy", "sft"),
                                                                                     ("grpo_accuracy", "grpo"))}
    columns["gain"] = [g - s for g, s in zip(columns["grpo_accuracy"], columns["sft_accuracy"])]
    results = json.loads((tmp_path / "results.json").read_text())
    for key, values in columns.items():
        assert [r[key] for r in results["runs"]] == values
        assert results["mean_std"][key] == list(stats[key]) == [statistics.mean(values), statistics.stdev(values)]
    std = {key: f"{statistics.stdev(values):.1f}" for key, values in columns.items()}
    mean_row = (f"| mean ± std | 56.0 ± {std['sft_accuracy']}% | 72.2 ± {std['grpo_accuracy']}% | "
                f"+16.2 ± {std['gain']} |")
    assert mean_row == "| mean ± std | 56.0 ± 5.3% | 72.2 ± 2.9% | +16.2 ± 4.6 |"
    assert mean_row in (tmp_path / "results.md").read_text()
    headline.main(["--seeds=1,2,3", f"--out={tmp_path}"])
    assert len(commands) == 6  # read back
    headline.main(["--seeds=1,2,3", f"--out={tmp_path}", "--rerun"])
    assert len(commands) == 12


def test_plot_runs_draws_each_settings_mean_line_through_the_mean_of_its_runs_larger_values_higher(tmp_path):
    """plot_runs: the thick line of a setting passes, at each step, through the mean of its runs' thin lines (the
    y axis is linear, so the mean of the values is the mean of the heights), and a larger value is drawn higher
    (a smaller SVG y)."""
    import re

    a = [{"step": s, "kl": v} for s, v in enumerate([1.0, 3.0, 2.0, 5.0])]
    b = [{"step": s, "kl": v} for s, v in enumerate([3.0, 1.0, 4.0, 1.0])]
    svg = open(plot.plot_runs({"x": [a, b]}, ["kl"], str(tmp_path / "runs.svg"))).read()
    points = lambda text: [tuple(map(float, p.split(","))) for p in text.split()]
    lines = re.findall(r'stroke-width="([\d.]+)"[^>]*points="([^"]+)"', svg)
    thin = [points(p) for width, p in lines if width == "1"]
    (thick,) = [points(p) for width, p in lines if width == "2.5"]
    assert len(thin) == 2 and len(thick) == 4
    for step in range(4):
        assert thick[step][0] == thin[0][step][0] == thin[1][step][0]
        assert thick[step][1] == pytest.approx((thin[0][step][1] + thin[1][step][1]) / 2, abs=0.11)
    heights = [y for _, y in thin[0]]  # a: 1, 3, 2, 5
    assert heights[3] < heights[1] < heights[2] < heights[0]
