# python -m pytest tests/test_multinode.py -q
"""Nothing assumes one node: the demo GRPO run (real sampler, real verifier) on two torchrun agents with one
process each (two "nodes" on this machine, gloo, a static rendezvous on localhost) matches the same run on one node
of two processes, and only global rank 0 writes files; on node 1, LOCAL_RANK is 0 and RANK is 1."""

import errno
import json
import os
import signal
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import common
from common import checkpoint_is_complete
from conftest import ROOT
from tasks import build_demo_model

# a random-weight policy earns no reward, so the entropy bonus (and a large lr) is what moves the weights
ARGS = ["--prompts_per_step=4", "--group_size=2", "--max_new_tokens=8", "--max_steps=2", "--eval_problems=4",
        "--eval_temperature=0", "--micro_batch_size=4", "--save_every=2", "--log_every=1", "--entropy_coef=0.1",
        "--lr=1e-3", "--warmup_steps=0"]
TIMEOUT = 150  # seconds per launch: a rank stuck in a collective fails this test, not the suite
TIMING = {"time_rollout", "time_score", "time_update", "tokens_per_s"}

# each node's worker runs train_grpo.py through this: it records the environment torchrun gave it and every
# Python-level write under --out_dir (state_rank1.pt is written by torch.save's C++ writer, which is not seen)
WATCHED_WORKER = """
import json, os, runpy, sys
root, out_dir, report = sys.argv.pop(1), sys.argv.pop(1), sys.argv.pop(1)
writes = []
def is_under(path):
    try:
        return os.path.realpath(os.fsdecode(path)).startswith(os.path.realpath(out_dir))
    except (TypeError, ValueError):
        return False
def hook(event, args):
    if event == "open" and isinstance(args[0], (str, bytes, os.PathLike)) and is_under(args[0]):
        mode, flags = args[1] or "r", args[2] or 0
        if any(c in str(mode) for c in "wax+") or flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            writes.append([event, os.fsdecode(args[0])])
    elif event in ("os.mkdir", "os.rename", "os.remove", "os.rmdir", "shutil.rmtree", "os.truncate") and args \\
            and isinstance(args[0], (str, bytes, os.PathLike)) and is_under(args[0]):
        writes.append([event, os.fsdecode(args[0])])
sys.addaudithook(hook)
environment = {k: os.environ.get(k) for k in ("RANK", "LOCAL_RANK", "GROUP_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE")}
try:
    sys.path.insert(0, root)
    sys.argv[0] = os.path.join(root, "train_grpo.py")
    runpy.run_path(sys.argv[0], run_name="__main__")
finally:
    with open(report, "w") as f:
        json.dump({"environment": environment, "writes": writes}, f)
"""


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(torchrun_args, script_args, cwd, log):
    command = [sys.executable, "-m", "torch.distributed.run", *torchrun_args, *script_args]
    return subprocess.Popen(command, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))


def finish(processes, logs):
    """Waits for every launch; on a timeout kills each whole process group (the agent and its workers)."""
    try:
        for process in processes:
            process.wait(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        for process in processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
    for process, log in zip(processes, logs):
        log.flush()
        with open(log.name) as f:
            assert process.returncode == 0, f"{log.name} (return code {process.returncode}):\n{f.read()[-4000:]}"


def metrics_lines(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def read_json(path):
    with open(path) as f:
        return json.load(f)


def files_under(path):
    return sorted(os.path.relpath(os.path.join(d, name), path) for d, _, names in os.walk(path) for name in names)


@pytest.mark.slow
def test_two_nodes_of_one_process_match_one_node_of_two_and_only_global_rank_0_writes(tmp_path):
    demo = build_demo_model(str(tmp_path / "demo"))
    args = ARGS + [f"--model={demo}"]
    train = os.path.join(ROOT, "train_grpo.py")
    one_node, two_nodes = str(tmp_path / "one_node"), str(tmp_path / "two_nodes")
    cwd = {name: tmp_path / name for name in ("cwd_a", "cwd_node0", "cwd_node1")}
    for path in cwd.values():
        path.mkdir()

    # (a) one node, two processes
    with open(tmp_path / "one_node.log", "w") as log:
        finish([launch(["--standalone", "--nproc_per_node=2"], [train] + args + [f"--out_dir={one_node}"],
                       cwd["cwd_a"], log)], [log])

    # (b) two nodes of one process each, as on two machines: the same command but --node_rank, started at once
    # (train_grpo.py run through watched_worker.py, which reports what each node's process wrote)
    (tmp_path / "watched_worker.py").write_text(WATCHED_WORKER)
    reports = [str(tmp_path / f"node{rank}_report.json") for rank in (0, 1)]
    port = free_port()
    with open(tmp_path / "node0.log", "w") as log0, open(tmp_path / "node1.log", "w") as log1:
        processes = [launch(["--nnodes=2", "--nproc_per_node=1", f"--node_rank={rank}", "--master_addr=127.0.0.1",
                             f"--master_port={port}"],
                            [str(tmp_path / "watched_worker.py"), ROOT, two_nodes, reports[rank]]
                            + args + [f"--out_dir={two_nodes}"], cwd[f"cwd_node{rank}"], log)
                     for rank, log in ((0, log0), (1, log1))]
        finish(processes, [log0, log1])

    # the same run: rewards and lengths exactly, the floats to rounding, the final weights to 2e-5
    a, b = metrics_lines(one_node), metrics_lines(two_nodes)
    assert [m["step"] for m in a] == [m["step"] for m in b] == [0, 1, 2, 2]  # held-out evals at 0 and 2: one line
    for line_a, line_b in zip(a, b):  # per step, however many ranks (two writers would double them)
        assert line_a.keys() == line_b.keys()
        for key in line_a.keys() - TIMING:
            if key in ("reward", "accuracy", "truncated", "length", "zero_variance", "heldout_accuracy", "step"):
                assert line_a[key] == line_b[key], (key, line_a, line_b)
            else:
                assert line_a[key] == pytest.approx(line_b[key], rel=1e-4, abs=1e-6), (key, line_a, line_b)
    assert all(m["grad_norm"] > 0 for m in a if "grad_norm" in m)  # the update does something
    final_a = load_file(os.path.join(one_node, "final", "model.safetensors"))
    final_b = load_file(os.path.join(two_nodes, "final", "model.safetensors"))
    initial = load_file(os.path.join(demo, "model.safetensors"))
    assert final_a.keys() == final_b.keys() == initial.keys()
    for name in final_a:
        torch.testing.assert_close(final_a[name], final_b[name], atol=2e-5, rtol=0)
    assert any(not torch.allclose(final_b[name], initial[name], atol=1e-4) for name in initial)

    # the files of a run, once: one metrics.jsonl, one final/ with the state of both global ranks
    expected = [".lock", "final/config.json", "final/generation_config.json", "final/model.safetensors",
                "final/run.json", "final/state_rank0.pt", "final/state_rank1.pt", "final/tokenizer.json",
                "final/tokenizer_config.json", "latest", "metrics.jsonl"]
    assert files_under(one_node) == files_under(two_nodes) == expected
    assert checkpoint_is_complete(os.path.join(two_nodes, "final"))
    with open(os.path.join(two_nodes, "final", "run.json")) as f:
        assert json.load(f)["world_size"] == 2
    # node 1's process is global rank 1 with local rank 0, and wrote nothing under --out_dir through Python
    # (no lock, no log, no checkpoint file of rank 0's), nor anything in its working directory
    node0, node1 = [read_json(report) for report in reports]
    for rank, node in enumerate((node0, node1)):
        assert node["environment"] == {"RANK": str(rank), "LOCAL_RANK": "0", "GROUP_RANK": str(rank),
                                       "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "1"}
    assert node1["writes"] == []
    written = {os.path.relpath(path, two_nodes) for _, path in node0["writes"]}  # the watch sees rank 0's writes
    assert {".lock", "metrics.jsonl", "final.tmp/run.json", "latest.tmp"} <= written, written
    assert all(not any(path.iterdir()) for path in cwd.values())
    # only global rank 0 prints the run's progress
    with open(tmp_path / "node0.log") as f0, open(tmp_path / "node1.log") as f1:
        node0_log, node1_log = f0.read(), f1.read()
    assert "step 2/2" in node0_log and "held-out accuracy" in node0_log
    assert "step 2/2" not in node1_log and "held-out accuracy" not in node1_log and "config:" not in node1_log


@pytest.mark.parametrize("code", [errno.ENOSYS, errno.ENOLCK, errno.EOPNOTSUPP])
def test_out_dir_on_a_shared_file_system_without_locks_is_claimed_with_a_warning(tmp_path, monkeypatch, capsys, code):
    """Lustre mounted without flock (and some NFS set-ups) refuse flock() itself: that is not "in use by another
    run", which would stop every run on such a cluster; the run goes on, unguarded, and says so."""
    def no_locks(file, operation):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(common.fcntl, "flock", no_locks)
    common.claim_out_dir(str(tmp_path / "run"), resume=False, overwrite=False).close()
    assert "warning: cannot lock" in capsys.readouterr().out
    monkeypatch.setattr(common.fcntl, "flock", lambda file, operation: (_ for _ in ()).throw(
        BlockingIOError(errno.EAGAIN, "held")))
    with pytest.raises(SystemExit, match="in use by another run"):
        common.claim_out_dir(str(tmp_path / "other"), resume=False, overwrite=False)
