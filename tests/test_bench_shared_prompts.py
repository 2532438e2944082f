"""bench/shared_prompts.py on a tiny budget, so that it cannot rot: both layouts timed on the same rows."""

import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_times_both_layouts_on_rows_with_completions_at_the_limit(capsys):
    sys.path.insert(0, ROOT)
    from bench.shared_prompts import main, rows

    seconds = main(["--max_new_tokens=8", "--repeat=1"])
    assert set(seconds) == {"buckets of 16", "one batch"} and all(len(v) == 1 and v[0] > 0 for v in seconds.values())
    assert "64 completions of 1-8 tokens" in capsys.readouterr().out
    ids, mask, prompt_lengths, lengths = rows(8, truncated=1.0)
    assert bool(((lengths - prompt_lengths) == 8).all()) and int(mask.sum()) == 64 * 8


def test_rows_mask_exactly_each_completion_and_short_ones_stay_below_the_limit():
    """The loss mask covers a row's completion tokens and nothing else (not the prompt's last token, not the
    padding), and a completion that does not hit the limit is shorter than it (uniform in [1, max_new_tokens))."""
    sys.path.insert(0, ROOT)
    from bench.shared_prompts import rows

    ids, mask, prompt_lengths, lengths = rows(8, truncated=0.0)
    positions = torch.arange(ids.shape[1])[None, :]
    expected = (positions >= prompt_lengths[:, None]) & (positions < lengths[:, None])
    assert torch.equal(mask.bool(), expected)
    assert bool(((lengths - prompt_lengths) >= 1).all()) and bool(((lengths - prompt_lengths) < 8).all())
    real = positions < lengths[:, None]
    assert bool((ids[~real] == 0).all()) and bool((ids[real] >= 3).all())  # zero padding, tokens from id 3
