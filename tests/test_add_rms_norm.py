# python -m pytest tests/test_add_rms_norm.py -q      (on CPU the Triton kernels run in Triton's interpreter)
import os

import pytest
import torch

from aot import assert_fits, run_compile_script
from conftest import ROOT, write_hf_checkpoint
from kernels.add_rms_norm import add_rms_norm, rms_norm

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if torch.cuda.is_available() and not INTERPRETED else "cpu"
needs_triton = pytest.mark.skipif(not (INTERPRETED or torch.cuda.is_available()),
                                  reason="needs a GPU or TRITON_INTERPRET=1")


def textbook(x, delta, weight, eps):
    """h = x + delta; h / sqrt(mean(h^2) + eps) * weight, in float64."""
    h = x.double() + delta.double()
    return h, h / torch.sqrt(h.pow(2).mean(-1, keepdim=True) + eps) * weight.double()


def inputs(shape, x_dtype, delta_dtype, weight_dtype, seed=0, device="cpu"):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, dtype=torch.float64, generator=generator) * 3
    delta = torch.randn(*shape, dtype=torch.float64, generator=generator)
    if x.numel():  # a first row so small that eps (1e-6) moves its norm by ~10%
        x.view(-1, shape[-1])[0] *= 1e-3
        delta.view(-1, shape[-1])[0] *= 1e-3
    weight = 1 + 0.5 * torch.randn(shape[-1], dtype=torch.float64, generator=generator)
    return x.to(device, x_dtype), delta.to(device, delta_dtype), weight.to(device, weight_dtype)


def test_reference_is_the_textbook_formula_and_keeps_the_dtypes():
    x, delta, weight = inputs((3, 5, 24), torch.float64, torch.float64, torch.float64)
    h, y = add_rms_norm(x, delta, weight, 1e-6, backend="torch")
    expected_h, expected_y = textbook(x, delta, weight, 1e-6)
    assert torch.allclose(h, expected_h, atol=1e-12) and torch.allclose(y, expected_y, atol=1e-12)
    x, delta, weight = inputs((2, 8), torch.float32, torch.bfloat16, torch.float32)  # autocast: fp32 stream
    h, y = add_rms_norm(x, delta, weight, 1e-6, backend="torch")
    assert h.dtype == y.dtype == torch.float32
    # Qwen3's q_norm/k_norm under autocast: bf16 heads, fp32 weight; eps matters for a row of tiny values
    heads = torch.randn(2, 4, 32, generator=torch.Generator().manual_seed(0)).mul_(1e-4).to(torch.bfloat16)
    weight = torch.rand(32, generator=torch.Generator().manual_seed(1)) + 0.5
    y = rms_norm(heads, weight, 1e-6)
    assert y.dtype == torch.float32
    expected = heads.double() / torch.sqrt(heads.double().pow(2).mean(-1, keepdim=True) + 1e-6) * weight.double()
    assert torch.allclose(y.double(), expected, rtol=1e-2, atol=1e-3)


@needs_triton
@pytest.mark.parametrize("x_dtype, delta_dtype, weight_dtype, tolerance", [
    (torch.float32, torch.float32, torch.float32, 1e-5),
    (torch.float16, torch.float16, torch.float16, 4e-3),
    (torch.float32, torch.float16, torch.float32, 1e-3),  # autocast's mix: fp32 stream, half-precision delta
    (torch.float32, torch.bfloat16, torch.float32, 8e-3),  # the same in bf16, as on a GPU
    (torch.bfloat16, torch.bfloat16, torch.bfloat16, 3e-2),  # a bf16 model (the sampler's copy on a GPU)
    (torch.bfloat16, torch.float32, torch.float32, 8e-3),  # h takes the promoted dtype, as x + delta does
])
@pytest.mark.parametrize("shape", [(2, 3, 64), (37, 64), (7, 100), (1, 1, 1536)])
def test_triton_forward_and_backward_match_float64(x_dtype, delta_dtype, weight_dtype, tolerance, shape):
    """Outputs, then the gradients of x, delta and the weight with upstream gradients on both h (the residual
    stream) and y (the normed input of the next layer), against autograd of the float64 formula; 37 rows give the
    backward's programs several rows each (16 programs on CPU) and a short last one."""
    x, delta, weight = inputs(shape, x_dtype, delta_dtype, weight_dtype, seed=shape[-1], device=DEVICE)
    generator = torch.Generator().manual_seed(1)
    d_h = torch.randn(*shape, dtype=torch.float64, generator=generator)
    d_y = torch.randn(*shape, dtype=torch.float64, generator=generator)
    reference = [t.detach().cpu().double().requires_grad_() for t in (x, delta, weight)]
    expected_h, expected_y = textbook(*reference, 1e-6)
    expected_grads = torch.autograd.grad((expected_h, expected_y), reference, (d_h, d_y))
    ours = [t.detach().requires_grad_() for t in (x, delta, weight)]
    h, y = add_rms_norm(*ours, 1e-6, backend="triton")
    reference_h, reference_y = add_rms_norm(x, delta, weight, 1e-6, backend="torch")
    assert (h.dtype, y.dtype) == (reference_h.dtype, reference_y.dtype)
    grads = torch.autograd.grad((h, y), ours, (d_h.to(DEVICE, h.dtype), d_y.to(DEVICE, y.dtype)))
    assert (h.double().cpu() - expected_h).abs().max() < tolerance * 4
    assert (y.double().cpu() - expected_y).abs().max() < tolerance * 4
    for name, grad, expected, tensor in zip(("x", "delta", "weight"), grads, expected_grads, ours):
        assert grad.dtype == tensor.dtype, name
        scale = max(1.0, expected.abs().max().item())
        assert (grad.double().cpu() - expected).abs().max() < tolerance * 4 * scale, name


@needs_triton
def test_triton_normalises_the_rounded_sum_and_keeps_each_gradient_in_full_precision():
    """Two mixes the parametrised test's tolerances cannot see. bf16 x and delta with an fp32 weight (fp32 y): h
    is rounded to bf16 and y must be the norm of that stored h, to fp32 precision, not of the unrounded fp32 sum
    (~2^-9 apart). fp32 x with a bf16 delta (fp32 h): the gradient of x is d_h in fp32, to fp32 precision, and only
    the gradient of delta is rounded to bf16."""
    x, delta, weight = inputs((5, 48), torch.bfloat16, torch.bfloat16, torch.float32, seed=2, device=DEVICE)
    h, y = add_rms_norm(x, delta, weight, 1e-6, backend="triton")
    assert h.dtype == torch.bfloat16 and y.dtype == torch.float32
    expected_y = textbook(h.cpu(), torch.zeros_like(h.cpu()), weight.cpu(), 1e-6)[1]
    assert (y.double().cpu() - expected_y).abs().max() < 1e-5 * expected_y.abs().max()

    x, delta, weight = inputs((5, 48), torch.float32, torch.bfloat16, torch.float32, seed=3, device=DEVICE)
    d_y = torch.randn(5, 48, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    reference = [t.detach().cpu().double().requires_grad_() for t in (x, delta, weight)]
    expected_grad = torch.autograd.grad(textbook(*reference, 1e-6)[1], reference[0], d_y)[0]
    ours = [t.detach().requires_grad_() for t in (x, delta, weight)]
    grad_x, grad_delta = torch.autograd.grad(add_rms_norm(*ours, 1e-6, backend="triton")[1], ours[:2],
                                             d_y.to(DEVICE, torch.float32))
    assert grad_x.dtype == torch.float32 and grad_delta.dtype == torch.bfloat16
    assert (grad_x.double().cpu() - expected_grad).abs().max() < 1e-5 * expected_grad.abs().max()
    assert torch.equal(grad_delta, grad_x.to(torch.bfloat16))


@needs_triton
def test_triton_reads_x_and_delta_each_with_its_own_row_stride_and_leaves_broadcasts_to_the_reference():
    """Every other test builds x and delta alike, so a kernel that stepped through delta's rows with x's stride
    would pass them. A delta that broadcasts (one row for all) is no input of the kernel: the reference takes it."""
    x, _, weight = inputs((6, 64), torch.float32, torch.float32, torch.float32, seed=5, device=DEVICE)
    delta = torch.randn(6, 73, generator=torch.Generator().manual_seed(6)).to(DEVICE)[:, :64]
    assert delta.stride(0) != x.stride(0)
    h, y = add_rms_norm(x, delta, weight, 1e-6, backend="triton")
    expected_h, expected_y = textbook(x.cpu(), delta.cpu(), weight.cpu(), 1e-6)
    assert (h.double().cpu() - expected_h).abs().max() < 1e-5 and (y.double().cpu() - expected_y).abs().max() < 1e-5
    row = delta[0]
    h, y = add_rms_norm(x, row, weight, 1e-6, backend="triton")
    expected_h, expected_y = textbook(x.cpu(), row.cpu().expand(6, 64), weight.cpu(), 1e-6)
    assert (h.double().cpu() - expected_h).abs().max() < 1e-5 and (y.double().cpu() - expected_y).abs().max() < 1e-5


def test_reference_rounds_the_normed_value_to_the_input_dtype_before_a_wider_weight():
    """Qwen3's q_norm/k_norm under autocast (bf16 heads, fp32 weight): transformers computes
    weight * (x.float() * rsqrt(mean(x^2) + eps)).to(x.dtype), so the model must round where it rounds."""
    x = torch.randn(8, 64, generator=torch.Generator().manual_seed(7)).to(torch.bfloat16)
    weight = torch.rand(64, generator=torch.Generator().manual_seed(8)) + 0.5
    xf = x.float()
    expected = weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(torch.bfloat16)
    y = rms_norm(x, weight, 1e-6)
    assert y.dtype == torch.float32 and (y - expected).abs().max() <= 1e-6 * expected.abs().max()


@needs_triton
def test_triton_takes_no_rows():
    x, delta, weight = (t.requires_grad_() for t in inputs((0, 32), torch.float32, torch.float32, torch.float32,
                                                            device=DEVICE))
    h, y = add_rms_norm(x, delta, weight, 1e-6, backend="triton")
    (h.sum() + y.sum()).backward()
    assert h.shape == y.shape == (0, 32) and not weight.grad.any()


@pytest.mark.skipif(not INTERPRETED, reason="the CPU run of the model through the kernels needs Triton's interpreter")
@pytest.mark.parametrize("autocast_dtype, tolerance", [(None, 1e-4), (torch.float16, 3e-2)])
def test_model_trains_the_same_through_the_fused_kernels(tmp_path, monkeypatch, autocast_dtype, tolerance):
    """The model's log-probs and every parameter's gradient with add_rms_norm and silu_mul as Triton kernels
    (interpreted) equal the torch path's: an fp32 model, and fp32 weights under fp16 autocast (the set-up of
    training on a GPU, there in bf16)."""
    from model import Transformer, sequence_logprobs

    write_hf_checkpoint(tmp_path, seed=5)
    model = Transformer.from_pretrained(tmp_path)
    ids = torch.randint(0, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))

    def logprobs_and_grads():
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=autocast_dtype, enabled=autocast_dtype is not None):
            logprobs = sequence_logprobs(model, ids)
        logprobs.sum().backward()
        return logprobs.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    torch_logprobs, torch_grads = logprobs_and_grads()
    monkeypatch.setenv("ADD_RMS_NORM_BACKEND", "triton")
    monkeypatch.setenv("SILU_MUL_BACKEND", "triton")
    kernel_logprobs, kernel_grads = logprobs_and_grads()
    assert (kernel_logprobs - torch_logprobs).abs().max() < tolerance
    for name, grad in kernel_grads.items():
        scale = max(1.0, torch_grads[name].abs().max().item())
        assert (grad - torch_grads[name]).abs().max() < tolerance * scale, name


COMPILE_SCRIPT = r"""
import json, os, sys
sys.path[:0] = [sys.argv[1], os.path.join(sys.argv[1], "tests")]
import kernels.add_rms_norm as K
from aot import compile_for

rows = []
for arch in (80, 90):
    for dtype in ("fp16", "bf16", "fp32"):
        for dim in (2048, 4096, 8192):  # BLOCK: the next power of 2 of the hidden size, up to MAX_DIM
            for kernel in (K._add_rms_norm_forward_kernel, K._add_rms_norm_backward_kernel):
                constants = dict(BLOCK=dim)
                signature = {arg: "constexpr" if arg in constants else "fp32" if arg == "eps" else
                             "*fp32" if arg in ("RSTD", "D_WEIGHT_PARTIAL", "D_H") else
                             "*" + dtype if arg.isupper() else "i32" for arg in kernel.arg_names}
                shared, usage = compile_for(kernel, signature, constants, arch, num_warps=K._warps(dim))
                rows.append(dict(arch=arch, dtype=dtype, dim=dim, kernel=kernel.fn.__name__, shared=shared,
                                 usage=usage))
print(json.dumps(rows))
"""


def test_compiles_for_sm80_and_sm90_without_spills():
    rows = run_compile_script(COMPILE_SCRIPT, ROOT)
    assert len(rows) == 36
    for row in rows:
        assert_fits(row, f"{row['kernel']} sm_{row['arch']} {row['dtype']} D={row['dim']}")
