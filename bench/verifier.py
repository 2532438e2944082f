"""
Verifier throughput: GSM8K/AIME-style items per second through verify_batch, beside Math-Verify on the same items
when it is installed (pip install math-verify; it is a peer, not a dependency).

    python bench/verifier.py [--items 5000] [--data_dir ../shared/data]

Items are r1-style completions (a reasoning block, then a boxed answer) built from GSM8K test golds when the data
is present, else from random integers; half are right, a quarter near misses, a quarter written differently
(thousands separators, "18.0", "\\$18").
"""

import argparse
import json
import os
import random
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from verifier import get_pool, verify_batch  # noqa: E402


def make_items(count, data_dir, seed=0):
    rng = random.Random(seed)
    path = os.path.join(data_dir, "gsm8k", "test.jsonl")
    if os.path.exists(path):
        golds = [json.loads(line)["answer"].split("####")[-1].strip() for line in open(path)]
    else:
        golds = [str(rng.randint(0, 999)) for _ in range(1000)]
    items = []
    for _ in range(count):
        gold = rng.choice(golds)
        value = int(gold.replace(",", "")) if gold.lstrip("-").replace(",", "").isdigit() else 7
        kind = rng.random()
        answer = (str(value) if kind < 0.5 else str(value + rng.choice([-1, 1, 10])) if kind < 0.75
                  else rng.choice([f"{value:,}", f"{value}.0", f"\\${value}", f"{value} \\text{{ dollars}}"]))
        reasoning = " ".join(f"Step {k}: {rng.randint(1, 99)} + {rng.randint(1, 99)} = ..." for k in range(40))
        items.append((f"<think>\n{reasoning}\n</think>\n\nThe answer is $\\boxed{{{answer}}}$.", gold))
    return items


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--items", type=int, default=5000)
    parser.add_argument("--data_dir", default=os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data"))
    args = parser.parse_args()
    items = make_items(args.items, args.data_dir)
    get_pool()  # start the workers outside the timed region, as a training run does once
    start = time.perf_counter()
    verdicts = verify_batch(items)
    ours = len(items) / (time.perf_counter() - start)
    print(f"ours (verify_batch, {os.cpu_count()} cores): {ours:,.0f} items/s, "
          f"{sum(v.correct for v in verdicts) / len(items):.3f} judged correct")
    try:
        from math_verify import parse, verify
    except ImportError:
        print("Math-Verify is not installed: pip install math-verify to time the peer")
        return
    start = time.perf_counter()
    peer_correct = sum(verify(parse(gold), parse(completion)) for completion, gold in items)
    peer = len(items) / (time.perf_counter() - start)
    print(f"Math-Verify (single process): {peer:,.0f} items/s, {peer_correct / len(items):.3f} judged correct")
    print(f"ratio ours / Math-Verify: {ours / peer:.1f}x")


if __name__ == "__main__":
    main()
