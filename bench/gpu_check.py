"""
One prepared script that proves the GPU path and measures it at real scale, in one call of a few minutes.

    python bench/gpu_check.py --out results/      # on a CUDA machine
    python bench/gpu_check.py --smoke --out /tmp/x # a tiny CPU version (CI runs it so the script never rots)

Steps, each in its own subprocess with a time limit, so that a failure or a slow step cannot eat the others' time;
each prints one table row when it ends:
  1. card, torch/triton versions, measured copy bandwidth and bf16 matmul TFLOP/s (the ceilings)
  2. kernel correctness on the card in bf16 and fp16 against the references (attention fwd/bwd with GQA and packed
     documents, decode attention and rope + cache write on a paged cache, log-prob and entropy fwd/bwd, a log-prob
     call with no rows, SiLU-multiply and add + RMSNorm fwd/bwd)
  3. essentials of bench/attention.py and bench/logprob.py (ours vs SDPA, vs naive log-prob), with ratios
  4. the sampler on a random-weight Qwen2.5-1.5B-shaped model (bench/sampler.py): tokens/s at batch 1, 64, 256
     with the Triton and the torch decode attention, vs transformers and the bandwidth roofline; graph vs eager
  5. SFT steps (8 packed 2k-token documents) with activation checkpointing on and off, foreach and fused AdamW,
     torch's or the Triton SiLU-multiply and add + RMSNorm, and the kernels of one step by GPU time; a GRPO step
     (8 prompts x G=8, completions cut to lengths from 64 to 1k): rollout from the fp32 masters under autocast vs
     the bf16 sampling copy (speed and sampler-vs-trainer log-prob gap), the no-grad pass and the update on padded
     vs packed rows; MFU and peak memory of each; and the longest sequence that fits a GRPO update on one card
  6. the paged KV cache against the per-slot layout in the same memory (bench/kv_cache.py, 8,192 new tokens):
     sequences held at once, decode steps and tokens/s
  7. results.json and results.md in --out
"""

import argparse
import json
import os
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

QWEN25_15B = dict(architecture="Qwen2ForCausalLM", vocab_size=151936, hidden_size=1536, intermediate_size=8960,
                  num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2, rope_theta=1e6,
                  tie_word_embeddings=True, qkv_bias=True, max_position_embeddings=32768)
TINY = dict(architecture="Qwen2ForCausalLM", vocab_size=512, hidden_size=64, intermediate_size=128,
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
            qkv_bias=True, max_position_embeddings=4096)
STEP_LIMITS = {1: 60, 2: 150, 3: 240, 4: 360, 5: 240, 6: 180}


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn, repeat=1, warmup=None):
    """Seconds per call of fn after one call of warmup (default: fn itself)."""
    (warmup or fn)()
    sync()
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    sync()
    return (time.perf_counter() - start) / repeat


def random_model(shape, device, dtype):
    """A model of the given shape with N(0, 0.02) weights made directly on the device."""
    from model import ModelConfig, Transformer

    with torch.device(device):
        model = Transformer(ModelConfig(**shape)).to(dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.fill_(1.0) if name.endswith("norm.weight") else p.normal_(0, 0.02)
    return model


# -----------------------------------------------------------------------------
# 1. the card


def step_card(smoke):
    import triton

    row = dict(torch=torch.__version__, triton=triton.__version__, python=sys.version.split()[0])
    if smoke:
        return dict(row, device="cpu (smoke)")
    props = torch.cuda.get_device_properties(0)
    x = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    seconds = timed(lambda: y.copy_(x), repeat=10)
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    matmul = timed(lambda: a @ b, repeat=10)
    return dict(row, device=props.name, memory_gib=props.total_memory / 2**30, sms=props.multi_processor_count,
                capability=f"{props.major}.{props.minor}", copy_bandwidth_gbs=2 * x.numel() / seconds / 1e9,
                bf16_matmul_tflops=2 * 8192**3 / matmul / 1e12)


# -----------------------------------------------------------------------------
# 2. kernel correctness on the card


def step_correctness(smoke):
    from kernels.attention import attention, attention_ref
    from kernels.decode_attention import decode_attention, decode_attention_ref
    from kernels.logprob import token_logprobs, token_logprobs_naive

    device = "cpu" if smoke else "cuda"
    results = {}
    dtypes = [torch.float32] if smoke else [torch.bfloat16, torch.float16]
    attention_cases = [(2, 12, 2, [300], 128), (1, 14, 2, [1, 7, 130, 513, 64], 64), (1, 4, 4, [257], 64)]
    logprob_cases = [(300, 256, 1000), (1000, 1536, 151936)] if not smoke else [(40, 32, 300)]
    if smoke:
        attention_cases = [(1, 4, 2, [1, 7, 20], 64)]
    for dtype in dtypes:
        name = str(dtype).removeprefix("torch.")
        worst = dict(out=0.0, lse=0.0, grad=0.0)
        for B, H, Hkv, lengths, D in attention_cases:
            total = sum(lengths)
            cu = torch.tensor([0] + lengths, device=device).cumsum(0).to(torch.int32) if len(lengths) > 1 else None
            make = lambda h: torch.randn(B, total, h, D, device=device, dtype=dtype).transpose(1, 2).requires_grad_()
            q, k, v = make(H), make(Hkv), make(Hkv)
            out, lse = attention(q, k, v, cu_seqlens=cu, return_lse=True, backend="triton")
            grad = torch.randn_like(out)
            grads = torch.autograd.grad(out, (q, k, v), grad)
            ref_inputs = [t.detach().float().requires_grad_() for t in (q, k, v)]
            ref_out, ref_lse = attention_ref(*ref_inputs, cu_seqlens=cu, return_lse=True)
            ref_grads = torch.autograd.grad(ref_out, ref_inputs, grad.float())
            worst["out"] = max(worst["out"], (out.float() - ref_out).abs().max().item())
            worst["lse"] = max(worst["lse"], (lse - ref_lse).abs().max().item())
            worst["grad"] = max(worst["grad"], max(((g.float() - r).abs().max() / r.abs().max().clamp(min=1)).item()
                                                   for g, r in zip(grads, ref_grads)))
        results[f"attention_{name}"] = dict(worst, ok=worst["out"] < 2e-2 and worst["lse"] < 2e-2
                                            and worst["grad"] < 5e-2)
        k_cache = torch.randn(8, 2, 700, 128, device=device, dtype=dtype)
        v_cache = torch.randn_like(k_cache)
        q = torch.randn(4, 12, 128, device=device, dtype=dtype)
        slots, lengths = torch.tensor([7, 0, 3, 5], device=device), torch.tensor([1, 700, 33, 512], device=device)
        error = (decode_attention(q, k_cache, v_cache, slots, lengths, backend="triton").float()
                 - decode_attention_ref(q.float(), k_cache.float(), v_cache.float(), slots, lengths)).abs().max().item()
        results[f"decode_attention_{name}"] = dict(out=error, ok=error < 2e-2)
        results[f"paged_decode_{name}"] = paged_decode_error(q, lengths)
        worst = dict(logp=0.0, entropy=0.0, grad=0.0, max_logp=float("-inf"))
        for N, D, V in logprob_cases:
            hidden = torch.randn(N, D, device=device, dtype=dtype).requires_grad_()
            weight = (torch.randn(V, D, device=device, dtype=dtype) / D ** 0.5).requires_grad_()
            targets = torch.randint(0, V, (N,), device=device)
            logp, entropy = token_logprobs(hidden, weight, targets, 0.9, return_entropy=True, backend="triton")
            grads = torch.autograd.grad(logp.sum() + 0.1 * entropy.sum(), (hidden, weight))
            ref_inputs = [t.detach().float().requires_grad_() for t in (hidden, weight)]
            ref_logp, ref_entropy = token_logprobs_naive(*ref_inputs, targets, 0.9, return_entropy=True)
            ref_grads = torch.autograd.grad(ref_logp.sum() + 0.1 * ref_entropy.sum(), ref_inputs)
            worst["logp"] = max(worst["logp"], (logp - ref_logp).abs().max().item())
            worst["entropy"] = max(worst["entropy"], (entropy - ref_entropy).abs().max().item())
            worst["max_logp"] = max(worst["max_logp"], logp.max().item())
            worst["grad"] = max(worst["grad"], max(((g.float() - r).norm() / r.norm()).item()
                                                   for g, r in zip(grads, ref_grads)))
        results[f"logprob_{name}"] = dict(worst, ok=worst["logp"] <= 2e-3 and worst["max_logp"] <= 0
                                          and worst["grad"] < 1e-2)
        # a micro-batch whose rows are all masked reaches the kernel with no rows: empty outputs, zero gradients
        hidden = torch.randn(0, 64, device=device, dtype=dtype).requires_grad_()
        weight = torch.randn(300, 64, device=device, dtype=dtype).requires_grad_()
        logp, entropy = token_logprobs(hidden, weight, torch.zeros(0, dtype=torch.long, device=device), 1.0,
                                       return_entropy=True, backend="triton")
        (logp.sum() + entropy.sum()).backward()
        results[f"logprob_no_rows_{name}"] = dict(ok=logp.shape == (0,) and entropy.shape == (0,)
                                                  and not weight.grad.any().item())
        results[f"silu_mul_{name}"], results[f"add_rms_norm_{name}"] = layer_kernels_error(device, dtype)
    results["all_ok"] = all(r["ok"] for r in results.values())
    return results


def paged_decode_error(q, lengths, block_size=16):
    """The decode attention and the rope + cache-write kernels on a paged cache (blocks of 16 in a shuffled order)
    against their references in fp32; `ok` when both are within 2e-2."""
    from kernels.decode_attention import decode_attention, decode_attention_ref
    from kernels.rope_cache import rope_and_cache

    device, dtype = q.device, q.dtype
    batch, per_sequence = q.shape[0], -(-int(lengths.max()) // block_size)
    table = (1 + torch.randperm(batch * per_sequence)).view(batch, per_sequence).to(device)
    k_cache = torch.randn(1 + batch * per_sequence, 2, block_size, q.shape[2], device=device, dtype=dtype)
    v_cache = torch.randn_like(k_cache)
    attention = (decode_attention(q, k_cache, v_cache, table, lengths, backend="triton").float()
                 - decode_attention_ref(q.float(), k_cache.float(), v_cache.float(), table, lengths)).abs().max()
    k, v = torch.randn(batch, 2, q.shape[2], device=device, dtype=dtype), torch.randn(batch, 2, q.shape[2],
                                                                                       device=device, dtype=dtype)
    cos, sin = torch.rand(batch, q.shape[2], device=device, dtype=dtype), torch.rand(batch, q.shape[2],
                                                                                      device=device, dtype=dtype)
    positions = lengths - 1
    caches = [(k_cache.clone(), v_cache.clone()), (k_cache.float(), v_cache.float())]
    rotated = [rope_and_cache(q, k, v, cos, sin, *caches[0], table, positions, backend="triton").float(),
               rope_and_cache(q.float(), k.float(), v.float(), cos.float(), sin.float(), *caches[1], table, positions,
                              backend="torch")]
    rope = max((rotated[0] - rotated[1]).abs().max().item(),
               *((a.float() - b).abs().max().item() for a, b in zip(caches[0], caches[1])))
    return dict(attention=attention.item(), rope_cache=rope, ok=attention.item() < 2e-2 and rope < 2e-2)


def layer_kernels_error(device, dtype):
    """silu_mul and add_rms_norm (forward and backward, at 1.5B's widths) against their references in fp32: the
    largest error relative to the reference's largest value."""
    from kernels.add_rms_norm import add_rms_norm
    from kernels.silu_mul import silu_mul

    def relative(ours, reference):
        return max(((a.float() - b).abs().max() / b.abs().max().clamp(min=1e-6)).item()
                   for a, b in zip(ours, reference))

    def run(fn, inputs, backend):
        """Outputs and input gradients, under upstream gradients drawn from a fixed seed (the same for both)."""
        leaves = [t.detach().requires_grad_() for t in inputs]
        outputs = fn(*leaves, backend)
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        generator = torch.Generator().manual_seed(0)
        upstream = [torch.randn(o.shape, generator=generator).to(o.device, o.dtype) for o in outputs]
        grads = torch.autograd.grad(outputs, leaves, upstream)
        return [o.float() for o in outputs] + [g.float() for g in grads]

    rows, intermediate, hidden = (8, 64, 32) if device == "cpu" else (300, 8960, 1536)
    gate_up = torch.randn(rows, 2 * intermediate, device=device, dtype=dtype)
    silu = relative(run(lambda g, b: silu_mul(g, backend=b), [gate_up], "triton"),
                    run(lambda g, b: silu_mul(g, backend=b), [gate_up.float()], "torch"))
    x, delta = torch.randn(rows, hidden, device=device), torch.randn(rows, hidden, device=device, dtype=dtype)
    weight = torch.rand(hidden, device=device) + 0.5
    norm = relative(run(lambda *t: add_rms_norm(*t[:3], 1e-6, backend=t[3]), [x, delta, weight], "triton"),
                    run(lambda *t: add_rms_norm(*t[:3], 1e-6, backend=t[3]), [x, delta.float(), weight], "torch"))
    return dict(relative_error=silu, ok=silu < 2e-2), dict(relative_error=norm, ok=norm < 2e-2)


# -----------------------------------------------------------------------------
# 3. kernel benchmarks


def step_kernel_bench(smoke):
    if smoke:
        from bench.logprob import cpu_table

        return dict(logprob_cpu=cpu_table([256]))
    from bench import attention as attention_bench
    from bench import logprob as logprob_bench

    return dict(attention=attention_bench.main(["--seqlens", "2048,4096,8192", "--tokens", "16384"]),
                logprob=logprob_bench.cuda_table([16384, 65536]))


# -----------------------------------------------------------------------------
# 4. the sampler at real scale


def step_sampler(smoke, skip_hf=False, new_tokens=512):
    """bench/sampler.py's rows (CUDA graph, Triton and torch decode attention), plus how far greedy decoding
    through the graph agrees with eager decoding on the same random model."""
    from bench import sampler as sampler_bench

    argv = ["--device", "cpu", "--batches", "1,4", "--new_tokens", "16"] if smoke else \
        ["--device", "cuda", "--batches", "1,64,256", "--new_tokens", str(new_tokens), "--decode_backend", "both"]
    rows = sampler_bench.main(argv + (["--skip_hf"] if skip_hf or smoke else []))
    if smoke:
        return dict(rows=rows, graph_vs_eager_greedy=greedy_divergence(random_model(TINY, "cpu", torch.float32), 4, 8,
                                                                       cuda_graph=False))
    model = random_model(QWEN25_15B, "cuda", torch.bfloat16).eval()
    divergence = dict(bf16=greedy_divergence(model, 32, 128))
    del model
    divergence["fp32"] = greedy_divergence(random_model(QWEN25_15B, "cuda", torch.float32).eval(), 32, 128)
    return dict(rows=rows, graph_vs_eager_greedy=divergence)


def greedy_divergence(model, batch, new_tokens, cuda_graph=True):
    """Greedy decoding eager and through the CUDA graph, same model and prompts: how many sequences agree and, at
    each first disagreement, the two chosen tokens' logit gap from a full forward (no cache) of the shared prefix,
    beside the spacing of the model's dtype at that logit. Gaps within about one spacing are ties that rounding
    breaks either way (the graph runs its GEMMs at the captured batch size, which can pick other kernels); a gap of
    many spacings would be a bug."""
    from sampler import generate

    device = next(model.parameters()).device
    vocab = model.config.vocab_size
    prompts = torch.randint(0, vocab, (batch, 256 if device.type == "cuda" else 16),
                            generator=torch.Generator().manual_seed(2)).tolist()
    eager = generate(model, prompts, new_tokens, temperature=0)
    graphed = generate(model, prompts, new_tokens, temperature=0, cuda_graph=cuda_graph)
    common = [next((i for i, (a, b) in enumerate(zip(e.tokens, g.tokens)) if a != b), new_tokens)
              for e, g in zip(eager, graphed)]
    eps = torch.finfo(next(model.parameters()).dtype).eps
    gaps = []
    for prompt, e, g, position in zip(prompts, eager, graphed, common):
        if position == new_tokens:
            continue
        with torch.no_grad():
            logits = model(torch.tensor([prompt + e.tokens[:position]], device=device))[0, -1].float()
        chosen = logits[e.tokens[position]]
        spacing = 2.0 ** torch.log2(chosen.abs().clamp(min=1e-30)).floor().item() * eps
        top = logits.topk(2).values
        gaps.append(dict(position=position, eager_minus_graph_logit=(chosen - logits[g.tokens[position]]).item(),
                         top2_gap=(top[0] - top[1]).item(), dtype_spacing=spacing))
    return dict(dtype=str(next(model.parameters()).dtype), sequences_equal=sum(c == new_tokens for c in common)
                / len(common), common_prefix_tokens=common, divergences=gaps,
                first_token_logprob_gap=max(abs(e.logprobs[0] - g.logprobs[0]) for e, g in zip(eager, graphed)))


# -----------------------------------------------------------------------------
# 5. one SFT step and one GRPO step at real scale


def step_training(smoke):
    """SFT and GRPO steps on the 1.5B shapes, each lever measured beside the path it replaces."""
    device = "cpu" if smoke else "cuda"
    shape = TINY if smoke else QWEN25_15B
    model = random_model(shape, device, torch.float32).train()
    peak_flops = 989e12 if not smoke else 1e12  # H100/H200 SXM dense bf16; MFU is reported against it
    body = model.num_parameters() - shape["vocab_size"] * shape["hidden_size"]  # tied: the head is the embedding

    def mfu(tokens, loss_tokens, seconds):
        """6 x the parameters each token passes through: the body at every token, the LM head at loss positions
        only (the embedding lookup costs no FLOPs); attention's own FLOPs left out."""
        head = shape["vocab_size"] * shape["hidden_size"]
        return 6 * (body * tokens + head * loss_tokens) / seconds / peak_flops

    sft = sft_steps(model, shape, device, smoke, mfu)
    grpo = grpo_step(model, shape, device, smoke, mfu)
    return dict(sft=sft, grpo=grpo, longest_grpo_sequence=longest_sequence(model, shape, device, smoke))


def peak_gib(device):
    return torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None


def reset_peak(device):
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def autocast_on(device):
    from common import autocast_for

    return autocast_for(torch.device(device))


def sft_steps(model, shape, device, smoke, mfu):
    """8 documents of 2k tokens packed in one row, one optimizer step each: activation checkpointing on and off,
    foreach and fused AdamW, torch's or the Triton SiLU-multiply and add + RMSNorm; then the kernels of the last
    variant by GPU time. The kernel switches are restored afterwards."""
    docs, doc_len = (2, 32) if smoke else (8, 2048)
    ids = torch.randint(0, shape["vocab_size"], (1, docs * doc_len), device=device)
    cu = torch.arange(0, docs + 1, device=device, dtype=torch.int32) * doc_len
    positions = torch.arange(doc_len, device=device).repeat(docs)[None]
    rows = {}
    saved = {variable: os.environ.get(variable) for variable in LAYER_KERNEL_SWITCHES}
    try:
        for checkpointing, fused, layer_kernels in [(True, False, "torch"), (False, False, "torch"),
                                                    (False, True, "torch"), (False, True, "triton")]:
            for variable in LAYER_KERNEL_SWITCHES:
                os.environ[variable] = layer_kernels
            model.gradient_checkpointing = checkpointing
            step = sft_step(model, ids, positions, cu, device, fused)
            reset_peak(device)
            seconds = timed(step, repeat=2)
            name = f"checkpointing={checkpointing} fused_adamw={fused} silu_mul,add_rms_norm={layer_kernels}"
            rows[name] = dict(tokens=ids.numel(), seconds=seconds, tokens_per_s=ids.numel() / seconds,
                              mfu=mfu(ids.numel(), ids.numel() - docs, seconds), peak_memory_gib=peak_gib(device))
        if not smoke:
            rows["kernels_of_last_variant"] = top_kernels(step)
    finally:
        model.gradient_checkpointing = False
        for variable, value in saved.items():
            if value is None:
                os.environ.pop(variable, None)
            else:
                os.environ[variable] = value
    return rows


def sft_step(model, ids, positions, cu, device, fused):
    """A function running one SFT optimizer step on the packed row (a fresh AdamW, foreach or fused)."""
    from common import make_optimizer
    from model import sequence_logprobs

    optimizer = make_optimizer(model, 1e-5, 0.0, fused=fused)

    def step():
        with autocast_on(device):
            loss = -sequence_logprobs(model, ids, positions, cu).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


LAYER_KERNEL_SWITCHES = ("SILU_MUL_BACKEND", "ADD_RMS_NORM_BACKEND")


def top_kernels(fn, limit=25):
    """The GPU kernels of one call of fn, by total time: [(name, total ms, calls)] and the total."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as trace:
        fn()
        sync()
    rows = sorted(trace.key_averages(), key=lambda e: -e.device_time_total)
    total = sum(e.self_device_time_total for e in rows) / 1e3
    return dict(total_ms=total, kernels=[(e.key[:80], round(e.self_device_time_total / 1e3, 2), e.count)
                                         for e in sorted(rows, key=lambda e: -e.self_device_time_total)[:limit]])


def grpo_step(model, shape, device, smoke, mfu):
    """8 prompts x G=8 of 256 tokens, completions of up to 1k tokens (EOS ignored, then cut to lengths drawn
    uniformly from 64..1024, as real rollouts end at different lengths), random 0/1 rewards. Rollout with the fp32
    masters under autocast vs the bf16 sampling copy (common.sampling_copy); the reference-style no-grad pass and
    the update on padded and on packed rows; each phase's seconds, the update's MFU and peak memory."""
    import train_grpo
    from common import make_optimizer, sampling_copy
    from sampler import generate

    prompts_n, group, prompt_len, new_tokens, probe = (2, 2, 8, 8, 4) if smoke else (8, 8, 256, 1024, 64)
    generator = torch.Generator().manual_seed(3)
    prompts = torch.randint(0, shape["vocab_size"], (prompts_n, prompt_len), generator=generator).tolist()
    result = {}

    def rollout(policy, tokens):
        with autocast_on(device):
            return generate(policy, prompts, tokens, temperature=1.0, n=group, seed=0, cuda_graph=not smoke)

    model.eval()
    policies = [("fp32_masters_autocast", lambda: model), ("bf16_sampling_copy", lambda: sampling_copy(model))]
    for name, policy in policies:
        start = time.perf_counter()
        copy = policy()
        sync()
        copy_s = time.perf_counter() - start
        outputs = []
        seconds = timed(lambda: outputs.append(rollout(copy, probe)))
        result[f"rollout_{probe}_tokens_{name}"] = dict(
            seconds=seconds, copy_s=copy_s, tokens_per_s=prompts_n * group * probe / seconds,
            sampler_vs_trainer=mismatch(model, prompts, outputs[-1], device))
    reset_peak(device)
    start = time.perf_counter()
    copy = sampling_copy(model)
    completions = rollout(copy, new_tokens)
    sync()
    result["rollout_s"] = time.perf_counter() - start
    result["rollout_tokens_per_s"] = sum(len(c.tokens) for c in completions) / result["rollout_s"]
    model.train()
    lengths = torch.randint(min(64, new_tokens), new_tokens + 1, (len(completions),), generator=generator).tolist()
    samples = [train_grpo.Sample(prompts[c.prompt_index], c.tokens[:n], c.logprobs[:n], False, False, 0.0, "")
               for c, n in zip(completions, lengths)]
    advantages = train_grpo.group_advantages(torch.randint(0, 2, (len(samples),)).float(), group)[0].to(device)
    optimizer = make_optimizer(model, 1e-5, 0.0)
    micro = 8 if not smoke else 2
    completion_tokens = sum(lengths)
    all_tokens = completion_tokens + len(samples) * prompt_len
    for layout, checkpointing in [("padded", False), ("packed", False), ("packed", True), ("shared", False)]:
        model.gradient_checkpointing = checkpointing
        batch = train_grpo.collate(samples, 0, torch.device(device), layout)
        reset_peak(device)

        def no_grad_pass():  # what the reference (or pi_old) pass costs
            with torch.no_grad(), autocast_on(device):
                for k in range(0, len(samples), micro):
                    train_grpo.training_logprobs(model, batch, slice(k, k + micro), 1.0)

        no_grad_s = timed(no_grad_pass)

        def update():
            for k in range(0, len(samples), micro):
                rows = slice(k, k + micro)
                with autocast_on(device):
                    logprobs = train_grpo.training_logprobs(model, batch, rows, 1.0)
                loss, _ = train_grpo.policy_loss(logprobs, logprobs.detach(), advantages[rows],
                                                 batch.completion_mask[rows], len(samples), completion_tokens,
                                                 eps_low=0.2, eps_high=0.28, loss_agg="token-mean",
                                                 max_new_tokens=new_tokens)
                loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        seconds = timed(update)
        result[f"layout={layout} checkpointing={checkpointing}"] = dict(
            padded_tokens=batch.input_ids.numel(), real_tokens=all_tokens, completion_tokens=completion_tokens,
            no_grad_pass_s=no_grad_s, update_s=seconds, update_mfu=mfu(all_tokens, completion_tokens, seconds),
            peak_memory_gib=peak_gib(device))
    model.gradient_checkpointing = False
    return result


def mismatch(model, prompts, completions, device):
    """Mean and max |sampler log-prob - trainer log-prob| over the completion tokens (the trainer: fp32 masters under
    autocast, as the update sees them)."""
    import train_grpo

    samples = [train_grpo.Sample(prompts[c.prompt_index], c.tokens, c.logprobs, False, False, 0.0, "")
               for c in completions]
    batch = train_grpo.collate(samples, 0, torch.device(device))
    with torch.no_grad(), autocast_on(device):
        trainer = train_grpo.training_logprobs(model, batch, slice(None), 1.0)
    gap = (trainer - batch.sampler_logprobs).abs()[batch.completion_mask.bool()]
    return dict(mean=gap.mean().item(), max=gap.max().item())


def longest_sequence(model, shape, device, smoke):
    """The longest single sequence a GRPO update (forward + backward, checkpointed blocks) fits on this card."""
    from model import sequence_logprobs

    model.gradient_checkpointing = True
    longest = None
    for length in ([64] if smoke else [16384, 32768, 65536, 131072]):
        try:
            sequence = torch.randint(0, shape["vocab_size"], (1, length), device=device)
            with autocast_on(device):
                logprobs = sequence_logprobs(model, sequence)
            logprobs.sum().backward()
            model.zero_grad(set_to_none=True)
            longest = length
        except torch.OutOfMemoryError:
            break
        finally:
            reset_peak(device)
    return longest


# -----------------------------------------------------------------------------
# 6. the paged KV cache


def step_kv_cache(smoke):
    """bench/kv_cache.py: the paged cache against the per-slot layout in the same memory. On the GPU the paged run
    may hold 64 sequences (the CUDA graph decodes all its slots at every step, so the bound is its batch)."""
    from bench import kv_cache as kv_cache_bench

    return dict(rows=kv_cache_bench.main(
        ["--sequences", "8", "--max_new_tokens", "256", "--vocab", "64", "--slots", "2"] if smoke else
        ["--device", "cuda", "--sequences", "256", "--slots", "8", "--max_running", "64"]))


STEPS = {1: ("card", step_card), 2: ("kernel correctness", step_correctness), 3: ("kernel benchmarks",
         step_kernel_bench), 4: ("sampler", step_sampler), 5: ("SFT and GRPO steps", step_training),
         6: ("paged KV cache", step_kv_cache)}


# -----------------------------------------------------------------------------
# 7. the driver: each step in a subprocess with a time limit, then results.json and results.md


def run_step(number, args):
    out_file = os.path.join(args.out, f"step{number}.json")
    command = [sys.executable, os.path.abspath(__file__), "--step", str(number), "--out", args.out]
    env = dict(os.environ)
    command += ["--sampler_tokens", str(args.sampler_tokens)] + (["--skip_hf"] if args.skip_hf else [])
    if args.smoke:
        command.append("--smoke")
        env["TRITON_INTERPRET"] = "1"  # the kernels run in Triton's interpreter on CPU tensors
    limit = STEP_LIMITS[number] * (args.time_scale if not args.smoke else 1)
    start = time.time()
    try:
        completed = subprocess.run(command, env=env, timeout=limit, capture_output=True, text=True)
        status = "ok" if completed.returncode == 0 else f"failed (exit {completed.returncode})"
        log = completed.stdout + completed.stderr
    except subprocess.TimeoutExpired as error:
        status, log = f"timed out after {limit}s", (error.stdout or b"").decode() + (error.stderr or b"").decode()
    result = None
    if os.path.exists(out_file):
        with open(out_file) as f:
            result = json.load(f)
    return dict(step=number, name=STEPS[number][0], status=status, seconds=time.time() - start, result=result,
                log_tail=log[-3000:] if status != "ok" else log[-1500:])


def write_markdown(path, summary):
    lines = [f"# GPU check, {summary['date']}", "", f"Machine: {summary.get('device', '?')}", "",
             "| step | status | seconds |", "| --- | --- | --- |"]
    lines += [f"| {s['step']}. {s['name']} | {s['status']} | {s['seconds']:.0f} |" for s in summary["steps"]]
    for s in summary["steps"]:
        lines += ["", f"## {s['step']}. {s['name']}", "", "```", json.dumps(s["result"], indent=1)[:6000], "```"]
        if s["status"] != "ok":
            lines += ["", "```", s["log_tail"], "```"]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="out/gpu_check")
    parser.add_argument("--smoke", action="store_true", help="tiny CPU version of every step")
    parser.add_argument("--step", type=int, default=None, help="run one step in this process (used internally)")
    parser.add_argument("--steps", default="1,2,3,4,5,6")
    parser.add_argument("--time_scale", type=float, default=1.0, help="multiplies every step's time limit")
    parser.add_argument("--skip_hf", action="store_true", help="step 4 without transformers' generate")
    parser.add_argument("--sampler_tokens", type=int, default=512, help="step 4: new tokens per sequence")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    if args.step:
        extra = dict(skip_hf=args.skip_hf, new_tokens=args.sampler_tokens) if args.step == 4 else {}
        result = STEPS[args.step][1](args.smoke, **extra)
        with open(os.path.join(args.out, f"step{args.step}.json"), "w") as f:
            json.dump(result, f, indent=1, default=str)
        print(json.dumps(result, default=str)[:2000])
        return
    if not args.smoke and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --smoke for the CPU version")
    summary = dict(date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), steps=[])
    print(f"{'step':<24} {'status':<28} {'seconds':>7}")
    for number in [int(s) for s in args.steps.split(",")]:
        row = run_step(number, args)
        summary["steps"].append(row)
        if number == 1 and row["result"]:
            summary["device"] = row["result"].get("device")
        print(f"{str(number) + '. ' + row['name']:<24} {row['status']:<28} {row['seconds']:>7.0f}", flush=True)
        if row["status"] != "ok":
            print(row["log_tail"][-1500:], flush=True)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(summary, f, indent=1, default=str)
    write_markdown(os.path.join(args.out, "results.md"), summary)
    print(f"wrote {args.out}/results.json and results.md")
    if not all(s["status"] == "ok" for s in summary["steps"]):
        sys.exit(1)


if __name__ == "__main__":
    main()
