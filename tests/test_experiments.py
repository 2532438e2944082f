# python -m pytest tests/test_experiments.py -q
"""experiments/: each question's script (and headline.py, the README's main command over seeds) runs end to end on
its --quick budget (one seed, a couple of steps) so it cannot rot; plot.py draws metrics.jsonl files; MetricsLog logs to Weights & Biases when asked (a fake wandb
module); the demo's difficulty knob leaves the default distribution as it was."""

import json
import os
import random
import subprocess
import sys
import types

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

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

    sys.path.insert(0, os.path.join(ROOT, "experiments"))
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
    sys.path.insert(0, os.path.join(ROOT, "experiments"))
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
    sys.path.insert(0, os.path.join(ROOT, "experiments"))
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
    sys.path.insert(0, os.path.join(ROOT, "experiments"))
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
    sys.path.insert(0, os.path.join(ROOT, "experiments"))
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
    sys.path.insert(0, os.path.join(ROOT, "experiments"))
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
    sys.path.insert(0, os.path.join(ROOT, "experiments"))
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
