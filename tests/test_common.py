# python -m pytest tests/test_common.py -q
"""common.py: the --key=value config every script reads, and the checkpoint helpers under every resume."""
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
