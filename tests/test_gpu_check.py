# python -m pytest tests/test_gpu_check.py -q
import json
import os
import subprocess
import sys

import pytest
import torch

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


def test_mfu_counts_six_flops_per_parameter_the_body_at_every_token_and_the_head_at_loss_tokens(monkeypatch):
    """Step 5's MFU: 6 FLOPs (forward 2, backward 4) per parameter per token; with tied embeddings the embedding
    lookup is free, so the body is every parameter but the embedding matrix, and the LM head (that matrix again)
    counts only at the positions with a loss."""
    import bench.gpu_check as gpu_check

    captured = {}
    monkeypatch.setattr(gpu_check, "sft_steps", lambda model, shape, device, smoke, mfu: captured.update(
        mfu=mfu, model=model))
    monkeypatch.setattr(gpu_check, "grpo_step", lambda *args: None)
    monkeypatch.setattr(gpu_check, "longest_sequence", lambda *args: None)
    gpu_check.step_training(smoke=True)
    model, mfu = captured["model"], captured["mfu"]
    embedding = model.get_parameter("model.embed_tokens.weight").numel()
    body = sum(p.numel() for name, p in model.named_parameters() if name != "model.embed_tokens.weight")
    peak = 1e12  # the smoke run's nominal peak
    assert mfu(100, 90, 2.0) == pytest.approx(6 * (body * 100 + embedding * 90) / 2.0 / peak, rel=1e-12)


def test_sft_rows_count_no_loss_at_each_documents_last_token(monkeypatch):
    """The packed SFT row has a loss at every token but each document's last (it has no next token): the MFU of
    each variant gets the row's tokens and those loss tokens."""
    import bench.gpu_check as gpu_check

    monkeypatch.setattr(gpu_check, "sft_step", lambda *args: lambda: None)
    monkeypatch.setattr(gpu_check, "timed", lambda fn, repeat=1, warmup=None: 0.5)
    model = gpu_check.random_model(gpu_check.TINY, "cpu", torch.float32)
    rows = gpu_check.sft_steps(model, gpu_check.TINY, "cpu", True, lambda *args: args)
    assert len(rows) == 4
    for row in rows.values():  # smoke: 2 documents of 32 tokens
        assert row["tokens"] == 64 and row["mfu"] == (64, 62, 0.5) and row["tokens_per_s"] == 128


def test_grpo_rows_count_every_sequences_tokens(monkeypatch):
    """Step 5's GRPO figures: a rollout of prompts x G sequences of `probe` tokens each, and an update whose MFU
    gets every token of the batch (prompts and completions) with the completion tokens as the loss positions."""
    import bench.gpu_check as gpu_check

    monkeypatch.setattr(gpu_check, "timed", lambda fn, repeat=1, warmup=None: fn() or 2.0)
    model = gpu_check.random_model(gpu_check.TINY, "cpu", torch.float32)
    result = gpu_check.grpo_step(model, gpu_check.TINY, "cpu", True, lambda *args: args)
    for name in ("fp32_masters_autocast", "bf16_sampling_copy"):  # smoke: 2 prompts x G=2, probes of 4 tokens
        assert result[f"rollout_4_tokens_{name}"]["tokens_per_s"] == 2 * 2 * 4 / 2.0
    for layout in ("padded", "packed", "shared"):
        row = result[f"layout={layout} checkpointing=False"]
        assert row["real_tokens"] == row["completion_tokens"] + 4 * 8  # 4 sequences with prompts of 8 tokens
        assert row["update_mfu"] == (row["real_tokens"], row["completion_tokens"], 2.0)


def test_sampler_roofline_reads_the_weights_and_the_batchs_mean_prefix_once_per_step():
    """bench/sampler.py's roofline (step 4): each decode step reads every weight once and each sequence's KV cache
    (bf16: keys and values of every layer and KV head) up to its mean length over the run, prompt + half the new
    tokens; a step yields one token per sequence."""
    from bench.sampler import roofline_tokens_per_s
    from bench.gpu_check import TINY, random_model

    model = random_model(TINY, "cpu", torch.float32)
    weight_bytes = 4 * model.num_parameters()
    kv_per_token = 2 * 2 * 2 * 16 * 2  # K and V, 2 layers, 2 KV heads, head_dim 16, 2 bytes
    expected = 4 * 1e12 / (weight_bytes + kv_per_token * 4 * (100 + 30))
    assert roofline_tokens_per_s(model, 4, 100, 60, 1e12) == pytest.approx(expected, rel=1e-12)


def test_sampler_launches_per_step_count_the_gpu_events_of_one_step():
    from torch.autograd import DeviceType

    from bench.sampler import kernels_per_step

    class Event:
        def __init__(self, device_type):
            self.device_type = device_type

    class Trace:
        def events(self):
            return [Event(DeviceType.CUDA)] * 40 + [Event(DeviceType.CPU)] * 100

    assert kernels_per_step(Trace()) == 5  # 8 profiled steps


def test_sampler_bench_rates_are_the_best_round_and_ratios_ours_over_transformers(monkeypatch):
    """bench/sampler.py's table from given round times: each side's tokens/s from its fastest round, the ratio ours
    over transformers, and each round's own ratio (transformers is timed first in every round)."""
    import bench.sampler as sampler_bench

    monkeypatch.setattr(sampler_bench, "CPU_SMALL", dict(vocab_size=64, hidden_size=32, intermediate_size=64,
                                                         num_hidden_layers=1, num_attention_heads=2,
                                                         num_key_value_heads=1, max_position_embeddings=128))
    rounds = iter([2.0, 0.5, 1.0, 1.0])  # round 1: transformers 2 s, ours 0.5 s; round 2: 1 s each
    monkeypatch.setattr(sampler_bench, "timed", lambda fn, device: next(rounds))
    monkeypatch.setattr(sampler_bench, "gemm_ms_per_token", lambda run, tokens: 0.0)
    rows = sampler_bench.main(["--device", "cpu", "--batches", "3", "--new_tokens", "4", "--repeat", "2",
                               "--layout", "row"])
    row = rows[0]
    assert row["ours_tokens_per_s"] == 3 * 4 / 0.5 and row["hf_tokens_per_s"] == 3 * 4 / 1.0
    assert row["ratio"] == 2.0 and row["round_ratios"] == [4.0, 1.0]


def test_timed_is_seconds_per_call_after_an_untimed_warm_up(monkeypatch):
    """gpu_check.timed, which every step-5 figure goes through: one untimed call, then `repeat` timed calls, and the
    seconds of one call (a fake clock advances one second per call)."""
    import bench.gpu_check as gpu_check

    clock, calls = [0.0], []

    def fn():
        calls.append(1)
        clock[0] += 1.0

    monkeypatch.setattr(gpu_check.time, "perf_counter", lambda: clock[0])
    assert gpu_check.timed(fn, repeat=3) == 1.0 and len(calls) == 4


def test_greedy_divergence_is_the_share_of_sequences_that_agree():
    """Step 4's graph-vs-eager check, here eager against eager (no graph on a CPU): every sequence agrees, so the
    share is 1 (not a count), each common prefix is the whole completion, and there is no divergence to explain."""
    import bench.gpu_check as gpu_check

    model = gpu_check.random_model(gpu_check.TINY, "cpu", torch.float32).eval()
    result = gpu_check.greedy_divergence(model, 3, 4, cuda_graph=False)
    assert result["sequences_equal"] == 1.0 and result["common_prefix_tokens"] == [4, 4, 4]
    assert result["divergences"] == [] and result["first_token_logprob_gap"] == 0.0
