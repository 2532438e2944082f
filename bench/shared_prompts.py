"""
Forward+backward of GRPO's shared-prompt training pass (model.shared_prompt_logprobs) with the completions'
attention in buckets of COMPLETIONS_PER_BUCKET against one batch padded to the longest completion (a bucket size of
at least the completions' count), on the same rows, in the same process.

    python bench/shared_prompts.py                          # 8 prompts x 8 completions, up to 64 tokens
    python bench/shared_prompts.py --max_new_tokens 256

The model is bench/grpo_step.py's (a random Qwen2 of hidden 128, 4 layers, a 128-id vocabulary). Each prompt is 40-58
random tokens; each completion is max_new_tokens long with probability --truncated (the share that hits the limit),
else uniform in [1, max_new_tokens). Timing: CPU time of the process (time.process_time, so that another job's use
of the cores counts less than in wall time), one thread, after one untimed call, best and median of --repeat calls
per bucket size, the sizes alternated.
"""

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import model as model_module  # noqa: E402
from bench.grpo_step import MODEL  # noqa: E402
from model import ModelConfig, Transformer, init_weights, shared_prompt_logprobs  # noqa: E402


def rows(max_new_tokens, truncated, prompts=8, group=8, seed=0):
    """Right-padded (prompt + completion) ids, the loss mask of the completions, prompt lengths and row lengths."""
    generator = torch.Generator().manual_seed(seed)
    pairs = []
    for _ in range(prompts):
        prompt = torch.randint(3, 128, (int(torch.randint(40, 59, (), generator=generator)),), generator=generator)
        for _ in range(group):
            hits_limit = torch.rand((), generator=generator) < truncated
            length = max_new_tokens if hits_limit else int(torch.randint(1, max_new_tokens, (), generator=generator))
            pairs.append((prompt.tolist(), torch.randint(3, 128, (length,), generator=generator).tolist()))
    width = max(len(p) + len(c) for p, c in pairs)
    ids, mask = torch.zeros(len(pairs), width, dtype=torch.long), torch.zeros(len(pairs), width, dtype=torch.long)
    for i, (p, c) in enumerate(pairs):
        ids[i, : len(p) + len(c)] = torch.tensor(p + c)
        mask[i, len(p): len(p) + len(c)] = 1
    return ids, mask, torch.tensor([len(p) for p, _ in pairs]), torch.tensor([len(p) + len(c) for p, c in pairs])


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--max_new_tokens", type=int, default=64)
    parser.add_argument("--truncated", type=float, default=0.23, help="share of completions at the limit")
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = init_weights(Transformer(ModelConfig(vocab_size=128, qkv_bias=True, **MODEL)), seed=0).train()
    ids, mask, prompt_lengths, lengths = rows(args.max_new_tokens, args.truncated)
    completion_lengths = (lengths - prompt_lengths).tolist()

    def step():
        logprobs = shared_prompt_logprobs(model, ids, prompt_lengths, lengths, loss_mask=mask)
        logprobs.sum().backward()

    sizes = {"buckets of 16": 16, "one batch": len(ids)}
    seconds = {name: [] for name in sizes}
    for name, size in sizes.items():  # untimed first call of each
        model_module.COMPLETIONS_PER_BUCKET = size
        step()
    for _ in range(args.repeat):
        for name, size in sizes.items():
            model_module.COMPLETIONS_PER_BUCKET = size
            start = time.process_time()
            step()
            seconds[name].append(time.process_time() - start)
    print(f"{len(ids)} completions of 1-{args.max_new_tokens} tokens ({sum(completion_lengths)} in all, "
          f"{sum(n == args.max_new_tokens for n in completion_lengths)} at the limit) after 8 prompts of "
          f"{int(prompt_lengths.min())}-{int(prompt_lengths.max())}; forward+backward, CPU ms, 1 thread, "
          f"{args.repeat} alternated calls each")
    for name, values in seconds.items():
        ordered = sorted(values)
        print(f"  {name:<14} best {ordered[0] * 1e3:8.1f}  median {ordered[len(ordered) // 2] * 1e3:8.1f}")
    return seconds


if __name__ == "__main__":
    main()
