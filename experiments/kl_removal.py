"""
Question 2, KL removal: does the KL penalty to the reference matter? GRPO from the same SFT checkpoint (one per seed)
with no reference model at all (--beta=0, as DAPO and Dr. GRPO) against DeepSeekMath's k3 reverse estimate in the
loss at beta 0.04 (its value) and 0.4. For every run: held-out accuracy, and, measured the same way for all of
them (experiments/harness.drift), the exact KL of the final policy to the SFT start both ways, its entropy and its
completion length.

    python experiments/kl_removal.py [--seeds=0,1,2] [--quick] [--out=DIR] [--rerun] [--jobs=N] [--sft_steps=N]

Budget (experiments/harness.py): the demo model (0.6M parameters), SFT 1200 steps of 32 examples (shared with the
other questions), GRPO 80 steps of 8 prompts x 8 samples at lr 5e-5, 200 held-out problems; the seeds side by side.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import Experiment, drift  # noqa: E402

ARMS = {"beta=0 (no reference)": ["--beta=0"],
        "k3 reverse in loss, beta=0.04": ["--beta=0.04", "--kl_estimator=k3", "--kl_direction=reverse", "--kl_in=loss"],
        "k3 reverse in loss, beta=0.4": ["--beta=0.4", "--kl_estimator=k3", "--kl_direction=reverse", "--kl_in=loss"]}


def main(argv=None):
    exp = Experiment("kl_removal", "Question 2: removing the KL penalty", argv, __doc__.split("\n\n")[0])
    for seed in exp.seeds:
        sft = exp.base_sft(seed)
        for setting, flags in ARMS.items():
            run = exp.base_grpo(seed) if flags == ["--beta=0"] else exp.grpo(setting, seed, sft["final"], extra=flags)
            measured = exp.cached_step(setting + " drift", seed, lambda _: drift(
                run["final"], sft["final"], problems=exp.budget["measure_problems"], seed=seed), key=[run, sft])
            exp.add(setting, seed, run, **{k: measured[k] for k in ("kl_reverse", "kl_forward", "entropy", "length")})
    for setting in list(ARMS)[1:]:
        exp.paired(f"{setting.split(', ')[1]} minus beta=0 (paired)", setting, "beta=0 (no reference)",
                   ["heldout_accuracy", "kl_reverse", "kl_forward", "entropy", "length"])
    return exp.finish(["heldout_start", "heldout_accuracy", "kl_reverse", "kl_forward", "entropy", "length", "wall_s"],
                      notes=NOTES)


NOTES = """
heldout_start: the SFT checkpoint's held-out accuracy (GRPO's step-0 eval, same seed); heldout_accuracy: after
GRPO. kl_reverse = KL(pi||SFT), kl_forward = KL(SFT||pi), entropy: per completion token, exact over the vocabulary,
on 64 completions the final policy samples for held-out prompts; length: their mean length in tokens. wall_s: the
GRPO run. The curves' kl panel is each run's own logged estimate (0 for beta=0, which loads no reference).
"""

if __name__ == "__main__":
    main()
