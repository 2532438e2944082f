"""
GRPO: reinforcement learning on verifier rewards (recipes 1 and 3 of the mission).

    torchrun --standalone --nproc_per_node=2 train_grpo.py        # the built-in demo on CPU: starts from the demo
                                                                   # SFT checkpoint (python train_sft.py makes it)
    python train_grpo.py                                           # the same on one process
    torchrun --standalone --nproc_per_node=8 train_grpo.py --preset=r1-1.5b --model=<checkpoint> --data=<problems.jsonl>
    python train_grpo.py --model=out/sft_demo/init                 # recipe 1 on the demo: RL from the untrained model
    python train_grpo.py --resume=true                             # continue from the last checkpoint in --out_dir
    python train_grpo.py --overwrite=true                          # start again in a used --out_dir

The algorithm's choices, and how they differ from GRPO as published (DeepSeekMath, arXiv:2402.03300):
 1. Rollout: --group_size completions per prompt from the current policy, sampled by sampler.py with the training
    model itself (no second engine, no weight sync). Each rank owns whole groups.
 2. Reward: verifier.math_reward (1 correct, 0 otherwise) + --format_weight x format_reward (r1 layout), and DAPO's
    soft overlong penalty with --overlong_buffer > 0. The verifier runs in its process pool with deadlines.
 3. Advantage: (r - group mean) / (std + 1e-4) as in GRPO, with the *sample* std (ddof=1, as TRL and verl).
    --scale_rewards=batch divides by the batch std instead, =none not at all (Dr. GRPO); --advantage=rloo uses
    the leave-one-out baseline r_i - mean_{j!=i} r_j (RLOO).
 4. Update: PPO-clip on per-token ratios pi/pi_old with --eps_low and --eps_high (DAPO clip-higher); --mu epochs over
    the same rollouts with pi_old fixed (mu=1: pi_old is pi detached, the ratio is exactly 1 and nothing clips).
    Log-probs are recomputed by the trainer at the sampling temperature over the full vocabulary: with top-p/top-k
    < full the sampler drew from a truncated distribution, the ratio ignores that (the mismatch is logged).
 5. Loss aggregation --loss_agg: seq-mean-token-mean (GRPO), token-mean (DAPO), seq-mean-token-sum-norm
    (Dr. GRPO: token sum / (sequences x max_new_tokens)); always normalised over the global batch (all ranks).
 6. KL (--beta > 0; with 0 no reference model is loaded): --kl_estimator k1|k2|k3|full, --kl_direction
    reverse|forward, --kl_in loss|reward. DeepSeekMath puts k3 in the loss, which estimates KL(pi||ref) but whose
    gradient is that of KL(ref||pi); see the table below. --ref_update_every K refreshes the reference.
 7. DAPO options: --dynamic_sampling (drop groups with equal rewards and sample more prompts),
    --mask_truncated (no loss on completions cut by max_new_tokens). --entropy_coef adds an entropy bonus.

KL table. r = log pi(x) - log ref(x), w = ref(x)/pi(x) = exp(-r), x sampled from pi; "loss gradient" is the
expected gradient when the estimate is added to the loss and differentiated through log pi(x) (tests/test_train_grpo.py
checks each line by exact expectation):
    direction  estimator  per-token value          estimates (E over pi)        loss gradient follows
    reverse    k1         r                        KL(pi||ref), unbiased        zero in expectation: use --kl_in=reward
    reverse    k2         r^2 / 2                  KL(pi||ref), biased          grad KL(pi||ref)
    reverse    k3         w - 1 + r                KL(pi||ref), unbiased >= 0   grad KL(ref||pi)  (DeepSeekMath, TRL)
    forward    k1         w log w                  KL(ref||pi), unbiased        grad KL(ref||pi) + grad E_ref[r^2]/2
    forward    k2         w (log w)^2 / 2          KL(ref||pi), biased          no divergence of its own
    forward    k3         w log w - w + 1          KL(ref||pi), unbiased >= 0   grad E_ref[r^2]/2
    reverse    full       sum_v pi log(pi/ref)     KL(pi||ref), exact           grad KL(pi||ref)
    forward    full       sum_v ref log(ref/pi)    KL(ref||pi), exact           grad KL(ref||pi)
With --kl_in=reward the per-sequence sum of the estimate (no gradient) is subtracted from the reward, beta times:
the policy gradient then follows the reverse KL for reverse k1 (the classic RLHF penalty).
"""

import dataclasses
import math
import os
import random
import time
from dataclasses import dataclass

import numpy as np
import torch

from common import (MetricsLog, all_gather_objects, all_reduce_sum, autocast_for, check_values, claim_out_dir,
                    format_eta, full_state_dict, init_distributed, load_run_state, lr_at, make_optimizer, no_sync,
                    parse_config, resume_checkpoint, save_checkpoint, unsharded_copy, wrap_model)
from data import Tokenizer, demo_problems, read_jsonl, render_prompt
from kernels.logprob import kl_full
from model import Transformer, sequence_logprobs
from sampler import generate
from verifier import format_reward, verify_batch


@dataclass
class Config:
    # data
    data: str = ""  # JSONL of problems {"problem" or "question", "answer"}; "" = the built-in demo task
    instruction: str = "none"  # appended to each problem ("none" for the demo)
    eval_data: str = ""  # held-out JSONL for periodic eval; "" = demo held-out problems
    eval_problems: int = 500
    # model
    model: str = "out/sft_demo/final"  # policy initialisation (Hugging Face folder)
    # rollout
    prompts_per_step: int = 32  # prompts per optimizer step, over all ranks
    group_size: int = 8  # completions per prompt (G)
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    cuda_graph: bool = True  # on GPUs, decode through a captured CUDA graph (sampler.GraphedDecode)
    dynamic_sampling: bool = False  # DAPO: keep only groups with reward variance, resample to fill the batch
    max_resample_rounds: int = 4
    # reward
    format_weight: float = 0.0  # weight of the r1 format reward
    overlong_buffer: int = 0  # DAPO soft overlong penalty over the last N tokens of the budget (0 = off)
    overlong_penalty: float = 1.0
    # advantage and loss
    advantage: str = "grpo"  # grpo | rloo
    scale_rewards: str = "group"  # group | batch | none (Dr. GRPO)
    loss_agg: str = "seq-mean-token-mean"  # seq-mean-token-mean | token-mean | seq-mean-token-sum-norm
    eps_low: float = 0.2  # clip ratio below 1 - eps_low
    eps_high: float = 0.2  # clip ratio above 1 + eps_high (DAPO: 0.28)
    mu: int = 1  # update epochs over each batch of rollouts
    mask_truncated: bool = False  # no loss on completions that hit max_new_tokens
    entropy_coef: float = 0.0  # entropy bonus weight
    # KL
    beta: float = 0.0  # KL weight; 0 loads no reference model
    kl_estimator: str = "k3"  # k1 | k2 | k3 | full
    kl_direction: str = "reverse"  # reverse: KL(pi||ref) | forward: KL(ref||pi)
    kl_in: str = "loss"  # loss | reward
    ref_update_every: int = 0  # steps between copies of the policy into the reference (0 = never)
    # optimisation
    max_steps: int = 170
    lr: float = 5e-5
    min_lr_ratio: float = 1.0
    warmup_steps: int = 5
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    micro_batch_size: int = 64  # sequences per forward/backward on one rank
    # system
    device: str = "auto"
    parallel: str = "ddp"  # ddp | fsdp (rollouts then use a gathered full copy of the weights per rank)
    activation_checkpointing: bool = False
    seed: int = 0
    # logging, eval, checkpoints
    out_dir: str = "out/grpo_demo"
    log_every: int = 1
    sample_every: int = 20  # steps between printed example completions
    eval_every: int = 0  # steps between held-out evals (0 = at the start and the end only)
    eval_temperature: float = 1.0
    save_every: int = 50
    resume: bool = False  # continue from out_dir's latest checkpoint
    overwrite: bool = False  # a fresh run replaces the run already in out_dir (its checkpoints and metrics)


PRESETS = {
    "demo": {},
    # DeepScaleR-style RL of a 1.5B R1 distill on one node of 8 GPUs
    "r1-1.5b": dict(prompts_per_step=128, group_size=8, max_new_tokens=8192, temperature=0.6, top_p=1.0,
                    instruction="Please reason step by step, and put your final answer within \\boxed{}.",
                    lr=1e-6, min_lr_ratio=1.0, warmup_steps=0, max_steps=1000, micro_batch_size=4,
                    activation_checkpointing=True, eps_high=0.28, loss_agg="token-mean", beta=0.0,
                    mask_truncated=False, out_dir="out/grpo_r1_1.5b", save_every=20, eval_every=50,
                    eval_problems=500, eval_temperature=0.6, sample_every=5),
}

# -----------------------------------------------------------------------------
# the algorithm: rewards -> advantages -> per-token loss


def group_advantages(rewards, group_size, advantage="grpo", scale_rewards="group", eps=1e-4, batch_std=None):
    """rewards (num_groups * G,) -> (advantages (num_groups * G,), number of groups whose rewards are all equal)."""
    grouped = rewards.view(-1, group_size)  # (groups, G)
    mean = grouped.mean(dim=1, keepdim=True)
    if advantage == "rloo":  # leave-one-out baseline: r_i - mean of the others
        centred = (grouped - mean) * group_size / (group_size - 1)
    else:
        centred = grouped - mean
    if scale_rewards == "group":
        centred = centred / (grouped.std(dim=1, keepdim=True) + eps)  # sample std (ddof=1)
    elif scale_rewards == "batch":
        centred = centred / ((batch_std if batch_std is not None else rewards.std()) + eps)
    elif scale_rewards != "none":
        raise ValueError(f"scale_rewards must be group, batch or none, not {scale_rewards!r}")
    zero_variance = int((grouped.max(dim=1).values == grouped.min(dim=1).values).sum())
    return centred.reshape(-1), zero_variance


def kl_estimate(logprobs, ref_logprobs, estimator, direction):
    """Per-token KL estimate from the log-probs of the sampled tokens (see the table in the docstring)."""
    log_ratio = logprobs - ref_logprobs  # r = log pi - log ref
    if direction == "reverse":
        if estimator == "k1":
            return log_ratio
        if estimator == "k2":
            return 0.5 * log_ratio ** 2
        if estimator == "k3":
            return torch.exp(-log_ratio) - 1 + log_ratio
    elif direction == "forward":
        weight = torch.exp(-log_ratio)  # ref / pi
        if estimator == "k1":
            return weight * -log_ratio
        if estimator == "k2":
            return 0.5 * weight * log_ratio ** 2
        if estimator == "k3":
            return weight * -log_ratio - weight + 1
    raise ValueError(f"unknown KL estimator {estimator!r} / direction {direction!r}")


def policy_loss(logprobs, old_logprobs, advantages, completion_mask, config, num_sequences, num_tokens,
                kl=None, entropy=None):
    """The clipped surrogate, aggregated per --loss_agg and normalised by global counts (all ranks, all
    micro-batches), so that summing this over micro-batches and ranks gives the loss of the whole batch.
    logprobs, old_logprobs, completion_mask, kl, entropy: (B, T); advantages: (B,)."""
    ratio = torch.exp(logprobs - old_logprobs)
    advantages = advantages[:, None]
    clipped = torch.clamp(ratio, 1 - config.eps_low, 1 + config.eps_high)
    per_token = -torch.minimum(ratio * advantages, clipped * advantages)
    if kl is not None:
        per_token = per_token + config.beta * kl
    if entropy is not None:
        per_token = per_token - config.entropy_coef * entropy
    mask = completion_mask.to(per_token.dtype)
    if config.loss_agg == "seq-mean-token-mean":
        per_sequence = (per_token * mask).sum(1) / mask.sum(1).clamp(min=1)
        loss = per_sequence.sum() / num_sequences
    elif config.loss_agg == "token-mean":
        loss = (per_token * mask).sum() / num_tokens
    elif config.loss_agg == "seq-mean-token-sum-norm":
        loss = (per_token * mask).sum() / (num_sequences * config.max_new_tokens)
    else:
        raise ValueError(f"unknown loss_agg {config.loss_agg!r}")
    with torch.no_grad():
        low = ((ratio < 1 - config.eps_low) & (advantages < 0) & completion_mask.bool()).sum()
        high = ((ratio > 1 + config.eps_high) & (advantages > 0) & completion_mask.bool()).sum()
    return loss, dict(clip_low=int(low), clip_high=int(high))


def overlong_penalty(lengths, max_new_tokens, buffer, penalty):
    """DAPO's soft overlong punishment: 0 up to max - buffer, then linearly down to -penalty at max."""
    lengths = torch.as_tensor(lengths, dtype=torch.float32)
    return -penalty * ((lengths - (max_new_tokens - buffer)) / buffer).clamp(0, 1)


# -----------------------------------------------------------------------------
# rollouts and scoring


def load_problems(config, heldout=False):
    path = config.eval_data if heldout else config.data
    if path:
        problems = []
        for record in read_jsonl(path):
            problem, answer = record.get("problem", record.get("question")), record.get("answer")
            if not isinstance(problem, str) or answer is None:
                raise ValueError(f"{record['_source']}: needs fields 'problem' (or 'question') and 'answer'")
            problems.append({"problem": problem, "answer": str(answer).split("####")[-1].strip()})
        return problems
    if heldout:
        return demo_problems(config.eval_problems, seed=1234, heldout=True)
    return demo_problems(20000, seed=config.seed + 1, heldout=False)


def rollout(policy, tokenizer, problems, config, seed):
    """Samples a group per problem and scores it. Returns one dict per completion."""
    prompts = [render_prompt(tokenizer, p["problem"], config.instruction) for p in problems]
    completions = generate(policy, prompts, config.max_new_tokens, temperature=config.temperature,
                           top_p=config.top_p, n=config.group_size, stop_token_ids=tokenizer.eos_token_ids, seed=seed,
                           cuda_graph=config.cuda_graph)
    texts = [tokenizer.decode(c.tokens, skip_special_tokens=True) for c in completions]
    verdicts = verify_batch([(t, problems[c.prompt_index]["answer"]) for t, c in zip(texts, completions)])
    samples = []
    for completion, text, verdict in zip(completions, texts, verdicts):
        reward = float(verdict.correct)
        if config.format_weight:
            reward += config.format_weight * format_reward(text)
        samples.append(dict(prompt=prompts[completion.prompt_index], tokens=completion.tokens,
                            sampler_logprobs=completion.logprobs, truncated=completion.finish_reason == "length",
                            correct=verdict.correct, reward=reward, text=text))
    if config.overlong_buffer:
        penalties = overlong_penalty([len(s["tokens"]) for s in samples], config.max_new_tokens,
                                     config.overlong_buffer, config.overlong_penalty)
        for sample, penalty in zip(samples, penalties.tolist()):
            sample["reward"] += penalty
    return samples


def collate(samples, pad_id, device):
    """Right-padded (prompt + completion) rows; completion_mask marks the completion tokens (the stop token
    included, so that stopping is learned). Returns input_ids, completion_mask (B, T)."""
    longest = max(len(s["prompt"]) + len(s["tokens"]) for s in samples)
    input_ids = torch.full((len(samples), longest), pad_id, dtype=torch.long)
    completion_mask = torch.zeros((len(samples), longest), dtype=torch.long)
    for row, s in enumerate(samples):
        sequence = s["prompt"] + s["tokens"]
        input_ids[row, : len(sequence)] = torch.tensor(sequence)
        completion_mask[row, len(s["prompt"]): len(sequence)] = 1
    return input_ids.to(device), completion_mask.to(device)


def exact_kl(model, ref_model, input_ids, temperature, direction):
    """Exact per-token KL over the vocabulary, in chunks (no full logits); needs the plain (DDP) policy."""
    hidden = model(input_ids, return_hidden=True)[:, :-1]  # (B, T-1, dim): position t predicts token t + 1
    with torch.no_grad():
        ref_hidden = ref_model(input_ids, return_hidden=True)[:, :-1]
    plain = getattr(model, "module", model)
    B, T1, D = hidden.shape
    kl = kl_full(hidden.reshape(B * T1, D), plain.lm_head_weight, ref_hidden.reshape(B * T1, D),
                 ref_model.lm_head_weight, temperature, direction).view(B, T1)
    return torch.cat([kl.new_zeros(B, 1), kl], dim=1)  # aligned with the predicted tokens


# -----------------------------------------------------------------------------
# the training loop


def main(argv=None):
    config = parse_config(Config, PRESETS, argv)
    check_config(config)
    rank, world_size, device = init_distributed(config.device)
    master = rank == 0
    random.seed(config.seed + rank)
    torch.manual_seed(config.seed)
    if config.prompts_per_step % world_size:
        raise SystemExit(f"prompts_per_step={config.prompts_per_step} must be a multiple of the {world_size} ranks")

    out_dir_lock = claim_out_dir(config.out_dir, config.resume, config.overwrite, config.model) if master else None
    resume_from = resume_checkpoint(config, rank, world_size)
    model_path = resume_from or config.model
    if not os.path.exists(os.path.join(model_path, "config.json")):
        raise SystemExit(f"{model_path} is not a model folder. The demo starts from the SFT checkpoint: run "
                         f"'python train_sft.py' first (or pass --model=<Hugging Face folder>)")
    model = Transformer.from_pretrained(model_path, device=device, dtype=torch.float32)
    tokenizer = Tokenizer.from_pretrained(model_path)
    ref_model = None
    if config.beta > 0:  # beta = 0: no reference model at all, and none of its memory
        ref_path = resume_from if resume_from and os.path.exists(os.path.join(resume_from, "reference")) else None
        ref_model = load_reference(os.path.join(ref_path, "reference") if ref_path else config.model, device)
    wrapped, model = wrap_model(model, config.parallel, device, config.activation_checkpointing)
    optimizer = make_optimizer(model, config.lr, config.weight_decay)
    start_step = 0
    if resume_from:
        start_step, _, _ = load_run_state(resume_from, model, optimizer, rank)
    problems = load_problems(config)
    log = MetricsLog(os.path.join(config.out_dir, "metrics.jsonl"), enabled=master, start_step=start_step)
    if master:
        print(f"config: {dataclasses.asdict(config)}")
        print(f"policy {model_path}: {model.num_parameters() / 1e6:.1f}M parameters | {len(problems)} problems | "
              f"{world_size} process(es) on {device} | reference model: {'loaded' if ref_model else 'none (beta=0)'}")
    autocast = autocast_for(device)
    if start_step == 0 and config.eval_problems:
        heldout_eval(model, tokenizer, config, rank, world_size, 0, log)

    prompts_per_rank = config.prompts_per_step // world_size
    start_time = time.time()
    for step in range(start_step, config.max_steps):
        times = {}
        # 1. rollout: this rank's groups, sampled by the current policy
        t0 = time.time()
        policy = unsharded_copy(model)
        samples, rounds, zero_variance_groups = [], 0, 0
        while len(samples) < prompts_per_rank * config.group_size and rounds <= config.max_resample_rounds:
            # the same global draw on every rank, each taking its share: the data position is the step number,
            # whatever the number of ranks
            rng = np.random.RandomState(config.seed * 1_000_003 + step * 7919 + rounds)
            batch = [problems[i] for i in rng.randint(0, len(problems), config.prompts_per_step)[rank::world_size]]
            with autocast:
                new = rollout(policy, tokenizer, batch, config,
                              seed=config.seed * 1_000_003 + step * 101 + rounds * 13 + rank)
            groups = [new[i: i + config.group_size] for i in range(0, len(new), config.group_size)]
            zero_variance_groups += sum(max(s["reward"] for s in g) == min(s["reward"] for s in g) for g in groups)
            if config.dynamic_sampling:  # DAPO: groups with equal rewards carry no signal
                groups = [g for g in groups if max(s["reward"] for s in g) > min(s["reward"] for s in g)]
            samples += [s for g in groups for s in g]
            rounds += 1
            if not config.dynamic_sampling:
                break
        samples = samples[: prompts_per_rank * config.group_size]
        del policy
        times["rollout"] = time.time() - t0

        # 2. score: rewards came from the verifier pool; the KL-in-reward penalty needs the reference
        t0 = time.time()
        input_ids, completion_mask = collate(samples, tokenizer.pad_token_id, device) if samples else (None, None)
        ref_logprobs = None
        if ref_model is not None and samples and config.kl_estimator != "full":
            with torch.no_grad(), autocast:
                ref_logprobs = sequence_logprobs(ref_model, input_ids, temperature=config.temperature)
        rewards = torch.tensor([s["reward"] for s in samples], dtype=torch.float32)
        if config.kl_in == "reward" and ref_model is not None and samples:
            with torch.no_grad(), autocast:
                logprobs_now = sequence_logprobs(model, input_ids, temperature=config.temperature)
                kl = exact_kl(model, ref_model, input_ids, config.temperature, config.kl_direction) \
                    if config.kl_estimator == "full" else kl_estimate(logprobs_now, ref_logprobs,
                                                                       config.kl_estimator, config.kl_direction)
            rewards = rewards - config.beta * (kl * completion_mask).sum(1).cpu()
        times["score"] = time.time() - t0

        # 3. advantages within each group (batch std across all ranks for --scale_rewards=batch)
        batch_std = None
        if config.scale_rewards == "batch":
            count = all_reduce_sum(len(rewards), device)
            mean = all_reduce_sum(rewards.sum().item(), device) / max(count, 1)
            batch_std = math.sqrt(all_reduce_sum(((rewards - mean) ** 2).sum().item(), device) / max(count - 1, 1))
        advantages = group_advantages(rewards, config.group_size, config.advantage, config.scale_rewards,
                                      batch_std=batch_std)[0] if samples else rewards
        if samples and config.mask_truncated:
            completion_mask = completion_mask * torch.tensor([not s["truncated"] for s in samples],
                                                             device=device)[:, None]

        # 4. update: mu epochs of PPO-clip over the rollouts, normalised by global counts
        t0 = time.time()
        num_sequences = all_reduce_sum(len(samples), device)
        num_tokens = all_reduce_sum(float(completion_mask.sum()) if samples else 0.0, device)
        old_logprobs = None
        if config.mu > 1 and samples:
            with torch.no_grad(), autocast:
                old_logprobs = sequence_logprobs(wrapped, input_ids, temperature=config.temperature)
        lr = lr_at(step, config.max_steps, config.lr, config.warmup_steps, config.min_lr_ratio)
        for group in optimizer.param_groups:
            group["lr"] = lr
        stats = dict(clip_low=0, clip_high=0, kl=0.0, entropy=0.0, mismatch=0.0, ratio_max_dev=0.0)
        for epoch in range(config.mu):
            micro = list(range(0, len(samples), config.micro_batch_size)) or [None]
            for k, start in enumerate(micro):
                no_sync(wrapped, last_micro_step=k == len(micro) - 1)
                if start is None:  # this rank has no rollouts (dynamic sampling found none): a zero loss through
                    # the wrapped model joins the others' gradient all-reduce (a backward without DDP's forward
                    # does not, and the other ranks wait for it forever)
                    padding = torch.zeros((1, 2), dtype=torch.long, device=device)
                    (sequence_logprobs(wrapped, padding).sum() * 0).backward()
                    continue
                rows = slice(start, start + config.micro_batch_size)
                with autocast:
                    logprobs, entropy = sequence_logprobs(wrapped, input_ids[rows], temperature=config.temperature,
                                                          return_entropy=True)
                old = old_logprobs[rows] if old_logprobs is not None else logprobs.detach()
                kl = None
                if ref_model is not None and config.kl_in == "loss":
                    kl = exact_kl(wrapped, ref_model, input_ids[rows], config.temperature, config.kl_direction) \
                        if config.kl_estimator == "full" else kl_estimate(logprobs, ref_logprobs[rows],
                                                                           config.kl_estimator, config.kl_direction)
                loss, clip = policy_loss(logprobs, old, advantages[rows].to(device), completion_mask[rows], config,
                                         num_sequences, num_tokens, kl, entropy if config.entropy_coef else None)
                (loss * world_size).backward()  # DDP averages gradients over ranks
                if epoch == 0:
                    mask = completion_mask[rows].bool()
                    stats["entropy"] += entropy.detach()[mask].sum().item()
                    stats["kl"] += (kl.detach()[mask].sum().item() if kl is not None else 0.0)
                    sampler_lp = torch.zeros_like(logprobs)
                    for row, s in enumerate(samples[rows]):
                        begin = len(s["prompt"])
                        sampler_lp[row, begin: begin + len(s["tokens"])] = torch.tensor(s["sampler_logprobs"])
                    stats["mismatch"] += (logprobs.detach() - sampler_lp).abs()[mask].sum().item()
                stats["clip_low"] += clip["clip_low"]
                stats["clip_high"] += clip["clip_high"]
                ratio = torch.exp(logprobs.detach() - old)[completion_mask[rows].bool()]
                stats["ratio_max_dev"] = max(stats["ratio_max_dev"], (ratio - 1).abs().max().item() if len(ratio) else 0)
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            if not torch.isfinite(grad_norm):
                raise SystemExit(f"step {step}: gradient norm is not finite; stopping before the update "
                                 f"(lower --lr, or resume from the last checkpoint)")
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if ref_model is not None and config.ref_update_every and (step + 1) % config.ref_update_every == 0:
            ref_model.load_state_dict(full_state_dict(model, device=device))
        times["update"] = time.time() - t0

        # 5. log: everything below is diagnostics, evaluation and checkpoints
        done = step + 1
        gathered = [s for part in all_gather_objects([{k: s[k] for k in ("reward", "correct", "truncated")} |
                                                      {"length": len(s["tokens"])} for s in samples]) for s in part]
        totals = {k: all_reduce_sum(v, device) for k, v in stats.items() if k != "ratio_max_dev"}
        generated = sum(s["length"] for s in gathered)
        mean = lambda key: float(np.mean([s[key] for s in gathered])) if gathered else 0.0  # dynamic sampling can
        metrics = dict(  # leave a step with no rollouts at all
            step=done, reward=mean("reward"), accuracy=mean("correct"), length=mean("length"),
            truncated=mean("truncated"),
            zero_variance=all_reduce_sum(zero_variance_groups, device) / max(1, all_reduce_sum(
                rounds * prompts_per_rank, device)),
            kl=totals["kl"] / max(num_tokens, 1), entropy=totals["entropy"] / max(num_tokens, 1),
            clip_low=totals["clip_low"] / max(num_tokens * config.mu, 1),
            clip_high=totals["clip_high"] / max(num_tokens * config.mu, 1),
            mismatch=totals["mismatch"] / max(num_tokens, 1), ratio_max_dev=stats["ratio_max_dev"], lr=lr,
            grad_norm=float(grad_norm), **{f"time_{k}": v for k, v in times.items()},
            tokens_per_s=generated / max(sum(times.values()), 1e-9))
        if master and done % config.log_every == 0:
            eta = (time.time() - start_time) / (done - start_step) * (config.max_steps - done)
            print(f"step {done}/{config.max_steps} | reward {metrics['reward']:.3f} | acc {metrics['accuracy']:.3f} | "
                  f"len {metrics['length']:.0f} | trunc {metrics['truncated']:.2f} | zero-var "
                  f"{metrics['zero_variance']:.2f} | kl {metrics['kl']:.4f} | ent {metrics['entropy']:.3f} | clip "
                  f"{metrics['clip_low']:.3f}/{metrics['clip_high']:.3f} | mismatch {metrics['mismatch']:.1e} | "
                  f"gen {times['rollout']:.1f}s score {times['score']:.1f}s train {times['update']:.1f}s | "
                  f"{metrics['tokens_per_s']:,.0f} tok/s | ETA {format_eta(eta)}", flush=True)
            warn_if_stuck(metrics, config)
        if master and samples and done % config.sample_every == 0:
            s = samples[0]
            print(f"--- sample (reward {s['reward']:.2f}):\n{s['text']}\n---", flush=True)
        # 6. eval and checkpoint
        if config.eval_problems and ((config.eval_every and done % config.eval_every == 0) or done == config.max_steps):
            metrics["heldout_accuracy"] = heldout_eval(model, tokenizer, config, rank, world_size, done, log)
        log.write(**{k: float(v) for k, v in metrics.items()})
        if done % config.save_every == 0 or done == config.max_steps:
            name = "final" if done == config.max_steps else None
            refreshed_reference = ref_model if ref_model is not None and config.ref_update_every else None
            save_checkpoint(config.out_dir, model, tokenizer, optimizer, done, config, metrics, rank, world_size,
                            name=name, reference=refreshed_reference)
    if world_size > 1:
        torch.distributed.destroy_process_group()
    if out_dir_lock:
        out_dir_lock.close()
    return metrics if config.max_steps > start_step else {}


def check_config(config):
    choices = dict(advantage=("grpo", "rloo"), scale_rewards=("group", "batch", "none"),
                   loss_agg=("seq-mean-token-mean", "token-mean", "seq-mean-token-sum-norm"),
                   kl_estimator=("k1", "k2", "k3", "full"), kl_direction=("reverse", "forward"),
                   kl_in=("loss", "reward"), parallel=("ddp", "fsdp"))
    check_values(config, choices,
                 positive=("prompts_per_step", "max_new_tokens", "temperature", "top_p", "mu", "max_steps", "lr",
                           "grad_clip", "micro_batch_size", "log_every", "sample_every", "save_every"),
                 non_negative=("eval_problems", "max_resample_rounds", "format_weight", "overlong_buffer",
                               "overlong_penalty", "eps_low", "eps_high", "entropy_coef", "beta", "ref_update_every",
                               "min_lr_ratio", "warmup_steps", "weight_decay", "eval_every", "eval_temperature"))
    if config.top_p > 1:
        raise SystemExit(f"--top_p={config.top_p}: must be at most 1")
    if config.group_size < 2:
        raise SystemExit("--group_size must be at least 2: advantages are relative to the group")
    if config.kl_estimator == "full" and config.parallel == "fsdp" and config.beta > 0:
        raise SystemExit("--kl_estimator=full reads the LM head outside the forward: use --parallel=ddp")
    if config.dynamic_sampling and config.parallel == "fsdp":
        raise SystemExit("--dynamic_sampling=true leaves ranks with different numbers of rollouts, and FSDP's "
                         "per-block all-gathers need the same number of forward passes on every rank: use "
                         "--parallel=ddp")


def load_reference(path, device):
    reference = Transformer.from_pretrained(path, device=device, dtype=torch.float32).eval()
    for p in reference.parameters():
        p.requires_grad_(False)
    return reference


def warn_if_stuck(metrics, config):
    if metrics["zero_variance"] > 0.8:
        print(f"warning: {metrics['zero_variance']:.0%} of groups have equal rewards and teach nothing: the task is "
              f"too hard or too easy for the policy; try --dynamic_sampling=true, a larger --group_size, or other "
              f"problems", flush=True)
    if metrics["truncated"] > 0.5:
        print(f"warning: {metrics['truncated']:.0%} of completions hit max_new_tokens={config.max_new_tokens}: raise "
              f"it, or use --overlong_buffer / --mask_truncated", flush=True)


def heldout_eval(model, tokenizer, config, rank, world_size, step, log):
    from eval import benchmark_metrics, evaluate

    problems = [{"id": str(i), **p} for i, p in enumerate(load_problems(config, heldout=True)[: config.eval_problems])]
    with autocast_for(next(model.parameters()).device):
        records = evaluate(unsharded_copy(model), tokenizer, problems, n=1, temperature=config.eval_temperature,
                           top_p=1.0, max_new_tokens=config.max_new_tokens, instruction=config.instruction,
                           seed=config.seed, rank=rank, world_size=world_size, show_progress=False)
    accuracy = benchmark_metrics(records, n=1)["pass@1"]
    if rank == 0:
        print(f"step {step}: held-out accuracy {accuracy:.1f}% ({len(problems)} problems, temperature "
              f"{config.eval_temperature})", flush=True)
    log.write(step=step, heldout_accuracy=accuracy)
    return accuracy


if __name__ == "__main__":
    main()
