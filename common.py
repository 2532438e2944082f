"""
What train_sft.py, train_grpo.py and eval.py share: config overrides, distributed set-up, wrapping a plain model
for DDP or FSDP2, checkpoints with exact resume, and logging. Nothing here knows the algorithms.
"""

import dataclasses
import datetime
import errno
import fcntl
import json
import math
import os
import pickle
import random
import re
import shutil
import sys
import time
import typing
import zipfile

import numpy as np
import torch
import torch.distributed as dist

# -----------------------------------------------------------------------------
# config: a dataclass, named presets, --key=value overrides with type checks


def parse_config(config_class, presets: dict, argv=None):
    """`--preset=name` applies a named dict of overrides first; then every `--key=value` in order. Unknown keys,
    values of the wrong type and values outside a field's Literal[...] choices are errors that name them."""
    argv = sys.argv[1:] if argv is None else argv
    types = {f.name: f.type for f in dataclasses.fields(config_class)}
    overrides = {}
    for arg in argv:
        if not arg.startswith("--") or "=" not in arg:
            raise SystemExit(f"arguments are --key=value, got {arg!r}")
        key, value = arg[2:].split("=", 1)
        if key != "preset" and key not in types:
            raise SystemExit(f"unknown config key {key!r}; known: {', '.join(sorted(types))}")
        overrides[key] = value
    preset = overrides.pop("preset", None)
    config = config_class()
    if preset is not None:
        if preset not in presets:
            raise SystemExit(f"unknown preset {preset!r}; known: {', '.join(presets)}")
        config = dataclasses.replace(config, **presets[preset])
    for key, value in overrides.items():
        setattr(config, key, _convert(key, value, types[key]))
    for key, annotation in types.items():  # presets and defaults are held to the same choices as flags
        choices = typing.get_args(annotation) if typing.get_origin(annotation) is typing.Literal else None
        if choices and getattr(config, key) not in choices:
            raise SystemExit(f"--{key}={getattr(config, key)!r}: choose one of {', '.join(choices)}")
    return config


def _convert(key, value, annotation):
    """The flag's text as the field's type: int, float, bool, str, a Literal of strings, or one of these | None
    (where "none" means None, except for strings, which keep it as text)."""
    if typing.get_origin(annotation) is typing.Literal:
        return value
    kinds = [k for k in typing.get_args(annotation) if k is not type(None)] or [annotation]
    kind = kinds[0]
    if type(None) in typing.get_args(annotation) and kind is not str and value.lower() == "none":
        return None
    try:
        if kind is bool:
            if value.lower() not in ("1", "0", "true", "false", "yes", "no"):
                raise ValueError
            return value.lower() in ("1", "true", "yes")
        converted = kind(value)
    except ValueError:
        raise SystemExit(f"--{key}={value!r}: expected {kind.__name__}") from None
    if kind is float and not math.isfinite(converted):
        raise SystemExit(f"--{key}={value!r}: expected a finite number")
    return converted


def check_values(config, positive=(), non_negative=()):
    """Refuses at start, naming the flag, a number the run would crash on (or silently misread) later. None (the
    default resolved later) passes."""
    for key in positive:
        if getattr(config, key) is not None and not getattr(config, key) > 0:
            raise SystemExit(f"--{key}={getattr(config, key)}: must be greater than 0")
    for key in non_negative:
        if getattr(config, key) is not None and not getattr(config, key) >= 0:
            raise SystemExit(f"--{key}={getattr(config, key)}: must be 0 or more")


# -----------------------------------------------------------------------------
# distributed: a few lines that leave the single-process path unchanged


def init_distributed(device_name="auto"):
    """Returns (rank, world_size, device). Under torchrun: nccl on GPUs, gloo on CPUs."""
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    rank, local_rank = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    if device_name == "auto":
        device_name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(f"cuda:{local_rank}" if device_name == "cuda" else device_name)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        # a rank may wait at a barrier while another samples for long (a 32k-token AIME chunk, a make_traces chunk):
        # NCCL's 10-minute default would kill the job that is working
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=datetime.timedelta(hours=6))
    return rank, world_size, device


def all_reduce_sum(value: float, device) -> float:
    if not (dist.is_available() and dist.is_initialized()):
        return float(value)
    tensor = torch.tensor(float(value), device=device, dtype=torch.float64)
    dist.all_reduce(tensor)
    return tensor.item()


def all_gather_objects(obj) -> list:
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def wrap_model(model, parallel: str, device, activation_checkpointing=False):
    """Parallelism applied to a plain model (model.py never imports torch.distributed):
    ddp:  every rank holds the whole model; gradients are averaged in the backward.
    fsdp: FSDP2, each block sharded over ranks (fully_shard), then the root; parameters are gathered per block
          in the forward and freed after, so a model larger than one card trains.
    Returns the wrapped model (call it) and the plain one (for saving, sampling and the log-prob path)."""
    model.gradient_checkpointing = activation_checkpointing
    if not dist.is_initialized():
        return model, model
    if parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None), model
    if parallel == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for block in model.model.layers:
            fully_shard(block)
        fully_shard(model)
        return model, model
    raise ValueError(f"parallel must be ddp or fsdp, not {parallel!r}")


def set_gradient_sync(wrapped, enabled: bool):
    """Whether the next backward all-reduces gradients over ranks: only on the last micro-step of an
    accumulation, so the others skip the communication."""
    if hasattr(wrapped, "require_backward_grad_sync"):
        wrapped.require_backward_grad_sync = enabled
    elif hasattr(wrapped, "set_requires_gradient_sync"):  # FSDP2
        wrapped.set_requires_gradient_sync(enabled)


def is_sharded(model) -> bool:
    if not dist.is_initialized():
        return False
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def full_state_dict(model, device="cpu", rank0_only=False, dtype=None) -> dict:
    """Whole (unsharded) weights on `device` (floating-point tensors cast to `dtype` if given), on every rank; every
    rank must call it. Under FSDP2 the shards are all-gathered one tensor at a time. rank0_only: the other ranks get
    {} (a checkpoint is written by rank 0 alone, and a full copy in host memory per rank would not fit a large
    model)."""
    def cast(tensor):
        tensor = tensor.detach().to(device)
        return tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor

    if not is_sharded(model):
        return {k: cast(v) for k, v in model.state_dict().items()}
    if rank0_only:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return {k: cast(v) for k, v in state.items()}
    from torch.distributed.tensor import DTensor

    return {k: cast(v.full_tensor() if isinstance(v, DTensor) else v) for k, v in model.state_dict().items()}


def sampling_copy(model, dtype="auto"):
    """The weights the sampler decodes with (rollouts, held-out evals); dtype "auto" is bf16 on GPUs, the model's own
    on CPUs (None: the model's own).
    CPU, unsharded: the model itself.
    FSDP2: a plain copy with the full weights on every rank. The sampler decodes a different number of steps on each
    rank, which a sharded model (one all-gather per block and step, in lockstep) cannot do.
    GPU: a bf16 copy. Under autocast each decode step re-casts every fp32 master weight (autocast caches no casts
    inside a CUDA graph): on an H200 at 1.5B, 64 sequences decode 64 tokens 1.57x faster from the copy (9,979 ->
    15,659 tokens/s, graph capture included, the copy's own 0.024 s not; bench/results/2026-11-30_h200_gpu_check.md).
    The copy costs 2 bytes per parameter for the rollout's duration (a model already in bf16 is used as it is), and
    its norms and residual stream run in bf16 where the trainer's run in fp32: the mean |sampler - trainer| log-prob
    gap there went from 0.016 to 0.023 (the logged mismatch shows it in every run)."""
    if dtype == "auto":
        dtype = torch.bfloat16 if next(model.parameters()).device.type == "cuda" else None
    if not is_sharded(model) and dtype in (None, next(model.parameters()).dtype):
        return model
    from model import Transformer

    weights = full_state_dict(model, next(model.parameters()).device, dtype=dtype)
    with torch.device("meta"):
        copy = Transformer(model.config)
    copy.load_state_dict(weights, assign=True)
    return copy.eval()


def autocast_for(device):
    """bf16 autocast on GPUs (fp32 master weights stay in the optimizer), nothing on CPUs."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


# -----------------------------------------------------------------------------
# optimisation


def lr_at(step, max_steps, lr, warmup_steps, min_lr_ratio=0.1):
    """Linear warmup, then cosine decay to min_lr_ratio * lr."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return lr * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def make_optimizer(model, lr, weight_decay, betas=(0.9, 0.95), fused=None):
    """AdamW; no weight decay on norms and biases. fused (default: on GPUs) is torch's one-kernel AdamW: 2.5% off a
    1.5B SFT step on an H200 against the foreach one (bench/results/2026-11-30_h200_gpu_check.md); on CPUs the
    foreach one, whose rounding the golden losses were made with."""
    if fused is None:
        fused = next(model.parameters()).device.type == "cuda"
    decay = [p for n, p in model.named_parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=fused)


# -----------------------------------------------------------------------------
# checkpoints: a Hugging Face folder + run state for exact resume


def rng_state():
    """Tensors, tuples and lists only, so the file loads with torch.load(weights_only=True): unpickling anything
    else can run code, and a checkpoint folder may come from someone else."""
    name, key, position, has_gauss, cached_gaussian = np.random.get_state()
    return {"python": random.getstate(), "numpy": (name, key.tolist(), position, has_gauss, cached_gaussian),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state):
    random.setstate(state["python"])
    name, key, position, has_gauss, cached_gaussian = state["numpy"]
    np.random.set_state((name, np.array(key, dtype=np.uint32), position, has_gauss, cached_gaussian))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(out_dir, model, tokenizer, optimizer, step, config, metrics, rank, world_size, name=None,
                    reference=None):
    """out_dir/step_XXXXXX (or out_dir/<name>): config.json + model.safetensors + tokenizer files (loads in
    transformers), run.json (config, step, metrics), per-rank state_rankN.pt (optimizer, RNG) for exact
    resume, and reference/ when a reference model is given (GRPO's refreshed one). The folder is written under a
    temporary name and renamed, so a crash mid-save never leaves a half checkpoint."""
    from model import Transformer

    path = os.path.join(out_dir, name or f"step_{step:06d}")
    tmp = path + ".tmp"
    weights = full_state_dict(model, rank0_only=True)
    optimizer_state = _optimizer_state(model, optimizer)
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # a save killed before its rename: none of its files may stay
        os.makedirs(tmp)
        with torch.device("meta"):
            shell = Transformer(model.config)
        shell.load_state_dict(weights, assign=True)
        shell.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if reference is not None:
            reference.save_pretrained(os.path.join(tmp, "reference"))
        with open(os.path.join(tmp, "run.json"), "w") as f:
            json.dump({"config": dataclasses.asdict(config), "step": step, "metrics": metrics,
                       "world_size": world_size, "reference": reference is not None,
                       "time": time.strftime("%Y-%m-%d %H:%M:%S")}, f, indent=2)
    if dist.is_initialized():
        dist.barrier()
    torch.save({"optimizer": optimizer_state, "rng": rng_state()},
               os.path.join(tmp, f"state_rank{rank}.pt"))
    if dist.is_initialized():
        dist.barrier()
    if rank == 0:
        if os.path.exists(path):  # the same step saved again (a resumed run): the new one wins
            shutil.rmtree(path)
        os.replace(tmp, path)
        with open(os.path.join(out_dir, "latest.tmp"), "w") as f:  # replaced whole: never empty or half written
            f.write(os.path.basename(path))
        os.replace(os.path.join(out_dir, "latest.tmp"), os.path.join(out_dir, "latest"))
    if dist.is_initialized():
        dist.barrier()
    return path


def _optimizer_state(model, optimizer):
    """Under FSDP2 the whole (gathered) state on rank 0 and {} on the others; load_run_state broadcasts it back."""
    if is_sharded(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True,
                                                                                   cpu_offload=True))
    return optimizer.state_dict()


def latest_checkpoint(out_dir, verbose=True) -> str | None:
    """The checkpoint out_dir/latest names; when that marker is missing, empty or unreadable, or names a folder
    that is not complete (a disk that filled up, a copy cut short), the newest complete one, with a warning."""
    named, problem = _read_latest(out_dir)
    if problem is None:
        return named
    folders = [os.path.join(out_dir, name) for name in os.listdir(out_dir)
               if name == "final" or re.fullmatch(r"step_\d+", name)] if os.path.isdir(out_dir) else []
    complete = sorted((_checkpoint_step(path), path) for path in folders if checkpoint_is_complete(path))
    if folders and verbose:
        print(f"warning: {problem}; " + (f"resuming from the newest complete checkpoint, {complete[-1][1]}"
                                         if complete else "no complete checkpoint is left"), flush=True)
    return complete[-1][1] if complete else None


def _read_latest(out_dir):
    """(path, None) when out_dir/latest names a complete checkpoint, else (None, what is wrong)."""
    marker = os.path.join(out_dir, "latest")
    try:
        with open(marker, encoding="utf-8") as f:
            name = f.read().strip()
    except FileNotFoundError:
        return None, f"{marker} is missing"
    except (OSError, UnicodeDecodeError):
        return None, f"{marker} cannot be read"
    if not name:
        return None, f"{marker} is empty"
    if os.path.basename(name) != name or name in (".", ".."):  # a marker never points out of out_dir
        return None, f"{marker} names {name!r}, not a folder of {out_dir}"
    path = os.path.join(out_dir, name)
    return (path, None) if checkpoint_is_complete(path) else (None, f"{path} is not a complete checkpoint")


def checkpoint_is_complete(path) -> bool:
    """Every file a resume reads is there and whole: run.json, config.json, the weights (their size matches
    their header), the tokenizer, the state file of each rank (a zip with its closing directory), and the
    reference model's config and weights when the run saved one (GRPO's refreshed reference: without it a resume
    would silently fall back to the initial model as its reference)."""
    from model import check_safetensors, checkpoint_files

    try:
        with open(os.path.join(path, "run.json")) as f:
            run = json.load(f)
        reference = os.path.join(path, "reference")  # checked also where run.json predates its "reference" field
        model_folders = [path, reference] if run.get("reference") or os.path.isdir(reference) else [path]
        for folder in model_folders:
            with open(os.path.join(folder, "config.json")) as f:
                json.load(f)
            for file in checkpoint_files(folder):
                check_safetensors(file)
        states = [os.path.join(path, f"state_rank{rank}.pt") for rank in range(int(run.get("world_size", 1)))]
        whole_states = all(zipfile.is_zipfile(state) for state in states)
        return isinstance(run["step"], int) and whole_states and os.path.exists(os.path.join(path, "tokenizer.json"))
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return False


def _checkpoint_step(path) -> int:
    with open(os.path.join(path, "run.json")) as f:
        return json.load(f)["step"]


# settings a resumed run may change: how it runs and reports, not what it computes (max_steps extends a run);
# not --parallel or --device: FSDP and DDP save their optimizer state differently
RESUME_MAY_CHANGE = {"resume", "overwrite", "max_steps", "activation_checkpointing", "micro_batch_size", "pack",
                     "share_prompts", "cuda_graph", "out_dir", "log_every", "save_every", "sample_every",
                     "eval_every", "eval_problems", "eval_data", "data_dir", "eval_max_new_tokens", "eval_temperature",
                     "wandb_project", "wandb_run_name"}


def resume_checkpoint(config, rank, world_size) -> str | None:
    """With --resume=true, the checkpoint to continue from, after checking it was written by this same run (None:
    nothing saved yet, the run starts from scratch)."""
    if not config.resume:
        return None
    path = latest_checkpoint(config.out_dir, verbose=rank == 0)
    if path is None:
        if rank == 0:
            print(f"no checkpoint in {config.out_dir}: starting from scratch", flush=True)
        return None
    with open(os.path.join(path, "run.json")) as f:
        run = json.load(f)
    saved, now = run.get("config", {}), dataclasses.asdict(config)
    differences = [f"--{key}={saved[key]!r} there, {now[key]!r} here" for key in now
                   if key in saved and key not in RESUME_MAY_CHANGE and saved[key] != now[key]]
    if run.get("world_size", 1) != world_size:
        differences.append(f"{run.get('world_size', 1)} processes there, {world_size} here")
    if differences:
        raise SystemExit(f"--resume=true: {path} was written by another run ({'; '.join(differences)}); resume "
                         f"with its settings, or start the new run in another --out_dir")
    if rank == 0:
        print(f"resuming from {path}", flush=True)
    return path


# what runs write into out_dir; --overwrite=true removes exactly these
RUN_OUTPUTS = re.compile(r"step_\d+|final|latest|metrics\.jsonl|.*\.tmp")


def claim_out_dir(out_dir, resume, overwrite, model=None):
    """An out_dir belongs to one run. Takes an OS lock on out_dir/.lock (it goes with its process, even on
    kill -9), refuses a fresh run into a folder that holds anything unless resume or overwrite (which removes the
    old run's outputs), and removes what a killed save left half written (*.tmp). Rank 0 calls it and keeps the
    returned file open for the whole run."""
    os.makedirs(out_dir, exist_ok=True)
    lock = open(os.path.join(out_dir, ".lock"), "a")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # per open file: a second claim in one process fails too
    except OSError as error:
        if error.errno not in (errno.EAGAIN, errno.EACCES):  # a shared file system without locks (Lustre mounted
            # noflock, some NFS): the run goes on, unguarded, rather than stopping as if the folder were in use
            print(f"warning: cannot lock {lock.name} ({error.strerror}): nothing stops a second run "
                  f"from writing into --out_dir={out_dir} at the same time", flush=True)
        else:
            lock.close()
            raise SystemExit(f"--out_dir={out_dir} is in use by another run (it holds {lock.name}): wait for it "
                             f"to end, or choose another --out_dir") from None
    contents = sorted(name for name in os.listdir(out_dir) if name != ".lock")
    if contents and not resume and not overwrite:
        lock.close()
        raise SystemExit(f"--out_dir={out_dir} already holds a run ({', '.join(contents[:4])}"
                         f"{', ...' if len(contents) > 4 else ''}): pass --resume=true to continue it or "
                         f"--overwrite=true to replace it, or choose another --out_dir")
    doomed = [os.path.join(out_dir, name) for name in contents
              if RUN_OUTPUTS.fullmatch(name) and (overwrite and not resume or name.endswith(".tmp"))]
    for path in doomed:
        if model and (os.path.realpath(model) + os.sep).startswith(os.path.realpath(path) + os.sep):
            lock.close()
            raise SystemExit(f"--overwrite=true would delete {path}, which holds --model={model}: copy the model "
                             f"elsewhere or choose another --out_dir")
    for path in doomed:
        if os.path.isdir(path):
            shutil.rmtree(path)
        else:
            os.remove(path)
    return lock


def load_run_state(path, model, optimizer, rank):
    """Restores optimizer and RNG state saved by save_checkpoint (weights are loaded from the folder itself)."""
    state_file = os.path.join(path, f"state_rank{rank}.pt")
    if not os.path.exists(state_file):
        raise FileNotFoundError(f"{state_file} is missing: resume with the same number of processes as the run "
                                f"that wrote {path}")
    try:
        state = torch.load(state_file, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError:
        raise ValueError(f"{state_file}: holds objects other than tensors and plain values (loading them could "
                         f"run code); refusing it. Only checkpoints written by this code load") from None
    except RuntimeError as error:
        raise ValueError(f"{state_file}: not a readable checkpoint file ({error})") from None
    if is_sharded(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(model, optimizer, state["optimizer"],
                                 options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    else:
        optimizer.load_state_dict(state["optimizer"])
    set_rng_state(state["rng"])
    with open(os.path.join(path, "run.json")) as f:
        run = json.load(f)
    return run["step"], run.get("metrics", {})


# -----------------------------------------------------------------------------
# logging


class MetricsLog:
    """Appends one JSON object per line; only rank 0 writes. A run resumed at step S first drops the lines of
    later steps (a killed run logged them after its last checkpoint, and the resumed run logs them again) and a
    line torn by the kill, so each step appears once; a run starting from scratch (S = 0) drops every line. With
    config.wandb_project set (not empty), rank 0 also starts a Weights & Biases run with the config and logs every
    line to it; wandb is optional, and asking for it without it installed is an error at start."""

    def __init__(self, path, enabled=True, start_step=0, config=None):
        self.path = path if enabled else None
        self.wandb = None
        if self.path:
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            if os.path.exists(path):
                self._keep_steps_until(start_step)
            project = getattr(config, "wandb_project", "") if config is not None else ""
            if project:
                self.wandb = start_wandb(project, getattr(config, "wandb_run_name", "") or
                                         os.path.basename(os.path.dirname(os.path.abspath(path))), config)

    def _keep_steps_until(self, start_step):
        kept = []
        with open(self.path, encoding="utf-8", errors="replace") as f:
            for line in f:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if start_step > 0 and isinstance(record, dict) and record.get("step", 0) <= start_step:
                    kept.append(line.rstrip("\n") + "\n")
        with open(self.path + ".tmp", "w") as f:
            f.writelines(kept)
        os.replace(self.path + ".tmp", self.path)

    def write(self, **metrics):
        if self.path:
            with open(self.path, "a") as f:
                f.write(json.dumps(metrics) + "\n")
        if self.wandb is not None:
            step = metrics.get("step")
            self.wandb.log({k: v for k, v in metrics.items() if k != "step"},
                           step=int(step) if isinstance(step, (int, float)) else None)

    def close(self):
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None


def import_wandb(project):
    """The wandb module; an error naming the flag without it. A script that logs only at its end (eval.py) calls
    this at start, so that a missing wandb does not surface after hours of work."""
    try:
        import wandb
    except ImportError:
        raise SystemExit(f"--wandb_project={project}: wandb is not installed (pip install wandb), or leave "
                         f"--wandb_project empty to log to metrics.jsonl only") from None
    return wandb


def start_wandb(project, name, config):
    """A Weights & Biases run (wandb.init) holding the run's config."""
    values = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(vars(config))
    return import_wandb(project).init(project=project, name=name or None, config=values)


def format_eta(seconds):
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else \
        f"{seconds // 60}:{seconds % 60:02d}"
