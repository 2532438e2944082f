"""
Attention throughput: our Triton kernel vs torch's scaled_dot_product_attention (flash backend, and cuDNN when it
runs), forward and forward+backward, causal, bf16, on Qwen2.5-1.5B shapes (12 query heads, 2 KV heads, head dim 128)
and Qwen2.5-0.5B shapes (14/2, head dim 64); plus a ragged packed batch vs SDPA on the same data right-padded.

    python bench/attention.py [--seqlens 1024,2048,4096,8192] [--tokens 16384]
    python bench/attention.py --sweep     # each pass's kernel under each tile configuration of SWEEP

TFLOP/s count the causal half of the matmuls: 4 * B * H * T^2 * D / 2 forward, 2.5x that forward+backward.
"""

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from kernels.attention import attention  # noqa: E402

SHAPES = {"qwen2.5-1.5b": (12, 2, 128), "qwen2.5-0.5b": (14, 2, 64)}


def time_ms(fn, iters=10):
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def sdpa(backend):
    from torch.nn.attention import sdpa_kernel

    def run(q, k, v):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    return run


def measure(fn, q, k, v, backward):
    if not backward:
        with torch.no_grad():
            return time_ms(lambda: fn(q, k, v))
    grad = torch.randn_like(q)
    return time_ms(lambda: torch.autograd.grad(fn(q, k, v), (q, k, v), grad))


def dense_rows(seqlens, tokens):
    from torch.nn.attention import SDPBackend

    peers = {"sdpa-flash": sdpa(SDPBackend.FLASH_ATTENTION), "sdpa-cudnn": sdpa(SDPBackend.CUDNN_ATTENTION)}
    rows = []
    for shape_name, (heads, kv_heads, head_dim) in SHAPES.items():
        for T in seqlens:
            B = max(1, tokens // T)
            make = lambda h: torch.randn(B, h, T, head_dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            q, k, v = make(heads), make(kv_heads), make(kv_heads)
            for backward in (False, True):
                flops = 4 * B * heads * T * T * head_dim / 2 * (2.5 if backward else 1.0)
                ours = measure(lambda a, b, c: attention(a, b, c, backend="triton"), q, k, v, backward)
                row = dict(shape=shape_name, T=T, B=B, pass_="fwd+bwd" if backward else "fwd",
                           ours_tflops=flops / ours / 1e9)
                for name, fn in peers.items():
                    try:
                        row[f"{name}_tflops"] = flops / measure(fn, q, k, v, backward) / 1e9
                    except RuntimeError:  # a backend that cannot run this shape on this card
                        row[f"{name}_tflops"] = None
                rows.append(row)
                flash = row["sdpa-flash_tflops"]
                print(f"{shape_name:>13} T={T:>5} B={B:>3} {row['pass_']:>7} | ours {row['ours_tflops']:6.1f} | "
                      f"sdpa-flash {flash or float('nan'):6.1f} | cudnn {row['sdpa-cudnn_tflops'] or float('nan'):6.1f}"
                      f" | ours/flash {row['ours_tflops'] / flash if flash else float('nan'):.2f}x", flush=True)
    return rows


def packed_rows(tokens):
    """Ragged documents packed (cu_seqlens) vs the same documents right-padded to the longest for SDPA, and vs our
    kernel on an equal-length batch of the same total tokens."""
    heads, kv_heads, head_dim = SHAPES["qwen2.5-1.5b"]
    generator = torch.Generator().manual_seed(0)
    lengths = []
    while sum(lengths) < tokens:
        lengths.append(int(torch.randint(256, 4096, (1,), generator=generator)))
    lengths[-1] -= sum(lengths) - tokens
    cu = torch.tensor([0] + lengths, device="cuda").cumsum(0).to(torch.int32)
    make = lambda h, b, t: torch.randn(b, h, t, head_dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    packed = [make(heads, 1, tokens), make(kv_heads, 1, tokens), make(kv_heads, 1, tokens)]
    padded = [make(heads, len(lengths), max(lengths)), make(kv_heads, len(lengths), max(lengths)),
              make(kv_heads, len(lengths), max(lengths))]
    equal_T = tokens // len(lengths)
    equal = [make(heads, len(lengths), equal_T), make(kv_heads, len(lengths), equal_T),
             make(kv_heads, len(lengths), equal_T)]
    from torch.nn.attention import SDPBackend

    useful_flops = sum(4 * heads * n * n * head_dim / 2 for n in lengths) * 3.5  # fwd + bwd
    ours_packed = measure(lambda a, b, c: attention(a, b, c, cu_seqlens=cu, backend="triton"), *packed, True)
    ours_equal = measure(lambda a, b, c: attention(a, b, c, backend="triton"), *equal, True)
    sdpa_padded = measure(sdpa(SDPBackend.FLASH_ATTENTION), *padded, True)
    equal_flops = len(lengths) * 4 * heads * equal_T * equal_T * head_dim / 2 * 3.5
    row = dict(documents=len(lengths), tokens=tokens, ours_packed_ms=ours_packed, ours_equal_length_ms=ours_equal,
               sdpa_padded_ms=sdpa_padded, packed_tflops=useful_flops / ours_packed / 1e9,
               equal_length_tflops=equal_flops / ours_equal / 1e9)
    print(f"packed {len(lengths)} docs / {tokens} tokens (fwd+bwd): ours packed {ours_packed:.2f} ms = "
          f"{row['packed_tflops']:.1f} TFLOP/s | ours equal-length {row['equal_length_tflops']:.1f} TFLOP/s "
          f"(packed/equal {row['packed_tflops'] / row['equal_length_tflops']:.2f}x) | sdpa right-padded "
          f"{sdpa_padded:.2f} ms ({sdpa_padded / ours_packed:.2f}x our time)", flush=True)
    return row


# tile configurations that compile for sm_90 in bf16 at head dim 128 without spills (the current ones first)
SWEEP = {"forward": [(128, 64, 8, 3), (128, 64, 8, 2), (128, 64, 8, 4), (64, 64, 8, 3), (64, 128, 8, 3), (64, 64, 8, 4)],
         "dkdv": [(32, 64, 8, 3), (32, 64, 8, 2), (32, 64, 8, 4), (64, 64, 8, 2), (64, 64, 8, 3), (32, 32, 4, 3),
                  (16, 64, 8, 3)],
         "dq": [(64, 32, 8, 3), (64, 32, 8, 2), (64, 32, 8, 4), (64, 64, 8, 2), (64, 64, 8, 3), (32, 64, 8, 3)]}


def sweep(docs=8, doc_len=2048):
    """Each pass's kernel alone (the forward; the backward's dK/dV and dQ kernels, through attention_backward) for
    each tile configuration in SWEEP, on 8 packed documents of 2k tokens with Qwen2.5-1.5B's heads, the other passes
    at their defaults; results checked against the default configuration's."""
    import kernels.attention as A

    heads, kv_heads, head_dim = SHAPES["qwen2.5-1.5b"]
    tokens = docs * doc_len
    cu = torch.arange(0, docs + 1, device="cuda", dtype=torch.int32) * doc_len
    q = torch.randn(1, tokens, heads, head_dim, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
    k, v = (torch.randn(1, tokens, kv_heads, head_dim, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
            for _ in range(2))
    default_config = A.kernel_config
    out, lse = A.attention_forward(q, k, v, True, cu)
    do = torch.randn_like(out)
    expected = A.attention_backward(do, q, k, v, out, lse, True, cu)
    flops = docs * 4 * heads * doc_len * doc_len * head_dim / 2
    rows = []
    for pass_name, candidates in SWEEP.items():
        for block_m, block_n, warps, stages in candidates:
            def config(head_dim_, dtype, name, arch=90):
                chosen = default_config(head_dim_, dtype, name, arch)
                if name == pass_name:
                    chosen.update(BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps, num_stages=stages)
                return chosen

            A.kernel_config = config
            try:
                if pass_name == "forward":
                    ms = time_ms(lambda: A.attention_forward(q, k, v, True, cu))
                    error = (A.attention_forward(q, k, v, True, cu)[0].float() - out.float()).abs().max().item()
                    tflops = flops / ms / 1e9
                else:
                    ms = time_ms(lambda: A.attention_backward(do, q, k, v, out, lse, True, cu))
                    grads = A.attention_backward(do, q, k, v, out, lse, True, cu)
                    error = max((g.float() - e.float()).abs().max().item() for g, e in zip(grads, expected))
                    tflops = 2.5 * flops / ms / 1e9
                row = dict(pass_=pass_name, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps, num_stages=stages,
                           ms=ms, tflops=tflops, max_error_vs_default=error)
            except Exception as failure:  # a configuration this card cannot run
                row = dict(pass_=pass_name, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps, num_stages=stages,
                           error=str(failure)[:200])
            finally:
                A.kernel_config = default_config
            rows.append(row)
            print(row, flush=True)
    from torch.nn.attention import SDPBackend

    flash = sdpa(SDPBackend.FLASH_ATTENTION)
    padded = [t.detach()[0].reshape(t.shape[1], docs, doc_len, head_dim).transpose(0, 1).contiguous().requires_grad_()
              for t in (q, k, v)]  # (docs, heads, doc_len, head_dim): the same documents as a batch
    forward_ms = measure(flash, *padded, False)
    both_ms = measure(flash, *padded, True)
    rows.append(dict(pass_="sdpa-flash", forward_ms=forward_ms, backward_ms=both_ms - forward_ms))
    print(rows[-1], flush=True)
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--seqlens", default="1024,2048,4096,8192")
    parser.add_argument("--tokens", type=int, default=16384, help="tokens per batch (B = tokens // T)")
    parser.add_argument("--sweep", action="store_true", help="time each pass's tile configurations (SWEEP) instead")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench/attention.py needs a CUDA GPU; on this machine the kernel runs only in Triton's interpreter "
              "(see tests/test_attention.py)")
        return None
    print(f"{torch.cuda.get_device_name()} | torch {torch.__version__}")
    if args.sweep:
        return sweep()
    return dict(dense=dense_rows([int(t) for t in args.seqlens.split(",")], args.tokens),
                packed=packed_rows(args.tokens))


if __name__ == "__main__":
    main()
