"""
GRPO: reinforcement learning on verifier rewards (recipes 1 and 3 in README.md).

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
 2. Reward: the task's reward (tasks.py; for math, 1 if the verifier accepts the final answer, else 0) +
    --format_weight x format_reward (r1 layout), and DAPO's soft overlong penalty with --overlong_buffer > 0.
 3. Advantage: (r - group mean) / (std + 1e-4) as in GRPO, with the *sample* std (ddof=1, as TRL and verl).
    --scale_rewards=batch divides by the batch std instead, =none not at all (Dr. GRPO); --advantage=rloo uses
    the leave-one-out baseline r_i - mean_{j!=i} r_j (RLOO).
 4. Update: PPO-clip on per-token ratios pi/pi_old with --eps_low and --eps_high (DAPO clip-higher); --mu epochs over
    the same rollouts with pi_old fixed (mu=1: pi_old is pi detached, the ratio is exactly 1 and nothing clips).
    Log-probs are recomputed by the trainer at the sampling temperature over the full vocabulary: with --top_p < 1
    the sampler drew from a truncated distribution, the ratio ignores that (the mismatch is logged).
 5. Loss aggregation --loss_agg: seq-mean-token-mean (GRPO), token-mean (DAPO), seq-mean-token-sum-norm
    (Dr. GRPO: token sum / (sequences x max_new_tokens)); always normalised over the global batch (all ranks).
 6. KL (--beta > 0; with 0 no reference model is loaded): --kl_estimator k1|k2|k3|full, --kl_direction
    reverse|forward, --kl_in loss|reward. DeepSeekMath puts k3 in the loss, which estimates KL(pi||ref) but whose
    gradient is that of KL(ref||pi); see the table below. --ref_update_every K refreshes the reference. TRL 1.16
    also weights the KL by pi/pi_old by default (use_bias_correction_kl); we do not (at mu=1 the weight is 1, but
    its gradient adds beta x KL x grad log pi to TRL's).
 7. DAPO options: --dynamic_sampling (drop groups with equal rewards and sample more prompts),
    --mask_truncated (no loss on completions cut by max_new_tokens). --entropy_coef adds an entropy bonus,
    aggregated like the loss (TRL's is a token mean for every loss type: the same for token-mean).

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
import time
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from common import (MetricsLog, all_gather_objects, all_reduce_sum, autocast_for, check_values, claim_out_dir,
                    format_eta, full_state_dict, init_distributed, load_run_state, lr_at, make_optimizer,
                    parse_config, resume_checkpoint, save_checkpoint, set_gradient_sync, sampling_copy, wrap_model)
from data import Tokenizer
from model import Transformer, sequence_logprobs, shared_prompt_logprobs
from sampler import generate
from tasks import INSTRUCTION, JsonlTask, check_problems, get_task, heldout_accuracy, score


@dataclass
class Config:
    # data (tasks.py): the problems, their prompt and their reward
    task: str = "demo"  # demo, a .jsonl file of {"problem" or "question", "answer"}, or path/to/file.py:TaskClass
    data: str = ""  # a JSONL file of problems: the same as --task=<file>
    instruction: str | None = None  # appended to each problem; None: the task's own (none for the demo and a JSONL
    # file, the r1 instruction for the math benchmarks); "none": no instruction
    eval_data: str = ""  # the held-out task for periodic evals (any --task value); "": the task's own held-out
    # problems (a JSONL file of training problems has none)
    eval_problems: int = 500  # the first N held-out problems (0: no held-out eval)
    data_dir: str = "data"  # where a benchmark named by --eval_data is read (eval.py's --data_dir; benchmarks are
    # test sets: held-out evals only)
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
    advantage: Literal["grpo", "rloo"] = "grpo"
    scale_rewards: Literal["group", "batch", "none"] = "group"  # none: Dr. GRPO
    loss_agg: Literal["seq-mean-token-mean", "token-mean", "seq-mean-token-sum-norm"] = "seq-mean-token-mean"
    eps_low: float = 0.2  # clip ratio below 1 - eps_low
    eps_high: float = 0.2  # clip ratio above 1 + eps_high (DAPO: 0.28)
    mu: int = 1  # update epochs over each batch of rollouts
    mask_truncated: bool = False  # no loss on completions that hit max_new_tokens
    entropy_coef: float = 0.0  # entropy bonus weight
    # KL
    beta: float = 0.0  # KL weight; 0 loads no reference model
    kl_estimator: Literal["k1", "k2", "k3", "full"] = "k3"
    kl_direction: Literal["reverse", "forward"] = "reverse"  # reverse: KL(pi||ref), forward: KL(ref||pi)
    kl_in: Literal["loss", "reward"] = "loss"
    ref_update_every: int = 0  # steps between copies of the policy into the reference (0 = never)
    # optimisation
    max_steps: int = 170
    lr: float = 5e-5
    min_lr_ratio: float = 1.0  # the lr's floor as a fraction of --lr; 1.0: constant after warmup, no decay
    warmup_steps: int = 5
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    micro_batch_size: int = 128  # sequences per forward/backward on one rank (a multiple of --group_size keeps
    # each group in one micro-batch, so that its prompt runs once with --share_prompts)
    pack: Literal["auto", "true", "false"] = "auto"  # the training passes on packed rows (no padding, varlen
    # attention); auto: on CUDA only (on a CPU a packed row's attention runs document by document: slower)
    share_prompts: Literal["auto", "true", "false"] = "auto"  # the training passes run each prompt's forward once
    # for its group, the G completions reading its keys (model.SharedPrompts); auto: on the CPU only (not measured
    # on a GPU, where packed rows run through the varlen kernel)
    # system
    device: Literal["auto", "cpu", "cuda"] = "auto"
    parallel: Literal["ddp", "fsdp"] = "ddp"  # fsdp: rollouts then use a gathered full copy of the weights per rank
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
    wandb_project: str = ""  # also log to this Weights & Biases project ("": off; needs pip install wandb)
    wandb_run_name: str = ""  # "": the out_dir's name


PRESETS = {
    "demo": {},
    # DeepScaleR-style RL of a 1.5B R1 distill on one node of 8 GPUs
    "r1-1.5b": dict(prompts_per_step=128, group_size=8, max_new_tokens=8192, temperature=0.6, top_p=1.0,
                    instruction=INSTRUCTION, lr=1e-6, min_lr_ratio=1.0, warmup_steps=0, max_steps=1000,
                    micro_batch_size=4, activation_checkpointing=True, eps_high=0.28, loss_agg="token-mean", beta=0.0,
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


def policy_loss(logprobs, old_logprobs, advantages, completion_mask, num_sequences, num_tokens, eps_low, eps_high,
                loss_agg, max_new_tokens, kl=None, beta=0.0, entropy=None, entropy_coef=0.0):
    """The clipped surrogate (+ beta x KL - entropy_coef x entropy), aggregated per --loss_agg and normalised by
    global counts (all ranks, all micro-batches), so that summing this over micro-batches and ranks gives the loss
    of the whole batch. logprobs, old_logprobs, completion_mask, kl, entropy: (B, T); advantages: (B,)."""
    ratio = torch.exp(logprobs - old_logprobs)
    advantages = advantages[:, None]
    clipped = torch.clamp(ratio, 1 - eps_low, 1 + eps_high)
    per_token = -torch.minimum(ratio * advantages, clipped * advantages)
    if kl is not None:
        per_token = per_token + beta * kl
    if entropy is not None:
        per_token = per_token - entropy_coef * entropy
    mask = completion_mask.to(per_token.dtype)
    if loss_agg == "seq-mean-token-mean":
        per_sequence = (per_token * mask).sum(1) / mask.sum(1).clamp(min=1)
        loss = per_sequence.sum() / num_sequences
    elif loss_agg == "token-mean":
        loss = (per_token * mask).sum() / num_tokens
    elif loss_agg == "seq-mean-token-sum-norm":
        loss = (per_token * mask).sum() / (num_sequences * max_new_tokens)
    else:
        raise ValueError(f"unknown loss_agg {loss_agg!r}")
    with torch.no_grad():
        low = ((ratio < 1 - eps_low) & (advantages < 0) & completion_mask.bool()).sum()
        high = ((ratio > 1 + eps_high) & (advantages > 0) & completion_mask.bool()).sum()
    return loss, dict(clip_low=int(low), clip_high=int(high))


# -----------------------------------------------------------------------------
# rollouts: sample, score, and the tensors the update reads


@dataclass
class Sample:
    """One completion of a rollout, from the sampler through the loss to the log."""
    prompt: list[int]  # the prompt's token ids
    tokens: list[int]  # the completion's, the stop token included
    sampler_logprobs: list[float]  # the sampler's log-prob of each completion token
    truncated: bool  # cut by --max_new_tokens
    correct: bool
    reward: float
    text: str


@dataclass
class Batch:
    """This rank's samples as right-padded (prompt + completion) rows; every tensor (B, T) except lengths and
    advantages (B,). The training passes read them in the layout --pack and --share_prompts choose
    (training_logprobs)."""
    input_ids: torch.Tensor
    completion_mask: torch.Tensor  # 1 on the completion tokens, the stop token included (so stopping is learned)
    sampler_logprobs: torch.Tensor  # the sampler's log-probs at the completion tokens, 0 elsewhere
    lengths: torch.Tensor  # prompt + completion tokens of each row
    prompt_lengths: torch.Tensor  # (B,) prompt tokens of each row
    layout: Literal["padded", "packed", "shared"] = "padded"  # how the training passes read the rows
    advantages: torch.Tensor | None = None
    ref_logprobs: torch.Tensor | None = None  # when a KL estimate needs them
    old_logprobs: torch.Tensor | None = None  # pi_old: the ratio's denominator for --mu > 1 (at mu = 1 the update
    # uses pi detached), and the policy side of the KL penalty for --kl_in=reward


def rollout(policy, tokenizer, task, problems, config, seed) -> list[Sample]:
    """Samples a group per problem and scores it: the task's reward, the format reward, the overlong penalty. In
    generate's order: the group_size completions of problem 0, then those of problem 1, ...: every later step reads a
    group as group_size consecutive rows."""
    prompts = [task.prompt(tokenizer, p, config.instruction) for p in problems]
    completions = generate(policy, prompts, config.max_new_tokens, temperature=config.temperature,
                           top_p=config.top_p, n=config.group_size, stop_token_ids=tokenizer.eos_token_ids, seed=seed,
                           cuda_graph=config.cuda_graph)
    texts = [tokenizer.decode(c.tokens, skip_special_tokens=True) for c in completions]
    rewards, verdicts = score(task, texts, [problems[c.prompt_index] for c in completions],
                              [len(c.tokens) for c in completions], config.max_new_tokens, config.format_weight,
                              config.overlong_buffer, config.overlong_penalty)
    return [Sample(prompts[c.prompt_index], c.tokens, c.logprobs, c.finish_reason == "length", v.correct, r, t)
            for c, t, v, r in zip(completions, texts, verdicts, rewards)]


def collect_rollouts(model, tokenizer, task, problems, config, step, rank, world_size):
    """This rank's share of the step's groups, sampled by the current policy. With --dynamic_sampling, groups whose
    rewards are all equal are dropped and more prompts drawn, up to --max_resample_rounds times. Returns (samples,
    rounds, groups with equal rewards)."""
    policy = sampling_copy(model)
    wanted = config.prompts_per_step // world_size * config.group_size
    samples, rounds, equal_groups = [], 0, 0
    while len(samples) < wanted and rounds <= config.max_resample_rounds:
        # the same global draw on every rank, each taking its share: the data position is the step number,
        # whatever the number of ranks
        draw = np.random.RandomState(config.seed * 1_000_003 + step * 7919 + rounds)
        drawn = [problems[i] for i in draw.randint(0, len(problems), config.prompts_per_step)[rank::world_size]]
        with autocast_for(next(model.parameters()).device):
            new = rollout(policy, tokenizer, task, drawn, config,
                          seed=config.seed * 1_000_003 + step * 101 + rounds * 13 + rank)
        for start in range(0, len(new), config.group_size):
            group = new[start: start + config.group_size]
            has_signal = max(s.reward for s in group) > min(s.reward for s in group)
            equal_groups += not has_signal
            if has_signal or not config.dynamic_sampling:  # DAPO: groups with equal rewards carry no signal
                samples += group
        rounds += 1
        if not config.dynamic_sampling:
            break
    return samples[:wanted], rounds, equal_groups


def collate(samples, pad_id, device, layout="padded") -> Batch:
    longest = max(len(s.prompt) + len(s.tokens) for s in samples)
    input_ids = torch.full((len(samples), longest), pad_id, dtype=torch.long)
    completion_mask = torch.zeros((len(samples), longest), dtype=torch.long)
    sampler_logprobs = torch.zeros((len(samples), longest))
    for row, s in enumerate(samples):
        begin, end = len(s.prompt), len(s.prompt) + len(s.tokens)
        input_ids[row, :end] = torch.tensor(s.prompt + s.tokens)
        completion_mask[row, begin:end] = 1
        sampler_logprobs[row, begin:end] = torch.tensor(s.sampler_logprobs)
    lengths = torch.tensor([len(s.prompt) + len(s.tokens) for s in samples])
    prompt_lengths = torch.tensor([len(s.prompt) for s in samples])
    return Batch(input_ids.to(device), completion_mask.to(device), sampler_logprobs.to(device), lengths.to(device),
                 prompt_lengths.to(device), layout)


def training_logprobs(model, batch, rows, temperature, return_entropy=False, kl_reference=None,
                      kl_direction="reverse"):
    """sequence_logprobs of batch rows at their completion tokens, in the padded (B, T) layout (and the entropy, and
    with kl_reference the exact KL to it, from the same policy forward). Packed, the rows run as one packed row
    (documents back to back, no padding, positions restarting at 0); with shared prompts, each group's prompt runs
    once and its completions read its keys (shared_prompt_logprobs). Either way the results are put back in place,
    and the values equal the padded pass's up to float rounding. Returns the log-probs (B, T), or the tuple
    (log-probs, the entropy if return_entropy, the KL if kl_reference), in that order."""
    input_ids, mask, lengths = batch.input_ids[rows], batch.completion_mask[rows], batch.lengths[rows]
    head = dict(return_entropy=return_entropy, loss_mask=mask, kl_reference=kl_reference, kl_direction=kl_direction)
    if batch.layout == "shared":
        return shared_prompt_logprobs(model, input_ids, batch.prompt_lengths[rows], lengths, temperature, **head)
    if batch.layout == "padded":
        return sequence_logprobs(model, input_ids, temperature=temperature, **head)
    # packed: the real tokens as one row, positions restarting at 0 in each document
    positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
    real = positions < lengths[:, None]  # (B, T): the tokens that are not padding
    cu_seqlens = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)]).to(torch.int32)
    head["loss_mask"] = mask[real][None]
    result = sequence_logprobs(model, input_ids[real][None], positions[real][None], cu_seqlens, temperature, **head)

    def unpack(packed):
        return packed.new_zeros(input_ids.shape).masked_scatter(real, packed[0])

    return tuple(unpack(r) for r in result) if isinstance(result, tuple) else unpack(result)


def score_batch(batch, samples, model, ref_model, config, device):
    """Fills in what the update needs before it starts: the reference's and pi_old's log-probs (each once, and
    only when used), the KL-in-reward penalty, and the advantages (the batch std over all ranks for
    --scale_rewards=batch, which a rank without rollouts, batch None, joins too). The rewards themselves were given
    in rollout (tasks.score). With --mask_truncated it also zeroes the truncated completions in
    batch.completion_mask, so main counts num_tokens after this call. Returns the KL-in-reward penalty's KL summed
    over this rank's completion tokens (0 unless --kl_in=reward), for the log."""
    rewards = torch.tensor([s.reward for s in samples], dtype=torch.float32)
    reward_kl = 0.0
    if batch is not None:
        needs_ref_logprobs = ref_model is not None and config.kl_estimator != "full"
        kl_in_reward = ref_model is not None and config.kl_in == "reward"
        exact = kl_in_reward and not needs_ref_logprobs  # the exact KL comes with pi_old's log-probs, one pass for both
        with torch.no_grad(), autocast_for(device):
            if needs_ref_logprobs:
                batch.ref_logprobs = training_logprobs(ref_model, batch, slice(None), config.temperature)
            if config.mu > 1 or kl_in_reward:
                result = training_logprobs(model, batch, slice(None), config.temperature,
                                           kl_reference=ref_model if exact else None,
                                           kl_direction=config.kl_direction)
                batch.old_logprobs, kl = result if exact else (result, None)
            if kl_in_reward:
                if not exact:
                    kl = kl_estimate(batch.old_logprobs, batch.ref_logprobs, config.kl_estimator, config.kl_direction)
                kl_per_sequence = (kl * batch.completion_mask).sum(1).cpu()
                rewards = rewards - config.beta * kl_per_sequence
                reward_kl = float(kl_per_sequence.sum())
    batch_std = None
    if config.scale_rewards == "batch":
        count = all_reduce_sum(len(rewards), device)
        batch_mean = all_reduce_sum(rewards.sum().item(), device) / max(count, 1)
        batch_std = math.sqrt(all_reduce_sum(((rewards - batch_mean) ** 2).sum().item(), device) / max(count - 1, 1))
    if batch is None:
        return reward_kl
    batch.advantages = group_advantages(rewards, config.group_size, config.advantage, config.scale_rewards,
                                        batch_std=batch_std)[0].to(device)
    if config.mask_truncated:
        batch.completion_mask = batch.completion_mask * torch.tensor([not s.truncated for s in samples],
                                                                     device=device)[:, None]
    return reward_kl


# -----------------------------------------------------------------------------
# the update


def update_policy(wrapped, model, ref_model, optimizer, batch, config, num_sequences, num_tokens, world_size,
                  device, step):
    """--mu epochs of PPO-clip over this rank's rows: each epoch accumulates gradients over the micro-batches and
    ends in one optimizer step (mu steps per batch of rollouts). The loss is normalised by the global counts, so the
    gradient does not depend on how the batch is split over ranks and micro-steps (DDP averages over ranks:
    x world_size). Returns the diagnostics (summed; ratio_max_dev the largest) and the last epoch's gradient norm."""
    stats = dict(clip_low=0, clip_high=0, kl=0.0, entropy=0.0, mismatch=0.0, ratio_max_dev=0.0)
    rows_per_step = config.micro_batch_size
    starts = list(range(0, len(batch.input_ids), rows_per_step)) if batch is not None else []
    for epoch in range(config.mu):
        if not starts:  # this rank has no rollouts (dynamic sampling found none): a zero loss through the wrapped
            # model joins the others' gradient all-reduce (a backward without DDP's forward does not, and the
            # other ranks wait for it forever)
            set_gradient_sync(wrapped, enabled=True)
            (sequence_logprobs(wrapped, torch.zeros((1, 2), dtype=torch.long, device=device)).sum() * 0).backward()
        for k, start in enumerate(starts):
            set_gradient_sync(wrapped, enabled=k == len(starts) - 1)
            rows = slice(start, start + rows_per_step)
            micro_stats = micro_step(wrapped, ref_model, batch, rows, config, num_sequences, num_tokens, world_size,
                                     diagnostics=epoch == 0)
            for key, value in micro_stats.items():
                stats[key] = max(stats[key], value) if key == "ratio_max_dev" else stats[key] + value
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        if not torch.isfinite(grad_norm):
            raise SystemExit(f"step {step}: the gradient norm is not finite; stopping before the update (lower --lr, "
                             f"or resume from the last checkpoint)")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return stats, float(grad_norm)


def micro_step(wrapped, ref_model, batch, rows, config, num_sequences, num_tokens, world_size, diagnostics):
    """Forward, loss and backward of one micro-batch; returns its diagnostics (summed over completion tokens, but
    ratio_max_dev, the largest |ratio - 1|)."""
    kl_in_loss = ref_model is not None and config.kl_in == "loss"
    exact = kl_in_loss and config.kl_estimator == "full"  # from this forward's hidden states: no second pass
    wants_entropy = diagnostics or config.entropy_coef > 0  # logged in the first epoch, or trained on
    with autocast_for(batch.input_ids.device):
        result = training_logprobs(wrapped, batch, rows, config.temperature, return_entropy=wants_entropy,
                                   kl_reference=ref_model if exact else None, kl_direction=config.kl_direction)
    logprobs, *rest = result if isinstance(result, tuple) else (result,)
    entropy = rest.pop(0) if wants_entropy else None
    old = batch.old_logprobs[rows] if config.mu > 1 else logprobs.detach()
    kl = None
    if exact:
        kl = rest.pop(0)
    elif kl_in_loss:
        kl = kl_estimate(logprobs, batch.ref_logprobs[rows], config.kl_estimator, config.kl_direction)
    mask = batch.completion_mask[rows]
    loss, clip = policy_loss(logprobs, old, batch.advantages[rows], mask, num_sequences, num_tokens,
                             config.eps_low, config.eps_high, config.loss_agg, config.max_new_tokens,
                             kl=kl, beta=config.beta, entropy=entropy if config.entropy_coef else None,
                             entropy_coef=config.entropy_coef)
    (loss * world_size).backward()
    on = mask.bool()
    ratio = torch.exp(logprobs.detach() - old)[on]
    stats = dict(clip, ratio_max_dev=(ratio - 1).abs().max().item() if len(ratio) else 0.0)
    if diagnostics:  # once per batch, not per epoch
        stats.update(entropy=entropy.detach()[on].sum().item(), kl=kl.detach()[on].sum().item() if kl is not None
                     else 0.0, mismatch=(logprobs.detach() - batch.sampler_logprobs[rows]).abs()[on].sum().item())
    return stats


# -----------------------------------------------------------------------------
# the training loop


def main(argv=None):
    config = parse_config(Config, PRESETS, argv)
    check_config(config)
    rank, world_size, device = init_distributed(config.device)
    master = rank == 0
    torch.manual_seed(config.seed)
    if config.share_prompts == "auto":
        share_prompts = device.type == "cpu" and config.pack != "true"
    else:
        share_prompts = config.share_prompts == "true"
    pack = (device.type == "cuda" and not share_prompts) if config.pack == "auto" else config.pack == "true"
    layout = "shared" if share_prompts else "packed" if pack else "padded"
    if config.prompts_per_step % world_size:
        raise SystemExit(f"prompts_per_step={config.prompts_per_step} must be a multiple of the {world_size} ranks")

    out_dir_lock = claim_out_dir(config.out_dir, config.resume, config.overwrite, config.model) if master else None
    resume_from = resume_checkpoint(config, rank, world_size)
    model_path = resume_from or config.model
    model, tokenizer, ref_model = load_models(config, model_path, resume_from, device)
    wrapped, model = wrap_model(model, config.parallel, device, config.activation_checkpointing)
    optimizer = make_optimizer(model, config.lr, config.weight_decay)
    start_step = load_run_state(resume_from, model, optimizer, rank)[0] if resume_from else 0
    task, problems, eval_task, heldout = load_tasks(config, master)
    log = MetricsLog(os.path.join(config.out_dir, "metrics.jsonl"), enabled=master, start_step=start_step,
                     config=config)
    if master:
        print(f"config: {dataclasses.asdict(config)}")
        print(f"policy {model_path}: {model.num_parameters() / 1e6:.1f}M parameters | task {task.name}: "
              f"{len(problems)} problems | {world_size} process(es) on {device} | reference model: "
              f"{'loaded' if ref_model else 'none (beta=0)'}")
    instruction = task.instruction if config.instruction is None else config.instruction
    if start_step == 0 and heldout:
        heldout_eval(model, tokenizer, eval_task, heldout, instruction, config, rank, world_size, 0, log)

    start_time = time.time()
    for step in range(start_step, config.max_steps):
        times, t0 = {}, time.time()
        # 1-2. rollouts of the current policy, scored by the task
        samples, rounds, equal_groups = collect_rollouts(model, tokenizer, task, problems, config, step, rank,
                                                         world_size)
        times["rollout"], t0 = time.time() - t0, time.time()  # sampling and grading (logged as gen)
        # 3. the reference's and pi_old's log-probs, a KL-in-reward penalty, advantages within each group
        batch = collate(samples, tokenizer.pad_token_id, device, layout) if samples else None
        reward_kl = score_batch(batch, samples, model, ref_model, config, device)
        times["score"], t0 = time.time() - t0, time.time()
        # 4-7. mu epochs of PPO-clip with the KL term, normalised by the global counts
        num_sequences = all_reduce_sum(len(samples), device)
        num_tokens = all_reduce_sum(float(batch.completion_mask.sum()) if samples else 0.0, device)
        lr = lr_at(step, config.max_steps, config.lr, config.warmup_steps, config.min_lr_ratio)
        for group in optimizer.param_groups:
            group["lr"] = lr
        stats, grad_norm = update_policy(wrapped, model, ref_model, optimizer, batch, config, num_sequences,
                                         num_tokens, world_size, device, step)
        stats["kl"] += reward_kl  # logged for --kl_in=reward too (the loss's KL is summed in the update)
        if ref_model is not None and config.ref_update_every and (step + 1) % config.ref_update_every == 0:
            ref_model.load_state_dict(full_state_dict(model, device=device))
        times["update"] = time.time() - t0
        # diagnostics, held-out eval and checkpoints
        done = step + 1
        metrics = step_metrics(samples, stats, rounds, equal_groups, num_tokens, config, world_size, device)
        metrics.update(step=done, lr=lr, grad_norm=grad_norm, **{f"time_{k}": v for k, v in times.items()})
        # generated tokens per second of the whole step, not the sampler's own speed
        metrics["tokens_per_s"] = metrics.pop("generated") / max(sum(times.values()), 1e-9)
        if master and done % config.log_every == 0:
            print_step(metrics, config, (time.time() - start_time) / (done - start_step) * (config.max_steps - done))
        if master and samples and done % config.sample_every == 0:
            print(f"--- sample (reward {samples[0].reward:.2f}):\n{samples[0].text}\n---", flush=True)
        if heldout and ((config.eval_every and done % config.eval_every == 0) or done == config.max_steps):
            metrics["heldout_accuracy"] = heldout_eval(model, tokenizer, eval_task, heldout, instruction, config,
                                                       rank, world_size, done, log)
        log.write(**{k: float(v) for k, v in metrics.items()})
        if done % config.save_every == 0 or done == config.max_steps:
            refreshed_reference = ref_model if ref_model is not None and config.ref_update_every else None
            save_checkpoint(config.out_dir, model, tokenizer, optimizer, done, config, metrics, rank, world_size,
                            name="final" if done == config.max_steps else None, reference=refreshed_reference)
    if world_size > 1:
        torch.distributed.destroy_process_group()
    if out_dir_lock:
        out_dir_lock.close()
    return metrics if config.max_steps > start_step else {}


# -----------------------------------------------------------------------------
# set-up, logging and evaluation


def step_metrics(samples, stats, rounds, equal_groups, num_tokens, config, world_size, device) -> dict:
    """The step's means over all ranks: rewards and accuracy of the rollouts, then per completion token the KL,
    entropy, clip fractions and the sampler/trainer log-prob mismatch."""
    gathered = [row for part in all_gather_objects([(s.reward, s.correct, s.truncated, len(s.tokens))
                                                    for s in samples]) for row in part]
    totals = {k: all_reduce_sum(v, device) for k, v in stats.items() if k != "ratio_max_dev"}
    # both guard a step where --dynamic_sampling left no rollouts on any rank
    column_mean = lambda column: float(np.mean([row[column] for row in gathered])) if gathered else 0.0
    per_token = lambda total: total / max(num_tokens, 1)
    groups_drawn = all_reduce_sum(rounds * config.prompts_per_step // world_size, device)
    return dict(reward=column_mean(0), accuracy=column_mean(1), truncated=column_mean(2), length=column_mean(3),
                zero_variance=all_reduce_sum(equal_groups, device) / max(1, groups_drawn),
                kl=per_token(totals["kl"]), entropy=per_token(totals["entropy"]),
                clip_low=totals["clip_low"] / max(num_tokens * config.mu, 1),
                clip_high=totals["clip_high"] / max(num_tokens * config.mu, 1),
                mismatch=per_token(totals["mismatch"]), ratio_max_dev=stats["ratio_max_dev"],
                generated=sum(row[3] for row in gathered))


def print_step(metrics, config, eta):
    print(f"step {metrics['step']}/{config.max_steps} | reward {metrics['reward']:.3f} | acc "
          f"{metrics['accuracy']:.3f} | len {metrics['length']:.0f} | trunc {metrics['truncated']:.2f} | zero-var "
          f"{metrics['zero_variance']:.2f} | "
          f"kl {metrics['kl']:.4f} | ent {metrics['entropy']:.3f} | clip {metrics['clip_low']:.3f}/"
          f"{metrics['clip_high']:.3f} | mismatch {metrics['mismatch']:.1e} | gen {metrics['time_rollout']:.1f}s "
          f"score {metrics['time_score']:.1f}s train {metrics['time_update']:.1f}s | "
          f"{metrics['tokens_per_s']:,.0f} tok/s | ETA {format_eta(eta)}", flush=True)
    if metrics["zero_variance"] > 0.8:
        print(f"warning: {metrics['zero_variance']:.0%} of groups have equal rewards and teach nothing: the task is "
              f"too hard or too easy for the policy; try --dynamic_sampling=true, a larger --group_size, or other "
              f"problems", flush=True)
    if metrics["truncated"] > 0.5:
        print(f"warning: {metrics['truncated']:.0%} of completions hit max_new_tokens={config.max_new_tokens}: raise "
              f"it, or use --overlong_buffer / --mask_truncated", flush=True)


def check_config(config):
    check_values(config, positive=("prompts_per_step", "max_new_tokens", "temperature", "top_p", "mu", "max_steps",
                                   "lr", "grad_clip", "micro_batch_size", "log_every", "sample_every", "save_every"),
                 non_negative=("eval_problems", "max_resample_rounds", "format_weight", "overlong_buffer",
                               "overlong_penalty", "eps_low", "eps_high", "entropy_coef", "beta", "ref_update_every",
                               "min_lr_ratio", "warmup_steps", "weight_decay", "eval_every", "eval_temperature"))
    if config.top_p > 1:
        raise SystemExit(f"--top_p={config.top_p}: must be at most 1")
    if config.group_size < 2:
        raise SystemExit("--group_size must be at least 2: advantages are relative to the group")
    if config.data and config.task != "demo":
        raise SystemExit(f"--data={config.data} and --task={config.task}: name the problems once (--data=<file> is "
                         f"--task=<file>)")
    if config.share_prompts == "true" and config.pack == "true":
        raise SystemExit("--share_prompts=true and --pack=true are two layouts of the training passes: choose one")
    if config.kl_estimator == "full" and config.parallel == "fsdp" and config.beta > 0:
        raise SystemExit("--kl_estimator=full is tested with DDP only (the reference runs inside the sharded "
                         "policy's forward): use --parallel=ddp")
    if config.dynamic_sampling and config.parallel == "fsdp":
        raise SystemExit("--dynamic_sampling=true leaves ranks with different numbers of rollouts, and FSDP's "
                         "per-block all-gathers need the same number of forward passes on every rank: use "
                         "--parallel=ddp")


def load_tasks(config, master):
    """(task, its training problems, the held-out task, its first --eval_problems problems). A JSONL file named by
    --data is training problems only: the held-out ones come from --eval_data."""
    task = get_task(config.data, flag="--data") if config.data else get_task(config.task, config.data_dir,
                                                                             demo_problems=config.eval_problems)
    problems = check_problems(task.train_problems(config.seed), task)
    eval_task = get_task(config.eval_data, config.data_dir, demo_problems=config.eval_problems, flag="--eval_data") \
        if config.eval_data else task
    if not config.eval_problems or (eval_task is task and isinstance(task, JsonlTask)):
        if master and config.eval_problems:
            print(f"no held-out eval: {task.name} is a file of training problems; name held-out ones with "
                  f"--eval_data=<task>", flush=True)
        return task, problems, eval_task, []
    return task, problems, eval_task, check_problems(eval_task.test_problems(), eval_task)[: config.eval_problems]


def load_models(config, model_path, resume_from, device):
    """The policy, its tokenizer, and the reference model when --beta > 0 (a resumed run's refreshed one if saved)."""
    if not os.path.exists(os.path.join(model_path, "config.json")):
        raise SystemExit(f"{model_path} is not a model folder. The demo starts from the SFT checkpoint: run "
                         f"'python train_sft.py' first (or pass --model=<Hugging Face folder>)")
    model = Transformer.from_pretrained(model_path, device=device, dtype=torch.float32)
    ref_model = None
    if config.beta > 0:  # beta = 0: no reference model at all, and none of its memory
        saved = os.path.join(resume_from, "reference") if resume_from else None
        ref_model = load_reference(saved if saved and os.path.exists(saved) else config.model, device)
    return model, Tokenizer.from_pretrained(model_path), ref_model


def load_reference(path, device):
    reference = Transformer.from_pretrained(path, device=device, dtype=torch.float32).eval()
    for p in reference.parameters():
        p.requires_grad_(False)
    return reference


def heldout_eval(model, tokenizer, task, problems, instruction, config, rank, world_size, step, log):
    """pass@1 on the held-out problems, asked with the training prompts' instruction (the model is evaluated on
    the prompt it is trained on, whatever the held-out task's own default)."""
    with autocast_for(next(model.parameters()).device):
        accuracy = heldout_accuracy(sampling_copy(model), tokenizer, task, problems, config.eval_temperature,
                                    config.max_new_tokens, instruction, config.seed, rank, world_size)
    if rank == 0:
        print(f"step {step}: held-out accuracy {accuracy:.1f}% ({len(problems)} {task.name} problems, temperature "
              f"{config.eval_temperature})", flush=True)
    log.write(step=step, heldout_accuracy=accuracy)
    return accuracy


if __name__ == "__main__":
    main()
