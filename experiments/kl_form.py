"""
Question 3, the form of the KL term: reverse KL(pi||ref) against forward KL(ref||pi), estimated from the sampled
tokens (k1, k2, k3) or exact over the vocabulary (full), in the loss or subtracted from the reward, each at a small
and a large batch (--prompts_per_step 4 and 16; a small batch makes the sampled estimates noisier). All at
beta=0.2, 30 steps and lr 1.5e-4 (three times the other questions', so that the policy moves far enough for the KL
term to matter) from the same SFT checkpoint per seed. Six forms (train_grpo.py's docstring table says which
gradient each follows): reverse k1 in the reward (the classic RLHF penalty), reverse k2 and k3 in the loss (k3:
DeepSeekMath), forward k3 in the loss, reverse and forward exact (full) in the loss. FOUR_FORMS=1 runs only the four
that cover each axis once (without reverse k2 and forward k3), for a shorter run.

    python experiments/kl_form.py [--seeds=0,1,2] [--quick] [--out=DIR] [--rerun] [--jobs=N] [--sft_steps=N]

Budget (experiments/harness.py): the demo model (0.6M parameters), the shared SFT, GRPO 30 steps of G=8 at lr 1.5e-4,
one held-out eval at the end (200 problems; the start is the SFT checkpoint's), KL measured on 64 held-out prompts.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import Experiment, accuracy, drift  # noqa: E402

BETA = 0.2
FORMS = {"reverse k1 in reward": ("reverse", "k1", "reward"), "reverse k2 in loss": ("reverse", "k2", "loss"),
         "reverse k3 in loss": ("reverse", "k3", "loss"), "reverse full in loss": ("reverse", "full", "loss"),
         "forward k3 in loss": ("forward", "k3", "loss"), "forward full in loss": ("forward", "full", "loss")}
RUN = ["reverse k1 in reward", "reverse k3 in loss", "reverse full in loss", "forward full in loss"] \
    if os.environ.get("FOUR_FORMS") else list(FORMS)
BATCHES = {"small": 4, "large": 16}


def main(argv=None):
    exp = Experiment("kl_form", "Question 3: reverse vs forward KL, estimator, loss vs reward", argv,
                     __doc__.split("\n\n")[0])
    steps = 1 if exp.args.quick else 30  # 40 would put the question past its 20 minutes with the SFT
    batches = {"small": 2} if exp.args.quick else BATCHES  # quick: one batch size
    for seed in exp.seeds:
        sft = exp.base_sft(seed)
        for batch_name, prompts in batches.items():
            for form in RUN:
                direction, estimator, where = FORMS[form]
                setting = f"{form}, {prompts} prompts/step"
                run = exp.grpo(setting, seed, sft["final"], steps=steps, extra=[
                    f"--beta={BETA}", f"--kl_direction={direction}", f"--kl_estimator={estimator}",
                    f"--kl_in={where}", f"--prompts_per_step={prompts}", "--eval_problems=0",
                    f"--lr={3 * exp.budget['grpo_lr']:g}"])
                measured = exp.cached_step(setting + " measured", seed, lambda _: dict(drift(
                    run["final"], sft["final"], problems=exp.budget["measure_problems"], seed=seed),
                    heldout_accuracy=accuracy(run["final"], None, exp.budget["eval_problems"], seed=seed)),
                    key=[run, sft])
                exp.add(setting, seed, run, **{k: measured[k] for k in ("kl_reverse", "kl_forward", "entropy",
                                                                        "length", "heldout_accuracy")})
    small = [f"{form}, {batches['small']} prompts/step" for form in RUN]
    large = [f"{form}, {batches['large']} prompts/step" for form in RUN] if "large" in batches else []
    return exp.finish(["heldout_accuracy", "kl_reverse", "kl_forward", "train_kl", "entropy",
                       "length", "wall_s"], notes=NOTES,
                      plots={"curves_small_batch.svg": (small, ("kl", "entropy", "reward")),
                             "curves_large_batch.svg": (large, ("kl", "entropy", "reward"))})


NOTES = """
kl_reverse = KL(pi||SFT), kl_forward = KL(SFT||pi), entropy: exact per completion token on 64 completions the final
policy samples for held-out prompts (the same measurement for every form); train_kl: the last 5 steps' mean of the
run's own estimator (each estimates a different quantity, so compare it within a form only; with --kl_in=reward,
the penalty's estimate); length: mean completion tokens. heldout_accuracy: 200 held-out problems after GRPO (the SFT
start's is in kl_removal's table).
"""

if __name__ == "__main__":
    main()
