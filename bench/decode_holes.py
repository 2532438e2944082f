"""
A GRPO rollout on a CPU, with and without _Scheduler.compact: all of a step's completions start together and stop at
different steps, so without compaction the running sequences' blocks get holes after the first stop and every later
decode step gathers every row's keys and values; with it the highest running sequence moves into each hole and the
steps read views of the cache. Both sides sample the same completions (checked).

    python bench/decode_holes.py                          # bench/grpo_step.py's shape: 8 prompts x 8, 64 tokens
    python bench/decode_holes.py --prompts 16             # a rank of the demo's GRPO step (16 prompts x 8)

The model is bench/grpo_step.py's (a random Qwen2 of hidden 128, 4 layers) with a zero LM head, so every next-token
distribution is uniform over --vocab ids and the completions' lengths are geometric with mean --vocab, cut at
max_new_tokens (with the default 64 and 64, about 63% stop early). Timing: CPU time of the process
(time.process_time), one thread, after one untimed call of each side, best and median of --repeat calls per side,
the sides alternated.
"""

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import sampler  # noqa: E402
from bench.grpo_step import MODEL  # noqa: E402
from model import ModelConfig, Transformer, init_weights  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--group_size", type=int, default=8)
    parser.add_argument("--max_new_tokens", type=int, default=64)
    parser.add_argument("--vocab", type=int, default=64, help="the mean completion length before the cut")
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    model = init_weights(Transformer(ModelConfig(vocab_size=args.vocab, qkv_bias=True,
                                                 **dict(MODEL, tie_word_embeddings=False))), seed=0).eval()
    with torch.no_grad():
        model.lm_head.weight.zero_()
    generator = torch.Generator().manual_seed(0)
    prompts = [torch.randint(1, args.vocab, (int(torch.randint(40, 59, (), generator=generator)),),
                             generator=generator).tolist() for _ in range(args.prompts)]
    compact = sampler._Scheduler.compact
    sides = {"compacted": compact, "gathered": lambda scheduler: []}
    completions, seconds = {}, {name: [] for name in sides}

    def call(name):
        sampler._Scheduler.compact = sides[name]
        try:
            start = time.process_time()
            completions[name] = sampler.generate(model, prompts, args.max_new_tokens, n=args.group_size,
                                                 stop_token_ids=[0], seed=0)
            return time.process_time() - start
        finally:
            sampler._Scheduler.compact = compact

    for name in sides:  # untimed first call of each
        call(name)
    for _ in range(args.repeat):
        for name in sides:
            seconds[name].append(call(name))
    if [c.tokens for c in completions["compacted"]] != [c.tokens for c in completions["gathered"]]:
        raise SystemExit("the two sides sampled different completions: the comparison is void")
    lengths = [len(c.tokens) for c in completions["compacted"]]
    print(f"{len(lengths)} completions ({args.prompts} prompts x {args.group_size}) of 1-{args.max_new_tokens} "
          f"tokens ({sum(lengths)} in all, {sum(n == args.max_new_tokens for n in lengths)} at the limit); generate, "
          f"CPU ms, 1 thread, {args.repeat} alternated calls each")
    for name, values in seconds.items():
        ordered = sorted(values)
        print(f"  {name:<10} best {ordered[0] * 1e3:8.1f}  median {ordered[len(ordered) // 2] * 1e3:8.1f}")
    return seconds


if __name__ == "__main__":
    main()
