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
The Triton forward kernel tiles (BLOCK_N tokens x BLOCK_V vocabulary entries) with an online log-sum-exp and the
online sums the entropy needs, and stores 3 floats per token: no logits at all. The backward recomputes the logits
a bounded chunk of tokens at a time with cuBLAS (logprob_backward says why), so its extra memory is one chunk (a
fixed budget, about 1 GiB by default) plus the fp32 weight gradient, whatever N is.
Tolerance vs the fp32 reference with bf16 inputs: |logp| error <= 2e-3; every logp <= 0 (clamped).
"""

import torch
from torch.utils.checkpoint import checkpoint

from kernels import choose_backend

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

IGNORE_INDEX = -100


def token_logprobs_naive(hidden, weight, targets, temperature=1.0, return_entropy=False, ignore_index=IGNORE_INDEX):
    logits = hidden @ weight.T  # (N, V)
    logprobs = torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature, dim=-1)
    valid = targets != ignore_index
    picked = logprobs.gather(-1, torch.where(valid, targets, 0)[:, None])[:, 0] * valid
    if not return_entropy:
        return picked
    entropy = -(logprobs.exp() * logprobs).sum(-1) * valid
    return picked, entropy


def _chunk(hidden, weight, targets, temperature, ignore_index, with_entropy):
    logits = hidden @ weight.T  # (C, V), then at least fp32 (float64 stays float64 for tests)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature
    logsumexp = torch.logsumexp(logits, dim=-1)
    valid = targets != ignore_index
    picked = (logits.gather(-1, torch.where(valid, targets, 0)[:, None])[:, 0] - logsumexp) * valid
    if not with_entropy:
        return picked, None
    entropy = (logsumexp - (torch.softmax(logits, dim=-1) * logits).sum(-1)) * valid
    return picked, entropy


def token_logprobs_ref(hidden, weight, targets, temperature=1.0, return_entropy=False, ignore_index=IGNORE_INDEX,
                       chunk_elements=2**23, chunk_size=None):
    """Chunks of tokens sized so that one chunk's logits hold about chunk_elements values (32 MiB in fp32)."""
    chunk_size = chunk_size or max(1, chunk_elements // weight.shape[0])
    picked, entropies = [], []
    needs_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    for start in range(0, hidden.shape[0], chunk_size):
        args = (hidden[start: start + chunk_size], weight, targets[start: start + chunk_size], temperature,
                ignore_index, return_entropy)
        p, e = checkpoint(_chunk, *args, use_reentrant=False) if needs_grad else _chunk(*args)
        picked.append(p)
        entropies.append(e)
    picked = torch.cat(picked) if picked else hidden.new_zeros(0, dtype=torch.float32)
    picked = picked.clamp(max=0.0)  # rounding must never make a log-prob positive (verl-project/verl#2656)
    if not return_entropy:
        return picked
    return picked, torch.cat(entropies) if entropies else picked.clone()


# -----------------------------------------------------------------------------
# Triton kernels

if triton is not None:

    @triton.jit
    def _logits_tile(H, W, offs_n, offs_v, n_ok, v_ok, N, V, D, inv_temperature,
                     BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr):
        """(BLOCK_N, BLOCK_V) tile of hidden @ weight.T / temperature, accumulated over D in fp32."""
        z = tl.zeros([BLOCK_N, BLOCK_V], dtype=tl.float32)
        offs_k = tl.arange(0, BLOCK_K)
        for k_start in range(0, D, BLOCK_K):
            k_ok = k_start + offs_k < D
            h = tl.load(H + offs_n[:, None] * D + k_start + offs_k[None, :], mask=n_ok[:, None] & k_ok[None, :],
                        other=0.0)  # (BLOCK_N, BLOCK_K)
            w = tl.load(W + offs_v[None, :] * D + k_start + offs_k[:, None], mask=v_ok[None, :] & k_ok[:, None],
                        other=0.0)  # (BLOCK_K, BLOCK_V)
            z += tl.dot(h, w)
        return z * inv_temperature

    @triton.jit
    def _logprob_forward_kernel(H, W, TARGETS, LOGP, ENTROPY, LSE, N, V, D, inv_temperature, ignore_index,
                                BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr):
        # program id: one block of BLOCK_N tokens; main loop over vocabulary tiles with an online log-sum-exp
        offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
        targets = tl.load(TARGETS + offs_n, mask=n_ok, other=ignore_index)
        running_max = tl.full([BLOCK_N], float("-inf"), dtype=tl.float32)
        sum_exp = tl.zeros([BLOCK_N], dtype=tl.float32)  # sum exp(z - running_max)
        sum_exp_z = tl.zeros([BLOCK_N], dtype=tl.float32)  # sum exp(z - running_max) * z, for the entropy
        target_z = tl.zeros([BLOCK_N], dtype=tl.float32)
        for v_start in range(0, V, BLOCK_V):
            offs_v = v_start + tl.arange(0, BLOCK_V)
            v_ok = offs_v < V
            z = _logits_tile(H, W, offs_n, offs_v, n_ok, v_ok, N, V, D, inv_temperature, BLOCK_N, BLOCK_V, BLOCK_K)
            z = tl.where(v_ok[None, :], z, float("-inf"))
            new_max = tl.maximum(running_max, tl.max(z, 1))
            rescale = tl.exp(running_max - new_max)
            p = tl.exp(z - new_max[:, None])
            sum_exp = sum_exp * rescale + tl.sum(p, 1)
            sum_exp_z = sum_exp_z * rescale + tl.sum(p * tl.where(v_ok[None, :], z, 0.0), 1)
            target_z += tl.sum(tl.where(offs_v[None, :] == targets[:, None], z, 0.0), 1)
            running_max = new_max
        # epilogue: log p(target) = z_target - lse (clamped at 0: rounding must never make it positive)
        lse = running_max + tl.log(sum_exp)
        valid = targets != ignore_index
        tl.store(LOGP + offs_n, tl.where(valid, tl.minimum(target_z - lse, 0.0), 0.0), mask=n_ok)
        tl.store(ENTROPY + offs_n, tl.where(valid, lse - sum_exp_z / sum_exp, 0.0), mask=n_ok)
        tl.store(LSE + offs_n, lse, mask=n_ok)


# -----------------------------------------------------------------------------
# launcher, autograd, dispatcher

def kernel_config(dtype):
    """Forward tiles that compile without register spills on sm_80 and sm_90 (tests/test_logprob.py checks it)."""
    fp32 = dtype == torch.float32
    return dict(BLOCK_N=64, BLOCK_V=64 if fp32 else 128, BLOCK_K=32 if fp32 else 64, num_warps=8, num_stages=3)


def logprob_forward(hidden, weight, targets, temperature=1.0, ignore_index=IGNORE_INDEX):
    N, D = hidden.shape
    V = weight.shape[0]
    logp = torch.empty(N, device=hidden.device, dtype=torch.float32)
    entropy, lse = torch.empty_like(logp), torch.empty_like(logp)
    config = kernel_config(hidden.dtype)
    _logprob_forward_kernel[(triton.cdiv(N, config["BLOCK_N"]),)](
        hidden, weight, targets, logp, entropy, lse, N, V, D, 1.0 / temperature, ignore_index, **config)
    return logp, entropy, lse


def logprob_backward(hidden, weight, targets, lse, entropy, grad_logp, grad_entropy, temperature, ignore_index,
                     chunk_elements=2**27):
    """Recomputes the logits a chunk of tokens at a time (cuBLAS matmuls), with the forward's lse and entropy:
    dlogp/dz = onehot - p;  dH/dz = -p (z - E_p[z]) with E_p[z] = lse - H. One chunk holds about chunk_elements
    fp32 logits (512 MiB by default), whatever N is. A fully tiled Triton backward with atomic adds (Cut
    Cross-Entropy's scheme) measured 8x slower than naive PyTorch on an H100 (README, performance), so the
    matmuls stay with cuBLAS."""
    N, V = hidden.shape[0], weight.shape[0]
    valid = targets != ignore_index
    grad_logp = torch.where(valid, grad_logp.float(), 0.0)
    grad_entropy = torch.where(valid, grad_entropy.float(), 0.0)
    dhidden = torch.empty_like(hidden)
    dweight = torch.zeros(weight.shape, device=weight.device, dtype=torch.float32)
    chunk = max(1, chunk_elements // V)
    for start in range(0, N, chunk):
        rows = slice(start, start + chunk)
        z = (hidden[rows] @ weight.T).float() / temperature  # (C, V)
        p = torch.exp(z - lse[rows, None])
        dz = z.sub_((lse[rows] - entropy[rows])[:, None]).mul_(p).mul_(-grad_entropy[rows, None])  # in place of z
        dz.addcmul_(p, grad_logp[rows, None], value=-1.0)
        del p
        picked = torch.where(valid[rows], targets[rows], 0)
        dz[torch.arange(dz.shape[0], device=dz.device), picked] += grad_logp[rows]
        dz = dz.div_(temperature).to(hidden.dtype)
        dhidden[rows] = dz @ weight
        dweight += (dz.T @ hidden[rows]).float()
    return dhidden, dweight.to(weight.dtype)


class FusedLogprob(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, ignore_index):
        hidden, weight, targets = hidden.contiguous(), weight.contiguous(), targets.contiguous()
        logp, entropy, lse = logprob_forward(hidden, weight, targets, temperature, ignore_index)
        ctx.save_for_backward(hidden, weight, targets, lse, entropy)
        ctx.temperature, ctx.ignore_index = temperature, ignore_index
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        hidden, weight, targets, lse, entropy = ctx.saved_tensors
        if grad_entropy is None:
            grad_entropy = torch.zeros_like(grad_logp)
        dhidden, dweight = logprob_backward(hidden, weight, targets, lse, entropy, grad_logp, grad_entropy,
                                            ctx.temperature, ctx.ignore_index)
        return dhidden, dweight, None, None, None


def token_logprobs(hidden, weight, targets, temperature=1.0, return_entropy=False, ignore_index=IGNORE_INDEX,
                   backend=None):
    """Public entry. backend: "auto" (Triton for CUDA tensors, the reference elsewhere), "triton", "torch";
    the LOGPROB_BACKEND environment variable sets the default."""
    if choose_backend("LOGPROB_BACKEND", hidden, backend) == "triton":
        if hidden.is_cuda and torch.is_autocast_enabled("cuda"):  # a custom Function is not autocast by itself
            dtype = torch.get_autocast_dtype("cuda")
            hidden, weight = hidden.to(dtype), weight.to(dtype)
        logp, entropy = FusedLogprob.apply(hidden, weight, targets, temperature, ignore_index)
        return (logp, entropy) if return_entropy else logp
    return token_logprobs_ref(hidden, weight, targets, temperature, return_entropy, ignore_index)


# -----------------------------------------------------------------------------
# exact KL between two models' next-token distributions (train_grpo.py --kl_estimator=full)


def _kl_chunk(hidden, weight, ref_hidden, ref_weight, temperature, direction):
    logp = torch.log_softmax((hidden @ weight.T).float() / temperature, dim=-1)  # (C, V) policy
    logq = torch.log_softmax((ref_hidden @ ref_weight.T).float() / temperature, dim=-1)  # (C, V) reference
    if direction == "reverse":
        return (logp.exp() * (logp - logq)).sum(-1)  # KL(pi || ref)
    return (logq.exp() * (logq - logp)).sum(-1)  # KL(ref || pi)


def kl_full(hidden, weight, ref_hidden, ref_weight, temperature=1.0, direction="reverse", chunk_size=None):
    """Exact per-token KL between the policy's and the reference's next-token distributions, over the whole
    vocabulary, in chunks of tokens recomputed in the backward (no (N, V) tensor is kept). (N,) float32."""
    if direction not in ("reverse", "forward"):
        raise ValueError(f"direction must be reverse or forward, not {direction!r}")
    chunk_size = chunk_size or max(1, 2**23 // weight.shape[0])
    needs_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    pieces = []
    for start in range(0, hidden.shape[0], chunk_size):
        args = (hidden[start: start + chunk_size], weight, ref_hidden[start: start + chunk_size], ref_weight,
                temperature, direction)
        pieces.append(checkpoint(_kl_chunk, *args, use_reentrant=False) if needs_grad else _kl_chunk(*args))
    return torch.cat(pieces)
