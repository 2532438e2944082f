"""
The MLP's SiLU-multiply (SwiGLU) in one kernel, forward and backward.

    out = silu(gate) * up,   [gate | up] = gate_up along the last dimension (the fused gate_up_proj's output)

gate_up (..., 2 * I) with a unit last stride -> out (..., I) in gate_up's dtype; the kernels compute in fp32 and
round once. The backward writes d(gate_up) as one (..., 2 * I) tensor, the layout gate_up_proj's backward reads:

    d_gate = d_out * up * sigmoid(gate) * (1 + gate * (1 - sigmoid(gate))),   d_up = d_out * silu(gate)

Why a kernel: in torch, SiLU and the product are two kernels that each read and write the (tokens x I) activations
(I = 8,960 at 1.5B), and autograd keeps silu(gate) beside gate and up for the backward; here one launch reads
gate_up once and writes out once, and only gate_up is kept. A decode step pays one launch instead of two per layer.

`silu_mul` dispatches (kernels.choose_backend): SILU_MUL_BACKEND=auto (default) takes Triton for CUDA tensors once
AUTO_TRITON is set (below), the reference otherwise; =triton / =torch, or backend="triton" / "torch", forces one.
"""

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

from kernels import as_rows, choose_backend

BLOCK = 1024  # columns per program: rows are thousands of columns long, and a program per block keeps many in flight
# auto takes the kernel on GPUs only once bench/gpu_check.py has run it on one (its step 2 checks it against the
# reference, step 5 times training with and without it): not yet (2026-11-30), so auto keeps torch's ops for now
AUTO_TRITON = False


def silu_mul_ref(gate_up, inplace=False):
    gate, up = gate_up.chunk(2, dim=-1)
    if inplace:  # SiLU and the product in gate_up's own memory, no new tensor (the result is a view of it)
        return F.silu(gate, inplace=True).mul_(up)
    return F.silu(gate) * up


if triton is not None:

    @triton.jit
    def _silu_mul_forward_kernel(GATE_UP, OUT, n_cols, stride_in, stride_out, BLOCK: tl.constexpr):
        row, block = tl.program_id(0).to(tl.int64), tl.program_id(1)
        cols = block * BLOCK + tl.arange(0, BLOCK)
        ok = cols < n_cols
        gate = tl.load(GATE_UP + row * stride_in + cols, mask=ok, other=0.0).to(tl.float32)
        up = tl.load(GATE_UP + row * stride_in + n_cols + cols, mask=ok, other=0.0).to(tl.float32)
        out = gate * tl.sigmoid(gate) * up
        tl.store(OUT + row * stride_out + cols, out.to(OUT.dtype.element_ty), mask=ok)

    @triton.jit
    def _silu_mul_backward_kernel(GATE_UP, D_OUT, D_GATE_UP, n_cols, stride_in, stride_dout, stride_dgu,
                                  BLOCK: tl.constexpr):
        row, block = tl.program_id(0).to(tl.int64), tl.program_id(1)
        cols = block * BLOCK + tl.arange(0, BLOCK)
        ok = cols < n_cols
        gate = tl.load(GATE_UP + row * stride_in + cols, mask=ok, other=0.0).to(tl.float32)
        up = tl.load(GATE_UP + row * stride_in + n_cols + cols, mask=ok, other=0.0).to(tl.float32)
        d_out = tl.load(D_OUT + row * stride_dout + cols, mask=ok, other=0.0).to(tl.float32)
        sigmoid = tl.sigmoid(gate)
        d_gate = d_out * up * sigmoid * (1.0 + gate * (1.0 - sigmoid))
        d_up = d_out * gate * sigmoid
        tl.store(D_GATE_UP + row * stride_dgu + cols, d_gate.to(D_GATE_UP.dtype.element_ty), mask=ok)
        tl.store(D_GATE_UP + row * stride_dgu + n_cols + cols, d_up.to(D_GATE_UP.dtype.element_ty), mask=ok)


class SiLUMul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate_up):
        rows = as_rows(gate_up)
        n_cols = rows.shape[1] // 2
        out = torch.empty((rows.shape[0], n_cols), dtype=gate_up.dtype, device=gate_up.device)
        if rows.shape[0]:
            _silu_mul_forward_kernel[(rows.shape[0], triton.cdiv(n_cols, BLOCK))](
                rows, out, n_cols, rows.stride(0), out.stride(0), BLOCK=BLOCK, num_warps=4)
        ctx.save_for_backward(gate_up)
        return out.view(*gate_up.shape[:-1], n_cols)

    @staticmethod
    def backward(ctx, d_out):
        (gate_up,) = ctx.saved_tensors
        rows, d_rows = as_rows(gate_up), as_rows(d_out)
        n_cols = rows.shape[1] // 2
        d_gate_up = torch.empty_like(rows)
        if rows.shape[0]:
            _silu_mul_backward_kernel[(rows.shape[0], triton.cdiv(n_cols, BLOCK))](
                rows, d_rows, d_gate_up, n_cols, rows.stride(0), d_rows.stride(0), d_gate_up.stride(0), BLOCK=BLOCK,
                num_warps=4)
        return d_gate_up.view(gate_up.shape)


def silu_mul(gate_up, inplace=False, backend=None):
    """Public entry: silu(gate) * up of gate_up = [gate | up] (..., 2 * I) -> (..., I). inplace lets the torch path
    overwrite gate_up (a GEMM output nothing else reads, outside autograd); the kernel writes a new tensor either way.
    backend: "auto", "triton" or "torch"; the default is SILU_MUL_BACKEND, else auto (Triton for CUDA tensors once
    AUTO_TRITON is set, the reference otherwise)."""
    if gate_up.shape[-1] % 2:
        raise ValueError(f"silu_mul wants an even last dimension ([gate | up]), got {tuple(gate_up.shape)}")
    if choose_backend("SILU_MUL_BACKEND", gate_up, backend, triton_fits=AUTO_TRITON) == "triton":
        return SiLUMul.apply(gate_up)
    return silu_mul_ref(gate_up, inplace)
