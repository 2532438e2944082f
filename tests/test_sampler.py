# python -m pytest tests/test_sampler.py -q
import copy
import math

import pytest
import torch

from conftest import random_config, write_hf_checkpoint
from model import Transformer
import sampler
from sampler import COLUMN_MAJOR_MIN_NEW_TOKENS, generate, sample_next


@pytest.fixture(scope="module", params=["qwen2", "llama"])
def checkpoint(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    hf_model = write_hf_checkpoint(path, family=request.param, seed=3)
    return hf_model, Transformer.from_pretrained(path)


def random_prompts(lengths, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 300, (n,), generator=generator).tolist() for n in lengths]


@pytest.mark.parametrize("packed", [False, True])
def test_greedy_matches_transformers_generate(checkpoint, packed):
    hf_model, model = checkpoint
    prompts = random_prompts([5, 17, 1, 40])
    ours = generate(model, prompts, max_new_tokens=70, temperature=0, packed_prefill=packed)
    for prompt, completion in zip(prompts, ours):
        with torch.no_grad():
            reference = hf_model.generate(torch.tensor([prompt]), max_new_tokens=70, do_sample=False,
                                          eos_token_id=None, pad_token_id=0)
        assert completion.tokens == reference[0, len(prompt):].tolist()
        assert completion.finish_reason == "length" and len(completion.tokens) == 70


@pytest.mark.parametrize("seed", range(2))
def test_greedy_matches_transformers_generate_on_generated_configs(tmp_path, seed):
    """The whole decode path (prefill padded or packed, the paged cache with blocks of 4 or one per sequence, GQA,
    qk-norm, rope scaling) on 4 random configs per seed (conftest.random_config), in float64 with sharp
    distributions: token for token transformers' greedy generate, from prompts of 1, 7 and 23 tokens."""
    import random

    rng = random.Random(seed)
    for case in range(4):
        config = random_config(rng)
        hf_model = write_hf_checkpoint(tmp_path / str(case), seed=case, scale=rng.choice([4.0, 8.0]), **config)
        model = Transformer.from_pretrained(tmp_path / str(case), dtype=torch.float64)
        prompts = [[rng.randrange(config["vocab_size"]) for _ in range(n)] for n in (1, 7, 23)]
        completions = generate(model, prompts, max_new_tokens=30, temperature=0, block_size=rng.choice([4, None]),
                               packed_prefill=rng.random() < 0.5)
        for prompt, completion in zip(prompts, completions):
            ids = torch.tensor([prompt])  # the mask given: without it a prompt's token 0 would be read as padding
            with torch.no_grad():
                reference = hf_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=30,
                                              do_sample=False, eos_token_id=None, pad_token_id=0)
            assert completion.tokens == reference[0, len(prompt):].tolist(), (config, prompt)


def test_qwen3_greedy_matches_transformers_generate(tmp_path):
    """Qwen3 normalises each head's q and k before the rope: the decode path does it on its own code."""
    hf_model = write_hf_checkpoint(tmp_path, family="qwen3", seed=3)
    model = Transformer.from_pretrained(tmp_path)
    prompts = random_prompts([5, 12])
    for prompt, completion in zip(prompts, generate(model, prompts, max_new_tokens=24, temperature=0)):
        with torch.no_grad():
            reference = hf_model.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False,
                                          eos_token_id=None, pad_token_id=0)
        assert completion.tokens == reference[0, len(prompt):].tolist()


@pytest.mark.parametrize("packed, n, block_size, new_tokens", [
    (False, 1, None, 20), (True, 1, None, 20), (False, 3, None, 20), (True, 3, None, 20), (False, 3, 3, 20),
    (True, 3, 4, 20), (True, 1, 1, 20), (False, 1, None, COLUMN_MAJOR_MIN_NEW_TOKENS)])
def test_cached_decode_equals_full_recomputation(checkpoint, packed, n, block_size, new_tokens):
    """n > 1: the siblings of a prompt decode from its prefilled cache, every position of it: a copy of its one
    block, or (small blocks) its full blocks shared and its last one copied. The long call decodes with the
    column-major weights (sampler.column_major_projections)."""
    _, model = checkpoint
    prompts = random_prompts([4, 9, 2])
    completions = generate(model, prompts, max_new_tokens=new_tokens, temperature=1.0, seed=1, logprobs_mode="raw",
                           packed_prefill=packed, n=n, block_size=block_size)
    for prompt, completion in zip([p for p in prompts for _ in range(n)], completions, strict=True):
        sequence = torch.tensor([prompt + completion.tokens])
        with torch.no_grad():
            logprobs = torch.log_softmax(model(sequence)[0], dim=-1)  # (T, V)
        positions = torch.arange(len(prompt) - 1, sequence.shape[1] - 1)
        expected = logprobs[positions, sequence[0, positions + 1]]
        assert torch.allclose(torch.tensor(completion.logprobs), expected, atol=1e-5)


@pytest.mark.parametrize("tied", [False, True])
def test_projection_weights_are_column_major_while_sampling_and_restored_after(tmp_path, tied):
    """sampler.column_major_projections: inside a CPU float32 generate call of at most COLUMN_MAJOR_MAX_SEQUENCES
    sequences and at least COLUMN_MAJOR_MIN_NEW_TOKENS new tokens, every projection weight and the LM head (the
    embedding, when tied) are (out, in) tensors with strides (1, out); after the call, also one that fails midway,
    the model holds what it held: the same Parameter objects, row-major, the same values, no inference tensors (a
    training step runs backward through them). Larger batches, shorter calls and bfloat16 leave the layout alone."""

    write_hf_checkpoint(tmp_path, seed=3, tie_word_embeddings=tied)
    model = Transformer.from_pretrained(tmp_path)
    assert (model.lm_head_weight is model.model.embed_tokens.weight) == tied
    parameters = dict(model.named_parameters())
    before = {name: p.detach().clone() for name, p in parameters.items()}
    projections = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)] + [model.lm_head_weight]
    layouts, failures = [], [RuntimeError("a failure mid-call")]

    def progress(completion):  # called inside the call, when a completion finishes
        layouts.append([w.stride() == (1, w.shape[0]) for w in projections])
        if failures:
            raise failures.pop()

    long_enough = sampler.COLUMN_MAJOR_MIN_NEW_TOKENS
    with pytest.raises(RuntimeError, match="mid-call"):
        generate(model, random_prompts([3, 5]), max_new_tokens=long_enough, seed=0, progress=progress)
    generate(model, random_prompts([3, 5]), max_new_tokens=long_enough, seed=0, progress=progress)
    assert len(layouts) == 3 and all(all(layout) for layout in layouts)
    assert all(model.get_parameter(name) is p for name, p in parameters.items())  # the optimizer's objects
    for name, parameter in model.named_parameters():
        assert parameter.is_contiguous() and not parameter.is_inference(), name
        assert torch.equal(parameter, before[name]), name
    model(torch.tensor([[1, 2, 3]])).logsumexp(-1).sum().backward()
    assert all(p.grad is not None for p in projections)

    layouts.clear()
    generate(model, random_prompts([3]), max_new_tokens=long_enough - 1, seed=0, progress=progress)
    generate(model, random_prompts([3]), max_new_tokens=long_enough, n=sampler.COLUMN_MAJOR_MAX_SEQUENCES + 1, seed=0,
             progress=progress)
    generate(model.to(torch.bfloat16), random_prompts([3]), max_new_tokens=long_enough, seed=0, progress=progress)
    assert layouts == [[False] * len(projections)] * (2 + sampler.COLUMN_MAJOR_MAX_SEQUENCES + 1)


def test_finished_sequences_holes_are_filled_so_decoding_reads_views(checkpoint, monkeypatch):
    """On a CPU each sequence is one block. As sequences stop at different steps, the highest running ones move into
    the holes (_Scheduler.compact), so every decode run's blocks stay consecutive in row order (the view path, no
    gather); the moved sequences keep their keys and values: each log-prob is the full recomputation's."""

    _, model = checkpoint
    prompts = random_prompts([4, 9, 2, 7, 5, 3])
    kwargs = dict(max_new_tokens=20, n=2, seed=1, logprobs_mode="raw")
    free_run = [c.tokens for c in generate(model, prompts, **kwargs)]
    # the token whose first appearance falls at the most distinct steps: completions stop apart, leaving holes
    stop = max({t for tokens in free_run for t in tokens}, key=lambda t: len({tokens.index(t) for tokens in free_run
                                                                             if t in tokens[:15]}))
    tables, moves = [], []
    decode_eager, compact = sampler._decode_eager, sampler._Scheduler.compact

    def recording_decode_eager(model, cache, tokens, positions, keys, block_table, *rest):
        tables.append(block_table.clone())
        return decode_eager(model, cache, tokens, positions, keys, block_table, *rest)

    monkeypatch.setattr(sampler, "_decode_eager", recording_decode_eager)

    def recording_compact(scheduler):
        done = compact(scheduler)
        moves.extend(done)
        return done

    monkeypatch.setattr(sampler._Scheduler, "compact", recording_compact)
    stats = {}
    completions = generate(model, prompts, stop_token_ids=[stop], stats=stats, **kwargs)
    assert {c.finish_reason for c in completions} == {"stop", "length"}
    assert moves and stats["free_blocks_at_end"] == stats["blocks"]
    for table in tables:
        assert table.shape[1] == 1 and torch.equal(table[:, 0], table[0, 0] + torch.arange(len(table)))
    for prompt, completion in zip([p for p in prompts for _ in range(2)], completions, strict=True):
        sequence = torch.tensor([prompt + completion.tokens])
        with torch.no_grad():
            logprobs = torch.log_softmax(model(sequence)[0], dim=-1)
        positions = torch.arange(len(prompt) - 1, sequence.shape[1] - 1)
        assert torch.allclose(torch.tensor(completion.logprobs), logprobs[positions, sequence[0, positions + 1]],
                              atol=1e-5)


def test_stop_ids_and_max_new_tokens_per_sequence(checkpoint):
    _, model = checkpoint
    prompts = random_prompts([6, 3, 8, 5])
    free_run = generate(model, prompts, max_new_tokens=30, temperature=0)
    stop_token = free_run[1].tokens[4]  # stop prompt 1 at its 5th token (or earlier)
    stopped = generate(model, prompts, max_new_tokens=30, temperature=0, stop_token_ids=[stop_token])
    for before, after in zip(free_run, stopped):
        if stop_token in before.tokens:
            cut = before.tokens.index(stop_token) + 1
            assert after.tokens == before.tokens[:cut] and after.finish_reason == "stop"
        else:
            assert after.tokens == before.tokens and after.finish_reason == "length"
    assert stopped[1].finish_reason == "stop" and len(stopped[1].tokens) <= 5


def test_continuous_batching_equals_one_by_one(checkpoint):
    _, model = checkpoint
    prompts = random_prompts([3, 11, 6, 1, 9, 4, 7])
    stop = generate(model, prompts[:1], max_new_tokens=12, temperature=0)[0].tokens[2]
    batched = generate(model, prompts, max_new_tokens=12, temperature=0, stop_token_ids=[stop], max_slots=2)
    alone = [generate(model, [p], max_new_tokens=12, temperature=0, stop_token_ids=[stop])[0] for p in prompts]
    assert [c.tokens for c in batched] == [c.tokens for c in alone]
    assert [c.prompt_index for c in batched] == list(range(len(prompts)))


def test_n_samples_share_a_prefill_differ_and_are_seeded(checkpoint, monkeypatch):

    _, model = checkpoint
    prompts = random_prompts([5, 8])
    prefills = []
    original = sampler._prefill
    monkeypatch.setattr(sampler, "_prefill", lambda m, c, p, *rest: prefills.append(len(p)) or original(m, c, p, *rest))
    first = generate(model, prompts, max_new_tokens=16, n=4, seed=7)
    assert sum(prefills) == 2  # one prefill per prompt, not per sample
    assert [c.prompt_index for c in first] == [0, 0, 0, 0, 1, 1, 1, 1]
    assert len({tuple(c.tokens) for c in first[:4]}) > 1
    again = generate(model, prompts, max_new_tokens=16, n=4, seed=7)
    assert [c.tokens for c in first] == [c.tokens for c in again]
    other = generate(model, prompts, max_new_tokens=16, n=4, seed=8)
    assert [c.tokens for c in first] != [c.tokens for c in other]


def expected_probabilities(logits, temperature, top_k, top_p):
    """Written from the definitions, one token at a time."""
    scaled = [l / temperature for l in logits]
    order = sorted(range(len(scaled)), key=lambda i: -scaled[i])
    keep = set(order[:top_k] if top_k else order)
    total = sum(math.exp(scaled[i]) for i in keep)
    kept_sorted = [i for i in order if i in keep]
    nucleus, mass = set(), 0.0
    for i in kept_sorted:
        if mass >= top_p:
            break
        nucleus.add(i)
        mass += math.exp(scaled[i]) / total
    z = sum(math.exp(scaled[i]) for i in nucleus)
    return [math.exp(scaled[i]) / z if i in nucleus else 0.0 for i in range(len(logits))]


@pytest.mark.parametrize("temperature, top_k, top_p", [(1.0, 0, 1.0), (0.7, 0, 1.0), (1.3, 3, 1.0), (1.0, 0, 0.8),
                                                       (0.9, 4, 0.9)])
def test_sampling_distribution_chi_square(temperature, top_k, top_p):
    logits = [2.0, 1.5, 1.0, 0.3, 0.0, -0.5, -1.0, -2.0]
    expected = expected_probabilities(logits, temperature, top_k, top_p)
    draws = 40_000
    generator = torch.Generator().manual_seed(0)
    tokens, logprobs = sample_next(torch.tensor([logits]).repeat(draws, 1), temperature, top_k, top_p, generator)
    counts = torch.bincount(tokens, minlength=len(logits)).tolist()
    support = [i for i, p in enumerate(expected) if p > 0]
    assert all(counts[i] == 0 for i in range(len(logits)) if expected[i] == 0)
    chi_square = sum((counts[i] - draws * expected[i]) ** 2 / (draws * expected[i]) for i in support)
    # 99.9% quantile of chi-square with up to 7 degrees of freedom is 24.3
    assert chi_square < 24.3, (counts, expected)
    for token, logprob in zip(tokens[:50].tolist(), logprobs[:50].tolist()):
        assert abs(logprob - math.log(expected[token])) < 1e-5


@pytest.mark.parametrize("temperature, top_k, top_p", [(0.7, 0, 1.0), (1.0, 3, 1.0), (1.0, 0, 0.8),
                                                       (1.3, 4, 0.9)])
def test_generate_first_token_frequencies(tmp_path, temperature, top_k, top_p):
    """generate() itself (prefill, the n copies, its sampling settings) draws the first token with the
    probabilities written from the definitions, over a model with an 8-token vocabulary."""
    write_hf_checkpoint(tmp_path, family="qwen2", seed=4, vocab_size=8)
    model = Transformer.from_pretrained(tmp_path)
    with torch.no_grad():
        model.lm_head.weight.mul_(8)  # spread the logits, so that temperature, top-k and top-p matter
        logits = model(torch.tensor([[1, 2, 3]]))[0, -1].tolist()
    expected = expected_probabilities(logits, temperature, top_k, top_p)
    draws = 4000
    completions = generate(model, [[1, 2, 3]], max_new_tokens=1, temperature=temperature, top_k=top_k, top_p=top_p,
                           n=draws, seed=0)
    counts = [0] * 8
    for completion in completions:
        counts[completion.tokens[0]] += 1
    support = [i for i, p in enumerate(expected) if p > 0]
    assert all(counts[i] == 0 for i in range(8) if expected[i] == 0), (counts, expected)
    assert 1 < len(support) < 8 or (top_k, top_p) == (0, 1.0)
    chi_square = sum((counts[i] - draws * expected[i]) ** 2 / (draws * expected[i]) for i in support)
    assert chi_square < 24.3, (counts, expected)  # the 99.9% quantile for up to 7 degrees of freedom


def test_truncation_draws_and_log_probs_match_transformers_warpers_on_random_logits():
    """transformers' TemperatureLogitsWarper, TopKLogitsWarper and TopPLogitsWarper (generate's order) are an
    implementation we did not write: on 300 random rows (2 to 60 tokens, logits of every spread, temperatures, top-k
    and top-p of every kind, all at once too) sample_next must keep their support, return their log-prob of each
    drawn token, and, fed 400 evenly spaced uniforms, draw each token as often as its probability says (inverse
    CDF: within one draw of probability x 400)."""
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    generator = torch.Generator().manual_seed(0)
    pick = lambda options: options[int(torch.randint(len(options), (1,), generator=generator))]
    draws = 400
    uniform = (torch.arange(draws, dtype=torch.float64) + 0.5) / draws
    for _ in range(300):
        vocab = int(torch.randint(2, 61, (1,), generator=generator))
        logits = torch.randn(1, vocab, generator=generator) * pick([0.3, 1.0, 3.0, 8.0])
        temperature, top_k, top_p = pick([0.3, 0.7, 1.0, 1.6]), pick([0, 1, 3, 10, vocab]), pick([1.0, 0.95, 0.8, 0.3])
        warped = TemperatureLogitsWarper(temperature)(None, logits.clone())
        warped = TopKLogitsWarper(top_k)(None, warped) if top_k else warped
        warped = TopPLogitsWarper(top_p)(None, warped) if top_p < 1 else warped
        expected = torch.log_softmax(warped.double(), -1)[0]
        tokens, logprobs = sample_next(logits.expand(draws, vocab), temperature, top_k, top_p, uniform=uniform)
        case = (vocab, temperature, top_k, top_p)
        assert expected[tokens].isfinite().all(), case
        assert (logprobs.double() - expected[tokens]).abs().max() < 1e-5, case
        counts = torch.bincount(tokens, minlength=vocab).double()
        assert (counts - expected.exp() * draws).abs().max() <= 1 + 1e-6, case


def test_tokens_of_tiny_probability_keep_their_share_of_the_draws():
    """One token holds all but 1e-6 of the mass, 31,999 share the rest (3e-11 each): in a float32 running sum their
    steps vanish below the first token's rounding, so a draw could never reach them. The inverse CDF sums in float64:
    the top 1e-6 of the uniforms must land on the tail, spread over it in order, and those just below on the first."""
    vocab, draws = 32_000, 200
    logits = torch.full((1, vocab), math.log(1e-6 / (vocab - 1)))
    logits[0, 0] = 0.0
    uniform = 1 - 1e-6 * (torch.arange(draws, dtype=torch.float64) + 0.5) / draws  # within the tail's share
    tokens, _ = sample_next(logits.expand(draws, vocab), 1.0, uniform=uniform)
    assert (tokens > 0).all() and len(set(tokens.tolist())) > draws * 0.9
    assert (tokens.diff() <= 0).all()  # smaller uniforms, earlier tokens
    below = torch.tensor([1 - 1.001e-6, 1 - 2e-6, 0.5, 1e-9], dtype=torch.float64)
    assert sample_next(logits.expand(4, vocab), 1.0, uniform=below)[0].eq(0).all()


def test_raw_logprobs_are_untruncated_temperature_one():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    token, logprob = sample_next(logits, 0.5, 2, 1.0, torch.Generator().manual_seed(0), logprobs_mode="raw")
    assert torch.allclose(logprob, torch.log_softmax(logits, -1)[0, token])


def test_raw_logprobs_undo_the_temperature_without_truncation():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    token, logprob = sample_next(logits, 0.5, 0, 1.0, torch.Generator().manual_seed(0), logprobs_mode="raw")
    assert torch.allclose(logprob, torch.log_softmax(logits, -1)[0, token])


def test_top_p_keeps_the_smallest_set_that_reaches_p_exactly():
    """The top token holds exactly half the mass: top_p=0.5 keeps it alone, so it is drawn every time at log-prob 0."""
    logits = torch.log(torch.tensor([[2.0, 1.0, 1.0]])).expand(500, 3)
    tokens, logprobs = sample_next(logits, 1.0, 0, 0.5, torch.Generator().manual_seed(0))
    assert tokens.eq(0).all() and logprobs.eq(0).all()


def test_each_token_draws_the_uniform_of_the_position_fed_in(checkpoint, monkeypatch):
    """A completion's k-th token is drawn with counter len(prompt) - 1 + k, the position of the token fed in: the
    first from the prefill's last position, each next one a position later, never one counter twice."""
    _, model = checkpoint
    drawn = []
    real_counter_uniform = sampler.counter_uniform
    monkeypatch.setattr(sampler, "counter_uniform", lambda keys, counters: drawn.append(
        list(zip(keys[:, 0].tolist(), counters.tolist()))) or real_counter_uniform(keys, counters))
    prompts = random_prompts([3, 6])
    completions = generate(model, prompts, max_new_tokens=5, temperature=1.0, n=2, seed=7)
    keys = [sampler.sequence_keys(7, index)[0] for index in range(4)]
    for index, completion in enumerate(completions):
        counters = [counter for call in drawn for key, counter in call if key == keys[index]]
        prompt_length = len(prompts[index // 2])
        assert counters == list(range(prompt_length - 1, prompt_length - 1 + len(completion.tokens))), index


def test_a_stop_token_at_the_last_allowed_position_finishes_with_stop(checkpoint):
    """GRPO's overlong penalty reads finish_reason: a completion that stopped is not cut, even at the limit."""
    _, model = checkpoint
    prompts = random_prompts([5])
    first = generate(model, prompts, max_new_tokens=1, temperature=0)[0]
    assert first.finish_reason == "length"
    stopped = generate(model, prompts, max_new_tokens=1, temperature=0, stop_token_ids=[first.tokens[0]])[0]
    assert stopped.tokens == first.tokens and stopped.finish_reason == "stop"


def test_cache_that_cannot_fit_is_refused(checkpoint):
    _, model = checkpoint
    with pytest.raises(MemoryError, match="GiB"):
        generate(model, [[1, 2]], max_new_tokens=10**9)
    with pytest.raises(ValueError, match="cache_tokens=20 holds less than one sequence"):
        generate(model, [[1, 2]], max_new_tokens=30, cache_tokens=20)


@pytest.mark.parametrize("packed", [False, True])
def test_preempted_sequences_resume_with_the_same_stream(checkpoint, packed):
    """A cache too small for the batch preempts sequences (blocks freed, prefix recomputed on resume): every completion
    keeps the tokens and log-probs of a run with room for all, whatever the block size, the slots or the batch."""
    _, model = checkpoint
    prompts = random_prompts([3, 11, 6, 1, 9, 4, 7, 8])
    kwargs = dict(max_new_tokens=24, n=3, seed=5, logprobs_mode="raw", packed_prefill=packed)
    free_run = [c.tokens for c in generate(model, prompts, **kwargs)]
    # a stop token some completions reach mid-way and others never produce
    kwargs["stop_token_ids"] = [next(t for tokens in free_run for t in tokens[3:12]
                                     if any(t not in other for other in free_run))]
    roomy = generate(model, prompts, **kwargs)
    assert {c.finish_reason for c in roomy} == {"stop", "length"}
    for settings in (dict(block_size=4, cache_tokens=48), dict(block_size=2, cache_tokens=40, sync_every=5),
                     dict(block_size=8, max_slots=3)):
        stats = {}
        squeezed = generate(model, prompts, stats=stats, **kwargs, **settings)
        assert [c.tokens for c in squeezed] == [c.tokens for c in roomy], settings
        assert [c.finish_reason for c in squeezed] == [c.finish_reason for c in roomy]
        for a, b in zip(squeezed, roomy):
            assert a.logprobs == pytest.approx(b.logprobs, abs=1e-5)
        assert stats["free_blocks_at_end"] == stats["blocks"]  # every block back in the pool
        if "cache_tokens" in settings:
            assert stats["preemptions"] > 0 and stats["max_running"] > 1


def test_random_cache_settings_give_the_streams_of_a_roomy_cache(checkpoint):
    """Generated settings: random prompts, samples per prompt, block size, runs between host reads, a cache from
    the smallest the call accepts up to a few blocks more, and a stop token: the same completions as with room for
    all, and every block back in the pool."""
    _, model = checkpoint
    draw = torch.Generator().manual_seed(3)
    pick = lambda low, high: int(torch.randint(low, high + 1, (), generator=draw))
    preemptions = 0
    for case in range(8):
        prompts = random_prompts([pick(1, 12) for _ in range(pick(1, 6))], seed=case)
        n, block_size, max_new_tokens = pick(1, 3), pick(1, 6), pick(1, 20)
        max_len = max(len(p) for p in prompts) + max_new_tokens
        smallest = block_size * max(-(-max_len // block_size),
                                    max(len(p) // block_size + n * (len(p) % block_size > 0) for p in prompts))
        kwargs = dict(max_new_tokens=max_new_tokens, n=n, seed=case, logprobs_mode="raw", stop_token_ids=[pick(3, 300)])
        roomy = generate(model, prompts, **kwargs)
        stats = {}
        squeezed = generate(model, prompts, block_size=block_size, cache_tokens=smallest + block_size * pick(0, 3),
                            sync_every=pick(1, 4), packed_prefill=bool(pick(0, 1)), stats=stats, **kwargs)
        assert [(c.tokens, c.finish_reason) for c in squeezed] == [(c.tokens, c.finish_reason) for c in roomy], case
        for a, b in zip(squeezed, roomy):
            assert a.logprobs == pytest.approx(b.logprobs, abs=1e-5)
        assert stats["free_blocks_at_end"] == stats["blocks"]
        preemptions += stats["preemptions"]
    assert preemptions > 8


def test_a_prompts_samples_share_its_full_blocks(checkpoint):
    """10 prompt tokens in blocks of 4: 2 full blocks held once by the 4 samples, plus each sample's own copy of the
    last, partly filled block: 6 blocks, not 12. Two new tokens still fit in that last block."""
    _, model = checkpoint
    stats = {}
    generate(model, random_prompts([10]), max_new_tokens=2, n=4, seed=0, block_size=4, stats=stats)
    assert stats["peak_blocks"] == 6 and stats["free_blocks_at_end"] == stats["blocks"]
    # samples that finish at their first token hand the shared blocks back too
    stats = {}
    generate(model, random_prompts([8, 10]), max_new_tokens=1, n=4, seed=0, block_size=4, stats=stats)
    assert stats["peak_blocks"] == 2 + 6 and stats["free_blocks_at_end"] == stats["blocks"]


def test_unseeded_calls_follow_torchs_global_seed(checkpoint):
    _, model = checkpoint
    prompts = random_prompts([4, 6])
    torch.manual_seed(11)
    first = [c.tokens for c in generate(model, prompts, max_new_tokens=12, n=2)]
    second = [c.tokens for c in generate(model, prompts, max_new_tokens=12, n=2)]
    torch.manual_seed(11)
    assert [c.tokens for c in generate(model, prompts, max_new_tokens=12, n=2)] == first != second


def test_counter_uniform_is_the_documented_hash_and_uniform():
    """Against the hash written with Python's unbounded ints and an explicit mod 2^32; then 20,000 draws over keys
    and counters fall evenly in 20 bins, and a sequence's successive draws are uncorrelated."""
    from sampler import counter_uniform, sequence_keys

    def mix(x):
        x = ((x ^ (x >> 16)) * 0x21F0AAAD) % 2**32
        x = ((x ^ (x >> 15)) * 0x735A2D97) % 2**32
        return x ^ (x >> 15)

    keys = [sequence_keys(s, i) for s in (0, 2**40 + 3, -7) for i in range(100)]
    counters = [(17 * j + 3) % 5000 for j in range(len(keys))]
    expected = [(mix(mix(a ^ c) ^ b) + 0.5) / 2**32 for (a, b), c in zip(keys, counters)]
    assert counter_uniform(torch.tensor(keys), torch.tensor(counters)).tolist() == expected
    assert len(set(keys)) == len(keys)
    draws = counter_uniform(torch.tensor(keys).repeat_interleave(67, 0), torch.arange(67).repeat(len(keys)))
    counts = torch.histc(draws.float(), bins=20, min=0, max=1)
    expected_count = len(draws) / 20
    assert ((counts - expected_count) ** 2 / expected_count).sum() < 43.8  # chi-square, 19 dof, p = 0.001
    by_sequence = draws.view(len(keys), 67)
    lag_one = torch.corrcoef(torch.stack((by_sequence[:, :-1].reshape(-1), by_sequence[:, 1:].reshape(-1))))[0, 1]
    assert abs(lag_one) < 0.03


@pytest.mark.parametrize("sync_every", [3, 16])
def test_runs_of_steps_between_host_reads_change_nothing(checkpoint, sync_every):
    """Decoding several steps before the host reads them back: a sequence that stops inside a run is cut at its
    stop token, its slot is refilled at the end of the run, and greedy outputs equal step-by-step decoding."""
    _, model = checkpoint
    prompts = random_prompts([3, 11, 6, 1, 9, 4, 7])
    free_run = [c.tokens for c in generate(model, prompts, max_new_tokens=13, temperature=0)]
    # a stop token some completions reach mid-way and others never produce
    stop = next(t for tokens in free_run for t in tokens[3:10] if any(t not in other for other in free_run))
    step_by_step = generate(model, prompts, max_new_tokens=13, temperature=0, stop_token_ids=[stop], max_slots=3)
    in_runs = generate(model, prompts, max_new_tokens=13, temperature=0, stop_token_ids=[stop], max_slots=3,
                       sync_every=sync_every)
    assert [(c.tokens, c.finish_reason) for c in in_runs] == [(c.tokens, c.finish_reason) for c in step_by_step]
    assert any(c.finish_reason == "stop" for c in in_runs) and any(c.finish_reason == "length" for c in in_runs)
    for a, b in zip(in_runs, step_by_step):
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs and the Triton decode kernel need a GPU")
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_cuda_graph_decoding_equals_eager_on_a_gpu(checkpoint, backend, monkeypatch):
    monkeypatch.setenv("DECODE_ATTENTION_BACKEND", backend)  # the whole decode step: the kernels, or torch's ops
    monkeypatch.setenv("ROPE_CACHE_BACKEND", backend)
    model = copy.deepcopy(checkpoint[1]).cuda()  # the module's CPU model stays for the other tests
    prompts = random_prompts([3, 11, 6, 1, 9, 4, 7])
    stop = generate(model, prompts[:1], max_new_tokens=40, temperature=0)[0].tokens[4]
    kwargs = dict(max_new_tokens=40, temperature=0, stop_token_ids=[stop], max_slots=4)
    eager = generate(model, prompts, sync_every=1, **kwargs)
    graphed = generate(model, prompts, cuda_graph=True, sync_every=8, **kwargs)
    assert [c.tokens for c in graphed] == [c.tokens for c in eager]
    # small blocks, and a cache small enough to preempt inside the graph's runs
    stats = {}
    squeezed = generate(model, prompts, cuda_graph=True, sync_every=8, block_size=4, cache_tokens=96, stats=stats,
                        **kwargs)
    assert [c.tokens for c in squeezed] == [c.tokens for c in eager] and stats["preemptions"] > 0
    sampled = generate(model, prompts, max_new_tokens=40, n=3, seed=5, cuda_graph=True, logprobs_mode="raw")
    for prompt, completion in zip([p for p in prompts for _ in range(3)], sampled):
        sequence = torch.tensor([prompt + completion.tokens], device="cuda")
        with torch.no_grad():
            logprobs = torch.log_softmax(model(sequence)[0], dim=-1)
        positions = torch.arange(len(prompt) - 1, sequence.shape[1] - 1, device="cuda")
        expected = logprobs[positions, sequence[0, positions + 1]].cpu()
        # the full forward's attention kernel takes fp32 products in TF32, as torch's matmuls may
        assert torch.allclose(torch.tensor(completion.logprobs), expected, atol=2e-3)


def test_a_sequence_that_fills_its_last_block_exactly_takes_no_other(checkpoint):
    """10 prompt tokens and the 2 decoded ones fill 3 blocks of 4 to the brim: each of the 4 samples holds the 2
    shared blocks and its own third one, 6 in all; a block is taken only for a position past the last one's end."""
    _, model = checkpoint
    stats = {}
    generate(model, random_prompts([10]), max_new_tokens=3, n=4, seed=0, block_size=4, stats=stats)
    assert stats["peak_blocks"] == 6 and stats["free_blocks_at_end"] == stats["blocks"]


def test_a_cache_without_room_for_a_prompts_samples_is_refused(checkpoint):
    """A prompt of 10 tokens in blocks of 4 with 4 samples is admitted only into 2 shared blocks plus a last one per
    sample (6 blocks, 24 tokens): a smaller cache could never admit it, so the call is refused up front, not left to
    run the pool dry. 24 tokens are enough."""
    _, model = checkpoint
    prompts, kwargs = random_prompts([10]), dict(max_new_tokens=2, n=4, seed=0, block_size=4)
    with pytest.raises(ValueError, match="cache_tokens=20 holds less than one sequence"):
        generate(model, prompts, cache_tokens=20, **kwargs)
    assert len(generate(model, prompts, cache_tokens=24, **kwargs)) == 4


def test_a_cache_without_room_for_one_full_length_sequence_is_refused(checkpoint, monkeypatch):
    """A sequence of 2 + 9 = 11 tokens takes 3 blocks of 4 once it has grown: a cache of 2 blocks (8 tokens) could
    admit it but never finish it (preempted, it could never be resumed: the call would loop for ever), so it is
    refused; 12 tokens are enough."""
    _, model = checkpoint
    allocate = sampler.allocate_cache

    def checked_allocate(*args, **kwargs):
        cache = allocate(*args, **kwargs)
        assert (cache.num_blocks - 1) * cache.block_size >= 11, "a cache that cannot hold one sequence accepted"
        return cache

    monkeypatch.setattr(sampler, "allocate_cache", checked_allocate)
    prompts, kwargs = random_prompts([2]), dict(max_new_tokens=9, seed=0, block_size=4)
    with pytest.raises(ValueError, match="cache_tokens=8 holds less than one sequence"):
        generate(model, prompts, cache_tokens=8, **kwargs)
    assert len(generate(model, prompts, cache_tokens=12, **kwargs)[0].tokens) == 9


def test_a_cache_of_tokens_not_a_multiple_of_the_block_size_is_rounded_up_to_whole_blocks(checkpoint):
    """cache_tokens is a floor on the capacity: 50 tokens in blocks of 4 are 13 blocks (52 tokens), not 12."""
    _, model = checkpoint
    stats = {}
    generate(model, random_prompts([3]), max_new_tokens=5, block_size=4, cache_tokens=50, stats=stats)
    assert stats["blocks"] == 13


def test_a_prompt_waits_while_admitting_it_would_preempt_a_running_sequence(checkpoint):
    """Admission keeps free the blocks the running sequences' next run takes: with a cache of 3 blocks of 4 and two
    prompts of one block that each grow into a second, the second prompt waits for the first to finish instead of
    being admitted only to be preempted at once (and recomputed)."""
    _, model = checkpoint
    stats = {}
    completions = generate(model, random_prompts([4, 4]), max_new_tokens=4, seed=0, block_size=4, cache_tokens=12,
                           stats=stats)
    assert [len(c.tokens) for c in completions] == [4, 4]
    assert stats["preemptions"] == 0 and stats["max_running"] == 1


def test_the_newest_sequence_is_preempted_and_resumes_before_new_prompts(checkpoint, monkeypatch):
    """When the pool runs dry the running sequence admitted first the latest is preempted (it has the least work to
    redo), also when some have been preempted and resumed before. It waits at the head of the queue: no new prompt
    is admitted before it resumes."""
    _, model = checkpoint
    first_admitted, waiting, preemptions = {}, set(), []
    admit, preempt = sampler._Scheduler.admit, sampler._Scheduler.preempt

    def recording_admit(scheduler):
        groups = admit(scheduler)
        for _, members, resumed in groups:
            for slot in members:
                index = scheduler.active[slot].index
                if resumed:
                    waiting.remove(index)
                else:
                    assert not waiting, f"completion {index} admitted while {waiting} wait to resume"
                    first_admitted[index] = len(first_admitted)
        return groups

    def recording_preempt(scheduler, slot):
        victim = scheduler.active[slot].index
        newest = max((q.index for q in scheduler.active.values()), key=first_admitted.get)
        preemptions.append(victim)
        assert victim == newest, (victim, newest)
        waiting.add(victim)
        preempt(scheduler, slot)

    monkeypatch.setattr(sampler._Scheduler, "admit", recording_admit)
    monkeypatch.setattr(sampler._Scheduler, "preempt", recording_preempt)
    prompts = random_prompts([3, 11, 6, 1, 9, 4, 7, 8])
    generate(model, prompts, max_new_tokens=24, n=3, seed=5, block_size=2, cache_tokens=40, sync_every=5)
    assert len(preemptions) > len(set(preemptions))  # some sequence was preempted again after it resumed


def test_a_retired_slots_table_row_points_at_block_zero_only():
    """The CUDA graph decodes every slot, an idle one at position 0 through its table row, and reads each row's
    whole table: a slot whose sequence finished or was preempted must point at block 0 only, and a slot refilled by
    a shorter sequence at block 0 past its blocks, or a write lands in a block handed out again. Checked on the
    scheduler alone: the CPU path never reads those entries."""
    scheduler = sampler._Scheduler([[1] * 9, [2] * 2, [3] * 5], 1, 1, 3, 4, 12, 1, {7}, None)
    [(_, [slot], _)] = scheduler.admit()
    blocks = scheduler.active[slot].blocks
    assert len(blocks) == 3 and scheduler.tables[slot].tolist() == blocks
    scheduler.record(slot, 7, 0.0)  # the stop token: finished
    assert scheduler.tables[slot].tolist() == [0, 0, 0] and not scheduler.active
    [(_, [slot], _)] = scheduler.admit()
    assert scheduler.tables[slot].tolist() == scheduler.active[slot].blocks + [0, 0]
    scheduler.record(slot, 5, 0.0)
    scheduler.preempt(slot)
    assert scheduler.tables[slot].tolist() == [0, 0, 0] and not scheduler.active


def test_the_smallest_cache_the_call_accepts_finishes_every_completion(checkpoint, monkeypatch):
    """Prompts of one block of 4 growing into a second, with a cache of 2 blocks: a sequence whose run needs just the
    blocks left takes them (not preempting itself), and a group is admitted while the pool holds its prefill even if
    not yet its samples' growth (the running ones are then preempted in turn). Otherwise no work is ever admitted or
    finished: the call would loop for ever, so the scheduler's rounds are counted and bounded here."""
    _, model = checkpoint
    rounds, admit = [], sampler._Scheduler.admit

    def bounded_admit(scheduler):  # called once per round of generate's loop
        rounds.append(1)
        assert len(rounds) < 500, "no progress"
        return admit(scheduler)

    monkeypatch.setattr(sampler._Scheduler, "admit", bounded_admit)
    for n in (1, 2):
        roomy = generate(model, random_prompts([4]), max_new_tokens=4, n=n, seed=0, logprobs_mode="raw")
        squeezed = generate(model, random_prompts([4]), max_new_tokens=4, n=n, seed=0, logprobs_mode="raw",
                            block_size=4, cache_tokens=8)
        assert [c.tokens for c in squeezed] == [c.tokens for c in roomy] and len(squeezed[0].tokens) == 4
        rounds.clear()
