"""bench/grpo_step.py --smoke end to end: ours' whole GRPO steps, and TRL's GRPOTrainer beside them when trl is
installed (one step each, the smallest setting; about a minute on 2 CPU cores)."""

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def trl_installed():
    try:
        import trl  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.fixture(scope="module")
def smoke_output():
    env = dict(os.environ, OMP_NUM_THREADS="1")
    run = subprocess.run([sys.executable, "bench/grpo_step.py", "--smoke", "--steps=1", "--threads=1"], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return run.stdout


def row(output, side):
    match = re.search(rf"^{side}\s+([\d,]+)\s.*?\s([\d,]+)MB", output, re.M)
    assert match, f"no {side} row in:\n{output}"
    return float(match.group(1).replace(",", "")), float(match.group(2).replace(",", ""))


def test_ours(smoke_output):
    assert smoke_output.startswith("# GRPO step benchmark")
    assert "commit " in smoke_output.splitlines()[0]
    tokens_per_s, peak_mb = row(smoke_output, "ours")
    assert tokens_per_s > 0 and peak_mb > 0
    assert re.search(r"^  ours +rollout [\d.]+ \| score [\d.]+ \| update [\d.]+$", smoke_output, re.M)
    assert row(smoke_output, "ours-padded")[0] > 0  # --share_prompts=false beside it
    if not trl_installed():
        assert "TRL is not installed" in smoke_output


def test_trl(smoke_output):
    pytest.importorskip("trl")
    tokens_per_s, peak_mb = row(smoke_output, "trl")
    assert tokens_per_s > 0 and peak_mb > 0
    assert re.search(r"^trl\s.*\s[\d.]+x\s", smoke_output, re.M)  # the ours/TRL ratio
    for phase in ("generation", "reward", "reference", "forward_loss", "backward", "optimizer"):
        assert re.search(rf"^  trl +.*\b{phase} [\d.]+", smoke_output, re.M), phase
    assert "prompt ids identical on both sides: True" in smoke_output


def test_rounds_report_each_sides_median_round_and_the_ratio_of_each(capsys):
    """--rounds: the table shows each side's median round by tokens/s (not the best, not the last), and every
    round's ours/TRL ratio is printed beside it."""
    sys.path.insert(0, ROOT)
    from bench.grpo_step import print_setting

    def result(seconds):  # one measured step of 1,000 tokens after the warm-up step
        step = lambda s: dict(tokens=1000, total=s, phases=dict(rollout=s / 2, score=0.0, update=s / 2))
        return dict(steps=[step(9.0), step(seconds)], peak_rss_mb=100.0, wall_s=1.0)

    trl_phases = dict(generation=1.0, reward=0.0, reference=0.0, prep_other=0.0, forward_loss=0.0, backward=0.0,
                      optimizer=0.0)
    trl = [result(s) for s in (4.0, 2.0, 3.0)]
    for r in trl:
        for step in r["steps"]:
            step["phases"] = trl_phases
    rounds = {"ours": [result(s) for s in (1.0, 0.5, 2.0)], "trl": trl}

    class Args:
        prompts_per_step, group_size, max_new_tokens, steps, rounds = 8, 8, 64, 2, 3

    summaries = print_setting("char", Args, 1e6, rounds, warmup=1)
    assert summaries["ours"]["step_s"] == 1.0 and summaries["trl"]["step_s"] == 3.0
    output = capsys.readouterr().out
    assert "the median of 3 alternated rounds per side" in output
    assert "ours/TRL tokens/s by round: 4.00x, 4.00x, 1.50x" in output
    Args.rounds = 2  # an even count: the slower middle round, never the best
    rounds = {side: results[:2] for side, results in rounds.items()}
    assert print_setting("char", Args, 1e6, rounds, warmup=1)["ours"]["step_s"] == 1.0


def test_trl_phases_add_up_to_its_step(smoke_output):
    """TRL's phases are differences of nested timers (_prepare_inputs holds generation, reward and the reference
    pass; training_step holds _prepare_inputs and compute_loss): each second of the step must land in exactly one
    phase, so the phases add up to the step's time."""
    pytest.importorskip("trl")
    phases = re.search(r"^  trl +(generation .*)$", smoke_output, re.M).group(1)
    seconds = [float(part.split()[-1]) for part in phases.split(" | ")]
    total = float(re.search(r"^  trl +per step: \d+ tok / ([\d.]+)s$", smoke_output, re.M).group(1))
    assert len(seconds) == 7 and abs(sum(seconds) - total) <= 0.01 + 0.02 * total, (seconds, total)


def test_ours_counts_every_completion_of_a_step_and_every_phase(monkeypatch, tmp_path):
    """Ours' steps from train_grpo's metrics.jsonl: `length` is the mean completion length, so a step's tokens are
    it times prompts x G, and a step's time is its rollout, score and update phases together."""
    sys.path.insert(0, ROOT)
    import train_grpo
    from bench.grpo_step import run_ours

    def fake_main(argv):
        out_dir = next(a.split("=", 1)[1] for a in argv if a.startswith("--out_dir="))
        os.makedirs(out_dir)
        with open(os.path.join(out_dir, "metrics.jsonl"), "w") as f:
            f.write('{"step": 0, "eval_accuracy": 0.5}\n')  # a row without timings is skipped
            f.write('{"step": 1, "length": 12.5, "time_rollout": 1.0, "time_score": 0.25, "time_update": 0.5}\n')

    monkeypatch.setattr(train_grpo, "main", fake_main)

    class Args:
        prompts_per_step, group_size, max_new_tokens, steps = 8, 4, 64, 1

    (step,) = run_ours(Args, str(tmp_path), "auto")
    assert step == dict(tokens=400, total=1.75, phases=dict(rollout=1.0, score=0.25, update=0.5))


def test_table_shows_ours_over_each_side_and_the_summary_line_each_way_round(capsys):
    """One round: the ours/side column is ours' tokens/s over that side's (above 1 when ours is faster), the summary
    says how many times faster per step ours is, and a side's tokens/step is the mean over its measured steps."""
    sys.path.insert(0, ROOT)
    from bench.grpo_step import print_setting

    def result(*steps):  # (tokens, seconds) per step; the first is the warm-up
        phases = lambda s: dict(generation=s, reward=0.0, reference=0.0, prep_other=0.0, forward_loss=0.0,
                                backward=0.0, optimizer=0.0)
        return [dict(steps=[dict(tokens=t, total=s, phases=phases(s)) for t, s in steps], peak_rss_mb=100.0,
                     wall_s=1.0)]

    class Args:
        prompts_per_step, group_size, max_new_tokens, steps, rounds = 8, 8, 64, 3, 1

    rounds = {"ours": result((1, 9.0), (1000, 1.0), (3000, 3.0)), "trl": result((1, 9.0), (1000, 4.0), (1000, 4.0))}
    summaries = print_setting("char", Args, 1e6, rounds, warmup=1)
    assert summaries["ours"]["tokens"] == 2000 and summaries["ours"]["step_s"] == 2.0
    assert summaries["ours"]["tokens_per_s"] == 1000 and summaries["trl"]["tokens_per_s"] == 250
    output = capsys.readouterr().out
    assert re.search(r"^trl\s+250\s+4\.00x\s", output, re.M)
    assert "ours vs TRL: 2.00x faster per step, 4.00x the tokens/s" in output
    assert re.search(r"^  ours +generation 2\.000 \| reward 0\.000", output, re.M)  # the phases: measured steps only
