"""
Problem sets: where problems come from, how a problem is put to the model, and how a completion is scored.

Training (train_grpo.py, make_traces.py) and evaluation (eval.py, the trainers' held-out evals) reach problems only
through a Task, so a model is trained and evaluated on prompts rendered by one function and scored by one judge.

    task = get_task("math500", data_dir="data")   # demo, gsm8k, math500, aime24, aime25, amc23,
    task = get_task("problems.jsonl")              # any JSONL of {"problem" or "question", "answer"},
    task = get_task("my_task.py:Countdown")        # or a Task subclass of your own
    problems = task.test_problems()                # [{"id", "problem", "answer", ...}]
    prompt_ids = task.prompt(tokenizer, problems[0])
    verdicts = task.grade(["... \\boxed{4}"], problems[:1])
    records = evaluate(model, tokenizer, task, problems, n=4)      # sampled and graded
    print(metrics(records, n=4))                   # pass@1, maj@4, pass@2, pass@4, lengths

A task of your own (README "Your own task"): subclass Task, return problems from train_problems() and/or
test_problems(), and override grade() when the math verifier is not the judge, reward() for a reward other than
"1 if correct". The built-in demo (GSM8K in miniature, its teacher, tokenizer and untrained model) is at the end.
"""

import hashlib
import importlib.util
import json
import math
import os
import random
import sys
import time
import zlib
from collections import Counter

import torch

from common import all_gather_objects, format_eta
from data import Tokenizer, read_jsonl, render_prompt
from model import ModelConfig, Transformer, checkpoint_files, init_weights
from sampler import generate
from verifier import Verdict, format_reward, normalize, normalize_gold, plain_number, verify_batch

INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."


class Task:
    """A set of problems, the prompt each becomes, and the judge of a completion. A problem is a dict with at least
    "id" and "problem" (the text the model is asked); the default judge also reads "answer". The class attributes
    are the task's defaults for flags left unset."""

    name = "task"
    instruction = "none"  # appended to each problem on a line of its own ("none": nothing)
    temperature, top_p, max_new_tokens = 0.6, 0.95, 4096  # evaluation defaults (DeepSeek-R1's sampling)

    def train_problems(self, seed: int) -> list[dict]:
        raise SystemExit(f"task {self.name!r} has no training problems")

    def test_problems(self) -> list[dict]:
        raise SystemExit(f"task {self.name!r} has no held-out problems")

    def prompt(self, tokenizer, problem: dict, instruction: str | None = None) -> list[int]:
        """The prompt's token ids, the one way training and evaluation write it; instruction None: the task's."""
        return render_prompt(tokenizer, problem["problem"], self.instruction if instruction is None else instruction)

    def grade(self, completions: list[str], problems: list[dict]) -> list[Verdict]:
        """One Verdict per completion (status correct | incorrect | no_answer | ..., the extracted answer, why):
        the math verifier against problem["answer"], in its process pool with deadlines."""
        return verify_batch([(completion, problem["answer"]) for completion, problem in zip(completions, problems)])

    def reward(self, completion: str, problem: dict, verdict: Verdict) -> float:
        """The RL reward of one graded completion, before the trainer's format and length terms."""
        return float(verdict.correct)


def score(task, completions, problems, lengths, max_new_tokens, format_weight=0.0, overlong_buffer=0,
          overlong_max_penalty=1.0) -> tuple[list[float], list[Verdict]]:
    """GRPO's rewards: the task's reward, + format_weight x the r1 format reward, + DAPO's soft overlong penalty
    over the last overlong_buffer tokens of the budget. Returns (rewards, verdicts)."""
    verdicts = task.grade(completions, problems)
    rewards = [task.reward(c, p, v) for c, p, v in zip(completions, problems, verdicts)]
    if format_weight:
        rewards = [r + format_weight * format_reward(c) for r, c in zip(rewards, completions)]
    if overlong_buffer:
        penalties = overlong_penalty(lengths, max_new_tokens, overlong_buffer, overlong_max_penalty).tolist()
        rewards = [r + p for r, p in zip(rewards, penalties)]
    return rewards, verdicts


def overlong_penalty(lengths, max_new_tokens, buffer, penalty):
    """DAPO's soft overlong punishment: 0 up to max - buffer, then linearly down to -penalty at max."""
    lengths = torch.as_tensor(lengths, dtype=torch.float32)
    return -penalty * ((lengths - (max_new_tokens - buffer)) / buffer).clamp(0, 1)


# -----------------------------------------------------------------------------
# the problem sets: benchmarks, any JSONL file, a user's class


BENCHMARK_FILES = {  # name -> (file under data_dir, official source for eval.py --download)
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


def load_problems(path, id_prefix, gsm8k=False) -> list[dict]:
    """[{"id", "problem", "answer"}] from GSM8K {"question", "answer": "... #### N"}, MATH-500 {"problem",
    "answer", "unique_id", ...}, AIME/AMC {"id", "problem", "answer"} or any such JSONL. Errors name the file, line
    and field. A "#### N" answer (GSM8K's layout) is cut to N; with gsm8k=True it is required."""
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
        if gsm8k and "####" not in answer:
            raise ValueError(f"{source}: field 'answer' has no '#### N' line (GSM8K format)")
        answer = answer.split("####")[-1].strip()
        problem_id = record.get("id", record.get("unique_id", record.get("idx", f"{id_prefix}-{line_number}")))
        problems.append({"id": str(problem_id), "problem": problem, "answer": answer})
    return problems


class Benchmark(Task):
    """GSM8K, MATH-500, AIME 2024/2025 or AMC 2023 from data_dir (see BENCHMARK_FILES): held-out problems only."""

    instruction = INSTRUCTION

    def __init__(self, name, data_dir="data"):
        self.name, self.path = name, os.path.join(data_dir, BENCHMARK_FILES[name][0])

    def test_problems(self):
        if not os.path.exists(self.path):
            raise SystemExit(f"{self.path} is missing: see README 'Data' for where to get it, or run eval.py with "
                             f"--download=true --benchmarks={self.name}")
        return load_problems(self.path, self.name, gsm8k=self.name == "gsm8k")


class JsonlTask(Task):
    """Any JSONL file of problems with answers: it is the training set when a trainer names it, the held-out set
    when an eval does. Its problems are asked as written (no instruction unless --instruction adds one). Its name
    keeps the extension, so a file called gsm8k.jsonl is never scored as the GSM8K benchmark."""

    def __init__(self, path):
        self.path, self.name = path, os.path.basename(path)

    def train_problems(self, seed):
        return load_problems(self.path, os.path.splitext(self.name)[0])

    def test_problems(self):
        return load_problems(self.path, os.path.splitext(self.name)[0])


def get_task(spec: str, data_dir="data", demo_problems=500, flag="--task") -> Task:
    """A task from its name on the command line: demo, a benchmark, a .jsonl file, or path/to/file.py:ClassName
    (a Task subclass built with no arguments; the file is your own code, run as an import). Errors name the flag."""
    if spec == "demo":
        return DemoTask(test_size=demo_problems)
    if spec in BENCHMARK_FILES:
        return Benchmark(spec, data_dir)
    if ".py:" in spec:
        return _user_task(*spec.rsplit(":", 1), flag=flag)
    if spec.endswith(".jsonl") or os.path.exists(spec):
        if not os.path.exists(spec):
            raise SystemExit(f"{flag}={spec}: no such file")
        return JsonlTask(spec)  # read_jsonl names what is wrong with the file
    raise SystemExit(f"{flag}={spec}: unknown task; choose demo, {', '.join(BENCHMARK_FILES)}, a .jsonl file of "
                     f"problems, or path/to/file.py:TaskClass")


def _user_task(path, class_name, flag) -> Task:
    if not os.path.isfile(path):
        raise SystemExit(f"{flag}={path}:{class_name}: {path} is not a file")
    name = f"user_task_{os.path.splitext(os.path.basename(path))[0]}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # registered before it runs, as an import would be: @dataclass and pickle look it up
    spec.loader.exec_module(module)
    task_class = getattr(module, class_name, None)
    if not (isinstance(task_class, type) and issubclass(task_class, Task)):
        raise SystemExit(f"{flag}={path}:{class_name}: {path} has no Task subclass named {class_name!r}")
    task = task_class()
    if task.name == Task.name:
        task.name = class_name
    return task


def check_problems(problems, task) -> list[dict]:
    """A user task's problems, refused with the problem's index and field when one is malformed."""
    if not isinstance(problems, list) or not problems:
        raise SystemExit(f"task {task.name!r}: returned no problems (a non-empty list of dicts is needed)")
    graded_by_answer = type(task).grade is Task.grade  # the default judge reads problem["answer"]
    for i, problem in enumerate(problems):
        if not isinstance(problem, dict) or not isinstance(problem.get("problem"), str):
            raise SystemExit(f"task {task.name!r}: problem {i} needs a field 'problem' (a string)")
        answer = problem.get("answer")
        if graded_by_answer and not (isinstance(answer, str) and normalize_gold(answer)):  # what the verifier takes
            raise SystemExit(f"task {task.name!r}: problem {i} needs a field 'answer', a non-empty string (or the "
                             f"task its own grade())")
    ids = [str(p.get("id", f"{task.name}-{i}")) for i, p in enumerate(problems)]
    repeated = [i for i, count in Counter(ids).items() if count > 1]
    if repeated:
        raise SystemExit(f"task {task.name!r}: problem ids are not unique ({repeated[0]!r} occurs "
                         f"{ids.count(repeated[0])} times)")
    return [dict(p, id=i) for p, i in zip(problems, ids)]


# -----------------------------------------------------------------------------
# evaluation: sample, grade, and the metrics


def evaluate(model, tokenizer, task, problems, n=1, temperature=0.6, top_p=0.95, max_new_tokens=1024,
             instruction=None, seed=0, max_slots=0, rank=0, world_size=1, partial_file=None, chunk=64,
             show_progress=True, cuda_graph=False, keep_partial=False):
    """Samples n completions for each problem (this rank's share: problems[rank::world_size]), grades them with the
    task, and returns every rank's records, in problem order. With partial_file, finished problems are appended
    there and skipped when the eval is run again with the same weights and settings; the file is removed at the end
    unless keep_partial (eval.py's main removes it once every benchmark is saved)."""
    model_path = getattr(tokenizer, "path", None)
    run_key = json.dumps([model_path, weights_fingerprint(model_path), n, temperature, top_p, max_new_tokens,
                          task.instruction if instruction is None else instruction, seed, world_size],
                         default=str)  # other weights or settings: not reused
    done = {}
    if partial_file and os.path.exists(partial_file):
        done = {r["id"]: r for r in read_partial(partial_file) if r.get("run_key") == run_key}
    mine = [p for i, p in enumerate(problems) if i % world_size == rank]
    todo = [p for p in mine if p["id"] not in done]
    records = [done[p["id"]] for p in mine if p["id"] in done]
    progress = _progress_bar(len(todo) * n, show_progress and rank == 0)
    for offset in range(0, len(todo), chunk):
        batch = todo[offset: offset + chunk]
        prompts = [task.prompt(tokenizer, p, instruction) for p in batch]
        completions = generate(model, prompts, max_new_tokens, temperature=temperature, top_p=top_p, n=n,
                               stop_token_ids=tokenizer.eos_token_ids, seed=seed + offset + rank * 1_000_003,
                               max_slots=max_slots, progress=progress, cuda_graph=cuda_graph)
        texts = [tokenizer.decode(c.tokens, skip_special_tokens=True) for c in completions]
        verdicts = task.grade(texts, [batch[c.prompt_index] for c in completions])
        for i, problem in enumerate(batch):
            samples = [dict(text=texts[j], **verdict_fields(verdicts[j]), length=len(completions[j].tokens),
                            finish=completions[j].finish_reason) for j in range(i * n, (i + 1) * n)]
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


def heldout_accuracy(model, tokenizer, task, problems, temperature, max_new_tokens, instruction, seed, rank,
                     world_size) -> float:
    """The trainers' periodic eval: pass@1 (%) of one sample per problem, on every rank's share."""
    records = evaluate(model, tokenizer, task, problems, n=1, temperature=temperature, top_p=1.0,
                       max_new_tokens=max_new_tokens, instruction=instruction, seed=seed, rank=rank,
                       world_size=world_size, show_progress=False)
    return metrics(records, n=1)["pass@1"]


def verdict_fields(verdict) -> dict:
    return {"extracted": verdict.answer, "status": verdict.status, "reason": verdict.reason}


def _progress_bar(total, enabled):
    start, finished = time.time(), 0

    def progress(_completion):
        nonlocal finished
        finished += 1
        if enabled and (finished % 16 == 0 or finished == total):
            rate = finished / max(time.time() - start, 1e-9)
            bar = "#" * int(30 * finished / total)
            print(f"\r  [{bar:<30}] {finished}/{total} completions | ETA {format_eta((total - finished) / rate)}",
                  end="" if finished < total else "\n", file=sys.stderr, flush=True)

    return progress


def pass_at_k(n, c, k) -> float:
    """Unbiased pass@k (Chen et al. 2021): 1 - C(n - c, k) / C(n, k), for n samples of which c are correct."""
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def majority_vote(samples) -> dict | None:
    """The most frequent answer among samples that have one. Answers are compared after normalisation, numbers by
    value ("5" and "5.0" are one vote). A tie goes to the answer seen first, never to dictionary order. Forms the
    verifier accepts as one answer but that normalise differently ("-2, 2", "2, -2", "\\pm 2") are separate votes:
    merging them would cost a verifier call per pair of answers."""
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


def metrics(records, n) -> dict:
    """pass@1 (mean over the n samples), maj@n, unbiased pass@k for k = 2, 4, ... <= n (all in %), the mean
    completion length and the share cut by max_new_tokens."""
    ks = [k for k in (1, 2, 4, 8, 16, 32, 64) if k <= n]
    correct = [sum(s["status"] == "correct" for s in r["samples"]) for r in records]
    lengths = [s["length"] for r in records for s in r["samples"]]
    result = {"problems": len(records), "n": n,
              "pass@1": 100 * sum(c / n for c in correct) / len(records),
              f"maj@{n}": 100 * sum((v := majority_vote(r["samples"])) is not None and v["status"] == "correct"
                                    for r in records) / len(records),
              "mean_length": sum(lengths) / len(lengths),
              "truncated": sum(s["finish"] == "length" for r in records for s in r["samples"]) / len(lengths)}
    for k in ks[1:]:
        result[f"pass@{k}"] = 100 * sum(pass_at_k(n, c, k) for c in correct) / len(records)
    return result


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
# the built-in demo: GSM8K in miniature, with an imperfect teacher, its tokenizer and its untrained model

DEMO_NAMES = ["Ava", "Ben", "Cleo", "Dan", "Eli", "Fay", "Gus", "Hana", "Ivo", "Jade", "Kai", "Lena", "Milo", "Nia"]
DEMO_ITEMS = ["apples", "coins", "books", "stamps", "marbles", "shells", "cards", "pens", "eggs", "stickers"]
DEMO_STEPS = {  # operation -> sentence template; the operand is in {k}
    "+": ["gets {k} more", "finds {k} more", "buys {k} more"],
    "-": ["gives away {k}", "loses {k}", "sells {k}"],
    "*": ["ends up with {k} times as many", "doubles them"],
}
DEMO_TRAIN_SIZE = 20000  # problems in the training stream (GRPO draws from them; SFT and make_traces take a prefix)
DEMO_HELDOUT_SEED = 1234


class DemoTask(Task):
    """The demo: 2-4 step word problems on small integers, answered by a 0.6M-parameter model in 64 tokens.
    level=None is that distribution (the held-out set and training stream every test and result rests on); another
    level (demo_level: "3", "2-3", "5:19", ...) draws problems of that many steps and operands up to that size, from
    the same seeds, held out by the same hash."""

    name = "demo"
    temperature, top_p, max_new_tokens = 1.0, 1.0, 64  # as the trainers' held-out evals sample it

    def __init__(self, test_size=500, level=None):
        self.test_size, self.level = test_size, level
        if level is not None:
            demo_level(level)  # refuse a malformed level here, not at the first draw
            self.name = f"demo-{level}"

    def train_problems(self, seed):
        return [dict(p, id=f"demo-train-{i}")
                for i, p in enumerate(demo_problems(DEMO_TRAIN_SIZE, seed + 1, False, level=self.level))]

    def test_problems(self):
        return [{"id": f"demo-{i}", "problem": p["problem"], "answer": p["answer"]}
                for i, p in enumerate(demo_problems(self.test_size, DEMO_HELDOUT_SEED, heldout=True,
                                                    level=self.level))]


def demo_level(level) -> dict:
    """demo_problem's keyword arguments for a difficulty level: None (the demo: 2-4 steps, operands up to 9), or
    "S" / "S1-S2" steps with an optional ":M" largest operand ("5" = exactly 5 steps, "2-3:19")."""
    if level is None or level == "":
        return {}
    text = str(level)
    steps, _, operand = text.partition(":")
    low, _, high = steps.partition("-")
    try:
        low, high = int(low), int(high or low)
        max_operand = int(operand) if operand else 9
    except ValueError:
        raise SystemExit(f"demo level {text!r}: expected steps 'S' or 'S1-S2', optionally ':M' (largest operand)") \
            from None
    if not (1 <= low <= high and max_operand >= 1):
        raise SystemExit(f"demo level {text!r}: needs 1 <= S1 <= S2 and M >= 1")
    return dict(steps=(low, high), max_operand=max_operand)


def demo_problem(rng, steps=(2, 4), max_operand=9) -> dict:
    """A word problem of steps[0] to steps[1] steps on small integers (add or take away 1 to max_operand, or
    double). The defaults are the demo's (values stay under 60), drawn from rng exactly as always."""
    name, item = rng.choice(DEMO_NAMES), rng.choice(DEMO_ITEMS)
    value = rng.randint(2, 20)
    sentences, step_list = [f"{name} has {value} {item}."], []
    for _ in range(rng.randint(*steps)):
        options = ["+"] + (["-"] if value > 0 else []) + (["*"] if 0 < value <= 10 else [])
        op = rng.choice(options)
        k = 2 if op == "*" else rng.randint(1, min(value, max_operand)) if op == "-" else rng.randint(1, max_operand)
        result = value + k if op == "+" else value - k if op == "-" else value * k
        sentences.append(f"Then {name} {rng.choice(DEMO_STEPS[op]).format(k=k)}.")
        step_list.append((value, op, k, result))
        value = result
    question = " ".join(sentences) + f" How many {item} does {name} have now?"
    return {"problem": question, "steps": step_list, "answer": str(value)}


def is_demo_heldout(problem_text: str) -> bool:
    """One problem in eight, chosen by a hash of its text, belongs to the held-out split: a training stream and an
    eval stream can never share a problem, whatever seeds they use."""
    return zlib.crc32(problem_text.encode()) % 8 == 0


def demo_problems(count, seed, heldout: bool, level=None) -> list[dict]:
    """The first `count` distinct problems of one split drawn from a seeded stream (so a smaller count is a
    prefix of a larger one), at a difficulty level (demo_level; None: the demo's own)."""
    rng, problems, seen, knobs = random.Random(seed), [], set(), demo_level(level)
    while len(problems) < count:
        problem = demo_problem(rng, **knobs)
        if is_demo_heldout(problem["problem"]) == heldout and problem["problem"] not in seen:
            seen.add(problem["problem"])
            problems.append(problem)
    return problems


def demo_trace(problem, rng, slip_rate=0.25) -> str:
    """The teacher's r1-style trace. With probability slip_rate one step's result is off by a little, and the
    error carries through to a wrong final answer, as in traces distilled from a real, imperfect model."""
    steps = problem["steps"]
    slip_at = rng.randrange(len(steps)) if rng.random() < slip_rate else None
    lines, value = [], steps[0][0]
    for i, (_, op, k, _) in enumerate(steps):
        result = value + k if op == "+" else value - k if op == "-" else value * k
        if i == slip_at:
            result = max(0, result + rng.choice([-2, -1, 1, 2]))
        lines.append(f"{value} {op} {k} = {result}")
        value = result
    return "<think>\n" + "\n".join(lines) + "\n</think>\n\n\\boxed{" + str(value) + "}"


DEMO_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
DEMO_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
DEMO_THINK_TOKENS = ["<think>", "</think>"]  # single tokens, but not "special": decoding keeps them (as in Qwen3)


def build_demo_tokenizer(path, seed=0) -> Tokenizer:
    """A small byte-level BPE (digits kept one per token, which arithmetic needs) trained on demo text, with a
    ChatML template, saved like any Hugging Face tokenizer."""
    from tokenizers import AddedToken, Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers

    rng = random.Random(seed)
    corpus = []
    for problem in demo_problems(2000, seed=seed + 1, heldout=False):
        corpus += [problem["problem"], demo_trace(problem, rng)]
    tk = HFTokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=DEMO_SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tk.train_from_iterator(corpus + ["system", "user", "assistant"] * 2000, trainer)
    tk.add_tokens([AddedToken(token, special=False, normalized=False) for token in DEMO_THINK_TOKENS])
    os.makedirs(path, exist_ok=True)
    tk.save(os.path.join(path, "tokenizer.json"))
    config = {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "chat_template": DEMO_CHAT_TEMPLATE,
              "tokenizer_class": "PreTrainedTokenizerFast"}
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=2)
    eos = [tk.token_to_id("<|im_end|>"), tk.token_to_id("<|endoftext|>")]
    with open(os.path.join(path, "generation_config.json"), "w") as f:
        json.dump({"eos_token_id": eos, "pad_token_id": eos[1]}, f, indent=2)
    return Tokenizer.from_pretrained(path)


DEMO_MODEL = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True, rope_theta=10000.0)


def build_demo_model(path, seed=0):
    """The demo's untrained starting point as a normal Hugging Face folder: the demo tokenizer and a Qwen2-shaped
    model of ~0.6M parameters with random weights. Everything downstream loads it as it would a real model."""
    tokenizer = build_demo_tokenizer(path, seed=seed)
    vocab_size = (tokenizer.vocab_size + 63) // 64 * 64
    config = ModelConfig(architecture="Qwen2ForCausalLM", vocab_size=vocab_size, qkv_bias=True,
                         torch_dtype="float32", eos_token_id=tokenizer.eos_token_ids[0], **DEMO_MODEL)
    model = init_weights(Transformer(config), seed=seed)
    model.save_pretrained(path)
    return path
