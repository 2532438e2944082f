# python -m pytest tests/test_reliability.py -q
"""Runs that cannot be lost, mixed up or hijacked: checkpoints, out_dir, eval resume, bad flags and bad files."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import common
import eval as evaluation
import train_grpo
import tasks
import train_sft
from conftest import ROOT
from data import Tokenizer, compile_chat_template
from model import Transformer, init_weights
from tasks import DemoTask, build_demo_model

SFT = ["--max_steps=4", "--batch_size=4", "--micro_batch_size=4", "--demo_examples=64", "--eval_problems=0",
       "--warmup_steps=2", "--log_every=1", "--lr=1e-3"]
GRPO = ["--prompts_per_step=2", "--group_size=2", "--max_new_tokens=4", "--eval_problems=0", "--max_steps=1",
        "--sample_every=1000"]
EVAL = ["--benchmarks=demo", "--demo_problems=4", "--n=1", "--max_new_tokens=4", "--chunk=2"]


@pytest.fixture(scope="module")
def demo_folder(tmp_path_factory):
    return str(build_demo_model(tmp_path_factory.mktemp("demo")))


def sft(out_dir, demo_folder, *extra):
    return train_sft.main(SFT + [f"--out_dir={out_dir}", f"--model={demo_folder}"] + list(extra))


def sft_killed_at(monkeypatch, step, out_dir, demo_folder, *extra):
    """A run killed as step `step` (0-based) begins, after the steps before it were logged."""
    real_lr_at = train_sft.lr_at

    def lr_at(current, *args, **kwargs):
        if current == step:
            raise KeyboardInterrupt("killed")
        return real_lr_at(current, *args, **kwargs)

    monkeypatch.setattr(train_sft, "lr_at", lr_at)
    with pytest.raises(KeyboardInterrupt):
        sft(out_dir, demo_folder, *extra)
    monkeypatch.setattr(train_sft, "lr_at", real_lr_at)


def metric_steps(out_dir):
    return [json.loads(line)["step"] for line in open(os.path.join(out_dir, "metrics.jsonl"))]


def final_weights(out_dir):
    return load_file(os.path.join(out_dir, "final", "model.safetensors"))


def copy_model(source, destination):
    shutil.copytree(source, destination)
    return str(destination)


# --- checkpoints: no code runs on load ---------------------------------------------------------------------------


class Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return open, (self.marker, "w")


def test_a_crafted_checkpoint_runs_no_code_on_load(tmp_path):
    marker = tmp_path / "pwned"
    folder = tmp_path / "step_000001"
    folder.mkdir()
    torch.save({"optimizer": Payload(str(marker)), "rng": {}, "extra": {}}, folder / "state_rank0.pt")
    (folder / "run.json").write_text(json.dumps({"step": 1, "metrics": {}}))
    model = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match="state_rank0.pt"):
        common.load_run_state(str(folder), model, torch.optim.AdamW(model.parameters()), rank=0)
    assert not marker.exists()


def test_run_state_round_trips_under_weights_only(killed_run):
    state = torch.load(os.path.join(killed_run, "step_000001", "state_rank0.pt"), weights_only=True)
    assert set(state["rng"]) >= {"python", "numpy", "torch"}


# --- out_dir belongs to one run ----------------------------------------------------------------------------------


def test_a_fresh_run_into_a_used_out_dir_is_refused(tmp_path, demo_folder):
    sft(tmp_path, demo_folder, "--max_steps=2")
    with pytest.raises(SystemExit, match=r"--resume=true.*--overwrite=true"):
        sft(tmp_path, demo_folder, "--max_steps=2")
    with pytest.raises(SystemExit, match=r"--resume=true.*--overwrite=true"):
        train_grpo.main(GRPO + [f"--model={demo_folder}", f"--out_dir={tmp_path}"])
    sft(tmp_path, demo_folder, "--max_steps=2", "--overwrite=true")
    assert metric_steps(tmp_path) == [1, 2]  # the old run's lines are gone, not interleaved


def test_two_runs_at_once_on_one_out_dir_are_refused(tmp_path, demo_folder):
    holder = subprocess.Popen(
        [sys.executable, "-c", f"import sys; sys.path.insert(0, {ROOT!r}); import common; "
                               f"lock = common.claim_out_dir({str(tmp_path)!r}, resume=False, overwrite=False); "
                               f"print('locked', flush=True); sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(SystemExit, match=r"in use by another run"):
            sft(tmp_path, demo_folder, "--max_steps=1", "--overwrite=true")
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
    sft(tmp_path, demo_folder, "--max_steps=1", "--overwrite=true")  # the lock went with its process


def test_resume_refuses_a_changed_run_and_names_the_difference(tmp_path, demo_folder):
    sft(tmp_path, demo_folder, "--max_steps=2")
    other = copy_model(demo_folder, tmp_path / "other_model")
    with pytest.raises(SystemExit, match=r"--model"):
        sft(tmp_path, other, "--max_steps=3", "--resume=true")
    with pytest.raises(SystemExit, match=r"--lr=.*0\.001.*0\.002"):
        sft(tmp_path, demo_folder, "--max_steps=3", "--resume=true", "--lr=2e-3")
    data = tmp_path / "traces.jsonl"
    data.write_text(json.dumps({"prompt": "Ava has 3 pens.", "completion": "3"}) + "\n")
    with pytest.raises(SystemExit, match=r"--data"):
        sft(tmp_path, demo_folder, "--max_steps=3", "--resume=true", f"--data={data}")
    sft(tmp_path, demo_folder, "--max_steps=3", "--resume=true", "--log_every=5")  # logging may change
    assert metric_steps(tmp_path) == [1, 2, 3]


# --- resume is exact and clean -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def straight_run(demo_folder, tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("straight")
    sft(out_dir, demo_folder)
    return out_dir


@pytest.fixture(scope="module")
def killed_run(demo_folder, tmp_path_factory):
    """Checkpoints after steps 1, 2 and 3, killed as step 4 logged half a line."""
    out_dir = tmp_path_factory.mktemp("killed")
    with pytest.MonkeyPatch.context() as monkeypatch:
        sft_killed_at(monkeypatch, 3, out_dir, demo_folder, "--save_every=1")
    with open(out_dir / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "lo')
    return out_dir


@pytest.mark.parametrize("damage", ["empty latest", "missing latest", "unreadable latest", "truncated newest"])
def test_resume_falls_back_to_the_newest_complete_checkpoint(tmp_path, demo_folder, straight_run, killed_run, capsys,
                                                             damage):
    split = tmp_path / "split"
    shutil.copytree(killed_run, split)
    assert (split / "latest").read_text() == "step_000003"
    if damage == "empty latest":
        (split / "latest").write_text("")
    elif damage == "missing latest":
        (split / "latest").unlink()
    elif damage == "unreadable latest":
        (split / "latest").write_bytes(b"\xff\xfe../../etc")
    else:
        weights = split / "step_000003" / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:-100])
    sft(split, demo_folder, "--save_every=1", "--resume=true")
    expected = "step_000002" if damage == "truncated newest" else "step_000003"
    out = capsys.readouterr().out
    assert f"resuming from the newest complete checkpoint, {split / expected}" in out
    assert f"resuming at step {expected[-1]}" in out
    straight, resumed = final_weights(straight_run), final_weights(split)
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    # each step logged once: the torn line is gone, and the steps replayed after step 2 are not doubled
    losses = lambda folder: [json.loads(line)["loss"] for line in open(folder / "metrics.jsonl")]
    assert metric_steps(split) == [1, 2, 3, 4] and losses(split) == losses(straight_run)


def test_resume_removes_stale_tmp_folders_and_replaces_latest_whole(tmp_path, demo_folder, killed_run, monkeypatch):
    shutil.copytree(killed_run, tmp_path, dirs_exist_ok=True)
    (tmp_path / "step_000009.tmp").mkdir()  # a save killed before its rename
    (tmp_path / "final.tmp").mkdir()  # ... with a file the next save of that folder must not inherit
    (tmp_path / "final.tmp" / "state_rank1.pt").write_bytes(b"stale")
    replaced, real_replace = [], os.replace
    monkeypatch.setattr(common.os, "replace", lambda src, dst: replaced.append((os.path.basename(src),
                                                                                os.path.basename(dst)))
                        or real_replace(src, dst))
    sft(tmp_path, demo_folder, "--save_every=1", "--resume=true")
    assert not list(tmp_path.glob("*.tmp"))
    assert not (tmp_path / "final" / "state_rank1.pt").exists()
    assert ("latest.tmp", "latest") in replaced and (tmp_path / "latest").read_text() == "final"


# --- eval resume ----------------------------------------------------------------------------------------------------


def killed_evaluate(monkeypatch, model, tokenizer, problems, kwargs, die_on_call):
    calls, real_generate = [], tasks.generate

    def generate(*args, **kw):
        calls.append(1)
        if len(calls) == die_on_call:
            raise KeyboardInterrupt("killed")
        return real_generate(*args, **kw)

    monkeypatch.setattr(tasks, "generate", generate)
    with pytest.raises(KeyboardInterrupt):
        tasks.evaluate(model, tokenizer, DemoTask(), problems, **kwargs)
    monkeypatch.setattr(tasks, "generate", lambda *a, **kw: calls.append(1) or real_generate(*a, **kw))
    calls.clear()
    return calls


def test_eval_resume_never_reuses_another_models_completions(tmp_path, demo_folder, monkeypatch):
    folder = copy_model(demo_folder, tmp_path / "model")
    problems = DemoTask(test_size=6).test_problems()
    kwargs = dict(n=1, temperature=0, max_new_tokens=6, instruction="none", show_progress=False, chunk=2,
                  partial_file=str(tmp_path / "partial.jsonl"))
    calls = killed_evaluate(monkeypatch, Transformer.from_pretrained(folder), Tokenizer.from_pretrained(folder),
                            problems, kwargs, die_on_call=2)
    init_weights(Transformer.from_pretrained(folder), seed=1).save_pretrained(folder)  # new weights, same path
    tasks.evaluate(Transformer.from_pretrained(folder), Tokenizer.from_pretrained(folder), DemoTask(), problems, **kwargs)
    assert len(calls) == 3  # every problem sampled again


def test_a_finished_benchmark_survives_a_later_kill(tmp_path, demo_folder, monkeypatch):
    data = tmp_path / "data" / "gsm8k"
    data.mkdir(parents=True)
    (data / "test.jsonl").write_text("".join(json.dumps({"question": f"What is {i}+1?", "answer": f"#### {i + 1}"})
                                             + "\n" for i in range(4)))
    args = EVAL + [f"--model={demo_folder}", "--benchmarks=demo,gsm8k", f"--data_dir={tmp_path / 'data'}",
                   f"--out_dir={tmp_path / 'out'}"]
    calls, real_generate = [], tasks.generate

    def generate(*a, **kw):
        calls.append(1)
        if len(calls) == 3:  # the first chunk of gsm8k
            raise KeyboardInterrupt("killed")
        return real_generate(*a, **kw)

    monkeypatch.setattr(tasks, "generate", generate)
    with pytest.raises(KeyboardInterrupt):
        evaluation.main(args)
    assert set(json.loads((tmp_path / "out" / "results.json").read_text())["results"]) == {"demo"}
    monkeypatch.setattr(tasks, "generate", lambda *a, **kw: calls.append(1) or real_generate(*a, **kw))
    calls.clear()
    results = evaluation.main(args)
    assert len(calls) == 2 and set(results) == {"demo", "gsm8k"}  # only gsm8k was sampled
    assert not list((tmp_path / "out").glob("partial_*"))


def test_a_torn_last_line_of_a_partial_file_is_dropped(tmp_path, demo_folder, monkeypatch, capsys):
    model, tokenizer = Transformer.from_pretrained(demo_folder), Tokenizer.from_pretrained(demo_folder)
    problems = DemoTask(test_size=6).test_problems()
    partial = tmp_path / "partial.jsonl"
    kwargs = dict(n=1, temperature=0, max_new_tokens=6, instruction="none", show_progress=False, chunk=2,
                  partial_file=str(partial))
    calls = killed_evaluate(monkeypatch, model, tokenizer, problems, kwargs, die_on_call=2)
    with open(partial, "a") as f:
        f.write('{"id": "demo-2", "samp')
    records = tasks.evaluate(model, tokenizer, DemoTask(), problems, **kwargs, keep_partial=True)
    assert len(calls) == 2 and [r["id"] for r in records] == [p["id"] for p in problems]
    assert "partial.jsonl" in capsys.readouterr().err
    assert [json.loads(line)["id"] for line in open(partial)] == [p["id"] for p in problems]  # appended cleanly


def test_eval_of_non_finite_weights_stops(tmp_path, demo_folder):
    folder = copy_model(demo_folder, tmp_path / "model")
    model = Transformer.from_pretrained(folder)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, 0] = float("nan")
    model.save_pretrained(folder)
    with pytest.raises(SystemExit, match=r"model\.layers\.1\.mlp\.down_proj\.weight.*not finite"):
        evaluation.main(EVAL + [f"--model={folder}", f"--out_dir={tmp_path / 'out'}"])


# --- numbers that make no sense are refused at start ----------------------------------------------------------------

BAD_FLAGS = [
    (train_sft, "--batch_size=0"), (train_sft, "--micro_batch_size=-1"), (train_sft, "--max_steps=0"),
    (train_sft, "--save_every=0"), (train_sft, "--log_every=0"), (train_sft, "--eval_every=-1"),
    (train_sft, "--lr=nan"), (train_sft, "--grad_clip=inf"), (train_sft, "--parallel=foo"), (train_sft, "--pack=maybe"),
    (train_sft, "--max_seq_len=0"), (train_sft, "--warmup_steps=-1"), (train_sft, "--demo_examples=0"),
    (train_grpo, "--mu=0"), (train_grpo, "--prompts_per_step=0"), (train_grpo, "--micro_batch_size=0"),
    (train_grpo, "--save_every=0"), (train_grpo, "--log_every=-2"), (train_grpo, "--max_new_tokens=0"),
    (train_grpo, "--temperature=nan"), (train_grpo, "--max_steps=-1"), (train_grpo, "--top_p=1.5"),
    (evaluation, "--n=0"), (evaluation, "--chunk=0"), (evaluation, "--limit=-1"), (evaluation, "--benchmarks=,"),
    (evaluation, "--benchmarks=demo,gsm9k"), (evaluation, "--temperature=inf"), (evaluation, "--dtype=fp8"),
]


@pytest.mark.parametrize("module, flag", BAD_FLAGS, ids=[f"{m.__name__}{f}" for m, f in BAD_FLAGS])
def test_senseless_numbers_are_refused_naming_the_flag(tmp_path, demo_folder, module, flag):
    base = {train_sft: SFT, train_grpo: GRPO, evaluation: EVAL}[module]
    with pytest.raises(SystemExit, match="^" + flag.split("=")[0] + "="):
        module.main(base + [f"--model={demo_folder}", f"--out_dir={tmp_path}", flag])
    assert not os.listdir(tmp_path)  # refused before anything was written


# --- files that are not what they claim ----------------------------------------------------------------------------


@pytest.mark.parametrize("damage, message", [
    ("truncated safetensors", r"model\.safetensors.*(truncated|not a complete)"),
    ("garbage safetensors", r"model\.safetensors"),
    ("config not json", r"config\.json: not valid JSON"),
    ("config lacks a field", r"config\.json: field 'hidden_size' is missing"),
    ("no tokenizer.json", r"tokenizer\.json is missing"),
    ("tokenizer_config not json", r"tokenizer_config\.json: not valid JSON"),
])
def test_a_broken_model_folder_names_the_file(tmp_path, demo_folder, damage, message):
    folder = tmp_path / "model"
    copy_model(demo_folder, folder)
    if damage == "truncated safetensors":
        weights = (folder / "model.safetensors").read_bytes()
        (folder / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    elif damage == "garbage safetensors":
        (folder / "model.safetensors").write_bytes(b"\x00" * 64)
    elif damage == "config not json":
        (folder / "config.json").write_text('{"hidden_size": 1')
    elif damage == "config lacks a field":
        config = json.loads((folder / "config.json").read_text())
        del config["hidden_size"]
        (folder / "config.json").write_text(json.dumps(config))
    elif damage == "no tokenizer.json":
        (folder / "tokenizer.json").unlink()
    else:
        (folder / "tokenizer_config.json").write_text("{")
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        Transformer.from_pretrained(folder)
        Tokenizer.from_pretrained(folder)


@pytest.mark.parametrize("module", [train_sft, train_grpo])
@pytest.mark.parametrize("content, message", [
    ("directory", r"is a directory"),
    (b"", r"empty"),
    (b"\n\n", r"empty"),
    (b'{"prompt": "caf\xe9"}\n', r"not UTF-8"),
])
def test_a_bad_data_file_names_the_file(tmp_path, demo_folder, module, content, message):
    data = tmp_path / "data.jsonl"
    if content == "directory":
        data.mkdir()
    else:
        data.write_bytes(content)
    base = SFT if module is train_sft else GRPO
    with pytest.raises(ValueError, match=f"{data}.*{message}"):
        module.main(base + [f"--model={demo_folder}", f"--out_dir={tmp_path / 'out'}", f"--data={data}"])


def test_a_chat_template_that_renders_too_much_is_refused(demo_folder):
    tokenizer = Tokenizer.from_pretrained(demo_folder)
    tokenizer._template = compile_chat_template(
        "{% for i in range(20000) %}{% for j in range(100) %}xxxxxxxxxx{% endfor %}{% endfor %}")
    with pytest.raises(ValueError, match=r"chat template.*MB"):
        tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])


def test_overwrite_never_deletes_the_model_it_is_about_to_load(tmp_path):
    import common

    out_dir = tmp_path / "run"
    (out_dir / "final").mkdir(parents=True)
    (out_dir / "final" / "config.json").write_text("{}")
    with pytest.raises(SystemExit, match="would delete .*final, which holds --model"):
        common.claim_out_dir(str(out_dir), resume=False, overwrite=True, model=str(out_dir / "final"))
    assert (out_dir / "final" / "config.json").exists()
    common.claim_out_dir(str(out_dir), resume=False, overwrite=True, model=str(tmp_path / "elsewhere")).close()
    assert not (out_dir / "final").exists()
