"""
The Triton kernels and their PyTorch references. Each kernel has one switch, an environment variable read here
and nowhere else, with the same three values:

    ATTENTION_BACKEND          kernels/attention.py         causal/varlen attention (training, packed prefill)
    LOGPROB_BACKEND            kernels/logprob.py           per-token log-probs from the LM head
    DECODE_ATTENTION_BACKEND   kernels/decode_attention.py  the attention of a decode step
    ROPE_CACHE_BACKEND         kernels/rope_cache.py        the rope and KV-cache write of a decode step
    SILU_MUL_BACKEND           kernels/silu_mul.py          the MLP's silu(gate) * up
    ADD_RMS_NORM_BACKEND       kernels/add_rms_norm.py      a residual add and the RMSNorm after it

    auto (default)  Triton when the triton package imports and the tensors are on a GPU, PyTorch otherwise
    triton          the Triton kernel (on CPU tensors only under TRITON_INTERPRET=1)
    torch           the PyTorch reference

A function's explicit backend= argument takes precedence over its variable.
"""

import os

try:
    import triton
except ImportError:
    triton = None

BACKENDS = ("auto", "triton", "torch")


def as_rows(t):
    """(..., C) -> (rows, C) with a unit last stride, without a copy where the layout allows."""
    if t.stride(-1) != 1:
        t = t.contiguous()
    return t.reshape(-1, t.shape[-1])


def choose_backend(variable: str, tensor, backend: str | None = None, triton_fits: bool = True) -> str:
    """"triton" or "torch": backend if given, else the environment variable `variable` (unset or empty: auto).
    auto picks Triton when the triton package imports, `tensor` is on a GPU and triton_fits (the caller's word
    that the kernel takes these inputs). Any other value is a ValueError naming where it came from."""
    source = "backend" if backend else variable
    choice = backend or os.environ.get(variable) or "auto"
    if choice not in BACKENDS:
        raise ValueError(f"{source}={choice!r} is not a backend; allowed values: {', '.join(BACKENDS)}"
                         + (f" (its default comes from {variable})" if backend else ""))
    if choice == "auto":
        return "triton" if triton is not None and tensor.is_cuda and triton_fits else "torch"
    if choice == "triton" and triton is None:
        raise RuntimeError(f"{source}=triton needs the triton package")
    return choice
