# python -m pytest tests/test_train_grpo.py -q
import faulthandler
import itertools
import math
import json
import os
import types
import zlib

import pytest
import torch

import train_grpo
from conftest import record_update_grad_norms
from tasks import overlong_penalty
from train_grpo import Config, Sample, group_advantages, kl_estimate, policy_loss


def config(**overrides):
    return types.SimpleNamespace(**{**Config().__dict__, **overrides})


# --- the loss against a per-token loop written from the formulas --------------------------------------------


def loop_loss(logprobs, old_logprobs, advantages, mask, cfg, ref_logprobs=None):
    """GRPO/PPO-clip, one token at a time: -min(r A, clip(r, 1-eps_low, 1+eps_high) A) + beta * KL."""
    B, T = logprobs.shape
    sequence_terms, all_terms = [], []
    for b in range(B):
        terms = []
        for t in range(T):
            if not mask[b, t]:
                continue
            ratio = torch.exp(logprobs[b, t] - old_logprobs[b, t])
            clipped = min(max(ratio, torch.tensor(1 - cfg.eps_low)), torch.tensor(1 + cfg.eps_high))
            term = -torch.minimum(ratio * advantages[b], clipped * advantages[b])
            if ref_logprobs is not None:
                r = logprobs[b, t] - ref_logprobs[b, t]
                w = torch.exp(-r)
                kl = {("reverse", "k1"): r, ("reverse", "k2"): r * r / 2, ("reverse", "k3"): w - 1 + r,
                      ("forward", "k1"): w * torch.log(w), ("forward", "k2"): w * torch.log(w) ** 2 / 2,
                      ("forward", "k3"): w * torch.log(w) - w + 1}[(cfg.kl_direction, cfg.kl_estimator)]
                term = term + cfg.beta * kl
            terms.append(term)
        sequence_terms.append(sum(terms) / len(terms))
        all_terms += terms
    if cfg.loss_agg == "seq-mean-token-mean":
        return sum(sequence_terms) / B
    if cfg.loss_agg == "token-mean":
        return sum(all_terms) / len(all_terms)
    return sum(all_terms) / (B * cfg.max_new_tokens)


LOSS_SETTINGS = list(itertools.product(
    ["seq-mean-token-mean", "token-mean", "seq-mean-token-sum-norm"], [(0.2, 0.2), (0.2, 0.28), (0.05, 0.05)],
    [None, ("reverse", "k1"), ("reverse", "k2"), ("reverse", "k3"), ("forward", "k1"), ("forward", "k2"),
     ("forward", "k3")]))


@pytest.mark.parametrize("loss_agg, eps, kl", LOSS_SETTINGS)
def test_policy_loss_matches_per_token_loop(loss_agg, eps, kl):
    generator = torch.Generator().manual_seed(0)
    B, T = 4, 7
    logits = torch.randn(B, T, generator=generator) * 0.3
    old = -1 - torch.rand(B, T, generator=generator)
    ref = -1 - torch.rand(B, T, generator=generator)
    advantages = torch.tensor([1.0, -0.5, 0.0, 2.0])
    mask = torch.ones(B, T, dtype=torch.long)
    mask[0, 5:] = 0
    mask[2, :3] = 0
    cfg = config(loss_agg=loss_agg, eps_low=eps[0], eps_high=eps[1], beta=0.1 if kl else 0.0, max_new_tokens=9,
                 kl_direction=kl[0] if kl else "reverse", kl_estimator=kl[1] if kl else "k3")
    grads = []
    for implementation in ("ours", "loop"):
        x = logits.clone().requires_grad_(True)
        logprobs = old + x  # ratios between about 0.4 and 2.5, so both clips are exercised
        if implementation == "ours":
            kl_values = kl_estimate(logprobs, ref, cfg.kl_estimator, cfg.kl_direction) if kl else None
            loss, _ = policy_loss(logprobs, old, advantages, mask, B, int(mask.sum()), cfg.eps_low, cfg.eps_high,
                                  cfg.loss_agg, cfg.max_new_tokens, kl=kl_values, beta=cfg.beta)
        else:
            loss = loop_loss(logprobs, old, advantages, mask, cfg, ref if kl else None)
        loss.backward()
        grads.append((loss.item(), x.grad.clone()))
    assert grads[0][0] == pytest.approx(grads[1][0], rel=1e-5, abs=1e-7)
    assert torch.allclose(grads[0][1], grads[1][1], atol=1e-6)


def test_clip_fractions_count_only_active_clips():
    cfg = config(eps_low=0.2, eps_high=0.2)
    old = torch.zeros(2, 2)
    logprobs = torch.log(torch.tensor([[1.5, 0.5], [1.5, 0.5]]))
    _, clip = policy_loss(logprobs, old, torch.tensor([1.0, -1.0]), torch.ones(2, 2), 2, 4, cfg.eps_low, cfg.eps_high,
                          cfg.loss_agg, cfg.max_new_tokens)
    assert clip == {"clip_low": 1, "clip_high": 1}  # ratio 1.5 with A>0 and ratio 0.5 with A<0


def test_clip_fractions_count_each_side_against_its_own_eps():
    """DAPO's clip-higher: eps_high 0.28 > eps_low 0.2, so a ratio of 1.25 with A > 0 is inside the range."""
    old = torch.zeros(1, 1)
    for ratio, advantage, expected in [(1.25, 1.0, {"clip_low": 0, "clip_high": 0}),
                                       (1.3, 1.0, {"clip_low": 0, "clip_high": 1}),
                                       (0.75, -1.0, {"clip_low": 1, "clip_high": 0})]:
        _, clip = policy_loss(torch.log(torch.tensor([[ratio]])), old, torch.tensor([advantage]), torch.ones(1, 1), 1,
                              1, 0.2, 0.28, "token-mean", 8)
        assert clip == expected, ratio


def test_the_entropy_bonus_lowers_the_loss():
    zeros = torch.zeros(1, 2)
    loss, _ = policy_loss(zeros, zeros, torch.tensor([0.0]), torch.ones(1, 2), 1, 2, 0.2, 0.2, "token-mean", 8,
                          entropy=torch.tensor([[1.0, 2.0]]), entropy_coef=0.1)
    assert loss.item() == pytest.approx(-0.15)  # - 0.1 x the mean entropy of the two tokens


def scored_batch(monkeypatch, cfg, samples, old_logprobs=None, ref_logprobs=None):
    """score_batch on two 3-token rows (a prompt token, two completion tokens) with the trainer's passes stubbed."""
    policy, reference = object(), object()
    passes = lambda model, batch, rows, *args, **kwargs: ref_logprobs if model is reference else old_logprobs
    monkeypatch.setattr(train_grpo, "training_logprobs", passes)
    batch = train_grpo.Batch(torch.zeros(2, 3, dtype=torch.long), torch.tensor([[0, 1, 1], [0, 1, 1]]),
                             torch.zeros(2, 3), torch.tensor([3, 3]), torch.tensor([1, 1]))
    kl = train_grpo.score_batch(batch, samples, policy, reference, cfg, torch.device("cpu"))
    return batch, kl


def test_kl_in_the_reward_lowers_the_reward_of_the_row_that_drifted(monkeypatch):
    """k1 per token is log pi_old - log pi_ref: row 0 moved 1 nat per token from the reference, row 1 not at all; with
    equal task rewards and beta 0.5 the penalty leaves row 0 at 1 - 0.5 x 2 = 0 and row 1 at 1."""
    cfg = Config(beta=0.5, kl_in="reward", kl_estimator="k1", group_size=2, scale_rewards="none")
    samples = [types.SimpleNamespace(reward=1.0, truncated=False)] * 2
    batch, _ = scored_batch(monkeypatch, cfg, samples, old_logprobs=torch.tensor([[0., -1., -1.], [0., -1., -1.]]),
                            ref_logprobs=torch.tensor([[0., -2., -2.], [0., -1., -1.]]))
    assert batch.advantages.tolist() == pytest.approx([-0.5, 0.5])


def test_mask_truncated_leaves_only_the_truncated_completions_out_of_the_loss(monkeypatch):
    cfg = Config(mask_truncated=True, group_size=2)
    samples = [types.SimpleNamespace(reward=1.0, truncated=True), types.SimpleNamespace(reward=0.0, truncated=False)]
    batch, _ = scored_batch(monkeypatch, cfg, samples)
    assert batch.completion_mask.tolist() == [[0, 0, 0], [0, 1, 1]]


def test_rollout_rewards_with_the_format_weight_and_the_overlong_penalty(monkeypatch):
    """rollout passes the run's reward settings to the task's score and flags a completion cut at max_new_tokens:
    a correct, well-formed 3-token answer earns 1 + 0.5; a wrong, well-formed one cut at 12 tokens, inside the
    4-token overlong buffer's end, earns 0 + 0.5 - 1."""
    from sampler import Completion
    from tasks import Task

    texts = {3: "<think>\nx\n</think>\n\n\\boxed{4}", 12: "<think>\nxx\n</think>\n\n\\boxed{5}"}
    tokenizer = types.SimpleNamespace(eos_token_ids=[2], decode=lambda tokens, skip_special_tokens=True:
                                      texts[len(tokens)])
    task = type("TwoTokenPrompt", (Task,), {"prompt": lambda self, tokenizer, problem, instruction=None: [1, 1]})()
    monkeypatch.setattr(train_grpo, "generate", lambda *args, **kwargs: [
        Completion(0, [7] * 3, [0.0] * 3, "stop"), Completion(0, [7] * 12, [0.0] * 12, "length")])
    cfg = Config(group_size=2, max_new_tokens=12, format_weight=0.5, overlong_buffer=4, overlong_penalty=1.0)
    samples = train_grpo.rollout(None, tokenizer, task, [{"id": "a", "problem": "2+2?", "answer": "4"}], cfg, seed=0)
    assert [(s.reward, s.truncated, s.correct) for s in samples] == [(1.5, False, True), (-0.5, True, False)]


def test_rollout_grades_each_completion_against_its_own_problem(monkeypatch):
    """The sampler returns each problem's group together (prompt indices 0, 0, 1, 1): every completion is graded
    against, and keeps the prompt of, the problem it answered."""
    from sampler import Completion
    from tasks import Task

    tokenizer = types.SimpleNamespace(eos_token_ids=[2], decode=lambda tokens, skip_special_tokens=True:
                                      f"<think>\nx\n</think>\n\n\\boxed{{{tokens[0]}}}")
    task = type("IdPrompt", (Task,), {"prompt": lambda self, tokenizer, problem, instruction=None:
                                      [ord(problem["id"])]})()
    monkeypatch.setattr(train_grpo, "generate", lambda *args, **kwargs: [
        Completion(0, [4], [0.0], "stop"), Completion(0, [4], [0.0], "stop"), Completion(1, [6], [0.0], "stop"),
        Completion(1, [4], [0.0], "stop")])
    problems = [{"id": "a", "problem": "2+2?", "answer": "4"}, {"id": "b", "problem": "3+3?", "answer": "6"}]
    samples = train_grpo.rollout(None, tokenizer, task, problems, Config(group_size=2), seed=0)
    assert [(s.prompt, s.correct) for s in samples] == [([97], True), ([97], True), ([98], True), ([98], False)]


def test_logged_accuracy_counts_correct_answers_not_reward():
    """With a format weight the reward of a wrong answer can pass a right one's: accuracy reads correctness."""
    samples = [Sample([1], [2, 3], [0.0, 0.0], False, False, 0.5, ""), Sample([1], [2], [0.0], False, True, 1.5, "")]
    stats = dict(clip_low=0, clip_high=0, kl=0.0, entropy=0.0, mismatch=0.0, ratio_max_dev=0.0)
    metrics = train_grpo.step_metrics(samples, stats, 1, 0, 3, Config(prompts_per_step=1, group_size=2), 1,
                                      torch.device("cpu"))
    assert (metrics["reward"], metrics["accuracy"]) == (1.0, 0.5)


# --- KL estimators: expected loss gradients on a small categorical, exactly ----------------------------------

def divergences(logits, ref_logprobs):
    logp = torch.log_softmax(logits, -1)
    p, q = logp.exp(), ref_logprobs.exp()
    forward = (q * (ref_logprobs - logp)).sum()
    half_forward_r2 = 0.5 * (q * (logp - ref_logprobs) ** 2).sum()
    return {"reverse": (p * (logp - ref_logprobs)).sum(), "forward": forward, "half_forward_r2": half_forward_r2,
            "forward_plus_half_forward_r2": forward + half_forward_r2}


KL_GRADIENTS = [("reverse", "k1", None), ("reverse", "k2", "reverse"), ("reverse", "k3", "forward"),
                ("forward", "k1", "forward_plus_half_forward_r2"), ("forward", "k3", "half_forward_r2")]


@pytest.mark.parametrize("direction, estimator, follows", KL_GRADIENTS)
def test_expected_gradient_of_each_kl_estimator_in_the_loss(direction, estimator, follows):
    torch.manual_seed(0)
    logits = torch.randn(6, requires_grad=True)
    ref_logprobs = torch.log_softmax(torch.randn(6), -1)
    logp = torch.log_softmax(logits, -1)
    # E_{x ~ pi}[d k(x) / d theta] with the sampling distribution held fixed: sum_x pi(x) k(x), pi detached
    expected = (logp.exp().detach() * kl_estimate(logp, ref_logprobs, estimator, direction)).sum()
    gradient, = torch.autograd.grad(expected, logits)
    if follows is None:
        assert gradient.abs().max() < 1e-6
    else:
        target, = torch.autograd.grad(divergences(logits, ref_logprobs)[follows], logits)
        assert torch.allclose(gradient, target, atol=1e-6)


@pytest.mark.parametrize("direction, estimator", [("reverse", "k1"), ("reverse", "k3"), ("forward", "k1"),
                                                  ("forward", "k3")])
def test_unbiased_estimators_have_the_divergence_as_expectation(direction, estimator):
    torch.manual_seed(1)
    logp = torch.log_softmax(torch.randn(6), -1)
    ref_logprobs = torch.log_softmax(torch.randn(6), -1)
    value = (logp.exp() * kl_estimate(logp, ref_logprobs, estimator, direction)).sum()
    assert value == pytest.approx(divergences(logp, ref_logprobs)[direction].item(), rel=1e-5)


@pytest.mark.parametrize("direction", ["reverse", "forward"])
def test_full_kl_matches_the_definition_and_its_gradient(direction):
    from kernels.logprob import kl_full

    torch.manual_seed(2)
    hidden, weight = torch.randn(5, 8, requires_grad=True), torch.randn(11, 8)
    ref_hidden, ref_weight = torch.randn(5, 8), torch.randn(11, 8)
    ours = kl_full(hidden, weight, ref_hidden, ref_weight, temperature=0.7, direction=direction, chunk_size=2)
    expected = torch.stack([divergences(hidden[i] @ weight.T / 0.7, torch.log_softmax(ref_hidden[i] @ ref_weight.T
                                                                                        / 0.7, -1))[direction]
                            for i in range(5)])
    assert torch.allclose(ours, expected, atol=1e-5)
    g1, = torch.autograd.grad(ours.sum(), hidden)
    g2, = torch.autograd.grad(expected.sum(), hidden)
    assert torch.allclose(g1, g2, atol=1e-5)


# --- advantages ----------------------------------------------------------------------------------------------


def test_group_advantages_hand_example():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    advantages, zero_variance = group_advantages(rewards, 4)
    std = torch.tensor([1.0, 0.0, 0.0, 1.0]).std()  # sample std of the first group: 0.5774
    assert torch.allclose(advantages[:4], torch.tensor([0.5, -0.5, -0.5, 0.5]) / (std + 1e-4))
    assert torch.equal(advantages[4:], torch.zeros(4)) and zero_variance == 1
    rloo, _ = group_advantages(torch.tensor([1.0, 0.0, 0.0, 0.0]), 4, advantage="rloo", scale_rewards="none")
    assert torch.allclose(rloo, torch.tensor([1.0, -1 / 3, -1 / 3, -1 / 3]))
    dr_grpo, _ = group_advantages(torch.tensor([1.0, 0.0, 0.0, 0.0]), 4, scale_rewards="none")
    assert torch.allclose(dr_grpo, torch.tensor([0.75, -0.25, -0.25, -0.25]))
    batch, _ = group_advantages(torch.tensor([1.0, 0.0, 2.0, 2.0]), 2, scale_rewards="batch", batch_std=2.0)
    assert torch.allclose(batch, torch.tensor([0.5, -0.5, 0.0, 0.0]) / (2 + 1e-4))


def test_overlong_penalty():
    assert overlong_penalty([10, 60, 64, 62], 64, 4, 1.0).tolist() == [0.0, 0.0, -1.0, -0.5]


# --- whole runs ------------------------------------------------------------------------------------------------

TINY = ["--prompts_per_step=4", "--group_size=4", "--max_new_tokens=12", "--eval_problems=0", "--max_steps=2",
        "--save_every=100", "--lr=1e-3", "--sample_every=1000"]


@pytest.fixture(scope="module")
def demo_model(tmp_path_factory):
    from tasks import build_demo_model

    return build_demo_model(tmp_path_factory.mktemp("demo_model"))


def fake_rollout(policy, tokenizer, task, problems, config, seed):
    """Deterministic completions and rewards that depend only on the problem, whatever rank draws it."""
    samples = []
    for problem in problems:
        prompt = task.prompt(tokenizer, problem, config.instruction)
        digits = [int(c) for c in problem["problem"] if c.isdigit()] or [1]
        for k in range(config.group_size):
            text = f"<think>\n{digits[k % len(digits)]}\n</think>\n\n\\boxed{{{k}}}"
            tokens = tokenizer.encode(text) + tokenizer.eos_token_ids[:1]
            reward = float((digits[0] + k) % 3 == 0)
            samples.append(Sample(prompt=prompt, tokens=tokens, sampler_logprobs=[0.0] * len(tokens),
                                  truncated=False, correct=bool(reward), reward=reward, text=text))
    return samples


REAL_ROLLOUT = train_grpo.rollout


def sampled_rollout(policy, tokenizer, task, problems, config, seed):
    """The real sampler, one problem at a time with a seed of its own, so that a problem gets the same completions
    whichever rank draws it; the reward is rigged from the sampled tokens (an untrained model earns none), so that
    groups differ and the update does something."""
    samples = []
    for problem in problems:
        group = REAL_ROLLOUT(policy, tokenizer, task, [problem], config, seed=zlib.crc32(problem["problem"].encode()))
        for s in group:
            s.reward = float(sum(s.tokens) % 3 == 0)
        samples += group
    return samples


def run_rank(rank, world_size, port, args, rollout=fake_rollout):
    faulthandler.dump_traceback_later(300, exit=True)  # a rank stuck in a collective fails the test, not the suite
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    train_grpo.rollout = rollout
    train_grpo.main(args)


def spawn(world_size, args, **kwargs):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(run_rank, args=(world_size, port, args, *kwargs.values()), nprocs=world_size)


def metrics_lines(out_dir):
    return [json.loads(line) for line in open(os.path.join(out_dir, "metrics.jsonl"))]


@pytest.mark.slow
def test_fsdp_two_processes_with_eval_rollouts_reference_refresh_and_resume_equal_one(tmp_path, demo_model,
                                                                                      monkeypatch):
    """FSDP on 2 processes through everything a sharded model must survive: the held-out eval and the rollouts
    (a gathered copy on every rank), a reference refresh, a checkpoint and a resume (the optimizer state of every
    rank). Greedy evals and per-problem sampling seeds make 1 and 2 processes see the same completions."""
    from safetensors.torch import load_file

    args = TINY + [f"--model={demo_model}", "--eval_problems=4", "--eval_temperature=0", "--beta=0.05",
                   "--ref_update_every=2", "--temperature=0.7", "--micro_batch_size=3", "--warmup_steps=1"]
    monkeypatch.setattr(train_grpo, "rollout", sampled_rollout)
    train_grpo.main(args + [f"--out_dir={tmp_path / 'one'}", "--max_steps=3"])
    two = args + [f"--out_dir={tmp_path / 'two'}", "--parallel=fsdp"]
    spawn(2, two + ["--max_steps=2"], rollout=sampled_rollout)
    spawn(2, two + ["--max_steps=3", "--resume=true"], rollout=sampled_rollout)
    one, two = metrics_lines(tmp_path / "one"), metrics_lines(tmp_path / "two")
    assert [m["step"] for m in two] == [0, 1, 2, 2, 3, 3]  # eval at 0, steps 1-2, eval; resumed: its eval, step 3
    train_one, train_two = [m for m in one if "reward" in m], [m for m in two if "reward" in m]
    for a, b in zip(train_one, train_two, strict=True):
        assert (a["reward"], a["length"]) == (b["reward"], b["length"])  # the same completions
        assert b["mismatch"] < 1e-5  # the gathered copy samples what the sharded model scores
        assert a["kl"] == pytest.approx(b["kl"], rel=1e-3, abs=1e-9)
    # the reference is the initial policy for steps 1-2, then refreshed (and saved, and reloaded by the resume)
    assert train_two[1]["kl"] > 1e-6 and train_two[2]["kl"] < 1e-9
    evals_one = {m["step"]: m["heldout_accuracy"] for m in one if "reward" not in m}
    evals_two = {m["step"]: m["heldout_accuracy"] for m in two if "reward" not in m}
    assert evals_one == {0: evals_two[0], 3: evals_two[3]}
    final_one, final_two = load_file(tmp_path / "one" / "final" / "model.safetensors"), \
        load_file(tmp_path / "two" / "final" / "model.safetensors")
    for name in final_one:
        # Adam divides each step by the root of the squared gradients: where a gradient element is near zero, the two
        # runs' rounding differences become a visible step difference, so an isolated element may differ by more
        differ = (final_one[name] - final_two[name]).abs()
        assert (differ > 2e-5).sum() <= 2 and differ.max() < 1e-4, (name, differ.max().item())


@pytest.mark.parametrize("extra", [["--scale_rewards=batch"], ["--mu=2", "--beta=0.05", "--loss_agg=token-mean"]])
def test_two_processes_give_the_same_update_as_one(tmp_path, demo_model, extra):
    from safetensors.torch import load_file

    results, logged = {}, {}
    for world_size in (1, 2):
        out = tmp_path / f"world{world_size}"
        spawn(world_size, TINY + [f"--model={demo_model}", f"--out_dir={out}", "--micro_batch_size=3"] + extra)
        results[world_size] = load_file(out / "final" / "model.safetensors")
        logged[world_size] = metrics_lines(out)
    for one, two in zip(logged[1], logged[2], strict=True):  # the logged means are over all ranks' tokens
        for key in ("reward", "length", "zero_variance", "kl", "entropy", "mismatch", "clip_low", "clip_high"):
            assert two[key] == pytest.approx(one[key], rel=1e-4, abs=1e-7), key
    for name, tensor in results[1].items():
        # Adam turns float-summation noise in near-zero gradients into up to ~1e-5 of a 1e-3 step; a wrong
        # normalisation would move most weights by ~1e-3
        assert torch.allclose(tensor, results[2][name], atol=2e-5), name
    assert any(not torch.equal(results[1][n], load_file(os.path.join(demo_model, "model.safetensors"))[n])
               for n in results[1])  # the update did something


def odd_groups_equal(policy, tokenizer, task, problems, config, seed):
    """fake_rollout, but the groups of the problems at odd positions of the global draw have equal rewards:
    on 2 processes that is all of rank 1's, so dynamic sampling leaves rank 1 with no rollouts at all."""
    samples = fake_rollout(policy, tokenizer, task, problems, config, seed)
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    for i, s in enumerate(samples):
        position = (i // config.group_size) * world_size + rank
        if position % 2:
            s.reward = 0.5
    return samples


@pytest.mark.parametrize("extra", [[], ["--scale_rewards=batch"]])
def test_a_rank_left_without_rollouts_joins_the_update(tmp_path, demo_model, extra):
    """Dynamic sampling can leave a rank with nothing to train on: it must still join the gradient all-reduce
    (it hung) and the batch std's (--scale_rewards=batch), and the update is that of the other ranks' rollouts
    alone, normalised over the whole batch."""
    from safetensors.torch import load_file

    args = TINY + [f"--model={demo_model}", "--dynamic_sampling=true", "--max_resample_rounds=0"] + extra
    for world_size in (1, 2):
        spawn(world_size, args + [f"--out_dir={tmp_path / str(world_size)}"], rollout=odd_groups_equal)
    one, two = [load_file(tmp_path / str(n) / "final" / "model.safetensors") for n in (1, 2)]
    for name in one:
        assert torch.allclose(one[name], two[name], atol=2e-5), name
    assert any(not torch.equal(one[n], load_file(os.path.join(demo_model, "model.safetensors"))[n]) for n in one)


def test_beta_zero_loads_no_reference_model(tmp_path, demo_model, monkeypatch):
    loaded = []
    original = train_grpo.load_reference
    monkeypatch.setattr(train_grpo, "load_reference", lambda *a: loaded.append(a) or original(*a))
    monkeypatch.setattr(train_grpo, "rollout", fake_rollout)
    train_grpo.main(TINY + [f"--model={demo_model}", f"--out_dir={tmp_path / 'a'}", "--beta=0", "--max_steps=1"])
    assert loaded == []
    train_grpo.main(TINY + [f"--model={demo_model}", f"--out_dir={tmp_path / 'b'}", "--beta=0.1", "--max_steps=1"])
    assert len(loaded) == 1


def test_mu_one_ratio_is_exactly_one_and_nothing_clips(tmp_path, demo_model, monkeypatch):
    monkeypatch.setattr(train_grpo, "rollout", fake_rollout)
    metrics = train_grpo.main(TINY + [f"--model={demo_model}", f"--out_dir={tmp_path}", "--mu=1",
                                      "--eps_low=0.0001", "--eps_high=0.0001"])
    assert metrics["ratio_max_dev"] == 0.0 and metrics["clip_low"] == 0.0 and metrics["clip_high"] == 0.0
    assert metrics["grad_norm"] > 0


def test_kl_in_the_reward_is_logged_like_kl_in_the_loss(tmp_path, demo_model, monkeypatch):
    """The logged kl is the mean per completion token wherever the KL term sits: with --kl_in=reward it is the
    penalty's KL (it read 0, as if the policy never left the reference)."""
    monkeypatch.setattr(train_grpo, "rollout", fake_rollout)
    logged = {}
    for kl_in in ("loss", "reward"):
        train_grpo.main(TINY + [f"--model={demo_model}", f"--out_dir={tmp_path / kl_in}", "--beta=0.1",
                                "--kl_estimator=k3", f"--kl_in={kl_in}"])
        logged[kl_in] = [m["kl"] for m in metrics_lines(tmp_path / kl_in)]
    for kl_in in ("loss", "reward"):
        assert logged[kl_in][0] == 0.0 and logged[kl_in][1] > 1e-6  # the policy starts at the reference, then moves
    assert logged["reward"][1] == pytest.approx(logged["loss"][1], rel=1e-4)  # step 1 moved both alike (zero KL gradient)


def test_mu_two_keeps_pi_old_fixed_and_counts_clips_per_token_and_epoch(tmp_path, demo_model, monkeypatch):
    """With --mu=2 the second epoch's ratio is to the rollout policy (pi_old), not to itself, and the logged clip
    fractions are the clipped tokens of both epochs over (completion tokens x mu)."""
    calls = []
    monkeypatch.setattr(train_grpo, "rollout", fake_rollout)
    spy(monkeypatch, "policy_loss", calls)
    metrics = train_grpo.main(TINY + [f"--model={demo_model}", f"--out_dir={tmp_path}", "--mu=2", "--max_steps=1",
                                      "--eps_low=0.0001", "--eps_high=0.0001", "--micro_batch_size=16"])
    assert metrics["ratio_max_dev"] > 1e-6
    (first, _, _), (second, _, _) = calls
    assert torch.allclose(first[1], first[0].detach(), atol=1e-6)  # pi_old: the policy before the update
    assert torch.equal(second[1], first[1])  # and still in epoch 2, after the policy has moved
    num_tokens = first[5]
    clipped = [c for _, _, (_, c) in calls]
    assert sum(c["clip_low"] for c in clipped) > 0 or sum(c["clip_high"] for c in clipped) > 0
    assert metrics["clip_low"] == pytest.approx(sum(c["clip_low"] for c in clipped) / (num_tokens * 2))
    assert metrics["clip_high"] == pytest.approx(sum(c["clip_high"] for c in clipped) / (num_tokens * 2))


@pytest.mark.parametrize("layout", ["padded", "packed", "shared"])
@pytest.mark.parametrize("direction", ["reverse", "forward"])
def test_exact_kl_comes_from_the_log_prob_forward_and_matches_the_definition(demo_model, monkeypatch, layout,
                                                                             direction):
    """--kl_estimator=full: training_logprobs returns the exact KL with the log-probs from one body forward of the
    policy and one of the reference (counted), in each layout; its values and the gradient of a weighted sum equal
    the definition on full float64 logits (sum over the vocabulary at the position that predicts each token), at
    the scored completion tokens only."""
    from model import Transformer

    policy = Transformer.from_pretrained(demo_model).double().train()
    reference = Transformer.from_pretrained(demo_model).double().eval()
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(torch.randn(p.shape, generator=generator, dtype=p.dtype) * 0.05).requires_grad_(False)
    vocab = policy.config.vocab_size
    prompts = [torch.randint(3, vocab, (n,), generator=generator).tolist() for n in (6, 3, 9)]
    samples = [Sample(prompt, torch.randint(3, vocab, (k,), generator=generator).tolist(), [0.0] * k, False, False,
                      0.0, "") for prompt, k in [(prompts[0], 4), (prompts[0], 1), (prompts[1], 7), (prompts[2], 2),
                                                 (prompts[2], 5), (prompts[2], 3)]]
    batch = train_grpo.collate(samples, pad_id=0, device=torch.device("cpu"), layout=layout)
    batch.completion_mask[4, -1] = 0  # a completion token out of the loss: not scored
    weights = torch.rand(batch.input_ids.shape, generator=generator, dtype=torch.float64)
    bodies = []
    original = Transformer.hidden_states
    monkeypatch.setattr(Transformer, "hidden_states", lambda self, *a, **k: bodies.append(self) or original(self, *a, **k))
    logprobs, entropy, kl = train_grpo.training_logprobs(policy, batch, slice(None), 0.7, return_entropy=True,
                                                         kl_reference=reference, kl_direction=direction)
    assert bodies == [policy, reference]
    (kl * weights).sum().backward()
    ours = {n: p.grad.clone() for n, p in policy.named_parameters()}

    policy.zero_grad()
    monkeypatch.setattr(Transformer, "hidden_states", original)
    mask = batch.completion_mask.bool()
    predict = lambda model: torch.log_softmax(model(batch.input_ids, return_hidden=True) @ model.lm_head_weight.T
                                              / 0.7, dim=-1)[:, :-1]  # position t predicts token t + 1
    log_p = predict(policy)
    with torch.no_grad():
        log_q = predict(reference)
    per_position = ((log_p.exp() * (log_p - log_q)) if direction == "reverse" else
                    (log_q.exp() * (log_q - log_p))).sum(-1)
    definition = torch.cat([per_position.new_zeros(len(samples), 1), per_position], dim=1) * mask
    (definition * weights).sum().backward()
    assert torch.all(kl[~mask] == 0) and bool((kl[mask] > 0).all())
    assert (kl - definition).abs().max() < 1e-10
    for name, p in policy.named_parameters():
        assert torch.allclose(ours[name], p.grad, atol=1e-10, rtol=0), name
    assert logprobs.shape == entropy.shape == kl.shape


@pytest.mark.parametrize("entropy_coef, second_epoch", [(0.0, False), (0.01, True)])
def test_entropy_is_computed_where_it_is_logged_or_trained_on(tmp_path, demo_model, monkeypatch, entropy_coef,
                                                             second_epoch):
    """The entropy comes with the log-probs in the first epoch (logged); in later epochs only when it is trained on;
    never in the pi_old pass."""
    calls = []
    monkeypatch.setattr(train_grpo, "rollout", fake_rollout)
    spy(monkeypatch, "training_logprobs", calls)
    train_grpo.main(TINY + [f"--model={demo_model}", f"--out_dir={tmp_path}", "--mu=2", "--max_steps=1",
                            "--micro_batch_size=16", f"--entropy_coef={entropy_coef}"])
    assert [kwargs.get("return_entropy", False) for _, kwargs, _ in calls] == [False, True, second_epoch]


@pytest.mark.parametrize("options", [
    ["--kl_in=reward", "--beta=0.1", "--kl_estimator=k1"],
    ["--kl_estimator=full", "--beta=0.1", "--kl_direction=forward"],
    ["--dynamic_sampling=true", "--advantage=rloo", "--scale_rewards=none", "--loss_agg=seq-mean-token-sum-norm"],
    ["--mask_truncated=true", "--overlong_buffer=4", "--format_weight=0.5", "--entropy_coef=0.01",
     "--ref_update_every=1", "--beta=0.01"],
])
def test_switches_run_with_the_real_sampler_and_verifier(tmp_path, demo_model, options):
    metrics = train_grpo.main(TINY + [f"--model={demo_model}", f"--out_dir={tmp_path}"] + options)
    assert all(math.isfinite(v) for v in metrics.values())


def spy(monkeypatch, name, calls):
    """Replaces train_grpo.<name> by a wrapper that records (args, kwargs, result) of every call."""
    original = getattr(train_grpo, name)

    def wrapper(*args, **kwargs):
        result = original(*args, **kwargs)
        calls.append((args, kwargs, result))
        return result

    monkeypatch.setattr(train_grpo, name, wrapper)


def test_the_update_sees_gradients_clipped_to_grad_clip(tmp_path, demo_model, monkeypatch):
    """The logged grad norm is the one before clipping; the optimizer must step on the clipped gradients."""
    seen = record_update_grad_norms(monkeypatch, train_grpo)
    monkeypatch.setattr(train_grpo, "rollout", fake_rollout)
    train_grpo.main(TINY + [f"--model={demo_model}", f"--out_dir={tmp_path}", "--grad_clip=1e-3"])
    logged = [m["grad_norm"] for m in metrics_lines(tmp_path)]
    assert len(seen) == 2 and all(norm > 1e-3 for norm in logged)  # every step clips at this setting
    assert seen == pytest.approx([1e-3] * 2, rel=1e-3)


def test_the_reference_is_refreshed_after_every_ref_update_every_th_step(tmp_path, demo_model, monkeypatch):
    """With --ref_update_every=2 the policy is copied into the reference after steps 2 and 4. A step's KL is measured
    on the policy before its update (mu=1), so it is exactly zero at step 1 and right after each refresh."""
    monkeypatch.setattr(train_grpo, "rollout", fake_rollout)
    train_grpo.main(TINY + [f"--model={demo_model}", f"--out_dir={tmp_path}", "--max_steps=5", "--beta=0.05",
                            "--ref_update_every=2"])
    kls = [m["kl"] for m in metrics_lines(tmp_path)]
    assert [kl > 1e-6 for kl in kls] == [False, True, False, True, False], kls
    assert all(kl == 0 for kl in kls[::2]), kls


def test_only_the_last_micro_step_of_each_update_syncs_gradients(tmp_path, demo_model, monkeypatch):
    """Gradients are all-reduced once per optimizer step, on the backward of its last micro-batch: one synced earlier
    leaves the later micro-batches' gradients unsynced (ranks drift apart). 8 rows in micro-batches of 3, mu=2."""
    flags = []
    monkeypatch.setattr(train_grpo, "set_gradient_sync", lambda wrapped, enabled: flags.append(enabled))
    monkeypatch.setattr(train_grpo, "rollout", fake_rollout)
    train_grpo.main(TINY + [f"--model={demo_model}", f"--out_dir={tmp_path}", "--prompts_per_step=2",
                            "--micro_batch_size=3", "--mu=2"])
    assert flags == [False, False, True] * 2 * 2  # 3 micro-batches, 2 epochs, 2 steps


@pytest.mark.parametrize("ref_update_every", [2, 0])  # a refreshed reference, saved; or --model's, loaded again
def test_resume_continues_from_the_last_checkpoint(tmp_path, demo_model, monkeypatch, ref_update_every):
    """A resumed run ends with the weights of a straight one, and it did resume: the metrics have each step once,
    the step loaded is the step saved, and the rollout seeds continue where they stopped."""
    from safetensors.torch import load_file

    seeds, loaded = [], []
    monkeypatch.setattr(train_grpo, "rollout", lambda *args, seed: seeds.append(seed) or fake_rollout(*args, seed))
    spy(monkeypatch, "load_run_state", loaded)
    base = TINY + [f"--model={demo_model}", "--max_steps=4", "--beta=0.05", f"--ref_update_every={ref_update_every}"]
    train_grpo.main(base + [f"--out_dir={tmp_path / 'straight'}"])
    straight_seeds, seeds[:] = list(seeds), []
    train_grpo.main(base + [f"--out_dir={tmp_path / 'split'}", "--save_every=2", "--max_steps=2"])
    train_grpo.main(base + [f"--out_dir={tmp_path / 'split'}", "--resume=true"])
    assert [result[0] for _, _, result in loaded] == [2]
    assert [m["step"] for m in metrics_lines(tmp_path / "split")] == [1, 2, 3, 4]
    assert seeds == straight_seeds and len(set(seeds)) == 4
    straight = load_file(tmp_path / "straight" / "final" / "model.safetensors")
    resumed = load_file(tmp_path / "split" / "final" / "model.safetensors")
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


# --- how main wires the pieces together ------------------------------------------------------------------------


def test_fsdp_with_dynamic_sampling_is_refused_before_it_can_hang():
    with pytest.raises(SystemExit, match="--dynamic_sampling=true .* use --parallel=ddp"):
        train_grpo.main(["--dynamic_sampling=true", "--parallel=fsdp"])


# --- scoring and the loss against TRL's: an implementation we did not write --------------------------------------
# TRL 1.16 (requirements-peers.txt) on the same float64 checkpoints: the two transformers differ by transformers'
# RMSNorm, which computes in fp32 inside a float64 model (~1e-7)

TRL_GROUP_SIZE, TRL_MAX_NEW_TOKENS, TRL_TEMPERATURE, TRL_PAD = 4, 12, 0.7, 1


def trl_trainer(path, reward_funcs, kind="grpo", **config):
    """TRL's GRPOTrainer (or RLOOTrainer) over the checkpoint at path/model (written by bench/grpo_step.py, 128
    character ids), on CPU in float64, with batches of 8 completions, TRL_GROUP_SIZE per prompt."""
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    config_class, trainer_class = ((trl.GRPOConfig, trl.GRPOTrainer) if kind == "grpo" else
                                   (trl.RLOOConfig, trl.RLOOTrainer))
    model = AutoModelForCausalLM.from_pretrained(str(path / "model"), dtype=torch.float64).train()
    args = config_class(output_dir=str(path / "trl"), per_device_train_batch_size=8, num_generations=TRL_GROUP_SIZE,
                        max_completion_length=TRL_MAX_NEW_TOKENS, temperature=TRL_TEMPERATURE, use_cpu=True,
                        bf16=False, report_to="none", save_strategy="no", disable_tqdm=True, **config)
    return trainer_class(model=model, reward_funcs=reward_funcs, args=args,
                         train_dataset=Dataset.from_list([{"prompt": "1+1"}] * 8),
                         processing_class=PreTrainedTokenizerFast.from_pretrained(str(path / "model")))


def trl_samples(seed=0):
    """Two prompts of 5 and 9 tokens, TRL_GROUP_SIZE completions each of 1 to TRL_MAX_NEW_TOKENS random tokens."""
    import random

    rng = random.Random(seed)
    samples = []
    for prompt in ([rng.randrange(3, 128) for _ in range(5)], [rng.randrange(3, 128) for _ in range(9)]):
        for _ in range(TRL_GROUP_SIZE):
            tokens = [rng.randrange(3, 128) for _ in range(rng.randint(1, TRL_MAX_NEW_TOKENS))]
            samples.append(Sample(prompt, tokens, [0.0] * len(tokens), len(tokens) == TRL_MAX_NEW_TOKENS, False,
                                  rng.choice([0.0, 0.5, 1.0, 1.25]), ""))
    return samples


def at_completion_tokens(padded, samples):
    """(B, T) values at (prompt + completion) positions -> (B, TRL_MAX_NEW_TOKENS), TRL's layout."""
    out = torch.zeros(len(samples), TRL_MAX_NEW_TOKENS, dtype=padded.dtype)
    for row, s in enumerate(samples):
        out[row, : len(s.tokens)] = padded[row, len(s.prompt): len(s.prompt) + len(s.tokens)]
    return out


SCORING_SETTINGS = {  # TRL's trainer and config, ours' flags for the same scoring
    "grpo-group-std": ("grpo", dict(scale_rewards="group"), dict(scale_rewards="group")),
    "grpo-batch-std": ("grpo", dict(scale_rewards="batch"), dict(scale_rewards="batch")),
    "dr-grpo-no-std": ("grpo", dict(scale_rewards="none"), dict(scale_rewards="none")),
    # TRL's RLOO: the leave-one-out baseline, and the KL in the reward as the per-sequence sum of k1
    "rloo-k1-kl-in-reward": ("rloo", dict(beta=0.05, normalize_advantages=False), dict(
        advantage="rloo", scale_rewards="none", beta=0.05, kl_in="reward", kl_estimator="k1")),
}


@pytest.mark.parametrize("setting, layout", [(name, "padded") for name in SCORING_SETTINGS]
                         + [("grpo-group-std", "shared"), ("grpo-group-std", "packed"),
                            ("rloo-k1-kl-in-reward", "shared")])
def test_scoring_gives_trls_advantages_and_reference_and_pi_old_log_probs(tmp_path, setting, layout):
    """TRL's _generate_and_score_completions (its generation replaced by our fixed completions, its reward function
    returning their rewards, one group's all equal) and our score_batch with a reference model: the same advantages
    (GRPO's group std, the batch std, none: Dr. GRPO; RLOO with beta x the summed k1 KL taken from the reward) and
    the same reference and pi_old log-probs at every completion token, at temperature 0.7."""
    pytest.importorskip("trl")
    from transformers import AutoModelForCausalLM
    from trl.trainer.utils import add_fused_lm_head

    from bench.grpo_step import build_checkpoint
    from model import Transformer

    kind, trl_config, flags = SCORING_SETTINGS[setting]
    build_checkpoint(str(tmp_path / "model"), "char", seed=0)
    build_checkpoint(str(tmp_path / "reference"), "char", seed=1)
    samples = trl_samples()
    for s in samples[TRL_GROUP_SIZE:]:
        s.reward = 1.0
    if kind == "grpo":  # pi_old's log-probs come with --mu=2 (TRL: num_iterations=2)
        trl_config = dict(trl_config, beta=0.04, num_iterations=2, gradient_accumulation_steps=2)
        flags = dict(flags, beta=0.04, mu=2, kl_estimator="k3", kl_in="loss")
    trainer = trl_trainer(tmp_path, lambda completions, **unused: [s.reward for s in samples], kind, **trl_config)
    trainer.ref_model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "reference"), dtype=torch.float64).eval()
    add_fused_lm_head(trainer.ref_model, temperature=TRL_TEMPERATURE)  # as TRL's init does to its own
    # TRL 1.16's _generate: GRPO's returns prompt ids, completion ids, tool mask, texts, sampler log-probs, extra
    # fields, images and tool images; RLOO's the first two and the texts
    generated = ([s.prompt for s in samples], [s.tokens for s in samples], None, ["text"] * len(samples), None, {},
                 None, None)
    trainer._generate = lambda prompts: generated if kind == "grpo" else (generated[0], generated[1], generated[3])
    theirs = trainer._generate_and_score_completions([{"prompt": "1+1"}] * len(samples))

    model, reference = (Transformer.from_pretrained(str(tmp_path / name), dtype=torch.float64)
                        for name in ("model", "reference"))
    batch = train_grpo.collate(samples, TRL_PAD, torch.device("cpu"), layout)
    train_grpo.score_batch(batch, samples, model, reference, config(
        temperature=TRL_TEMPERATURE, group_size=TRL_GROUP_SIZE, **flags), torch.device("cpu"))
    assert (batch.advantages - theirs["advantages"]).abs().max() < 1e-6
    assert batch.advantages[:TRL_GROUP_SIZE].ne(0).all()
    old_logprobs, mask = at_completion_tokens(batch.old_logprobs, samples), theirs["completion_mask"]
    if kind == "rloo":  # each sequence's summed pi_old log-prob in float32, and no reference's: that is in the reward
        assert (old_logprobs.sum(1) - theirs["old_logps"]).abs().max() < 1e-6 * theirs["old_logps"].abs().max()
        return
    assert batch.advantages[TRL_GROUP_SIZE:].eq(0).all()
    assert (old_logprobs - theirs["old_per_token_logps"] * mask).abs().max() < 1e-6
    assert (at_completion_tokens(batch.ref_logprobs, samples) - theirs["ref_per_token_logps"] * mask).abs().max() < 1e-6


TRL_SETTINGS = {  # TRL's loss_type, ours' flags for the same objective, and the micro-batches of the batch
    "grpo-k3-kl": ("grpo", dict(loss_agg="seq-mean-token-mean", beta=0.04), 2),
    "dr_grpo": ("dr_grpo", dict(loss_agg="seq-mean-token-sum-norm", beta=0.0), 2),
    "dapo": ("dapo", dict(loss_agg="token-mean", beta=0.0), 2),
    # TRL's bnpo loss and its entropy bonus are token means of each micro-batch, ours of the whole batch: the same
    # objective in one micro-batch only
    "bnpo-k3-kl-entropy": ("bnpo", dict(loss_agg="token-mean", beta=0.04, entropy_coef=0.01), 1),
}


@pytest.mark.parametrize("setting, layout", [(name, "padded") for name in TRL_SETTINGS]
                         + [("grpo-k3-kl", "shared"), ("grpo-k3-kl", "packed")])
def test_a_micro_step_gives_trls_loss_and_gradients(tmp_path, monkeypatch, setting, layout):
    """TRL's GRPOTrainer._compute_loss and our micro_step on the same checkpoint, completions, advantages and
    pi_old / reference log-probs (apart from the current ones, so that ratios clip on both sides and the k3 KL is not
    0), over the batch's micro-batches (two of a prompt's 4 completions each, TRL's gradient accumulation): the same
    summed loss and the same gradient of every parameter, at temperature 0.7, with prompts of two lengths (TRL
    left-pads them, ours right-pads, shares or packs) and completions of 1 to 12 tokens. A TRL default that ours does
    not have is off: the KL's importance weight (use_bias_correction_kl), which at mu=1 is 1 but has a gradient.
    TRL's entropy bonus is a token mean whatever the loss type, ours is aggregated like the loss: they agree for a
    token-mean loss in one micro-batch, where it is tested."""
    pytest.importorskip("trl")
    from bench.grpo_step import build_checkpoint
    from model import Transformer, to_hf_state

    loss_type, flags, micro_batches = TRL_SETTINGS[setting]
    build_checkpoint(str(tmp_path / "model"), "char")
    trainer = trl_trainer(tmp_path, lambda completions, **unused: [0.0] * len(completions), loss_type=loss_type,
                          beta=flags["beta"], epsilon=0.2, epsilon_high=0.28, use_bias_correction_kl=False,
                          entropy_coef=flags.get("entropy_coef", 0.0), gradient_accumulation_steps=micro_batches)
    trainer.current_gradient_accumulation_steps = micro_batches  # set by TRL's training loop
    theirs = trainer.model
    ours = Transformer.from_pretrained(str(tmp_path / "model"), dtype=torch.float64).train()

    samples = trl_samples()
    batch = train_grpo.collate(samples, TRL_PAD, torch.device("cpu"), layout)
    mask = batch.completion_mask
    with torch.no_grad():
        current = train_grpo.training_logprobs(ours, batch, slice(None), TRL_TEMPERATURE)
    generator = torch.Generator().manual_seed(0)
    noise = lambda scale: scale * torch.randn(current.shape, generator=generator, dtype=torch.float64)
    batch.old_logprobs, batch.ref_logprobs = (current + noise(0.3)) * mask, (current + noise(0.5)) * mask
    batch.advantages = torch.randn(len(samples), generator=generator, dtype=torch.float64)
    cfg = config(temperature=TRL_TEMPERATURE, mu=2, kl_estimator="k3", kl_direction="reverse", kl_in="loss",
                 eps_low=0.2, eps_high=0.28, max_new_tokens=TRL_MAX_NEW_TOKENS, **{"entropy_coef": 0.0, **flags})
    losses, real_policy_loss = [], train_grpo.policy_loss

    def recorded_policy_loss(*args, **kwargs):
        loss, clip = real_policy_loss(*args, **kwargs)
        losses.append(loss.item())
        return loss, clip

    monkeypatch.setattr(train_grpo, "policy_loss", recorded_policy_loss)
    micro_rows = [slice(start, start + len(samples) // micro_batches)
                  for start in range(0, len(samples), len(samples) // micro_batches)]
    clips = [train_grpo.micro_step(ours, object() if cfg.beta else None, batch, rows, cfg, len(samples),
                                   int(mask.sum()), 1, diagnostics=False) for rows in micro_rows]
    assert sum(c["clip_low"] for c in clips) > 0 and sum(c["clip_high"] for c in clips) > 0  # both sides clip

    # TRL's inputs: prompts left-padded, completions right-padded, the same log-probs at the completion tokens, and
    # the whole batch's token count (TRL's num_items_in_batch)
    prompt_len, rows = max(len(s.prompt) for s in samples), len(samples)
    inputs = dict(prompt_ids=torch.full((rows, prompt_len), TRL_PAD),
                  prompt_mask=torch.zeros(rows, prompt_len, dtype=torch.long),
                  completion_ids=torch.full((rows, TRL_MAX_NEW_TOKENS), TRL_PAD),
                  completion_mask=torch.zeros(rows, TRL_MAX_NEW_TOKENS, dtype=torch.long),
                  old_per_token_logps=at_completion_tokens(batch.old_logprobs, samples),
                  ref_per_token_logps=at_completion_tokens(batch.ref_logprobs, samples), advantages=batch.advantages)
    for row, s in enumerate(samples):
        inputs["prompt_ids"][row, prompt_len - len(s.prompt):] = torch.tensor(s.prompt)
        inputs["prompt_mask"][row, prompt_len - len(s.prompt):] = 1
        inputs["completion_ids"][row, : len(s.tokens)] = torch.tensor(s.tokens)
        inputs["completion_mask"][row, : len(s.tokens)] = 1
    trl_loss = 0.0
    for micro in micro_rows:
        loss = trainer._compute_loss(theirs, {**{key: value[micro] for key, value in inputs.items()},
                                              "num_items_in_batch": mask.sum().double()})
        loss.backward()
        trl_loss += loss.item()

    assert abs(sum(losses) - trl_loss) < 1e-6 * max(1.0, abs(trl_loss))
    ours_grads = to_hf_state({name: p.grad for name, p in ours.named_parameters()}, ours.config)
    trl_grads = {name: p.grad for name, p in theirs.named_parameters()}
    assert ours_grads.keys() == trl_grads.keys()
    for name, grad in trl_grads.items():
        assert (ours_grads[name] - grad).abs().max() <= 1e-5 * grad.abs().max(), name


def test_collate_marks_the_completion_and_its_stop_token_only():
    samples = [Sample(prompt, tokens, [-0.5] * len(tokens), False, False, 0.0, "")
               for prompt, tokens in [([5, 6, 7], [8, 9, 2]), ([5], [3, 2]), ([4, 4], [9])]]
    batch = train_grpo.collate(samples, pad_id=0, device=torch.device("cpu"))
    input_ids, completion_mask = batch.input_ids, batch.completion_mask
    assert input_ids.tolist() == [[5, 6, 7, 8, 9, 2], [5, 3, 2, 0, 0, 0], [4, 4, 9, 0, 0, 0]]
    assert completion_mask.tolist() == [[0, 0, 0, 1, 1, 1], [0, 1, 1, 0, 0, 0], [0, 0, 1, 0, 0, 0]]
    assert torch.equal(batch.sampler_logprobs, -0.5 * completion_mask)  # the sampler's, at the completion tokens


@pytest.mark.parametrize("layout", ["packed", "shared"])
def test_packed_and_shared_prompt_training_passes_equal_padded_ones(tmp_path, demo_model, monkeypatch, layout):
    """--pack=true runs the policy, reference and pi_old passes on packed rows (varlen attention, no padding);
    --share_prompts=true runs each group's prompt once, its completions reading its keys (groups of 4 split over
    micro-batches of 3 too). Both put the log-probs back in place: the same metrics and the same update as padded
    rows, up to float rounding."""
    from safetensors.torch import load_file

    monkeypatch.setattr(train_grpo, "rollout", fake_rollout)
    calls = {"collate": [], "shared": []}
    spy(monkeypatch, "collate", calls["collate"])
    spy(monkeypatch, "shared_prompt_logprobs", calls["shared"])
    flags = {"padded": ["--pack=false", "--share_prompts=false"], "packed": ["--pack=true", "--share_prompts=false"],
             "shared": ["--pack=auto", "--share_prompts=true"]}
    metrics, weights = {}, {}
    for name in ("padded", layout):
        metrics[name] = train_grpo.main(TINY + [f"--model={demo_model}", f"--out_dir={tmp_path / name}", "--beta=0.1",
                                                "--mu=2", "--micro_batch_size=3"] + flags[name])
        weights[name] = load_file(tmp_path / name / "final" / "model.safetensors")
    assert [batch.layout for _, _, batch in calls["collate"]] == ["padded"] * 2 + [layout] * 2
    # per step: the reference pass, the pi_old pass and 2 epochs of 6 micro-batches
    assert len(calls["shared"]) == (2 * 14 if layout == "shared" else 0)
    for key in ("reward", "kl", "entropy", "mismatch", "ratio_max_dev", "grad_norm"):
        assert metrics[layout][key] == pytest.approx(metrics["padded"][key], rel=1e-4, abs=1e-6), key
    assert metrics[layout]["kl"] > 1e-6  # the policy moved, so the reference pass is compared
    for name, tensor in weights["padded"].items():
        assert torch.allclose(tensor, weights[layout][name], atol=1e-5), name


def test_auto_layout_shares_prompts_on_the_cpu_and_one_layout_at_a_time(tmp_path, demo_model, monkeypatch):
    monkeypatch.setattr(train_grpo, "rollout", fake_rollout)
    batches = []
    spy(monkeypatch, "collate", batches)
    train_grpo.main(TINY + [f"--model={demo_model}", f"--out_dir={tmp_path}", "--max_steps=1"])
    assert [batch.layout for _, _, batch in batches] == ["shared"]
    with pytest.raises(SystemExit, match="--share_prompts=true and --pack=true"):
        train_grpo.main(["--share_prompts=true", "--pack=true"])


def test_sampler_and_trainer_log_probs_agree_at_temperature_0_7(tmp_path, demo_model):
    """The real sampler and verifier at temperature 0.7: the trainer's recomputed log-probs of the sampled tokens
    equal the sampler's (the logged mismatch is ~3e-7; ~0.1 when either side drops the temperature)."""
    metrics = train_grpo.main(TINY + [f"--model={demo_model}", f"--out_dir={tmp_path}", "--temperature=0.7",
                                      "--max_steps=1"])
    assert metrics["mismatch"] < 1e-5


@pytest.mark.parametrize("scale_rewards", ["group", "batch"])
def test_main_passes_the_right_tensors_to_the_loss_and_the_kl(tmp_path, demo_model, monkeypatch, scale_rewards):
    """What main hands kl_estimate and policy_loss, against a recomputation from the rollouts: the policy's
    log-probs (with gradient) first and the reference's second, the configured estimator and direction, each
    micro-batch's own rows, and advantages from the group mean and the sample std of the group or the batch."""
    from model import sequence_logprobs

    calls = {"collate": [], "kl_estimate": [], "policy_loss": []}
    monkeypatch.setattr(train_grpo, "rollout", fake_rollout)
    for name, recorded in calls.items():
        spy(monkeypatch, name, recorded)
    train_grpo.main(TINY + [f"--model={demo_model}", f"--out_dir={tmp_path}", "--beta=0.1", "--kl_estimator=k2",
                            "--kl_direction=forward", "--micro_batch_size=6", "--temperature=0.7",
                            f"--scale_rewards={scale_rewards}"])
    reference = train_grpo.load_reference(demo_model, torch.device("cpu"))
    micro_batches = math.ceil(16 / 6)  # the last one ragged
    assert len(calls["collate"]) == 2 and len(calls["kl_estimate"]) == len(calls["policy_loss"]) == 2 * micro_batches
    for step, ((samples, *_), _, batch) in enumerate(calls["collate"]):
        input_ids, completion_mask = batch.input_ids, batch.completion_mask
        rewards = torch.tensor([s.reward for s in samples]).view(4, 4)
        scale = rewards.std(dim=1, keepdim=True) if scale_rewards == "group" else rewards.std()
        advantages = ((rewards - rewards.mean(dim=1, keepdim=True)) / (scale + 1e-4)).view(-1)
        for k in range(micro_batches):
            rows = slice(6 * k, 6 * k + 6)
            (logprobs, ref_logprobs, estimator, direction), _, kl = calls["kl_estimate"][step * micro_batches + k]
            args, kwargs, _ = calls["policy_loss"][step * micro_batches + k]
            assert (estimator, direction) == ("k2", "forward")
            assert logprobs.requires_grad and not ref_logprobs.requires_grad
            with torch.no_grad():
                expected_ref = sequence_logprobs(reference, input_ids[rows], temperature=0.7) * completion_mask[rows]
            assert torch.allclose(ref_logprobs, expected_ref, atol=1e-6)
            if step == 1:  # the policy has moved away from the reference
                assert not torch.allclose(logprobs, ref_logprobs, atol=1e-4)
            assert args[0] is logprobs and torch.equal(args[1], logprobs.detach()) and kwargs["kl"] is kl
            assert torch.allclose(args[2].cpu(), advantages[rows], atol=1e-5)
            assert torch.equal(args[3], completion_mask[rows])
            assert args[4:6] == (16, float(completion_mask.sum()))


@pytest.mark.parametrize("kl_in", ["loss", "reward"])
def test_main_wires_the_exact_kl_from_the_reference_into_the_loss_or_the_reward(tmp_path, demo_model, monkeypatch,
                                                                              kl_in):
    """--kl_estimator=full: every training pass that carries the KL names the frozen reference (not the policy) and
    the configured direction; in the loss the KL handed to policy_loss is that pass's last result (not its entropy),
    in the reward the pi_old pass carries it and the update passes do not."""
    from model import Transformer

    calls = {"training_logprobs": [], "policy_loss": []}
    monkeypatch.setattr(train_grpo, "rollout", fake_rollout)
    for name, recorded in calls.items():
        spy(monkeypatch, name, recorded)
    metrics = train_grpo.main(TINY + [f"--model={demo_model}", f"--out_dir={tmp_path}", "--beta=0.1",
                                      "--kl_estimator=full", "--kl_direction=forward", f"--kl_in={kl_in}",
                                      "--micro_batch_size=16"])
    carrying = [(args, kwargs, result) for args, kwargs, result in calls["training_logprobs"]
                if kwargs.get("kl_reference") is not None]
    assert len(carrying) == 2  # one pass per step: the update's (loss) or pi_old's (reward)
    for args, kwargs, result in carrying:
        reference = kwargs["kl_reference"]
        assert isinstance(reference, Transformer) and reference is not args[0]
        assert not any(p.requires_grad for p in reference.parameters())
        assert kwargs["kl_direction"] == "forward"
    if kl_in == "loss":
        for (args, kwargs, _), (_, _, result) in zip(calls["policy_loss"], carrying, strict=True):
            assert args[0] is result[0] and kwargs["kl"] is result[-1] and len(result) == 3
            assert kwargs["entropy"] is None
    else:
        assert all(kwargs["kl"] is None for _, kwargs, _ in calls["policy_loss"])
        assert all(len(result) == 2 for _, _, result in carrying)  # pi_old's log-probs and the KL
    assert metrics["kl"] > 1e-6  # step 2: the policy has moved from the reference


def informative(problem):
    return zlib.crc32(problem["problem"].encode()) % 4 == 0


def rigged_rollout(policy, tokenizer, task, problems, config, seed):
    """fake_rollout with one group in four (by problem) informative, rewards 1, 0, 0, 0; the others all 0.5."""
    samples = fake_rollout(policy, tokenizer, task, problems, config, seed)
    for i, s in enumerate(samples):
        k = i % config.group_size
        s.reward = float(k == 0) if informative(problems[i // config.group_size]) else 0.5
    return samples


def test_dynamic_sampling_keeps_the_informative_groups_and_stops_when_full(tmp_path, demo_model, monkeypatch):
    calls, collated = [], []
    monkeypatch.setattr(train_grpo, "rollout", rigged_rollout)
    spy(monkeypatch, "rollout", calls)
    spy(monkeypatch, "collate", collated)
    metrics = train_grpo.main(TINY + [f"--model={demo_model}", f"--out_dir={tmp_path}", "--dynamic_sampling=true",
                                      "--max_steps=1"])
    needed, max_calls = 4 * 4, Config().max_resample_rounds + 1
    kept, equal_groups = [], 0
    for n, ((_, _, _, problems, _), _, samples) in enumerate(calls):
        assert len(kept) < needed  # this round was needed
        for i, problem in enumerate(problems):
            if informative(problem):
                kept += samples[4 * i: 4 * i + 4]
            else:
                equal_groups += 1
    assert len(kept) >= needed or len(calls) == max_calls
    assert len(calls) > 1  # the rigged draw needs more than one round
    assert [id(s) for s in collated[0][0][0]] == [id(s) for s in kept[:needed]]
    assert metrics["zero_variance"] == pytest.approx(equal_groups / (4 * len(calls)))


def test_tiny_sft_then_grpo_raises_the_reward(tmp_path):
    """Recipe 3 in a minute: SFT memorises six problems from a teacher that slips half the time, so the model
    answers right about half the time; GRPO with the verifier then makes it answer right more often."""
    import random

    import train_sft
    from data import Tokenizer
    from tasks import DemoTask, build_demo_model, demo_problems, demo_trace, evaluate, metrics
    from model import Transformer

    problems = demo_problems(6, seed=77, heldout=False)
    rng = random.Random(0)
    traces = [{"prompt": p["problem"], "completion": demo_trace(p, rng, slip_rate=0.5)} for _ in range(100)
              for p in problems]
    (tmp_path / "traces.jsonl").write_text("\n".join(json.dumps(t) for t in traces) + "\n")
    (tmp_path / "problems.jsonl").write_text("\n".join(json.dumps({"problem": p["problem"], "answer": p["answer"]})
                                                       for p in problems) + "\n")
    build_demo_model(tmp_path / "init")
    train_sft.main([f"--model={tmp_path / 'init'}", f"--data={tmp_path / 'traces.jsonl'}", "--max_steps=150",
                    "--batch_size=32", "--micro_batch_size=32", "--eval_problems=0", f"--out_dir={tmp_path / 'sft'}",
                    "--log_every=1000", "--warmup_steps=10"])
    train_grpo.main([f"--model={tmp_path / 'sft' / 'final'}", f"--data={tmp_path / 'problems.jsonl'}",
                     "--prompts_per_step=6", "--group_size=8", "--max_steps=12", "--lr=1e-4", "--warmup_steps=0",
                     "--eval_problems=0", f"--out_dir={tmp_path / 'grpo'}", "--log_every=1000",
                     "--sample_every=1000"])
    accuracy = {}
    for stage in ("sft", "grpo"):
        path = tmp_path / stage / "final"
        records = evaluate(Transformer.from_pretrained(path), Tokenizer.from_pretrained(path), DemoTask(),
                           [dict(p, id=str(i)) for i, p in enumerate(problems)], n=64, temperature=1.0, top_p=1.0,
                           max_new_tokens=64, instruction="none", show_progress=False)
        accuracy[stage] = metrics(records, n=64)["pass@1"]
    assert 20 < accuracy["sft"] < 80  # the slips were learned
    assert accuracy["grpo"] > accuracy["sft"] + 10, accuracy
