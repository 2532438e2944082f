# python -m pytest tests/test_train_grpo.py -q
import itertools
import json
import os
import types

import pytest
import torch

import train_grpo
from train_grpo import Config, group_advantages, kl_estimate, overlong_penalty, policy_loss


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
            loss, _ = policy_loss(logprobs, old, advantages, mask, cfg, num_sequences=B,
                                  num_tokens=int(mask.sum()), kl=kl_values)
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
    _, clip = policy_loss(logprobs, old, torch.tensor([1.0, -1.0]), torch.ones(2, 2), cfg, 2, 4)
    assert clip == {"clip_low": 1, "clip_high": 1}  # ratio 1.5 with A>0 and ratio 0.5 with A<0


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
