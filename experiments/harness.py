"""
Plumbing shared by the experiment scripts: flags, the demo model's untrained inits, running the trainers'
main(argv) per setting and seed (with a cache of finished runs), measuring a checkpoint (held-out accuracy per
difficulty level, KL to the start, entropy, length), and the outputs: results.md, results.json and SVG curves per
question in experiments/results/<question>/.

Every script takes the same flags:
    --seeds=0,1,2     the seeds (each setting runs once per seed)
    --quick           a tiny budget that only checks the script runs end to end (tests/test_experiments.py);
                      its numbers are not results, and it writes into a separate folder by default
    --out=DIR         where results go (default experiments/results/<question>, quick: out/experiments_quick/<question>)
    --rerun           ignore the cache of finished runs in DIR/runs and run everything again (once: a run this
                      invocation made is read back when another part of it asks again)
    --sft_steps=N     another length of the shared SFT than the budget's 1200 steps: its own SFT and GRPO runs,
                      and by default its own folder (<question>_sft<N>), so no run of another budget is reused
    --jobs=N          seeds run at once, each in its own one-thread process (default: all of them, at most one more
                      than the cores, which kept 2 cores busy with 3 seeds; 1: one after another in this process)

Budget. The experiments shrink the demo's runs so that a question with its 3 seeds fits in 20 minutes of 2 CPU cores:
the demo's model (tasks.DEMO_MODEL: hidden 128, 4 layers, ~0.6M parameters) and SFT (1200 steps of 32, which takes
it to 55-66% held-out; after 400 it was at 13-28% and GRPO could not raise it) on fewer teacher traces (6,000), the
seeds side by side (--jobs), short GRPO runs of 8 prompts per step, and 200 held-out problems instead of 500. The
absolute accuracies are therefore not the README's demo table's; the comparisons between settings are what each
question is about.
"""

import contextlib
import dataclasses
import fcntl
import json
import math
import os
import platform
import random
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

import plot  # noqa: E402
import train_grpo  # noqa: E402
import train_sft  # noqa: E402
from data import Tokenizer  # noqa: E402
from model import Transformer  # noqa: E402
from sampler import generate  # noqa: E402
from tasks import DEMO_MODEL, DemoTask, build_demo_model, demo_problems, demo_trace, evaluate, metrics  # noqa: E402

# the budget of a real run and of --quick (which only checks that the script runs)
BUDGET = dict(sft_steps=1200, sft_examples=6000, grpo_steps=80, grpo_lr=5e-5, prompts_per_step=8, group_size=8,
              eval_problems=200, eval_every=20, measure_problems=64)
QUICK = dict(sft_steps=4, sft_examples=64, grpo_steps=2, grpo_lr=5e-5, prompts_per_step=2, group_size=4,
             eval_problems=8, eval_every=1, measure_problems=4)

MACHINE = "2-core CPU"


@dataclasses.dataclass
class Args:
    seeds: list
    quick: bool
    out: str
    rerun: bool
    budget: dict
    sft_tag: str  # "" on the default budget, else "_sft<N>": keeps the runs of another SFT length apart
    jobs: int
    fill_cache: bool  # a --jobs child: make this seed's runs, write no results
    argv: list  # as given, for the results' command line


def parse_args(question, argv=None) -> Args:
    argv = sys.argv[1:] if argv is None else argv
    seeds, quick, out, rerun, sft_steps, jobs, fill_cache = [0, 1, 2], False, "", False, None, None, False
    for arg in argv:
        key, _, value = arg[2:].partition("=") if arg.startswith("--") else (arg, "", "")
        if key == "seeds" and value:
            seeds = [int(s) for s in value.split(",") if s.strip()]
        elif key == "quick":
            quick = value.lower() not in ("0", "false", "no")
        elif key == "out" and value:
            out = value
        elif key == "rerun":
            rerun = value.lower() not in ("0", "false", "no")
        elif key == "sft_steps":
            if not value.isdigit() or int(value) < 1:
                raise SystemExit(f"--sft_steps: a positive number of steps, not {value!r}")
            sft_steps = int(value)
        elif key == "jobs":
            if not value.isdigit() or int(value) < 1:
                raise SystemExit(f"--jobs: a positive number of processes, not {value!r}")
            jobs = int(value)
        elif key == "fill_cache":
            fill_cache = value.lower() not in ("0", "false", "no")
        else:
            raise SystemExit(f"unknown argument {arg!r}; known: --seeds=0,1,2 --quick --out=DIR --rerun --sft_steps=N "
                             f"--jobs=N")
    if not seeds:
        raise SystemExit("--seeds: give at least one seed")
    budget = dict(QUICK if quick else BUDGET)
    sft_tag = ""
    if sft_steps is not None and sft_steps != budget["sft_steps"]:
        budget["sft_steps"], sft_tag = sft_steps, f"_sft{sft_steps}"
    default_out = os.path.join(ROOT, "out", "experiments_quick", question + sft_tag) if quick else \
        os.path.join(ROOT, "experiments", "results", question + sft_tag)
    jobs = jobs or min(len(seeds), (os.cpu_count() or 1) + 1)
    return Args(seeds, quick, out or default_out, rerun, budget, sft_tag, jobs, fill_cache, list(argv))


def write_jsonl(path, rows):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    os.replace(path + ".tmp", path)
    return path


def demo_trace_rows(count, seed, level=None, slip_rate=0.25, offset=0) -> list[dict]:
    """{"prompt", "completion", "answer"} rows of the demo teacher (tasks.demo_trace) on training problems of a level:
    what train_sft.py trains on for the demo, as a file (for levels other than the demo's own)."""
    rng = random.Random(seed)
    problems = demo_problems(offset + count, seed=seed, heldout=False, level=level)[offset:]
    return [{"prompt": p["problem"], "completion": demo_trace(p, rng, slip_rate), "answer": p["answer"]}
            for p in problems]


# -----------------------------------------------------------------------------
# running the trainers


class Experiment:
    """One question: runs settings x seeds through the trainers' main(argv), each in out/runs/<setting>/seed<k>,
    and collects one row per run. A run that finished before (its done.json) is read back unless --rerun."""

    def __init__(self, question, title, argv=None, doc=""):
        self.question, self.title, self.doc = question, title, doc
        self.args = parse_args(question, argv)
        self.budget, self.seeds, self.out = self.args.budget, self.args.seeds, self.args.out
        self.rows = []
        self.curves = {}  # setting -> [metrics.jsonl paths]
        self.run_walls = {}  # run folder -> its wall time (s), for the runs this question used (made or cached)
        self.made = set()  # run folders made by this invocation: read back even with --rerun (base_grpo asks for
        # base_sft again, and the shared copies see the same set)
        self.started = time.time()
        os.makedirs(self.out, exist_ok=True)
        torch.set_num_threads(1)
        if self.args.jobs > 1 and len(self.seeds) > 1:
            self.run_seeds_side_by_side()

    def run_seeds_side_by_side(self):
        """Makes every seed's runs in child processes, --jobs at a time, each on one thread (the demo machine's 2
        cores both work); the loop over seeds that follows in this process then reads them all from the cache. A
        child's output goes to <out>/runs/seed<k>.log."""
        script = os.path.join(ROOT, "experiments", f"{self.question}.py")
        flags = [f"--out={self.out}", "--jobs=1", "--fill_cache", f"--sft_steps={self.budget['sft_steps']}"]
        flags += ["--quick"] * self.args.quick + ["--rerun"] * self.args.rerun
        waiting, running = list(self.seeds), {}
        os.makedirs(os.path.join(self.out, "runs"), exist_ok=True)
        try:
            while waiting or running:
                while waiting and len(running) < self.args.jobs:
                    seed = waiting.pop(0)
                    log = open(os.path.join(self.out, "runs", f"seed{seed}.log"), "w")
                    print(f"[{self.question}] seed {seed}: in a child process, log {log.name}", flush=True)
                    running[seed] = (subprocess.Popen([sys.executable, script, f"--seeds={seed}"] + flags, stdout=log,
                                                      stderr=subprocess.STDOUT,
                                                      env=dict(os.environ, OMP_NUM_THREADS="1")), log)
                time.sleep(1)
                for seed, (child, log) in list(running.items()):
                    if child.poll() is not None:
                        log.close()
                        del running[seed]
                        if child.returncode:
                            raise SystemExit(f"[{self.question}] seed {seed} failed (exit {child.returncode}): "
                                             f"see {log.name}")
        finally:  # a failed seed (or an interrupt) stops the others rather than leaving them running unseen
            for child, log in running.values():
                child.terminate()
                child.wait()
                log.close()
        self.args.rerun = False  # what the children made is this invocation's

    def run_dir(self, setting, seed):
        return os.path.join(self.out, "runs", setting.replace(" ", "_").replace("/", "-"), f"seed{seed}")

    def _cached(self, run_dir, key):
        """The run's done.json if it was made from the same inputs (key), else None: a run of another budget or
        from another make of its starting checkpoint is made again, not read back under the new labels."""
        done = os.path.join(run_dir, "done.json")
        if (self.args.rerun and run_dir not in self.made) or not os.path.exists(done):
            return None
        with open(done) as f:
            cached = json.load(f)
        if cached.get("key") != json.loads(json.dumps(key)):
            print(f"[{self.question}] {run_dir}: made from other inputs than asked now; making it again", flush=True)
            return None
        return cached

    @contextlib.contextmanager
    def _claim(self, run_dir):
        """Held while a run is made: another script needing the same run (the shared SFT and GRPO) waits for it and
        then reads it from the cache, so questions can run side by side."""
        os.makedirs(os.path.dirname(run_dir), exist_ok=True)
        with open(run_dir + ".busy", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    def train(self, trainer, setting, seed, flags) -> dict:
        """trainer.main(flags + out_dir, seed, overwrite) unless cached; returns {"final", "metrics", "flags",
        "wall_s"}."""
        def run(run_dir):
            argv = [f"--out_dir={run_dir}", f"--seed={seed}", "--overwrite=true", "--save_every=100000"] + list(flags)
            print(f"[{self.question}] {setting} seed {seed}: {trainer.__name__} {' '.join(flags)}", flush=True)
            trainer.main(argv)
            return dict(final=os.path.join(run_dir, "final"), metrics=os.path.join(run_dir, "metrics.jsonl"),
                        flags=list(flags))

        return self.cached_step(setting, seed, run, key=dict(flags=list(flags), inputs=self._made_stamps(flags)))

    @staticmethod
    def _made_stamps(flags):
        """When each run whose output a flag names (--model=<run> or <run>/final, --data=<run>/traces.jsonl) was
        made: a run started from it is read back only while that is the same make."""
        stamps = []
        for flag in flags:
            value = flag.partition("=")[2]
            folder = os.path.dirname(value)
            for run_dir in (value, folder, os.path.dirname(folder)):  # <run>, <run>/final, <run>/traces/traces.jsonl
                if run_dir and os.path.exists(os.path.join(run_dir, "done.json")):
                    with open(os.path.join(run_dir, "done.json")) as f:
                        stamps.append(json.load(f).get("made"))
                    break
        return stamps

    def cached_step(self, setting, seed, compute, key=None) -> dict:
        """compute(run_dir) -> a JSON dict, cached in the run folder like a training run (measurements, traces).
        key: what the result depends on beyond setting and seed (the flags; the runs it measures, as returned
        here, whose "made" stamps change when they are made again); a cached result with another key is made
        again."""
        run_dir = self.run_dir(setting, seed)
        with self._claim(run_dir):
            cached = self._cached(run_dir, key)
            if cached is not None:
                self.run_walls[run_dir] = cached["wall_s"]
                return cached
            os.makedirs(run_dir, exist_ok=True)
            start = time.time()
            result = dict(compute(run_dir), wall_s=time.time() - start, made=time.time(), key=key)
            with open(os.path.join(run_dir, "done.json"), "w") as f:
                json.dump(result, f)
            self.run_walls[run_dir] = result["wall_s"]
            self.made.add(run_dir)
            return result

    def init(self, seed) -> str:
        """The demo model's untrained weights for a seed, made again (and so every run from them) when
        tasks.DEMO_MODEL changes."""
        def build(path):
            build_demo_model(path, seed=seed)
            return dict(model=DEMO_MODEL)

        self.cached_step("init", seed, build, key=dict(model=DEMO_MODEL))
        return self.run_dir("init", seed)

    def sft(self, setting, seed, model=None, data="", steps=None, extra=()) -> dict:
        """SFT of the demo model (from its untrained init unless model=) on the demo teacher's traces (or data=)."""
        b = self.budget
        steps = steps or b["sft_steps"]
        flags = [f"--model={model or self.init(seed)}", f"--max_steps={steps}", "--batch_size=32",
                 "--micro_batch_size=32", f"--demo_examples={b['sft_examples']}",
                 f"--warmup_steps={max(1, steps // 20)}", f"--eval_problems={b['eval_problems']}",
                 f"--log_every={max(1, steps // 4)}", f"--eval_every={max(1, steps // 4)}"]
        if data:
            flags.append(f"--data={data}")
        return self.train(train_sft, setting, seed, flags + list(extra))

    def base_sft(self, seed) -> dict:
        """The demo SFT (on 6,000 of the teacher's traces) shared by every question that starts GRPO from
        an SFT checkpoint (cached in <out>/../_sft/seed<k>: run once per seed for all of them)."""
        shared = Experiment.__new__(Experiment)
        shared.__dict__.update(self.__dict__, out=os.path.join(os.path.dirname(self.out), "_sft"))
        return shared.sft("sft" + self.args.sft_tag, seed)

    def base_grpo(self, seed) -> dict:
        """GRPO with the experiments' default flags (beta=0) from base_sft, shared the same way (recipe 3 of the
        recipes question, the beta=0 arm of kl_removal, the SFT+RL model of extrapolation)."""
        shared = Experiment.__new__(Experiment)
        shared.__dict__.update(self.__dict__, out=os.path.join(os.path.dirname(self.out), "_sft"))
        return shared.grpo("grpo" + self.args.sft_tag, seed, self.base_sft(seed)["final"])

    def grpo(self, setting, seed, model, steps=None, extra=()) -> dict:
        """GRPO from `model` with the experiments' budget; extra flags override it (later flags win)."""
        b = self.budget
        flags = [f"--model={model}", f"--max_steps={steps or b['grpo_steps']}",
                 f"--prompts_per_step={b['prompts_per_step']}", f"--group_size={b['group_size']}",
                 f"--eval_problems={b['eval_problems']}", f"--eval_every={b['eval_every']}", f"--lr={b['grpo_lr']}",
                 "--warmup_steps=2", f"--log_every={max(1, b['grpo_steps'] // 4)}", "--sample_every=100000"]
        return self.train(train_grpo, setting, seed, flags + list(extra))

    # -------------------------------------------------------------------------
    # rows, table, plots

    def add(self, setting, seed, run=None, **values):
        """One row of the results: the final held-out accuracy and the last step's KL/entropy/length of the run's
        metrics.jsonl (when a run is given), then any measured values, which win."""
        row = dict(setting=setting, seed=seed)
        if run is not None:
            records = plot.read_metrics(run["metrics"])
            evals = [r for r in records if "heldout_accuracy" in r]
            if evals:
                row["heldout_accuracy"] = evals[-1]["heldout_accuracy"]
                row["heldout_start"] = evals[0]["heldout_accuracy"] if evals[0].get("step") == 0 else None
            steps = [r for r in records if "loss" in r or "reward" in r][-5:]  # the last 5 steps' mean
            for key in ("kl", "entropy", "length", "reward"):
                if steps and all(key in r for r in steps):
                    row[f"train_{key}"] = statistics.fmean(r[key] for r in steps)
            row["wall_s"] = run["wall_s"]
            self.curves.setdefault(setting, []).append(run["metrics"])
        row.update(values)
        self.rows.append(row)
        return row

    def paired(self, label, a, b, columns):
        """Rows of the per-seed difference a - b (settings) in each column: a paired comparison, whose mean ± std
        over seeds is free of what the seeds share (the same SFT start, the same eval problems)."""
        by = lambda setting: {r["seed"]: r for r in self.rows if r["setting"] == setting}
        rows_a, rows_b = by(a), by(b)
        for seed in self.seeds:
            if seed in rows_a and seed in rows_b:
                number = lambda row, c: isinstance(row.get(c), (int, float))
                self.rows.append(dict(setting=label, seed=seed, **{
                    c: rows_a[seed][c] - rows_b[seed][c] for c in columns
                    if number(rows_a[seed], c) and number(rows_b[seed], c)}))

    def finish(self, columns, notes="", plots=None):
        """results.json (every row, the summary, the budget), results.md (mean ± std per setting) and the SVGs:
        plots maps a file name to (the settings it shows, None for all; the metrics it plots). A --jobs child
        writes none of them: its parent does, for all the seeds."""
        if self.args.fill_cache:
            return {}
        settings = list(dict.fromkeys(r["setting"] for r in self.rows))
        summary = {}
        for setting in settings:
            rows = [r for r in self.rows if r["setting"] == setting]
            summary[setting] = {c: mean_std([r.get(c) for r in rows]) for c in columns}
            summary[setting]["runs"] = len(rows)
        elapsed = time.time() - self.started
        header = dict(question=self.question, title=self.title, date=time.strftime("%Y-%m-%d"), machine=MACHINE,
                      quick=self.args.quick, seeds=self.seeds, budget=self.budget, model=DEMO_MODEL,
                      elapsed_s=elapsed, runs_wall_s=sum(self.run_walls.values()), host=platform.node(),
                      load_15min=os.getloadavg()[2], torch=torch.__version__,
                      jobs=min(self.args.jobs, len(self.seeds)))
        with open(os.path.join(self.out, "results.json"), "w") as f:
            json.dump(dict(header, summary=summary, rows=self.rows), f, indent=1)
        svgs = []
        plots = plots or {"curves.svg": (None, ("heldout_accuracy", "kl", "entropy"))}
        for name, (shown, keys) in plots.items():
            runs = {s: self.curves[s] for s in (shown or self.curves) if s in self.curves}
            if runs:
                svgs.append(plot.plot_runs(runs, list(keys), os.path.join(self.out, name),
                                           title=f"{self.question}: mean over seeds {self.seeds} (thin: each seed)"))
        lines = [f"# {self.title}", "",
                 f"{header['date']}, {MACHINE} (load average at the end {header['load_15min']:.1f} over 15 minutes, "
                 f"of which this script's seeds run side by side are {header['jobs']}, one thread each: more means "
                 f"other jobs slowed it), torch {torch.__version__}, seeds {', '.join(map(str, self.seeds))}; the runs "
                 f"and measurements this question uses took {header['runs_wall_s'] / 60:.1f} min of wall time summed "
                 f"over them ({header['jobs']} at a time; the SFT and GRPO runs shared between questions count in "
                 f"each), this invocation {elapsed / 60:.1f} min. "
                 + ("**QUICK RUN: a smoke test of the script, not a result.**" if self.args.quick else ""), "",
                 f"Command: `python experiments/{self.question}.py{''.join(' ' + a for a in self.args.argv)}`. "
                 f"Budget: {json.dumps(self.budget)} (the question's own changes to it are in its text below); model: "
                 f"the demo's, {DEMO_MODEL['num_hidden_layers']} layers, hidden {DEMO_MODEL['hidden_size']} "
                 f"(tasks.DEMO_MODEL). Mean ± sample std over seeds; accuracies in %.", ""]
        if self.doc:
            lines += [self.doc.strip(), ""]
        lines += ["| setting | runs | " + " | ".join(columns) + " |",
                  "| --- | --- | " + " | ".join("---" for _ in columns) + " |"]
        for setting in settings:
            lines.append(f"| {setting} | {summary[setting]['runs']} | "
                         + " | ".join(format_mean_std(summary[setting][c], c) for c in columns) + " |")
        lines += ["", *(f"![{os.path.basename(s)}]({os.path.basename(s)})" for s in svgs), ""]
        if notes:
            lines += [notes.strip(), ""]
        with open(os.path.join(self.out, "results.md"), "w") as f:
            f.write("\n".join(lines))
        print("\n".join(lines), flush=True)
        return summary


def mean_std(values):
    values = [float(v) for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    if not values:
        return None
    return dict(mean=statistics.fmean(values), std=statistics.stdev(values) if len(values) > 1 else 0.0,
                n=len(values))


def format_mean_std(stat, column):
    if stat is None:
        return "-"
    digits = 1 if ("accuracy" in column or column.startswith(("heldout", "level", "traces")) or column.endswith("_s")
                   or "length" in column or "pass" in column) else 4
    return f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}"


# -----------------------------------------------------------------------------
# measuring a checkpoint


def load(path):
    model = Transformer.from_pretrained(path, device=torch.device("cpu"), dtype=torch.float32).eval()
    return model, Tokenizer.from_pretrained(path)


@torch.no_grad()
def accuracy(path, level=None, problems=200, max_new_tokens=64, seed=0) -> float:
    """pass@1 (%) of one sample per held-out problem of a demo level, at temperature 1 (the trainers' eval)."""
    model, tokenizer = load(path)
    task = DemoTask(test_size=problems, level=level)
    records = evaluate(model, tokenizer, task, task.test_problems(), n=1, temperature=1.0, top_p=1.0,
                       max_new_tokens=max_new_tokens, instruction=None, seed=seed, show_progress=False)
    return metrics(records, n=1)["pass@1"]


@torch.no_grad()
def drift(path, start_path, problems=64, max_new_tokens=64, seed=0) -> dict:
    """How far a checkpoint moved from where it started, measured the same way for every setting (beta = 0
    included): completions sampled from it (temperature 1) on held-out prompts, and at each completion token the
    exact KL over the vocabulary to the start, both ways (reverse KL(pi||start), forward KL(start||pi)), and the
    entropy of pi; per-token means, and the mean completion length."""
    model, tokenizer = load(path)
    start, _ = load(start_path)
    task = DemoTask(test_size=problems)
    prompts = [task.prompt(tokenizer, p) for p in task.test_problems()]
    completions = generate(model, prompts, max_new_tokens, temperature=1.0, n=1,
                           stop_token_ids=tokenizer.eos_token_ids, seed=seed)
    reverse = forward = entropy = tokens = 0.0
    for c in completions:
        if not c.tokens:
            continue
        ids = torch.tensor([prompts[c.prompt_index] + list(c.tokens)])
        first = len(prompts[c.prompt_index]) - 1  # the logits at position t predict token t + 1
        logp = torch.log_softmax(model(ids)[0, first:-1].float(), -1)
        logq = torch.log_softmax(start(ids)[0, first:-1].float(), -1)
        p, q = logp.exp(), logq.exp()
        reverse += float((p * (logp - logq)).sum())
        forward += float((q * (logq - logp)).sum())
        entropy += float(-(p * logp).sum())
        tokens += logp.shape[0]
    tokens = max(tokens, 1)
    return dict(kl_reverse=reverse / tokens, kl_forward=forward / tokens, entropy=entropy / tokens,
                length=statistics.fmean(len(c.tokens) for c in completions))
