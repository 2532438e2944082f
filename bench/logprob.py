"""
Per-token log-probs from the LM head: peak extra memory and time, forward and forward+backward, of our fused kernel
vs naive PyTorch (log_softmax then gather, as TRL does) vs the chunked PyTorch path.

    python bench/logprob.py                  # CUDA: N = 16k and 64k tokens, D = 1536, V = 151,936, bf16
    python bench/logprob.py --device cpu     # CPU: our CPU path (token_logprobs_ref) vs naive, D=256, V=32,768
    python bench/logprob.py --device cpu --memory  # CPU: peak RSS at N=4096, D=64, V=151,936, fwd and fwd+bwd

Peak extra memory = torch.cuda.max_memory_allocated during the call minus the inputs' memory (on CPU, the growth of
the process's peak resident set (VmHWM, reset just before the call), measured in a fresh subprocess per variant).
"""

import argparse
import json
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
import json, re, resource, sys, time, torch
sys.path.insert(0, sys.argv[1])
from kernels.logprob import IGNORE_INDEX, token_logprobs_naive, token_logprobs_ref
name, (N, D, V), entropy = sys.argv[2], map(int, sys.argv[3:6]), sys.argv[6] == "1"
torch.manual_seed(0)
hidden = torch.randn(N, D, requires_grad=True)
weight = (torch.randn(V, D) / D ** 0.5).requires_grad_()
targets = torch.randint(0, V, (N,))
targets[::5] = IGNORE_INDEX
fn = token_logprobs_naive if name == "naive" else token_logprobs_ref


def status(field):  # kB in /proc/self/status
    return int(re.search(field + r":\s+(\d+)", open("/proc/self/status").read()).group(1)) * 1024


try:  # reset the peak (VmHWM) to the current resident set: only what the call adds counts
    open("/proc/self/clear_refs", "w").write("5")
    peak = lambda: status("VmHWM")
except OSError:
    peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
before = max(status("VmRSS"), peak())
start = time.perf_counter()
out = fn(hidden, weight, targets, return_entropy=entropy)
forward_s, forward_peak = time.perf_counter() - start, peak() - before
loss = out[0].sum() + out[1].sum() if entropy else out.sum()
torch.autograd.grad(loss, (hidden, weight))
print(json.dumps(dict(forward_s=forward_s, total_s=time.perf_counter() - start, forward_peak=forward_peak,
                      peak=peak() - before)))
"""


def cpu_run(name, N, D, V, entropy=False):
    """One forward+backward in a fresh process: seconds (forward, total) and peak RSS growth in bytes."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", CPU_SCRIPT, root, name, str(N), str(D), str(V), str(int(entropy))],
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def cpu_table(sizes, D=256, V=32768):
    """Speed (and memory) of the CPU path ("ours", token_logprobs_ref) vs naive, fwd+bwd, fp32."""
    rows = []
    for N in sizes:
        result = {name: cpu_run(name, N, D, V) for name in ("naive", "ours")}
        naive, ours = result["naive"], result["ours"]
        print(f"N={N} D={D} V={V} fwd+bwd | naive {naive['total_s']:.2f} s {naive['peak'] / 2**30:.2f} GiB | "
              f"ours {ours['total_s']:.2f} s {ours['peak'] / 2**30:.2f} GiB | memory naive/ours "
              f"{naive['peak'] / max(ours['peak'], 2**20):.1f}x | time ours/naive "
              f"{ours['total_s'] / naive['total_s']:.2f}x", flush=True)
        rows.append(dict(N=N, D=D, V=V, naive=naive, ours=ours))
    return rows


def cpu_memory_table(N=4096, D=64, V=151936, entropies=(False, True)):
    """Issue #18's measurement: peak RSS growth of ours vs naive at N=4096, D=64, V=151,936, fp32, forward and
    forward+backward, each variant in a fresh subprocess. Target: ours/naive <= 0.1."""
    import platform
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor()) if os.path.exists("/proc/cpuinfo") else platform.processor()
    print(f"# {time.strftime('%Y-%m-%d')} | {os.cpu_count()} CPU cores ({cpu}) | torch {torch.__version__} | "
          f"fp32, N={N} D={D} V={V}; (N, V) logits = {N * V * 4 / 2**30:.2f} GiB", flush=True)
    rows = []
    for entropy in entropies:
        result = {name: cpu_run(name, N, D, V, entropy) for name in ("naive", "ours")}
        naive, ours = result["naive"], result["ours"]
        for key, label in (("forward_peak", "fwd"), ("peak", "fwd+bwd")):
            print(f"{label:>7} entropy={str(entropy):<5} | naive {naive[key] / 2**20:8.0f} MiB | "
                  f"ours {ours[key] / 2**20:6.0f} MiB | ours/naive {ours[key] / naive[key]:.3f}", flush=True)
        print(f"{'time':>7} entropy={str(entropy):<5} | naive fwd {naive['forward_s']:.2f} s, fwd+bwd "
              f"{naive['total_s']:.2f} s | ours fwd {ours['forward_s']:.2f} s, fwd+bwd {ours['total_s']:.2f} s | "
              f"ours/naive fwd+bwd {ours['total_s'] / naive['total_s']:.2f}x", flush=True)
        rows.append(dict(N=N, D=D, V=V, entropy=entropy, naive=naive, ours=ours))
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--sizes", default=None)
    parser.add_argument("--memory", action="store_true",
                        help="CPU: issue #18's peak-RSS comparison at N=4096, D=64, V=151,936 (needs ~16 GiB of RAM)")
    args = parser.parse_args(argv)
    if args.device == "cpu" and args.memory:
        return cpu_memory_table()
    if args.device == "cuda":
        print(f"{torch.cuda.get_device_name()} | torch {torch.__version__} | bf16, D=1536, V=151936")
        return cuda_table([int(n) for n in (args.sizes or "16384,65536").split(",")])
    return cpu_table([int(n) for n in (args.sizes or "2048,8192").split(",")])


if __name__ == "__main__":
    main()
