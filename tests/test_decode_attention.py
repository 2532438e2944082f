# python -m pytest tests/test_decode_attention.py -q      (on CPU the Triton kernel runs in Triton's interpreter)
import os

import pytest
import torch

from aot import assert_fits, run_compile_script
from conftest import ROOT
from kernels.decode_attention import decode_attention, decode_attention_ref, gather_blocks

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if torch.cuda.is_available() and not INTERPRETED else "cpu"


def test_reference_matches_the_models_masked_attention():
    from kernels.attention import attention_ref

    torch.manual_seed(0)
    q = torch.randn(3, 4, 16, dtype=torch.float64)
    k, v = torch.randn(5, 2, 30, 16, dtype=torch.float64), torch.randn(5, 2, 30, 16, dtype=torch.float64)
    slots, lengths = torch.tensor([4, 0, 2]), torch.tensor([30, 1, 17])
    visible = (torch.arange(30)[None, :] < lengths[:, None])[:, None, None]  # (B, 1, 1, S)
    expected = attention_ref(q[:, :, None], k[slots], v[slots], causal=False, attn_mask=visible)[:, :, 0]
    assert torch.allclose(decode_attention_ref(q, k, v, slots, lengths), expected, atol=1e-12)


def paged(cache, block_size, seed):
    """The same keys (slots, kv_heads, max_len, head_dim) cut into blocks of block_size, shuffled (by seed) into a
    paged cache with a spare block 0 of noise: returns the paged cache and each slot's block table."""
    generator = torch.Generator().manual_seed(seed)
    slots, kv_heads, max_len, head_dim = cache.shape
    per_slot = -(-max_len // block_size)
    padded = torch.nn.functional.pad(cache, (0, 0, 0, per_slot * block_size - max_len))
    blocks = padded.view(slots, kv_heads, per_slot, block_size, head_dim).transpose(1, 2).reshape(
        slots * per_slot, kv_heads, block_size, head_dim)
    order = torch.randperm(slots * per_slot, generator=generator)
    pool = torch.randn((1 + slots * per_slot, kv_heads, block_size, head_dim), generator=generator).to(cache)
    pool[1 + order] = blocks
    return pool, (1 + order).view(slots, per_slot)


def test_paged_reference_equals_the_contiguous_one():
    """Keys scattered over shuffled blocks (any block size, a partial last block) give the attention of the same keys
    in one row per sequence; gather_blocks puts them back in position order."""
    generator = torch.Generator().manual_seed(1)
    q = torch.randn(3, 4, 16, dtype=torch.float64, generator=generator)
    k, v = (torch.randn(5, 2, 30, 16, dtype=torch.float64, generator=generator) for _ in range(2))
    slots, lengths = torch.tensor([4, 0, 2]), torch.tensor([30, 1, 17])
    expected = decode_attention_ref(q, k, v, slots, lengths)
    for block_size in (1, 4, 7, 30):
        (k_pool, table), (v_pool, _) = paged(k, block_size, block_size), paged(v, block_size, block_size)
        assert torch.equal(gather_blocks(k_pool, table[slots])[:, :, :30], k[slots])
        out = decode_attention_ref(q, k_pool, v_pool, table[slots], lengths)
        assert torch.allclose(out, expected, atol=1e-12), block_size


@pytest.mark.skipif(not (INTERPRETED or torch.cuda.is_available()), reason="needs a GPU or TRITON_INTERPRET=1")
@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.float16, 3e-3)])
@pytest.mark.parametrize("heads, kv_heads, head_dim, max_len", [(4, 2, 64, 1100), (12, 2, 128, 70), (2, 2, 80, 600)])
def test_triton_matches_reference_in_float64(dtype, tolerance, heads, kv_heads, head_dim, max_len):
    torch.manual_seed(head_dim)
    slots_total, batch = 6, 4
    k = torch.randn(slots_total, kv_heads, max_len, head_dim, dtype=dtype, device=DEVICE)
    v = torch.randn(slots_total, kv_heads, max_len, head_dim, dtype=dtype, device=DEVICE)
    q = torch.randn(batch, heads, head_dim, dtype=dtype, device=DEVICE)
    slots = torch.tensor([5, 0, 3, 1], device=DEVICE)
    lengths = torch.tensor([1, max_len, 7, max_len // 2 + 3], device=DEVICE)  # 1, full, short, odd
    out = decode_attention(q, k, v, slots, lengths, backend="triton")
    expected = decode_attention_ref(q.double().cpu(), k.double().cpu(), v.double().cpu(), slots.cpu(), lengths.cpu())
    assert out.dtype == dtype and (out.double().cpu() - expected).abs().max() < tolerance
    # the same keys in shuffled blocks smaller than, equal to and not dividing the kernel's tiles
    for block_size in (16, 7, 64):
        (k_pool, table), (v_pool, _) = paged(k.cpu(), block_size, block_size), paged(v.cpu(), block_size, block_size)
        out = decode_attention(q, k_pool.to(DEVICE), v_pool.to(DEVICE), table[slots.cpu()].to(DEVICE), lengths,
                               backend="triton")
        assert (out.double().cpu() - expected).abs().max() < tolerance, block_size


@pytest.mark.skipif(not (INTERPRETED or torch.cuda.is_available()), reason="needs a GPU or TRITON_INTERPRET=1")
def test_an_explicit_scale_reaches_the_reference_and_the_kernel():
    """decode_attention(scale=...) is a public argument (the model passes none, so every other test takes
    head_dim ** -0.5): both paths must use it, as the training attention does."""
    from kernels.attention import attention_ref

    generator = torch.Generator().manual_seed(3)
    q = torch.randn(3, 4, 16, dtype=torch.float64, generator=generator)
    k, v = (torch.randn(5, 2, 30, 16, dtype=torch.float64, generator=generator) for _ in range(2))
    slots, lengths = torch.tensor([4, 0, 2]), torch.tensor([30, 1, 17])
    visible = (torch.arange(30)[None, :] < lengths[:, None])[:, None, None]
    expected = attention_ref(q[:, :, None], k[slots], v[slots], causal=False, attn_mask=visible, scale=0.3)[:, :, 0]
    assert torch.allclose(decode_attention_ref(q, k, v, slots, lengths, scale=0.3), expected, atol=1e-12)
    to = lambda t: t.float().to(DEVICE)
    out = decode_attention(to(q), to(k), to(v), slots.to(DEVICE), lengths.to(DEVICE), scale=0.3, backend="triton")
    assert (out.double().cpu() - expected).abs().max() < 1e-5


@pytest.mark.skipif(not (INTERPRETED or torch.cuda.is_available()), reason="needs a GPU or TRITON_INTERPRET=1")
def test_triton_matches_the_reference_when_every_score_is_far_below_zero():
    """Softmax does not care where the scores sit, so a row whose every score is about -200 must give the
    reference's output. A short cache is one split, padded to two in the merge: the padding split must weigh 0 (a
    max of -inf), not sit at 0 above the real split's max, or the real split's weight 2^(max - 0) = 2^-289 underflows
    to 0 and the output is 0 / 0."""
    generator = torch.Generator().manual_seed(4)
    k = -5 - 0.01 * torch.rand(2, 2, 40, 16, generator=generator)  # against a query of +10: scores ~ -200
    v = torch.randn(2, 2, 40, 16, generator=generator)
    q = torch.full((2, 4, 16), 10.0)
    slots, lengths = torch.tensor([1, 0]), torch.tensor([40, 9])
    expected = decode_attention_ref(q.double(), k.double(), v.double(), slots, lengths)
    out = decode_attention(q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), slots.to(DEVICE), lengths.to(DEVICE),
                           backend="triton")
    assert not out.isnan().any() and (out.double().cpu() - expected).abs().max() < 1e-4


@pytest.mark.skipif(not (INTERPRETED or torch.cuda.is_available()), reason="needs a GPU or TRITON_INTERPRET=1")
def test_triton_reads_the_key_and_the_value_cache_each_in_its_own_layout():
    """Every other test builds both caches alike, so a kernel reading the values with the keys' strides would pass
    them; a last stride other than 1, which the kernel cannot read, is refused."""
    generator = torch.Generator().manual_seed(5)
    k = torch.randn(5, 2, 40, 16, generator=generator)
    v = torch.randn(5, 40, 3, 16, generator=generator)[:, :, :2].transpose(1, 2)  # (5, 2, 40, 16), other strides
    assert k.stride() != v.stride() and v.stride(-1) == 1
    q = torch.randn(3, 4, 16, generator=generator)
    slots, lengths = torch.tensor([4, 0, 2]), torch.tensor([40, 1, 17])
    expected = decode_attention_ref(q.double(), k.double(), v.double(), slots, lengths)
    to = lambda t: t.to(DEVICE)
    out = decode_attention(to(q), to(k), to(v), to(slots), to(lengths), backend="triton")
    assert (out.double().cpu() - expected).abs().max() < 1e-5
    column_major = torch.randn(5, 2, 16, 40, generator=generator).transpose(-1, -2)
    strided_q = torch.randn(3, 16, 4, generator=generator).transpose(-1, -2)
    for bad in ((strided_q, k, v), (q, column_major, v), (q, k, column_major)):
        with pytest.raises(ValueError, match="unit last stride"):
            decode_attention(*map(to, bad), to(slots), to(lengths), backend="triton")


@pytest.mark.skipif(not (INTERPRETED or torch.cuda.is_available()), reason="needs a GPU or TRITON_INTERPRET=1")
def test_triton_reaches_blocks_past_2_to_the_31_elements_through_an_int32_table():
    """A block's offset is its index times the block stride: past 2^31 elements (a large paged cache on a big card)
    it must be computed in int64 even when the table is int32 (an int32 product wraps to a negative offset, before
    the cache). torch.empty's pages cost no memory until written, so the cache of 2^31 + 4096 fp16 elements holds
    only the few blocks used."""
    n_blocks = 2 ** 21 + 4  # 1024 elements a block: the last blocks start past 2^31
    cache = torch.empty(n_blocks, 1, 16, 64, dtype=torch.float16, device=DEVICE)
    generator = torch.Generator().manual_seed(0)
    table = torch.tensor([[n_blocks - 3, n_blocks - 1], [1, n_blocks - 2]], dtype=torch.int32)
    used = table.flatten().long()
    cache[used.to(DEVICE)] = torch.randn(len(used), 1, 16, 64, generator=generator).half().to(DEVICE)
    q = torch.randn(2, 2, 64, generator=generator).half()
    lengths = torch.tensor([30, 20], dtype=torch.int32)
    small = cache[used.to(DEVICE)].cpu()  # the same keys in a cache of four blocks
    small_table = torch.arange(4, dtype=torch.int32).view(2, 2)
    expected = decode_attention_ref(q.double(), small.double(), small.double(), small_table, lengths)
    out = decode_attention(q.to(DEVICE), cache, cache, table.to(DEVICE), lengths.to(DEVICE), backend="triton")
    assert (out.double().cpu() - expected).abs().max() < 3e-3


def test_triton_refuses_a_block_table_without_a_unit_last_stride():
    """The kernel reads a sequence's blocks at table + position // block_size: a strided table (a slice of every
    other column) would read the wrong blocks, so the launcher refuses it instead."""
    q = torch.randn(2, 4, 16)
    cache = torch.randn(9, 2, 4, 16)
    table = torch.arange(1, 9).view(2, 4)[:, ::2]  # (2, 2), strides (4, 2)
    with pytest.raises(ValueError, match="unit last stride"):
        decode_attention(q, cache, cache, table, torch.tensor([8, 5]), backend="triton")


COMPILE_SCRIPT = r"""
import json, os, sys
import torch
import triton
sys.path[:0] = [sys.argv[1], os.path.join(sys.argv[1], "tests")]
import kernels.decode_attention as K
from aot import compile_for

rows = []
for arch in (80, 90):
    for dtype in ("fp16", "bf16", "fp32"):
        for head_dim, group in ((64, 7), (128, 6), (128, 8)):
            config = K.decode_config(head_dim, 32768, getattr(torch, {"fp16": "float16", "bf16": "bfloat16",
                                                                      "fp32": "float32"}[dtype]))
            constants = dict(GROUP=group, BLOCK_G=max(16, triton.next_power_of_2(group)), HEAD_DIM=head_dim,
                             BLOCK_D=config["BLOCK_D"], BLOCK_N=config["BLOCK_N"],
                             PRECISION="ieee" if dtype == "fp32" else "tf32")
            signature = {}
            for arg in K._decode_partial_kernel.arg_names:
                if arg in constants:
                    signature[arg] = "constexpr"
                elif arg in ("Q", "K", "V"):
                    signature[arg] = "*" + dtype
                elif arg in ("BLOCK_TABLE", "LENGTHS"):
                    signature[arg] = "*i64"
                elif arg.startswith("PART"):
                    signature[arg] = "*fp32"
                elif arg == "scale_log2":
                    signature[arg] = "fp32"
                else:
                    signature[arg] = "i32"
            shared, usage = compile_for(K._decode_partial_kernel, signature, constants, arch, config["num_warps"])
            rows.append(dict(arch=arch, dtype=dtype, head_dim=head_dim, shared=shared, usage=usage))
        merge_constants = dict(HEAD_DIM=128, BLOCK_D=128, BLOCK_S=64)
        signature = {arg: "constexpr" if arg in merge_constants else "*" + dtype if arg == "OUT" else
                     "*fp32" if arg.startswith("PART") else "i32" for arg in K._decode_merge_kernel.arg_names}
        shared, usage = compile_for(K._decode_merge_kernel, signature, merge_constants, arch, 4)
        rows.append(dict(arch=arch, dtype=dtype, head_dim="merge", shared=shared, usage=usage))
print(json.dumps(rows))
"""


def test_compiles_for_sm80_and_sm90_without_spills():
    rows = run_compile_script(COMPILE_SCRIPT, ROOT)
    assert len(rows) == 24
    for row in rows:
        assert_fits(row, f"decode sm_{row['arch']} {row['dtype']} d={row['head_dim']}")
