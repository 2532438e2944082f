"""
Decode attention: one new query per sequence against its own cached prefix, split over the KV length
(flash-decoding), for the sampler.

    out[b, h] = softmax(q[b, h] @ K[slot_b, h // group, :length_b]^T * scale) @ V[slot_b, h // group, :length_b]

q (B, n_head, head_dim); k_cache, v_cache (slots, n_kv_head, max_len, head_dim) as sampler.KVCache holds them;
slots (B,) the cache row of each sequence; lengths (B,) how many cached keys each sequence sees (its position + 1).
fp16/bf16/fp32 in, fp32 accumulation, out in q's dtype. Head dims up to 256 (padded to a power of two).

Why a kernel: at decode time each sequence has one query, so a dense (B, H, 1, max_len) attention reads every
slot's whole cache, and torch's attention wants the keys gathered per row. This kernel reads each sequence's own
prefix in place, loads each KV head once for all the query heads of its group, and splits long prefixes over
several programs whose partial softmax states (max, sum, weighted values) are merged afterwards, so that a batch
of a few long sequences still fills the GPU. Tolerance vs the float64 reference: ~1e-5 (fp32), ~2e-3 (fp16/bf16).

`decode_attention` dispatches (kernels.choose_backend): DECODE_ATTENTION_BACKEND=auto (default) takes Triton for CUDA
tensors (validated on an H200, inside the sampler's CUDA graph too), the reference otherwise; =triton / =torch, or
backend="triton" / "torch", forces one. The same variable picks the model's decode step: this kernel, or
grouped_decode_attention over views of the cache.
"""

import torch

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

from kernels import choose_backend


def decode_attention_ref(q, k_cache, v_cache, slots, lengths, scale=None):
    B, n_head, head_dim = q.shape
    group = n_head // k_cache.shape[1]
    keys = k_cache[slots].repeat_interleave(group, dim=1)  # (B, n_head, max_len, head_dim)
    values = v_cache[slots].repeat_interleave(group, dim=1)
    compute = torch.promote_types(q.dtype, torch.float32)
    scores = torch.einsum("bhd,bhtd->bht", q.to(compute), keys.to(compute)) * (scale or head_dim ** -0.5)
    visible = torch.arange(k_cache.shape[2], device=q.device)[None, :] < lengths[:, None]  # (B, max_len)
    scores = scores.masked_fill(~visible[:, None, :], float("-inf"))
    return torch.einsum("bht,bhtd->bhd", torch.softmax(scores, dim=-1), values.to(compute)).to(q.dtype)


def grouped_decode_attention(q, keys, values, masked_keys, scale=None):
    """The torch path the model decodes through without the kernel: q (B, n_head, head_dim) against keys and
    values (B, n_kv_head, L, head_dim) (views of the cache), masked_keys (B, L) True for keys a row must not see. A
    group's query heads meet their shared KV head through a reshape, not a copy of the cache; the softmax is float32."""
    B, n_head, head_dim = q.shape
    n_kv_head = keys.shape[1]
    grouped_q = q.view(B, n_kv_head, n_head // n_kv_head, head_dim) * (scale or head_dim ** -0.5)
    scores = torch.matmul(grouped_q, keys.transpose(-1, -2)).float()  # (B, n_kv_head, group, L)
    probs = scores.masked_fill(masked_keys[:, None, None, :], float("-inf")).softmax(-1).to(values.dtype)
    return torch.matmul(probs, values).view(B, n_head, head_dim)


if triton is not None:

    @triton.jit
    def _decode_partial_kernel(Q, K, V, SLOTS, LENGTHS, PART_MAX, PART_SUM, PART_ACC,
                               stride_qb, stride_qh, stride_ks, stride_kh, stride_kt, stride_vs, stride_vh, stride_vt,
                               n_kv_head, n_splits, split_len, scale_log2,
                               GROUP: tl.constexpr, BLOCK_G: tl.constexpr, HEAD_DIM: tl.constexpr,
                               BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
        # program ids: one KV head of one sequence, one split of its prefix; all GROUP query heads together
        seq_head, split = tl.program_id(0), tl.program_id(1)
        seq, kv_head = seq_head // n_kv_head, seq_head % n_kv_head
        slot = tl.load(SLOTS + seq)
        length = tl.load(LENGTHS + seq)
        start = split * split_len
        end = tl.minimum(length, start + split_len)
        offs_g = tl.arange(0, BLOCK_G)
        offs_d = tl.arange(0, BLOCK_D)
        g_ok, d_ok = offs_g < GROUP, offs_d < HEAD_DIM
        heads = kv_head * GROUP + offs_g
        q = tl.load(Q + seq * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
                    mask=g_ok[:, None] & d_ok[None, :], other=0.0)  # (BLOCK_G, BLOCK_D)
        k_base = K + slot * stride_ks + kv_head * stride_kh
        v_base = V + slot * stride_vs + kv_head * stride_vh
        # main loop: online softmax over this split's keys, base 2
        m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
        acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
        for n_start in range(start, end, BLOCK_N):
            offs_n = n_start + tl.arange(0, BLOCK_N)
            n_ok = offs_n < end
            k = tl.load(k_base + offs_n[:, None] * stride_kt + offs_d[None, :], mask=n_ok[:, None] & d_ok[None, :],
                        other=0.0)  # (BLOCK_N, BLOCK_D)
            scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2
            scores = tl.where(n_ok[None, :], scores, float("-inf"))  # (BLOCK_G, BLOCK_N)
            m_new = tl.maximum(m_i, tl.max(scores, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp2(scores - m_safe[:, None])
            alpha = tl.exp2(m_i - m_safe)
            v = tl.load(v_base + offs_n[:, None] * stride_vt + offs_d[None, :], mask=n_ok[:, None] & d_ok[None, :],
                        other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            l_i = l_i * alpha + tl.sum(p, 1)
            m_i = m_new
        # epilogue: this split's partial state; an empty split leaves max = -inf and sum = 0
        part = (seq * n_kv_head * GROUP + heads) * n_splits + split
        tl.store(PART_MAX + part, m_i, mask=g_ok)
        tl.store(PART_SUM + part, l_i, mask=g_ok)
        tl.store(PART_ACC + part[:, None] * HEAD_DIM + offs_d[None, :], acc, mask=g_ok[:, None] & d_ok[None, :])


    @triton.jit
    def _decode_merge_kernel(PART_MAX, PART_SUM, PART_ACC, OUT, stride_ob, stride_oh, n_head, n_splits,
                             HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr):
        # one (sequence, query head) per program: rescale each split's state to the common maximum and sum
        row = tl.program_id(0)
        seq, head = row // n_head, row % n_head
        offs_s = tl.arange(0, BLOCK_S)
        offs_d = tl.arange(0, BLOCK_D)
        s_ok, d_ok = offs_s < n_splits, offs_d < HEAD_DIM
        part_max = tl.load(PART_MAX + row * n_splits + offs_s, mask=s_ok, other=float("-inf"))
        part_sum = tl.load(PART_SUM + row * n_splits + offs_s, mask=s_ok, other=0.0)
        part_acc = tl.load(PART_ACC + (row * n_splits + offs_s)[:, None] * HEAD_DIM + offs_d[None, :],
                           mask=s_ok[:, None] & d_ok[None, :], other=0.0)  # (BLOCK_S, BLOCK_D)
        weight = tl.exp2(part_max - tl.max(part_max, 0))  # 0 for empty splits; split 0 is never empty
        out = tl.sum(part_acc * weight[:, None], 0) / tl.sum(part_sum * weight, 0)
        tl.store(OUT + seq * stride_ob + head * stride_oh + offs_d, out.to(OUT.dtype.element_ty), mask=d_ok)


def decode_config(head_dim, max_len, dtype=torch.bfloat16):
    """Keys per tile and per split: splits of 512 keys, at most 32 of them. fp32's full-precision products live
    in registers rather than tensor cores: smaller tiles keep them from spilling."""
    split_len = max(512, triton.cdiv(max_len, 32))
    block_n = 16 if dtype == torch.float32 else 32 if head_dim > 64 else 64
    return dict(BLOCK_N=block_n, BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
                split_len=triton.cdiv(split_len, 64) * 64, num_warps=4)


def decode_precision(dtype):
    """Full fp32 products for fp32 inputs (decoding is bound by memory, not by these few products), so that an
    fp32 model decodes what its full forward computes; fp16/bf16 ignore it."""
    return "ieee" if dtype == torch.float32 else "tf32"


def decode_attention_triton(q, k_cache, v_cache, slots, lengths, scale=None):
    """slots and lengths: int32 or int64 (the model passes its int64 positions; no conversion kernels)."""
    B, n_head, head_dim = q.shape
    n_kv_head, max_len = k_cache.shape[1], k_cache.shape[2]
    group = n_head // n_kv_head
    config = decode_config(head_dim, max_len, q.dtype)
    split_len = config.pop("split_len")
    n_splits = triton.cdiv(max_len, split_len)
    part_max = torch.empty((B, n_head, n_splits), device=q.device, dtype=torch.float32)
    part_sum = torch.empty_like(part_max)
    part_acc = torch.empty((B, n_head, n_splits, head_dim), device=q.device, dtype=torch.float32)
    _decode_partial_kernel[(B * n_kv_head, n_splits)](
        q, k_cache, v_cache, slots, lengths, part_max, part_sum, part_acc, q.stride(0), q.stride(1),
        *k_cache.stride()[:3], *v_cache.stride()[:3], n_kv_head, n_splits, split_len,
        (scale or head_dim ** -0.5) * 1.4426950408889634, GROUP=group,
        BLOCK_G=max(16, triton.next_power_of_2(group)), HEAD_DIM=head_dim, PRECISION=decode_precision(q.dtype),
        **config)  # tl.dot needs 16 rows
    out = torch.empty((B, n_head, head_dim), device=q.device, dtype=q.dtype)
    _decode_merge_kernel[(B * n_head,)](part_max, part_sum, part_acc, out, out.stride(0), out.stride(1), n_head,
                                        n_splits, HEAD_DIM=head_dim, BLOCK_D=config["BLOCK_D"],
                                        BLOCK_S=max(2, triton.next_power_of_2(n_splits)))
    return out


def decode_attention(q, k_cache, v_cache, slots, lengths, scale=None, backend=None):
    """Public entry. backend: "auto", "triton" or "torch"; the default is DECODE_ATTENTION_BACKEND, else auto
    (Triton for CUDA tensors, the reference for CPU ones)."""
    if choose_backend("DECODE_ATTENTION_BACKEND", q, backend) == "triton":
        return decode_attention_triton(q, k_cache, v_cache, slots, lengths, scale)
    return decode_attention_ref(q, k_cache, v_cache, slots, lengths, scale)
