# python -m pytest tests/test_kernel_switches.py -q
"""One switch per kernel (kernels.choose_backend): ATTENTION_BACKEND, LOGPROB_BACKEND, DECODE_ATTENTION_BACKEND,
ROPE_CACHE_BACKEND, SILU_MUL_BACKEND and ADD_RMS_NORM_BACKEND, each auto | triton | torch. Each public entry and the model's decode step honour their variable,
the explicit backend= argument wins over it, and a bad value is refused naming the variable and the allowed values.
The Triton functions are replaced by recorders that run the references, so this runs on any CPU."""
import pytest
import torch

import kernels
import kernels.add_rms_norm as norm_module
import kernels.attention as attention_module
import kernels.decode_attention as decode_module
import kernels.logprob as logprob_module
import kernels.rope_cache as rope_module
import kernels.silu_mul as silu_module
from conftest import write_hf_checkpoint

VARIABLES = ["ATTENTION_BACKEND", "LOGPROB_BACKEND", "DECODE_ATTENTION_BACKEND", "ROPE_CACHE_BACKEND", "SILU_MUL_BACKEND",
             "ADD_RMS_NORM_BACKEND"]


@pytest.fixture
def clean_env(monkeypatch):
    """No switch set, and the triton package treated as present whether or not it is installed."""
    for variable in VARIABLES:
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setattr(kernels, "triton", object())
    return monkeypatch


@pytest.mark.parametrize("variable", VARIABLES)
def test_choose_backend_reads_its_variable(clean_env, variable):
    cpu = torch.zeros(1)
    assert kernels.choose_backend(variable, cpu) == "torch"  # unset: auto, and auto on CPU is torch
    for value, chosen in (("", "torch"), ("auto", "torch"), ("torch", "torch"), ("triton", "triton")):
        clean_env.setenv(variable, value)
        assert kernels.choose_backend(variable, cpu) == chosen
    assert kernels.choose_backend(variable, cpu, backend="torch") == "torch"  # the argument wins
    clean_env.setenv(variable, "cuda")
    with pytest.raises(ValueError, match=rf"{variable}='cuda'.*allowed values: auto, triton, torch"):
        kernels.choose_backend(variable, cpu)
    assert kernels.choose_backend(variable, cpu, backend="triton") == "triton"  # never reads the bad value
    clean_env.setattr(kernels, "triton", None)
    clean_env.setenv(variable, "triton")
    with pytest.raises(RuntimeError, match=rf"{variable}=triton needs the triton package"):
        kernels.choose_backend(variable, cpu)
    clean_env.setenv(variable, "auto")
    assert kernels.choose_backend(variable, cpu) == "torch"


def test_choose_backend_auto_on_a_gpu_tensor(clean_env):
    class OnGpu:
        is_cuda = True

    assert kernels.choose_backend("ATTENTION_BACKEND", OnGpu()) == "triton"
    assert kernels.choose_backend("ATTENTION_BACKEND", OnGpu(), triton_fits=False) == "torch"
    clean_env.setenv("ATTENTION_BACKEND", "torch")
    assert kernels.choose_backend("ATTENTION_BACKEND", OnGpu()) == "torch"
    with pytest.raises(ValueError, match=r"backend='cuda'.*allowed values.*ATTENTION_BACKEND"):
        kernels.choose_backend("ATTENTION_BACKEND", OnGpu(), backend="cuda")


def entries(monkeypatch, calls):
    """Each public entry with its Triton function replaced by a recorder that runs the reference: (variable,
    a call of the entry with an optional backend=)."""
    generator = torch.Generator().manual_seed(0)
    randn = lambda *shape: torch.randn(*shape, generator=generator, dtype=torch.float64)

    class FakeFlash:
        @staticmethod
        def apply(q, k, v, causal, cu_seqlens, scale):
            calls.append("ATTENTION_BACKEND")
            return attention_module.attention_ref(q, k, v, causal, cu_seqlens, None, scale, True)

    class FakeFused:
        @staticmethod
        def apply(hidden, weight, targets, temperature, ignore_index):
            calls.append("LOGPROB_BACKEND")
            return logprob_module.token_logprobs_ref(hidden, weight, targets, temperature, True, ignore_index)

    def fake_decode(*args):
        calls.append("DECODE_ATTENTION_BACKEND")
        return decode_module.decode_attention_ref(*args)

    def fake_rope(*args):
        calls.append("ROPE_CACHE_BACKEND")
        return rope_module.rope_and_cache_ref(*args)

    class FakeSiLUMul:
        @staticmethod
        def apply(gate_up):
            calls.append("SILU_MUL_BACKEND")
            return silu_module.silu_mul_ref(gate_up)

    class FakeAddRMSNorm:
        @staticmethod
        def apply(x, delta, weight, eps):
            calls.append("ADD_RMS_NORM_BACKEND")
            return norm_module.add_rms_norm_ref(x, delta, weight, eps)

    monkeypatch.setattr(attention_module, "FlashAttention", FakeFlash)
    monkeypatch.setattr(silu_module, "SiLUMul", FakeSiLUMul)
    monkeypatch.setattr(norm_module, "AddRMSNorm", FakeAddRMSNorm)
    monkeypatch.setattr(logprob_module, "FusedLogprob", FakeFused)
    monkeypatch.setattr(decode_module, "decode_attention_triton", fake_decode)
    monkeypatch.setattr(rope_module, "rope_and_cache_triton", fake_rope)
    q = randn(2, 4, 6, 8)
    hidden, weight, targets = randn(5, 8), randn(11, 8), torch.tensor([1, 2, 3, 4, 5])
    dq = randn(3, 4, 8)
    k_cache, v_cache = randn(4, 2, 9, 8), randn(4, 2, 9, 8)
    slots, lengths = torch.tensor([3, 0, 1]), torch.tensor([9, 1, 4])
    kv, cos, sin = randn(3, 2, 8), randn(3, 8), randn(3, 8)
    return [
        ("ATTENTION_BACKEND", lambda **kw: attention_module.attention(q, q, q, **kw)),
        ("LOGPROB_BACKEND", lambda **kw: logprob_module.token_logprobs(hidden, weight, targets, **kw)),
        ("DECODE_ATTENTION_BACKEND",
         lambda **kw: decode_module.decode_attention(dq, k_cache, v_cache, slots, lengths, **kw)),
        ("ROPE_CACHE_BACKEND", lambda **kw: rope_module.rope_and_cache(dq, kv, kv, cos, sin, k_cache.clone(),
                                                                       v_cache.clone(), slots, lengths - 1, **kw)),
        ("SILU_MUL_BACKEND", lambda **kw: silu_module.silu_mul(hidden, **kw)),  # hidden's 8 columns: gate | up
        ("ADD_RMS_NORM_BACKEND", lambda **kw: norm_module.add_rms_norm(hidden, hidden, hidden[0], 1e-6, **kw)[1]),
    ]


@pytest.mark.parametrize("index", range(len(VARIABLES)), ids=VARIABLES)
def test_each_entry_honours_its_variable_and_its_argument(clean_env, index):
    calls = []
    variable, call = entries(clean_env, calls)[index]
    reference = call()  # unset: auto, the reference on CPU
    assert calls == []
    clean_env.setenv(variable, "triton")
    assert torch.allclose(call(), reference) and calls == [variable]
    assert torch.equal(call(backend="torch"), reference) and calls == [variable]  # the argument wins
    clean_env.setenv(variable, "torch")
    assert torch.equal(call(), reference) and calls == [variable]
    call(backend="triton")
    assert calls == [variable, variable]
    for other in VARIABLES:  # another kernel's variable changes nothing here
        if other != variable:
            clean_env.setenv(other, "triton")
    assert torch.equal(call(), reference) and calls == [variable, variable]
    clean_env.setenv(variable, "Triton")
    with pytest.raises(ValueError, match=rf"{variable}='Triton'.*allowed values: auto, triton, torch"):
        call()
    with pytest.raises(ValueError, match=r"backend='gpu'"):
        call(backend="gpu")


@pytest.mark.parametrize("rope, decode", [("torch", "triton"), ("triton", "torch"), ("triton", "triton")])
def test_model_decode_step_honours_both_decode_variables(clean_env, tmp_path, rope, decode):
    """The decode step's rope + cache write and its attention switch independently; every mix decodes the greedy
    tokens of the all-torch path (the 'Triton' functions here being the references)."""
    import model as model_module
    from model import Transformer
    from sampler import generate

    calls = []

    def recorder(name, function):
        def record(*args, backend):
            calls.append((name, backend))
            return function(*args, backend="torch")
        return record

    clean_env.setattr(model_module, "rope_and_cache", recorder("rope", rope_module.rope_and_cache))
    clean_env.setattr(model_module, "decode_attention", recorder("decode", decode_module.decode_attention))
    write_hf_checkpoint(tmp_path, family="qwen2", seed=4)
    model = Transformer.from_pretrained(tmp_path)
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12, 13], [3]]
    through_torch = generate(model, prompts, max_new_tokens=8, temperature=0, logprobs_mode="raw")
    assert calls == []
    clean_env.setenv("ROPE_CACHE_BACKEND", rope)
    clean_env.setenv("DECODE_ATTENTION_BACKEND", decode)
    mixed = generate(model, prompts, max_new_tokens=8, temperature=0, logprobs_mode="raw")
    expected = {("rope", "triton")} if rope == "triton" else set()
    expected |= {("decode", "triton")} if decode == "triton" else set()
    assert set(calls) == expected
    assert [c.tokens for c in mixed] == [c.tokens for c in through_torch]
    for a, b in zip(mixed, through_torch):
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-5)
    clean_env.setenv("DECODE_ATTENTION_BACKEND", "kernel")
    with pytest.raises(ValueError, match=r"DECODE_ATTENTION_BACKEND='kernel'.*auto, triton, torch"):
        generate(model, prompts, max_new_tokens=2, temperature=0)
