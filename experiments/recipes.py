"""
Question 1, the three recipes on the demo: (1) GRPO from the untrained model, (2) SFT only, (3) SFT then GRPO.
Recipe 2 is run twice: the shared SFT checkpoint itself (the start of recipe 3), and that checkpoint taught as many
more teacher examples as recipe 3's GRPO samples completions (80 steps x 8 prompts x 8 = 5,120, i.e. 160 more SFT
steps of 32 at a constant lr 3e-4), so that SFT and SFT+RL see the same number of sequences. Recipe 1 gets the
same GRPO steps as recipe 3, not also the SFT's compute: it samples 64-token completions that rarely hold the right
number, so most groups have equal (zero) rewards and teach nothing (train_reward and the curves show how rarely it
is rewarded).

Against recipe 3, the RL-free way to learn from the verifier at the same sampling cost: rejection-sampling
fine-tuning ("2: SFT then RFT"). make_traces.py with the SFT checkpoint as its own teacher samples as many
completions as GRPO does (80 x 8 = 640 training problems x 8 samples), the verifier keeps one correct trace per
solved problem (--hint=never), and the SFT checkpoint is taught them (the README's recipe: 50 steps of 32 at a
constant lr 3e-4).

    python experiments/recipes.py [--seeds=0,1,2] [--quick] [--out=DIR] [--rerun] [--jobs=N] [--sft_steps=N]

Budget (experiments/harness.py): the demo model (0.6M parameters), SFT 1200 steps of 32 examples, GRPO 80 steps of
8 prompts x 8 samples at lr 5e-5, 200 held-out problems; the seeds side by side.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import ROOT, Experiment, accuracy  # noqa: E402

sys.path.insert(0, ROOT)
import make_traces  # noqa: E402


def main(argv=None):
    exp = Experiment("recipes", "Question 1: the three recipes", argv, __doc__.split("\n\n")[0])
    b = exp.budget
    extra_sft = b["grpo_steps"] * b["prompts_per_step"] * b["group_size"] // 32
    for seed in exp.seeds:
        rl_only = exp.grpo("1: GRPO from the untrained model", seed, exp.init(seed))
        exp.add("1: GRPO from the untrained model", seed, rl_only)
        sft = exp.base_sft(seed)
        exp.add("2: SFT only", seed, sft)
        long_sft = exp.sft("2: SFT only, +RL's sequences", seed, model=sft["final"], steps=extra_sft,
                           extra=["--lr=3e-4", "--min_lr_ratio=1.0", "--warmup_steps=5", f"--seed={seed + 100}"])
        exp.add("2: SFT only, +RL's sequences", seed, long_sft, wall_s=sft["wall_s"] + long_sft["wall_s"])
        both = exp.base_grpo(seed)
        exp.add("3: SFT then GRPO", seed, both, wall_s=sft["wall_s"] + both["wall_s"])

        def traces(run_dir):
            summary = make_traces.main([f"--teacher={sft['final']}", f"--out_dir={run_dir}/traces",
                                        f"--demo_problems={b['grpo_steps'] * b['prompts_per_step']}",
                                        f"--samples={b['group_size']}", "--hint=never", f"--seed={seed}", "--keep=1"])
            path = os.path.join(run_dir, "traces", "traces.jsonl")
            with open(path) as f:
                return dict(path=path, pass1=summary["teacher_pass@1"], traces=sum(bool(line.strip()) for line in f))
        made = exp.cached_step("2: RFT traces", seed, traces, key=[sft])
        if not made["traces"]:  # a teacher that solves nothing (--quick) has nothing to teach
            exp.add("2: SFT then RFT", seed, teacher_pass1=made["pass1"], rft_traces=0)
            continue
        rft = exp.sft("2: SFT then RFT", seed, model=sft["final"], data=made["path"], steps=50,
                      extra=["--lr=3e-4", "--min_lr_ratio=1.0", "--warmup_steps=5"])
        # train_sft.py evaluates only the demo's own data; this is the same eval (heldout_accuracy's settings)
        measured = exp.cached_step("2: SFT then RFT eval", seed, lambda _: dict(
            accuracy=accuracy(rft["final"], None, b["eval_problems"], seed=seed)), key=rft)
        exp.add("2: SFT then RFT", seed, rft, heldout_accuracy=measured["accuracy"], teacher_pass1=made["pass1"],
                rft_traces=made["traces"], wall_s=sft["wall_s"] + rft["wall_s"])
    exp.paired("3 minus 2 (paired by seed)", "3: SFT then GRPO", "2: SFT only", ["heldout_accuracy"])
    exp.paired("3 minus 2 with RL's sequences (paired)", "3: SFT then GRPO", "2: SFT only, +RL's sequences",
               ["heldout_accuracy"])
    exp.paired("RFT minus SFT (paired)", "2: SFT then RFT", "2: SFT only", ["heldout_accuracy"])
    exp.paired("3 minus RFT (paired)", "3: SFT then GRPO", "2: SFT then RFT", ["heldout_accuracy"])
    return exp.finish(["heldout_start", "heldout_accuracy", "train_reward", "train_length", "teacher_pass1",
                       "rft_traces", "wall_s"],
                      notes=NOTES, plots={
        "curves.svg": (["1: GRPO from the untrained model", "3: SFT then GRPO"],
                       ("heldout_accuracy", "reward", "length")),
        "sft_curves.svg": (["2: SFT only", "2: SFT only, +RL's sequences", "2: SFT then RFT"],
                           ("heldout_accuracy", "loss"))})


NOTES = """
heldout_accuracy: the run's last held-out eval (200 problems, temperature 1, one sample each; for RFT, the same eval
of its final checkpoint); heldout_start: GRPO's step-0 eval (the starting model). train_reward / train_length: mean
reward and completion length of the last 5 GRPO steps (GRPO runs only). teacher_pass1: the SFT checkpoint's pass@1
(%) on the 640 training problems RFT samples (make_traces.py's summary); rft_traces: the traces it kept, one per
solved problem. "minus" rows: the per-seed difference in points, then its mean ± std. wall_s: the run (for recipe
3, SFT + GRPO; for RFT, SFT + its fine-tuning, the sampling not counted). The curves are over each run's own steps
(SFT steps for recipe 2 in sft_curves.svg, GRPO steps in curves.svg).
"""

if __name__ == "__main__":
    main()
