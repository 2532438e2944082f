"""
Causal self-attention with grouped-query heads and packed variable-length sequences: a Triton flash-attention
kernel (forward and backward) and its PyTorch reference.

    out = softmax(q @ k^T * scale + mask) @ v,      lse = logsumexp(q @ k^T * scale + mask) per query row

Shapes: q (B, n_head, T, head_dim); k, v (B, n_kv_head, T, head_dim) with n_head a multiple of n_kv_head: each
group of n_head / n_kv_head query heads reads one key/value head, without copying K/V. Masks:
  causal=True               query i sees keys j <= i
  cu_seqlens (n_docs + 1,)  int32 prefix sums of document lengths packed in one row (B == 1): no query sees a key of
                            another document, so several traces share a row with no padding (flash-attn's varlen API)
  attn_mask (B, 1, T, S)    boolean, True = visible (the sampler's cache; reference path only)
Dtypes: fp16, bf16, fp32 in; fp32 accumulation; out in the input dtype, lse in fp32. Head dims up to 128 (64 and 128
at full speed; others are padded to the next power of two inside the kernel).

Why a kernel: a (T x T) score matrix per head does not fit for 8k-16k token traces (8k x 8k x 12 heads x 4 bytes =
3 GB per layer), and padding ragged traces wastes most of the compute. The kernel keeps one (BLOCK_M x BLOCK_N) tile
of scores in registers, with an online softmax, and walks only the documents' own causal blocks.
Tolerance against attention_ref in float64: ~1e-5 with fp32 in, in Triton's interpreter; ~5e-3 on a GPU, whose
products of fp32 inputs are TF32; ~2e-3 with fp16/bf16 in.

`attention` dispatches (kernels.choose_backend): ATTENTION_BACKEND=auto (default) takes Triton for CUDA tensors the
kernel fits (causal, no explicit mask, head_dim <= 128), the reference otherwise; =triton / =torch, or the argument
backend="triton" / "torch", forces one.
"""

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # the reference path needs no Triton
    triton = None

from kernels import choose_backend

# -----------------------------------------------------------------------------
# reference: the specification and the CPU path


def document_causal_mask(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """(total, total) boolean mask: same document and not in the future."""
    positions = torch.arange(total, device=cu_seqlens.device)
    document = torch.searchsorted(cu_seqlens[1:].to(torch.int64), positions, right=True)  # (total,)
    same_document = document[:, None] == document[None, :]
    return same_document & (positions[None, :] <= positions[:, None])


def attention_ref(q, k, v, causal=True, cu_seqlens=None, attn_mask=None, scale=None, return_lse=False):
    B, n_head, T, head_dim = q.shape
    if cu_seqlens is not None:
        if B != 1:
            raise ValueError(f"packed sequences (cu_seqlens) need batch size 1, got {B}")
        if int(cu_seqlens[-1]) != T:
            raise ValueError(f"cu_seqlens ends at {int(cu_seqlens[-1])} but the row holds {T} tokens")
        if not return_lse:  # one causal attention per document: no (total x total) mask to fill and multiply
            bounds = cu_seqlens.tolist()
            return torch.cat([attention_ref(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], causal, scale=scale)
                              for a, b in zip(bounds[:-1], bounds[1:]) if b > a], dim=2)
        attn_mask = document_causal_mask(cu_seqlens, T)[None, None]
        causal = False
    if return_lse:  # the explicit formula (tests and the backward's definition)
        group = n_head // k.shape[1]
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        compute = torch.promote_types(q.dtype, torch.float32)  # at least fp32; float64 stays float64
        scores = (q.to(compute) @ k.to(compute).transpose(-1, -2)) * (scale or head_dim ** -0.5)  # (B, H, T, S)
        if causal:
            attn_mask = torch.ones(T, k.shape[2], dtype=torch.bool, device=q.device).tril()
        if attn_mask is not None:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        lse = scores.logsumexp(-1)
        return (torch.softmax(scores, -1) @ v.to(compute)).to(q.dtype), lse
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=attn_mask, is_causal=causal and attn_mask is None, scale=scale,
        enable_gqa=k.shape[1] != n_head,
    )


# -----------------------------------------------------------------------------
# Triton kernels

if triton is not None:

    @triton.jit
    def _sequence(seq, cu_seqlens, seqlen, VARLEN: tl.constexpr):
        """(batch row, first token, length) of sequence `seq`: a document of the packed row, or a batch row."""
        if VARLEN:
            start = tl.load(cu_seqlens + seq)
            return 0, start, tl.load(cu_seqlens + seq + 1) - start
        return seq, 0, seqlen

    @triton.jit
    def _attention_forward_kernel(
        Q, K, V, O, LSE, cu_seqlens,
        stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt, stride_vb, stride_vh, stride_vt,
        stride_ob, stride_oh, stride_ot, stride_lb, stride_lh,
        seqlen, n_head, group, scale_log2,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        CAUSAL: tl.constexpr, VARLEN: tl.constexpr, PRECISION: tl.constexpr,
    ):
        # program ids: one block of BLOCK_M queries of one head of one sequence
        m_block, seq_head = tl.program_id(0), tl.program_id(1)
        seq, head = seq_head // n_head, seq_head % n_head
        batch, start, length = _sequence(seq, cu_seqlens, seqlen, VARLEN)
        if m_block * BLOCK_M >= length:
            return
        kv_head = head // group
        offs_m = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < HEAD_DIM

        # pointers: this sequence's rows of q, k, v (the last dimension is contiguous)
        q = tl.load(Q + batch * stride_qb + head * stride_qh + (start + offs_m)[:, None] * stride_qt + offs_d[None, :],
                    mask=(offs_m[:, None] < length) & d_ok[None, :], other=0.0)  # (BLOCK_M, BLOCK_D)
        k_base = K + batch * stride_kb + kv_head * stride_kh + start * stride_kt
        v_base = V + batch * stride_vb + kv_head * stride_vh + start * stride_vt

        # main loop: online softmax over key blocks, in base 2 (exp2 is the fast instruction)
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        end = length
        if CAUSAL:
            end = tl.minimum(length, (m_block + 1) * BLOCK_M)
        for n_start in range(0, end, BLOCK_N):
            offs_k = n_start + offs_n
            k = tl.load(k_base + offs_k[None, :] * stride_kt + offs_d[:, None],
                        mask=(offs_k[None, :] < length) & d_ok[:, None], other=0.0)  # (BLOCK_D, BLOCK_N)
            scores = tl.dot(q, k, input_precision=PRECISION) * scale_log2  # (BLOCK_M, BLOCK_N)
            visible = (offs_k[None, :] < length) & (offs_m[:, None] < length)
            if CAUSAL:
                visible = visible & (offs_k[None, :] <= offs_m[:, None])
            scores = tl.where(visible, scores, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(scores, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing visible yet
            p = tl.exp2(scores - m_safe[:, None])
            alpha = tl.exp2(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(v_base + offs_k[:, None] * stride_vt + offs_d[None, :],
                        mask=(offs_k[:, None] < length) & d_ok[None, :], other=0.0)  # (BLOCK_N, BLOCK_D)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            m_i = m_new

        # epilogue: normalise, write the output and the log-sum-exp (natural log)
        l_safe = tl.where(l_i == 0.0, 1.0, l_i)
        out = acc / l_safe[:, None]
        row_ok = offs_m < length
        tl.store(O + batch * stride_ob + head * stride_oh + (start + offs_m)[:, None] * stride_ot + offs_d[None, :],
                 out.to(O.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
        lse = (m_i + tl.log2(l_safe)) * 0.6931471805599453
        tl.store(LSE + batch * stride_lb + head * stride_lh + start + offs_m, lse, mask=row_ok)

    @triton.jit
    def _attention_backward_preprocess(O, DO, DELTA, stride_ob, stride_oh, stride_ot, stride_db, stride_dh,
                                       stride_dt, n_head, T, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                                       BLOCK_M: tl.constexpr):
        """delta = rowsum(dO * O): the softmax backward's correction term, one value per query row."""
        m_block, batch_head = tl.program_id(0), tl.program_id(1)
        batch, head = batch_head // n_head, batch_head % n_head
        offs_m = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        mask = (offs_m[:, None] < T) & (offs_d[None, :] < HEAD_DIM)
        o = tl.load(O + batch * stride_ob + head * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :],
                    mask=mask, other=0.0).to(tl.float32)
        do = tl.load(DO + batch * stride_db + head * stride_dh + offs_m[:, None] * stride_dt + offs_d[None, :],
                     mask=mask, other=0.0).to(tl.float32)
        tl.store(DELTA + batch_head * T + offs_m, tl.sum(o * do, 1), mask=offs_m < T)

    @triton.jit
    def _attention_backward_dkdv_kernel(
        Q, K, V, DO, LSE, DELTA, DK, DV, cu_seqlens,
        stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt, stride_vb, stride_vh, stride_vt,
        stride_db, stride_dh, stride_dt, stride_lb, stride_lh, stride_kgb, stride_kgh, stride_kgt,
        seqlen, n_kv_head, group, scale, scale_log2,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        CAUSAL: tl.constexpr, VARLEN: tl.constexpr, PRECISION: tl.constexpr,
    ):
        """dK, dV for one block of keys of one KV head, summed over the query heads that share it (no atomics):
        dV = sum P^T dO;  dS = P * (dO V^T - delta);  dK = scale * sum dS^T Q."""
        n_block, seq_head = tl.program_id(0), tl.program_id(1)
        seq, kv_head = seq_head // n_kv_head, seq_head % n_kv_head
        batch, start, length = _sequence(seq, cu_seqlens, seqlen, VARLEN)
        if n_block * BLOCK_N >= length:
            return
        offs_n = n_block * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_m0 = tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < HEAD_DIM
        n_ok = offs_n < length
        k = tl.load(K + batch * stride_kb + kv_head * stride_kh + (start + offs_n)[:, None] * stride_kt
                    + offs_d[None, :], mask=n_ok[:, None] & d_ok[None, :], other=0.0)  # (BLOCK_N, BLOCK_D)
        v = tl.load(V + batch * stride_vb + kv_head * stride_vh + (start + offs_n)[:, None] * stride_vt
                    + offs_d[None, :], mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        first_m = 0
        if CAUSAL:  # earlier queries cannot see these keys
            first_m = (n_block * BLOCK_N // BLOCK_M) * BLOCK_M
        for g in range(group):
            head = kv_head * group + g
            q_base = Q + batch * stride_qb + head * stride_qh + start * stride_qt
            do_base = DO + batch * stride_db + head * stride_dh + start * stride_dt
            row_base = batch * stride_lb + head * stride_lh + start
            for m_start in range(first_m, length, BLOCK_M):
                offs_m = m_start + offs_m0
                m_ok = offs_m < length
                q = tl.load(q_base + offs_m[:, None] * stride_qt + offs_d[None, :], mask=m_ok[:, None] & d_ok[None, :],
                            other=0.0)  # (BLOCK_M, BLOCK_D)
                do = tl.load(do_base + offs_m[:, None] * stride_dt + offs_d[None, :],
                             mask=m_ok[:, None] & d_ok[None, :], other=0.0)
                lse = tl.load(LSE + row_base + offs_m, mask=m_ok, other=0.0) * 1.4426950408889634
                delta = tl.load(DELTA + row_base + offs_m, mask=m_ok, other=0.0)
                scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2  # (BLOCK_M, BLOCK_N)
                visible = m_ok[:, None] & n_ok[None, :]
                if CAUSAL:
                    visible = visible & (offs_n[None, :] <= offs_m[:, None])
                p = tl.where(visible, tl.exp2(scores - lse[:, None]), 0.0)
                dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PRECISION)
                dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)  # (BLOCK_M, BLOCK_N)
                ds = p * (dp - delta[:, None])
                dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PRECISION)
        out = (start + offs_n)[:, None] * stride_kgt + offs_d[None, :]
        mask = n_ok[:, None] & d_ok[None, :]
        tl.store(DK + batch * stride_kgb + kv_head * stride_kgh + out, (dk * scale).to(DK.dtype.element_ty), mask=mask)
        tl.store(DV + batch * stride_kgb + kv_head * stride_kgh + out, dv.to(DV.dtype.element_ty), mask=mask)

    @triton.jit
    def _attention_backward_dq_kernel(
        Q, K, V, DO, LSE, DELTA, DQ, cu_seqlens,
        stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt, stride_vb, stride_vh, stride_vt,
        stride_db, stride_dh, stride_dt, stride_lb, stride_lh, stride_qgb, stride_qgh, stride_qgt,
        seqlen, n_head, group, scale, scale_log2,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        CAUSAL: tl.constexpr, VARLEN: tl.constexpr, PRECISION: tl.constexpr,
    ):
        """dQ for one block of queries of one head: dQ = scale * sum dS K."""
        m_block, seq_head = tl.program_id(0), tl.program_id(1)
        seq, head = seq_head // n_head, seq_head % n_head
        batch, start, length = _sequence(seq, cu_seqlens, seqlen, VARLEN)
        if m_block * BLOCK_M >= length:
            return
        kv_head = head // group
        offs_m = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n0 = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < HEAD_DIM
        m_ok = offs_m < length
        rows = (start + offs_m)[:, None]
        q = tl.load(Q + batch * stride_qb + head * stride_qh + rows * stride_qt + offs_d[None, :],
                    mask=m_ok[:, None] & d_ok[None, :], other=0.0)
        do = tl.load(DO + batch * stride_db + head * stride_dh + rows * stride_dt + offs_d[None, :],
                     mask=m_ok[:, None] & d_ok[None, :], other=0.0)
        row_base = batch * stride_lb + head * stride_lh + start
        lse = tl.load(LSE + row_base + offs_m, mask=m_ok, other=0.0) * 1.4426950408889634
        delta = tl.load(DELTA + row_base + offs_m, mask=m_ok, other=0.0)
        k_base = K + batch * stride_kb + kv_head * stride_kh + start * stride_kt
        v_base = V + batch * stride_vb + kv_head * stride_vh + start * stride_vt
        dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        end = length
        if CAUSAL:
            end = tl.minimum(length, (m_block + 1) * BLOCK_M)
        for n_start in range(0, end, BLOCK_N):
            offs_n = n_start + offs_n0
            n_ok = offs_n < length
            k = tl.load(k_base + offs_n[:, None] * stride_kt + offs_d[None, :], mask=n_ok[:, None] & d_ok[None, :],
                        other=0.0)  # (BLOCK_N, BLOCK_D)
            v = tl.load(v_base + offs_n[:, None] * stride_vt + offs_d[None, :], mask=n_ok[:, None] & d_ok[None, :],
                        other=0.0)
            scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2
            visible = m_ok[:, None] & n_ok[None, :]
            if CAUSAL:
                visible = visible & (offs_n[None, :] <= offs_m[:, None])
            p = tl.where(visible, tl.exp2(scores - lse[:, None]), 0.0)
            dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
            ds = p * (dp - delta[:, None])
            dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
        tl.store(DQ + batch * stride_qgb + head * stride_qgh + rows * stride_qgt + offs_d[None, :],
                 (dq * scale).to(DQ.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])


# -----------------------------------------------------------------------------
# launchers, autograd, dispatcher


def kernel_config(head_dim, dtype, pass_name, arch=90):
    """Tile sizes (queries x keys), warps and pipeline stages per pass and GPU generation (arch 80: A100, 90: H100):
    the largest tiles that compile without register spills and within shared memory for our head dims (checked by
    tests/test_attention.py::test_compiles_for_sm80_and_sm90_without_spills)."""
    block_d = max(16, triton.next_power_of_2(head_dim))
    wide, fp32 = block_d > 64, dtype == torch.float32
    block_m, block_n = {"forward": ((32 if wide else 64), 32) if fp32 else (64, 64) if wide and arch < 90 else (128, 64),
                        "dkdv": (32, 32) if fp32 or arch < 90 else (32, 64),  # dK, dV accumulators: BLOCK_N rows
                        "dq": (32, 32) if fp32 else (64, 32)}[pass_name]
    warps = 4 if fp32 else 8 if wide or arch < 90 and pass_name == "forward" else 4
    # software pipelining holds the next tiles in registers too: the dK/dV pass affords fewer stages
    stages = (1 if wide else 2) if fp32 else 2 if pass_name == "dkdv" and arch < 90 else 3
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, num_warps=warps, num_stages=stages)


def _layout(q, k, cu_seqlens):
    """(number of sequences, their length or max, varlen flag, group size)."""
    B, n_head, T, _ = q.shape
    if cu_seqlens is not None:
        lengths = cu_seqlens[1:] - cu_seqlens[:-1]
        return len(lengths), int(lengths.max()), True, n_head // k.shape[1]
    return B, T, False, n_head // k.shape[1]


def _arch(tensor):
    return 10 * torch.cuda.get_device_capability(tensor.device)[0] if tensor.is_cuda else 90


def _precision(dtype):
    """fp32 inputs use TF32 tensor-core products on the GPU (as torch does with allow_tf32); fp16/bf16 ignore it.
    Triton's interpreter computes them in full fp32."""
    return "tf32"


def attention_forward(q, k, v, causal=True, cu_seqlens=None, scale=None):
    """Launches the forward kernel: returns out (q's shape, laid out (B, T, H, D) so the model's reshape is free)
    and lse (B, H, T) float32."""
    B, n_head, T, head_dim = q.shape
    num_seqs, max_len, varlen, group = _layout(q, k, cu_seqlens)
    scale = scale or head_dim ** -0.5
    out = torch.empty((B, T, n_head, head_dim), device=q.device, dtype=q.dtype).transpose(1, 2)
    lse = torch.empty((B, n_head, T), device=q.device, dtype=torch.float32)
    config = kernel_config(head_dim, q.dtype, "forward", _arch(q))
    grid = (triton.cdiv(max_len, config["BLOCK_M"]), num_seqs * n_head)
    _attention_forward_kernel[grid](
        q, k, v, out, lse, cu_seqlens if varlen else q,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3], *lse.stride()[:2],
        T, n_head, group, scale * 1.4426950408889634,
        HEAD_DIM=head_dim, CAUSAL=causal, VARLEN=varlen, PRECISION=_precision(q.dtype), **config)
    return out, lse


def attention_backward(do, q, k, v, out, lse, causal=True, cu_seqlens=None, scale=None):
    B, n_head, T, head_dim = q.shape
    n_kv_head = k.shape[1]
    num_seqs, max_len, varlen, group = _layout(q, k, cu_seqlens)
    scale = scale or head_dim ** -0.5
    do = do if do.stride(-1) == 1 else do.contiguous()
    delta = torch.empty((B, n_head, T), device=q.device, dtype=torch.float32)
    block_d = max(16, triton.next_power_of_2(head_dim))
    _attention_backward_preprocess[(triton.cdiv(T, 64), B * n_head)](
        out, do, delta, *out.stride()[:3], *do.stride()[:3], n_head, T, HEAD_DIM=head_dim, BLOCK_D=block_d,
        BLOCK_M=64)
    dq = torch.empty((B, T, n_head, head_dim), device=q.device, dtype=q.dtype).transpose(1, 2)
    dk = torch.empty((B, T, n_kv_head, head_dim), device=q.device, dtype=k.dtype).transpose(1, 2)
    dv = torch.empty_like(dk)
    common = dict(HEAD_DIM=head_dim, CAUSAL=causal, VARLEN=varlen, PRECISION=_precision(q.dtype))
    strides = (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *do.stride()[:3], *lse.stride()[:2])
    sequences = cu_seqlens if varlen else q
    config = kernel_config(head_dim, q.dtype, "dkdv", _arch(q))
    _attention_backward_dkdv_kernel[(triton.cdiv(max_len, config["BLOCK_N"]), num_seqs * n_kv_head)](
        q, k, v, do, lse, delta, dk, dv, sequences, *strides, *dk.stride()[:3], T, n_kv_head, group, scale,
        scale * 1.4426950408889634, **common, **config)
    config = kernel_config(head_dim, q.dtype, "dq", _arch(q))
    _attention_backward_dq_kernel[(triton.cdiv(max_len, config["BLOCK_M"]), num_seqs * n_head)](
        q, k, v, do, lse, delta, dq, sequences, *strides, *dq.stride()[:3], T, n_head, group, scale,
        scale * 1.4426950408889634, **common, **config)
    return dq, dk, dv


class FlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal, cu_seqlens, scale):
        out, lse = attention_forward(q, k, v, causal, cu_seqlens, scale)
        ctx.save_for_backward(q, k, v, out, lse, cu_seqlens)
        ctx.causal, ctx.scale = causal, scale
        return out, lse

    @staticmethod
    def backward(ctx, do, _dlse):
        q, k, v, out, lse, cu_seqlens = ctx.saved_tensors
        dq, dk, dv = attention_backward(do, q, k, v, out, lse, ctx.causal, cu_seqlens, ctx.scale)
        return dq, dk, dv, None, None, None


def _triton_fits(q, k, v, causal, attn_mask):
    return (attn_mask is None and causal and q.shape[-1] <= 128 and q.shape[2] == k.shape[2]
            and q.stride(-1) == 1 and k.stride(-1) == 1 and v.stride(-1) == 1)


def attention(q, k, v, causal=True, cu_seqlens=None, attn_mask=None, scale=None, return_lse=False, backend=None):
    """Public entry the model calls. backend: "auto" (default; Triton when the inputs allow it), "triton", "torch";
    the ATTENTION_BACKEND environment variable sets the default."""
    if choose_backend("ATTENTION_BACKEND", q, backend, _triton_fits(q, k, v, causal, attn_mask)) == "triton":
        if attn_mask is not None or not causal:
            raise ValueError("the Triton attention kernel is causal self-attention without an explicit mask")
        # the kernels read rows of q, k and v with unit stride; a forced backend may hand any layout
        q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
        cu = cu_seqlens.to(torch.int32) if cu_seqlens is not None else None
        out, lse = FlashAttention.apply(q, k, v, causal, cu, scale)
        return (out, lse) if return_lse else out
    return attention_ref(q, k, v, causal, cu_seqlens, attn_mask, scale, return_lse)
