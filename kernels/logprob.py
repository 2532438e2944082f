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

`token_logprobs_naive` is the one-line oracle for tests. `token_logprobs_ref` is the CPU path (ChunkedLogprob, a
custom autograd Function): chunks of tokens whose logits fill one reused buffer of at most CPU_CHUNK_BYTES (32 MiB),
reduced to log-sum-exp, target logit and entropy; only the inputs and 1-2 floats per token are saved, and the
backward recomputes each chunk's logits and accumulates the hidden and weight gradients chunk by chunk. Peak extra
memory: one or two chunk buffers plus the weight gradient (N=4096, V=151,936, D=64, fp32, fwd+bwd: 79 MiB vs the
naive 7.0 GiB, 0.011x; bench/logprob.py --memory). kl_full (exact KL) works the same way (ChunkedKL).
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


CPU_CHUNK_BYTES = 32 * 2**20  # the CPU path's working buffers: (chunk x V) floats of at most this many bytes each


def _chunk_rows(weight, chunk_size, chunk_bytes):
    itemsize = torch.promote_types(weight.dtype, torch.float32).itemsize
    return chunk_size or max(1, (chunk_bytes or CPU_CHUNK_BYTES) // (weight.shape[0] * itemsize))


def _chunk_logits(hidden, weight, temperature, out):
    """out[:] = hidden @ weight.T / temperature, into a preallocated (C, V) buffer of at least fp32; returns it with
    the rows' hidden states in that dtype, divided by the temperature (for the weight gradient)."""
    scaled = hidden.to(out.dtype) if temperature == 1 else hidden.to(out.dtype) / temperature  # (C, D): cheap
    if hidden.dtype == out.dtype:
        return torch.mm(scaled, weight.T, out=out), scaled  # the temperature folded into the small operand
    out.copy_(hidden @ weight.T)  # bf16/fp16 matmul, then fp32 (as the naive path rounds)
    return (out if temperature == 1 else out.div_(temperature)), scaled


class ChunkedLogprob(torch.autograd.Function):
    """The CPU path. Forward: chunks of rows, each chunk's logits z = (h / temperature) @ W.T written into one
    reused (C, V) buffer, reduced to the target's log-prob, the log-sum-exp and (when asked) the entropy. Saves only
    hidden, weight, targets and 1-2 floats per row. Backward: recomputes each chunk's logits into the same kind of
    buffer, turns them in place into dL/dz = g_logp (onehot - p) - g_entropy p (log p + H), and accumulates
    grad_hidden[rows] = dz @ W / temperature and grad_weight += dz.T @ h / temperature. Peak extra memory: one or
    two (C, V) buffers plus grad_weight, whatever N is. The buffers are allocated once per call, not per chunk:
    glibc keeps freed ~32 MiB blocks (its mmap threshold grows to 32 MiB) and the old per-chunk
    checkpoint loop grew the resident set by ~1.4 chunks per chunk (0.49x naive at N=4096, V=151,936)."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, ignore_index, with_entropy, chunk):
        N, V = hidden.shape[0], weight.shape[0]
        dtype = torch.promote_types(hidden.dtype, torch.float32)  # float64 stays float64 (tests)
        valid = targets != ignore_index
        picked_index = torch.where(valid, targets, 0)[:, None]
        logp = torch.empty(N, dtype=dtype, device=hidden.device)
        lse = torch.empty(N, dtype=dtype, device=hidden.device)
        entropy = torch.empty(N, dtype=dtype, device=hidden.device) if with_entropy else None
        z_buffer = torch.empty(min(chunk, N), V, dtype=dtype, device=hidden.device)
        p_buffer = torch.empty_like(z_buffer) if with_entropy else None
        for start in range(0, N, chunk):
            rows = slice(start, start + chunk)
            z, _ = _chunk_logits(hidden[rows], weight, temperature, z_buffer[: len(hidden[rows])])
            target_z = z.gather(1, picked_index[rows])[:, 0]
            z_max = z.amax(1, keepdim=True)
            z.sub_(z_max)
            if with_entropy:  # H = log s - sum(e (z - max)) / s with e = exp(z - max), s = sum(e)
                e = torch.exp(z, out=p_buffer[: z.shape[0]])
                sum_e = e.sum(1)
                entropy[rows] = sum_e.log() - e.mul_(z).sum(1) / sum_e
            else:
                sum_e = z.exp_().sum(1)
            lse[rows] = z_max[:, 0] + sum_e.log()
            logp[rows] = target_z - lse[rows]
        logp = logp.clamp_(max=0.0).mul_(valid)  # rounding must never make a log-prob positive (verl#2656)
        ctx.save_for_backward(hidden, weight, picked_index, valid, lse, entropy)
        ctx.temperature, ctx.chunk = temperature, chunk
        ctx.set_materialize_grads(False)
        if not with_entropy:
            return logp
        return logp, entropy * valid

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_logp, grad_entropy=None):
        hidden, weight, picked_index, valid, lse, entropy = ctx.saved_tensors
        temperature, chunk = ctx.temperature, ctx.chunk
        N, V = hidden.shape[0], weight.shape[0]
        dtype = lse.dtype
        zeros = torch.zeros(N, dtype=dtype, device=hidden.device)
        g_logp = zeros if grad_logp is None else torch.where(valid, grad_logp.to(dtype), 0.0)
        with_entropy = grad_entropy is not None
        if with_entropy:  # dH/dz = -p (log p + H): dz = a log p + b, times p, with a = -g_H, b = -g_H H - g_logp
            g_entropy = torch.where(valid, grad_entropy.to(dtype), 0.0)
            a, b = -g_entropy, -g_entropy * entropy - g_logp
        need_hidden, need_weight = ctx.needs_input_grad[:2]
        weight_c = weight.to(dtype)  # a copy only for bf16/fp16 weights
        grad_hidden = torch.empty(hidden.shape, dtype=dtype, device=hidden.device) if need_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=dtype, device=weight.device) if need_weight else None
        z_buffer = torch.empty(min(chunk, N), V, dtype=dtype, device=hidden.device)
        p_buffer = torch.empty_like(z_buffer) if with_entropy else None
        for start in range(0, N, chunk):
            rows = slice(start, start + chunk)
            C = len(hidden[rows])
            z, h = _chunk_logits(hidden[rows], weight, temperature, z_buffer[:C])
            z.sub_(lse[rows, None])  # log p
            if with_entropy:
                p = torch.exp(z, out=p_buffer[:C])
                dz = z.mul_(a[rows, None]).add_(b[rows, None]).mul_(p)
            else:
                dz = z.exp_().mul_(-g_logp[rows, None])
            dz[torch.arange(C, device=dz.device), picked_index[rows, 0]] += g_logp[rows]
            if need_hidden:
                torch.mm(dz, weight_c, out=grad_hidden[rows])
                if temperature != 1:
                    grad_hidden[rows] /= temperature
            if need_weight:
                grad_weight.addmm_(dz.T, h)
        grad_hidden = grad_hidden.to(hidden.dtype) if need_hidden else None
        grad_weight = grad_weight.to(weight.dtype) if need_weight else None
        return grad_hidden, grad_weight, None, None, None, None, None


def token_logprobs_ref(hidden, weight, targets, temperature=1.0, return_entropy=False, ignore_index=IGNORE_INDEX,
                       chunk_bytes=None, chunk_size=None):
    """The CPU path (ChunkedLogprob): chunks of rows whose (chunk x V) fp32 logits hold at most chunk_bytes
    (CPU_CHUNK_BYTES, 32 MiB, by default); chunk_size forces a number of rows instead (tests)."""
    chunk = _chunk_rows(weight, chunk_size, chunk_bytes)
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):  # a custom Function is not autocast by itself
        dtype = torch.get_autocast_dtype(device_type)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
    with torch.autocast(device_type, enabled=False):
        result = ChunkedLogprob.apply(hidden.contiguous(), weight.contiguous(), targets.contiguous(), temperature,
                                      ignore_index, return_entropy, chunk)
    return result


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


def _log_softmax_(z, scratch):
    """z (C, V) -> log softmax(z) in place, using scratch (same shape) for exp; returns z and the log-sum-exp."""
    z_max = z.amax(1, keepdim=True)
    z.sub_(z_max)
    log_sum = torch.exp(z, out=scratch).sum(1, keepdim=True).log_()
    return z.sub_(log_sum), (z_max + log_sum)[:, 0]


class ChunkedKL(torch.autograd.Function):
    """kl_full's path: like ChunkedLogprob, chunks of rows in reused (C, V) buffers (3 in the forward, 2 in the
    backward), saving only the inputs and 3 floats per row; the backward recomputes both models' log-probs.
    d KL(pi||ref) / dz = p (log p - log q - KL);  d KL(ref||pi) / dz = p - q  (z: the policy's logits)."""

    @staticmethod
    def forward(ctx, hidden, weight, ref_hidden, ref_weight, temperature, direction, chunk):
        N, V = hidden.shape[0], weight.shape[0]
        dtype = torch.promote_types(hidden.dtype, torch.float32)
        kl, lse_p, lse_q = (torch.empty(N, dtype=dtype, device=hidden.device) for _ in range(3))
        buffers = [torch.empty(min(chunk, N), V, dtype=dtype, device=hidden.device) for _ in range(3)]
        for start in range(0, N, chunk):
            rows = slice(start, start + chunk)
            logp, logq, scratch = (b[: len(hidden[rows])] for b in buffers)
            logp, lse_p[rows] = _log_softmax_(_chunk_logits(hidden[rows], weight, temperature, logp)[0], scratch)
            logq, lse_q[rows] = _log_softmax_(_chunk_logits(ref_hidden[rows], ref_weight, temperature, logq)[0],
                                              scratch)
            if direction == "reverse":  # sum p (log p - log q)
                kl[rows] = torch.exp(logp, out=scratch).mul_(logq.neg_().add_(logp)).sum(1)
            else:  # sum q (log q - log p)
                kl[rows] = torch.exp(logq, out=scratch).mul_(logp.neg_().add_(logq)).sum(1)
        ctx.save_for_backward(hidden, weight, ref_hidden, ref_weight, lse_p, lse_q, kl)
        ctx.temperature, ctx.direction, ctx.chunk = temperature, direction, chunk
        return kl

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_kl):
        hidden, weight, ref_hidden, ref_weight, lse_p, lse_q, kl = ctx.saved_tensors
        temperature, chunk, N, V = ctx.temperature, ctx.chunk, hidden.shape[0], weight.shape[0]
        dtype = kl.dtype
        grad_kl = grad_kl.to(dtype)
        need_hidden, need_weight = ctx.needs_input_grad[:2]
        weight_c = weight.to(dtype)
        grad_hidden = torch.empty(hidden.shape, dtype=dtype, device=hidden.device) if need_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=dtype, device=weight.device) if need_weight else None
        buffers = [torch.empty(min(chunk, N), V, dtype=dtype, device=hidden.device) for _ in range(2)]
        for start in range(0, N, chunk):
            rows = slice(start, start + chunk)
            C = len(hidden[rows])
            logp, h = _chunk_logits(hidden[rows], weight, temperature, buffers[0][:C])
            logp.sub_(lse_p[rows, None])
            logq = _chunk_logits(ref_hidden[rows], ref_weight, temperature, buffers[1][:C])[0].sub_(lse_q[rows, None])
            if ctx.direction == "reverse":
                difference = logq.neg_().add_(logp).sub_(kl[rows, None])  # log p - log q - KL
                dz = logp.exp_().mul_(difference)
            else:
                dz = logp.exp_().sub_(logq.exp_())  # p - q
            dz.mul_(grad_kl[rows, None])
            if need_hidden:
                torch.mm(dz, weight_c, out=grad_hidden[rows])
                if temperature != 1:
                    grad_hidden[rows] /= temperature
            if need_weight:
                grad_weight.addmm_(dz.T, h)
        grad_hidden = grad_hidden.to(hidden.dtype) if need_hidden else None
        grad_weight = grad_weight.to(weight.dtype) if need_weight else None
        return grad_hidden, grad_weight, None, None, None, None, None


def kl_full(hidden, weight, ref_hidden, ref_weight, temperature=1.0, direction="reverse", chunk_size=None):
    """Exact per-token KL between the policy's and the reference's next-token distributions, over the whole
    vocabulary, in chunks of tokens recomputed in the backward (no (N, V) tensor is kept). (N,) float32.
    Gradients flow to the policy (hidden, weight) through ChunkedKL; a reference that requires grad takes the
    slower checkpointed loop (gradients to all four)."""
    if direction not in ("reverse", "forward"):
        raise ValueError(f"direction must be reverse or forward, not {direction!r}")
    chunk_size = _chunk_rows(weight, chunk_size, None)
    needs_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    if not (torch.is_grad_enabled() and (ref_hidden.requires_grad or ref_weight.requires_grad)):
        device_type = hidden.device.type
        if torch.is_autocast_enabled(device_type):  # a custom Function is not autocast by itself
            dtype = torch.get_autocast_dtype(device_type)
            hidden, weight, ref_hidden, ref_weight = (t.to(dtype) for t in (hidden, weight, ref_hidden, ref_weight))
        with torch.autocast(device_type, enabled=False):
            return ChunkedKL.apply(hidden.contiguous(), weight.contiguous(), ref_hidden.contiguous(),
                                   ref_weight.contiguous(), temperature, direction, chunk_size)
    pieces = []
    for start in range(0, hidden.shape[0], chunk_size):
        args = (hidden[start: start + chunk_size], weight, ref_hidden[start: start + chunk_size], ref_weight,
                temperature, direction)
        pieces.append(checkpoint(_kl_chunk, *args, use_reentrant=False) if needs_grad else _kl_chunk(*args))
    return torch.cat(pieces)
