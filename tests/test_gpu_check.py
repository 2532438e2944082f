# python -m pytest tests/test_gpu_check.py -q
import json
import os
import subprocess
import sys

from conftest import ROOT


def test_gpu_check_smoke_runs_every_step_and_writes_results(tmp_path):
    """The GPU script's tiny CPU version, so that the script that only runs on a borrowed GPU never rots."""
    result = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "gpu_check.py"), "--smoke", "--out",
                             str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads((tmp_path / "results.json").read_text())
    assert [s["status"] for s in summary["steps"]] == ["ok"] * 6
    assert summary["steps"][1]["result"]["all_ok"]
    per_slot, paged = summary["steps"][5]["result"]["rows"]  # the paged KV cache holds more sequences at once
    assert paged["mean_running"] > per_slot["mean_running"]
    assert (tmp_path / "results.md").read_text().startswith("# GPU check")


def test_benchmarks_say_they_need_cuda():
    result = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "attention.py")], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0 and "needs a CUDA GPU" in result.stdout
