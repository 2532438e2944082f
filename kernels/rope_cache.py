"""
Rope and the KV-cache write of one decode step, in one kernel, for the sampler.

    q_out[b, h]                          = rope(q[b, h], position_b)
    k_cache[block_b, h, offset_b]        = rope(k[b, h], position_b)
    v_cache[block_b, h, offset_b]        = v[b, h]
    block_b = block_table[b, position_b // block_size],  offset_b = position_b % block_size

    rope(x) = x * cos + roll(x, head_dim / 2) * signed_sin,  signed_sin = (-sin, sin)  (model.apply_rope's form)

q (B, n_head, head_dim), k and v (B, n_kv_head, head_dim), views with a unit last stride; cos and signed_sin
(B, head_dim), the rows of model.rope_cos_sin; k_cache, v_cache (num_blocks, n_kv_head, block_size, head_dim) as
model.KVCache holds them (paged); block_table (B, max_blocks) each sequence's blocks in order, or (B,) one block each;
positions (B,) int64. Products in fp32, stored in the tensors' dtypes.

Why a kernel: when decoding one token per sequence, a step is a few hundred tiny kernels, and each costs a few
microseconds however little it does. In torch, rope of q and k and the two cache writes are eight of them per
layer; here they are one launch that reads q, k, v once and writes each result once.

`rope_and_cache` dispatches (kernels.choose_backend): ROPE_CACHE_BACKEND=auto (default) takes Triton for CUDA tensors,
the reference otherwise; =triton / =torch, or backend="triton" / "torch", forces one. The same variable picks the
model's decode step: this kernel, or model.apply_rope and indexed writes to the cache.
"""

import torch

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

from kernels import choose_backend
from kernels.decode_attention import as_block_table


def rope_and_cache_ref(q, k, v, cos, signed_sin, k_cache, v_cache, block_table, positions):
    def rope(x):  # (B, heads, head_dim)
        return x * cos[:, None] + x.roll(x.shape[-1] // 2, dims=-1) * signed_sin[:, None]

    block_size = k_cache.shape[2]
    blocks = as_block_table(block_table).gather(1, (positions // block_size)[:, None])[:, 0]
    k_cache[blocks, :, positions % block_size] = rope(k).to(k_cache.dtype)
    v_cache[blocks, :, positions % block_size] = v.to(v_cache.dtype)
    return rope(q)


if triton is not None:

    @triton.jit
    def _rope_cache_kernel(Q, K, V, COS, SIN, K_CACHE, V_CACHE, BLOCK_TABLE, POSITIONS, Q_OUT,
                           stride_qb, stride_qh, stride_kb, stride_kh, stride_vb, stride_vh, stride_cb,
                           stride_cblock, stride_ch, stride_ct, stride_table, block_size, stride_ob, stride_oh, n_head,
                           HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
        # program ids: one sequence, one head; heads [0, n_head) rotate a query head, the rest write a KV head
        seq, head = tl.program_id(0), tl.program_id(1)
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < HEAD_DIM
        partner = (offs_d + HEAD_DIM // 2) % HEAD_DIM  # roll by half a head: element d meets d +- head_dim/2
        cos = tl.load(COS + seq * stride_cb + offs_d, mask=d_ok, other=0.0).to(tl.float32)
        sin = tl.load(SIN + seq * stride_cb + offs_d, mask=d_ok, other=0.0).to(tl.float32)
        if head < n_head:
            row = Q + seq * stride_qb + head * stride_qh
            x = tl.load(row + offs_d, mask=d_ok, other=0.0).to(tl.float32)
            rolled = tl.load(row + partner, mask=d_ok, other=0.0).to(tl.float32)
            out = Q_OUT + seq * stride_ob + head * stride_oh + offs_d
            tl.store(out, (x * cos + rolled * sin).to(Q_OUT.dtype.element_ty), mask=d_ok)
        else:
            kv_head = head - n_head
            position = tl.load(POSITIONS + seq)
            block = tl.load(BLOCK_TABLE + seq * stride_table + position // block_size).to(tl.int64)
            cache_offset = block * stride_cblock + kv_head * stride_ch + (position % block_size) * stride_ct + offs_d
            row = K + seq * stride_kb + kv_head * stride_kh
            x = tl.load(row + offs_d, mask=d_ok, other=0.0).to(tl.float32)
            rolled = tl.load(row + partner, mask=d_ok, other=0.0).to(tl.float32)
            tl.store(K_CACHE + cache_offset, (x * cos + rolled * sin).to(K_CACHE.dtype.element_ty), mask=d_ok)
            value = tl.load(V + seq * stride_vb + kv_head * stride_vh + offs_d, mask=d_ok, other=0.0)
            tl.store(V_CACHE + cache_offset, value.to(V_CACHE.dtype.element_ty), mask=d_ok)


def rope_and_cache_triton(q, k, v, cos, signed_sin, k_cache, v_cache, block_table, positions):
    B, n_head, head_dim = q.shape
    block_table = as_block_table(block_table)
    n_kv_head = k.shape[1]
    if not (q.stride(2) == k.stride(2) == v.stride(2) == cos.stride(1) == signed_sin.stride(1) == 1
            == block_table.stride(1)) or cos.stride(0) != signed_sin.stride(0) or k_cache.stride() != v_cache.stride():
        raise ValueError("rope_and_cache wants unit last strides (the block table's too), cos and sin laid out alike, "
                         "k and v caches alike")
    q_out = torch.empty_like(q, memory_format=torch.contiguous_format)
    _rope_cache_kernel[(B, n_head + n_kv_head)](
        q, k, v, cos, signed_sin, k_cache, v_cache, block_table, positions, q_out, q.stride(0), q.stride(1),
        k.stride(0), k.stride(1), v.stride(0), v.stride(1), cos.stride(0), *k_cache.stride()[:3],
        block_table.stride(0), k_cache.shape[2], q_out.stride(0), q_out.stride(1), n_head, HEAD_DIM=head_dim,
        BLOCK_D=triton.next_power_of_2(head_dim), num_warps=1)
    return q_out


def rope_and_cache(q, k, v, cos, signed_sin, k_cache, v_cache, block_table, positions, backend=None):
    """Public entry. backend: "auto", "triton" or "torch"; the default is ROPE_CACHE_BACKEND, else auto (Triton
    for CUDA tensors, the reference for CPU ones)."""
    if choose_backend("ROPE_CACHE_BACKEND", q, backend) == "triton":
        return rope_and_cache_triton(q, k, v, cos, signed_sin, k_cache, v_cache, block_table, positions)
    return rope_and_cache_ref(q, k, v, cos, signed_sin, k_cache, v_cache, block_table, positions)
