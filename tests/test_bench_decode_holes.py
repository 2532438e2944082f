"""bench/decode_holes.py on a tiny budget, so that it cannot rot: both sides timed, the same completions, and the
compacted side's moves restored afterwards."""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_times_both_sides_on_completions_that_stop_apart(capsys):
    sys.path.insert(0, ROOT)
    import sampler
    from bench.decode_holes import main

    compact = sampler._Scheduler.compact
    seconds = main(["--prompts=2", "--group_size=4", "--max_new_tokens=12", "--vocab=6", "--repeat=1"])
    assert sampler._Scheduler.compact is compact
    assert set(seconds) == {"compacted", "gathered"} and all(len(v) == 1 and v[0] > 0 for v in seconds.values())
    out = capsys.readouterr().out
    assert "8 completions (2 prompts x 4) of 1-12 tokens" in out and "compacted  best" in out
