"""
Per-token log-probs from the LM head: peak extra memory and time, forward and forward+backward, of our fused kernel
vs naive PyTorch (log_softmax then gather, as TRL does) vs the chunked PyTorch path.

    python bench/logprob.py                  # CUDA: N = 16k and 64k tokens, D = 1536, V = 151,936, bf16
    python bench/logprob.py --device cpu     # CPU: chunked vs naive at small N (peak memory is machine-independent)

Peak extra memory = torch.cuda.max_memory_allocated during the call minus the inputs' memory (on CPU, the growth of
the process's maximum resident set, measured in a fresh subprocess per variant).
"""

import argparse
import os
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from kernels.logprob import token_logprobs, token_logprobs_naive, token_logprobs_ref  # noqa: E402

VARIANTS = {
    "ours": lambda h, w, t, e: token_logprobs(h, w, t, return_entropy=e, backend="triton"),
    "naive": lambda h, w, t, e: token_logprobs_naive(h, w, t, return_entropy=e),
    "chunked": lambda h, w, t, e: token_logprobs_ref(h, w, t, return_entropy=e, chunk_size=4096),
}


def run_once(fn, hidden, weight, targets, backward, entropy):
    result = fn(hidden, weight, targets, entropy)
    if backward:
        loss = result[0].sum() + result[1].sum() if entropy else result.sum()
        torch.autograd.grad(loss, (hidden, weight))


def cuda_row(name, N, D, V, backward, entropy, iters=2):
    fn = VARIANTS[name]
    torch.cuda.empty_cache()
    hidden = torch.randn(N, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    weight = (torch.randn(V, D, device="cuda", dtype=torch.bfloat16) / D ** 0.5).requires_grad_()
    targets = torch.randint(0, V, (N,), device="cuda")
    try:
        run_once(fn, hidden, weight, targets, backward, entropy)  # warm-up / compile
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        for _ in range(iters):
            run_once(fn, hidden, weight, targets, backward, entropy)
        torch.cuda.synchronize()
        ms = (time.perf_counter() - start) / iters * 1000
        return dict(ms=ms, peak_extra_gib=(torch.cuda.max_memory_allocated() - base) / 2**30)
    except torch.OutOfMemoryError:
        return dict(ms=None, peak_extra_gib=None, note="out of memory")


def cuda_table(sizes, D=1536, V=151936):
    rows = []
    print(f"{'N':>6} {'pass':>8} {'entropy':>7} | " + " | ".join(f"{n:>22}" for n in VARIANTS)
          + " | ours/naive time | naive/ours memory")
    for N in sizes:
        for backward, entropy in ((False, False), (True, False), (True, True)):
            results = {name: cuda_row(name, N, D, V, backward, entropy) for name in VARIANTS}
            ours, naive = results["ours"], results["naive"]
            speed = naive["ms"] / ours["ms"] if naive["ms"] and ours["ms"] else None
            memory = naive["peak_extra_gib"] / ours["peak_extra_gib"] if naive["peak_extra_gib"] else None
            cells = [f"{r['ms']:7.1f} ms {r['peak_extra_gib']:6.2f} GiB" if r["ms"] else f"{'OOM':>22}"
                     for r in results.values()]
            print(f"{N:>6} {'fwd+bwd' if backward else 'fwd':>8} {str(entropy):>7} | " + " | ".join(cells)
                  + f" | {speed or float('nan'):>14.2f}x | {memory or float('nan'):>16.1f}x", flush=True)
            rows.append(dict(N=N, D=D, V=V, backward=backward, entropy=entropy, **{
                f"{k}_{m}": v[m] for k, v in results.items() for m in ("ms", "peak_extra_gib")},
                speed_vs_naive=speed, memory_ratio_naive_over_ours=memory))
    return rows


CPU_SCRIPT = r"""
import resource, sys, time, torch
sys.path.insert(0, sys.argv[1])
from kernels.logprob import token_logprobs_naive, token_logprobs_ref
N, D, V = int(sys.argv[3]), 256, 32768
hidden = torch.randn(N, D, requires_grad=True)
weight = (torch.randn(V, D) / 16).requires_grad_()
targets = torch.randint(0, V, (N,))
fn = token_logprobs_naive if sys.argv[2] == "naive" else token_logprobs_ref
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
torch.autograd.grad(fn(hidden, weight, targets).sum(), (hidden, weight))
print(time.perf_counter() - start, (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 2**20)
"""


def cpu_table(sizes):
    rows = []
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for N in sizes:
        result = {}
        for name in ("naive", "chunked"):
            out = subprocess.run([sys.executable, "-c", CPU_SCRIPT, root, name, str(N)], capture_output=True,
                                 text=True, check=True).stdout.split()
            result[name] = (float(out[0]), float(out[1]))
        print(f"N={N} D=256 V=32768 fwd+bwd | naive {result['naive'][0]:.2f} s {result['naive'][1]:.2f} GiB | "
              f"chunked {result['chunked'][0]:.2f} s {result['chunked'][1]:.2f} GiB | memory naive/chunked "
              f"{result['naive'][1] / max(result['chunked'][1], 1e-3):.1f}x | time chunked/naive "
              f"{result['chunked'][0] / result['naive'][0]:.2f}x", flush=True)
        rows.append(dict(N=N, naive=result["naive"], chunked=result["chunked"]))
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--sizes", default=None)
    args = parser.parse_args(argv)
    if args.device == "cuda":
        print(f"{torch.cuda.get_device_name()} | torch {torch.__version__} | bf16, D=1536, V=151936")
        return cuda_table([int(n) for n in (args.sizes or "16384,65536").split(",")])
    return cpu_table([int(n) for n in (args.sizes or "2048,8192").split(",")])


if __name__ == "__main__":
    main()
