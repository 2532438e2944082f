"""
Supervised fine-tuning on reasoning traces (recipe 2 of the mission): a model learns to write
<think> reasoning </think> then the answer, from (prompt, chain of thought, answer) examples.

    python train_sft.py                                   # the built-in demo: a ~0.6M-parameter model from scratch
                                                          # on the demo task, 2 CPU cores, about 4 minutes
    python train_sft.py --preset=r1-1.5b --model=path/to/Qwen2.5-Math-1.5B --data=traces.jsonl
    torchrun --standalone --nproc_per_node=8 train_sft.py --preset=r1-1.5b --model=... --data=...
    torchrun ... train_sft.py ... --parallel=fsdp         # shard a model that does not fit one card per block
    python train_sft.py --resume=true                     # continue from the last checkpoint in --out_dir
    python train_sft.py --overwrite=true                  # start again in a used --out_dir (one run per out_dir)

Data: JSONL with {"prompt", "completion"}, {"messages": [...]} or {"problem", "reasoning", "answer"}, rendered
with the model's own chat template; the loss covers the completion tokens and the end-of-turn token only.
Output: out_dir/step_XXXXXX checkpoints (Hugging Face folders plus optimizer/RNG state for exact resume),
out_dir/final (what train_grpo.py and eval.py load by default), out_dir/metrics.jsonl.
"""

import dataclasses
import functools
import os
import random
import time
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from common import (MetricsLog, all_reduce_sum, autocast_for, check_values, claim_out_dir, format_eta,
                    init_distributed, load_run_state, lr_at, make_optimizer, parse_config, resume_checkpoint,
                    save_checkpoint, set_gradient_sync, sampling_copy, wrap_model)
from data import Tokenizer, read_jsonl, sft_example
from model import Transformer, sequence_logprobs
from tasks import DemoTask, build_demo_model, demo_problems, demo_trace, heldout_accuracy


@dataclass
class Config:
    # data
    data: str = ""  # JSONL of traces; "" = the built-in demo task
    system_prompt: str = ""  # optional system message before each prompt
    demo_examples: int = 16000  # demo: training problems, each with one teacher trace
    demo_slip_rate: float = 0.25  # demo: share of teacher traces with one arithmetic slip (and a wrong answer)
    max_seq_len: int = 4096  # tokens; longer examples are dropped and counted in the log (never truncated)
    # model
    model: str = ""  # Hugging Face folder; "" = the demo model from scratch (built in out_dir/init)
    # optimisation
    max_steps: int = 1200
    batch_size: int = 32  # examples per optimizer step, over all ranks and micro-steps
    micro_batch_size: int = 32  # examples per forward/backward on one rank
    lr: float = 3e-3  # peak learning rate
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 30
    weight_decay: float = 0.1
    grad_clip: float = 1.0  # max global gradient norm
    # system
    device: Literal["auto", "cpu", "cuda"] = "auto"
    parallel: Literal["ddp", "fsdp"] = "ddp"  # fsdp: FSDP2, one shard group per block
    activation_checkpointing: bool = False  # recompute blocks in the backward (long traces)
    pack: Literal["auto", "true", "false"] = "auto"  # auto: packed rows (varlen attention, no padding) on CUDA,
    # padded rows on CPU
    seed: int = 0
    # logging, eval, checkpoints
    out_dir: str = "out/sft_demo"
    log_every: int = 10  # steps between progress lines
    eval_every: int = 0  # steps between held-out evals (0: only at the end)
    eval_problems: int = 500  # demo: held-out problems
    eval_max_new_tokens: int = 64
    eval_temperature: float = 1.0
    save_every: int = 250  # steps between checkpoints
    resume: bool = False  # continue from out_dir's latest checkpoint
    overwrite: bool = False  # a fresh run replaces the run already in out_dir (its checkpoints and metrics)
    wandb_project: str = ""  # also log to this Weights & Biases project ("": off; needs pip install wandb)
    wandb_run_name: str = ""  # "": the out_dir's name


PRESETS = {
    "demo": {},
    # one node of 8 GPUs, a 1.5B model on ~1k long traces (LIMO/s1-style): 5 epochs of 1k examples
    "r1-1.5b": dict(max_seq_len=16384, batch_size=64, micro_batch_size=1, lr=1e-5, min_lr_ratio=0.0,
                    warmup_steps=5, max_steps=80, weight_decay=0.0, activation_checkpointing=True,
                    out_dir="out/sft_r1_1.5b", save_every=20, eval_problems=0, log_every=1),
}


def load_examples(config, tokenizer, rank):
    """Token ids and loss masks of every training example, in file order."""
    if config.data:
        records = [sft_example(r, config.system_prompt or None) for r in read_jsonl(config.data)]
    else:
        rng = random.Random(config.seed)
        problems = demo_problems(config.demo_examples, seed=config.seed, heldout=False)
        records = [([{"role": "user", "content": p["problem"]}], demo_trace(p, rng, config.demo_slip_rate))
                   for p in problems]
    examples = [tokenizer.encode_chat(messages, completion) for messages, completion in records]
    kept = [e for e in examples if len(e[0]) <= config.max_seq_len]
    if rank == 0 and len(kept) < len(examples):
        print(f"dropped {len(examples) - len(kept)} of {len(examples)} examples longer than "
              f"max_seq_len={config.max_seq_len}")
    if not kept:
        raise SystemExit(f"no example fits in max_seq_len={config.max_seq_len}")
    return kept


def step_examples(step, batch_size, num_examples, seed):
    """Indices of the examples of one optimizer step: a new permutation each epoch, so the data position is the
    step number and a resumed run sees exactly the examples it would have."""
    indices = []
    for position in range(step * batch_size, (step + 1) * batch_size):
        epoch, offset = divmod(position, num_examples)
        indices.append(int(_epoch_order(seed + epoch, num_examples)[offset]))
    return indices


@functools.lru_cache(maxsize=2)
def _epoch_order(seed, num_examples):
    return np.random.RandomState(seed).permutation(num_examples)


def make_batch(examples, pack, pad_id, device):
    """Packed: one row, documents back to back, cu_seqlens marking them (attention never crosses one) and
    positions restarting at 0. Padded: one row per example, right-padded, pads masked out."""
    if pack:
        ids = torch.tensor([t for e in examples for t in e[0]], device=device)[None]  # (1, total)
        mask = torch.tensor([m for e in examples for m in e[1]], device=device)[None]
        positions = torch.cat([torch.arange(len(e[0]), device=device) for e in examples])[None]
        lengths = torch.tensor([0] + [len(e[0]) for e in examples], device=device)
        return dict(input_ids=ids, loss_mask=mask, position_ids=positions,
                    cu_seqlens=lengths.cumsum(0).to(torch.int32))
    longest = max(len(e[0]) for e in examples)
    ids = torch.full((len(examples), longest), pad_id, dtype=torch.long, device=device)  # (B, longest)
    mask = torch.zeros((len(examples), longest), dtype=torch.long, device=device)
    for row, (tokens, loss_mask) in enumerate(examples):
        ids[row, : len(tokens)] = torch.tensor(tokens, device=device)
        mask[row, : len(tokens)] = torch.tensor(loss_mask, device=device)
    return dict(input_ids=ids, loss_mask=mask, position_ids=None, cu_seqlens=None)


def load_model(config, model_path, build_demo, master, world_size, device):
    """The model and tokenizer at model_path; the demo's untrained model is built there first (by rank 0, the others
    wait) when no --model is given and nothing is resumed."""
    if build_demo and master:
        build_demo_model(model_path, seed=config.seed)
    if world_size > 1:
        torch.distributed.barrier()
    return Transformer.from_pretrained(model_path, device=device, dtype=torch.float32), \
        Tokenizer.from_pretrained(model_path)


def accumulate_gradients(wrapped, micro_batches, pack, pad_id, global_tokens, world_size, device):
    """Forward and backward of each micro-batch, the loss summed over completion tokens and divided by the global
    batch's (all ranks, all micro-steps); gradients are all-reduced on the last micro-step only. Returns this rank's
    summed token loss and the tokens it ran, counted for all ranks."""
    loss_sum, tokens = 0.0, 0
    for k, micro_batch in enumerate(micro_batches):
        batch = make_batch(micro_batch, pack, pad_id, device)
        set_gradient_sync(wrapped, enabled=k == len(micro_batches) - 1)
        with autocast_for(device):
            logprobs = sequence_logprobs(wrapped, batch["input_ids"], batch["position_ids"], batch["cu_seqlens"],
                                         loss_mask=batch["loss_mask"])
        token_loss = -(logprobs * batch["loss_mask"]).sum()
        (token_loss * world_size / global_tokens).backward()
        loss_sum += token_loss.item()
        tokens += batch["input_ids"].numel() * world_size
    return loss_sum, tokens


def evaluate_demo(model, tokenizer, config, rank, world_size):
    task = DemoTask(test_size=config.eval_problems)
    with autocast_for(next(model.parameters()).device):
        return heldout_accuracy(sampling_copy(model), tokenizer, task, task.test_problems(), config.eval_temperature,
                                config.eval_max_new_tokens, None, config.seed, rank, world_size)


def main(argv=None):
    config = parse_config(Config, PRESETS, argv)
    check_config(config)
    rank, world_size, device = init_distributed(config.device)
    master = rank == 0
    torch.manual_seed(config.seed)
    if config.batch_size % (world_size * config.micro_batch_size):
        raise SystemExit(f"batch_size={config.batch_size} must be a multiple of world_size x micro_batch_size = "
                         f"{world_size} x {config.micro_batch_size}")
    pack = device.type == "cuda" if config.pack == "auto" else config.pack == "true"

    # model and tokenizer: a checkpoint to resume, a Hugging Face folder, or the demo model built from scratch
    out_dir_lock = claim_out_dir(config.out_dir, config.resume, config.overwrite, config.model) if master else None
    resume_from = resume_checkpoint(config, rank, world_size)
    model_path = resume_from or config.model or os.path.join(config.out_dir, "init")
    model, tokenizer = load_model(config, model_path, build_demo=not resume_from and not config.model,
                                  master=master, world_size=world_size, device=device)
    wrapped, model = wrap_model(model, config.parallel, device, config.activation_checkpointing)
    optimizer = make_optimizer(model, config.lr, config.weight_decay)
    start_step, metrics = 0, {}
    if resume_from:
        start_step, metrics = load_run_state(resume_from, model, optimizer, rank)
    examples = load_examples(config, tokenizer, rank)
    log = MetricsLog(os.path.join(config.out_dir, "metrics.jsonl"), enabled=master, start_step=start_step,
                     config=config)
    if master:
        print(f"config: {dataclasses.asdict(config)}")
        print(f"model {model_path}: {model.num_parameters() / 1e6:.1f}M parameters | {len(examples)} examples | "
              f"{world_size} process(es) on {device} | {'packed' if pack else 'padded'} batches"
              + (f" | resuming at step {start_step}" if resume_from else ""))

    start_time, tokens_seen = time.time(), 0
    for step in range(start_step, config.max_steps):
        micro_batches = rank_micro_batches(examples, step, config, rank, world_size)
        # the loss is normalised by the completion tokens of the whole global batch, so the update does not
        # depend on how the batch is split over ranks and micro-steps (DDP averages over ranks: x world_size)
        global_tokens = all_reduce_sum(sum(sum(e[1]) for micro_batch in micro_batches for e in micro_batch), device)
        lr = lr_at(step, config.max_steps, config.lr, config.warmup_steps, config.min_lr_ratio)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss_sum, tokens = accumulate_gradients(wrapped, micro_batches, pack, tokenizer.pad_token_id, global_tokens,
                                                world_size, device)
        tokens_seen += tokens
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        loss = all_reduce_sum(loss_sum, device) / global_tokens
        if not (np.isfinite(loss) and torch.isfinite(grad_norm)):
            raise SystemExit(f"step {step}: loss {loss} / grad norm {float(grad_norm)} is not finite; stopping "
                             f"before the update (lower --lr, or resume from the last checkpoint)")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

        # everything below is diagnostics, evaluation and checkpoints
        done = step + 1
        elapsed = time.time() - start_time
        metrics = dict(step=done, loss=loss, lr=lr, grad_norm=float(grad_norm), tokens_per_s=tokens_seen / elapsed)
        if master and (done % config.log_every == 0 or done == config.max_steps):
            eta = elapsed / (done - start_step) * (config.max_steps - done)
            print(f"step {done}/{config.max_steps} | loss {loss:.4f} | lr {lr:.2e} | grad norm {float(grad_norm):.2f}"
                  f" | {metrics['tokens_per_s']:,.0f} tok/s | ETA {format_eta(eta)}", flush=True)
        is_last = done == config.max_steps
        if config.eval_problems and not config.data and ((config.eval_every and done % config.eval_every == 0)
                                                         or is_last):
            metrics["heldout_accuracy"] = evaluate_demo(model, tokenizer, config, rank, world_size)
            if master:
                print(f"step {done}: held-out accuracy {metrics['heldout_accuracy']:.1f}% "
                      f"({config.eval_problems} demo problems, temperature {config.eval_temperature})", flush=True)
        log.write(**metrics)
        if done % config.save_every == 0 and not is_last:
            save_checkpoint(config.out_dir, model, tokenizer, optimizer, done, config, metrics, rank, world_size)
    if start_step < config.max_steps:
        path = save_checkpoint(config.out_dir, model, tokenizer, optimizer, config.max_steps, config, metrics, rank,
                               world_size, name="final")
        if master:
            print(f"wrote {path} (train_grpo.py and eval.py read it by default)")
    if world_size > 1:
        torch.distributed.destroy_process_group()
    if out_dir_lock:
        out_dir_lock.close()
    return metrics


def rank_micro_batches(examples, step, config, rank, world_size):
    """This rank's examples of the step's global batch, split into micro-batches."""
    indices = step_examples(step, config.batch_size, len(examples), config.seed)[rank::world_size]
    return [[examples[i] for i in indices[k: k + config.micro_batch_size]]
            for k in range(0, len(indices), config.micro_batch_size)]


def check_config(config):
    check_values(config, positive=("max_seq_len", "max_steps", "batch_size", "micro_batch_size", "lr", "grad_clip",
                                   "log_every", "save_every", "demo_examples", "eval_max_new_tokens"),
                 non_negative=("warmup_steps", "min_lr_ratio", "weight_decay", "eval_every", "eval_problems",
                               "eval_temperature", "demo_slip_rate"))


if __name__ == "__main__":
    main()
