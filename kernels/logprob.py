"""
Per-token log-probabilities (and entropy) straight from the LM head, never materialising (N, V) logits.

    logp[n]    = log softmax(hidden[n] @ weight.T / temperature)[targets[n]]
    entropy[n] = -sum_v p[n, v] log p[n, v]                    with p = softmax(hidden[n] @ weight.T / temperature)

hidden (N, D) final hidden states, weight (V, D) the LM head, targets (N,) token ids; targets equal to
ignore_index give logp 0, entropy 0 and no gradient. Outputs are float32; gradients flow to hidden and weight
(through the entropy too, so an entropy bonus can be trained).

Why: Qwen2.5's vocabulary has 151,936 entries, so 8 sequences of 8k tokens give 65k x 152k logits: 20 GB in bf16,
40 GB in fp32, before their gradient. Working in chunks of tokens (here) or tiles of the vocabulary (the Triton
kernel) keeps the extra memory independent of N x V.

`token_logprobs_naive` is the one-line oracle for tests. `token_logprobs_ref` is the CPU path: chunks of tokens,
each recomputed in the backward (activation checkpointing), so peak extra memory is one chunk's logits.
"""

import torch
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100


def token_logprobs_naive(hidden, weight, targets, temperature=1.0, return_entropy=False, ignore_index=IGNORE_INDEX):
    logprobs = torch.log_softmax((hidden @ weight.T).float() / temperature, dim=-1)  # (N, V)
    valid = targets != ignore_index
    picked = logprobs.gather(-1, torch.where(valid, targets, 0)[:, None])[:, 0] * valid
    if not return_entropy:
        return picked
    entropy = -(logprobs.exp() * logprobs).sum(-1) * valid
    return picked, entropy


def _chunk(hidden, weight, targets, temperature, ignore_index):
    logits = (hidden @ weight.T).float() / temperature  # (C, V)
    logsumexp = torch.logsumexp(logits, dim=-1)
    valid = targets != ignore_index
    picked = (logits.gather(-1, torch.where(valid, targets, 0)[:, None])[:, 0] - logsumexp) * valid
    probs = torch.softmax(logits, dim=-1)
    entropy = (logsumexp - (probs * logits).sum(-1)) * valid
    return picked, entropy


def token_logprobs_ref(hidden, weight, targets, temperature=1.0, return_entropy=False, ignore_index=IGNORE_INDEX,
                       chunk_size=1024):
    picked, entropies = [], []
    needs_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    for start in range(0, hidden.shape[0], chunk_size):
        args = (hidden[start: start + chunk_size], weight, targets[start: start + chunk_size], temperature,
                ignore_index)
        p, e = checkpoint(_chunk, *args, use_reentrant=False) if needs_grad else _chunk(*args)
        picked.append(p)
        entropies.append(e)
    picked = torch.cat(picked) if picked else hidden.new_zeros(0, dtype=torch.float32)
    if not return_entropy:
        return picked
    return picked, torch.cat(entropies) if entropies else picked.clone()


def token_logprobs(hidden, weight, targets, temperature=1.0, return_entropy=False, ignore_index=IGNORE_INDEX,
                   backend="auto"):
    """Public entry. backend: "auto" (Triton on CUDA when available, else the reference), "triton", "torch"."""
    if backend not in ("auto", "torch", "triton"):
        raise ValueError(f"backend must be auto, torch or triton, not {backend!r}")
    return token_logprobs_ref(hidden, weight, targets, temperature, return_entropy, ignore_index)


def _kl_chunk(hidden, weight, ref_hidden, ref_weight, temperature, direction):
    logp = torch.log_softmax((hidden @ weight.T).float() / temperature, dim=-1)  # (C, V) policy
    logq = torch.log_softmax((ref_hidden @ ref_weight.T).float() / temperature, dim=-1)  # (C, V) reference
    if direction == "reverse":
        return (logp.exp() * (logp - logq)).sum(-1)  # KL(pi || ref)
    return (logq.exp() * (logq - logp)).sum(-1)  # KL(ref || pi)


def kl_full(hidden, weight, ref_hidden, ref_weight, temperature=1.0, direction="reverse", chunk_size=1024):
    """Exact per-token KL between the policy's and the reference's next-token distributions, over the whole
    vocabulary, in chunks of tokens recomputed in the backward (no (N, V) tensor is kept). (N,) float32."""
    if direction not in ("reverse", "forward"):
        raise ValueError(f"direction must be reverse or forward, not {direction!r}")
    needs_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    pieces = []
    for start in range(0, hidden.shape[0], chunk_size):
        args = (hidden[start: start + chunk_size], weight, ref_hidden[start: start + chunk_size], ref_weight,
                temperature, direction)
        pieces.append(checkpoint(_kl_chunk, *args, use_reentrant=False) if needs_grad else _kl_chunk(*args))
    return torch.cat(pieces)
