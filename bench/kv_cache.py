"""
The paged KV cache against the per-slot layout it replaced, in the same memory: how many sequences decode at once,
and the throughput that follows, when max_new_tokens is long and most completions stop far earlier.

    python bench/kv_cache.py                          # CPU: max_new_tokens 8192, 96 sequences, ~10 minutes
    python bench/kv_cache.py --device cuda --sequences 512 --slots 32

The per-slot layout is generate() with one block per sequence (block_size = the whole max length) and a cache of
--slots full-length sequences: what the sampler allocated before the cache was paged, at most --slots sequences at
once whatever their lengths. The paged run gets the same number of bytes in blocks of --block_size tokens and up to
--max_running sequences; when its blocks run out it preempts and resumes sequences (counted). On a GPU both decode
through the CUDA graph and the Triton kernels; on a CPU the paged run's torch attention gathers each sequence's
blocks at every step (a copy the per-slot layout's views avoid), so there its throughput lags its concurrency.

Lengths like R1 rollouts: the model is random with a zero LM head, so every token, the stop token included, has
probability 1/--vocab at every step: lengths are geometric with mean --vocab (2,048 by default), 1.8% of them cut
at 8,192. Both runs sample the same tokens (the streams are seeded per sequence, and all logits are 0), so they do
the same work; the script checks that.
"""

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from model import KVCache, ModelConfig, Transformer, init_weights  # noqa: E402
from sampler import generate  # noqa: E402


def uniform_model(vocab, device):
    """A small random model whose every next-token distribution is uniform: its LM head is zero."""
    config = ModelConfig(vocab_size=vocab, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16384,
                         torch_dtype="float32")
    model = Transformer(config)
    init_weights(model, seed=0)
    with torch.no_grad():
        model.lm_head.weight.zero_()
    return model.to(device).eval()


def run(model, prompts, args, block_size, cache_tokens, max_slots):
    stats = {}
    if model.lm_head_weight.is_cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    completions = generate(model, prompts, args.max_new_tokens, stop_token_ids=[0], seed=0, max_slots=max_slots,
                           block_size=block_size, cache_tokens=cache_tokens, stats=stats,
                           cuda_graph=model.lm_head_weight.is_cuda)
    if model.lm_head_weight.is_cuda:
        torch.cuda.synchronize()
    return completions, stats, time.perf_counter() - start


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--sequences", type=int, default=96)
    parser.add_argument("--prompt_len", type=int, default=64)
    parser.add_argument("--max_new_tokens", type=int, default=8192)
    parser.add_argument("--vocab", type=int, default=2048, help="the mean completion length")
    parser.add_argument("--slots", type=int, default=6, help="full-length sequences the memory holds")
    parser.add_argument("--block_size", type=int, default=16)
    parser.add_argument("--max_running", type=int, default=256, help="the paged run's bound on running sequences")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model = uniform_model(args.vocab, device)
    prompts = torch.randint(1, args.vocab, (args.sequences, args.prompt_len),
                            generator=torch.Generator().manual_seed(0)).tolist()
    max_len = args.prompt_len + args.max_new_tokens
    cache_tokens = args.slots * max_len
    cache_bytes = cache_tokens * KVCache.bytes_per_token(model.config, torch.float32)
    print(f"device {args.device} | {args.sequences} sequences | prompt {args.prompt_len} | max_new_tokens "
          f"{args.max_new_tokens} | mean length {args.vocab} (geometric) | cache {cache_tokens:,} tokens "
          f"({cache_bytes / 2**20:.0f} MiB) in both runs | threads {torch.get_num_threads()}")
    per_slot = run(model, prompts, args, max_len, cache_tokens, args.slots)
    paged = run(model, prompts, args, args.block_size, cache_tokens, args.max_running)
    if [c.tokens for c in per_slot[0]] != [c.tokens for c in paged[0]]:
        raise SystemExit("the two layouts sampled different completions: the comparison is void")
    lengths = sorted(len(c.tokens) for c in paged[0])
    tokens = sum(lengths)
    print(f"completion lengths: median {lengths[len(lengths) // 2]:,}, max {lengths[-1]:,}, "
          f"{sum(n == args.max_new_tokens for n in lengths)} cut at max_new_tokens; {tokens:,} tokens in all")
    print(f"{'layout':>18} {'block':>6} {'running, queue not empty':>25} {'mean running':>13} {'max running':>12} "
          f"{'preemptions':>12} {'decode steps':>13} {'seconds':>8} {'tokens/s':>9}")
    rows = []
    for name, (_, stats, seconds) in (("per-slot (before)", per_slot), ("paged", paged)):
        row = dict(layout=name, seconds=seconds, tokens_per_s=tokens / seconds, **stats)
        rows.append(row)
        print(f"{name:>18} {stats['block_size']:>6} {stats['mean_running_queued']:>25.1f} "
              f"{stats['mean_running']:>13.1f} {stats['max_running']:>12} {stats['preemptions']:>12} {stats['decode_steps']:>13,} {seconds:>8.1f} "
              f"{tokens / seconds:>9,.0f}")
    held = paged[1]["mean_running_queued"] / per_slot[1]["mean_running_queued"]
    print(f"paged / per-slot: {held:.2f}x the sequences the cache holds at once (while work waits), "
          f"{paged[1]['mean_running'] / per_slot[1]['mean_running']:.2f}x over the whole run (the last long completions run alone in both), "
          f"{per_slot[1]['decode_steps'] / paged[1]['decode_steps']:.2f}x fewer decode steps, "
          f"{per_slot[2] / paged[2]:.2f}x the throughput")
    return rows


if __name__ == "__main__":
    main()
