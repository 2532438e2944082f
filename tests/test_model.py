# python -m pytest tests/test_model.py -q
import json
import os

import pytest
import torch

from conftest import SHARED, random_config, requires_shared, write_hf_checkpoint
from model import ModelConfig, Transformer, sequence_logprobs

FAMILIES = {
    "llama": dict(family="llama"),
    "llama-tied": dict(family="llama", tie_word_embeddings=True),
    "llama3-rope-scaling": dict(family="llama", rope_scaling=dict(
        rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=32)),
    "llama-attention-bias": dict(family="llama", attention_bias=True),
    "qwen2": dict(family="qwen2"),
    "qwen2-tied": dict(family="qwen2", tie_word_embeddings=True),
    "qwen3": dict(family="qwen3", head_dim=32),
    "qwen3-untied": dict(family="qwen3", tie_word_embeddings=False),
    "mistral": dict(family="mistral"),
    # settings the other families leave at their defaults (Qwen2.5's theta, a norm eps far from 1e-6)
    "qwen2-theta-eps": dict(family="qwen2", rope_theta=1e6, rms_norm_eps=1e-2),
    "llama-eps": dict(family="llama", rms_norm_eps=1e-2),
}


def hf_logits(hf_model, ids):
    with torch.no_grad():
        return hf_model(ids).logits.float()


@pytest.mark.parametrize("name", FAMILIES)
def test_logits_match_transformers(tmp_path, name):
    hf_model = write_hf_checkpoint(tmp_path, **FAMILIES[name])
    model = Transformer.from_pretrained(tmp_path)
    ids = torch.randint(0, 300, (3, 97), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model(ids)
    assert ours.dtype == torch.float32 and ours.shape == (3, 97, 300)
    assert (ours - hf_logits(hf_model, ids)).abs().max() < 1e-4
    # random tiny models barely feel the rope's base in their logits: read it back directly
    hf_config = hf_model.config
    hf_theta = (getattr(hf_config, "rope_parameters", None) or {}).get("rope_theta", getattr(hf_config, "rope_theta", 0))
    assert (model.config.rope_theta, model.config.rms_norm_eps) == (hf_theta, hf_config.rms_norm_eps)


@pytest.mark.parametrize("seed", range(4))
def test_logits_match_transformers_on_generated_configs(tmp_path, seed):
    """Beyond the fixed families above: 6 random configs per seed (conftest.random_config), their matrices scaled up
    so that attention is sharp and the rope's base moves the logits (by 3e-4 to 9e-2 of their largest for a base 1%
    off), in float64 against transformers: within 1e-5 of the largest logit (transformers' RMSNorm computes in
    fp32)."""
    import random

    rng = random.Random(seed)
    for case in range(6):
        config = random_config(rng)
        hf_model = write_hf_checkpoint(tmp_path / str(case), seed=case, scale=rng.choice([4.0, 8.0]), **config)
        model = Transformer.from_pretrained(tmp_path / str(case), dtype=torch.float64)
        ids = torch.randint(0, config["vocab_size"], (2, 70), generator=torch.Generator().manual_seed(case))
        with torch.no_grad():
            expected, ours = hf_model(ids).logits, model(ids).double()
        assert (ours - expected).abs().max() < 1e-5 * expected.abs().max(), config


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprob_path_matches_transformers_at_a_temperature(tmp_path, temperature):
    """model(targets=..., temperature=T): log_softmax(transformers' logits / T) at the targets, and its entropy."""
    from kernels.logprob import IGNORE_INDEX

    hf_model = write_hf_checkpoint(tmp_path, family="qwen2", seed=5)
    model = Transformer.from_pretrained(tmp_path)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 300, (2, 9), generator=generator)
    targets = torch.randint(0, 300, (2, 9), generator=generator)
    targets[0, -3:] = IGNORE_INDEX
    with torch.no_grad():
        logprobs, entropy = model(ids, targets=targets, temperature=temperature, return_entropy=True)
    expected = torch.log_softmax(hf_logits(hf_model, ids) / temperature, dim=-1)  # (B, T, V)
    valid = targets != IGNORE_INDEX
    picked = expected.gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    assert torch.allclose(logprobs[valid], picked[valid], atol=1e-5)
    assert torch.all(logprobs[~valid] == 0)
    assert torch.allclose(entropy[valid], -(expected.exp() * expected).sum(-1)[valid], atol=1e-5)


def test_sequence_logprobs_are_transformers_next_token_log_probs(tmp_path):
    """sequence_logprobs(ids)[:, t] = log p(ids[t] | ids[<t]) from transformers' logits at t - 1 (0 at t = 0), with and
    without a loss mask: the path GRPO's padded passes, SFT and the reference take."""

    hf_model = write_hf_checkpoint(tmp_path, family="qwen2", seed=5)
    model = Transformer.from_pretrained(tmp_path)
    ids = torch.randint(0, 300, (2, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    expected = torch.log_softmax(hf_logits(hf_model, ids), dim=-1)[:, :-1].gather(-1, ids[:, 1:, None])[..., 0]
    with torch.no_grad():
        logprobs, masked = sequence_logprobs(model, ids), sequence_logprobs(model, ids, loss_mask=mask)
    assert torch.all(logprobs[:, 0] == 0) and torch.allclose(logprobs[:, 1:], expected, atol=1e-5)
    assert torch.allclose(masked[mask.bool()], logprobs[mask.bool()], atol=1e-6)
    assert torch.all(masked[~mask.bool()] == 0)


@pytest.mark.parametrize("name", ["qwen2", "qwen2-theta-eps", "llama-attention-bias", "qwen3"])
def test_round_trip_through_transformers(tmp_path, name):
    import transformers

    hf_model = write_hf_checkpoint(tmp_path / "src", **FAMILIES[name])
    model = Transformer.from_pretrained(tmp_path / "src")
    model.save_pretrained(tmp_path / "ours")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours").eval()
    ids = torch.randint(0, 300, (2, 70))
    assert (hf_logits(reloaded, ids) - hf_logits(hf_model, ids)).abs().max() < 1e-5


def test_a_save_into_a_folder_replaces_an_earlier_sharded_save(tmp_path):
    """A stale index from an earlier, sharded save would make from_pretrained load the old weights."""
    write_hf_checkpoint(tmp_path / "src", family="qwen2")
    model = Transformer.from_pretrained(tmp_path / "src")
    model.save_pretrained(tmp_path / "out", max_shard_bytes=100_000)
    assert os.path.exists(tmp_path / "out" / "model.safetensors.index.json")
    with torch.no_grad():
        model.model.norm.weight.add_(1.0)
    model.save_pretrained(tmp_path / "out")
    assert sorted(os.listdir(tmp_path / "out")) == ["config.json", "model.safetensors"]
    assert torch.equal(Transformer.from_pretrained(tmp_path / "out").model.norm.weight, model.model.norm.weight)


def test_a_tied_checkpoint_that_also_stores_the_lm_head_loads(tmp_path):
    """Some tied checkpoints carry lm_head.weight, a copy of the embeddings: it is skipped, not refused."""
    from safetensors.torch import load_file, save_file

    hf_model = write_hf_checkpoint(tmp_path, family="qwen2", tie_word_embeddings=True)
    tensors = load_file(tmp_path / "model.safetensors")
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    ids = torch.randint(0, 300, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (Transformer.from_pretrained(tmp_path)(ids) - hf_logits(hf_model, ids)).abs().max() < 1e-4


def test_packed_log_probs_equal_each_documents_own(tmp_path):
    """In a packed row the first token of a document is not predicted from the previous document's last: its
    log-prob reads 0, and every other equals the one of the document run alone."""
    write_hf_checkpoint(tmp_path, family="qwen2")
    model = Transformer.from_pretrained(tmp_path)
    documents = [torch.randint(0, 300, (n,), generator=torch.Generator().manual_seed(n)) for n in (5, 4, 7)]
    lengths = torch.tensor([0] + [len(d) for d in documents])
    with torch.no_grad():
        packed = sequence_logprobs(model, torch.cat(documents)[None],
                                   torch.cat([torch.arange(len(d)) for d in documents])[None],
                                   lengths.cumsum(0).to(torch.int32))[0]
        alone = torch.cat([sequence_logprobs(model, d[None])[0] for d in documents])
    assert torch.allclose(packed, alone, atol=1e-5)


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_fused_projections_are_saved_under_hugging_face_names(tmp_path, family):
    """The model holds q/k/v_proj as one qkv_proj and gate/up_proj as one gate_up_proj; save_pretrained writes back
    exactly the tensors transformers wrote (names, shapes, bits), also from a meta shell given the model's own
    state_dict (common.save_checkpoint's path under FSDP)."""
    from safetensors.torch import load_file

    write_hf_checkpoint(tmp_path / "src", family=family)
    model = Transformer.from_pretrained(tmp_path / "src")
    names = list(model.state_dict())
    assert "model.layers.0.self_attn.qkv_proj.weight" in names and "model.layers.1.mlp.gate_up_proj.weight" in names
    assert not any(f".{part}." in name for name in names for part in ("q_proj", "k_proj", "v_proj", "gate_proj",
                                                                       "up_proj"))
    with torch.device("meta"):
        shell = Transformer(model.config)
    shell.load_state_dict(model.state_dict(), assign=True)
    shell.save_pretrained(tmp_path / "ours")
    source = load_file(tmp_path / "src" / "model.safetensors")
    saved = load_file(tmp_path / "ours" / "model.safetensors")
    assert sorted(saved) == sorted(source)
    assert all(torch.equal(saved[name], source[name]) for name in source)
    assert sorted(model.hf_state_dict()) == sorted(source)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_sharded_save_and_load(tmp_path, family):
    import transformers

    write_hf_checkpoint(tmp_path / "src", family=family, tie_word_embeddings=True)
    model = Transformer.from_pretrained(tmp_path / "src")
    model.save_pretrained(tmp_path / "sharded", max_shard_bytes=40_000)
    shards = [f for f in os.listdir(tmp_path / "sharded") if f.endswith(".safetensors")]
    assert len(shards) > 2 and os.path.exists(tmp_path / "sharded" / "model.safetensors.index.json")
    ours = Transformer.from_pretrained(tmp_path / "sharded")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "sharded").eval()
    ids = torch.randint(0, 300, (1, 40))
    with torch.no_grad():
        assert torch.equal(ours(ids), model(ids))
    assert (hf_logits(hf, ids) - ours(ids).detach()).abs().max() < 1e-4


def test_from_pretrained_dtype_and_hidden_path(tmp_path):
    write_hf_checkpoint(tmp_path, family="qwen2")
    model = Transformer.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    ids = torch.randint(0, 300, (2, 9))
    hidden = model(ids, return_hidden=True)
    assert hidden.shape == (2, 9, 64)
    assert torch.allclose(model(ids), (hidden @ model.lm_head_weight.T).float())


def test_missing_tensor_is_named(tmp_path):
    from safetensors.torch import load_file, save_file

    write_hf_checkpoint(tmp_path, family="qwen2")
    state = load_file(tmp_path / "model.safetensors")
    del state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"missing tensors \['model.layers.1.mlp.up_proj.weight'\]"):
        Transformer.from_pretrained(tmp_path)


def test_wrong_shape_is_named(tmp_path):
    from safetensors.torch import load_file, save_file

    write_hf_checkpoint(tmp_path, family="llama")
    state = load_file(tmp_path / "model.safetensors")
    state["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(7, 64)
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"model.layers.0.self_attn.k_proj.weight: checkpoint \(7, 64\)"):
        Transformer.from_pretrained(tmp_path)


def test_unexpected_tensor_is_named(tmp_path):
    from safetensors.torch import load_file, save_file

    write_hf_checkpoint(tmp_path, family="llama")
    state = load_file(tmp_path / "model.safetensors")
    state["model.extra.weight"] = torch.zeros(2)
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"unexpected tensors \['model.extra.weight'\]"):
        Transformer.from_pretrained(tmp_path)


@pytest.mark.parametrize("field, value, message", [
    ("architectures", ["GPT2LMHeadModel"], "architectures"),
    ("use_sliding_window", True, "use_sliding_window"),
    ("num_experts", 8, "num_experts"),
    ("rope_scaling", {"rope_type": "yarn", "factor": 4.0}, "yarn"),
    ("hidden_act", "gelu", "hidden_act"),
])
def test_unsupported_config_is_refused(tmp_path, field, value, message):
    write_hf_checkpoint(tmp_path, family="qwen2")
    config = json.loads((tmp_path / "config.json").read_text())
    config.pop("rope_parameters" if field == "rope_scaling" else field, None)
    config[field] = value
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=message):
        Transformer.from_pretrained(tmp_path)


def test_packed_sequences_equal_separate_forwards(tmp_path):
    write_hf_checkpoint(tmp_path, family="qwen3")
    model = Transformer.from_pretrained(tmp_path)
    lengths = [5, 1, 23]
    docs = [torch.randint(0, 300, (1, n)) for n in lengths]
    packed = torch.cat(docs, dim=1)
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None]
    cu_seqlens = torch.tensor([0, 5, 6, 29], dtype=torch.int32)
    with torch.no_grad():
        together = model(packed, position_ids=position_ids, cu_seqlens=cu_seqlens)
        apart = torch.cat([model(d) for d in docs], dim=1)
    assert (together - apart).abs().max() < 1e-5


@pytest.mark.parametrize("family", ["qwen2-tied", "qwen3-untied"])
def test_a_loss_mask_scores_only_its_tokens_with_the_same_values_and_gradients(tmp_path, family):
    """sequence_logprobs(loss_mask=...) runs the head at the masked tokens' predecessors only: the same log-probs,
    entropies and parameter gradients there as the unmasked call, 0 elsewhere (prompts and padding cost nothing)."""
    from model import sequence_logprobs

    write_hf_checkpoint(tmp_path, **FAMILIES[family])
    ids = torch.randint(0, 300, (3, 11), generator=torch.Generator().manual_seed(2))
    loss_mask = torch.zeros(3, 11, dtype=torch.long)
    loss_mask[0, 4:] = 1
    loss_mask[1, 9:10] = 1
    loss_mask[2, 1:6] = 1
    results = []
    for mask in (None, loss_mask):
        model = Transformer.from_pretrained(tmp_path)
        logprobs, entropy = sequence_logprobs(model, ids, temperature=0.8, return_entropy=True, loss_mask=mask)
        ((logprobs * loss_mask).sum() + (entropy * loss_mask).sum() * 0.3).backward()
        results.append((logprobs, entropy, {n: p.grad for n, p in model.named_parameters()}))
    (full_lp, full_ent, full_grads), (lp, ent, grads) = results
    on = loss_mask.bool()
    assert torch.allclose(lp[on], full_lp[on], atol=1e-6) and torch.all(lp[~on] == 0)
    assert torch.allclose(ent[on], full_ent[on], atol=1e-6) and torch.all(ent[~on] == 0)
    for name in full_grads:
        assert torch.allclose(grads[name], full_grads[name], atol=1e-6), name


@pytest.mark.parametrize("family", ["qwen2-tied", "qwen3-untied", "llama3-rope-scaling"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_shared_prompts_give_the_padded_rows_log_probs_and_gradients(tmp_path, monkeypatch, family, checkpointing):
    """shared_prompt_logprobs runs each run of consecutive rows with one prompt as one prompt forward plus its
    completions (model.SharedPrompts): the log-probs, entropies and parameter gradients of sequence_logprobs over
    the right-padded rows, in float64. The rows: groups of different prompt lengths, a prompt repeated after another
    (not shared: not consecutive), two prompts of one length, a row whose loss mask is empty, one-token
    completions, padding; completions attend in buckets of 2, so that lengths are sorted across buckets and their
    tokens put back in row order."""
    import model as model_module
    from model import sequence_logprobs, shared_prompt_logprobs

    write_hf_checkpoint(tmp_path, **FAMILIES[family])
    generator = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 300, (n,), generator=generator).tolist() for n in (7, 2, 12, 7)]
    groups = [(prompts[0], 3), (prompts[3], 1), (prompts[1], 2), (prompts[2], 1), (prompts[0], 2)]
    rows = [(p, torch.randint(3, 300, (int(torch.randint(1, 9, (), generator=generator)),), generator=generator)
             .tolist()) for p, size in groups for _ in range(size)]
    rows[1] = (rows[1][0], rows[1][1][:1])
    T = max(len(p) + len(c) for p, c in rows) + 2
    ids, loss_mask = torch.zeros(len(rows), T, dtype=torch.long), torch.zeros(len(rows), T, dtype=torch.long)
    for i, (p, c) in enumerate(rows):
        ids[i, :len(p) + len(c)] = torch.tensor(p + c)
        loss_mask[i, len(p):len(p) + len(c)] = 1
    loss_mask[5] = 0
    prompt_lengths = torch.tensor([len(p) for p, _ in rows])
    lengths = torch.tensor([len(p) + len(c) for p, c in rows])
    weights = torch.rand(len(rows), T, generator=generator, dtype=torch.float64)
    layouts = []

    class Recorded(model_module.SharedPrompts):
        def __init__(self, *args):
            super().__init__(*args)
            layouts.append(self)

    monkeypatch.setattr(model_module, "SharedPrompts", Recorded)
    monkeypatch.setattr(model_module, "COMPLETIONS_PER_BUCKET", 2)
    results = []
    for shared in (False, True):
        model = Transformer.from_pretrained(tmp_path).double()
        model.gradient_checkpointing = checkpointing
        model.train()
        if shared:
            logprobs, entropy = shared_prompt_logprobs(model, ids, prompt_lengths, lengths, temperature=0.8,
                                                       return_entropy=True, loss_mask=loss_mask)
        else:
            logprobs, entropy = sequence_logprobs(model, ids, temperature=0.8, return_entropy=True,
                                                  loss_mask=loss_mask)
        ((logprobs * weights).sum() + (entropy * weights).sum() * 0.3).backward()
        results.append((logprobs, entropy, {n: p.grad for n, p in model.named_parameters()}))
    (padded_lp, padded_ent, padded_grads), (lp, ent, grads) = results
    assert [(len(layout.prompt_real), len(layout.completion_real)) for layout in layouts] == [(5, 9)]
    assert len(layouts[0].buckets) == 5
    assert int((lp != 0).sum()) == int(loss_mask.sum()) and torch.all(lp[~loss_mask.bool()] == 0)
    assert (lp - padded_lp).abs().max() < 1e-12 and (ent - padded_ent).abs().max() < 1e-12
    for name in padded_grads:
        assert torch.allclose(grads[name], padded_grads[name], atol=1e-12, rtol=0), name


def test_gradient_checkpointing_gives_same_gradients(tmp_path):
    write_hf_checkpoint(tmp_path, family="llama")
    ids = torch.randint(0, 300, (2, 16))
    grads = []
    for checkpointing in (False, True):
        model = Transformer.from_pretrained(tmp_path).train()
        model.gradient_checkpointing = checkpointing
        model(ids).logsumexp(-1).mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


@requires_shared("assets", "configs")
@pytest.mark.parametrize("name, parameters", [
    ("qwen2.5-1.5b-instruct.json", 1_543_714_304),  # model card: 1.54B, 1.31B without the (tied) embedding
    ("deepseek-r1-distill-qwen-7b.json", 7_615_616_512),  # 7.62B, untied head
    ("llama-3.2-1b-instruct.json", 1_235_814_400),  # 1.24B, tied
    # 1.7B (1.4B without the embedding): 28 x 50,336,000 per block + 151,936 x 2,048 tied + the final norm
    ("qwen3-1.7b.json", 1_720_574_976)])
def test_real_configs_build_on_meta_without_memory(name, parameters):
    with open(os.path.join(SHARED, "assets", "configs", name)) as f:
        config = ModelConfig.from_hf(json.load(f), source=name)
    with torch.device("meta"):
        model = Transformer(config)
    assert all(p.is_meta for p in model.parameters())
    assert model.num_parameters() == parameters
