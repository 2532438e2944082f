"""
KV-cached batched sampling with continuous batching, on token ids only (no tokenizer, no rewards).

    completions = generate(model, [[1, 2, 3], [4, 5]], max_new_tokens=256, temperature=1.0, n=8,
                           stop_token_ids=tok.eos_token_ids, seed=0)
    completions[0].tokens, completions[0].logprobs, completions[0].finish_reason, completions[0].prompt_index

We sample with the training model itself: the weights are always current (no second engine to sync) and the
log-probs come from the same forward code the trainer uses.

How it works
  - One preallocated cache (layers x slots x kv_heads x max_len x head_dim), sized from the model before it is
    allocated; a request that cannot fit is refused with the number of bytes it needs.
  - A prompt is admitted when n slots are free: its prompt is prefilled once (prompts admitted together are
    packed back to back on a GPU, right-padded on CPU) and the cache rows are copied to its n slots.
  - Every step decodes one token for every active slot, each at its own position; `sync_every` steps run on the
    device before the host reads their tokens. A finished sequence frees its slot at the end of that run and the
    next pending prompt takes it (continuous batching): no batch waits for its longest row.
  - On a GPU, decoding goes through the Triton kernels of kernels/rope_cache.py and kernels/decode_attention.py,
    and with cuda_graph=True (train_grpo.py's and eval.py's default) a step (forward, sampling, bookkeeping) is
    one captured CUDA graph.

Log-probs: by default each returned log-prob is that of the distribution actually sampled from (after temperature,
top-k and top-p). logprobs_mode="raw" returns the untruncated temperature-1 log-probs instead. train_grpo.py
recomputes its old log-probs with the trainer at the sampling temperature without truncation (the standard
choice: the policy gradient is taken w.r.t. the full softmax) and uses these only to report the mismatch.
"""

import gc
from collections import deque
from dataclasses import dataclass, field

import torch

from model import CacheView, KVCache, Transformer


@dataclass
class Completion:
    prompt_index: int
    tokens: list = field(default_factory=list)  # sampled ids, the stop token included when it stopped
    logprobs: list = field(default_factory=list)  # one per token
    finish_reason: str = ""  # "stop" | "length"


def sample_next(logits, temperature=1.0, top_k=0, top_p=1.0, generator=None, logprobs_mode="sampled",
                uniform=None):
    """logits (B, V) float -> (tokens (B,), logprobs (B,)). temperature 0 is greedy (its log-prob is the
    temperature-1 one). Top-k keeps the k largest logits; top-p the smallest set whose probability reaches p.
    uniform: (B, V) uniform draws to use instead of drawing them here (a CUDA graph reads them from a buffer)."""
    logits = logits.float()
    if temperature == 0:
        tokens = logits.max(dim=-1).indices  # argmax's (the first maximum), faster on a CPU
        return tokens, torch.log_softmax(logits, dim=-1).gather(-1, tokens[:, None])[:, 0]
    scaled = logits / temperature if temperature != 1.0 else logits
    truncated = 0 < top_k < logits.shape[-1] or top_p < 1.0
    if 0 < top_k < logits.shape[-1]:
        kth_largest = scaled.topk(top_k, dim=-1).values[:, -1:]
        scaled = scaled.masked_fill(scaled < kth_largest, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = scaled.sort(dim=-1, descending=True)
        sorted_probs = sorted_logits.softmax(dim=-1)
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs  # probability of the tokens ranked above
        sorted_logits = sorted_logits.masked_fill(mass_before >= top_p, float("-inf"))
        scaled = torch.full_like(scaled, float("-inf")).scatter(-1, order, sorted_logits)
    logprobs = torch.log_softmax(scaled, dim=-1)
    # argmax of p / Exp(1) noise draws a token with probability p (the exponential race): several times faster
    # than torch.multinomial for a large vocabulary. -log(uniform) is the Exp(1) draw (faster than exponential_)
    if uniform is None:  # drawn here: turned into the Exp(1) draws in place
        noise = torch.rand(logprobs.shape, generator=generator, device=logprobs.device).log_().neg_()
    else:
        noise = -uniform.log()
    tokens = logprobs.exp().div_(noise).max(dim=-1).indices  # argmax's (the first maximum), faster on a CPU
    untruncated = temperature == 1.0 and not truncated  # then the sampled distribution is the raw one
    chosen = logprobs if logprobs_mode == "sampled" or untruncated else torch.log_softmax(logits, dim=-1)
    return tokens, chosen.gather(-1, tokens[:, None])[:, 0]


def _available_bytes(device) -> int | None:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None


def _cache_dtype(weight):
    device_type = weight.device.type
    if torch.is_autocast_enabled(device_type):  # keys and values come out of autocast's matmuls
        return torch.get_autocast_dtype(device_type)
    return weight.dtype


def _slots_that_fit(model, max_len, limit=256):
    """The default number of slots: as many as half the free memory holds, at most `limit`."""
    weight = model.lm_head_weight
    available = _available_bytes(weight.device)
    per_slot = KVCache.bytes_needed(model.config, 1, max_len, _cache_dtype(weight))
    return limit if available is None else max(1, min(limit, int(0.5 * available) // per_slot))


def allocate_cache(model: Transformer, slots: int, max_len: int) -> KVCache:
    """Computes the cache size before allocating it, and refuses one that cannot fit."""
    weight = model.lm_head_weight
    dtype = _cache_dtype(weight)
    needed = KVCache.bytes_needed(model.config, slots, max_len, dtype)
    available = _available_bytes(weight.device)
    if available is not None and needed > 0.9 * available:
        raise MemoryError(
            f"the KV cache needs {needed / 2**30:.2f} GiB ({model.config.num_hidden_layers} layers x {slots} slots x "
            f"{model.config.num_key_value_heads} kv heads x {max_len} tokens x {model.config.head_dim} x 2 (k, v) x "
            f"{torch.empty((), dtype=dtype).element_size()} bytes) but {available / 2**30:.2f} GiB is free: lower "
            f"max_slots or max_new_tokens")
    return KVCache(model.config, slots, max_len, weight.device, dtype)


class GraphedDecode:
    """One decode step of every slot, sampling included, captured once in a CUDA graph: one launch per step
    instead of several hundred, whose launch cost dominates decoding at small batch. Shapes are static: all slots
    run every step (a free slot decodes dummy tokens from position 0, which its next prefill overwrites) and
    attention spans the whole cache, each row seeing its own prefix. The step feeds itself: the graph writes the
    sampled tokens back as the next inputs, advances the positions and appends to a history, so a run of steps
    needs no copy from the host. Built before any prefill, since capture writes to the cache."""

    def __init__(self, model, cache, slots, sample, max_steps, needs_noise):
        device = model.lm_head_weight.device
        self.tokens = torch.zeros((slots, 1), dtype=torch.long, device=device)
        self.positions = torch.zeros((slots, 1), dtype=torch.long, device=device)
        self.uniform = torch.rand((slots, model.config.vocab_size), device=device) if needs_noise else None
        self.step = torch.zeros(1, dtype=torch.long, device=device)
        self.token_history = torch.zeros((max_steps, slots), dtype=torch.long, device=device)
        self.logprob_history = torch.zeros((max_steps, slots), dtype=torch.float32, device=device)
        self.slots = torch.arange(slots, device=device)  # the graph reads it at every replay: it must outlive __init__
        view = CacheView(kv=cache, slots=self.slots, positions=self.positions, key_len=cache.max_len, first_slot=0)

        def one_step():
            logits = model(self.tokens, cache=view)[:, -1]  # (slots, vocab)
            tokens, logprobs = sample(logits, uniform=self.uniform)
            self.token_history.index_copy_(0, self.step, tokens[None])
            self.logprob_history.index_copy_(0, self.step, logprobs[None])
            self.tokens.copy_(tokens[:, None])
            self.positions.add_(1)
            self.step.add_(1)

        autocast = torch.autocast("cuda", dtype=torch.get_autocast_dtype("cuda"), cache_enabled=False) \
            if torch.is_autocast_enabled("cuda") else torch.autocast("cuda", enabled=False)
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side), autocast:  # warm-up runs outside the graph (lazy init, kernel selection)
            for _ in range(2):
                self.step.zero_()
                one_step()
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        # Python's cyclic GC may finalize a Triton kernel object during capture; its destructor unloads a CUDA
        # module, which is illegal while a stream is capturing and leaves a graph that faults on replay
        gc_was_enabled = gc.isenabled()
        gc.disable()
        try:
            with torch.cuda.graph(self.graph), autocast:
                one_step()
        finally:
            if gc_was_enabled:
                gc.enable()

    def __call__(self, tokens, positions, steps, generator):
        """Decodes `steps` tokens for every slot from tokens (slots,) at positions (slots,); returns the sampled
        tokens and their log-probs, each (steps, slots)."""
        self.tokens.copy_(tokens[:, None])
        self.positions.copy_(positions[:, None])
        self.step.zero_()
        for _ in range(steps):
            if self.uniform is not None:
                self.uniform.uniform_(generator=generator)
            self.graph.replay()
        return self.token_history[:steps], self.logprob_history[:steps]


@torch.inference_mode()
def generate(model, prompts, max_new_tokens, temperature=1.0, top_p=1.0, top_k=0, n=1, stop_token_ids=(),
             seed=None, max_slots=None, logprobs_mode="sampled", progress=None, cuda_graph=False,
             packed_prefill=None, sync_every=None):
    """prompts: list of token-id lists (any lengths). Returns len(prompts) * n completions, grouped by prompt
    (the n samples of prompt 0, then of prompt 1, ...). max_slots bounds the sequences decoded at once (default:
    as many as half the free memory holds, up to 256); it is rounded up to a multiple of n since a prompt's samples
    share its prefill.
    cuda_graph=True decodes through a captured CUDA graph (GraphedDecode) on a GPU. packed_prefill (default: on a
    GPU) prefills the admitted prompts back to back through the varlen attention kernel instead of padding them.
    sync_every: decode steps run back to back on the device before the host reads their tokens (default 16 on a
    GPU, 1 on CPU). A sequence that stops inside such a run is only retired at its end (its extra tokens are
    dropped), so larger values trade a little wasted decoding for fewer host round trips."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    device = model.lm_head_weight.device
    packed_prefill = device.type == "cuda" if packed_prefill is None else packed_prefill
    sync_every = sync_every or (16 if device.type == "cuda" else 1)
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    stop_ids = set(int(t) for t in stop_token_ids)
    max_len = max(len(p) for p in prompts) + max_new_tokens
    slots = min(max_slots or _slots_that_fit(model, max_len), len(prompts) * n)
    slots = max(n, (slots + n - 1) // n * n)
    cache = allocate_cache(model, slots, max_len)
    sample = lambda logits, uniform=None: sample_next(logits, temperature, top_k, top_p, generator, logprobs_mode,
                                                      uniform)
    graphed = None
    if cuda_graph and device.type == "cuda":
        graphed = GraphedDecode(model, cache, slots, sample, min(sync_every, max_new_tokens), temperature != 0)

    results = [Completion(prompt_index=i // n) for i in range(len(prompts) * n)]
    pending = deque(range(len(prompts)))
    free = list(range(slots))[::-1]
    active = {}  # slot -> [result index, number of tokens in its cache]

    def record(slot, token, logprob):
        """Appends a sampled token to its slot's completion; returns False once the completion is finished."""
        completion = results[active[slot][0]]
        completion.tokens.append(token)
        completion.logprobs.append(logprob)
        if token in stop_ids or len(completion.tokens) >= max_new_tokens:
            completion.finish_reason = "stop" if token in stop_ids else "length"
            del active[slot]
            free.append(slot)
            if progress:
                progress(completion)
            return False
        return True

    while pending or active:
        # admit waiting prompts into free slots: one prefill per prompt, shared by its n samples
        admitted = []
        while pending and len(free) >= n:
            prompt_index = pending.popleft()
            admitted.append((prompt_index, [free.pop() for _ in range(n)]))
        if admitted:
            logits = _prefill_groups(model, cache, [(prompts[p], group) for p, group in admitted], packed_prefill)
            slot_list = []
            for prompt_index, group in admitted:
                for k, slot in enumerate(group):
                    active[slot] = [prompt_index * n + k, len(prompts[prompt_index])]
                slot_list += group
            tokens, logprobs = sample(logits.repeat_interleave(n, dim=0))
            for slot, token, logprob in zip(slot_list, tokens.tolist(), logprobs.tolist()):
                record(slot, token, logprob)
        if not active:
            continue
        # a run of decode steps for the active slots, each at its own position; no slot reaches its length limit
        # inside the run, so every position stays within the cache
        steps = min(sync_every, min(max_new_tokens - len(results[i].tokens) for i, _ in active.values()))
        rows = list(range(slots)) if graphed is not None else sorted(active)
        row_tokens = [results[active[s][0]].tokens[-1] if s in active else 0 for s in rows]
        row_positions = [active[s][1] if s in active else 0 for s in rows]
        token_history, logprob_history = _decode_run(model, cache, graphed, rows, row_tokens, row_positions, steps,
                                                     sample, generator)
        for row, slot in enumerate(rows):
            if slot not in active:
                continue
            for step in range(steps):
                if not record(slot, token_history[step][row], logprob_history[step][row]):
                    break
            else:
                active[slot][1] += steps
    return results


def _decode_run(model, cache, graphed, rows, tokens, positions, steps, sample, generator):
    """`steps` decode steps of the given cache rows, through the CUDA graph when there is one; returns the sampled
    tokens and their log-probs as (steps, rows) lists: the run's one host sync."""
    if graphed is not None:
        device = model.lm_head_weight.device
        token_history, logprob_history = graphed(torch.tensor(tokens, device=device),
                                                 torch.tensor(positions, device=device), steps, generator)
    else:
        token_history, logprob_history = _decode_eager(model, cache, rows, tokens, positions, steps, sample)
    return token_history.tolist(), logprob_history.tolist()


def _decode_eager(model, cache, rows, tokens, positions, steps, sample):
    """`steps` decode steps of the given cache rows without a CUDA graph; returns (steps, rows) tokens, log-probs."""
    device = model.lm_head_weight.device
    consecutive = rows[-1] - rows[0] == len(rows) - 1
    slots = torch.tensor(rows, device=device)
    tokens = torch.tensor(tokens, device=device)
    start = torch.tensor(positions, device=device)[:, None]
    token_history, logprob_history = [], []
    for step in range(steps):
        view = CacheView(kv=cache, slots=slots, positions=start + step, key_len=max(positions) + step + 1,
                         first_slot=rows[0] if consecutive else None)
        tokens, logprobs = sample(model(tokens[:, None], cache=view)[:, -1])
        token_history.append(tokens)
        logprob_history.append(logprobs)
    return torch.stack(token_history), torch.stack(logprob_history)


def _prefill_groups(model, cache, groups, packed):
    """groups: [(prompt, slots)]. Each prompt is prefilled once into its first slot and its cache rows copied to the
    others (its n samples share the prefill); returns the logits after each prompt's last token, one row each."""
    logits = _prefill(model, cache, [prompt for prompt, _ in groups], [slots[0] for _, slots in groups], packed)
    for prompt, slots in groups:
        if len(slots) > 1:
            cache.copy_slot(slots[0], torch.tensor(slots[1:], device=logits.device), len(prompt))
    return logits


def _prefill(model, cache, prompts, slots, packed):
    """Writes the prompts' keys and values to their slots and returns the logits after each prompt's last token.
    packed: the prompts back to back in one row through the varlen attention path (no padding; the GPU default);
    otherwise a right-padded batch, whose writes past a prompt's end are never visible (Attention.cached_attention)."""
    device = model.lm_head_weight.device
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    if packed:
        ids = torch.tensor([t for p in prompts for t in p], device=device)[None]  # (1, total)
        positions = torch.cat([torch.arange(len(p), device=device) for p in prompts])[None]
        cu_seqlens = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)]).to(torch.int32)
        view = CacheView(kv=cache, positions=positions,
                         token_slots=torch.repeat_interleave(torch.tensor(slots, device=device), lengths))
        hidden = model(ids, position_ids=positions, cu_seqlens=cu_seqlens, cache=view, return_hidden=True)[0]
        hidden = hidden[cu_seqlens[1:].long() - 1]  # (A, dim): each prompt's last token
    else:
        longest = int(lengths.max())
        ids = torch.zeros(len(prompts), longest, dtype=torch.long, device=device)
        for row, prompt in enumerate(prompts):
            ids[row, : len(prompt)] = torch.tensor(prompt, device=device)
        positions = torch.arange(longest, device=device).expand(len(prompts), longest)
        view = CacheView(kv=cache, slots=torch.tensor(slots, device=device), positions=positions, key_len=longest)
        hidden = model(ids, cache=view, return_hidden=True)  # (A, longest, dim): no (A, longest, vocab) logits
        hidden = hidden[torch.arange(len(prompts), device=device), lengths - 1]  # (A, dim)
    return torch.nn.functional.linear(hidden, model.lm_head_weight).float()
