"""
Question 4, faked traces: is SFT data from the teacher, from a weak model filtered by the verifier, or rationalized
from known answers better for the RL that follows? Three trace sets for the same 300 training problems, each taught
to the same student (the shared SFT checkpoint of that seed) by the same short SFT (50 steps of 32 at lr 3e-4, the
README's rejection-sampling fine-tuning recipe), each followed by the same GRPO (40 steps):
 - teacher: the demo teacher's own traces (tasks.demo_trace: one arithmetic slip, and a wrong answer, in 25%), not
   filtered;
 - distilled: make_traces.py --hint=never with a weak model as the teacher: 4 samples per problem, the verifier keeps
   one correct trace per solved problem;
 - faked: make_traces.py --hint=always with the same weak model: every problem asked with its gold answer in the
   prompt (the default hint template), and one correct hinted trace kept per problem (leaks rejected).
The demo SFT model never saw a hint, so it cannot follow one (the README's make_traces run kept no hinted trace). The
weak model here is therefore the shared SFT checkpoint taught for 100 more steps on the teacher's traces with half
of the prompts carrying the hint (their traces without slips, so they reach the hinted answer), a stand-in for an
instruction-following teacher; the distilled set comes from the same weak model without hints. "slips" counts the
kept traces with a wrong `a op b = c` line (process errors the outcome check lets through).

    python experiments/faked_traces.py [--seeds=0,1,2] [--quick] [--out=DIR] [--rerun] [--jobs=N] [--sft_steps=N]

Budget (experiments/harness.py): the demo model (0.6M parameters), the shared SFT, 300 problems, GRPO 40 steps of
8 prompts x 8 samples at lr 5e-5, 200 held-out problems.
"""

import json
import os
import random
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import Experiment, ROOT, accuracy, write_jsonl  # noqa: E402

sys.path.insert(0, ROOT)
import make_traces  # noqa: E402
from tasks import DemoTask, demo_trace  # noqa: E402

LINE = re.compile(r"(\d+) ([+\-*]) (\d+) = (\d+)")


def slipped(completion) -> bool:
    """True if a line `a op b = c` of the trace is wrong."""
    for a, op, b, c in LINE.findall(completion):
        a, b, c = int(a), int(b), int(c)
        if (a + b if op == "+" else a - b if op == "-" else a * b) != c:
            return True
    return False


def read_rows(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def main(argv=None):
    exp = Experiment("faked_traces", "Question 4: teacher, distilled and faked traces before RL", argv,
                     __doc__.split("\n\n")[0])
    quick = exp.args.quick
    count = 8 if quick else 300
    sft_steps, weak_steps, grpo_steps = (2, 2, 1) if quick else (50, 100, 40)
    hint = make_traces.HINT_TEMPLATE
    for seed in exp.seeds:
        base = exp.base_sft(seed)
        problems = DemoTask().train_problems(seed)[:count]  # the problems make_traces.py draws for this seed

        def teacher_rows(run_dir):
            rng = random.Random(seed)
            rows = [{"prompt": p["problem"], "completion": demo_trace(p, rng), "answer": p["answer"]} for p in problems]
            write_jsonl(os.path.join(run_dir, "traces.jsonl"), rows)
            # the weak model's data: other problems, half of them with the gold answer in the prompt
            other = DemoTask().train_problems(seed + 1000)[: 32 * weak_steps]
            weak = [{"prompt": p["problem"] + (hint.replace("{answer}", p["answer"]) if i % 2 else ""),
                     "completion": demo_trace(p, rng, slip_rate=0.0 if i % 2 else 0.25)} for i, p in enumerate(other)]
            write_jsonl(os.path.join(run_dir, "weak.jsonl"), weak)
            return dict(traces=os.path.join(run_dir, "traces.jsonl"), weak=os.path.join(run_dir, "weak.jsonl"))

        data = exp.cached_step("data", seed, teacher_rows, key=[count, weak_steps])
        weak = exp.sft("weak model (hint-aware)", seed, model=base["final"], data=data["weak"], steps=weak_steps,
                       extra=["--lr=3e-4", "--warmup_steps=5", "--min_lr_ratio=1.0"])
        sets = {"teacher": dict(path=data["traces"])}
        for name, mode in (("distilled", "never"), ("faked", "always")):
            def make(run_dir, mode=mode):
                summary = make_traces.main([f"--teacher={weak['final']}", f"--out_dir={run_dir}/traces",
                                            f"--demo_problems={count}", "--samples=4", "--hint_samples=4",
                                            f"--hint={mode}", f"--seed={seed}", "--keep=1"])
                return dict(path=os.path.join(run_dir, "traces", "traces.jsonl"),
                            pass1=summary["teacher_pass@1"], hinted_pass1=summary["hinted_pass@1"],
                            rejected=summary["rejected"])
            sets[name] = exp.cached_step(f"{name} traces", seed, make, key=[weak, count])
        for name, info in sets.items():
            rows = read_rows(info["path"])
            values = dict(traces=len(rows), traces_slipped=100 * sum(slipped(r["completion"]) for r in rows)
                          / max(len(rows), 1))
            if name != "teacher":
                values.update(weak_pass1=info["pass1"], weak_hinted_pass1=info["hinted_pass1"])
            if not rows:
                exp.add(f"{name} traces", seed, **values)
                continue
            student = exp.sft(f"{name}: SFT", seed, model=base["final"], data=info["path"], steps=sft_steps,
                              extra=["--lr=3e-4", "--warmup_steps=5", "--min_lr_ratio=1.0"])
            sft_accuracy = exp.cached_step(f"{name}: SFT eval", seed, lambda _: dict(
                accuracy=accuracy(student["final"], None, exp.budget["eval_problems"], seed=seed)),
                key=student)["accuracy"]
            rl = exp.grpo(f"{name}: SFT then GRPO", seed, student["final"], steps=grpo_steps,
                          extra=[f"--eval_every={max(1, grpo_steps // 2)}"])
            exp.add(f"{name} traces", seed, rl, sft_accuracy=sft_accuracy, **values)
    for name in ("distilled", "faked"):
        exp.paired(f"{name} minus teacher (paired)", f"{name} traces", "teacher traces",
                   ["sft_accuracy", "heldout_accuracy"])
    return exp.finish(["traces", "traces_slipped", "weak_pass1", "weak_hinted_pass1", "sft_accuracy",
                       "heldout_accuracy", "wall_s"], notes=NOTES,
                      plots={"curves.svg": (None, ("heldout_accuracy", "reward", "entropy"))})


NOTES = """
traces: kept traces (of 300 problems); traces_slipped: % of them with a wrong `a op b = c` line; weak_pass1 /
weak_hinted_pass1: the weak model's pass@1 (%) without / with the hint (make_traces.py's summary); sft_accuracy:
held-out accuracy (200 problems) of the student after SFT on the set; heldout_accuracy: after the GRPO that follows
(the curves: its GRPO steps); wall_s: the GRPO run.
"""

if __name__ == "__main__":
    main()
