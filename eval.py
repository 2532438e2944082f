"""
Math evals: GSM8K, MATH-500, AIME 2024 (and AIME 2025, AMC 2023, the built-in demo), with pass@1 over n samples,
maj@n, unbiased pass@k, completion lengths, and the mission's combined score: the mean over GSM8K, MATH-500 and
AIME 2024 of (our score - DeepSeek-V3's).

    python eval.py                                                  # the demo SFT checkpoint on the demo task
    python eval.py --model=path/to/hf_folder --benchmarks=gsm8k,math500,aime24 --data_dir=path/to/data --n=16
    torchrun --nproc_per_node=8 eval.py --model=... --benchmarks=aime24 --n=64 --max_new_tokens=32768
    python eval.py --download --data_dir=data                       # fetch the JSONL files (needs internet)
    python eval.py --completions=vllm_out.jsonl --benchmarks=math500 --data_dir=data   # grade outputs made elsewhere

Outputs in --out_dir: results.json, completions.jsonl (every completion with its extracted answer and verdict),
accuracy_vs_length.svg, and a table on stdout. A killed eval resumes where it stopped (completed problems are read
back from the partial completion files).
"""

import dataclasses
import hashlib
import json
import math
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass

import torch

from common import all_gather_objects, check_values, format_eta, init_distributed, parse_config
from data import Tokenizer, demo_problems, read_jsonl, render_prompt
from model import Transformer, checkpoint_files
from sampler import generate
from verifier import normalize, plain_number, verify_batch

INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."

# DeepSeek-V3 technical report (arXiv:2412.19437): GSM8K from Table 3 (the base model, 8-shot, EM); MATH-500 and
# AIME 2024 from Table 6 (the chat model; MATH-500 EM, AIME 2024 Pass@1).
DEEPSEEK_V3 = {"gsm8k": 89.3, "math500": 90.2, "aime24": 39.2}
DEEPSEEK_V3_SOURCE = "DeepSeek-V3 Technical Report, arXiv:2412.19437, Tables 3 and 6"

BENCHMARK_FILES = {  # name -> (file under data_dir, official source for --download)
    "gsm8k": ("gsm8k/test.jsonl",
              "https://raw.githubusercontent.com/openai/grade-school-math/master/grade_school_math/data/test.jsonl"),
    "math500": ("math500/test.jsonl",
                "https://media.githubusercontent.com/media/openai/prm800k/main/prm800k/math_splits/test.jsonl"),
    "aime24": ("aime2024/test.jsonl",
               "https://raw.githubusercontent.com/QwenLM/Qwen2.5-Math/main/evaluation/data/aime24/test.jsonl"),
    "amc23": ("amc2023/test.jsonl",
              "https://raw.githubusercontent.com/QwenLM/Qwen2.5-Math/main/evaluation/data/amc23/test.jsonl"),
    "aime25": ("aime2025/test.jsonl", None),  # MathArena's .tex files; no single official JSONL
}


@dataclass
class EvalConfig:
    # data
    benchmarks: str = "demo"  # comma-separated: gsm8k, math500, aime24, aime25, amc23, demo
    data_dir: str = "data"  # folder with <benchmark>/test.jsonl (see BENCHMARK_FILES)
    limit: int = 0  # first N problems of each benchmark (0 = all)
    demo_problems: int = 500  # held-out demo problems
    instruction: str = INSTRUCTION  # appended to each problem; "none" for none (the demo's default)
    download: bool = False  # fetch missing files from their official sources, then evaluate
    # model
    model: str = "out/sft_demo/final"  # Hugging Face folder
    dtype: str = "auto"  # auto (bf16 on GPU, fp32 on CPU), bfloat16, float32
    # sampling
    n: int = 1  # samples per problem
    temperature: float = -1.0  # -1: 0.6 (the DeepSeek-R1 convention), 1.0 for the demo (as its training evals)
    top_p: float = -1.0  # -1: 0.95, 1.0 for the demo
    max_new_tokens: int = 0  # 0: 32768 for AIME with R1-style models, 4096 otherwise, 64 for the demo
    max_slots: int = 0  # sequences decoded at once (0: as many as half the free memory holds, up to 256)
    cuda_graph: bool = True  # on GPUs, decode through a captured CUDA graph
    seed: int = 0
    # grading only
    completions: str = ""  # JSONL of completions made elsewhere (vLLM, another framework): grade them, no model
    # output
    out_dir: str = "out/eval"
    chunk: int = 64  # problems per resumable chunk


def load_benchmark(name, data_dir, limit=0, demo_count=500) -> list[dict]:
    """[{"id", "problem", "answer"}]: GSM8K {"question", "answer": "... #### N"}, MATH-500 {"problem",
    "answer", "unique_id", ...}, AIME/AMC {"id", "problem", "answer"}. Errors name the file, line and field."""
    if name == "demo":
        problems = [{"id": f"demo-{i}", "problem": p["problem"], "answer": p["answer"]}
                    for i, p in enumerate(demo_problems(demo_count, seed=1234, heldout=True))]
        return problems[:limit] if limit else problems
    if name not in BENCHMARK_FILES:
        raise SystemExit(f"unknown benchmark {name!r}; known: demo, {', '.join(BENCHMARK_FILES)}")
    path = os.path.join(data_dir, BENCHMARK_FILES[name][0])
    if not os.path.exists(path):
        raise SystemExit(f"{path} is missing: see README 'Data' for where to get it, or run with --download")
    problems = []
    for line_number, record in enumerate(read_jsonl(path), start=1):
        source = record["_source"]
        problem = record.get("problem", record.get("question"))
        answer = record.get("answer")
        if not isinstance(problem, str) or not problem.strip():
            raise ValueError(f"{source}: field 'problem' (or 'question') must be a non-empty string")
        if answer is None or (isinstance(answer, str) and not answer.strip()):
            raise ValueError(f"{source}: field 'answer' is missing or empty")
        answer = str(answer)
        if name == "gsm8k":
            if "####" not in answer:
                raise ValueError(f"{source}: field 'answer' has no '#### N' line (GSM8K format)")
            answer = answer.split("####")[-1].strip()
        problem_id = record.get("id", record.get("unique_id", record.get("idx", f"{name}-{line_number}")))
        problems.append({"id": str(problem_id), "problem": problem, "answer": answer})
    return problems[:limit] if limit else problems


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


def pass_at_k(n, c, k) -> float:
    """Unbiased pass@k (Chen et al. 2021): 1 - C(n - c, k) / C(n, k), for n samples of which c are correct."""
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def majority_vote(samples) -> dict | None:
    """The most frequent answer among samples that have one. Answers are compared after normalisation, numbers by
    value ("5" and "5.0" are one vote). A tie goes to the answer seen first, never to dictionary order."""
    def key(answer):
        text = normalize(answer)
        number = plain_number(text)
        return number if number is not None else text

    answers = [(key(s["extracted"]), s) for s in samples if s["extracted"] is not None]
    if not answers:
        return None
    counts = Counter(key for key, _ in answers)
    best = max(counts.values())
    return next(sample for key, sample in answers if counts[key] == best)


def benchmark_metrics(records, n) -> dict:
    ks = [k for k in (1, 2, 4, 8, 16, 32, 64) if k <= n]
    correct = [sum(s["status"] == "correct" for s in r["samples"]) for r in records]
    lengths = [s["length"] for r in records for s in r["samples"]]
    metrics = {"problems": len(records), "n": n,
               "pass@1": 100 * sum(c / n for c in correct) / len(records),
               f"maj@{n}": 100 * sum((v := majority_vote(r["samples"])) is not None and v["status"] == "correct"
                                     for r in records) / len(records),
               "mean_length": sum(lengths) / len(lengths),
               "truncated": sum(s["finish"] == "length" for r in records for s in r["samples"]) / len(lengths)}
    for k in ks[1:]:
        metrics[f"pass@{k}"] = 100 * sum(pass_at_k(n, c, k) for c in correct) / len(records)
    return metrics


def combined_score(scores: dict) -> float | None:
    """Mean over GSM8K, MATH-500 and AIME 2024 of (ours - DeepSeek-V3), in points; None unless all three ran."""
    if not all(name in scores for name in DEEPSEEK_V3):
        return None
    return sum(scores[name] - DEEPSEEK_V3[name] for name in DEEPSEEK_V3) / len(DEEPSEEK_V3)


# -----------------------------------------------------------------------------
# sampling and grading


def evaluate(model, tokenizer, problems, n=1, temperature=0.6, top_p=0.95, max_new_tokens=1024,
             instruction=INSTRUCTION, seed=0, max_slots=0, rank=0, world_size=1, partial_file=None, chunk=64,
             show_progress=True, cuda_graph=False, keep_partial=False):
    """Samples n completions for each problem (this rank's share: problems[rank::world_size]), grades them, and
    returns every rank's records, in problem order. With partial_file, finished problems are appended there and
    skipped when the eval is run again with the same weights and settings; the file is removed at the end unless
    keep_partial (eval.py's main removes it once every benchmark is saved)."""
    model_path = getattr(tokenizer, "path", None)
    run_key = json.dumps([model_path, weights_fingerprint(model_path), n, temperature, top_p, max_new_tokens,
                          instruction, seed, world_size], default=str)  # other weights or settings: not reused
    done = {}
    if partial_file and os.path.exists(partial_file):
        done = {r["id"]: r for r in read_partial(partial_file) if r.get("run_key") == run_key}
    mine = [p for i, p in enumerate(problems) if i % world_size == rank]
    todo = [p for p in mine if p["id"] not in done]
    records = [done[p["id"]] for p in mine if p["id"] in done]
    total, start, finished = len(todo) * n, time.time(), 0

    def progress(_completion):
        nonlocal finished
        finished += 1
        if show_progress and rank == 0 and (finished % 16 == 0 or finished == total):
            rate = finished / max(time.time() - start, 1e-9)
            bar = "#" * int(30 * finished / total)
            print(f"\r  [{bar:<30}] {finished}/{total} completions | ETA {format_eta((total - finished) / rate)}",
                  end="" if finished < total else "\n", file=sys.stderr, flush=True)

    for offset in range(0, len(todo), chunk):
        batch = todo[offset: offset + chunk]
        prompts = [render_prompt(tokenizer, p["problem"], instruction) for p in batch]
        completions = generate(model, prompts, max_new_tokens, temperature=temperature, top_p=top_p, n=n,
                               stop_token_ids=tokenizer.eos_token_ids, seed=seed + offset + rank * 1_000_003,
                               max_slots=max_slots, progress=progress, cuda_graph=cuda_graph)
        texts = [tokenizer.decode(c.tokens, skip_special_tokens=True) for c in completions]
        verdicts = verify_batch([(text, batch[c.prompt_index]["answer"]) for text, c in zip(texts, completions)])
        for i, problem in enumerate(batch):
            samples = [{"text": texts[j], "extracted": verdicts[j].answer, "status": verdicts[j].status,
                        "reason": verdicts[j].reason, "length": len(completions[j].tokens),
                        "finish": completions[j].finish_reason} for j in range(i * n, (i + 1) * n)]
            record = dict(problem, samples=samples)
            records.append(record)
            if partial_file:
                with open(partial_file, "a") as f:
                    f.write(json.dumps(dict(record, run_key=run_key)) + "\n")
    order = {p["id"]: i for i, p in enumerate(problems)}
    gathered = [r for part in all_gather_objects(records) for r in part]
    if partial_file and not keep_partial and os.path.exists(partial_file):
        os.remove(partial_file)  # finished: a later run of the same settings starts afresh
    return sorted(({k: v for k, v in r.items() if k not in ("run_key", "_source")} for r in gathered),
                  key=lambda r: order[r["id"]])


def weights_fingerprint(path) -> str | None:
    """Tells the weights in a model folder apart without reading them all: each weight file's name, size, mtime
    and first and last MB. Weights rewritten at the same path (a training run saving again) get a new one."""
    if not path or not os.path.exists(os.path.join(path, "config.json")):
        return None
    digest = hashlib.sha256()
    for file in checkpoint_files(path):
        size = os.path.getsize(file)
        digest.update(f"{os.path.basename(file)} {size} {os.stat(file).st_mtime_ns}".encode())
        with open(file, "rb") as f:
            digest.update(f.read(2**20))
            f.seek(max(0, size - 2**20))
            digest.update(f.read())
    return digest.hexdigest()


def read_partial(path) -> list[dict]:
    """The records of a partial file. A kill while a line was written leaves it torn (no newline at its end): it
    is dropped with a warning and cut from the file, so the next record starts on a line of its own."""
    with open(path, "rb") as f:
        data = f.read()
    end = data.rfind(b"\n") + 1
    if end < len(data):
        print(f"warning: {path}: dropped a torn last line (an eval killed while writing it)", file=sys.stderr)
        with open(path, "r+b") as f:
            f.truncate(end)
    return read_jsonl(path, allow_empty=True)


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
    for name, metrics in results.items():
        reference = f"{metrics['pass@1'] - DEEPSEEK_V3[name]:+.1f}" if name in DEEPSEEK_V3 else ""
        print(f"{name:<10} {metrics['problems']:>8} " + " ".join(
            f"{metrics.get(c, float('nan')):>11.3f}" if c == "truncated" else f"{metrics.get(c, float('nan')):>11.1f}"
            for c in columns) + f" {reference:>15}")


def main(argv=None):
    config = parse_config(EvalConfig, {}, argv)
    benchmarks = check_config(config)
    if config.completions:
        return grade_completions_main(config, benchmarks)
    rank, world_size, device = init_distributed()
    if config.download and rank == 0:
        for name in benchmarks:
            if name != "demo":
                download(name, config.data_dir)
    dtype = {"auto": torch.bfloat16 if device.type == "cuda" else torch.float32, "bfloat16": torch.bfloat16,
             "float32": torch.float32}[config.dtype]
    if not os.path.exists(os.path.join(config.model, "config.json")):
        raise SystemExit(f"{config.model} is not a model folder; the demo checkpoint is made by: python train_sft.py")
    model = Transformer.from_pretrained(config.model, device=device, dtype=dtype).eval()
    refuse_non_finite(model, config.model)
    tokenizer = Tokenizer.from_pretrained(config.model)
    os.makedirs(config.out_dir, exist_ok=True)
    results, records_by_benchmark = {}, {}
    partial_file = lambda name: os.path.join(config.out_dir, f"partial_{name}.rank{rank}.jsonl")
    for name in benchmarks:
        problems = load_benchmark(name, config.data_dir, config.limit, config.demo_problems)
        thinks = "<think>" in (tokenizer.chat_template or "")  # R1-style models need long budgets
        max_new_tokens = config.max_new_tokens or (64 if name == "demo" else 32768 if name.startswith("aime")
                                                   and thinks else 4096)
        instruction = "none" if name == "demo" and config.instruction == INSTRUCTION else config.instruction
        temperature = config.temperature if config.temperature >= 0 else 1.0 if name == "demo" else 0.6
        top_p = config.top_p if config.top_p >= 0 else 1.0 if name == "demo" else 0.95
        if rank == 0:
            print(f"{name}: {len(problems)} problems x {config.n} samples, max {max_new_tokens} new tokens, "
                  f"temperature {temperature}, top-p {top_p}")
        records = evaluate(model, tokenizer, problems, config.n, temperature, top_p, max_new_tokens,
                           instruction, config.seed, config.max_slots, rank, world_size,
                           partial_file=partial_file(name), chunk=config.chunk, cuda_graph=config.cuda_graph,
                           keep_partial=True)
        results[name] = benchmark_metrics(records, config.n)
        records_by_benchmark[name] = records
        if rank == 0:  # saved as soon as it is finished: a kill during the next benchmark cannot lose it
            score = write_outputs(config, results, records_by_benchmark)
    if world_size > 1:
        torch.distributed.barrier()  # rank 0 has saved every benchmark before any rank drops its partial files
    for name in benchmarks:  # all saved: a later eval with the same settings starts afresh
        if os.path.exists(partial_file(name)):
            os.remove(partial_file(name))
    if rank != 0:
        return results
    print_table(results)
    if score is not None:
        print(f"combined score (mean of ours - DeepSeek-V3 on gsm8k, math500, aime24): {score:+.2f} points")
    print(f"wrote {config.out_dir}/results.json, completions.jsonl, accuracy_vs_length.svg")
    return results


# -----------------------------------------------------------------------------
# grading completions made elsewhere


def grade_completions_file(path, problems_by_benchmark) -> dict[str, list[dict]]:
    """Reads completions made by any engine and grades them against the benchmarks' answers. One row per
    completion: {"id" or "problem", "completion"} (or "completions": [...] for several samples), and optionally
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
    keys = list(samples_by_problem)
    pairs = [(sample["text"], by_id[key]["answer"]) for key in keys for sample in samples_by_problem[key]]
    verdicts = iter(verify_batch(pairs))  # the deadline evaluate() grades with
    records = {name: [] for name in problems_by_benchmark}
    for key in keys:
        samples = [dict(sample, **_verdict_fields(next(verdicts))) for sample in samples_by_problem[key]]
        records[key[0]].append(dict(by_id[key], samples=samples))
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


def _verdict_fields(verdict):
    return {"extracted": verdict.answer, "status": verdict.status, "reason": verdict.reason}


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


def grade_completions_main(config, benchmarks) -> dict:
    """eval.py --completions=...: the same table, results.json and completions.jsonl, without a model."""
    problems = {name: load_benchmark(name, config.data_dir, config.limit, config.demo_problems) for name in benchmarks}
    records_by_benchmark = grade_completions_file(config.completions, problems)
    results = {}
    for name, records in records_by_benchmark.items():
        counts = sorted({len(r["samples"]) for r in records})
        if len(counts) > 1:
            raise SystemExit(f"{config.completions}: {name} has {counts[0]} to {counts[-1]} completions per problem; "
                             f"pass@k and maj@n need the same number for every problem")
        results[name] = benchmark_metrics(records, counts[0])
        if len(records) < len(problems[name]):  # not comparable with a published score, nor in the combined one
            results[name]["partial"] = True
            print(f"warning: {config.completions} covers {len(records)} of the {len(problems[name])} {name} "
                  f"problems: its {name} score is of those only", file=sys.stderr)
    os.makedirs(config.out_dir, exist_ok=True)
    score = write_outputs(config, results, records_by_benchmark)
    print_table(results)
    for name, records in records_by_benchmark.items():
        peer = math_verify_pass_at_1(records)
        if peer is not None:
            print(f"{name}: pass@1 {results[name]['pass@1']:.1f} by our verifier, {peer:.1f} by Math-Verify, "
                  f"on the same completions")
    if score is not None:
        print(f"combined score (mean of ours - DeepSeek-V3 on gsm8k, math500, aime24): {score:+.2f} points")
    return results


def check_config(config) -> list[str]:
    """The benchmarks to run, after refusing values that make no sense (naming the flag)."""
    check_values(config, choices=dict(dtype=("auto", "bfloat16", "float32")), positive=("n", "chunk", "demo_problems"),
                 non_negative=("limit", "max_new_tokens", "max_slots"))
    for key in ("temperature", "top_p"):  # -1 picks the default
        if getattr(config, key) != -1 and not 0 <= getattr(config, key) <= (1 if key == "top_p" else math.inf):
            raise SystemExit(f"--{key}={getattr(config, key)}: out of range (-1 for the default)")
    benchmarks = [b.strip() for b in config.benchmarks.split(",") if b.strip()]
    unknown = [b for b in benchmarks if b != "demo" and b not in BENCHMARK_FILES]
    if not benchmarks or unknown:
        raise SystemExit(f"--benchmarks={config.benchmarks!r}: " + (f"unknown {', '.join(unknown)}" if unknown else
                         "empty") + f"; choose from demo, {', '.join(BENCHMARK_FILES)}")
    return benchmarks


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
