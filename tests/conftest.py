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


def write_hf_checkpoint(path, family="qwen2", seed=0, **overrides):
    """Writes a random-weight transformers checkpoint of the given family to `path` and returns the HF model."""
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
    hf_model.save_pretrained(path)
    return hf_model


def tf32_truncated(x):
    """x as a GPU's TF32 tensor-core product reads an fp32 input: the low 13 of its 23 mantissa bits dropped (rounding
    would halve the error), in float64. The kernel tests' fp32 tolerances on a GPU are checked against products of
    such inputs."""
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
