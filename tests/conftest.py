"""Shared fixtures: tiny random-weight Hugging Face checkpoints written by transformers (the reference), and the
path to ../shared when it is present."""

import os
import sys

import pytest
import torch

if not torch.cuda.is_available():  # Triton kernels run in its interpreter on CPU tensors (read when kernels import)
    os.environ.setdefault("TRITON_INTERPRET", "1")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
SHARED = os.path.join(os.path.dirname(ROOT), "shared")

TINY = dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)


def write_hf_checkpoint(path, family="qwen2", seed=0, scale=None, **overrides):
    """Writes a random-weight transformers checkpoint of the given family to `path` and returns the HF model. With
    scale, the model is float64 and its matrices are that many times transformers' init: attention sharp enough that
    the rope's base moves the logits, and no near-ties in a greedy argmax."""
    import transformers

    config_class, model_class = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
    }[family]
    kwargs = dict(TINY, **overrides)
    if family == "mistral":
        kwargs.setdefault("sliding_window", None)
    torch.manual_seed(seed)
    hf_model = model_class(config_class(**kwargs)).eval()
    with torch.no_grad():  # transformers initialises norms to 1 and biases to 0: randomise them so they are tested
        for name, p in hf_model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
            elif scale is not None and p.dim() == 2:
                p.mul_(scale)
    if scale is not None:
        hf_model = hf_model.double()
    hf_model.save_pretrained(path)
    return hf_model


def random_config(rng):
    """A tiny config of a random family and shape: GQA groups of 1 to 3, 1 to 4 KV heads, head dims set apart from
    the hidden size, 1 to 3 layers, rope bases far apart, Llama-3 rope scaling, attention biases, tied or not."""
    family = rng.choice(["llama", "qwen2", "qwen3", "mistral"])
    kv_heads, head_dim = rng.choice([1, 2, 4]), rng.choice([8, 16, 32])
    heads = kv_heads * rng.choice([1, 2, 3])
    config = dict(family=family, num_attention_heads=heads, num_key_value_heads=kv_heads,
                  hidden_size=rng.choice([head_dim * heads, 48, 96]), intermediate_size=rng.choice([40, 64, 100]),
                  num_hidden_layers=rng.choice([1, 2, 3]), rope_theta=rng.choice([500.0, 1e4, 1e6]),
                  rms_norm_eps=rng.choice([1e-6, 1e-5, 1e-2]), tie_word_embeddings=rng.random() < 0.5,
                  vocab_size=rng.choice([50, 300]))
    if family != "qwen2" or rng.random() < 0.5:
        config["head_dim"] = head_dim
    if family == "llama" and rng.random() < 0.5:
        config["rope_scaling"] = dict(rope_type="llama3", factor=rng.choice([2.0, 8.0]), low_freq_factor=1.0,
                                      high_freq_factor=4.0, original_max_position_embeddings=rng.choice([16, 32]))
    if family == "llama" and rng.random() < 0.3:
        config["attention_bias"] = True
    return config


def tf32_truncated(x):
    """x as a GPU's TF32 tensor-core product reads an fp32 input: the low 13 of its 23 mantissa bits dropped, in
    float64. Dropping is the cautious model: it biases every product one way, where rounding to nearest would not
    (the log-probs' emulated error is 5x smaller with rounding). The kernel tests' fp32 tolerances on a GPU are
    checked against products of such inputs."""
    return (x.float().view(torch.int32) & ~0x1FFF).view(torch.float32).double()


def record_update_grad_norms(monkeypatch, trainer) -> list:
    """The global gradient norm at each optimizer.step of a run of `trainer` (train_sft or train_grpo): what the
    update sees, after clipping (the logged grad norm is the one before)."""
    norms, real_make_optimizer = [], trainer.make_optimizer

    def recording_optimizer(model, *args, **kwargs):
        optimizer = real_make_optimizer(model, *args, **kwargs)
        real_step = optimizer.step
        grads = lambda: torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        optimizer.step = lambda *a, **k: norms.append(float(grads().norm())) or real_step(*a, **k)
        return optimizer

    monkeypatch.setattr(trainer, "make_optimizer", recording_optimizer)
    return norms


def requires_shared(*parts):
    path = os.path.join(SHARED, *parts)
    return pytest.mark.skipif(not os.path.exists(path), reason=f"{path} is absent (../shared is not in this checkout)")
