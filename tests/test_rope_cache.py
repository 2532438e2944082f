# python -m pytest tests/test_rope_cache.py -q      (on CPU the Triton kernel runs in Triton's interpreter)
import os

import pytest
import torch

from aot import assert_fits, run_compile_script
from conftest import ROOT, write_hf_checkpoint
from kernels.rope_cache import rope_and_cache

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if torch.cuda.is_available() and not INTERPRETED else "cpu"


def textbook_rope(x, positions, theta=10000.0):
    """Rotates each pair (x[i], x[i + d/2]) by position * theta^(-2i/d), written out in float64."""
    half = x.shape[-1] // 2
    angles = positions.double()[:, None] * theta ** (-torch.arange(half, dtype=torch.float64) * 2 / x.shape[-1])
    cos, sin = angles.cos()[:, None], angles.sin()[:, None]  # (B, 1, half)
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def case(dtype, n_head, n_kv_head, head_dim, device, seed=0):
    """Inputs laid out as the model has them: q, k, v are (B, heads, head_dim) views of projections."""
    from model import rope_cos_sin

    generator = torch.Generator().manual_seed(seed)
    B, slots, max_len = 3, 5, 40
    projections = torch.randn(B, (n_head + 2 * n_kv_head) * head_dim, generator=generator, dtype=torch.float64)
    q, k, v = projections.split([n_head * head_dim, n_kv_head * head_dim, n_kv_head * head_dim], dim=-1)
    q, k, v = q.view(B, n_head, head_dim), k.view(B, n_kv_head, head_dim), v.view(B, n_kv_head, head_dim)
    positions = torch.tensor([0, 17, 39])
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    cos, signed_sin = (t[:, 0, 0] for t in rope_cos_sin(positions[:, None], inv_freq, torch.float64))
    k_cache = torch.randn(slots, n_kv_head, max_len, head_dim, generator=generator, dtype=torch.float64)
    v_cache = torch.randn(slots, n_kv_head, max_len, head_dim, generator=generator, dtype=torch.float64)
    slot_ids = torch.tensor([4, 0, 2])
    to = lambda t: t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)
    return [to(t) for t in (q, k, v, cos, signed_sin, k_cache, v_cache, slot_ids, positions)]


def test_paged_writes_land_in_each_positions_block():
    """With block tables, position p of row b is written to block table[b, p // block_size] at p % block_size, and
    nothing else changes."""
    q, k, v, cos, sin, _, _, _, positions = case(torch.float64, 4, 2, 16, "cpu")
    block_size = 8  # positions 0, 17, 39: blocks 0, 2 and 4 of their rows, at offsets 0, 1 and 7
    table = torch.tensor([[3, 9, 1, 7, 2], [5, 4, 8, 6, 10], [11, 12, 13, 14, 15]])
    k_cache, v_cache = torch.randn(16, 2, block_size, 16, dtype=torch.float64), torch.randn(16, 2, block_size, 16,
                                                                                            dtype=torch.float64)
    old_k, old_v = k_cache.clone(), v_cache.clone()
    rope_and_cache(q, k, v, cos, sin, k_cache, v_cache, table, positions, backend="torch")
    blocks, offsets = torch.tensor([3, 8, 15]), torch.tensor([0, 1, 7])
    assert torch.allclose(k_cache[blocks, :, offsets], textbook_rope(k, positions), atol=1e-12)
    assert torch.equal(v_cache[blocks, :, offsets], v)
    written = torch.zeros_like(k_cache, dtype=torch.bool)
    written[blocks, :, offsets] = True
    assert torch.equal(k_cache[~written], old_k[~written]) and torch.equal(v_cache[~written], old_v[~written])


def test_reference_is_textbook_rope_and_writes_only_its_positions():
    q, k, v, cos, sin, k_cache, v_cache, slots, positions = case(torch.float64, 4, 2, 16, "cpu")
    old_k, old_v = k_cache.clone(), v_cache.clone()
    q_out = rope_and_cache(q, k, v, cos, sin, k_cache, v_cache, slots, positions, backend="torch")
    assert torch.allclose(q_out, textbook_rope(q, positions), atol=1e-12)
    assert torch.allclose(k_cache[slots, :, positions], textbook_rope(k, positions), atol=1e-12)
    assert torch.equal(v_cache[slots, :, positions], v)
    written = torch.zeros_like(k_cache, dtype=torch.bool)
    written[slots, :, positions] = True
    assert torch.equal(k_cache[~written], old_k[~written]) and torch.equal(v_cache[~written], old_v[~written])


@pytest.mark.skipif(not (INTERPRETED or torch.cuda.is_available()), reason="needs a GPU or TRITON_INTERPRET=1")
@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.float16, 3e-3)])
@pytest.mark.parametrize("n_head, n_kv_head, head_dim", [(4, 2, 64), (12, 2, 128), (2, 2, 80)])
def test_triton_matches_reference_in_float64(dtype, tolerance, n_head, n_kv_head, head_dim):
    inputs = case(dtype, n_head, n_kv_head, head_dim, DEVICE, seed=head_dim)
    expected = [t.detach().cpu().double() if t.is_floating_point() else t.cpu() for t in inputs]
    expected_q = rope_and_cache(*expected, backend="torch")
    q_out = rope_and_cache(*inputs, backend="triton")
    assert q_out.dtype == dtype and (q_out.double().cpu() - expected_q).abs().max() < tolerance
    for ours, reference in ((inputs[5], expected[5]), (inputs[6], expected[6])):  # the whole caches
        assert (ours.double().cpu() - reference).abs().max() < tolerance
    # a paged cache: (5 slots x 40 positions) as 25 blocks of 8 in a scattered order
    table = torch.randperm(25, generator=torch.Generator().manual_seed(0)).view(5, 5)[inputs[7].cpu()]
    paged = [torch.zeros(25, n_kv_head, 8, head_dim, dtype=dtype, device=DEVICE) for _ in range(2)]
    expected_paged = [t.double().cpu() for t in paged]
    rope_and_cache(*expected[:5], *expected_paged, table, expected[8], backend="torch")
    rope_and_cache(*inputs[:5], *paged, table.to(DEVICE), inputs[8], backend="triton")
    for ours, reference in zip(paged, expected_paged):
        assert (ours.double().cpu() - reference).abs().max() < tolerance


def column_major(t):
    """t's values with its last two dimensions laid out the other way round: a last stride other than 1."""
    return t.transpose(-1, -2).contiguous().transpose(-1, -2)


@pytest.mark.parametrize("bad", ["q", "k", "v", "cos", "value_cache_layout"])
def test_triton_refuses_layouts_it_cannot_read(bad):
    """The kernel reads every row with unit stride, cos and sin with one stride, and writes both caches at one
    offset: anything else must be refused, not read at the wrong addresses."""
    q, k, v, cos, signed_sin, k_cache, v_cache, slot_ids, positions = case(torch.float32, 4, 2, 16, "cpu")
    if bad in ("q", "k", "v"):
        q, k, v = (column_major(t) if name == bad else t for name, t in zip("qkv", (q, k, v)))
    elif bad == "cos":
        cos = torch.cat((cos, cos), dim=-1)[:, :16]  # rows twice as far apart as signed_sin's
    else:
        v_cache = v_cache.transpose(1, 2).contiguous().transpose(1, 2)  # same shape, other strides
    with pytest.raises(ValueError, match="unit last strides"):
        rope_and_cache(q, k, v, cos, signed_sin, k_cache, v_cache, slot_ids, positions, backend="triton")


@pytest.mark.skipif(not INTERPRETED, reason="the CPU run of the kernel decode path needs Triton's interpreter")
@pytest.mark.parametrize("family, autocast_dtype, tolerance", [("qwen2", None, 1e-5), ("qwen3", torch.float16, 2e-3)])
def test_model_decodes_the_same_through_the_kernels(tmp_path, monkeypatch, family, autocast_dtype, tolerance):
    """The model's kernel decode path (rope + cache write kernel, split-KV decode kernel, SiLU-multiply, residual add +
    RMSNorm) gives the greedy tokens of its torch path, run here through the interpreter: an fp32 model, and a Qwen3
    model (q/k norms) under fp16 autocast with fp32 weights, a mixed-precision set-up (train_grpo.py now samples from
    a bf16 copy on a GPU)."""
    from model import Transformer
    from sampler import generate

    write_hf_checkpoint(tmp_path, family=family, seed=4)
    model = Transformer.from_pretrained(tmp_path)
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12, 13], [3]]
    autocast = torch.autocast("cpu", dtype=autocast_dtype, enabled=autocast_dtype is not None)
    with autocast:
        through_torch = generate(model, prompts, max_new_tokens=12, temperature=0, logprobs_mode="raw")
        monkeypatch.setenv("ROPE_CACHE_BACKEND", "triton")
        monkeypatch.setenv("DECODE_ATTENTION_BACKEND", "triton")
        monkeypatch.setenv("SILU_MUL_BACKEND", "triton")
        monkeypatch.setenv("ADD_RMS_NORM_BACKEND", "triton")
        through_kernels = generate(model, prompts, max_new_tokens=12, temperature=0, logprobs_mode="raw")
        paged = generate(model, prompts, max_new_tokens=12, temperature=0, logprobs_mode="raw", block_size=4)
    assert [c.tokens for c in through_kernels] == [c.tokens for c in paged] == [c.tokens for c in through_torch]
    for a, b, c in zip(through_kernels, paged, through_torch):
        assert a.logprobs == pytest.approx(c.logprobs, abs=tolerance)
        assert b.logprobs == pytest.approx(c.logprobs, abs=tolerance)


COMPILE_SCRIPT = r"""
import json, os, sys
import triton
sys.path[:0] = [sys.argv[1], os.path.join(sys.argv[1], "tests")]
import kernels.rope_cache as K
from aot import compile_for

rows = []
for arch in (80, 90):
    for dtype in ("fp16", "bf16", "fp32"):
        for head_dim in (64, 128, 256):
            constants = dict(HEAD_DIM=head_dim, BLOCK_D=head_dim)
            signature = {arg: "constexpr" if arg in constants else "*i64" if arg in ("BLOCK_TABLE", "POSITIONS") else
                         "*" + dtype if arg.isupper() else "i32" for arg in K._rope_cache_kernel.arg_names}
            shared, usage = compile_for(K._rope_cache_kernel, signature, constants, arch, num_warps=1)
            rows.append(dict(arch=arch, dtype=dtype, head_dim=head_dim, shared=shared, usage=usage))
print(json.dumps(rows))
"""


def test_compiles_for_sm80_and_sm90_without_spills():
    rows = run_compile_script(COMPILE_SCRIPT, ROOT)
    assert len(rows) == 18
    for row in rows:
        assert_fits(row, f"rope_cache sm_{row['arch']} {row['dtype']} d={row['head_dim']}")
