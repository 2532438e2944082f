# python -m pytest tests/test_logprob.py -q      (on CPU the Triton kernels run in Triton's interpreter)
import os
import subprocess
import sys

import pytest
import torch

from aot import assert_fits, run_compile_script
from conftest import ROOT
from kernels.logprob import IGNORE_INDEX, token_logprobs, token_logprobs_naive, token_logprobs_ref

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if torch.cuda.is_available() and not INTERPRETED else "cpu"
needs_triton_run = pytest.mark.skipif(not (INTERPRETED or torch.cuda.is_available()),
                                      reason="needs a GPU or TRITON_INTERPRET=1")


def inputs(N, D, V, dtype, seed=0, device="cpu"):
    generator = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(N, D, generator=generator) * 2).to(dtype).to(device).requires_grad_()
    weight = (torch.randn(V, D, generator=generator) / D ** 0.5).to(dtype).to(device).requires_grad_()
    targets = torch.randint(0, V, (N,), generator=generator)
    targets[::5] = IGNORE_INDEX
    return hidden, weight, targets.to(device)


def check(fn, N, D, V, dtype, temperature, tolerance, device="cpu"):
    hidden, weight, targets = inputs(N, D, V, dtype, device=device)
    logp, entropy = fn(hidden, weight, targets, temperature)
    g_logp, g_entropy = torch.randn(N, dtype=torch.float64), torch.randn(N, dtype=torch.float64)
    grads = torch.autograd.grad((logp.double().cpu() * g_logp).sum() + (entropy.double().cpu() * g_entropy).sum(),
                                (hidden, weight))
    h64, w64 = [t.detach().double().cpu().requires_grad_() for t in (hidden, weight)]
    ref_logp, ref_entropy = token_logprobs_naive(h64, w64, targets.cpu(), temperature, return_entropy=True)
    ref_grads = torch.autograd.grad((ref_logp * g_logp).sum() + (ref_entropy * g_entropy).sum(), (h64, w64))
    assert logp.dtype == (torch.float64 if dtype == torch.float64 else torch.float32) and (logp <= 0).all()
    assert (logp[targets == IGNORE_INDEX] == 0).all() and (entropy[targets == IGNORE_INDEX] == 0).all()
    assert (logp.double().cpu() - ref_logp).abs().max() < tolerance
    assert (entropy.double().cpu() - ref_entropy).abs().max() < tolerance
    for ours, ref in zip(grads, ref_grads):
        assert (ours.double().cpu() - ref).abs().max() < tolerance * max(1.0, ref.abs().max().item())


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_chunked_reference_matches_naive_in_float64(temperature):
    fn = lambda h, w, t, temp: token_logprobs_ref(h, w, t, temp, return_entropy=True, chunk_size=7)
    check(fn, N=30, D=16, V=50, dtype=torch.float64, temperature=temperature, tolerance=1e-10)


@needs_triton_run
@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-4), (torch.float16, 2e-2)])
@pytest.mark.parametrize("N, D, V", [(70, 32, 300), (5, 80, 129), (64, 64, 128)])
def test_triton_matches_naive(dtype, tolerance, N, D, V):
    fn = lambda h, w, t, temp: token_logprobs(h, w, t, temp, return_entropy=True, backend="triton")
    check(fn, N, D, V, dtype, temperature=0.8, tolerance=tolerance, device=DEVICE)


def test_dispatcher_uses_reference_on_cpu():
    hidden, weight, targets = inputs(9, 8, 20, torch.float32)
    assert torch.equal(token_logprobs(hidden, weight, targets), token_logprobs_ref(hidden, weight, targets))
    with pytest.raises(ValueError, match="backend"):
        token_logprobs(hidden, weight, targets, backend="cuda")


PEAK_SCRIPT = r"""
import resource, sys, torch
sys.path.insert(0, sys.argv[1])
from kernels.logprob import token_logprobs_naive, token_logprobs_ref
N, D, V = 8192, 64, 32768  # logits: 1 GiB in fp32
hidden = torch.randn(N, D, requires_grad=True)
weight = torch.randn(V, D) / 8
weight.requires_grad_()
targets = torch.randint(0, V, (N,))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
fn = token_logprobs_naive if sys.argv[2] == "naive" else token_logprobs_ref
fn(hidden, weight, targets).sum().backward()
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)
"""


def test_cpu_path_peak_memory_stays_below_what_naive_needs():
    """The chunked path never holds (N, V) logits in the forward or the backward; the naive one does."""
    peak = {}
    for path in ("naive", "chunked"):
        result = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, ROOT, path], capture_output=True, text=True,
                                env=dict(os.environ, OMP_NUM_THREADS="2"), timeout=300)
        assert result.returncode == 0, result.stderr[-2000:]
        peak[path] = int(result.stdout.strip().splitlines()[-1])
    logits_bytes = 8192 * 32768 * 4
    assert peak["naive"] > logits_bytes
    assert peak["chunked"] < 0.35 * logits_bytes  # weight grad (8 MiB) + one 256-token chunk (32 MiB) at a time


COMPILE_SCRIPT = r"""
import json, os, sys
import torch
sys.path[:0] = [sys.argv[1], os.path.join(sys.argv[1], "tests")]
import kernels.logprob as L
from aot import compile_for

rows = []
for arch in (80, 90):
    for dtype in ("fp16", "bf16", "fp32"):
        torch_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
        for kernel, config in ((L._logprob_forward_kernel, L.kernel_config(torch_dtype)),):
            constants = {k: v for k, v in config.items() if k.startswith("BLOCK")}
            signature = {}
            for arg in kernel.arg_names:
                if arg in constants:
                    signature[arg] = "constexpr"
                elif arg in ("H", "W"):
                    signature[arg] = "*" + dtype
                elif arg == "TARGETS":
                    signature[arg] = "*i64"
                elif arg in ("N", "V", "D", "ignore_index"):
                    signature[arg] = "i32"
                elif arg.isupper():
                    signature[arg] = "*fp32"
                elif arg == "inv_temperature":
                    signature[arg] = "fp32"
                else:
                    signature[arg] = "i32"
            shared, usage = compile_for(kernel, signature, constants, arch, config["num_warps"],
                                        config["num_stages"])
            rows.append(dict(arch=arch, dtype=dtype, kernel=kernel.__name__, shared=shared, usage=usage))
print(json.dumps(rows))
"""


def test_compiles_for_sm80_and_sm90_without_spills():
    rows = run_compile_script(COMPILE_SCRIPT, ROOT)
    assert len(rows) == 6
    for row in rows:
        assert_fits(row, f"{row['kernel']} sm_{row['arch']} {row['dtype']}")
