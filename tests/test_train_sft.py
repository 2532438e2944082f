# python -m pytest tests/test_train_sft.py -q
import json
import math
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, record_update_grad_norms
from data import Tokenizer
from tasks import build_demo_model
from model import Transformer, sequence_logprobs, to_hf_state
import train_sft

TINY = ["--max_steps=4", "--batch_size=8", "--micro_batch_size=4", "--demo_examples=64", "--eval_problems=0",
        "--warmup_steps=2", "--log_every=1", "--lr=1e-3"]


def run(out_dir, *extra):
    return train_sft.main(TINY + [f"--out_dir={out_dir}"] + list(extra))


def weights(path):
    return load_file(os.path.join(path, "model.safetensors"))


def torchrun(nproc, args, cwd):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               os.path.join(ROOT, "train_sft.py")] + args
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.fixture(scope="module")
def demo_folder(tmp_path_factory):
    return build_demo_model(tmp_path_factory.mktemp("demo"))


def test_packed_and_padded_batches_give_the_same_loss_and_gradients(demo_folder):
    tokenizer = Tokenizer.from_pretrained(demo_folder)
    examples = train_sft.load_examples(train_sft.parse_config(train_sft.Config, {}, ["--demo_examples=5"]),
                                       tokenizer, rank=0)
    results = []
    for pack in (True, False):
        model = Transformer.from_pretrained(demo_folder)
        batch = train_sft.make_batch(examples, pack, tokenizer.pad_token_id, torch.device("cpu"))
        if pack:  # positions restart with each document, as in its own row
            assert batch["position_ids"][0].tolist() == [i for ids, _ in examples for i in range(len(ids))]
        logprobs = sequence_logprobs(model, batch["input_ids"], batch["position_ids"], batch["cu_seqlens"])
        loss = -(logprobs * batch["loss_mask"]).sum() / batch["loss_mask"].sum()
        loss.backward()
        results.append((loss.item(), torch.cat([p.grad.flatten() for p in model.parameters()])))
    assert abs(results[0][0] - results[1][0]) < 1e-5
    assert torch.allclose(results[0][1], results[1][1], atol=1e-6)


def test_loss_mask_covers_completion_tokens_only(demo_folder):
    tokenizer = Tokenizer.from_pretrained(demo_folder)
    examples = train_sft.load_examples(train_sft.parse_config(train_sft.Config, {}, ["--demo_examples=3"]),
                                       tokenizer, rank=0)
    for ids, mask in examples:
        completion = tokenizer.decode([t for t, m in zip(ids, mask) if m])
        assert completion.startswith("<think>") and completion.endswith("}<|im_end|>")
        assert "How many" in tokenizer.decode([t for t, m in zip(ids, mask) if not m])


def test_demo_training_examples_are_never_held_out_problems(demo_folder):
    """The held-out accuracy measures generalisation only if SFT never trained on those problems."""
    from tasks import DemoTask, is_demo_heldout

    tokenizer = Tokenizer.from_pretrained(demo_folder)
    prompts, real_encode_chat = [], tokenizer.encode_chat
    tokenizer.encode_chat = lambda messages, completion: prompts.append(messages[-1]["content"]) or \
        real_encode_chat(messages, completion)
    train_sft.load_examples(train_sft.parse_config(train_sft.Config, {}, ["--demo_examples=300"]), tokenizer, rank=0)
    assert len(set(prompts)) == 300 and not any(is_demo_heldout(prompt) for prompt in prompts)
    assert not set(prompts) & {p["problem"] for p in DemoTask(test_size=500).test_problems()}


def test_accumulated_gradients_are_the_global_mean_and_tokens_count_every_rank(demo_folder):
    """One rank of two, two micro-batches: the gradient is that of the completion tokens' summed NLL x 2 ranks / the
    global batch's completion tokens (DDP then averages over the ranks), against transformers in float64; the
    tokens it ran, padding included, are counted for both ranks (the logged tokens/s is the job's)."""
    import transformers

    tokenizer = Tokenizer.from_pretrained(demo_folder)
    examples = train_sft.load_examples(train_sft.parse_config(train_sft.Config, {}, ["--demo_examples=4"]),
                                       tokenizer, rank=0)
    global_tokens = 2 * sum(sum(mask) for _, mask in examples)  # the other rank's batch is as large
    model = Transformer.from_pretrained(demo_folder)
    micro_batches = [examples[:2], examples[2:]]
    loss_sum, tokens = train_sft.accumulate_gradients(model, micro_batches, False, tokenizer.pad_token_id,
                                                      global_tokens, 2, torch.device("cpu"))
    assert tokens == 2 * sum(len(batch) * max(len(ids) for ids, _ in batch) for batch in micro_batches)
    reference = transformers.AutoModelForCausalLM.from_pretrained(demo_folder, dtype=torch.float64)
    nll = 0.0
    for ids, mask in examples:
        logprobs = torch.log_softmax(reference(torch.tensor([ids])).logits[0, :-1], dim=-1)
        nll = nll - (logprobs.gather(1, torch.tensor(ids[1:])[:, None])[:, 0] * torch.tensor(mask[1:])).sum()
    (nll * 2 / global_tokens).backward()
    assert loss_sum == pytest.approx(nll.item(), rel=1e-5)
    theirs = dict(reference.named_parameters())
    ours = to_hf_state({name: p.grad for name, p in model.named_parameters()}, model.config)
    assert ours.keys() == theirs.keys()
    for name, grad in ours.items():
        expected = theirs[name].grad
        assert (grad.double() - expected).abs().max() <= 1e-4 * expected.abs().max(), name


def test_tiny_run_loss_falls_and_matches_golden_losses(tmp_path):
    run(tmp_path, "--max_steps=12")
    losses = [json.loads(line)["loss"] for line in open(tmp_path / "metrics.jsonl")]
    assert losses[-1] < losses[0] - 0.5
    with open(os.path.join(ROOT, "tests", "assets", "sft_golden_losses.json")) as f:
        golden = json.load(f)
    assert losses[: len(golden)] == pytest.approx(golden, rel=2e-3)
    final, init = weights(tmp_path / "final"), weights(tmp_path / "init")  # the trained model, every tensor
    assert final.keys() == init.keys() and all(final[k].shape == init[k].shape for k in init)
    assert all(not torch.equal(final[k], init[k]) for k in init)


def test_each_epoch_visits_every_example_once_in_a_new_order():
    steps = [train_sft.step_examples(step, 4, 8, seed=0) for step in range(4)]  # two epochs of two steps
    first, second = steps[0] + steps[1], steps[2] + steps[3]
    assert sorted(first) == sorted(second) == list(range(8)) and first != second
    # a step across an epoch's end takes its last examples, then the next epoch's first: one stream of examples,
    # whatever the batch size
    one_at_a_time = [train_sft.step_examples(position, 1, 6, seed=0)[0] for position in range(12)]
    assert train_sft.step_examples(1, 4, 6, seed=0) == one_at_a_time[4:8]
    assert sorted(one_at_a_time[:6]) == sorted(one_at_a_time[6:]) == list(range(6))


def test_max_seq_len_keeps_an_example_of_exactly_that_length(demo_folder):
    tokenizer = Tokenizer.from_pretrained(demo_folder)
    config = train_sft.parse_config(train_sft.Config, {}, ["--demo_examples=4"])
    examples = train_sft.load_examples(config, tokenizer, rank=0)
    longest = max(len(ids) for ids, _ in examples)
    config.max_seq_len = longest
    assert len(train_sft.load_examples(config, tokenizer, rank=0)) == 4
    config.max_seq_len = longest - 1
    kept = train_sft.load_examples(config, tokenizer, rank=0)
    assert len(kept) == sum(len(ids) < longest for ids, _ in examples) and len(kept) < 4


def test_the_update_sees_gradients_clipped_to_grad_clip(tmp_path, monkeypatch):
    """The logged grad norm is the one before clipping; the optimizer must step on the clipped gradients."""
    seen = record_update_grad_norms(monkeypatch, train_sft)
    run(tmp_path, "--max_steps=3", "--grad_clip=0.5")
    logged = [json.loads(line)["grad_norm"] for line in open(tmp_path / "metrics.jsonl")]
    assert len(seen) == 3 and all(norm > 0.5 for norm in logged)  # every step clips at this setting
    assert seen == pytest.approx([0.5] * 3, rel=1e-3)


def test_every_parameter_group_steps_at_the_scheduled_learning_rate(tmp_path, monkeypatch):
    """Linear warmup over --warmup_steps, then a cosine from --lr down to --lr x --min_lr_ratio over the remaining
    steps: the rate each update uses, in both parameter groups (matrices, and the norms and biases), and logs."""
    rates, real_make_optimizer = [], train_sft.make_optimizer

    def recording_optimizer(model, *args, **kwargs):
        optimizer = real_make_optimizer(model, *args, **kwargs)
        real_step = optimizer.step
        optimizer.step = lambda *a, **k: rates.append([g["lr"] for g in optimizer.param_groups]) or real_step(*a, **k)
        return optimizer

    monkeypatch.setattr(train_sft, "make_optimizer", recording_optimizer)
    run(tmp_path, "--max_steps=5", "--warmup_steps=1", "--lr=0.002", "--min_lr_ratio=0")
    # step 0 warms up to the peak, steps 1 to 4 are the cosine at 0, 1/4, 2/4 and 3/4 of its way down to 0
    expected = [0.002] + [0.002 * 0.5 * (1 + math.cos(math.pi * k / 4)) for k in range(4)]
    assert rates == [[pytest.approx(lr, rel=1e-12)] * 2 for lr in expected]
    logged = [json.loads(line)["lr"] for line in open(tmp_path / "metrics.jsonl")]
    assert logged == pytest.approx(expected, rel=1e-12)


def test_checkpoints_every_save_every_steps_and_the_last_one_as_final_only(tmp_path):
    run(tmp_path, "--save_every=2")
    assert sorted(path.name for path in tmp_path.glob("step_*")) == ["step_000002"]
    assert (tmp_path / "latest").read_text() == "final"


def test_only_the_last_micro_step_of_each_update_syncs_gradients(tmp_path, monkeypatch):
    """Gradients are all-reduced once per optimizer step, on the backward of its last micro-batch: one synced earlier
    leaves the later micro-batches' gradients unsynced (ranks drift apart). Batches of 8 in micro-batches of 2."""
    flags = []
    monkeypatch.setattr(train_sft, "set_gradient_sync", lambda wrapped, enabled: flags.append(enabled))
    run(tmp_path, "--max_steps=2", "--micro_batch_size=2")
    assert flags == [False, False, False, True] * 2


def test_a_non_finite_gradient_stops_before_the_update_and_saves_nothing(tmp_path, monkeypatch):
    real_accumulate = train_sft.accumulate_gradients

    def accumulate_then_overflow(wrapped, *args):
        result = real_accumulate(wrapped, *args)
        next(wrapped.parameters()).grad[0, 0] = float("inf")  # the loss stays finite, one gradient does not
        return result

    monkeypatch.setattr(train_sft, "accumulate_gradients", accumulate_then_overflow)
    with pytest.raises(SystemExit, match=r"step 0: .*grad norm inf is not finite"):
        run(tmp_path, "--max_steps=1")
    assert not (tmp_path / "final").exists() and not list(tmp_path.glob("step_*"))


def test_the_last_step_evaluates_when_eval_every_is_off(tmp_path):
    metrics = run(tmp_path, "--max_steps=2", "--eval_problems=4", "--eval_every=0", "--eval_max_new_tokens=8")
    lines = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert "heldout_accuracy" not in lines[0] and "heldout_accuracy" in lines[-1] and "heldout_accuracy" in metrics


def test_resume_gives_the_same_weights_as_a_straight_run(tmp_path, monkeypatch):
    """...and it did resume: each step is in the metrics once and the step loaded is the step saved."""
    loaded = []
    original = train_sft.load_run_state
    monkeypatch.setattr(train_sft, "load_run_state", lambda *args: loaded.append(original(*args)) or loaded[-1])
    run(tmp_path / "straight")
    run(tmp_path / "split", "--max_steps=2")
    run(tmp_path / "split", "--resume=true")
    assert [result[0] for result in loaded] == [2]
    assert [json.loads(line)["step"] for line in open(tmp_path / "split" / "metrics.jsonl")] == [1, 2, 3, 4]
    straight, resumed = weights(tmp_path / "straight" / "final"), weights(tmp_path / "split" / "final")
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


def test_malformed_jsonl_names_file_and_line(tmp_path, demo_folder):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "1+1?", "completion": "2"}\n{"prompt": "2+2?"\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: not valid JSON"):
        run(tmp_path / "out", f"--data={bad}", f"--model={demo_folder}")
    missing = tmp_path / "missing.jsonl"
    missing.write_text('{"prompt": "1+1?", "completion": "2"}\n{"prompt": "2+2?", "answer": 4}\n')
    with pytest.raises(ValueError, match=r"missing.jsonl:2: field 'completion'"):
        run(tmp_path / "out", f"--data={missing}", f"--model={demo_folder}")


def test_jsonl_formats_train(tmp_path, demo_folder):
    data = tmp_path / "traces.jsonl"
    rows = [{"prompt": "Ava has 3 pens. How many?", "completion": "<think>\n3\n</think>\n\n\\boxed{3}"},
            {"messages": [{"role": "user", "content": "Ben has 2 eggs."}, {"role": "assistant", "content": "2"}]},
            {"problem": "Cleo has 5 cards.", "reasoning": "5", "answer": "5"}] * 4
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    tokenizer = Tokenizer.from_pretrained(demo_folder)
    config = train_sft.parse_config(train_sft.Config, {}, [f"--data={data}"])
    examples = train_sft.load_examples(config, tokenizer, rank=0)
    completions = [tokenizer.decode([t for t, m in zip(ids, mask) if m]) for ids, mask in examples[:3]]
    assert completions == ["<think>\n3\n</think>\n\n\\boxed{3}<|im_end|>", "2<|im_end|>",
                           "<think>\n5\n</think>\n\n\\boxed{5}<|im_end|>"]
    run(tmp_path / "out", f"--data={data}", f"--model={demo_folder}", "--max_steps=1", "--batch_size=12",
        "--micro_batch_size=12")
    # the first step's loss is the untrained model's mean NLL of exactly those completion tokens
    batch = train_sft.make_batch(examples, False, tokenizer.pad_token_id, torch.device("cpu"))
    with torch.no_grad():
        logprobs = sequence_logprobs(Transformer.from_pretrained(demo_folder), batch["input_ids"])
    expected = -(logprobs * batch["loss_mask"]).sum() / batch["loss_mask"].sum()
    logged = json.loads(open(tmp_path / "out" / "metrics.jsonl").readline())["loss"]
    assert logged == pytest.approx(expected.item(), rel=1e-5)


def test_two_process_ddp_equals_one_process(tmp_path):
    args = TINY + ["--max_steps=2", "--micro_batch_size=2"]
    torchrun(1, args + [f"--out_dir={tmp_path / 'one'}", "--parallel=ddp"], tmp_path)
    torchrun(2, args + [f"--out_dir={tmp_path / 'two'}", "--parallel=ddp"], tmp_path)
    for a, b in zip(*[[json.loads(line) for line in open(tmp_path / run / "metrics.jsonl")] for run in ("one", "two")],
                    strict=True):  # Adam and clipping hide a gradient scaled by a constant; the logged norm does not
        assert (a["loss"], a["grad_norm"]) == pytest.approx((b["loss"], b["grad_norm"]), rel=1e-5)
    one, two = weights(tmp_path / "one" / "final"), weights(tmp_path / "two" / "final")
    for name in one:
        assert torch.allclose(one[name], two[name], atol=2e-5), name  # Adam amplifies summation-order noise


@pytest.mark.slow
def test_fsdp_two_processes_with_eval_and_resume_equal_one_process(tmp_path):
    """FSDP on 2 processes with the held-out eval on (a gathered copy of the weights on every rank) and a resume
    (every rank's optimizer state), against one process; greedy evals score the same on any number of ranks."""
    args = ["--micro_batch_size=2", "--eval_problems=4", "--eval_temperature=0", "--eval_every=2"]
    run(tmp_path / "one", *args)
    two = TINY + args + [f"--out_dir={tmp_path / 'two'}", "--parallel=fsdp"]
    torchrun(2, two + ["--max_steps=2"], tmp_path)
    torchrun(2, two + ["--resume=true"], tmp_path)
    one_lines = [json.loads(line) for line in open(tmp_path / "one" / "metrics.jsonl")]
    two_lines = [json.loads(line) for line in open(tmp_path / "two" / "metrics.jsonl")]
    assert [m["step"] for m in two_lines] == [1, 2, 3, 4]  # each step once: the second run resumed at step 2
    for a, b in zip(one_lines, two_lines, strict=True):
        assert (a["loss"], a["grad_norm"]) == pytest.approx((b["loss"], b["grad_norm"]), rel=1e-5)
        assert a.get("heldout_accuracy") == b.get("heldout_accuracy")
    assert "heldout_accuracy" in two_lines[1] and "heldout_accuracy" in two_lines[3]  # both runs evaluated
    one, two = weights(tmp_path / "one" / "final"), weights(tmp_path / "two" / "final")
    for name in one:
        assert torch.allclose(one[name], two[name], atol=2e-5), name
