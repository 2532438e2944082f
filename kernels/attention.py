"""
Causal self-attention with grouped-query heads and packed variable-length sequences.

    out = softmax(q @ k^T * scale + mask) @ v

q (B, n_head, T, head_dim); k, v (B, n_kv_head, S, head_dim) with n_head a multiple of n_kv_head: each group of
n_head / n_kv_head query heads reads one key/value head, without copying K/V. Masks:
  causal=True               query i sees keys j <= i (S == T)
  cu_seqlens (n_docs + 1,)  int32 prefix sums of document lengths packed into one row (B == 1): no query sees a key
                            of another document, so several traces share a row with no padding
  attn_mask (B, 1, T, S)    boolean, True = visible (the sampler's cache: each row sees its own prefix)

`attention_ref` is the specification and the CPU path (torch's scaled_dot_product_attention with an explicit mask).
"""

import torch
import torch.nn.functional as F


def document_causal_mask(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """(total, total) boolean mask: same document and not in the future."""
    positions = torch.arange(total, device=cu_seqlens.device)
    document = torch.searchsorted(cu_seqlens[1:].to(torch.int64), positions, right=True)  # (total,)
    same_document = document[:, None] == document[None, :]
    return same_document & (positions[None, :] <= positions[:, None])


def attention_ref(q, k, v, causal=True, cu_seqlens=None, attn_mask=None, scale=None):
    B, n_head, T, head_dim = q.shape
    if cu_seqlens is not None:
        if B != 1:
            raise ValueError(f"packed sequences (cu_seqlens) need batch size 1, got {B}")
        if int(cu_seqlens[-1]) != T:
            raise ValueError(f"cu_seqlens ends at {int(cu_seqlens[-1])} but the row holds {T} tokens")
        attn_mask = document_causal_mask(cu_seqlens, T)[None, None]
        causal = False
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=attn_mask, is_causal=causal and attn_mask is None, scale=scale,
        enable_gqa=k.shape[1] != n_head,
    )


def attention(q, k, v, causal=True, cu_seqlens=None, attn_mask=None, scale=None):
    """Public entry the model calls."""
    return attention_ref(q, k, v, causal=causal, cu_seqlens=cu_seqlens, attn_mask=attn_mask, scale=scale)
