"""
Reasoning traces for SFT (recipe 2's data, and the start of recipe 3): distilled from a teacher by rejection
sampling, and "faked" by showing the teacher the known answer.

    python make_traces.py                                   # the demo: the demo SFT checkpoint (python train_sft.py
                                                            # makes it) as teacher on 1,500 demo problems, 2 CPU cores
    python train_sft.py --data=out/traces_demo/traces.jsonl --out_dir=out/sft_traces_demo   # train on its output
    python make_traces.py --preset=r1-teacher --teacher=path/to/DeepSeek-R1-Distill-Qwen-7B --data=problems.jsonl
    torchrun --standalone --nproc_per_node=8 make_traces.py --preset=r1-teacher --teacher=... --data=...

Problems: JSONL with answers in (GSM8K {"question", "answer": "... #### N"}, MATH-500 and AIME {"problem",
"answer"}), or a task of tasks.py judged by the math verifier; no --data means the demo's training problems. Per
chunk of --chunk problems:
 1. Sample: --samples completions per problem from the teacher (sampler.py), the problem rendered as eval.py and
    train_grpo.py render it (problem, then --instruction, in the teacher's chat template).
 2. Grade: a completion passes if the verifier accepts its final answer against the gold (the teacher's pass rate
    counts these), and it is a trace if it also has the r1 layout (<think> reasoning </think> then \\boxed{}) and
    was not cut off by --max_new_tokens.
 3. Hint (--hint): never; fallback: the problems without a trace are sampled again (--hint_samples) with the gold
    answer in the prompt (--hint_template) and an instruction to reason to it without mentioning it; always: every
    problem is, and only hinted traces are kept (a data set wholly faked, to compare with the distilled one).
    A hinted trace is also rejected if it leaks the hint: it talks of a given answer or a hint, quotes the hint,
    or states the answer in the first sentence of its reasoning other than as the result of a calculation written
    out there (unless the problem itself contains it; the rule errs on the side of dropping).
 4. Keep: duplicates (equal up to whitespace) are dropped, then at most --keep traces per problem, the shortest
    first (ties in sampling order): of two correct traces the shorter has fewer false starts and re-checks, at the
    cost of biasing the student towards short reasoning (raise --keep to keep more of the teacher's range).
The stored prompt is the problem without the hint, so SFT learns to reason from the problem alone.

Outputs in --out_dir: traces.jsonl, rows {"prompt", "completion", "answer", "kind": sampled|hinted,
"teacher_pass_rate", "hinted_pass_rate", "length", "problem_index"} that train_sft.py --data= reads unchanged;
summary.json (teacher pass@1 and pass@k, traces kept by kind, rejections by reason, mean lengths); chunks/, one
file per finished chunk. Run the same command again after a kill and it resumes where it stopped; with another
--keep it only re-selects. Chunks are dealt to ranks in turn and each is seeded by its index, so the output is
the same for any number of processes (for the same --chunk and --max_slots); ranks meet through the files in
--out_dir, which on several nodes must be on a file system they all see.
"""

import dataclasses
import json
import os
import re
import sys
import time
from collections import Counter
from dataclasses import dataclass
from typing import Literal

import torch

from common import check_values, format_eta, init_distributed, parse_config
from data import Tokenizer, user_message
from model import Transformer
from sampler import generate
from tasks import INSTRUCTION, DemoTask, Task, check_problems, get_task, pass_at_k, weights_fingerprint
from verifier import format_reward, verify_batch

HINT_TEMPLATE = ("\n\nThe correct final answer is {answer}. Solve the problem step by step as if you did not "
                 "know it: never mention that you were given the answer, and do not state it before your "
                 "reasoning reaches it.")


@dataclass
class Config:
    # data
    data: str = ""  # problems JSONL with answers, or a task of tasks.py; "" = the demo's training problems
    demo_problems: int = 1500  # demo: how many problems
    limit: int = 0  # first N problems of --data (0 = all)
    instruction: str = "none"  # appended to each problem on its own line ("none" for the demo)
    # teacher
    teacher: str = "out/sft_demo/final"  # Hugging Face folder
    dtype: Literal["auto", "bfloat16", "float32"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    # sampling
    samples: int = 4  # completions per problem without the hint
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 64  # a completion cut here is rejected (truncated)
    max_slots: int = 0  # sequences decoded at once (0: chunk x samples, up to 256)
    cuda_graph: bool = True  # on GPUs, decode through a captured CUDA graph
    # hint
    hint: Literal["never", "fallback", "always"] = "fallback"  # fallback: problems without a sampled trace;
    # always: hinted traces only
    hint_samples: int = 4  # completions per hinted problem
    hint_template: str = HINT_TEMPLATE  # appended to the prompt; {answer} is the gold answer
    # selection
    keep: int = 1  # traces per problem at most: distinct ones, the shortest first
    # system
    device: Literal["auto", "cpu", "cuda"] = "auto"
    seed: int = 0
    chunk: int = 64  # problems per resumable unit of work (one sampler call each)
    # output
    out_dir: str = "out/traces_demo"


PRESETS = {
    "demo": {},
    # an R1-style teacher (R1 distills, QwQ) on competition problems, DeepSeek-R1's sampling settings
    "r1-teacher": dict(instruction=INSTRUCTION, samples=8, hint_samples=4, temperature=0.6, top_p=0.95,
                       max_new_tokens=16384, keep=1, chunk=64, out_dir="out/traces_r1"),
}

# -----------------------------------------------------------------------------
# judging a completion: the verifier, the layout, and leaks of the hint

LEAK_PHRASES = re.compile("|".join([  # talk of a given answer; each needs more than "we are given x = 3"
    r"\bhint",
    r"\b(?:given|provided|supplied|stated|known|expected|reference|target) (?:final |correct )?answer\b",
    r"\banswer (?:was|has been|had been) (?:already )?(?:given|provided|supplied|revealed)\b",
    r"\b(?:i|we) (?:was|were|have been|'ve been) (?:given|told|shown) (?:that )?the (?:final |correct )?answer",
    r"\b(?:problem|prompt|question|user) (?:says|said|states|stated|tells|told|gives|gave) (?:me |us )?(?:that )?"
    r"the (?:final |correct )?answer",
    r"\b(?:answer|result) (?:is|was) supposed to be\b",
    r"\bwork(?:ing|ed)? backwards? from the (?:given |final |correct )?answer",
    r"\breverse[- ]engineer",
    r"\bas if (?:i|we) did(?:n't| not) know\b",
]), re.IGNORECASE)
QUOTE_WORDS = 8  # a trace that repeats this many consecutive words of the hint's own text quotes it


def words(text):
    return re.findall(r"[a-z0-9']+", text.lower())


def quotes(text, hint_template):
    """True if the text repeats QUOTE_WORDS consecutive words of the template's fixed text (the answer itself is
    left out: 'the correct final answer is 42' is also how a genuine trace ends)."""
    said = " " + " ".join(words(text)) + " "
    for piece in hint_template.split("{answer}"):
        piece_words = words(piece)
        for i in range(len(piece_words) - QUOTE_WORDS + 1):
            if " " + " ".join(piece_words[i: i + QUOTE_WORDS]) + " " in said:
                return True
    return False


def mentions(text, answer):
    """Does the text contain the answer: a number as a whole number (12 is not in 112 or 1.25, 1,200 is 1200), and
    anything else as written, spaces ignored."""
    answer = answer.strip()
    if re.fullmatch(r"-?\d+(?:\.\d+)?", answer):
        text = re.sub(r"(?<=\d),(?=\d{3}(?!\d))", "", text)
        return re.search(rf"(?<![\d.]){re.escape(answer)}(?!\.?\d)", text) is not None
    return re.sub(r"\s+", "", answer) in re.sub(r"\s+", "", text)


def opening_claims(reasoning):
    """The first sentence (or line) of the reasoning without the results of the calculations written out in it:
    what it says before any working. '3 * 2 = 6' derives its 6; 'The answer is 6.' does not."""
    opening = re.split(r"(?<=[.!?])\s|\n", reasoning.replace("<think>", "").strip(), maxsplit=1)[0][:300]
    return re.sub(r"=\s*\S+", "=", opening)


def leak_reason(text, answer, problem, hint_template):
    """Why a hinted trace gives the hint away, or None."""
    if LEAK_PHRASES.search(text) or quotes(text, hint_template):
        return "leak_mention"
    if mentions(opening_claims(text.split("</think>")[0]), answer) and not mentions(problem, answer):
        return "leak_early_answer"
    return None


def rejection_reason(text, finish_reason, verdict, answer, problem, hint_template=None):
    """Why a completion is not a trace (truncated, layout, a verifier status other than correct, a leak), or None
    if it is one. hint_template: the hint its prompt carried, if any."""
    if finish_reason == "length":
        return "truncated"
    answer_part = text.split("</think>")[-1]  # an open "\\boxed{5" grades as 5, but would teach an open box
    if not format_reward(text) or answer_part.count("{") != answer_part.count("}"):
        return "layout"
    if not verdict.correct:
        return verdict.status  # incorrect | no_answer | unparseable | timeout
    return leak_reason(text, answer, problem, hint_template) if hint_template is not None else None


# -----------------------------------------------------------------------------
# one chunk: sample, grade, hint, and the candidates it leaves


def sample(teacher, tokenizer, messages, n, config, seed, progress):
    """n completions per user message, as (text, finish_reason, tokens) grouped by message. A completion gets
    the <think> its chat template opened, so every trace is in the r1 layout whatever the template."""
    rendered = [tokenizer.apply_chat_template([{"role": "user", "content": m}]) for m in messages]
    completions = generate(teacher, [tokenizer.encode(r) for r in rendered], config.max_new_tokens,
                           temperature=config.temperature, top_p=config.top_p, n=n,
                           stop_token_ids=tokenizer.eos_token_ids, seed=seed, max_slots=config.max_slots,
                           progress=progress, cuda_graph=config.cuda_graph)
    results = []
    for completion in completions:
        text = tokenizer.decode(completion.tokens, skip_special_tokens=True)
        if rendered[completion.prompt_index].endswith("<think>\n") and not text.lstrip().startswith("<think>"):
            text = "<think>\n" + text
        results.append((text, completion.finish_reason, len(completion.tokens)))
    return results


def judge(problems, completions, n, hint_template=None):
    """Per problem: (correct count, accepted candidates, rejection counts). Duplicates (equal up to whitespace)
    count as rejected."""
    verdicts = verify_batch([(text, problems[j // n]["answer"]) for j, (text, _, _) in enumerate(completions)])
    results = []
    for i, problem in enumerate(problems):
        correct, candidates, rejected, seen = 0, [], Counter(), set()
        for j in range(i * n, (i + 1) * n):
            text, finish_reason, length = completions[j]
            correct += verdicts[j].correct
            reason = rejection_reason(text, finish_reason, verdicts[j], problem["answer"], problem["problem"],
                                      hint_template)
            if reason is None and " ".join(text.split()) in seen:
                reason = "duplicate"
            if reason is None:
                seen.add(" ".join(text.split()))
                candidates.append({"completion": text, "length": length})
            else:
                rejected[reason] += 1
        results.append((correct, candidates, rejected))
    return results


def make_chunk(teacher, tokenizer, problems, first_index, config, seed, progress):
    """One record per problem: counts, rejections by reason, and the accepted candidates of each kind."""
    messages = [user_message(p["problem"], config.instruction) for p in problems]
    # 1. sample and 2. grade, without the hint
    n = config.samples
    sampled = sample(teacher, tokenizer, messages, n, config, seed, progress)
    records = []
    for i, (correct, candidates, rejected) in enumerate(judge(problems, sampled, n)):
        records.append({"problem_index": first_index + i, "prompt": messages[i], "answer": problems[i]["answer"],
                        "samples": n, "correct": correct, "sampled": candidates, "rejected_sampled": dict(rejected),
                        "sampled_lengths": [length for _, _, length in sampled[i * n: (i + 1) * n]],
                        "hinted_samples": 0, "hinted_correct": 0, "hinted": [], "rejected_hinted": {},
                        "hinted_lengths": []})
    # 3. the hint, for every problem or for those without a trace; the records keep the message without it
    to_hint = [i for i, r in enumerate(records) if config.hint == "always" or
               (config.hint == "fallback" and not r["sampled"])]
    if to_hint:
        n = config.hint_samples
        hinted_messages = [messages[i] + config.hint_template.replace("{answer}", problems[i]["answer"])
                           for i in to_hint]
        hinted = sample(teacher, tokenizer, hinted_messages, n, config, seed + 1, progress)
        judged = judge([problems[i] for i in to_hint], hinted, n, config.hint_template)
        for k, (i, (correct, candidates, rejected)) in enumerate(zip(to_hint, judged)):
            records[i].update(hinted_samples=n, hinted_correct=correct, hinted=candidates,
                              rejected_hinted=dict(rejected),
                              hinted_lengths=[length for _, _, length in hinted[k * n: (k + 1) * n]])
    return records


# -----------------------------------------------------------------------------
# selection, the output file and the summary


def select(record, hint_mode, keep):
    """The kept traces of one problem: sampled ones unless --hint=always (or none passed), the shortest first."""
    kind = "hinted" if hint_mode == "always" or not record["sampled"] else "sampled"
    chosen = sorted(record[kind], key=lambda c: c["length"])[:keep]  # a stable sort: ties in sampling order
    return [{"prompt": record["prompt"], "completion": c["completion"], "answer": record["answer"], "kind": kind,
             "teacher_pass_rate": record["correct"] / record["samples"],
             "hinted_pass_rate": record["hinted_correct"] / record["hinted_samples"] if record["hinted_samples"]
             else None, "length": c["length"], "problem_index": record["problem_index"]} for c in chosen]


def summarize(records, rows, config, wall_time):
    n = config.samples
    ks = sorted({k for k in (2, 4, 8, 16, 32, 64, 128) if k < n} | {n})
    kept = Counter(row["kind"] for row in rows)
    sampled_lengths = [x for r in records for x in r["sampled_lengths"]]
    hinted_lengths = [x for r in records for x in r["hinted_lengths"]]
    hinted = [r for r in records if r["hinted_samples"]]
    mean = lambda values: sum(values) / len(values) if values else None
    return {
        "problems": len(records), "teacher": config.teacher, "samples": n,
        "teacher_pass@1": 100 * mean([r["correct"] / n for r in records]),
        **{f"teacher_pass@{k}": 100 * mean([pass_at_k(n, r["correct"], k) for r in records]) for k in ks if k > 1},
        "problems_hinted": len(hinted),
        "hinted_pass@1": 100 * mean([r["hinted_correct"] / r["hinted_samples"] for r in hinted]) if hinted else None,
        "kept": {"sampled": kept["sampled"], "hinted": kept["hinted"]},
        "problems_with_a_trace": len({row["problem_index"] for row in rows}),
        "rejected": {kind: dict(sum((Counter(r[f"rejected_{kind}"]) for r in records), Counter()))
                     for kind in ("sampled", "hinted")},
        "mean_length": {"kept": mean([row["length"] for row in rows]), "sampled": mean(sampled_lengths),
                        "hinted": mean(hinted_lengths)},
        "wall_time_s": round(wall_time, 1),
        "config": dataclasses.asdict(config),
    }


def print_summary(summary, out_dir):
    passes = " | ".join(f"{k[len('teacher_'):]} {v:.1f}%" for k, v in summary.items() if k.startswith("teacher_pass"))
    hinted = "" if summary["hinted_pass@1"] is None else \
        f" | hinted {summary['problems_hinted']} problems, pass@1 {summary['hinted_pass@1']:.1f}%"
    print(f"{summary['problems']} problems | teacher {passes}{hinted}")
    print(f"kept {summary['kept']['sampled']} sampled + {summary['kept']['hinted']} hinted traces for "
          f"{summary['problems_with_a_trace']} problems | mean length {summary['mean_length']['kept'] or 0:.1f} "
          f"tokens (all sampled {summary['mean_length']['sampled']:.1f})")
    for kind, reasons in summary["rejected"].items():
        if reasons:
            print(f"rejected ({kind}): " + ", ".join(f"{reason} {count}" for reason, count in
                                                     sorted(reasons.items(), key=lambda item: -item[1])))
    print(f"wrote {out_dir}/traces.jsonl and summary.json in {format_eta(summary['wall_time_s'])}; train with "
          f"python train_sft.py --data={out_dir}/traces.jsonl")


# -----------------------------------------------------------------------------
# the run: chunks dealt to ranks, each written when done; rank 0 selects and writes the output


def check_config(config):
    check_values(config, positive=("samples", "keep", "chunk", "hint_samples", "max_new_tokens"),
                 non_negative=("max_slots", "limit", "demo_problems"))
    if not 0 <= config.temperature or not 0 < config.top_p <= 1:
        raise SystemExit(f"--temperature={config.temperature} --top_p={config.top_p}: out of range")
    if config.max_slots == 0:  # batches of one size on every card: the same float rounding, so the same streams
        config.max_slots = min(256, config.chunk * max(config.samples, config.hint_samples))
    if "{answer}" not in config.hint_template:
        raise SystemExit("--hint_template must contain {answer}, where the gold answer goes")


def settings_key(config):
    """What the stored chunks depend on: everything but --keep (selection is redone) and --out_dir."""
    settings = {k: v for k, v in dataclasses.asdict(config).items() if k not in ("keep", "out_dir")}
    return dict(settings, teacher_weights=weights_fingerprint(config.teacher))  # a retrained teacher is another


def check_out_dir(config):
    """Chunks written with other settings must not be mixed in: refuse, naming what differs. Rank 0 only."""
    path, settings = os.path.join(config.out_dir, "settings.json"), settings_key(config)
    if os.path.exists(path):
        with open(path) as f:
            stored = json.load(f)
        differ = sorted(k for k in set(stored) | set(settings) if stored.get(k) != settings.get(k))
        if differ:
            raise SystemExit(f"{config.out_dir} holds chunks made with other settings ({', '.join(differ)} differ): "
                             f"use another --out_dir, or delete it to start again")
    else:
        os.makedirs(os.path.join(config.out_dir, "chunks"), exist_ok=True)
        write_json(path, settings)


def chunk_path(config, index):
    return os.path.join(config.out_dir, "chunks", f"chunk_{index:06d}.json")


def write_json(path, value):
    """Written under a temporary name and renamed: a kill mid-write never leaves a half file."""
    with open(path + ".tmp", "w") as f:
        json.dump(value, f)
    os.replace(path + ".tmp", path)


def load_teacher(config, device):
    if not os.path.exists(os.path.join(config.teacher, "config.json")):
        raise SystemExit(f"--teacher={config.teacher} is not a model folder; the demo teacher is made by: "
                         f"python train_sft.py")
    dtype = {"auto": torch.bfloat16 if device.type == "cuda" else torch.float32, "bfloat16": torch.bfloat16,
             "float32": torch.float32}[config.dtype]
    return Transformer.from_pretrained(config.teacher, device=device, dtype=dtype).eval(), \
        Tokenizer.from_pretrained(config.teacher)


def main(argv=None):
    config = parse_config(Config, PRESETS, argv)
    check_config(config)
    rank, world_size, device = init_distributed(config.device)
    master = rank == 0
    task = get_task(config.data, flag="--data") if config.data else DemoTask()
    if type(task).grade is not Task.grade:
        raise SystemExit(f"--data={config.data}: task {task.name!r} has a judge of its own, and make_traces.py keeps "
                         f"traces the math verifier accepts; give it problems with answers")
    problems = check_problems(task.train_problems(config.seed), task)
    problems = problems[: config.limit or None] if config.data else problems[: config.demo_problems]
    if not problems:
        raise SystemExit(f"{config.data or 'the demo'}: no problems")
    if master:
        check_out_dir(config)
    num_chunks = (len(problems) + config.chunk - 1) // config.chunk
    if world_size > 1:
        torch.distributed.barrier()  # settings.json and chunks/ exist before any rank writes a chunk
    finished = [os.path.exists(chunk_path(config, c)) for c in range(num_chunks)]
    if world_size > 1:
        torch.distributed.barrier()  # every rank deals the same unfinished chunks before any rank writes one
    teacher, tokenizer = load_teacher(config, device)
    todo = [c for c in range(num_chunks) if not finished[c]][rank::world_size]  # seeds follow c, not the rank
    if master:
        print(f"config: {dataclasses.asdict(config)}")
        print(f"teacher {config.teacher} | {len(problems)} problems in {num_chunks} chunks of {config.chunk}, "
              f"{sum(finished)} done before | {world_size} process(es) on {device}", flush=True)
    start_time, tokens = time.time(), 0
    for k, c in enumerate(todo):
        batch = problems[c * config.chunk: (c + 1) * config.chunk]
        records = make_chunk(teacher, tokenizer, batch, c * config.chunk, config,
                             seed=config.seed * 1_000_003 + 2 * c, progress=completion_counter(master, k, len(todo)))
        write_json(chunk_path(config, c), records)
        tokens += sum(sum(r["sampled_lengths"]) + sum(r["hinted_lengths"]) for r in records)
        if master:
            elapsed = time.time() - start_time
            pass_rate = 100 * sum(r["correct"] for r in records) / (len(records) * config.samples)
            with_trace = sum(bool(r["sampled"] or r["hinted"]) for r in records)
            print(f"\rchunk {k + 1}/{len(todo)} on rank 0 | teacher pass@1 {pass_rate:.1f}% | traces for "
                  f"{with_trace}/{len(records)} problems | {tokens / elapsed:,.0f} tok/s | "
                  f"ETA {format_eta(elapsed / (k + 1) * (len(todo) - k - 1))}", flush=True)
    if world_size > 1:
        torch.distributed.barrier()
    summary = None
    if master:
        summary = finish(config, num_chunks, time.time() - start_time)
    if world_size > 1:
        torch.distributed.destroy_process_group()
    return summary


def completion_counter(master, chunk_number, chunks):
    """The sampler's per-completion callback: a counter on rank 0, since one chunk can take minutes."""
    count = 0

    def progress(_completion):
        nonlocal count
        count += 1
        if master and count % 64 == 0:
            print(f"\r  chunk {chunk_number + 1}/{chunks}: {count} completions", end="", file=sys.stderr, flush=True)

    return progress


def finish(config, num_chunks, wall_time):
    """Reads every chunk, selects the kept traces, writes traces.jsonl and summary.json, prints the summary."""
    records = []
    for c in range(num_chunks):
        path = chunk_path(config, c)
        if not os.path.exists(path):
            raise SystemExit(f"{path} is missing: a rank did not finish; run the same command again to resume")
        with open(path) as f:
            records += json.load(f)
    rows = [row for record in records for row in select(record, config.hint, config.keep)]
    path = os.path.join(config.out_dir, "traces.jsonl")
    with open(path + ".tmp", "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    os.replace(path + ".tmp", path)
    summary = summarize(records, rows, config, wall_time)
    write_json(os.path.join(config.out_dir, "summary.json"), summary)
    print_summary(summary, config.out_dir)
    return summary


if __name__ == "__main__":
    main()
