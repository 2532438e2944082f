# python -m pytest tests/test_attention.py -q      (on CPU the Triton kernels run in Triton's interpreter)
import os

import pytest
import torch

import kernels.attention as attention_module
from aot import assert_fits, run_compile_script
from conftest import ROOT, tf32_truncated
from kernels.attention import attention, attention_ref, document_causal_mask

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
needs_triton_run = pytest.mark.skipif(not (INTERPRETED or torch.cuda.is_available()),
                                      reason="needs a GPU or TRITON_INTERPRET=1")
DEVICE = "cuda" if torch.cuda.is_available() and not INTERPRETED else "cpu"
# fp32 inputs: the interpreter computes in full fp32, a GPU takes the products in TF32 (kernels.attention._precision),
# which moves outputs by ~5e-3 (test_the_gpu_fp32_tolerance_covers_tf32_products checks the figure on the CPU)
FP32_GPU_TOLERANCE = 1.5e-2
FP32_TOLERANCE = 2e-5 if INTERPRETED else FP32_GPU_TOLERANCE


def naive(q, k, v, mask, scale):
    """softmax(QK^T) V with an explicit (T, S) mask, in float64, one head at a time."""
    group = q.shape[1] // k.shape[1]
    out = torch.empty_like(q)
    lse = torch.empty(q.shape[:3], dtype=q.dtype)
    for b in range(q.shape[0]):
        for h in range(q.shape[1]):
            scores = q[b, h] @ k[b, h // group].T * scale
            scores = scores.masked_fill(~mask, float("-inf"))
            lse[b, h] = scores.logsumexp(-1)
            out[b, h] = torch.softmax(scores, -1) @ v[b, h // group]
    return out, lse


def test_reference_matches_naive_with_explicit_masks():
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 4, 20, 16, dtype=torch.float64), torch.randn(1, 2, 20, 16, dtype=torch.float64), \
        torch.randn(1, 2, 20, 16, dtype=torch.float64)
    causal = torch.ones(20, 20, dtype=torch.bool).tril()
    out, lse = attention_ref(q, k, v, causal=True, return_lse=True)
    expected, expected_lse = naive(q, k, v, causal, 16 ** -0.5)
    assert torch.allclose(out, expected, atol=1e-12) and torch.allclose(lse, expected_lse, atol=1e-12)
    assert torch.allclose(attention_ref(q, k, v, causal=True), expected, atol=1e-12)
    cu = torch.tensor([0, 7, 8, 20], dtype=torch.int32)
    mask = document_causal_mask(cu, 20)
    assert mask[7, 6] == False and mask[8, 7] == False and mask[19, 8] and not mask[8, 9]  # noqa: E712
    assert torch.allclose(attention_ref(q, k, v, cu_seqlens=cu), naive(q, k, v, mask, 16 ** -0.5)[0], atol=1e-12)
    # packed without lse runs one attention per document, a path of its own that must pass the scale on
    assert torch.allclose(attention_ref(q, k, v, cu_seqlens=cu, scale=0.3), naive(q, k, v, mask, 0.3)[0], atol=1e-12)


def poisoned_empty(monkeypatch):
    """Kernel outputs start as NaN, so an element the kernel forgets to write fails the comparison."""
    original = torch.empty

    def empty(*args, **kwargs):
        tensor = original(*args, **kwargs)
        return tensor.fill_(float("nan")) if tensor.is_floating_point() else tensor

    monkeypatch.setattr(attention_module.torch, "empty", empty)


CASES = [  # (batch, query heads, kv heads, lengths (packed when several), head dim)
    (2, 4, 4, [33], 64),
    (1, 4, 2, [130], 64),
    (2, 2, 1, [17], 128),
    (1, 4, 2, [1, 7, 130, 64], 64),
    (1, 2, 2, [5, 1, 40], 128),
    (1, 2, 1, [70], 80),
]


@needs_triton_run
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("batch, heads, kv_heads, lengths, head_dim", CASES)
def test_triton_matches_reference_in_float64(monkeypatch, dtype, batch, heads, kv_heads, lengths, head_dim):
    torch.manual_seed(sum(lengths) + head_dim)
    total = sum(lengths)
    packed = len(lengths) > 1
    cu = torch.tensor([0] + lengths, dtype=torch.int32).cumsum(0).to(torch.int32).to(DEVICE) if packed else None
    shape = lambda h: (batch, total, h, head_dim)  # the model's layout, transposed to (B, H, T, D): strided
    q = torch.randn(shape(heads), dtype=dtype, device=DEVICE).transpose(1, 2).requires_grad_()
    k = torch.randn(shape(kv_heads), dtype=dtype, device=DEVICE).transpose(1, 2).requires_grad_()
    v = torch.randn(shape(kv_heads), dtype=dtype, device=DEVICE).transpose(1, 2).requires_grad_()
    grad_out = torch.randn(batch, heads, total, head_dim, dtype=dtype, device=DEVICE)
    poisoned_empty(monkeypatch)
    out, lse = attention(q, k, v, cu_seqlens=cu, return_lse=True, backend="triton")
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), grad_out)
    monkeypatch.undo()
    reference = [t.detach().double().cpu().requires_grad_() for t in (q, k, v)]
    ref_out, ref_lse = attention_ref(*reference, cu_seqlens=cu.cpu() if packed else None, return_lse=True)
    ref_grads = torch.autograd.grad(ref_out, reference, grad_out.double().cpu())
    tolerance = FP32_TOLERANCE if dtype == torch.float32 else 4e-3
    assert (out.double().cpu() - ref_out).abs().max() < tolerance
    assert (lse.double().cpu() - ref_lse).abs().max() < tolerance
    for ours, ref in zip((dq, dk, dv), ref_grads):
        assert not ours.isnan().any()
        assert (ours.double().cpu() - ref).abs().max() < tolerance * 4 * max(1.0, ref.abs().max().item() / 4)


@needs_triton_run
def test_triton_honours_an_explicit_scale_and_a_gradient_with_a_non_unit_last_stride():
    """attention(scale=...) is a public argument: the kernel's forward (out, lse) and backward must use it, not
    head_dim ** -0.5 (every other test takes the default). The upstream gradient arrives here with a non-unit last
    stride, as a transposed view; the kernels read rows of it with unit stride, so the launcher must make it so."""
    torch.manual_seed(7)
    lengths, scale = [5, 20], 0.3
    cu = torch.tensor([0, 5, 25], dtype=torch.int32, device=DEVICE)
    q = torch.randn(1, 4, 25, 32, device=DEVICE).requires_grad_()
    k, v = (torch.randn(1, 2, 25, 32, device=DEVICE).requires_grad_() for _ in range(2))
    grad_out = torch.randn(1, 4, 32, 25, device=DEVICE).transpose(-1, -2)  # (1, 4, 25, 32), last stride 25
    assert grad_out.stride(-1) != 1
    out, lse = attention(q, k, v, cu_seqlens=cu, scale=scale, return_lse=True, backend="triton")
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    reference = [t.detach().double().cpu().requires_grad_() for t in (q, k, v)]
    ref_out, ref_lse = attention_ref(*reference, cu_seqlens=cu.cpu(), scale=scale, return_lse=True)
    expected_out, expected_lse = naive(*[t.detach() for t in reference], document_causal_mask(cu.cpu(), 25), scale)
    assert torch.allclose(ref_out, expected_out, atol=1e-12) and torch.allclose(ref_lse, expected_lse, atol=1e-12)
    ref_grads = torch.autograd.grad(ref_out, reference, grad_out.double().cpu())
    assert (out.double().cpu() - ref_out).abs().max() < FP32_TOLERANCE
    assert (lse.double().cpu() - ref_lse).abs().max() < FP32_TOLERANCE
    for name, ours, ref in zip("qkv", grads, ref_grads):
        assert (ours.double().cpu() - ref).abs().max() < 5 * FP32_TOLERANCE, name


@needs_triton_run
@pytest.mark.parametrize("v_layout", ["fused", "transposed"])
def test_triton_reads_q_k_and_v_each_in_its_own_layout(v_layout):
    """In the model k comes out of the rope as a tensor of its own while q and v are views of the fused qkv output,
    so k's and v's strides differ; a kernel that read v with k's strides, or assumed v's last stride is 1 (a forced
    backend may hand any layout), would still pass every test whose q, k and v share one layout."""
    torch.manual_seed(11)
    batch, heads, kv_heads, length, head_dim = 2, 4, 2, 45, 32
    fused = torch.randn(batch, length, (heads + 2 * kv_heads + 3) * head_dim, device=DEVICE)  # spare columns
    q = fused[..., : heads * head_dim].view(batch, length, heads, head_dim).transpose(1, 2)
    k = torch.randn(batch, kv_heads, length, head_dim, device=DEVICE)
    if v_layout == "fused":
        v = fused[..., (heads + kv_heads) * head_dim: (heads + 2 * kv_heads) * head_dim]
        v = v.view(batch, length, kv_heads, head_dim).transpose(1, 2)
    else:
        v = torch.randn(batch, kv_heads, head_dim, length, device=DEVICE).transpose(-1, -2)
    assert k.stride() != v.stride() and (v_layout == "fused") == (v.stride(-1) == 1)
    inputs = [t.detach().requires_grad_() for t in (q, k, v)]
    out = attention(*inputs, backend="triton")
    grad_out = torch.randn(out.shape, device=DEVICE)
    grads = torch.autograd.grad(out, inputs, grad_out)
    reference = [t.detach().double().cpu().requires_grad_() for t in (q, k, v)]
    ref_out = attention_ref(*reference)
    expected, _ = naive(*[t.detach() for t in reference], torch.ones(length, length, dtype=torch.bool).tril(),
                        head_dim ** -0.5)
    assert torch.allclose(ref_out, expected, atol=1e-12)
    ref_grads = torch.autograd.grad(ref_out, reference, grad_out.double().cpu())
    assert (out.double().cpu() - expected).abs().max() < FP32_TOLERANCE
    for name, ours, ref in zip("qkv", grads, ref_grads):
        assert (ours.double().cpu() - ref).abs().max() < 5 * FP32_TOLERANCE, name


def tf32_attention(q, k, v, grad_out, mask, scale):
    """What the kernels compute from fp32 inputs on a GPU, one sequence: q (H, T, D), k and v (H_kv, S, D), mask
    (T, S). Every product's inputs are TF32 (tf32_truncated), everything else float64. Returns out, lse, dq, dk, dv."""
    group = q.shape[0] // k.shape[0]
    keys, values = k.repeat_interleave(group, 0), v.repeat_interleave(group, 0)
    scores = (tf32_truncated(q) @ tf32_truncated(keys).transpose(1, 2) * scale).masked_fill(~mask, float("-inf"))
    lse = scores.logsumexp(-1)
    p = (scores - lse[..., None]).exp()
    out = tf32_truncated(p) @ tf32_truncated(values)
    delta = (grad_out * out.float()).sum(-1)  # from the stored fp32 output
    ds = p * (tf32_truncated(grad_out) @ tf32_truncated(values).transpose(1, 2) - delta[..., None])
    dq = tf32_truncated(ds) @ tf32_truncated(keys) * scale
    dk = tf32_truncated(ds).transpose(1, 2) @ tf32_truncated(q) * scale
    dv = tf32_truncated(p).transpose(1, 2) @ tf32_truncated(grad_out)
    summed = lambda t: t.view(k.shape[0], group, *t.shape[1:]).sum(1)  # a KV head's gradient over its group
    return out, lse, dq, summed(dk), summed(dv)


def test_the_gpu_fp32_tolerance_covers_tf32_products():
    """The fp32 tests above pass on a GPU only if FP32_GPU_TOLERANCE covers what TF32 products move: here, on the
    CPU, their shapes (CASES, the explicit scale's, the layouts') through tf32_attention against the float64
    reference must stay within half of it (out, lse) and of the gradients' bound (4x it, absolute), for several
    draws."""
    shapes = [(heads, kv_heads, lengths, head_dim, None) for _, heads, kv_heads, lengths, head_dim in CASES]
    shapes += [(4, 2, [5, 20], 32, 0.3), (4, 2, [45], 32, None)]
    worst = dict(out=0.0, grad=0.0)
    for seed in range(4):
        generator = torch.Generator().manual_seed(seed)
        for heads, kv_heads, lengths, head_dim, scale in shapes:
            total, scale = sum(lengths), scale or head_dim ** -0.5
            draw = lambda *shape: torch.randn(*shape, generator=generator, dtype=torch.float64)
            q, k, v, grad_out = draw(heads, total, head_dim), draw(kv_heads, total, head_dim), \
                draw(kv_heads, total, head_dim), draw(heads, total, head_dim)
            cu = torch.tensor([0] + lengths).cumsum(0).to(torch.int32)
            reference = [t.clone().requires_grad_() for t in (q, k, v)]
            ref_out, ref_lse = attention_ref(*(t[None] for t in reference), cu_seqlens=cu, scale=scale,
                                             return_lse=True)
            ref_grads = torch.autograd.grad(ref_out, reference, grad_out[None])
            out, lse, *grads = tf32_attention(q, k, v, grad_out, document_causal_mask(cu, total), scale)
            error = lambda ours, ref: (ours - ref).abs().max().item()
            worst["out"] = max(worst["out"], error(out, ref_out[0]), error(lse, ref_lse[0]))
            worst["grad"] = max(worst["grad"], *(error(ours, ref) for ours, ref in zip(grads, ref_grads)))
    assert 1e-3 < worst["out"] < FP32_GPU_TOLERANCE / 2, worst  # the lower bound: TF32 is emulated at all
    assert worst["grad"] < 4 * FP32_GPU_TOLERANCE / 2, worst  # the tests allow 4x (more for large gradients)


def test_auto_takes_the_kernel_only_for_inputs_it_handles():
    """_triton_fits is auto's word on a GPU (kernels.choose_backend): causal self-attention without an explicit mask,
    head dims up to 128 (the kernel's tiles), unit last strides; anything else must go to the reference."""
    fits = attention_module._triton_fits
    q, kv = torch.randn(1, 4, 8, 128), torch.randn(1, 2, 8, 128)
    assert fits(q, kv, kv, True, None)
    wide = torch.randn(1, 2, 8, 256)
    assert not fits(torch.randn(1, 4, 8, 256), wide, wide, True, None)  # wider than the tiles
    assert not fits(q, kv, kv, False, None)
    assert not fits(q, kv, kv, True, torch.ones(1, 1, 8, 8, dtype=torch.bool))
    assert not fits(q[:, :, -1:], kv, kv, True, None)  # a query shorter than the keys (decoding): not self-attention
    column_major = torch.randn(1, 2, 128, 8).transpose(-1, -2)
    assert not fits(torch.randn(1, 4, 128, 8).transpose(-1, -2), kv, kv, True, None)
    assert not fits(q, column_major, kv, True, None)
    assert not fits(q, kv, column_major, True, None)


def test_dispatcher_uses_the_reference_on_cpu_and_refuses_unknown_backends():
    q = torch.randn(1, 2, 5, 16)
    assert torch.equal(attention(q, q, q), attention_ref(q, q, q))
    with pytest.raises(ValueError, match="backend"):
        attention(q, q, q, backend="cuda")


COMPILE_SCRIPT = r"""
import json, os, sys
import torch
sys.path[:0] = [sys.argv[1], os.path.join(sys.argv[1], "tests")]
import kernels.attention as A
from aot import compile_for

types = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
rows = []
for arch in (80, 90):
    for dtype, name in types.items():
        for head_dim in (64, 128):
            for varlen in (False, True):
                for pass_name, kernel in (("forward", A._attention_forward_kernel),
                                          ("dkdv", A._attention_backward_dkdv_kernel),
                                          ("dq", A._attention_backward_dq_kernel)):
                    config = A.kernel_config(head_dim, dtype, pass_name, arch)
                    constants = dict(HEAD_DIM=head_dim, CAUSAL=True, VARLEN=varlen, PRECISION=A._precision(dtype),
                                     BLOCK_M=config["BLOCK_M"], BLOCK_N=config["BLOCK_N"], BLOCK_D=config["BLOCK_D"])
                    signature = {}
                    for arg in kernel.arg_names:
                        if arg in constants:
                            signature[arg] = "constexpr"
                        elif arg == "cu_seqlens":
                            signature[arg] = "*i32"
                        elif arg in ("LSE", "DELTA"):
                            signature[arg] = "*fp32"
                        elif arg.isupper():
                            signature[arg] = "*" + name
                        elif arg.startswith("scale"):
                            signature[arg] = "fp32"
                        else:
                            signature[arg] = "i32"
                    shared, usage = compile_for(kernel, signature, constants, arch, config["num_warps"],
                                                config["num_stages"])
                    rows.append(dict(arch=arch, dtype=name, head_dim=head_dim, varlen=varlen, kernel=pass_name,
                                     shared=shared, usage=usage))
print(json.dumps(rows))
"""


def test_compiles_for_sm80_and_sm90_without_spills():
    """Every block configuration the launcher can choose, compiled ahead of time for A100 and H100 (no GPU
    needed): no local-memory spills, shared memory within each card's limit."""
    rows = run_compile_script(COMPILE_SCRIPT, ROOT)
    assert len(rows) == 2 * 3 * 2 * 2 * 3
    for row in rows:
        what = f"{row['kernel']} sm_{row['arch']} {row['dtype']} d={row['head_dim']} varlen={row['varlen']}"
        assert_fits(row, what)
