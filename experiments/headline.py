"""
The README's main command, once per seed: SFT of the demo model (`python train_sft.py --seed=S`), then GRPO with two
processes (`torchrun --standalone --nproc_per_node=2 train_grpo.py --seed=S`), each checkpoint measured by eval.py
on the 500 held-out demo problems (temperature 1, eval seed 0) with 4 samples per problem: pass@1 over 2,000
samples, whose sampling noise (std about 1 point at 60-77%) is half that of one sample per problem (2). Unlike
the other experiments it runs the demo's own budget (16,000 teacher traces, GRPO of 170 steps of 32 prompts), as a
new user does; the table gives held-out accuracy after SFT and after GRPO, the gain (paired by seed) as mean ± sample
std, and the wall times.

    python experiments/headline.py [--seeds=0,1,2] [--quick] [--out=DIR] [--rerun]

Each seed's runs go to DIR/runs/seed_S/{sft,grpo,eval_sft,eval_grpo}; a seed whose result.json exists and was made
from the same inputs (the demo model, the trainers' defaults, EVAL_SAMPLES, --quick) is not run again (--rerun starts
over), while an unfinished one starts from its SFT. Each result.json records the commit it ran at, its start and end
and the load average, and results.md prints them. --quick runs 2 SFT steps and 1 GRPO step on 16 eval problems: a
smoke test, not a result.
"""

import argparse
import dataclasses
import json
import os
import platform
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
QUICK_SFT = ["--max_steps=2", "--eval_problems=0", "--save_every=2", "--batch_size=8", "--micro_batch_size=8"]
EVAL_SAMPLES = 4
QUICK_GRPO = ["--max_steps=1", "--eval_every=0", "--prompts_per_step=2", "--group_size=2", "--max_new_tokens=16",
              "--save_every=1"]


def run(command, log_path):
    """Runs a step of the pipeline with its output in log_path; returns its wall seconds. A failed step stops the
    script, naming its log."""
    start = time.time()
    with open(log_path, "w") as log:
        done = subprocess.run(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    if done.returncode:
        raise SystemExit(f"{' '.join(command)} failed (exit {done.returncode}); see {log_path}")
    return time.time() - start


def held_out(model, out_dir, problems, log_path):
    """eval.py's pass@1 on the held-out demo problems (EVAL_SAMPLES per problem), in percent."""
    wall = run([sys.executable, "eval.py", f"--model={model}", f"--out_dir={out_dir}", f"--demo_problems={problems}",
                f"--n={EVAL_SAMPLES}"], log_path)
    with open(os.path.join(out_dir, "results.json")) as f:
        return json.load(f)["results"]["demo"]["pass@1"], wall


def inputs(quick):
    """What a seed's result depends on besides its seed: a result made from other inputs is made again."""
    import tasks
    import train_grpo
    import train_sft

    return json.loads(json.dumps(dict(demo_model=tasks.DEMO_MODEL, sft=dataclasses.asdict(train_sft.Config()),
                                      grpo=dataclasses.asdict(train_grpo.Config()), eval_samples=EVAL_SAMPLES,
                                      quick=quick)))


def commit():
    """The checked-out commit, marked -dirty when tracked files differ from it ("unknown" outside a git clone)."""
    git = lambda *args: subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)
    head = git("rev-parse", "--short", "HEAD")
    if head.returncode:
        return "unknown"
    return head.stdout.strip() + ("-dirty" if git("status", "--porcelain", "--untracked-files=no").stdout else "")


def seed_runs(seed, runs, quick, rerun):
    """SFT, GRPO and both evals of one seed, each skipped when its result is already in runs/seed_S/result.json."""
    folder = os.path.join(runs, f"seed_{seed}")
    os.makedirs(folder, exist_ok=True)
    result_file = os.path.join(folder, "result.json")
    if os.path.exists(result_file) and not rerun:
        with open(result_file) as f:
            result = json.load(f)
        if result.get("inputs") == inputs(quick):
            return result
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    sft_dir, grpo_dir = os.path.join(folder, "sft"), os.path.join(folder, "grpo")
    problems = 16 if quick else 500
    sft_s = run([sys.executable, "train_sft.py", f"--seed={seed}", f"--out_dir={sft_dir}", "--overwrite=true"]
                + (QUICK_SFT if quick else []), os.path.join(folder, "sft.log"))
    grpo_s = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train_grpo.py",
                  f"--seed={seed}", f"--model={sft_dir}/final", f"--out_dir={grpo_dir}", "--overwrite=true"]
                 + (QUICK_GRPO if quick else []), os.path.join(folder, "grpo.log"))
    sft_acc, _ = held_out(f"{sft_dir}/final", os.path.join(folder, "eval_sft"), problems,
                          os.path.join(folder, "eval_sft.log"))
    grpo_acc, _ = held_out(f"{grpo_dir}/final", os.path.join(folder, "eval_grpo"), problems,
                           os.path.join(folder, "eval_grpo.log"))
    result = dict(seed=seed, sft_accuracy=sft_acc, grpo_accuracy=grpo_acc, gain=grpo_acc - sft_acc, sft_s=sft_s,
                  grpo_s=grpo_s, eval_problems=problems, eval_samples=EVAL_SAMPLES, commit=commit(), started=started,
                  finished=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), load_15min=os.getloadavg()[2],
                  inputs=inputs(quick))
    with open(result_file, "w") as f:
        json.dump(result, f, indent=1)
    return result


def mean_std(values):
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else float("nan")


def table(results, machine, quick):
    lines = ["# The README's main command over seeds", ""]
    if quick:
        lines += ["QUICK RUN: a smoke test of the script, not a result.", ""]
    commits = ", ".join(sorted({r["commit"] for r in results}))
    loads = ", ".join(f"{r['load_15min']:.1f}" for r in results)
    lines += [f"{time.strftime('%Y-%m-%d')}, {machine}; each row one seed (SFT, then GRPO on 2 processes), held-out "
              f"accuracy (pass@1) by eval.py on {results[0]['eval_problems']} demo problems at temperature 1, "
              f"{results[0]['eval_samples']} samples per problem. Commit {commits}; the seeds ran from "
              f"{min(r['started'] for r in results)} to {max(r['finished'] for r in results)}, one after another; "
              f"load average over 15 minutes at the end of each seed: {loads} (the main command keeps 2 cores busy, "
              f"so above 2 other jobs slowed it).", "",
              "| seed | SFT | SFT then GRPO | gain (points) | SFT wall | GRPO wall |",
              "| --- | --- | --- | --- | --- | --- |"]
    for r in results:
        lines.append(f"| {r['seed']} | {r['sft_accuracy']:.1f}% | {r['grpo_accuracy']:.1f}% | {r['gain']:+.1f} | "
                     f"{r['sft_s'] / 60:.1f} min | {r['grpo_s'] / 60:.1f} min |")
    stats = {key: mean_std([r[key] for r in results]) for key in ("sft_accuracy", "grpo_accuracy", "gain", "sft_s",
                                                                  "grpo_s")}
    lines.append(f"| mean ± std | {stats['sft_accuracy'][0]:.1f} ± {stats['sft_accuracy'][1]:.1f}% | "
                 f"{stats['grpo_accuracy'][0]:.1f} ± {stats['grpo_accuracy'][1]:.1f}% | "
                 f"{stats['gain'][0]:+.1f} ± {stats['gain'][1]:.1f} | {stats['sft_s'][0] / 60:.1f} min | "
                 f"{stats['grpo_s'][0] / 60:.1f} min |")
    return "\n".join(lines) + "\n", stats


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=None)
    parser.add_argument("--rerun", action="store_true")
    args = parser.parse_args(argv)
    out = args.out or os.path.join(ROOT, "out/experiments_quick/headline" if args.quick else
                                   "experiments/results/headline")
    seeds = [int(s) for s in args.seeds.split(",")]
    results = [seed_runs(seed, os.path.join(out, "runs"), args.quick, args.rerun) for seed in seeds]
    import torch

    machine = (torch.cuda.get_device_name() if torch.cuda.is_available() else
               f"{os.cpu_count()}-core CPU ({platform.machine()}), torch threads per process as the trainers set them")
    markdown, stats = table(results, machine, args.quick)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(markdown)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(dict(runs=results, mean_std={k: list(v) for k, v in stats.items()}), f, indent=1)
    print(markdown)
    return stats


if __name__ == "__main__":
    main()
