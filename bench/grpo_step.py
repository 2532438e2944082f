"""
Whole GRPO steps, ours (train_grpo.py) against TRL's GRPOTrainer as the peer, on the same checkpoint and prompts
(issue #18): completion tokens per second of whole steps, the time split of each, and each side's peak RSS.

    python bench/grpo_step.py                    # the char-level setting, 3 steps (the first is warm-up)
    python bench/grpo_step.py --vocab=qwen       # the real Qwen2.5 tokenizer and vocabulary (151,936 ids)
    python bench/grpo_step.py --vocab=all --steps=4
    python bench/grpo_step.py --smoke            # tiny and fast (the test runs this)
    python bench/grpo_step.py --steps=6 --rounds=5   # each side 5 times, alternated: the median round of each

The setting: a random Qwen2-shaped model (hidden 128, 4 layers, 4 heads / 2 KV heads, MLP 256, tied embeddings), a
character-level tokenizer of 128 ids with a ChatML template (or, with --vocab=qwen, the Qwen2.5 tokenizer from
../shared/assets), 64 problems "What is a+b? Put the answer in \\boxed{}.", 8 prompts x G=8 per step, up to 64 new
tokens, temperature 1, beta 0.04 with the k3 estimator, lr 1e-5, fp32, one process.

Each side runs in its own subprocess (so its peak RSS, VmHWM, is its own), with the same torch thread count.
Tokens per second = completion tokens generated in a step (the stop token included) / the step's wall time; the
figure reported is the mean over the steps after the first (warm-up). Ours' phases are the time_rollout,
time_score and time_update fields of out_dir/metrics.jsonl (rollout = sampling + verifier rewards; score = the
reference log-probs and advantages; update = forward, loss, backward and the optimizer step). TRL's are measured by
wrapping GRPOTrainer's own methods: _generate (generation), _calculate_rewards (reward),
_get_per_token_logps_and_entropies on the reference model (reference pass), the rest of _prepare_inputs (other
prep: padding, advantages), compute_loss (forward+loss), training_step minus those (backward), and the rest of the
step (gradient clipping, optimizer step, zero_grad). TRL's step is timed from on_step_begin to on_step_end.
Without trl installed the TRL side is skipped with a message; ours runs alone. The side ours-padded is ours with
--share_prompts=false: the same steps with every completion's prompt recomputed in the training passes.
"""

import argparse
import collections
import datetime
import json
import os
import platform
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

QWEN_TOKENIZER = os.path.join(os.path.dirname(ROOT), "shared", "assets", "tokenizers", "qwen2.5-instruct")
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2; character c is id ord(c) for ord(c) >= 3
MODEL = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=1024, tie_word_embeddings=True, rope_theta=10000.0)
FULL = dict(problems=64, prompts_per_step=8, group_size=8, max_new_tokens=64)
SMOKE = dict(problems=16, prompts_per_step=2, group_size=4, max_new_tokens=16)


# -----------------------------------------------------------------------------
# the shared inputs: a Hugging Face checkpoint both sides load, and a JSONL file of problems


def build_char_tokenizer(path):
    """128 ids: 3 ChatML specials, then the characters chr(3)..chr(127) at their code points; a BPE with no merges
    (each character is a token) and a Fuse decoder, loadable by tokenizers, transformers' AutoTokenizer and ours."""
    from tokenizers import AddedToken, Tokenizer, decoders, models

    vocab = {token: i for i, token in enumerate(SPECIALS)}
    vocab.update({chr(i): i for i in range(len(SPECIALS), 128)})
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.decoder = decoders.Fuse()
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    assert tk.get_vocab_size() == 128, tk.get_vocab_size()
    tk.save(os.path.join(path, "tokenizer.json"))
    config = {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "chat_template": CHATML,
              "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 1024}
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=2)
    return [vocab["<|im_end|>"], vocab["<|endoftext|>"]], vocab["<|endoftext|>"], 128


def copy_qwen_tokenizer(path):
    """The Qwen2.5 tokenizer files; generation_config.json is written below with only the stop and pad ids (Qwen's
    own sets top_k 20, top_p 0.8, repetition penalty: neither side should sample with those here)."""
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(QWEN_TOKENIZER, name), os.path.join(path, name))
    with open(os.path.join(QWEN_TOKENIZER, "generation_config.json")) as f:
        eos = json.load(f)["eos_token_id"]
    return eos, 151643, 151936


def build_checkpoint(path, vocab, seed=0):
    import torch

    from model import ModelConfig, Transformer, init_weights

    os.makedirs(path, exist_ok=True)
    eos, pad, vocab_size = build_char_tokenizer(path) if vocab == "char" else copy_qwen_tokenizer(path)
    with open(os.path.join(path, "generation_config.json"), "w") as f:
        json.dump({"eos_token_id": eos, "pad_token_id": pad}, f, indent=2)
    config = ModelConfig(architecture="Qwen2ForCausalLM", vocab_size=vocab_size, qkv_bias=True, torch_dtype="float32",
                         eos_token_id=eos[0], **MODEL)
    torch.manual_seed(seed)
    model = init_weights(Transformer(config), seed=seed)
    model.save_pretrained(path)
    return sum(p.numel() for p in model.parameters())


def write_problems(path, count, seed=0):
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(count):
            a, b = rng.randint(0, 99), rng.randint(0, 99)
            f.write(json.dumps({"problem": f"What is {a}+{b}? Put the answer in \\boxed{{}}.", "answer": str(a + b)})
                    + "\n")


# -----------------------------------------------------------------------------
# the two sides, each in its own process


def peak_rss_mb():
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def run_ours(args, work, share_prompts):
    import train_grpo

    out_dir = os.path.join(work, f"ours_out_{share_prompts}")
    train_grpo.main([f"--share_prompts={share_prompts}", f"--data={work}/problems.jsonl", f"--model={work}/model",
                     f"--prompts_per_step={args.prompts_per_step}", f"--group_size={args.group_size}",
                     f"--max_new_tokens={args.max_new_tokens}", "--temperature=1", "--beta=0.04", "--kl_estimator=k3",
                     "--lr=1e-5", "--warmup_steps=0", "--eval_problems=0", f"--max_steps={args.steps}",
                     f"--out_dir={out_dir}", "--overwrite=true", "--log_every=1", "--sample_every=1000",
                     f"--save_every={args.steps + 1000}", f"--micro_batch_size={args.prompts_per_step * args.group_size}",
                     "--device=cpu", "--seed=0"])
    steps = []
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        for line in f:
            row = json.loads(line)
            if "time_rollout" not in row:
                continue
            phases = {"rollout": row["time_rollout"], "score": row["time_score"], "update": row["time_update"]}
            tokens = round(row["length"] * args.prompts_per_step * args.group_size)
            steps.append(dict(tokens=tokens, total=sum(phases.values()), phases=phases))
    return steps


def run_trl(args, work):
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from data import Tokenizer, render_prompt
    from tasks import JsonlTask

    task = JsonlTask(f"{work}/problems.jsonl")
    problems = task.train_problems(0)

    def correct(completions, answer, **kwargs):  # the same grading as ours: tasks' verifier, reward 1 or 0
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return [float(v.correct) for v in task.grade(texts, [{"problem": "", "answer": a} for a in answer])]

    dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": p["problem"]}], "answer": p["answer"]}
                                 for p in problems])
    batch = args.prompts_per_step * args.group_size
    config = GRPOConfig(
        output_dir=os.path.join(work, "trl_out"), per_device_train_batch_size=batch,
        num_generations=args.group_size, generation_batch_size=batch, gradient_accumulation_steps=1,
        max_completion_length=args.max_new_tokens, temperature=1.0, top_p=1.0, top_k=0, beta=0.04,
        loss_type="grpo", scale_rewards="group", num_iterations=1, epsilon=0.2, learning_rate=1e-5,
        lr_scheduler_type="constant", warmup_steps=0, adam_beta2=0.95, weight_decay=0.0, max_grad_norm=1.0,
        max_steps=args.steps, logging_steps=1, report_to="none", save_strategy="no", bf16=False, fp16=False,
        use_cpu=True, use_vllm=False, gradient_checkpointing=args.trl_gradient_checkpointing, disable_tqdm=True,
        dataloader_num_workers=0, seed=0, log_completions=False)
    model = AutoModelForCausalLM.from_pretrained(f"{work}/model", dtype=torch.float32)
    # tokenizer.json as written: AutoTokenizer (transformers 5) picks Qwen2Tokenizer from config.json's model_type,
    # which puts Qwen's pre-tokenizer over the char-level one (and drops its spaces and newlines)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(f"{work}/model")

    timers, steps, current = collections.defaultdict(float), [], {}

    def wrap(name, method, key=None):
        def timed(*a, **k):
            start = time.perf_counter()
            try:
                result = method(*a, **k)
            finally:
                timers[key(a) if key else name] += time.perf_counter() - start
            if name == "generation":
                timers["tokens"] += sum(len(ids) for ids in result[1])  # completion ids, the stop token included
            return result
        return timed

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *unused, **kwargs):
            timers.clear()
            current["start"] = time.perf_counter()

        def on_step_end(self, *unused, **kwargs):
            total = time.perf_counter() - current["start"]
            t = dict(timers)
            get = lambda k: t.get(k, 0.0)
            phases = {
                "generation": get("generation"),
                "reward": get("reward"),
                "reference": get("reference"),
                "prep_other": get("prepare") - get("generation") - get("reward") - get("reference") - get("old_logps"),
                "forward_loss": get("compute_loss"),
                "backward": get("training_step") - get("prepare") - get("compute_loss"),
                "optimizer": total - get("training_step"),
            }
            steps.append(dict(tokens=int(get("tokens")), total=total, phases=phases))

    trainer = GRPOTrainer(model=model, reward_funcs=correct, args=config, train_dataset=dataset,
                          processing_class=tokenizer, callbacks=[StepTimer()])
    assert trainer.ref_model is not None and not trainer.use_vllm
    assert trainer.accelerator.device.type == "cpu", trainer.accelerator.device
    # the prompts are token for token ours (our tokenizer and chat template against transformers' through TRL)
    ours_ids = render_prompt(Tokenizer.from_pretrained(f"{work}/model"), problems[0]["problem"], None)
    trl_ids = list(trainer._tokenize_prompts([dataset[0]["prompt"]])[0][0])
    prompt_match = ours_ids == trl_ids
    ref = trainer.ref_model
    trainer._generate = wrap("generation", trainer._generate)
    trainer._calculate_rewards = wrap("reward", trainer._calculate_rewards)
    trainer._get_per_token_logps_and_entropies = wrap(
        "logps", trainer._get_per_token_logps_and_entropies,
        key=lambda a: "reference" if a[0] is ref else ("old_logps" if not torch.is_grad_enabled() else "policy_logps"))
    trainer._prepare_inputs = wrap("prepare", trainer._prepare_inputs)
    trainer.compute_loss = wrap("compute_loss", trainer.compute_loss)
    trainer.training_step = wrap("training_step", trainer.training_step)
    trainer.train()
    return steps, dict(prompt_ids_match=prompt_match)


def child(args):
    import torch

    torch.set_num_threads(args.threads)
    work = args.work
    extra = {}
    if args.child in ("ours", "ours-padded"):
        steps = run_ours(args, work, share_prompts="auto" if args.child == "ours" else "false")
    else:
        steps, extra = run_trl(args, work)
    result = dict(side=args.child, steps=steps, peak_rss_mb=peak_rss_mb(), threads=torch.get_num_threads(), **extra)
    with open(os.path.join(work, f"result_{args.child}.json"), "w") as f:
        json.dump(result, f)


# -----------------------------------------------------------------------------
# the driver


def git_state():
    def git(*cmd):
        try:
            return subprocess.run(["git", *cmd], cwd=ROOT, capture_output=True, text=True, timeout=30).stdout
        except (OSError, subprocess.SubprocessError):
            return ""
    commit = git("rev-parse", "--short=12", "HEAD").strip() or "unknown"
    dirty = [line[3:] for line in git("status", "--porcelain", "--untracked-files=no").splitlines()]
    return commit + (f" + uncommitted changes in {', '.join(dirty)}" if dirty else "")


def versions():
    from importlib import metadata

    found = {}
    for name in ("torch", "transformers", "trl", "accelerate"):
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def machine():
    cores = os.cpu_count()
    try:
        import torch
        gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    except Exception:  # noqa: BLE001
        gpu = "no GPU"
    return f"{cores}-core CPU ({platform.processor() or platform.machine()}), {gpu}"


def summarise(result, warmup):
    steps = result["steps"]
    measured = steps[warmup:] if len(steps) > warmup else steps
    n = len(measured)
    mean = lambda values: sum(values) / max(len(values), 1)
    phases = {k: mean([s["phases"][k] for s in measured]) for k in measured[0]["phases"]} if measured else {}
    return dict(tokens_per_s=mean([s["tokens"] / s["total"] for s in measured]), step_s=mean([s["total"] for s in measured]),
                tokens=mean([s["tokens"] for s in measured]), phases=phases, steps=n,
                peak_rss_mb=result["peak_rss_mb"])


def run_side(side, args, work, log):
    cmd = [sys.executable, os.path.abspath(__file__), f"--_child={side}", f"--_work={work}", f"--steps={args.steps}",
           f"--threads={args.threads}", f"--prompts_per_step={args.prompts_per_step}",
           f"--group_size={args.group_size}", f"--max_new_tokens={args.max_new_tokens}",
           f"--trl_gradient_checkpointing={str(args.trl_gradient_checkpointing).lower()}"]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), TOKENIZERS_PARALLELISM="false",
               TRANSFORMERS_VERBOSITY="error", PYTHONWARNINGS="ignore", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    start = time.time()
    with open(log, "w") as f:
        code = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
    wall = time.time() - start
    if code:
        with open(log) as f:
            tail = f.read()[-3000:]
        raise SystemExit(f"the {side} side failed (exit {code}); the end of its output:\n{tail}")
    with open(os.path.join(work, f"result_{side}.json")) as f:
        result = json.load(f)
    result["wall_s"] = wall
    return result


def print_setting(vocab, args, params, rounds, warmup):
    """rounds: each side's results, one per round; the table shows each side's median round by tokens/s."""
    print(f"\n== setting: vocab={vocab} ({'char-level, 128 ids' if vocab == 'char' else 'Qwen2.5 tokenizer, 151,936 ids'}), "
          f"{params / 1e6:.2f}M parameters, {args.prompts_per_step} prompts x G={args.group_size}, up to "
          f"{args.max_new_tokens} new tokens, {args.steps} step(s) (mean of steps {warmup + 1}..{args.steps})"
          + (f", the median of {args.rounds} alternated rounds per side" if args.rounds > 1 else ""))
    per_round = {side: [summarise(r, warmup) for r in results] for side, results in rounds.items()}
    median = {side: sorted(range(len(s)), key=lambda i: s[i]["tokens_per_s"])[(len(s) - 1) // 2]
              for side, s in per_round.items()}  # with an even count, the slower of the two middle rounds
    summaries = {side: per_round[side][median[side]] for side in rounds}
    results = {side: rounds[side][median[side]] for side in rounds}
    ours = summaries.get("ours")
    print(f"{'side':<11} {'tok/s':>9} {'ours/side':>9} {'s/step':>8} {'tokens/step':>12} {'peak RSS':>10} "
          f"{'process':>9}")
    for side, s in summaries.items():
        ratio = f"{ours['tokens_per_s'] / s['tokens_per_s']:.2f}x" if side != "ours" and ours else ""
        print(f"{side:<11} {s['tokens_per_s']:>9,.0f} {ratio:>9} {s['step_s']:>8.2f} {s['tokens']:>12,.0f} "
              f"{s['peak_rss_mb']:>8,.0f}MB {results[side]['wall_s']:>8.1f}s")
    if ours and "trl" in summaries:
        trl = summaries["trl"]
        print(f"ours vs TRL: {trl['step_s'] / ours['step_s']:.2f}x faster per step, "
              f"{ours['tokens_per_s'] / trl['tokens_per_s']:.2f}x the tokens/s, "
              f"{ours['peak_rss_mb'] / trl['peak_rss_mb']:.2f}x the peak RSS")
    print("time split, seconds per step:")
    for side, s in summaries.items():
        p = s["phases"]
        print(f"  {side:<11} " + " | ".join(f"{k} {v:.3f}" for k, v in p.items()))
        if side == "trl":
            print(f"  trl as ours' phases: rollout (generation+reward) {p['generation'] + p['reward']:.3f} | score "
                  f"(reference+prep) {p['reference'] + p['prep_other']:.3f} | update (forward+loss+backward+optimizer) "
                  f"{p['forward_loss'] + p['backward'] + p['optimizer']:.3f}")
    for side, r in results.items():
        print(f"  {side:<11} per step: " + ", ".join(f"{s['tokens']} tok / {s['total']:.2f}s" for s in r["steps"]))
    if "trl" in results:
        print(f"  prompt ids identical on both sides: {results['trl'].get('prompt_ids_match')}")
    if "ours" in per_round and "trl" in per_round and args.rounds > 1:
        print("  ours/TRL tokens/s by round: " + ", ".join(
            f"{o['tokens_per_s'] / t['tokens_per_s']:.2f}x" for o, t in zip(per_round["ours"], per_round["trl"])))
    return summaries


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[1], allow_abbrev=False)
    parser.add_argument("--vocab", choices=["char", "qwen", "all"], default="char")
    parser.add_argument("--steps", type=int, default=None, help="steps per side, the first is warm-up (default 3; 2 "
                        "with --smoke)")
    parser.add_argument("--smoke", action="store_true", help="tiny and fast: 2 prompts x G=4, 16 tokens, 2 steps")
    parser.add_argument("--sides", default="ours,ours-padded,trl", help="ours (train_grpo.py's defaults: on the CPU "
                        "each group's prompt once in the training passes), ours-padded (--share_prompts=false), trl; "
                        "comma-separated")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads of each side")
    parser.add_argument("--rounds", type=int, default=1, help="run the sides this many times, alternated, and "
                        "report each side's median round (a shared machine's noise moves single runs by +-15%%)")
    parser.add_argument("--trl_gradient_checkpointing", type=lambda v: v.lower() in ("1", "true", "yes"),
                        default=False, help="TRL's GRPOConfig default is true; ours runs without (so false here)")
    parser.add_argument("--keep", default="", help="keep the checkpoint, logs and outputs in this folder")
    parser.add_argument("--prompts_per_step", type=int, default=None)
    parser.add_argument("--group_size", type=int, default=None)
    parser.add_argument("--max_new_tokens", type=int, default=None)
    parser.add_argument("--_child", choices=["ours", "ours-padded", "trl"], default=None, dest="child",
                        help=argparse.SUPPRESS)
    parser.add_argument("--_work", default=None, dest="work", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    sizes = SMOKE if args.smoke else FULL
    if args.steps is None:
        args.steps = 2 if args.smoke else 3
    for key in ("prompts_per_step", "group_size", "max_new_tokens"):
        if getattr(args, key) is None:
            setattr(args, key, sizes[key])
    if args.child:
        return child(args)
    if args.steps < 1 or args.rounds < 1:
        parser.error("--steps and --rounds must be at least 1")
    warmup = 1 if args.steps > 1 else 0

    v = versions()
    print(f"# GRPO step benchmark, {datetime.date.today().isoformat()} | machine: {machine()} | torch {v['torch']}, "
          f"transformers {v['transformers']}, trl {v['trl'] or 'not installed'} | commit {git_state()}")
    print(f"# command: python bench/grpo_step.py {' '.join(argv if argv is not None else sys.argv[1:])}")
    sides = [s.strip() for s in args.sides.split(",") if s.strip()]
    if "trl" in sides and v["trl"] is None:
        print("TRL is not installed (pip install -r requirements-peers.txt): running ours only")
        sides.remove("trl")
    vocabs = ["char", "qwen"] if args.vocab == "all" else [args.vocab]
    all_summaries = {}
    for vocab in vocabs:
        if vocab == "qwen" and not os.path.exists(os.path.join(QWEN_TOKENIZER, "tokenizer.json")):
            print(f"\n== setting: vocab=qwen skipped: the Qwen2.5 tokenizer is not at {QWEN_TOKENIZER} "
                  f"(../shared/assets is absent)")
            continue
        work = os.path.join(args.keep, vocab) if args.keep else tempfile.mkdtemp(prefix=f"grpo_step_{vocab}_")
        os.makedirs(work, exist_ok=True)
        try:
            params = build_checkpoint(os.path.join(work, "model"), vocab)
            write_problems(os.path.join(work, "problems.jsonl"), sizes["problems"])
            rounds = {side: [] for side in sides}
            for round_index in range(args.rounds):  # alternated, so that a noisy machine slows every side alike
                for side in sides:
                    log = f"log_{side}.txt" if args.rounds == 1 else f"log_{side}_round{round_index + 1}.txt"
                    rounds[side].append(run_side(side, args, work, os.path.join(work, log)))
            all_summaries[vocab] = print_setting(vocab, args, params, rounds, warmup)
        finally:
            if not args.keep:
                shutil.rmtree(work, ignore_errors=True)
    return all_summaries


if __name__ == "__main__":
    main()
