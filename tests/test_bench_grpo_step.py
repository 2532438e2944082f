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
