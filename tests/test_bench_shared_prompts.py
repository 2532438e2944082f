"""bench/shared_prompts.py on a tiny budget, so that it cannot rot: both layouts timed on the same rows."""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_times_both_layouts_on_rows_with_completions_at_the_limit(capsys):
    sys.path.insert(0, ROOT)
    from bench.shared_prompts import main, rows

    seconds = main(["--max_new_tokens=8", "--repeat=1"])
    assert set(seconds) == {"buckets of 16", "one batch"} and all(len(v) == 1 and v[0] > 0 for v in seconds.values())
    assert "64 completions of 1-8 tokens" in capsys.readouterr().out
    ids, mask, prompt_lengths, lengths = rows(8, truncated=1.0)
    assert bool(((lengths - prompt_lengths) == 8).all()) and int(mask.sum()) == 64 * 8
