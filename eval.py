"""
The eval command line: runs tasks.evaluate over benchmarks and writes what a reader needs: a table on stdout,
results.json, completions.jsonl (every completion with its extracted answer and verdict) and
accuracy_vs_length.svg, with the mission's combined score: the mean over GSM8K, MATH-500 and AIME 2024 of
(our pass@1 - DeepSeek-V3's). Loading, prompting, grading and the metrics are tasks.py's.

    python eval.py                                                  # the demo SFT checkpoint on the demo task
    python eval.py --model=path/to/hf_folder --benchmarks=gsm8k,math500,aime24 --data_dir=path/to/data --n=16
    torchrun --nproc_per_node=8 eval.py --model=... --benchmarks=aime24 --n=64 --max_new_tokens=32768
    python eval.py --task=my_task.py:ReverseWord --model=...        # a task of your own (README "Your own task")
    python eval.py --download=true --benchmarks=gsm8k,math500,aime24,amc23 --data_dir=data   # fetch them (internet)
    python eval.py --completions=vllm_out.jsonl --benchmarks=math500 --data_dir=data   # grade outputs made elsewhere

A killed eval resumes where it stopped (completed problems are read back from the partial completion files).
"""

import dataclasses
import json
import math
import os
import sys
from dataclasses import dataclass
from typing import Literal

import torch

from common import MetricsLog, check_values, import_wandb, init_distributed, parse_config
from data import Tokenizer, read_jsonl
from model import Transformer
from tasks import BENCHMARK_FILES, Benchmark, Task, check_problems, evaluate, get_task, metrics, verdict_fields

# DeepSeek-V3 technical report (arXiv:2412.19437): GSM8K from Table 3 (the base model, 8-shot, EM); MATH-500 and
# AIME 2024 from Table 6 (the chat model; MATH-500 EM, AIME 2024 Pass@1).
DEEPSEEK_V3 = {"gsm8k": 89.3, "math500": 90.2, "aime24": 39.2}
DEEPSEEK_V3_SOURCE = "DeepSeek-V3 Technical Report, arXiv:2412.19437, Tables 3 and 6"


@dataclass
class EvalConfig:
    # data
    benchmarks: str = "demo"  # comma-separated tasks: demo, gsm8k, math500, aime24, aime25, amc23, a .jsonl file,
    # or path/to/file.py:TaskClass
    task: str | None = None  # one task, any of the above (the same as --benchmarks=<task>)
    data_dir: str = "data"  # folder with <benchmark>/test.jsonl (see tasks.BENCHMARK_FILES)
    limit: int | None = None  # first N problems of each benchmark (None: all)
    demo_problems: int = 500  # held-out demo problems
    instruction: str | None = None  # appended to each problem; None: the task's own (the r1 instruction for math
    # benchmarks, none for the demo); "none": no instruction
    download: bool = False  # fetch the named benchmarks' missing files from their official sources, then evaluate
    # (only fetch when --model is no model folder)
    # model
    model: str = "out/sft_demo/final"  # Hugging Face folder
    dtype: Literal["auto", "bfloat16", "float32"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    # sampling; None: the task's default (0.6 / 0.95 / 4096 for math benchmarks as DeepSeek-R1, 1.0 / 1.0 / 64 for
    # the demo as its training evals; 32768 new tokens for AIME with R1-style models)
    n: int = 1  # samples per problem
    temperature: float | None = None
    top_p: float | None = None
    max_new_tokens: int | None = None
    max_slots: int = 0  # sequences decoded at once (0: generate's default, 256)
    cuda_graph: bool = True  # on GPUs, decode through a captured CUDA graph
    seed: int = 0
    # grading only
    completions: str = ""  # JSONL of completions made elsewhere (vLLM, another framework): grade them, no model
    # output
    out_dir: str = "out/eval"
    chunk: int = 64  # problems per resumable chunk
    wandb_project: str = ""  # also log the scores to this Weights & Biases project ("": off; needs pip install wandb)
    wandb_run_name: str = ""  # "": the out_dir's name


def download(name, data_dir):
    import urllib.request

    relative, url = BENCHMARK_FILES[name]
    path = os.path.join(data_dir, relative)
    if os.path.exists(path):
        return
    if url is None:
        raise SystemExit(f"{name} has no single official JSONL; see README 'Data'")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    print(f"downloading {url} -> {path}")
    urllib.request.urlretrieve(url, path + ".part")
    os.replace(path + ".part", path)


# -----------------------------------------------------------------------------
# metrics


def combined_score(scores: dict) -> float | None:
    """Mean over GSM8K, MATH-500 and AIME 2024 of (ours - DeepSeek-V3), in points; None unless all three ran."""
    if not all(name in scores for name in DEEPSEEK_V3):
        return None
    return sum(scores[name] - DEEPSEEK_V3[name] for name in DEEPSEEK_V3) / len(DEEPSEEK_V3)


# -----------------------------------------------------------------------------
# outputs


def accuracy_vs_length_svg(records_by_benchmark, path, bins=8):
    """A dependency-free line chart: accuracy of completions binned by length (tokens), one line per benchmark."""
    width, height, margin = 560, 320, 48
    colors = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b"]
    all_lengths = [s["length"] for records in records_by_benchmark.values() for r in records for s in r["samples"]]
    longest = max(all_lengths + [1])
    x = lambda length: margin + (width - 2 * margin) * length / longest
    y = lambda accuracy: height - margin - (height - 2 * margin) * accuracy
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-size="11">',
             f'<line x1="{margin}" y1="{y(0)}" x2="{width - margin}" y2="{y(0)}" stroke="black"/>',
             f'<line x1="{margin}" y1="{y(0)}" x2="{margin}" y2="{y(1)}" stroke="black"/>',
             f'<text x="{width / 2}" y="{height - 10}" text-anchor="middle">completion length (tokens, '
             f'max {longest})</text>',
             f'<text x="12" y="{height / 2}" transform="rotate(-90 12 {height / 2})" text-anchor="middle">'
             f'accuracy</text>']
    for level in (0, 0.5, 1):
        parts.append(f'<text x="{margin - 6}" y="{y(level) + 4}" text-anchor="end">{level:.1f}</text>')
    for k, (name, records) in enumerate(records_by_benchmark.items()):
        samples = sorted((s["length"], s["status"] == "correct") for r in records for s in r["samples"])
        size = max(1, math.ceil(len(samples) / bins))
        points = [(sum(l for l, _ in group) / len(group), sum(c for _, c in group) / len(group))
                  for group in (samples[i: i + size] for i in range(0, len(samples), size))]
        color = colors[k % len(colors)]
        coordinates = " ".join(f"{x(length):.1f},{y(accuracy):.1f}" for length, accuracy in points)
        parts.append(f'<polyline fill="none" stroke="{color}" stroke-width="2" points="{coordinates}"/>')
        parts.append(f'<text x="{width - margin}" y="{margin + 14 * k}" fill="{color}" text-anchor="end">'
                     f'{name}</text>')
    parts.append("</svg>")
    with open(path, "w") as f:
        f.write("\n".join(parts))


def print_table(results):
    columns = ["pass@1"] + sorted({k for m in results.values() for k in m if k.startswith(("maj@", "pass@"))
                                   and k != "pass@1"}) + ["mean_length", "truncated"]
    print(f"{'benchmark':<10} {'problems':>8} " + " ".join(f"{c:>11}" for c in columns)
          + f" {'vs DeepSeek-V3':>15}")
    for name, scores in results.items():
        reference = "" if name not in DEEPSEEK_V3 else "partial" if scores.get("partial") else \
            f"{scores['pass@1'] - DEEPSEEK_V3[name]:+.1f}"  # a part of a benchmark is not its score
        print(f"{name:<10} {scores['problems']:>8} " + " ".join(
            f"{scores.get(c, float('nan')):>11.3f}" if c == "truncated" else f"{scores.get(c, float('nan')):>11.1f}"
            for c in columns) + f" {reference:>15}")


def main(argv=None):
    config = parse_config(EvalConfig, {}, argv)
    tasks = check_config(config)
    if config.completions:
        return grade_completions_main(config, tasks)
    rank, world_size, device = init_distributed()
    if config.download:
        fetched = [name for name, task in tasks.items() if isinstance(task, Benchmark)]  # not a user's .jsonl
        if not fetched:
            fetchable = ",".join(name for name, (_, url) in BENCHMARK_FILES.items() if url)
            raise SystemExit(f"--download=true: --benchmarks={config.benchmarks} names no benchmark file to fetch; "
                             f"name them, e.g. --benchmarks={fetchable}")
        if rank == 0:
            for name in fetched:
                download(name, config.data_dir)
        if world_size > 1:
            torch.distributed.barrier()  # every rank reads the files rank 0 fetched
        if not os.path.exists(os.path.join(config.model, "config.json")):
            print(f"{', '.join(fetched)} in {config.data_dir}; --model={config.model} is no model folder, so "
                  f"nothing is evaluated")
            return {}
    dtype = {"auto": torch.bfloat16 if device.type == "cuda" else torch.float32, "bfloat16": torch.bfloat16,
             "float32": torch.float32}[config.dtype]
    if not os.path.exists(os.path.join(config.model, "config.json")):
        raise SystemExit(f"{config.model} is not a model folder; the demo checkpoint is made by: python train_sft.py")
    model = Transformer.from_pretrained(config.model, device=device, dtype=dtype).eval()
    refuse_non_finite(model, config.model)
    tokenizer = Tokenizer.from_pretrained(config.model)
    thinks = "<think>" in (tokenizer.chat_template or "")  # R1-style models need long budgets on AIME
    os.makedirs(config.out_dir, exist_ok=True)
    results, records_by_benchmark = {}, {}
    partial_file = lambda name: os.path.join(config.out_dir, f"partial_{name}.rank{rank}.jsonl")
    for name, task in tasks.items():
        problems = check_problems(task.test_problems(), task)[: config.limit]
        default_tokens = 32768 if name.startswith("aime") and thinks else task.max_new_tokens
        max_new_tokens = first_set(config.max_new_tokens, default_tokens)
        temperature, top_p = first_set(config.temperature, task.temperature), first_set(config.top_p, task.top_p)
        if rank == 0:
            print(f"{name}: {len(problems)} problems x {config.n} samples, max {max_new_tokens} new tokens, "
                  f"temperature {temperature}, top-p {top_p}")
        records = evaluate(model, tokenizer, task, problems, config.n, temperature, top_p, max_new_tokens,
                           config.instruction, config.seed, config.max_slots, rank, world_size,
                           partial_file=partial_file(name), chunk=config.chunk, cuda_graph=config.cuda_graph,
                           keep_partial=True)
        results[name] = metrics(records, config.n)
        records_by_benchmark[name] = records
        if rank == 0:  # saved as soon as it is finished: a kill during the next benchmark cannot lose it
            score = write_outputs(config, results, records_by_benchmark)
    if world_size > 1:
        torch.distributed.barrier()  # rank 0 has saved every benchmark before any rank drops its partial files
    for name in tasks:  # all saved: a later eval with the same settings starts afresh
        if os.path.exists(partial_file(name)):
            os.remove(partial_file(name))
    if rank != 0:
        return results
    log_scores(config, results, score)
    print_table(results)
    if score is not None:
        print(f"combined score (mean of ours - DeepSeek-V3 on gsm8k, math500, aime24): {score:+.2f} points")
    print(f"wrote {config.out_dir}/results.json, completions.jsonl, accuracy_vs_length.svg")
    return results


def first_set(value, default):
    return default if value is None else value


def log_scores(config, results, score):
    """One metrics.jsonl line (and Weights & Biases, when asked): every number of every benchmark, the combined
    score. Opened only now, so that a failed eval leaves the last one's line in place."""
    scores = {f"{name}/{key}": value for name, m in results.items() for key, value in m.items()
              if isinstance(value, (int, float))}
    log = MetricsLog(os.path.join(config.out_dir, "metrics.jsonl"), config=config)
    log.write(step=0, combined_score=score, **scores)
    log.close()


# -----------------------------------------------------------------------------
# grading completions made elsewhere


def grade_completions_file(path, tasks, problems_by_benchmark) -> dict[str, list[dict]]:
    """Reads completions made by any engine and grades them by their task ({name: Task}), as evaluate() would. One
    row per completion: {"id" or "problem", "completion"} (or "completions": [...] for several samples), and optionally
    "benchmark", "length" (tokens; characters when absent) and "finish". Rows are matched to problems by id, else by
    the problem's text. Returns {benchmark: records} in the layout of evaluate()'s records."""
    by_id, by_text = {}, {}
    for name, problems in problems_by_benchmark.items():
        for problem in problems:
            by_id[(name, problem["id"])] = problem
            by_text.setdefault(problem["problem"].strip(), (name, problem))
    samples_by_problem = {}  # (benchmark, problem id) -> [sample]
    for row in read_jsonl(path):
        completions = row.get("completions", [row.get("completion")])
        if not isinstance(completions, list) or not completions or \
                not all(isinstance(c, str) for c in completions):
            raise ValueError(f"{row['_source']}: field 'completion' (a string) or 'completions' (a list of strings) "
                             f"is required")
        name, problem = _match_problem(row, by_id, by_text)
        samples_by_problem.setdefault((name, problem["id"]), []).extend(
            dict(text=text, length=row.get("length", len(text)), finish=row.get("finish", "stop"))
            for text in completions)
    records = {name: [] for name in problems_by_benchmark}
    for name, task in tasks.items():
        keys = [key for key in samples_by_problem if key[0] == name]
        texts = [sample["text"] for key in keys for sample in samples_by_problem[key]]
        verdicts = iter(task.grade(texts, [by_id[key] for key in keys for _ in samples_by_problem[key]]))
        for key in keys:
            samples = [dict(sample, **verdict_fields(next(verdicts))) for sample in samples_by_problem[key]]
            records[name].append(dict(by_id[key], samples=samples))
    return {name: rows for name, rows in records.items() if rows}


def _match_problem(row, by_id, by_text):
    """(benchmark, problem) of a row: by its id (within its 'benchmark' when given), else by the problem text."""
    if "id" in row:
        matches = [(name, problem) for (name, problem_id), problem in by_id.items()
                   if problem_id == str(row["id"]) and row.get("benchmark") in (None, name)]
        if len(matches) == 1:
            return matches[0]
        if len(matches) > 1:
            raise ValueError(f"{row['_source']}: id {row['id']!r} is in several benchmarks; add a 'benchmark' field")
    if isinstance(row.get("problem"), str) and row["problem"].strip() in by_text:
        return by_text[row["problem"].strip()]
    raise ValueError(f"{row['_source']}: no problem of --benchmarks has this row's 'id' or 'problem' text")


def math_verify_pass_at_1(records) -> float | None:
    """Math-Verify's pass@1 on the same completions, or None when it is not installed (a peer, never a
    dependency): where the two verifiers part, a user can read the completions and see which is right."""
    try:
        from math_verify import parse, verify
    except ImportError:
        return None
    correct = []
    for record in records:
        gold = parse(f"${record['answer']}$")
        correct.append(sum(bool(verify(gold, parse(s["text"]))) for s in record["samples"]) / len(record["samples"]))
    return 100 * sum(correct) / len(correct)


def grade_completions_main(config, tasks) -> dict:
    """eval.py --completions=...: the same table, results.json, completions.jsonl and metrics line, without a
    model."""
    problems = {name: check_problems(task.test_problems(), task)[: config.limit] for name, task in tasks.items()}
    records_by_benchmark = grade_completions_file(config.completions, tasks, problems)
    results = {}
    for name, records in records_by_benchmark.items():
        counts = sorted({len(r["samples"]) for r in records})
        if len(counts) > 1:
            raise SystemExit(f"{config.completions}: {name} has {counts[0]} to {counts[-1]} completions per problem; "
                             f"pass@k and maj@n need the same number for every problem")
        results[name] = metrics(records, counts[0])
        if len(records) < len(problems[name]):  # not comparable with a published score, nor in the combined one
            results[name]["partial"] = True
            print(f"warning: {config.completions} covers {len(records)} of the {len(problems[name])} {name} "
                  f"problems: its {name} score is of those only", file=sys.stderr)
    os.makedirs(config.out_dir, exist_ok=True)
    score = write_outputs(config, results, records_by_benchmark)
    log_scores(config, results, score)
    print_table(results)
    for name, records in records_by_benchmark.items():
        graded_by_verifier = type(tasks[name]).grade is Task.grade  # a task with its own judge has no peer
        peer = math_verify_pass_at_1(records) if graded_by_verifier else None
        if peer is not None:
            print(f"{name}: pass@1 {results[name]['pass@1']:.1f} by our verifier, {peer:.1f} by Math-Verify, "
                  f"on the same completions")
    if score is not None:
        print(f"combined score (mean of ours - DeepSeek-V3 on gsm8k, math500, aime24): {score:+.2f} points")
    return results


def check_config(config) -> dict:
    """{name: Task} of the tasks to run, after refusing values that make no sense (naming the flag)."""
    for key, default in (("limit", "every problem"), ("max_new_tokens", "the task's default")):
        if getattr(config, key) == 0:  # 0 meant the default before these flags defaulted to None
            raise SystemExit(f"--{key}=0: leave the flag out for {default}")
    check_values(config, positive=("n", "chunk", "demo_problems", "limit", "max_new_tokens"),
                 non_negative=("max_slots", "temperature", "top_p"))
    if config.top_p is not None and config.top_p > 1:
        raise SystemExit(f"--top_p={config.top_p}: must be at most 1")
    if config.task and config.benchmarks != EvalConfig.benchmarks:
        raise SystemExit(f"--task={config.task} and --benchmarks={config.benchmarks}: name the tasks once (--task=X "
                         f"is --benchmarks=X)")
    specs = [config.task] if config.task else [b.strip() for b in config.benchmarks.split(",") if b.strip()]
    if not specs:
        raise SystemExit(f"--benchmarks={config.benchmarks!r}: empty; choose from demo, {', '.join(BENCHMARK_FILES)}, "
                         f"a .jsonl file or path/to/file.py:TaskClass")
    tasks = {}
    for spec in specs:
        task = get_task(spec, config.data_dir, config.demo_problems, flag="--task" if config.task else "--benchmarks")
        if task.name in tasks:
            raise SystemExit(f"--benchmarks={config.benchmarks!r}: two tasks are named {task.name!r}")
        tasks[task.name] = task
    if config.wandb_project:  # the scores are logged at the end: a missing wandb must stop the eval now
        import_wandb(config.wandb_project)
    return tasks


def refuse_non_finite(model, path):
    """Weights with NaN or inf sample garbage that scores 0%, which would read as a result."""
    broken = [name for name, t in model.state_dict().items() if t.is_floating_point() and not t.isfinite().all()]
    if broken:
        raise SystemExit(f"{path}: {', '.join(broken[:3])}{' and more' if len(broken) > 3 else ''} not finite "
                         f"(NaN or inf): these weights are broken (did the run that wrote them diverge?)")


def write_outputs(config, results, records_by_benchmark) -> float | None:
    """results.json, completions.jsonl and the accuracy-vs-length plot of the benchmarks finished so far."""
    score = combined_score({name: m["pass@1"] for name, m in results.items() if not m.get("partial")})
    # each file is written whole under a temporary name, then renamed: a kill mid-write keeps the previous one
    results_file = os.path.join(config.out_dir, "results.json")
    completions_file = os.path.join(config.out_dir, "completions.jsonl")
    with open(results_file + ".tmp", "w") as f:
        json.dump({"config": dataclasses.asdict(config), "results": results, "combined_score": score,
                   "deepseek_v3": DEEPSEEK_V3, "deepseek_v3_source": DEEPSEEK_V3_SOURCE}, f, indent=2)
    with open(completions_file + ".tmp", "w") as f:
        for name, records in records_by_benchmark.items():
            for record in records:
                f.write(json.dumps(dict(record, benchmark=name)) + "\n")
    os.replace(completions_file + ".tmp", completions_file)
    os.replace(results_file + ".tmp", results_file)
    accuracy_vs_length_svg(records_by_benchmark, os.path.join(config.out_dir, "accuracy_vs_length.svg"))
    return score


if __name__ == "__main__":
    main()
