"""
Question 5, extrapolation: trained on the demo's problems (2-4 steps, operands up to 9), how do SFT and SFT then
GRPO do on held-out problems of other difficulty levels (tasks.DemoTask(level=...)): exactly 2, 3 and 4 steps (inside
the training range), 5 and 6 steps (longer than any training problem), and 3 steps with operands up to 19 (larger
numbers)? Does RL's gain carry over to problems harder than it trained on? The models are the shared SFT and GRPO
runs of the other questions (one per seed); this script only evaluates them, level by level, with 96 new tokens
(a 6-step trace needs about 60).

    python experiments/extrapolation.py [--seeds=0,1,2] [--quick] [--out=DIR] [--rerun] [--jobs=N] [--sft_steps=N]

Budget (experiments/harness.py): the demo model (0.6M parameters), SFT 1200 steps of 32 examples, GRPO 80 steps of
8 prompts x 8 samples at lr 5e-5 (beta 0), 200 held-out problems per level, one sample each at temperature 1.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import Experiment, accuracy, plot  # noqa: E402

LEVELS = {"2 steps": "2", "3 steps": "3", "4 steps": "4", "5 steps": "5", "6 steps": "6",
          "3 steps, operands<=19": "3:19"}


def main(argv=None):
    exp = Experiment("extrapolation", "Question 5: extrapolation to harder problems", argv, __doc__.split("\n\n")[0])
    problems = exp.budget["eval_problems"]
    for seed in exp.seeds:
        models = {"SFT": exp.base_sft(seed), "SFT then GRPO": exp.base_grpo(seed)}
        for setting, run in models.items():
            measured = exp.cached_step(setting + " levels", seed, lambda _: {
                name: accuracy(run["final"], level, problems, max_new_tokens=96, seed=seed)
                for name, level in LEVELS.items()}, key=[run, problems])
            exp.add(setting, seed, **{f"level {name}": measured[name] for name in LEVELS})
    columns = [f"level {name}" for name in LEVELS]
    rows = {s: {c: [r[c] for r in exp.rows if r["setting"] == s] for c in columns} for s in ("SFT", "SFT then GRPO")}
    exp.rows += [dict(setting="GRPO gain (points)", seed=seed, **{c: rows["SFT then GRPO"][c][i] - rows["SFT"][c][i]
                                                                  for c in columns})
                 for i, seed in enumerate(exp.seeds)]
    summary = exp.finish(columns, notes=NOTES, plots={})
    if exp.args.fill_cache:  # a --jobs child: its parent draws the plot of all the seeds
        return summary
    curves = {s: [[{"step": i, "accuracy": r[c]} for i, c in enumerate(columns)] for r in exp.rows
                  if r["setting"] == s] for s in ("SFT", "SFT then GRPO")}
    plot.plot_runs(curves, ["accuracy"], os.path.join(exp.out, "accuracy_by_level.svg"),
                   title="extrapolation: held-out accuracy (%) by level, mean over seeds (thin: each seed)",
                   xlabel="level (training: 2-4 steps, operands <= 9)", xticks=dict(enumerate(LEVELS.values())))
    with open(os.path.join(exp.out, "results.md"), "a") as f:
        f.write("\n![accuracy_by_level.svg](accuracy_by_level.svg)\n")
    return summary


NOTES = """
Each cell: held-out accuracy (%) on that level, one sample per problem at temperature 1, max 96 new tokens. The
training distribution is 2-4 steps with operands up to 9 (the 2, 3 and 4 step columns are inside it). "GRPO gain":
the per-seed difference, then its mean ± std over seeds.
"""

if __name__ == "__main__":
    main()
