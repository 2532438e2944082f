"""
Decode attention: one new query per sequence against its own cached prefix, split over the KV length
(flash-decoding), for the sampler.

    out[b, h] = softmax(q[b, h] @ K_b[h // group, :length_b]^T * scale) @ V_b[h // group, :length_b]
    K_b[:, t] = k_cache[block_table[b, t // block_size], :, t % block_size]   (V_b alike)

q (B, n_head, head_dim); k_cache, v_cache (num_blocks, n_kv_head, block_size, head_dim) as model.KVCache holds them
(paged: a sequence's keys live in fixed-size blocks anywhere in the cache); block_table (B, max_blocks) the blocks of
each sequence in order, or (B,) one block each (a cache of one row per sequence is the case block_size = max_len);
lengths (B,) how many cached keys each sequence sees (its position + 1). fp16/bf16/fp32 in, fp32 accumulation, out in
q's dtype. Head dims up to 256 (padded to a power of two).

Why a kernel: at decode time each sequence has one query, and torch's attention wants each row's keys gathered
from its blocks into one tensor (a copy of the whole prefix per layer and step). This kernel reads each sequence's
blocks in place, loads each KV head once for all the query heads of its group, and splits long prefixes over
several programs whose partial softmax states (max, sum, weighted values) are merged afterwards, so that a batch
of a few long sequences still fills the GPU. Tolerance vs the float64 reference: ~1e-5 (fp32), ~2e-3 (fp16/bf16).

`decode_attention` dispatches (kernels.choose_backend): DECODE_ATTENTION_BACKEND=auto (default) takes Triton for CUDA
tensors, the reference otherwise; =triton / =torch, or backend="triton" / "torch", forces one. The kernel before
paging (one row per sequence) was validated on an H200, inside the sampler's CUDA graph too; the block-table lookup
has run in the interpreter and compiled for sm_80/sm_90, not yet on a GPU (bench/gpu_check.py steps 2, 4 and 6).
The same variable picks the model's decode step: this kernel, or model.cached_decode_attention over the prefix.
"""

import torch

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

from kernels import choose_backend


def as_block_table(block_table):
    """(B,) one block per sequence -> (B, 1); (B, max_blocks) as it is."""
    return block_table[:, None] if block_table.dim() == 1 else block_table


def gather_blocks(cache, block_table):
    """A paged cache's keys (or values) of each sequence in position order: cache (num_blocks, n_kv_head,
    block_size, head_dim), block_table (B, max_blocks) -> (B, n_kv_head, max_blocks * block_size, head_dim), a copy."""
    B, max_blocks = block_table.shape
    _, n_kv_head, block_size, head_dim = cache.shape
    blocks = cache.index_select(0, block_table.reshape(-1))  # on a CPU 1.4-1.9x faster than cache[block_table]
    return blocks.view(B, max_blocks, n_kv_head, block_size, head_dim).transpose(1, 2).reshape(
        B, n_kv_head, max_blocks * block_size, head_dim)


def decode_attention_ref(q, k_cache, v_cache, block_table, lengths, scale=None):
    B, n_head, head_dim = q.shape
    group = n_head // k_cache.shape[1]
    block_table = as_block_table(block_table)
    keys = gather_blocks(k_cache, block_table).repeat_interleave(group, dim=1)  # (B, n_head, max_len, head_dim)
    values = gather_blocks(v_cache, block_table).repeat_interleave(group, dim=1)
    compute = torch.promote_types(q.dtype, torch.float32)
    scores = torch.einsum("bhd,bhtd->bht", q.to(compute), keys.to(compute)) * (scale or head_dim ** -0.5)
    visible = torch.arange(keys.shape[2], device=q.device)[None, :] < lengths[:, None]  # (B, max_len)
    scores = scores.masked_fill(~visible[:, None, :], float("-inf"))
    return torch.einsum("bht,bhtd->bhd", torch.softmax(scores, dim=-1), values.to(compute)).to(q.dtype)


if triton is not None:

    @triton.jit
    def _decode_partial_kernel(Q, K, V, BLOCK_TABLE, LENGTHS, PART_MAX, PART_SUM, PART_ACC,
                               stride_qb, stride_qh, stride_kb, stride_kh, stride_kt, stride_vb, stride_vh, stride_vt,
                               stride_table, block_size, n_kv_head, n_splits, split_len, scale_log2,
                               GROUP: tl.constexpr, BLOCK_G: tl.constexpr, HEAD_DIM: tl.constexpr,
                               BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
        # program ids: one KV head of one sequence, one split of its prefix; all GROUP query heads together
        seq_head, split = tl.program_id(0), tl.program_id(1)
        seq, kv_head = seq_head // n_kv_head, seq_head % n_kv_head
        length = tl.load(LENGTHS + seq)
        start = split * split_len
        end = tl.minimum(length, start + split_len)
        offs_g = tl.arange(0, BLOCK_G)
        offs_d = tl.arange(0, BLOCK_D)
        g_ok, d_ok = offs_g < GROUP, offs_d < HEAD_DIM
        heads = kv_head * GROUP + offs_g
        q = tl.load(Q + seq * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
                    mask=g_ok[:, None] & d_ok[None, :], other=0.0)  # (BLOCK_G, BLOCK_D)
        k_base = K + kv_head * stride_kh
        v_base = V + kv_head * stride_vh
        table = BLOCK_TABLE + seq * stride_table
        # main loop: online softmax over this split's keys, base 2
        m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
        acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
        for n_start in range(start, end, BLOCK_N):
            offs_n = n_start + tl.arange(0, BLOCK_N)
            n_ok = offs_n < end
            # each key's block from the table (a tile may straddle blocks), in int64: a large cache passes 2^31
            block = tl.load(table + offs_n // block_size, mask=n_ok, other=0).to(tl.int64)
            in_block = offs_n % block_size
            k = tl.load(k_base + block[:, None] * stride_kb + in_block[:, None] * stride_kt + offs_d[None, :],
                        mask=n_ok[:, None] & d_ok[None, :], other=0.0)  # (BLOCK_N, BLOCK_D)
            scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2
            scores = tl.where(n_ok[None, :], scores, float("-inf"))  # (BLOCK_G, BLOCK_N)
            m_new = tl.maximum(m_i, tl.max(scores, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp2(scores - m_safe[:, None])
            alpha = tl.exp2(m_i - m_safe)
            v = tl.load(v_base + block[:, None] * stride_vb + in_block[:, None] * stride_vt + offs_d[None, :],
                        mask=n_ok[:, None] & d_ok[None, :], other=0.0)
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
    in registers rather than tensor cores: smaller tiles, and for wide heads 8 warps, keep them from spilling."""
    split_len = max(512, triton.cdiv(max_len, 32))
    block_n = 16 if dtype == torch.float32 else 32 if head_dim > 64 else 64
    return dict(BLOCK_N=block_n, BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
                split_len=triton.cdiv(split_len, 64) * 64,
                num_warps=8 if dtype == torch.float32 and head_dim > 64 else 4)


def decode_precision(dtype):
    """Full fp32 products for fp32 inputs (decoding is bound by memory, not by these few products), so that an
    fp32 model decodes what its full forward computes; fp16/bf16 ignore it."""
    return "ieee" if dtype == torch.float32 else "tf32"


def decode_attention_triton(q, k_cache, v_cache, block_table, lengths, scale=None):
    """block_table and lengths: int32 or int64 (the model passes its int64 positions; no conversion kernels)."""
    B, n_head, head_dim = q.shape
    block_table = as_block_table(block_table)
    if block_table.stride(1) != 1:
        raise ValueError("decode_attention wants a block table with a unit last stride")
    if q.stride(-1) != 1 or k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("decode_attention wants q and the key and value caches with a unit last stride")
    n_kv_head, block_size = k_cache.shape[1], k_cache.shape[2]
    max_len = block_table.shape[1] * block_size
    group = n_head // n_kv_head
    config = decode_config(head_dim, max_len, q.dtype)
    split_len = config.pop("split_len")
    n_splits = triton.cdiv(max_len, split_len)
    part_max = torch.empty((B, n_head, n_splits), device=q.device, dtype=torch.float32)
    part_sum = torch.empty_like(part_max)
    part_acc = torch.empty((B, n_head, n_splits, head_dim), device=q.device, dtype=torch.float32)
    _decode_partial_kernel[(B * n_kv_head, n_splits)](
        q, k_cache, v_cache, block_table, lengths, part_max, part_sum, part_acc, q.stride(0), q.stride(1),
        *k_cache.stride()[:3], *v_cache.stride()[:3], block_table.stride(0), block_size, n_kv_head, n_splits, split_len,
        (scale or head_dim ** -0.5) * 1.4426950408889634, GROUP=group,
        BLOCK_G=max(16, triton.next_power_of_2(group)), HEAD_DIM=head_dim, PRECISION=decode_precision(q.dtype),
        **config)  # tl.dot needs 16 rows
    out = torch.empty((B, n_head, head_dim), device=q.device, dtype=q.dtype)
    _decode_merge_kernel[(B * n_head,)](part_max, part_sum, part_acc, out, out.stride(0), out.stride(1), n_head,
                                        n_splits, HEAD_DIM=head_dim, BLOCK_D=config["BLOCK_D"],
                                        BLOCK_S=max(2, triton.next_power_of_2(n_splits)))
    return out


def decode_attention(q, k_cache, v_cache, block_table, lengths, scale=None, backend=None):
    """Public entry. backend: "auto", "triton" or "torch"; the default is DECODE_ATTENTION_BACKEND, else auto
    (Triton for CUDA tensors, the reference for CPU ones)."""
    if choose_backend("DECODE_ATTENTION_BACKEND", q, backend) == "triton":
        return decode_attention_triton(q, k_cache, v_cache, block_table, lengths, scale)
    return decode_attention_ref(q, k_cache, v_cache, block_table, lengths, scale)
