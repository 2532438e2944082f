# python -m pytest tests/test_silu_mul.py -q      (on CPU the Triton kernels run in Triton's interpreter)
import os

import pytest
import torch

from aot import assert_fits, run_compile_script
from conftest import ROOT
from kernels.silu_mul import silu_mul

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if torch.cuda.is_available() and not INTERPRETED else "cpu"
needs_triton = pytest.mark.skipif(not (INTERPRETED or torch.cuda.is_available()),
                                  reason="needs a GPU or TRITON_INTERPRET=1")


def textbook(gate_up):
    """silu(g) * u written out in float64: g / (1 + exp(-g)) * u."""
    gate, up = gate_up.double().chunk(2, dim=-1)
    return gate / (1 + torch.exp(-gate)) * up


def test_reference_is_textbook_swiglu_and_touches_its_input_only_in_place():
    gate_up = torch.randn(3, 4, 2 * 37, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    expected, original = textbook(gate_up), gate_up.clone()
    assert torch.allclose(silu_mul(gate_up, backend="torch"), expected, atol=1e-12)
    assert torch.equal(gate_up, original)  # the default leaves gate_up as it was
    in_place = silu_mul(gate_up, inplace=True, backend="torch")  # sampling's path: the result lives in gate_up
    assert torch.allclose(in_place, expected, atol=1e-12) and in_place.data_ptr() == gate_up.data_ptr()


@needs_triton
@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.float16, 2e-3), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("shape", [(2, 3, 2 * 37), (5, 2 * 1027), (1, 1, 2 * 2048)])
def test_triton_forward_and_backward_match_float64(dtype, tolerance, shape):
    """Several column blocks, a ragged last block, a decode-shaped (1, 1, .) input; gradients by autograd of the
    float64 textbook formula."""
    generator = torch.Generator().manual_seed(shape[-1])
    gate_up = torch.randn(*shape, dtype=torch.float64, generator=generator)
    d_out = torch.randn(*shape[:-1], shape[-1] // 2, dtype=torch.float64, generator=generator)
    reference_input = gate_up.clone().requires_grad_()
    expected = textbook(reference_input)
    (expected_grad,) = torch.autograd.grad(expected, reference_input, d_out)
    ours_input = gate_up.to(DEVICE, dtype).requires_grad_()
    out = silu_mul(ours_input, backend="triton")
    (grad,) = torch.autograd.grad(out, ours_input, d_out.to(DEVICE, dtype))
    assert out.dtype == dtype and out.shape == expected.shape and grad.shape == gate_up.shape
    assert (out.double().cpu() - expected).abs().max() < tolerance * max(1.0, expected.abs().max().item())
    assert (grad.double().cpu() - expected_grad).abs().max() < tolerance * max(1.0, expected_grad.abs().max().item())


@needs_triton
def test_triton_takes_a_strided_view_and_no_rows():
    big = torch.randn(6, 2 * 40 + 9, device=DEVICE)
    view = big[:, : 2 * 40]  # rows further apart than their length, as a slice of a wider tensor
    assert torch.allclose(silu_mul(view, backend="triton").double(), textbook(view.cpu()).to(DEVICE), atol=1e-5)
    empty = torch.randn(0, 2 * 16, device=DEVICE, requires_grad=True)
    out = silu_mul(empty, backend="triton")
    out.sum().backward()
    assert out.shape == (0, 16) and empty.grad.shape == (0, 32)


@needs_triton
def test_triton_backward_through_a_strided_view_writes_each_row_of_the_gradient(monkeypatch):
    """The backward reads gate_up with its own row stride (a slice of a wider tensor) but writes d(gate_up) into a
    new contiguous tensor with that tensor's row stride; mixing the two up scatters the gradient. (The new tensor is
    given spare room behind it here, so that such a bug fails the comparison instead of writing past the end.)"""
    import kernels.silu_mul as silu_module

    generator = torch.Generator().manual_seed(5)
    big = torch.randn(6, 2 * 40 + 9, dtype=torch.float64, generator=generator)
    d_out = torch.randn(6, 40, dtype=torch.float64, generator=generator)
    reference = big.clone().requires_grad_()
    (expected,) = torch.autograd.grad(textbook(reference[:, : 2 * 40]), reference, d_out)
    original = torch.empty_like
    roomy = lambda t, **kwargs: original(t.new_empty(2 * t.numel()), **kwargs)[: t.numel()].view(t.shape)
    monkeypatch.setattr(silu_module.torch, "empty_like", roomy)
    ours = big.to(DEVICE, torch.float32).requires_grad_()
    (grad,) = torch.autograd.grad(silu_mul(ours[:, : 2 * 40], backend="triton"), ours, d_out.to(DEVICE, torch.float32))
    monkeypatch.undo()
    assert (grad.double().cpu() - expected).abs().max() < 1e-5 * max(1.0, expected.abs().max().item())


def test_odd_last_dimension_is_refused():
    with pytest.raises(ValueError, match="even last dimension"):
        silu_mul(torch.randn(2, 7), backend="torch")


COMPILE_SCRIPT = r"""
import json, os, sys
sys.path[:0] = [sys.argv[1], os.path.join(sys.argv[1], "tests")]
import kernels.silu_mul as K
from aot import compile_for

rows = []
for arch in (80, 90):
    for dtype in ("fp16", "bf16", "fp32"):
        for kernel in (K._silu_mul_forward_kernel, K._silu_mul_backward_kernel):
            constants = dict(BLOCK=K.BLOCK)
            signature = {arg: "constexpr" if arg in constants else "*" + dtype if arg.isupper() else "i32"
                         for arg in kernel.arg_names}
            shared, usage = compile_for(kernel, signature, constants, arch, num_warps=4)
            rows.append(dict(arch=arch, dtype=dtype, kernel=kernel.fn.__name__, shared=shared, usage=usage))
print(json.dumps(rows))
"""


def test_compiles_for_sm80_and_sm90_without_spills():
    rows = run_compile_script(COMPILE_SCRIPT, ROOT)
    assert len(rows) == 12
    for row in rows:
        assert_fits(row, f"{row['kernel']} sm_{row['arch']} {row['dtype']}")
