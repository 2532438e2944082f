"""
A residual add fused with the RMSNorm that follows it, forward and backward: the model's two residual adds per block
(model.Block: after attention, before the MLP's norm; after the MLP, in the next block's first norm or the final one).

    h = x + delta
    y = rms_norm(h) * weight,   rms_norm(h) = h / sqrt(mean(h^2) + eps)  (over the last dimension, in fp32)

x, delta (..., D) of one shape, weight (D,) -> (h, y), as torch's x + delta and model.RMSNorm compute them: h in the
promoted dtype of x and delta, rounded before it is normalised; y in h's dtype when h and the weight share a dtype,
else in their promoted dtype (under autocast: an fp32 residual stream, bf16 attention output, fp32 weight -> fp32).
The kernels compute in fp32 and round once per output. (rms_norm rounds the normed value to h's dtype before a
wider weight, as transformers does; the kernel does not, so for an h narrower than the weight, a mix the model never
hands it since under autocast its stream is fp32, the two differ by up to one rounding step of h's dtype.) The
backward gives

    d_h = rstd * (weight * d_y - h_hat * mean(h_hat * weight * d_y)) + d_h_out,   h_hat = h * rstd
    d_x = d_delta = d_h,   d_weight = sum over rows of d_y * h_hat

where d_h_out is the gradient reaching h from the residual stream; d_weight is summed per program, then over
programs.

Why a kernel: in torch the add is one kernel and the norm another (two when the dtypes differ), each reading and
writing the (tokens x D) stream; here one launch reads x and delta once and writes h and y. A decode step pays one
launch per add instead of two or three.

`add_rms_norm` dispatches (kernels.choose_backend): ADD_RMS_NORM_BACKEND=auto (default) takes Triton for CUDA
tensors once AUTO_TRITON is set (below), the reference otherwise; =triton / =torch, or backend="triton" / "torch",
forces one.
"""

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

from kernels import as_rows, choose_backend

MAX_DIM = 8192  # a row is one program's block: hidden sizes up to 8k (70B models'); wider ones spill registers
# auto takes the kernel on GPUs only once bench/gpu_check.py has run it on one (its step 2 checks it against the
# reference, step 5 times training with and without it): not yet (2026-11-30), so auto keeps torch's ops for now
AUTO_TRITON = False


def rms_norm(x, weight, eps):
    """model.RMSNorm: normalise in float32 as the reference implementations do, then cast back before the weight.
    One fused op where the dtypes agree: decoding a token at a time pays a launch per op. (Under autocast q and k
    are bf16 while q_norm's weight is fp32; the product then promotes to fp32, as in transformers.)"""
    if x.dtype == weight.dtype:
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    return weight * F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype)


def add_rms_norm_ref(x, delta, weight, eps):
    h = x + delta
    return h, rms_norm(h, weight, eps)


if triton is not None:

    @triton.jit
    def _add_rms_norm_forward_kernel(X, DELTA, WEIGHT, H, Y, RSTD, n_cols, eps, stride_x, stride_delta, stride_h,
                                     stride_y, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        ok = cols < n_cols
        x = tl.load(X + row * stride_x + cols, mask=ok, other=0.0).to(tl.float32)
        delta = tl.load(DELTA + row * stride_delta + cols, mask=ok, other=0.0).to(tl.float32)
        h = (x + delta).to(H.dtype.element_ty)
        tl.store(H + row * stride_h + cols, h, mask=ok)
        h = h.to(tl.float32)  # normalise the stored (rounded) h, as the two-op path does
        rstd = 1.0 / tl.sqrt(tl.sum(h * h, axis=0) / n_cols + eps)
        tl.store(RSTD + row, rstd)
        weight = tl.load(WEIGHT + cols, mask=ok, other=0.0).to(tl.float32)
        tl.store(Y + row * stride_y + cols, (h * rstd * weight).to(Y.dtype.element_ty), mask=ok)

    @triton.jit
    def _add_rms_norm_backward_kernel(H, WEIGHT, RSTD, D_Y, D_H_OUT, D_H, D_WEIGHT_PARTIAL, n_rows, n_cols,
                                      rows_per_program, stride_h, stride_dy, stride_dh_out, stride_dh,
                                      BLOCK: tl.constexpr):
        program = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        ok = cols < n_cols
        weight = tl.load(WEIGHT + cols, mask=ok, other=0.0).to(tl.float32)
        d_weight = tl.zeros((BLOCK,), dtype=tl.float32)
        first = program * rows_per_program
        for i in range(0, rows_per_program):
            row = (first + i).to(tl.int64)
            if row < n_rows:
                h = tl.load(H + row * stride_h + cols, mask=ok, other=0.0).to(tl.float32)
                d_y = tl.load(D_Y + row * stride_dy + cols, mask=ok, other=0.0).to(tl.float32)
                rstd = tl.load(RSTD + row)
                h_hat = h * rstd
                weighted = weight * d_y
                d_h = rstd * (weighted - h_hat * (tl.sum(h_hat * weighted, axis=0) / n_cols))
                d_h += tl.load(D_H_OUT + row * stride_dh_out + cols, mask=ok, other=0.0).to(tl.float32)
                tl.store(D_H + row * stride_dh + cols, d_h.to(D_H.dtype.element_ty), mask=ok)
                d_weight += d_y * h_hat
        tl.store(D_WEIGHT_PARTIAL + program * BLOCK + cols, d_weight, mask=ok)


def _warps(block):
    return 4 if block <= 2048 else 8


class AddRMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, delta, weight, eps):
        x_rows, delta_rows = as_rows(x), as_rows(delta)
        n_rows, n_cols = x_rows.shape
        block = triton.next_power_of_2(n_cols)
        h = torch.empty(n_rows, n_cols, dtype=torch.promote_types(x.dtype, delta.dtype), device=x.device)
        y = torch.empty(n_rows, n_cols, dtype=torch.promote_types(h.dtype, weight.dtype), device=x.device)
        rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
        if n_rows:
            _add_rms_norm_forward_kernel[(n_rows,)](x_rows, delta_rows, weight, h, y, rstd, n_cols, eps,
                                                    x_rows.stride(0), delta_rows.stride(0), h.stride(0), y.stride(0),
                                                    BLOCK=block, num_warps=_warps(block))
        ctx.save_for_backward(h, weight, rstd)
        ctx.dtypes = (x.dtype, delta.dtype)
        return h.view(x.shape), y.view(x.shape)

    @staticmethod
    def backward(ctx, d_h_out, d_y):
        h, weight, rstd = ctx.saved_tensors
        n_rows, n_cols = h.shape
        block = triton.next_power_of_2(n_cols)
        d_y_rows, d_h_out_rows = as_rows(d_y), as_rows(d_h_out)  # autograd passes zeros for an unused output
        d_h = torch.empty(n_rows, n_cols, dtype=torch.float32, device=h.device)
        programs = max(1, min(n_rows, 4 * torch.cuda.get_device_properties(h.device).multi_processor_count
                              if h.is_cuda else 16))
        rows_per_program = triton.cdiv(n_rows, programs)
        partial = torch.empty(programs, block, dtype=torch.float32, device=h.device)
        if n_rows:
            _add_rms_norm_backward_kernel[(programs,)](
                h, weight, rstd, d_y_rows, d_h_out_rows, d_h, partial, n_rows, n_cols, rows_per_program, h.stride(0),
                d_y_rows.stride(0), d_h_out_rows.stride(0), d_h.stride(0), BLOCK=block, num_warps=_warps(block))
            d_weight = partial[:, :n_cols].sum(0).to(weight.dtype)
        else:
            d_weight = torch.zeros_like(weight)
        x_dtype, delta_dtype = ctx.dtypes
        shape = d_y.shape
        return d_h.to(x_dtype).view(shape), d_h.to(delta_dtype).view(shape), d_weight, None


def add_rms_norm(x, delta, weight, eps, backend=None):
    """Public entry: (x + delta, RMSNorm(x + delta) * weight). backend: "auto", "triton" or "torch"; the default is
    ADD_RMS_NORM_BACKEND, else auto (Triton for CUDA tensors once AUTO_TRITON is set, the reference otherwise). The
    kernel takes x and delta of one shape with a last dimension up to MAX_DIM; anything else goes to the reference."""
    chosen = choose_backend("ADD_RMS_NORM_BACKEND", x, backend, triton_fits=AUTO_TRITON)
    if chosen == "triton" and x.shape == delta.shape and x.shape[-1] <= MAX_DIM:
        return AddRMSNorm.apply(x, delta, weight, eps)
    return add_rms_norm_ref(x, delta, weight, eps)
