# python -m pytest tests/test_common.py -q
"""common.py: the --key=value config every script reads, and the checkpoint helpers under every resume."""
import datetime
import errno
import json
import os
import random
import shutil
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pytest
import torch

import common
from common import (checkpoint_is_complete, claim_out_dir, latest_checkpoint, load_run_state, lr_at, make_optimizer,
                    parse_config, resume_checkpoint, sampling_copy, save_checkpoint)


@dataclass
class Demo:
    steps: int = 10
    lr: float = 1e-3
    name: str = "run"
    fast: bool = False
    mode: Literal["a", "b"] = "a"
    limit: int | None = None
    note: str | None = None


PRESETS = {"big": dict(steps=100, mode="b"), "broken": dict(mode="c")}


def test_flags_are_converted_to_each_fields_type():
    config = parse_config(Demo, PRESETS, ["--steps=3", "--lr=2e-5", "--name=x=y", "--fast=true", "--mode=b",
                                          "--limit=7", "--note=none"])
    assert (config.steps, config.lr, config.name, config.fast, config.mode) == (3, 2e-5, "x=y", True, "b")
    assert config.limit == 7 and config.note == "none"  # a string keeps "none" as text
    assert parse_config(Demo, PRESETS, ["--limit=none"]).limit is None  # a number field takes none for None
    for text, value in [("1", True), ("0", False), ("yes", True), ("no", False), ("False", False)]:
        assert parse_config(Demo, PRESETS, [f"--fast={text}"]).fast is value


@pytest.mark.parametrize("argv, message", [
    (["--stpes=3"], r"unknown config key 'stpes'; known: fast, limit, lr, mode, name, note, steps"),
    (["--steps=3.5"], r"--steps='3.5': expected int"),
    (["--lr=nan"], r"--lr='nan': expected a finite number"),
    (["--fast=maybe"], r"--fast='maybe': expected bool"),
    (["--limit=lots"], r"--limit='lots': expected int"),
    (["--mode=c"], r"--mode='c': choose one of a, b"),
    (["--preset=huge"], r"unknown preset 'huge'; known: big, broken"),
    (["--preset=broken"], r"--mode='c': choose one of a, b"),  # a preset is held to the choices too
    (["steps=3"], r"arguments are --key=value"),
])
def test_bad_flags_are_refused_naming_them(argv, message):
    with pytest.raises(SystemExit, match=message):
        parse_config(Demo, PRESETS, argv)


def test_a_preset_applies_first_and_flags_after_it_win():
    config = parse_config(Demo, PRESETS, ["--steps=5", "--preset=big"])
    assert (config.steps, config.mode) == (5, "b")


def test_check_values_names_the_flag_and_lets_none_pass():
    common.check_values(Demo(limit=None), positive=("limit", "steps"))
    with pytest.raises(SystemExit, match=r"--limit=0: must be greater than 0"):
        common.check_values(Demo(limit=0), positive=("limit",))
    with pytest.raises(SystemExit, match=r"--lr=-1.0: must be 0 or more"):
        common.check_values(Demo(lr=-1.0), non_negative=("lr",))


def test_every_scripts_choices_are_declared_once_on_its_config():
    """The choices of a flag are its Literal annotation: no second list to drift from it."""
    import eval as evaluation
    import make_traces
    import train_grpo
    import train_sft

    for module, config_class in [(train_grpo, train_grpo.Config), (train_sft, train_sft.Config),
                                 (make_traces, make_traces.Config), (evaluation, evaluation.EvalConfig)]:
        with open(module.__file__) as f:
            assert "choices=" not in f.read(), module.__name__
    with pytest.raises(SystemExit, match=r"--kl_estimator='k4': choose one of k1, k2, k3, full"):
        parse_config(train_grpo.Config, train_grpo.PRESETS, ["--kl_estimator=k4"])
    with pytest.raises(SystemExit, match=r"--parallel='none': choose one of ddp, fsdp"):
        parse_config(train_sft.Config, train_sft.PRESETS, ["--parallel=none"])


def test_every_documented_command_line_parses():
    """Each command of train_sft.py, train_grpo.py, make_traces.py or eval.py written in the READMEs or in a
    script's docstring or messages must be accepted by that script's flags as written (a reader copies them)."""
    import re

    import eval as evaluation
    import make_traces
    import train_grpo
    import train_sft

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    configs = {"train_sft": (train_sft.Config, train_sft.PRESETS),
               "train_grpo": (train_grpo.Config, train_grpo.PRESETS),
               "make_traces": (make_traces.Config, make_traces.PRESETS), "eval": (evaluation.EvalConfig, {})}
    # a command: after python or torchrun (and its own flags), or a backtick; up to a quote, backtick, &, # or the
    # line's end
    command = re.compile(r"(?:\b(?:python3?|torchrun)\b[^`'\"&#\n]*?\b|`)"
                         r"(train_sft|train_grpo|make_traces|eval)\.py([^`'\"&#\n]*)")
    found = {}
    for name in ["README.md", "experiments/README.md", "train_sft.py", "train_grpo.py", "make_traces.py", "eval.py"]:
        with open(os.path.join(root, name)) as f:
            text = f.read()
        for match in command.finditer(text):
            flags = [arg for arg in match.group(2).split() if arg.startswith("--")]
            try:
                parse_config(*configs[match.group(1)], flags)
            except SystemExit as error:
                pytest.fail(f"{name}: {match.group(0).strip()!r}: {error}")
            if flags:
                found.setdefault(name, []).append(" ".join([match.group(1) + ".py"] + flags))
    # the scan reaches the commands a reader copies: every script's docstring, README's recipes and data command
    assert {name: len(commands) >= 3 for name, commands in found.items()} == dict.fromkeys(
        ["README.md", "train_sft.py", "train_grpo.py", "make_traces.py", "eval.py"], True)
    for expected in ["train_grpo.py --preset=r1-1.5b --model=path/to/model --data=problems.jsonl --eval_data=math500",
                     "eval.py --download=true --benchmarks=gsm8k,math500,aime24,amc23 --data_dir=data",
                     "train_grpo.py --preset=r1-1.5b --model=<checkpoint> --data=<problems.jsonl>"]:
        assert any(command.startswith(expected) for command in found["README.md"]), expected


def test_a_process_group_on_cpus_is_gloo_and_waits_hours_at_a_barrier(monkeypatch):
    """A rank may wait at a barrier while another samples a long chunk: the collectives' timeout must outlast that
    (the default is 10 minutes on NCCL, 30 on gloo)."""
    for name, value in (("WORLD_SIZE", "2"), ("RANK", "1"), ("LOCAL_RANK", "1")):
        monkeypatch.setenv(name, value)
    calls = []
    monkeypatch.setattr(common.dist, "init_process_group", lambda backend, **kwargs: calls.append((backend, kwargs)))
    assert common.init_distributed("cpu") == (1, 2, torch.device("cpu"))
    [(backend, kwargs)] = calls
    assert backend == "gloo" and kwargs.get("timeout", datetime.timedelta(0)) >= datetime.timedelta(hours=1)


def test_gradient_sync_is_switched_on_ddp_and_fsdp2_models():
    """DDP reads a flag before each backward, an FSDP2 model takes a call: both must hear each micro-step's
    setting (a plain model, one process, has neither)."""
    from torch.distributed.fsdp import FSDPModule

    class DDPLike(torch.nn.Module):
        require_backward_grad_sync = True

    class FSDP2Like(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.calls = []

        def set_requires_gradient_sync(self, enabled):
            self.calls.append(enabled)

    assert hasattr(FSDPModule, "set_requires_gradient_sync")  # the fake's method is FSDP2's own
    ddp, fsdp, plain = DDPLike(), FSDP2Like(), tiny_model()
    for enabled in (False, True, False):
        for model in (ddp, fsdp, plain):
            common.set_gradient_sync(model, enabled)
        assert ddp.require_backward_grad_sync is enabled
    assert fsdp.calls == [False, True, False]


def test_activation_checkpointing_recomputes_each_block_in_the_backward():
    """--activation_checkpointing=true reaches the model: each block's forward starts again in the backward (and
    stops once it has what the backward needs, so a pre-hook counts it)."""
    for checkpointing, forwards in ((False, 1), (True, 2)):
        wrapped, model = common.wrap_model(tiny_model(), "ddp", torch.device("cpu"), checkpointing)
        calls = []
        model.model.layers[0].register_forward_pre_hook(lambda *args: calls.append(1))
        wrapped(torch.tensor([[1, 2, 3]])).sum().backward()
        assert len(calls) == forwards, checkpointing


def test_learning_rate_schedule():
    assert lr_at(0, 100, 1.0, warmup_steps=10) == pytest.approx(0.1)
    assert lr_at(9, 100, 1.0, warmup_steps=10) == pytest.approx(1.0)
    assert lr_at(99, 100, 1.0, warmup_steps=10, min_lr_ratio=0.1) == pytest.approx(0.1, abs=1e-3)
    assert lr_at(50, 100, 1.0, warmup_steps=0, min_lr_ratio=1.0) == 1.0
    # the cosine spans steps warmup..max_steps: the peak right after warmup, half way at its middle, and the floor
    # only after the last step (which still trains above it)
    assert lr_at(10, 100, 1.0, warmup_steps=10, min_lr_ratio=0.0) == 1.0
    assert lr_at(55, 100, 1.0, warmup_steps=10, min_lr_ratio=0.0) == pytest.approx(0.5, abs=1e-12)
    assert lr_at(100, 100, 1.0, warmup_steps=10, min_lr_ratio=0.1) == pytest.approx(0.1, abs=1e-12)
    assert lr_at(99, 100, 1.0, warmup_steps=10, min_lr_ratio=0.1) > 0.1 + 1e-4


def test_weight_decay_shrinks_the_matrices_only():
    """AdamW's decoupled decay, seen alone (zero gradients, so Adam's own step is 0): every weight matrix shrinks by
    lr x weight_decay, the norms and biases stay as they are."""
    model = tiny_model()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = make_optimizer(model, lr=0.1, weight_decay=0.5)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    kept = [name for name in before if "norm" in name or name.endswith("bias")]
    assert kept and len(kept) < len(before)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), before[name] * (1.0 if name in kept else 1 - 0.1 * 0.5), msg=name)


class FakeTokenizer:
    def save_pretrained(self, path):
        with open(f"{path}/tokenizer.json", "w") as f:
            f.write("{}")


def tiny_model():
    from model import ModelConfig, Transformer, init_weights

    config = ModelConfig(architecture="Qwen2ForCausalLM", vocab_size=32, hidden_size=16, intermediate_size=32,
                         qkv_bias=True, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                         max_position_embeddings=64, tie_word_embeddings=True)
    return init_weights(Transformer(config), seed=0)


def test_a_checkpoint_round_trips_weights_optimizer_and_rng(tmp_path):
    model = tiny_model()
    optimizer = make_optimizer(model, lr=1e-2, weight_decay=0.0)
    model(torch.tensor([[1, 2, 3]])).sum().backward()
    optimizer.step()
    torch.manual_seed(123)
    random.seed(123)
    np.random.seed(123)
    path = save_checkpoint(str(tmp_path), model, FakeTokenizer(), optimizer, 7, Demo(), {"loss": 1.5}, 0, 1)
    expected_draw = (torch.rand(3), random.random(), np.random.rand())
    assert path.endswith("step_000007") and checkpoint_is_complete(path)
    assert latest_checkpoint(str(tmp_path)) == path
    assert json.load(open(f"{path}/run.json"))["config"]["steps"] == 10

    from model import Transformer

    restored = Transformer.from_pretrained(path)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), restored.state_dict().values()))
    fresh_optimizer = make_optimizer(restored, lr=1e-2, weight_decay=0.0)
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)
    assert load_run_state(path, restored, fresh_optimizer, rank=0) == (7, {"loss": 1.5})
    draw = (torch.rand(3), random.random(), np.random.rand())  # every RNG continues where the run saved it
    assert torch.equal(draw[0], expected_draw[0]) and draw[1:] == expected_draw[1:]
    saved_state, loaded_state = optimizer.state_dict()["state"], fresh_optimizer.state_dict()["state"]
    assert all(torch.equal(saved_state[k]["exp_avg"], loaded_state[k]["exp_avg"]) for k in saved_state)


def test_rng_state_keeps_numpys_cached_gaussian(tmp_path):
    """numpy's legacy normal draws come in pairs, the second held back for the next call: a restored state hands
    out that held-back draw too."""
    np.random.seed(5)
    np.random.standard_normal()  # draws a pair and holds the second back
    torch.save(common.rng_state(), tmp_path / "rng.pt")
    expected = np.random.standard_normal(3)
    np.random.seed(0)
    common.set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert np.array_equal(np.random.standard_normal(3), expected)


def test_each_rank_restores_its_own_rng_state(tmp_path):
    """Rank 1 continues its own random stream, not rank 0's."""
    model = tiny_model()
    optimizer = make_optimizer(model, lr=1e-2, weight_decay=0.0)
    torch.manual_seed(0)
    path = save_checkpoint(str(tmp_path), model, FakeTokenizer(), optimizer, 2, Demo(), {}, 0, 2)
    torch.manual_seed(1)
    torch.save({"optimizer": optimizer.state_dict(), "rng": common.rng_state()}, os.path.join(path, "state_rank1.pt"))
    expected = torch.rand(3)
    torch.manual_seed(2)
    load_run_state(path, model, optimizer, rank=1)
    assert torch.equal(torch.rand(3), expected)


def test_without_a_usable_marker_the_complete_checkpoint_of_the_highest_step_is_taken(tmp_path):
    """The fallback orders by the step each run.json holds (final is the last step, whatever its name sorts
    like), skips a folder that is not complete, and a marker naming such a folder is not usable."""
    model = tiny_model()
    optimizer = make_optimizer(model, lr=1e-2, weight_decay=0.0)
    out_dir = str(tmp_path)
    for step in (2, 10):
        save_checkpoint(out_dir, model, FakeTokenizer(), optimizer, step, Demo(), {}, 0, 1)
    final = save_checkpoint(out_dir, model, FakeTokenizer(), optimizer, 12, Demo(), {}, 0, 1, name="final")
    os.remove(tmp_path / "latest")
    assert latest_checkpoint(out_dir, verbose=False) == final
    (tmp_path / "latest").write_text("final")
    weights = tmp_path / "final" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])  # a disk that filled up
    assert latest_checkpoint(out_dir, verbose=False) == os.path.join(out_dir, "step_000010")


def test_a_checkpoint_without_its_run_file_is_not_complete(tmp_path):
    model = tiny_model()
    optimizer = make_optimizer(model, lr=1e-2, weight_decay=0.0)
    path = save_checkpoint(str(tmp_path), model, FakeTokenizer(), optimizer, 1, Demo(), {}, 0, 1)
    (tmp_path / "step_000001" / "run.json").unlink()
    assert not checkpoint_is_complete(path)


def test_a_checkpoint_is_complete_only_with_every_ranks_state(tmp_path):
    """A two-process run whose second rank died before writing its state is not resumable: the fallback must skip
    it rather than hand rank 1 a file that is not there."""
    model = tiny_model()
    optimizer = make_optimizer(model, lr=1e-2, weight_decay=0.0)
    path = save_checkpoint(str(tmp_path), model, FakeTokenizer(), optimizer, 3, Demo(), {}, 0, 2)
    assert os.path.exists(os.path.join(path, "state_rank0.pt")) and not checkpoint_is_complete(path)
    shutil.copy(os.path.join(path, "state_rank0.pt"), os.path.join(path, "state_rank1.pt"))
    assert checkpoint_is_complete(path)


def test_a_checkpoint_without_its_tokenizer_or_with_a_truncated_state_is_not_complete(tmp_path):
    model = tiny_model()
    optimizer = make_optimizer(model, lr=1e-2, weight_decay=0.0)
    path = save_checkpoint(str(tmp_path), model, FakeTokenizer(), optimizer, 1, Demo(), {}, 0, 1)
    state = os.path.join(path, "state_rank0.pt")
    whole = open(state, "rb").read()
    with open(state, "wb") as f:
        f.write(whole[:-100])  # a copy cut short: the zip's closing directory is gone
    assert not checkpoint_is_complete(path)
    with open(state, "wb") as f:
        f.write(whole)
    assert checkpoint_is_complete(path)
    os.remove(os.path.join(path, "tokenizer.json"))
    assert not checkpoint_is_complete(path)


def test_a_checkpoint_missing_or_cutting_short_its_refreshed_reference_is_not_complete(tmp_path, capsys):
    """GRPO with a refreshed reference saves it in reference/; a resume that found none would silently take the
    initial model as its reference, so such a checkpoint must be skipped for an older whole one."""
    model, reference = tiny_model(), tiny_model()
    optimizer = make_optimizer(model, lr=1e-2, weight_decay=0.0)
    older = save_checkpoint(str(tmp_path), model, FakeTokenizer(), optimizer, 1, Demo(), {}, 0, 1,
                            reference=reference)
    newer = save_checkpoint(str(tmp_path), model, FakeTokenizer(), optimizer, 2, Demo(), {}, 0, 1,
                            reference=reference)
    assert checkpoint_is_complete(older) and checkpoint_is_complete(newer)
    weights = os.path.join(newer, "reference", "model.safetensors")
    whole = open(weights, "rb").read()
    with open(weights, "wb") as f:
        f.write(whole[:-8])
    assert not checkpoint_is_complete(newer)
    assert latest_checkpoint(str(tmp_path)) == older and "is not a complete checkpoint" in capsys.readouterr().out
    shutil.rmtree(os.path.join(newer, "reference"))
    assert not checkpoint_is_complete(newer)
    without = save_checkpoint(str(tmp_path), model, FakeTokenizer(), optimizer, 3, Demo(), {}, 0, 1)
    assert checkpoint_is_complete(without)  # a run that saves no reference needs none


@dataclass
class Resumable:
    out_dir: str = ""
    resume: bool = True
    steps: int = 10


def test_resume_refuses_another_number_of_processes(tmp_path):
    """Rollout seeds and data shards follow the rank: a run saved by 2 processes and resumed by 1 would silently
    see other data."""
    config = Resumable(out_dir=str(tmp_path))
    model = tiny_model()
    path = save_checkpoint(str(tmp_path), model, FakeTokenizer(), make_optimizer(model, 1e-2, 0.0), 3, config, {}, 0, 2)
    shutil.copy(os.path.join(path, "state_rank0.pt"), os.path.join(path, "state_rank1.pt"))
    assert resume_checkpoint(config, rank=0, world_size=2) == path
    with pytest.raises(SystemExit, match=r"2 processes there, 1 here"):
        resume_checkpoint(config, rank=0, world_size=1)


@dataclass
class ResumableWithANewFlag(Resumable):
    new_flag: int = 3


def test_a_checkpoint_from_before_a_flag_existed_resumes(tmp_path):
    """A flag added to the code after a run saved has no value in its checkpoint: that is no difference."""
    model = tiny_model()
    config = Resumable(out_dir=str(tmp_path))
    path = save_checkpoint(str(tmp_path), model, FakeTokenizer(), make_optimizer(model, 1e-2, 0.0), 3, config, {}, 0, 1)
    assert resume_checkpoint(ResumableWithANewFlag(out_dir=str(tmp_path)), rank=0, world_size=1) == path


def test_the_latest_marker_never_leads_out_of_out_dir(tmp_path, capsys):
    model = tiny_model()
    optimizer = make_optimizer(model, lr=1e-2, weight_decay=0.0)
    other = save_checkpoint(str(tmp_path / "other"), model, FakeTokenizer(), optimizer, 5, Demo(), {}, 0, 1)
    mine = save_checkpoint(str(tmp_path / "mine"), model, FakeTokenizer(), optimizer, 2, Demo(), {}, 0, 1)
    assert checkpoint_is_complete(other)
    (tmp_path / "mine" / "latest").write_text(os.path.join("..", "other", "step_000005"))
    assert latest_checkpoint(str(tmp_path / "mine")) == mine
    assert "not a folder of" in capsys.readouterr().out


def test_resume_with_overwrite_keeps_the_run_and_drops_only_half_saves(tmp_path):
    """--resume=true wins over --overwrite=true: the checkpoints stay, a save killed before its rename goes."""
    for name in ("step_000002", "final.tmp"):
        (tmp_path / name).mkdir()
    (tmp_path / "latest").write_text("step_000002")
    (tmp_path / "metrics.jsonl").write_text("{}\n")
    claim_out_dir(str(tmp_path), resume=True, overwrite=True).close()
    assert sorted(os.listdir(tmp_path)) == [".lock", "latest", "metrics.jsonl", "step_000002"]
    claim_out_dir(str(tmp_path), resume=False, overwrite=True).close()
    assert os.listdir(tmp_path) == [".lock"]


@pytest.mark.parametrize("code", [errno.EAGAIN, errno.EACCES])
def test_an_out_dir_locked_elsewhere_is_refused_whichever_error_the_lock_reports(tmp_path, monkeypatch, code):
    """A lock held by another process is EWOULDBLOCK (EAGAIN) from flock(2), EACCES on some systems."""
    monkeypatch.setattr(common.fcntl, "flock", lambda file, operation: (_ for _ in ()).throw(OSError(code, "held")))
    with pytest.raises(SystemExit, match="in use by another run"):
        claim_out_dir(str(tmp_path), resume=False, overwrite=False)


def test_overwrite_keeps_a_model_whose_name_only_begins_like_a_run_output(tmp_path):
    """--model=out_dir/final_sft is not inside out_dir/final: --overwrite=true removes final and keeps it."""
    for name in ("final", "final_sft"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text("{}")
    claim_out_dir(str(tmp_path), resume=False, overwrite=True, model=str(tmp_path / "final_sft")).close()
    assert sorted(os.listdir(tmp_path)) == [".lock", "final_sft"]


def test_metrics_log_keeps_the_lines_up_to_the_start_step_only(tmp_path):
    """Resumed at step 2, the lines of steps 0 (an eval before training) to 2 stay, the later ones and a torn line
    go; a run starting at step 0 (nothing was saved) begins an empty log."""
    path = tmp_path / "metrics.jsonl"
    lines = [{"step": step, "loss": 1.0 / (step + 1)} for step in range(4)]
    text = "".join(json.dumps(line) + "\n" for line in lines) + '{"step": 4, "lo'
    for start_step, kept in ((2, lines[:3]), (0, [])):
        path.write_text(text)
        common.MetricsLog(str(path), start_step=start_step).write(step=start_step + 1, loss=0.5)
        assert [json.loads(line) for line in open(path)] == kept + [{"step": start_step + 1, "loss": 0.5}]


def test_format_eta_writes_minutes_then_hours():
    seconds = [-3, 0, 59.9, 61, 3599, 3600, 3661, 90061]
    assert [common.format_eta(s) for s in seconds] == ["0:00", "0:00", "0:59", "1:01", "59:59", "1:00:00",
                                                       "1:01:01", "25:01:01"]


def test_each_process_takes_the_gpu_of_its_local_rank(monkeypatch):
    """On the second node of a two-node run, global rank 8 is local rank 0: it must take cuda:0, not cuda:8."""
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("RANK", "8")
    monkeypatch.setenv("LOCAL_RANK", "0")
    chosen = []
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    assert common.init_distributed("cuda") == (8, 1, torch.device("cuda:0"))
    assert chosen == [torch.device("cuda:0")]


def test_sampling_copy_casts_to_a_separate_model_and_leaves_the_policy_alone(tmp_path):
    """On a CPU the sampler decodes from the model itself; with a dtype (bf16 is the GPU default) from a separate
    copy holding the same weights in that dtype, so that sampling never touches the fp32 masters."""
    from conftest import write_hf_checkpoint
    from model import Transformer

    write_hf_checkpoint(tmp_path, seed=1)
    model = Transformer.from_pretrained(tmp_path)
    assert sampling_copy(model) is model and sampling_copy(model, dtype=torch.float32) is model
    copy = sampling_copy(model, dtype=torch.bfloat16)
    assert copy is not model and not copy.training
    for (name, ours), (copy_name, theirs) in zip(model.state_dict().items(), copy.state_dict().items()):
        assert name == copy_name and ours.dtype == torch.float32 and theirs.dtype == torch.bfloat16
        assert torch.equal(theirs, ours.to(torch.bfloat16)) and theirs.data_ptr() != ours.data_ptr(), name
    ids = torch.tensor([[3, 4, 5, 6]])
    with torch.no_grad():
        assert (copy(ids).float() - model(ids)).abs().max() < 0.1  # the same model, rounded to bf16
