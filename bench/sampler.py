"""
Sampler throughput: generated tokens per second of sampler.generate vs transformers' generate on the same
random-weight model, prompts and sampling settings, measured in the same run; on CUDA also against the
memory-bandwidth roofline (bytes of weights + KV cache read per decode step / measured copy bandwidth).

    python bench/sampler.py                 # CPU: 4 layers, hidden 256; batch 1 and 32; 128 new tokens
    python bench/sampler.py --device cuda   # Qwen2.5-1.5B shapes in bf16; batch 1, 64, 256; 256 + 512 tokens

On CUDA ours decodes through the CUDA graph; --decode_backend sets DECODE_ATTENTION_BACKEND, ROPE_CACHE_BACKEND,
SILU_MUL_BACKEND and ADD_RMS_NORM_BACKEND (the Triton kernels, torch's ops, or both, one row each), and the GPU
launches per decode step and layer are printed for each. transformers' eager generate is timed on --hf_tokens new tokens
(default 64 on CUDA: at batch 1 it decodes ~13 tokens/s on the H100 machine, and its per-step cost does not grow
over these lengths) and compared as tokens per second. --profile prints the CUDA kernels of a few eager decode
steps at the largest batch: where the step time goes.

Timing: after one untimed call of each, --repeat rounds (default 3 on CPU, 1 on CUDA) each time transformers once
and then ours, interleaved, so that a noisy machine slows both alike; the table gives the best of the rounds and
the per-round ratios (min/median/max). --threads sets torch's intra-op threads for both (on a CPU shared with other
jobs, 1 thread gives steadier figures than threads waiting for a busy core). On a CPU --layout both times ours
twice: with generate's column-major projection weights (sampler.column_major_projections, which generate uses when
it decodes at most 16 sequences at once for at least 64 new tokens; outside those gates only the row-major side
runs) and with the row-major ones it would otherwise read. Below each batch's rows, each side's decode step split
into its GEMMs (from the profiler, gemm_ms_per_token) and the rest, and what the column-major side's relayout costs
per call.

    python bench/sampler.py --batches 1,16 --threads 1 --repeat 5
"""

import argparse
import contextlib
import os
import sys
import tempfile
import time
from unittest import mock

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from model import KVCache, Transformer  # noqa: E402
import sampler  # noqa: E402
from sampler import _decode_eager, _prefill, allocate_cache, generate, sample_next  # noqa: E402

QWEN25_15B = dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                  num_attention_heads=12, num_key_value_heads=2, rope_theta=1e6, tie_word_embeddings=True,
                  max_position_embeddings=32768)
CPU_SMALL = dict(vocab_size=4096, hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=8,
                 num_key_value_heads=2, max_position_embeddings=4096)


def build_pair(shape, device, dtype):
    """The same random weights in transformers' Qwen2 and in ours (ours loads the state dict transformers wrote)."""
    import transformers

    torch.manual_seed(0)
    with torch.device(device):
        hf_model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**shape)).to(dtype)
    with tempfile.TemporaryDirectory() as path:
        hf_model.save_pretrained(path)
        ours = Transformer.from_pretrained(path, device=device, dtype=dtype)
    return hf_model.eval(), ours.eval()


def copy_bandwidth(device):
    x = torch.empty(1024 * 2**20, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    y.copy_(x)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(10):
        y.copy_(x)
    torch.cuda.synchronize()
    return 2 * x.numel() * 10 / (time.perf_counter() - start)  # read + write


def timed(fn, device):
    """Seconds of one call."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def roofline_tokens_per_s(model, batch, prompt_len, new_tokens, bandwidth):
    """Tokens/s if every decode step only read the weights and the batch's mean KV prefix at copy bandwidth."""
    config = model.config
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    kv_bytes = KVCache.bytes_per_token(config, torch.bfloat16) * batch * (prompt_len + new_tokens // 2)
    return batch * bandwidth / (weight_bytes + kv_bytes)


DECODE_SWITCHES = ("DECODE_ATTENTION_BACKEND", "ROPE_CACHE_BACKEND", "SILU_MUL_BACKEND", "ADD_RMS_NORM_BACKEND")


def set_decode_backend(backend):
    """The whole decode step through the Triton kernels or through torch's ops (kernels.choose_backend's switches)."""
    for variable in DECODE_SWITCHES:
        os.environ[variable] = backend


def profile_decode(model, batch, prompt_len, new_tokens, steps=8, block_size=16):
    """The profiler's trace of `steps` eager decode steps at this batch (after two untimed ones), each sequence in
    its own blocks of the paged cache. Eager and graphed decoding launch the same kernels: the graph only removes
    the CPU's launch cost."""
    from torch.profiler import ProfilerActivity, profile

    max_len = prompt_len + new_tokens
    per_sequence = -(-max_len // block_size)
    cache = allocate_cache(model, max_len, block_size, batch, cache_tokens=batch * per_sequence * block_size)
    tables = [list(range(1 + row * per_sequence, 1 + (row + 1) * per_sequence)) for row in range(batch)]
    prompts = torch.randint(0, model.config.vocab_size, (batch, prompt_len)).tolist()
    sample = lambda logits, uniform: sample_next(logits, 1.0, 0, 1.0, None, "sampled", uniform)
    device = model.lm_head_weight.device
    tokens = torch.zeros(batch, dtype=torch.long, device=device)
    positions = torch.full((batch,), prompt_len, device=device)
    keys = torch.zeros((batch, 2), dtype=torch.long, device=device)
    table = torch.tensor(tables, device=device)
    with torch.inference_mode():
        _prefill(model, cache, prompts, tables, True)
        _decode_eager(model, cache, tokens, positions, keys, table, 2, sample)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as trace:
            _decode_eager(model, cache, tokens, positions, keys, table, steps, sample)
            torch.cuda.synchronize()
    return trace


def gemm_ms_per_token(run, tokens):
    """CPU milliseconds that one call of `run` spends in GEMMs (aten::mm and aten::addmm, self time, from
    torch.profiler; the prefill's included) per new token of a row. The profiler inflates small ops, not GEMMs: the
    rest of a step is its timed total minus this."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as trace:
        run()
    gemm_us = sum(event.self_cpu_time_total for event in trace.key_averages()
                  if event.key in ("aten::mm", "aten::addmm"))
    return gemm_us / 1e3 / tokens


def relayout_ms_per_call(model, repeat=5):
    """Milliseconds that sampler.column_major_projections takes to lay the weights out column-major and back: what
    each generate call that uses it pays once."""
    def relayout():
        with sampler.column_major_projections(model):
            pass

    return min(timed(relayout, torch.device("cpu")) for _ in range(repeat)) * 1e3


def kernels_per_step(trace, steps=8):
    """GPU launches (kernels, copies, fills) per decode step in a profile_decode trace."""
    from torch.autograd import DeviceType

    return sum(event.device_type == DeviceType.CUDA for event in trace.events()) / steps


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batches", default=None, help="comma-separated batch sizes")
    parser.add_argument("--new_tokens", type=int, default=None)
    parser.add_argument("--hf_tokens", type=int, default=None, help="new tokens for transformers' generate")
    parser.add_argument("--skip_hf", action="store_true")
    parser.add_argument("--decode_backend", default="triton", choices=["triton", "torch", "both"])
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--repeat", type=int, default=None, help="timed rounds (default 3 on CPU, 1 on CUDA)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads, for both")
    parser.add_argument("--layout", default="column", choices=["column", "row", "both"],
                        help="CPU: ours with generate's column-major projection weights (sampler."
                             "column_major_projections, the default), with the row-major weights as stored, or both")
    parser.add_argument("--block_size", type=int, default=None,
                        help="ours: tokens per KV-cache block (default generate's: 16 on a GPU, one sequence on CPU)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    repeat = args.repeat or (1 if on_gpu else 3)
    if args.threads:
        torch.set_num_threads(args.threads)
    shape, dtype = (QWEN25_15B, torch.bfloat16) if on_gpu else (CPU_SMALL, torch.float32)
    prompt_len, new_tokens = (256, 512) if on_gpu else (32, 128)
    new_tokens = args.new_tokens or new_tokens
    hf_tokens = args.hf_tokens or (64 if on_gpu else new_tokens)
    batches = [int(b) for b in args.batches.split(",")] if args.batches else ([1, 64, 256] if on_gpu else [1, 32])
    backends = (["torch", "triton"] if args.decode_backend == "both" else [args.decode_backend]) if on_gpu else \
        (["column", "row"] if args.layout == "both" else [args.layout])
    hf_model, ours = build_pair(shape, device, dtype)
    bandwidth = copy_bandwidth(device) if on_gpu else None
    print(f"device {torch.cuda.get_device_name() if on_gpu else 'cpu'} | {ours.num_parameters() / 1e6:.1f}M params | "
          f"{dtype} | prompt {prompt_len} | new {new_tokens} (transformers {hf_tokens}) | threads "
          f"{torch.get_num_threads()} | block size {args.block_size or 'default'} | best of {repeat} interleaved rounds"
          + (f" | copy bandwidth {bandwidth / 1e9:.0f} GB/s" if bandwidth else ""))
    variant = "decode attn" if on_gpu else "weights"  # the GPU's decode backend, the CPU's weight layout
    print(f"{'batch':>6} {variant:>11} {'ours tok/s':>11} {'hf tok/s':>10} {'ratio':>6} {'rounds min/med/max':>19}"
          + (f" {'roofline tok/s':>15} {'share':>6}" if on_gpu else ""))
    rows = []
    for batch in batches:
        prompts = torch.randint(0, shape["vocab_size"], (batch, prompt_len), generator=torch.Generator().manual_seed(1))
        ids = prompts.to(device)
        hf_run = None if args.skip_hf else \
            lambda: hf_model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, max_new_tokens=hf_tokens,
                                      min_new_tokens=hf_tokens, temperature=1.0, top_p=1.0, top_k=0, pad_token_id=0)

        def ours_run(backend):
            if on_gpu:
                set_decode_backend(backend)
            row_major = not on_gpu and backend == "row"
            with mock.patch.object(sampler, "column_major_projections", lambda model: contextlib.nullcontext()) \
                    if row_major else contextlib.nullcontext():
                generate(ours, prompts.tolist(), max_new_tokens=new_tokens, seed=0, cuda_graph=on_gpu,
                         block_size=args.block_size)

        batch_backends = backends
        if not on_gpu and not (batch <= sampler.COLUMN_MAJOR_MAX_SEQUENCES
                               and new_tokens >= sampler.COLUMN_MAJOR_MIN_NEW_TOKENS):
            batch_backends = ["row"]  # outside generate's gates the weights stay row-major: one side only
            print(f"{batch:>6} (generate keeps the weights row-major at this batch and length: row-major only)")
        runs = ([("hf", hf_run)] if hf_run else []) + [(b, lambda b=b: ours_run(b)) for b in batch_backends]
        for _, run in runs:  # warm-up, untimed
            run()
        seconds = {name: [] for name, _ in runs}
        for _ in range(repeat):  # interleaved rounds: transformers, then ours
            for name, run in runs:
                seconds[name].append(timed(run, device))
        hf_rate = batch * hf_tokens / min(seconds["hf"]) if hf_run else None
        for backend in batch_backends:
            ours_rate = batch * new_tokens / min(seconds[backend])
            round_ratios = [(new_tokens / o) / (hf_tokens / h) for o, h in zip(seconds[backend], seconds["hf"])] \
                if hf_run else [float("nan")]
            row = {"batch": batch, "decode_attention" if on_gpu else "weights": backend}
            row.update(ours_tokens_per_s=ours_rate, hf_tokens_per_s=hf_rate,
                       ratio=ours_rate / hf_rate if hf_rate else None, round_ratios=round_ratios if hf_run else None)
            median = sorted(round_ratios)[len(round_ratios) // 2]
            spread = f"{min(round_ratios):.2f}/{median:.2f}/{max(round_ratios):.2f}x" if hf_run else "-"
            line = f"{batch:>6} {backend:>11} {ours_rate:>11,.0f} {hf_rate or float('nan'):>10,.0f} " \
                   f"{(ours_rate / hf_rate if hf_rate else float('nan')):>5.2f}x {spread:>19}"
            if on_gpu:
                roofline = roofline_tokens_per_s(ours, batch, prompt_len, new_tokens, bandwidth)
                row.update(roofline_tokens_per_s=roofline, share_of_roofline=ours_rate / roofline)
                line += f" {roofline:>15,.0f} {ours_rate / roofline:>6.0%}"
            print(line, flush=True)
            rows.append(row)
        if not on_gpu:  # where each side's step goes: the GEMMs (both pay them) and the rest
            tokens = {name: hf_tokens if name == "hf" else new_tokens for name, _ in runs}
            split = {name: (min(seconds[name]) / tokens[name] * 1e3, gemm_ms_per_token(run, tokens[name]))
                     for name, run in runs}
            relayout_ms = relayout_ms_per_call(ours) if "column" in batch_backends else None
            print(f"{'':>6} ms per decode step, GEMMs + rest: " + ", ".join(
                f"{name} {step:.2f} = {gemm:.2f} + {step - gemm:.2f}" for name, (step, gemm) in split.items())
                + (f" (column's rest holds its call's relayout, {relayout_ms:.1f} ms, over {new_tokens} steps)"
                   if relayout_ms is not None else ""), flush=True)
            rows.append(dict(batch=batch, step_ms={name: step for name, (step, _) in split.items()},
                             gemm_ms={name: gemm for name, (_, gemm) in split.items()}, relayout_ms=relayout_ms))
    if on_gpu:
        for backend in backends:
            set_decode_backend(backend)
            trace = profile_decode(ours, max(batches), prompt_len, new_tokens, block_size=args.block_size or 16)
            per_step = kernels_per_step(trace)
            layers = ours.config.num_hidden_layers
            print(f"decode attention {backend}: {per_step:.0f} GPU launches per decode step, "
                  f"{per_step / layers:.1f} per layer ({layers} layers; the LM head and sampling counted in)")
            rows.append(dict(decode_attention=backend, launches_per_step=per_step,
                             launches_per_layer=per_step / layers))
            if args.profile:
                print(trace.key_averages().table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=70))
    return rows


if __name__ == "__main__":
    main()
