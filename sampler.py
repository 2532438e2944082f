"""
KV-cached batched sampling with continuous batching, on token ids only (no tokenizer, no rewards).

    completions = generate(model, [[1, 2, 3], [4, 5]], max_new_tokens=256, temperature=1.0, n=8,
                           stop_token_ids=tok.eos_token_ids, seed=0)
    completions[0].tokens, completions[0].logprobs, completions[0].finish_reason, completions[0].prompt_index

We sample with the training model itself: the weights are always current (no second engine to sync) and the
log-probs come from the same forward code the trainer uses.

How it works
  - A paged cache (model.KVCache): fixed-size blocks of positions, sized from the model before they are allocated
    (a call that cannot fit is refused with the number of bytes it needs). A sequence holds the blocks its tokens
    fill, listed in its block table, and takes another as it grows; blocks return to the pool (BlockPool) when it
    finishes, so the sequences decoded at once are bounded by the tokens in the cache, not by max_new_tokens.
    On a CPU one block holds a whole sequence, and the running sequence in the highest block moves into the block
    of one that finished (_Scheduler.compact): the rows' blocks stay consecutive and decoding reads views of them.
    There, in float32, a call that decodes at most 16 sequences at once for at least 64 new tokens holds the
    projection weights column-major while it samples (column_major_projections): the layout MKL's GEMV reads
    fastest at batch 1.
  - A prompt is admitted when n slots and its blocks are free: it is prefilled once (prompts admitted together are
    packed back to back on a GPU, right-padded on CPU); its n samples share its full blocks and each gets a copy of
    its last, partly filled one.
  - Every step decodes one token for every running sequence, each at its own position; `sync_every` steps run on
    the device before the host reads their tokens. A finished sequence frees its slot and blocks at the end of
    that run and the next pending prompt takes them (continuous batching): no batch waits for its longest row.
  - When the pool runs dry, the newest running sequence is preempted: its blocks are freed and it waits at the head
    of the queue, to be resumed by a prefill of its prompt and tokens so far. Never a crash, never a shortened
    completion, and the same stream: each token's randomness is a function of (seed, completion, position)
    (counter_uniform), not of the batch it was drawn in, so the tokens are those of an uninterrupted run unless the
    recomputed prefix's float rounding (a prefill's, not decoding's) moves a cumulative probability across the draw:
    never in the fp32 tests, possible in rare cases in bf16.
  - On a GPU, decoding goes through the Triton kernels of kernels/rope_cache.py and kernels/decode_attention.py,
    which read the block tables, and with cuda_graph=True (train_grpo.py's and eval.py's default) a step (forward,
    sampling, bookkeeping) is one captured CUDA graph.

Log-probs: by default each returned log-prob is that of the distribution actually sampled from (after temperature,
top-k and top-p). logprobs_mode="raw" returns the untruncated temperature-1 log-probs instead. train_grpo.py
recomputes its old log-probs with the trainer at the sampling temperature without truncation (the standard
choice: the policy gradient is taken w.r.t. the full softmax) and uses these only to report the mismatch.
"""

import gc
from collections import deque
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import torch

from model import CacheView, KVCache, Transformer


@dataclass
class Completion:
    prompt_index: int
    tokens: list = field(default_factory=list)  # sampled ids, the stop token included when it stopped
    logprobs: list = field(default_factory=list)  # one per token
    finish_reason: str = ""  # "stop" | "length"


# ---- per-sequence random draws ---------------------------------------------------------------------------------
# A sampled token's randomness is a fixed function of (seed, the completion's index, the token's position): one
# uniform per token, hashed from those three, picks the token by inverse CDF. So a completion's stream does not depend
# on which sequences share its batch, on its slot, or on being preempted and resumed.

MASK32 = 0xFFFFFFFF


def mix32(x):
    """A bijection of 32-bit integers that scatters nearby inputs (a two-round multiply-xorshift hash from C.
    Wellons' hash prospector). Python ints and int64 tensors alike: both constants are below 2^31, so no product
    of a 32-bit value overflows int64."""
    x = ((x ^ (x >> 16)) * 0x21F0AAAD) & MASK32
    x = ((x ^ (x >> 15)) * 0x735A2D97) & MASK32
    return x ^ (x >> 15)


def sequence_keys(seed: int, index: int) -> tuple[int, int]:
    """Two independent 32-bit keys of completion `index` of a generate call seeded with `seed`: two completions
    draw the same tokens only if both keys collide (2^-64)."""
    base = mix32(mix32(seed & MASK32) ^ ((seed >> 32) & MASK32))
    return mix32((base + index) & MASK32), mix32((mix32(base ^ 0x9E3779B9) + mix32(index & MASK32)) & MASK32)


def counter_uniform(keys, counters):
    """keys (B, 2) int64 (sequence_keys), counters (B,) int64 (the position of the token fed in) -> (B,) float64
    uniforms in (0, 1), 32 random bits each, each a function of its row's keys and counter only."""
    bits = mix32(mix32(keys[:, 0] ^ (counters & MASK32)) ^ keys[:, 1])
    return bits.double().add_(0.5).mul_(2.0 ** -32)


def sample_next(logits, temperature=1.0, top_k=0, top_p=1.0, generator=None, logprobs_mode="sampled",
                uniform=None):
    """logits (B, V) float -> (tokens (B,), logprobs (B,)). temperature 0 is greedy (its log-prob is the
    temperature-1 one). Top-k keeps the k largest logits; top-p the smallest set whose probability reaches p.
    uniform: (B,) float64 draws in (0, 1), one per row (generate passes counter_uniform's); drawn from `generator`
    when None."""
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
    if uniform is None:  # in (0, 1]: a draw of exactly 0 would pick token 0 even where it is masked
        uniform = 1 - torch.rand(logits.shape[0], generator=generator, device=logits.device, dtype=torch.float64)
    # inverse CDF in float64: the first token whose cumulative probability reaches u * total. u > 0, so a token of
    # probability 0 is never the first to reach it; float64 keeps tokens of tiny probability their share
    cdf = logprobs.double().exp_().cumsum_(dim=-1)
    tokens = torch.searchsorted(cdf, (uniform * cdf[:, -1])[:, None])[:, 0]
    untruncated = temperature == 1.0 and not truncated  # then the sampled distribution is the raw one
    chosen = logprobs if logprobs_mode == "sampled" or untruncated else torch.log_softmax(logits, dim=-1)
    return tokens, chosen.gather(-1, tokens[:, None])[:, 0]


# ---- the paged cache's blocks ------------------------------------------------------------------------------------

class BlockPool:
    """Hands out the KV cache's blocks and takes them back. A block shared by the n samples of a prompt (its full
    prompt blocks) has one reference per sample and returns to the pool with the last. Block 0 is never handed out
    (model.KVCache: unused table entries point at it)."""

    def __init__(self, num_blocks: int):
        self.free = list(range(num_blocks - 1, 0, -1))
        self.references = [0] * num_blocks

    def take(self, count: int) -> list[int]:
        blocks = [self.free.pop() for _ in range(count)]
        for block in blocks:
            self.references[block] = 1
        return blocks

    def share(self, blocks):
        for block in blocks:
            self.references[block] += 1

    def move(self, source: int, target: int):
        """Hands a free block out in place of a held one, which returns to the pool (the caller copies its
        contents). Only a block of one sequence moves: its sharers would keep pointing at the old one."""
        assert self.references[source] == 1, f"block {source} is shared"
        self.free.remove(target)
        self.references[target], self.references[source] = self.references[source], 0
        self.free.append(source)

    def give_back(self, blocks):
        for block in blocks:
            self.references[block] -= 1
            if self.references[block] == 0:
                self.free.append(block)


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


# On a CPU in float32, generate holds the projection weights column-major for calls that decode at most this many
# sequences at once (measured faster at 1 and 16 in bench/sampler.py; at GRPO's 64 no gain showed in whole steps in
# bench/grpo_step.py, larger batches are untried) and at least this many new tokens (the two relayouts of a call cost
# about what 20 decode steps save at batch 1 in bench/sampler.py: 11 ms against ~0.6 ms per step)
COLUMN_MAJOR_MAX_SEQUENCES = 16
COLUMN_MAJOR_MIN_NEW_TOKENS = 64


@contextmanager
def column_major_projections(model: Transformer):
    """Every projection weight (the nn.Linear ones and the LM head) held transposed in memory inside the block: the
    same (out, in) tensor with strides (1, out), so that MKL multiplies x by a row-major (in, out) matrix. In
    decoding at batch 1 the GEMMs then take about a third less time on this project's CPU machine, at batch 16 less
    by an amount that varies from run to run (bench/sampler.py --layout both); a GEMM over many tokens (prefill,
    training) is as fast either way. The values are the same; at the smallest batches (1-3 rows where tried) the
    order of their float sums differs in the last bits, as a different batch size changes it too. Each weight is
    laid back out row-major on leaving, also after an error, one at a time (the extra memory is the largest weight;
    more if the weights were memory-mapped from a checkpoint, whose pages become private copies), in normal mode, so
    that the trainer's parameters never become inference tensors. Only CPU float32 weights outside autocast move
    (elsewhere the layout is not what the GEMM reads); a nested call (from a progress callback) finds them
    column-major and leaves them alone. Not for two threads sampling one model at once: one's restore would free
    what the other reads."""
    weights = [module.weight for module in model.modules() if isinstance(module, torch.nn.Linear)]
    weights = list({id(w): w for w in weights + [model.lm_head_weight]}.values())
    moved, autocast = [], torch.is_autocast_enabled("cpu")
    try:
        with torch.inference_mode(False), torch.no_grad():
            for weight in weights:
                # is_contiguous: not already moved (a nested call); type: plain tensors (not DTensor shards)
                if weight.device.type == "cpu" and weight.dtype == torch.float32 and weight.is_contiguous() \
                        and type(weight.data) is torch.Tensor and not autocast:
                    weight.data = weight.data.t().contiguous().t()
                    moved.append(weight)
        yield
    finally:
        with torch.inference_mode(False), torch.no_grad():
            for weight in moved:
                weight.data = weight.data.contiguous()


def allocate_cache(model: Transformer, max_len: int, block_size: int, slots: int, cache_tokens=None,
                   least_tokens=None) -> KVCache:
    """A paged cache of `cache_tokens` tokens (default: what half the free memory holds, at most `slots`
    full-length sequences), rounded up to whole blocks, plus block 0. Refuses one smaller than `least_tokens` (what
    the call needs to make progress), or one that cannot fit, saying how many bytes it needs."""
    weight = model.lm_head_weight
    dtype = _cache_dtype(weight)
    per_token = KVCache.bytes_per_token(model.config, dtype)
    available = _available_bytes(weight.device)
    least_tokens = least_tokens or max_len
    if cache_tokens is None:
        fits = slots * max_len if available is None else int(0.5 * available) // per_token
        cache_tokens = max(least_tokens, min(slots * max_len, fits))
    if cache_tokens < least_tokens:
        raise ValueError(f"cache_tokens={cache_tokens} holds less than one sequence of this call ({least_tokens} "
                         f"tokens: its longest prompt with its samples, or one prompt plus max_new_tokens)")
    num_blocks = -(-cache_tokens // block_size) + 1
    needed = num_blocks * block_size * per_token
    if available is not None and needed > 0.9 * available:
        raise MemoryError(
            f"the KV cache needs {needed / 2**30:.2f} GiB ({num_blocks} blocks x {block_size} tokens x "
            f"{model.config.num_hidden_layers} layers x {model.config.num_key_value_heads} kv heads x "
            f"{model.config.head_dim} x 2 (k, v) x {torch.empty((), dtype=dtype).element_size()} bytes) but "
            f"{available / 2**30:.2f} GiB is free: lower max_new_tokens or cache_tokens")
    return KVCache(model.config, num_blocks, block_size, max_len, weight.device, dtype)


class GraphedDecode:
    """One decode step of every slot, sampling included, captured once in a CUDA graph: one launch per step
    instead of several hundred, whose launch cost dominates decoding at small batch. Shapes are static: all slots
    run every step (a free slot decodes a dummy token at position 0 into block 0, which nobody reads) and each row's
    attention spans its whole block table, masked at its own length. The step feeds itself: the graph writes the
    sampled tokens back as the next inputs, advances the positions and appends to a history, so a run of steps
    needs no copy from the host. Built before any prefill, since capture writes to the cache."""

    def __init__(self, model, cache, slots, sample, max_steps):
        device = model.lm_head_weight.device
        self.tokens = torch.zeros((slots, 1), dtype=torch.long, device=device)
        self.positions = torch.zeros((slots, 1), dtype=torch.long, device=device)
        self.keys = torch.zeros((slots, 2), dtype=torch.long, device=device)
        self.block_table = torch.zeros((slots, -(-cache.max_len // cache.block_size)), dtype=torch.long,
                                       device=device)
        self.step = torch.zeros(1, dtype=torch.long, device=device)
        self.token_history = torch.zeros((max_steps, slots), dtype=torch.long, device=device)
        self.logprob_history = torch.zeros((max_steps, slots), dtype=torch.float32, device=device)
        # the graph reads the view's tensors at every replay: they must outlive __init__
        view = CacheView(kv=cache, positions=self.positions, block_table=self.block_table, key_len=cache.max_len)

        def one_step():
            logits = model(self.tokens, cache=view)[:, -1]  # (slots, vocab)
            tokens, logprobs = sample(logits, counter_uniform(self.keys, self.positions[:, 0]))
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

    def __call__(self, tokens, positions, keys, block_table, steps):
        """Decodes `steps` tokens for every slot from tokens (slots,) at positions (slots,), with each slot's
        sequence keys (slots, 2) and block table (slots, max_blocks); returns the sampled tokens and their
        log-probs, each (steps, slots)."""
        self.tokens.copy_(tokens[:, None])
        self.positions.copy_(positions[:, None])
        self.keys.copy_(keys)
        self.block_table.copy_(block_table)
        self.step.zero_()
        for _ in range(steps):
            self.graph.replay()
        return self.token_history[:steps], self.logprob_history[:steps]


def _prefill_blocks(length, block_size, samples):
    """Blocks a prompt of `length` tokens takes at admission: its full blocks, shared by its samples, plus each
    sample's own copy of its last, partly filled block."""
    full, partial = divmod(length, block_size)
    return full + samples * (partial > 0)


@dataclass
class _Sequence:
    """A completion while it holds cache blocks."""
    index: int  # into the results
    blocks: list  # its cache blocks in position order
    length: int  # tokens in its cache
    order: int  # when it was admitted: the newest running sequence is the first preempted


class _Scheduler:
    """The host-side bookkeeping of one generate call: which sequences wait, which run in which slot, and which cache
    blocks each holds (its block table). No model work: generate asks it what to prefill and decode next and hands
    back the sampled tokens."""

    def __init__(self, prompts, n, slots, max_new_tokens, block_size, num_blocks, sync_every, stop_ids, progress):
        self.prompts, self.n, self.max_new_tokens, self.block_size = prompts, n, max_new_tokens, block_size
        self.sync_every, self.stop_ids, self.progress = sync_every, stop_ids, progress
        self.results = [Completion(prompt_index=i // n) for i in range(len(prompts) * n)]
        self.pool = BlockPool(num_blocks)
        # ("prompt", prompt index, None) or ("resume", completion index, its admission order, kept so that a
        # resumed sequence is not the first preempted again)
        self.pending = deque(("prompt", p, None) for p in range(len(prompts)))
        self.free = list(range(slots))[::-1]
        self.active = {}  # slot -> _Sequence
        max_len = max(len(p) for p in prompts) + max_new_tokens
        self.tables = torch.zeros((slots, self.blocks_of(max_len)), dtype=torch.long)  # 0 past a slot's blocks
        self.admitted = 0
        self.figures = dict(block_size=block_size, blocks=num_blocks - 1, peak_blocks=0, preemptions=0,
                            decode_steps=0, running_steps=0, max_running=0, queued_steps=0, running_steps_queued=0)

    def blocks_of(self, tokens):
        return -(-tokens // self.block_size)

    def lookahead(self, sequence_tokens):
        """The steps of the next decode run for a sequence with this many completion tokens."""
        return min(self.sync_every, self.max_new_tokens - sequence_tokens)

    def update_table(self, slot):
        blocks = self.active[slot].blocks if slot in self.active else []
        self.tables[slot].zero_()[: len(blocks)] = torch.tensor(blocks, dtype=torch.long)

    def note_blocks_in_use(self):
        self.figures["peak_blocks"] = max(self.figures["peak_blocks"], self.figures["blocks"] - len(self.pool.free))

    def retire(self, slot):
        self.pool.give_back(self.active.pop(slot).blocks)
        self.update_table(slot)  # an idle slot of the CUDA graph writes to block 0, not to a block handed out again
        self.free.append(slot)

    def preempt(self, slot):
        """Frees a running sequence's blocks; it waits at the head of the queue to be recomputed and resumed."""
        self.pending.appendleft(("resume", self.active[slot].index, self.active[slot].order))
        self.retire(slot)
        self.figures["preemptions"] += 1

    def record(self, slot, token, logprob):
        """Appends a sampled token to its slot's completion; returns False once the completion is finished."""
        completion = self.results[self.active[slot].index]
        completion.tokens.append(token)
        completion.logprobs.append(logprob)
        if token in self.stop_ids or len(completion.tokens) >= self.max_new_tokens:
            completion.finish_reason = "stop" if token in self.stop_ids else "length"
            self.retire(slot)
            if self.progress:
                self.progress(completion)
            return False
        return True

    def admit(self):
        """Takes waiting work into free slots while the pool holds it and the next run's growth: a preempted
        sequence first (its prompt and tokens so far, to recompute), then whole prompts, each to be prefilled once
        into blocks its n samples share. Returns [(tokens to prefill, their slots, resumed)]."""
        groups = []
        while self.pending:
            kind, index, order = self.pending[0]
            resumed = kind == "resume"
            done = self.results[index].tokens if resumed else []
            tokens = self.prompts[self.results[index].prompt_index] + done[:-1] if resumed else self.prompts[index]
            size = 1 if resumed else self.n
            full, partial = divmod(len(tokens), self.block_size)
            needed = _prefill_blocks(len(tokens), self.block_size, size)
            # the blocks the running sequences and this group will take in their next run of steps stay free
            growth = size * (self.blocks_of(len(tokens) + self.lookahead(len(done))) - self.blocks_of(len(tokens)))
            growth += sum(max(0, self.blocks_of(q.length + self.lookahead(len(self.results[q.index].tokens)))
                              - len(q.blocks)) for q in self.active.values())
            if len(self.free) < size or needed + (growth if self.active else 0) > len(self.pool.free):
                break
            self.pending.popleft()
            shared, members = self.pool.take(full), []
            for k in range(size):
                if k:
                    self.pool.share(shared)
                slot = self.free.pop()
                self.active[slot] = _Sequence(index if resumed else index * self.n + k,
                                              shared + self.pool.take(partial > 0), len(tokens),
                                              order if resumed else self.admitted)
                self.admitted += 1
                self.update_table(slot)
                members.append(slot)
            groups.append((tokens, members, resumed))
        self.note_blocks_in_use()
        return groups

    def next_run(self):
        """The next decode run's steps: no sequence reaches its length limit inside the run, so every position
        stays within max_len. Each running sequence first gets the blocks the run's positions need, oldest first;
        when the pool runs dry the newest running sequence is preempted."""
        steps = min(self.lookahead(len(self.results[q.index].tokens)) for q in self.active.values())
        for slot in sorted(self.active, key=lambda s: self.active[s].order):
            if slot not in self.active:
                continue
            needed = max(0, self.blocks_of(self.active[slot].length + steps) - len(self.active[slot].blocks))
            while slot in self.active and needed > len(self.pool.free):
                self.preempt(max(self.active, key=lambda s: self.active[s].order))
            if slot in self.active and needed:
                self.active[slot].blocks += self.pool.take(needed)
                self.update_table(slot)
        self.note_blocks_in_use()
        return steps

    def compact(self):
        """When every running sequence is one block (a CPU's layout), the highest move down into the holes that
        finished sequences left, so that the blocks stay consecutive and decoding reads views of the cache instead of
        gathering every row's keys and values at every layer of every step. Called after next_run, so that each such
        block is its sequence's own (a shared full prompt block comes with a block for the run's positions). Returns
        the (source, target) blocks whose contents the cache must copy: at most one per finished sequence."""
        if any(len(q.blocks) != 1 for q in self.active.values()):
            return []
        slot_of = {q.blocks[0]: slot for slot, q in self.active.items()}
        low = min(slot_of)
        end = low + len(slot_of)
        moves = list(zip(sorted(b for b in slot_of if b >= end), [b for b in range(low, end) if b not in slot_of],
                         strict=True))
        for source, target in moves:
            self.pool.move(source, target)
            self.active[slot_of[source]].blocks = [target]
            self.update_table(slot_of[source])
        return moves

    def rows(self, all_slots, keys):
        """A decode run's rows (every slot for the CUDA graph, else the running ones in the order of their first
        blocks, as compact lays them out) and each row's input token, position, sequence keys and block table (idle
        rows: token 0 at position 0 in block 0)."""
        by_first_block = lambda slot: self.active[slot].blocks[0]
        rows = list(range(len(self.tables))) if all_slots else sorted(self.active, key=by_first_block)
        running = [self.active.get(slot) for slot in rows]
        table = self.tables if all_slots else \
            self.tables[rows, : max(len(q.blocks) for q in self.active.values())]
        return (rows, [self.results[q.index].tokens[-1] if q else 0 for q in running],
                [q.length if q else 0 for q in running], [keys[q.index] if q else (0, 0) for q in running], table)

    def record_run(self, rows, steps, token_history, logprob_history):
        """Hands a run's sampled tokens ((steps, rows) lists) to their completions; a sequence that stopped inside
        the run keeps the tokens up to its stop."""
        self.figures["decode_steps"] += steps
        self.figures["running_steps"] += steps * len(self.active)
        self.figures["max_running"] = max(self.figures["max_running"], len(self.active))
        if self.pending:  # work waits: the running sequences are what the cache holds
            self.figures["queued_steps"] += steps
            self.figures["running_steps_queued"] += steps * len(self.active)
        for row, slot in enumerate(rows):
            if slot not in self.active:
                continue
            for step in range(steps):
                if not self.record(slot, token_history[step][row], logprob_history[step][row]):
                    break
            else:
                self.active[slot].length += steps

    def stats(self):
        figures = self.figures
        return dict(figures, free_blocks_at_end=len(self.pool.free),
                    mean_running=figures["running_steps"] / max(1, figures["decode_steps"]),
                    mean_running_queued=figures["running_steps_queued"] / max(1, figures["queued_steps"]))


@torch.inference_mode()
def generate(model, prompts, max_new_tokens, temperature=1.0, top_p=1.0, top_k=0, n=1, stop_token_ids=(),
             seed=None, max_slots=None, logprobs_mode="sampled", progress=None, cuda_graph=False,
             packed_prefill=None, sync_every=None, block_size=None, cache_tokens=None, stats=None):
    """prompts: list of token-id lists (any lengths). Returns len(prompts) * n completions, grouped by prompt
    (the n samples of prompt 0, then of prompt 1, ...).
    max_slots bounds the sequences decoded at once (default 256), rounded up to a multiple of n since a prompt's
    samples are admitted together. block_size: tokens per cache block (default 16 on a GPU; on a CPU one block
    holds a whole sequence, the layout whose decode reads views of the cache). cache_tokens: the cache's capacity
    in tokens (default: what half the free memory holds, at most max_slots full-length sequences); when it runs
    out, the newest running sequence is preempted and later resumed (its prefix recomputed), with the same stream.
    cuda_graph=True decodes through a captured CUDA graph (GraphedDecode) on a GPU. packed_prefill (default: on a
    GPU) prefills the admitted prompts back to back through the varlen attention kernel instead of padding them.
    sync_every: decode steps run back to back on the device before the host reads their tokens (default 16 on a
    GPU, 1 on CPU). A sequence that stops inside such a run is only retired at its end (its extra tokens are
    dropped), so larger values trade a little wasted decoding for fewer host round trips.
    stats: a dict to fill with the cache's figures: blocks (and peak_blocks in use, free_blocks_at_end), block_size,
    preemptions, decode_steps, and the running sequences per decode step (max_running, mean_running, and
    mean_running_queued over the steps when work was waiting: what the cache holds at once)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    device = model.lm_head_weight.device
    packed_prefill = device.type == "cuda" if packed_prefill is None else packed_prefill
    sync_every = sync_every or (16 if device.type == "cuda" else 1)
    seed = int(torch.randint(2**62, ())) if seed is None else seed  # unseeded calls follow torch's global seed
    max_len = max(len(p) for p in prompts) + max_new_tokens
    block_size = block_size or (16 if device.type == "cuda" else max_len)
    slots = min(max_slots or 256, len(prompts) * n)
    slots = max(n, (slots + n - 1) // n * n)
    # the least cache that makes progress: one sequence at full length, or the largest prompt with its samples
    least_tokens = block_size * max(-(-max_len // block_size),
                                    max(_prefill_blocks(len(p), block_size, n) for p in prompts))
    cache = allocate_cache(model, max_len, block_size, slots, cache_tokens, least_tokens)
    sample = lambda logits, uniform: sample_next(logits, temperature, top_k, top_p, None, logprobs_mode, uniform)
    graphed = None
    if cuda_graph and device.type == "cuda":
        graphed = GraphedDecode(model, cache, slots, sample, min(sync_every, max_new_tokens))
    scheduler = _Scheduler(prompts, n, slots, max_new_tokens, block_size, cache.num_blocks, sync_every,
                           set(int(t) for t in stop_token_ids), progress)
    keys = [sequence_keys(seed, i) for i in range(len(scheduler.results))]

    column_major_pays = slots <= COLUMN_MAJOR_MAX_SEQUENCES and max_new_tokens >= COLUMN_MAJOR_MIN_NEW_TOKENS
    with column_major_projections(model) if column_major_pays else nullcontext():
        while scheduler.pending or scheduler.active:
            groups = scheduler.admit()
            if groups:
                _prefill_and_sample_first(model, cache, groups, scheduler, keys, sample, packed_prefill)
            if not scheduler.active:
                continue
            steps = scheduler.next_run()
            if not scheduler.active:
                continue
            moves = scheduler.compact() if graphed is None else []
            if moves:
                cache.copy_blocks(*(torch.tensor(blocks, device=device) for blocks in zip(*moves)))
            rows, *inputs = scheduler.rows(graphed is not None, keys)
            token_history, logprob_history = _decode_run(model, cache, graphed, *inputs, steps, sample)
            scheduler.record_run(rows, steps, token_history, logprob_history)
    if stats is not None:
        stats.update(scheduler.stats())
    return scheduler.results


def _prefill_and_sample_first(model, cache, groups, scheduler, keys, sample, packed):
    """Prefills the admitted groups in one batch: each prompt once, into its first sample's blocks. Its other
    samples share its full blocks and get a copy of its last, partly filled one; each sample then draws its first
    token. A resumed sequence's prefill only rebuilds its cache: its last sampled token is the next step's input."""
    device, active = model.lm_head_weight.device, scheduler.active
    logits = _prefill(model, cache, [tokens for tokens, _, _ in groups],
                      [active[members[0]].blocks for _, members, _ in groups], packed)
    first_tokens = []  # (slot, row of logits)
    for row, (tokens, members, resumed) in enumerate(groups):
        if resumed:
            continue
        if len(members) > 1 and active[members[0]].blocks[-1] != active[members[1]].blocks[-1]:
            source = active[members[0]].blocks[-1]
            cache.copy_blocks(torch.tensor([source] * (len(members) - 1), device=device),
                              torch.tensor([active[slot].blocks[-1] for slot in members[1:]], device=device))
        first_tokens += [(slot, row) for slot in members]
    if not first_tokens:
        return
    uniform = counter_uniform(torch.tensor([keys[active[slot].index] for slot, _ in first_tokens], device=device),
                              torch.tensor([active[slot].length - 1 for slot, _ in first_tokens], device=device))
    tokens, logprobs = sample(logits[torch.tensor([row for _, row in first_tokens], device=device)], uniform)
    for (slot, _), token, logprob in zip(first_tokens, tokens.tolist(), logprobs.tolist()):
        scheduler.record(slot, token, logprob)


def _decode_run(model, cache, graphed, tokens, positions, keys, block_table, steps, sample):
    """`steps` decode steps of the given rows (token, position and sequence keys each, lists; block table, a host
    tensor), through the CUDA graph when there is one; returns the sampled tokens and their log-probs as
    (steps, rows) lists: the run's one host sync."""
    device = model.lm_head_weight.device
    tokens, positions, keys = (torch.tensor(x, device=device) for x in (tokens, positions, keys))
    block_table = block_table.to(device)
    if graphed is not None:
        token_history, logprob_history = graphed(tokens, positions, keys, block_table, steps)
    else:
        token_history, logprob_history = _decode_eager(model, cache, tokens, positions, keys, block_table, steps,
                                                       sample)
    return token_history.tolist(), logprob_history.tolist()


def _decode_eager(model, cache, tokens, positions, keys, block_table, steps, sample):
    """`steps` decode steps without a CUDA graph; returns (steps, rows) tokens, log-probs. When every row is one
    block and the blocks are consecutive (a CPU's default layout), attention reads views of the cache."""
    first = int(block_table[0, 0])
    one_block_each = block_table.shape[1] == 1 and bool((block_table[:, 0] == first + torch.arange(
        len(block_table), device=block_table.device)).all())
    key_len = int(positions.max()) + 1
    token_history, logprob_history = [], []
    for step in range(steps):
        view = CacheView(kv=cache, positions=positions[:, None] + step, block_table=block_table,
                         key_len=key_len + step, first_block=first if one_block_each else None)
        tokens, logprobs = sample(model(tokens[:, None], cache=view)[:, -1], counter_uniform(keys, positions + step))
        token_history.append(tokens)
        logprob_history.append(logprobs)
    return torch.stack(token_history), torch.stack(logprob_history)


def _prefill(model, cache, sequences, tables, packed):
    """Writes the sequences' keys and values to their blocks (tables: each sequence's block list) and returns the
    logits after each sequence's last token. packed: the sequences back to back in one row through the varlen
    attention path (no padding; the GPU default); otherwise a right-padded batch, whose writes past a sequence's end
    land in its own last block or in block 0, where the attention mask hides them until decoding overwrites them."""
    device = model.lm_head_weight.device
    lengths = torch.tensor([len(p) for p in sequences], device=device)
    width = max(len(blocks) for blocks in tables)
    block_table = torch.tensor([blocks + [0] * (width - len(blocks)) for blocks in tables], device=device)
    if packed:
        ids = torch.tensor([t for p in sequences for t in p], device=device)[None]  # (1, total)
        positions = torch.cat([torch.arange(len(p), device=device) for p in sequences])[None]
        cu_seqlens = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)]).to(torch.int32)
        view = CacheView(kv=cache, positions=positions, block_table=block_table,
                         token_rows=torch.repeat_interleave(torch.arange(len(sequences), device=device), lengths))
        hidden = model(ids, position_ids=positions, cu_seqlens=cu_seqlens, cache=view, return_hidden=True)[0]
        hidden = hidden[cu_seqlens[1:].long() - 1]  # (A, dim): each sequence's last token
    else:
        longest = int(lengths.max())
        ids = torch.zeros(len(sequences), longest, dtype=torch.long, device=device)
        for row, sequence in enumerate(sequences):
            ids[row, : len(sequence)] = torch.tensor(sequence, device=device)
        positions = torch.arange(longest, device=device).expand(len(sequences), longest)
        view = CacheView(kv=cache, positions=positions, block_table=block_table, key_len=longest)
        hidden = model(ids, cache=view, return_hidden=True)  # (A, longest, dim): no (A, longest, vocab) logits
        hidden = hidden[torch.arange(len(sequences), device=device), lengths - 1]  # (A, dim)
    return torch.nn.functional.linear(hidden, model.lm_head_weight).float()
