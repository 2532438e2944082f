"""
A hand-written decoder-only transformer for the Llama, Mistral, Qwen2 and Qwen3 families.

It loads Hugging Face checkpoints (config.json + safetensors, sharded or not) and saves folders that transformers
and vLLM load back unchanged. Parameter names are Hugging Face's, except that each layer holds q/k/v_proj as one
qkv_proj and gate/up_proj as one gate_up_proj (one GEMM each; FUSED): from_pretrained concatenates the checkpoint's
tensors, save_pretrained and hf_state_dict() split them back.

    model = Transformer.from_pretrained("path/to/Qwen2.5-1.5B-Instruct", device="cuda", dtype=torch.bfloat16)
    logits = model(input_ids)                                   # (B, T, vocab), float32
    hidden = model(input_ids, return_hidden=True)               # (B, T, dim): for the fused log-prob path
    logits = model(packed_ids, position_ids=pos, cu_seqlens=cu) # several documents in one row, no cross-talk
    logprobs = shared_prompt_logprobs(model, ids, prompt_lengths, lengths)  # rows repeating a prompt: its forward once
    model.save_pretrained("out/")

The family differences are all small switches on one block:
  Llama/Mistral: no biases, optional "llama3" rope scaling (Llama-3.1/3.2)
  Qwen2:         bias on q/k/v projections
  Qwen3:         RMSNorm over each head of q and k before rope, explicit head_dim
This file never imports torch.distributed: the training scripts wrap a plain model.
"""

import json
import math
import os
from dataclasses import dataclass, field, fields

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from kernels import choose_backend
from kernels.add_rms_norm import add_rms_norm, rms_norm
from kernels.attention import attention
from kernels.decode_attention import decode_attention, gather_blocks
from kernels.logprob import IGNORE_INDEX, kl_full, token_logprobs
from kernels.rope_cache import rope_and_cache
from kernels.silu_mul import silu_mul

SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}


# -----------------------------------------------------------------------------
# config


@dataclass
class ModelConfig:
    architecture: str = "Qwen2ForCausalLM"
    vocab_size: int = 151936
    hidden_size: int = 1536
    intermediate_size: int = 8960
    num_hidden_layers: int = 28
    num_attention_heads: int = 12
    num_key_value_heads: int = 2
    head_dim: int = 0  # 0: hidden_size // num_attention_heads
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # {"rope_type": "llama3", "factor", "low_freq_factor", ...}
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2 always; Llama/Qwen3 when attention_bias (then o_proj too)
    o_bias: bool = False
    qk_norm: bool = False  # Qwen3
    torch_dtype: str = "bfloat16"
    bos_token_id: int | None = None
    eos_token_id: int | list | None = None
    extra: dict = field(default_factory=dict)  # other config.json fields, written back unchanged

    def __post_init__(self):
        if self.head_dim == 0:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )

    @property
    def model_type(self):
        return SUPPORTED_ARCHITECTURES[self.architecture]

    @classmethod
    def from_hf(cls, hf: dict, source: str = "config.json") -> "ModelConfig":
        """Reads a Hugging Face config dict; refuses, naming the field, what this model does not implement."""
        if not isinstance(hf, dict):
            raise ValueError(f"{source}: expected a JSON object, got {type(hf).__name__}")
        for required in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
            if not isinstance(hf.get(required), int):
                problem = "is missing" if required not in hf else f"is {hf[required]!r}, not an integer"
                raise ValueError(f"{source}: field '{required}' {problem}")
        archs = hf.get("architectures") or []
        if len(archs) != 1 or archs[0] not in SUPPORTED_ARCHITECTURES:
            raise ValueError(f"{source}: field 'architectures' is {archs}; "
                             f"supported: {sorted(SUPPORTED_ARCHITECTURES)}")
        arch = archs[0]
        refuse = lambda name, why: ValueError(f"{source}: field '{name}' = {hf.get(name)!r} is not supported ({why})")
        if hf.get("use_sliding_window") or (arch == "MistralForCausalLM" and hf.get("sliding_window") is not None):
            name = "use_sliding_window" if "use_sliding_window" in hf else "sliding_window"
            raise refuse(name, "sliding-window attention")
        if any(t != "full_attention" for t in hf.get("layer_types") or []):
            raise refuse("layer_types", "only full_attention layers")
        for moe_field in ("num_experts", "num_local_experts", "n_routed_experts"):
            if hf.get(moe_field):
                raise refuse(moe_field, "mixture-of-experts")
        if hf.get("hidden_act", "silu") != "silu":
            raise refuse("hidden_act", "only silu (SwiGLU)")
        if hf.get("mlp_bias"):
            raise refuse("mlp_bias", "MLP without bias only")
        # transformers 5 writes rope settings as rope_parameters; earlier versions as rope_theta + rope_scaling
        rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
        rope_theta = rope.pop("rope_theta", hf.get("rope_theta", 10000.0))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "llama3"):
            raise refuse("rope_scaling", f"rope_type {rope_type!r}; supported: default, llama3")
        attention_bias = bool(hf.get("attention_bias", False))
        known = {f.name for f in fields(cls)} | {
            "architectures", "model_type", "rope_parameters", "attention_bias", "dtype", "transformers_version"
        }
        return cls(
            architecture=arch,
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_hidden_layers=hf["num_hidden_layers"],
            num_attention_heads=hf["num_attention_heads"],
            num_key_value_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
            head_dim=hf.get("head_dim") or 0,
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope_theta),
            rope_scaling=rope if rope_type == "llama3" else None,
            max_position_embeddings=hf.get("max_position_embeddings", 32768),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            qkv_bias=arch == "Qwen2ForCausalLM" or attention_bias,
            o_bias=arch != "Qwen2ForCausalLM" and attention_bias,
            qk_norm=arch == "Qwen3ForCausalLM",
            torch_dtype=str(hf.get("torch_dtype") or hf.get("dtype") or "bfloat16"),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=hf.get("eos_token_id"),
            extra={k: v for k, v in hf.items() if k not in known},
        )

    def to_hf(self) -> dict:
        hf = dict(self.extra)
        hf.update(
            architectures=[self.architecture],
            model_type=self.model_type,
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            head_dim=self.head_dim,
            rms_norm_eps=self.rms_norm_eps,
            rope_theta=self.rope_theta,
            rope_scaling=self.rope_scaling,
            max_position_embeddings=self.max_position_embeddings,
            tie_word_embeddings=self.tie_word_embeddings,
            hidden_act="silu",
            torch_dtype=self.torch_dtype,
            bos_token_id=self.bos_token_id,
            eos_token_id=self.eos_token_id,
        )
        if self.architecture != "Qwen2ForCausalLM":
            hf["attention_bias"] = self.qkv_bias
        return hf


# Hugging Face tensors that this model holds concatenated in one parameter (along dim 0, in this order), so that
# a layer runs one GEMM where the checkpoint has two or three: the model's own state_dict has the fused names,
# checkpoints on disk the Hugging Face ones (from_pretrained concatenates, save_pretrained splits)
FUSED = {"self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
         "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj")}


def fused_parts(name: str, config: ModelConfig) -> list[tuple[str, int]] | None:
    """The Hugging Face tensors a fused parameter holds, [(name, rows), ...] in order along dim 0, or None for a
    parameter stored as it is: "model.layers.0.mlp.gate_up_proj.weight" -> [("model.layers.0.mlp.gate_proj.weight",
    intermediate_size), ("model.layers.0.mlp.up_proj.weight", intermediate_size)]."""
    for fused, parts in FUSED.items():
        prefix, found, suffix = name.partition(f".{fused}.")
        if found:
            kv_rows = config.num_key_value_heads * config.head_dim
            rows = (config.intermediate_size,) * 2 if fused == "mlp.gate_up_proj" else \
                (config.num_attention_heads * config.head_dim, kv_rows, kv_rows)
            return [(f"{prefix}.{part}.{suffix}", n) for part, n in zip(parts, rows)]
    return None


def to_hf_state(state: dict, config: ModelConfig) -> dict:
    """The model's state dict under Hugging Face names: each fused tensor split into its parts (views, no copy)."""
    hf = {}
    for name, tensor in state.items():
        parts = fused_parts(name, config)
        if parts is None:
            hf[name] = tensor
        else:
            hf.update(zip([n for n, _ in parts], tensor.split([rows for _, rows in parts])))
    return hf


def from_hf_state(hf: dict, names, config: ModelConfig) -> dict:
    """The model's tensors `names` from Hugging Face ones, concatenating the parts of each fused tensor; the
    tensors used are popped from hf, so that a part is freed once its fused copy exists."""
    return {name: hf.pop(name) if (parts := fused_parts(name, config)) is None
            else torch.cat([hf.pop(part) for part, _ in parts]) for name in names}


# -----------------------------------------------------------------------------
# building blocks


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return rms_norm(x, self.weight, self.eps)  # kernels/add_rms_norm.py: in fp32, as transformers does


def rope_inv_freq(config: ModelConfig, device=None) -> torch.Tensor:
    """Inverse frequencies (head_dim/2,), with Llama-3.x's wavelength-dependent scaling when configured."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, device=device, dtype=torch.int64).float() / dim))
    scaling = config.rope_scaling
    if scaling:  # "llama3": keep high frequencies, divide low ones by factor, interpolate between
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_context = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        smooth = (old_context / wavelen - low) / (high - low)
        interpolated = (1 - smooth) * inv_freq / factor + smooth * inv_freq
        inv_freq = torch.where(wavelen > old_context / low, inv_freq / factor, inv_freq)
        is_medium = (wavelen <= old_context / low) & (wavelen >= old_context / high)
        inv_freq = torch.where(is_medium, interpolated, inv_freq)
    return inv_freq


def rope_cos_sin(position_ids, inv_freq, dtype):
    """cos and the signed sin that apply_rope expects, each (B, 1, T, head_dim)."""
    freqs = position_ids[..., None].float() * inv_freq  # (B, T, head_dim/2)
    cos, sin = freqs.cos(), freqs.sin()
    return torch.cat((cos, cos), dim=-1).to(dtype)[:, None], torch.cat((-sin, sin), dim=-1).to(dtype)[:, None]


def apply_rope(x, cos, signed_sin):
    """Rotates each (x1, x2) half-pair: x * cos + (-x2, x1) * sin. Rolling x by half a head gives (x2, x1), and the
    sign lives in signed_sin = (-sin, sin): three ops instead of six, for the same values."""
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, dims=-1), signed_sin)


class KVCache:
    """The sampler's keys and values, paged: per layer (num_blocks, kv_heads, block_size, head_dim). Position p of a
    sequence lives in block block_table[p // block_size] of its table, at offset p % block_size, so a sequence holds
    only the blocks its tokens fill, and the n samples of a prompt share the prompt's full blocks (sampler.BlockPool
    hands blocks out and takes them back). Block 0 is never handed out: a table's entries past a sequence's blocks,
    and the rows of idle slots, point at it, so the writes nobody reads land there."""

    def __init__(self, config: ModelConfig, num_blocks: int, block_size: int, max_len: int, device, dtype):
        # keys and values of every layer in one tensor (2, layers, num_blocks, kv_heads, block_size, head_dim), so
        # that copy_blocks moves blocks of every layer in two ops; self.k and self.v are per-layer views of it
        layer_shape = (num_blocks, config.num_key_value_heads, block_size, config.head_dim)
        self.keys_values = torch.zeros((2, config.num_hidden_layers, *layer_shape), device=device, dtype=dtype)
        self.k, self.v = list(self.keys_values[0].unbind(0)), list(self.keys_values[1].unbind(0))
        self.num_blocks, self.block_size, self.max_len = num_blocks, block_size, max_len
        self.rope = None  # (cos, signed_sin), each (max_len, head_dim): rope_table's, made on first use

    def rope_table(self, inv_freq, dtype):
        """cos and signed_sin (max_len, head_dim) of every cache position, computed once (rope_cos_sin's values):
        a forward through the cache indexes its rows instead of recomputing them."""
        if self.rope is None or self.rope[0].dtype != dtype or self.rope[0].device != inv_freq.device:
            positions = torch.arange(self.max_len, device=inv_freq.device)[None]
            self.rope = tuple(t[0, 0] for t in rope_cos_sin(positions, inv_freq, dtype))
        return self.rope

    @staticmethod
    def bytes_per_token(config: ModelConfig, dtype) -> int:
        element = torch.empty((), dtype=dtype).element_size()
        return 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * element

    def copy_blocks(self, sources: torch.Tensor, targets: torch.Tensor):
        """Copies whole blocks, every layer: a prompt's last, partly filled block for each of its other samples, or
        a running sequence's block into the hole a finished one left (the sampler's compact)."""
        self.keys_values.index_copy_(2, targets, self.keys_values.index_select(2, sources))


@dataclass
class CacheView:
    """What one forward reads and writes in the sampler's KVCache. The caller sets the first fields;
    Transformer.forward derives the others afresh at every call, so one view may serve many steps (the CUDA graph
    reuses its own) and needs no copy.
      decode (T == 1), padded prefill:  kv, block_table (B, max_blocks), positions (B, T), key_len, first_block
      packed prefill:                   kv, block_table (prompts, max_blocks), positions (1, total), token_rows
                                        (with cu_seqlens)"""

    kv: KVCache
    positions: torch.Tensor  # (B, T) the position of each input token in its sequence
    block_table: torch.Tensor  # (rows, max_blocks) int64: each sequence's blocks in position order
    key_len: int = 0  # the keys each row attends over: positions [0, key_len)
    first_block: int | None = None  # set when every row is one block, first_block, first_block + 1, ...: views of
    # the cache, no gather (the sampler's layout when a block holds a whole sequence)
    token_rows: torch.Tensor | None = None  # (total,) packed prefill: each token's row of block_table
    # derived by Transformer.forward
    blocks: torch.Tensor | None = field(default=None, init=False)  # (B, T) the block of each input token's position
    offsets: torch.Tensor | None = field(default=None, init=False)  # (B, T) its offset in that block
    lengths: torch.Tensor | None = field(default=None, init=False)  # (B,) decode: the keys each row sees
    key_bias: torch.Tensor | None = field(default=None, init=False)  # (B * kv_heads, 1, key_len) decode: -inf past
    # a row's length, else 0 (added to the scores)
    write_index: torch.Tensor | None = field(default=None, init=False)  # (B, kv_heads, T, head_dim) positions
    visible: torch.Tensor | None = field(default=None, init=False)  # (B, 1, T, key_len) padded prefill
    rope_backend: str = field(default="torch", init=False)  # decode: ROPE_CACHE_BACKEND's choice
    attention_backend: str = field(default="torch", init=False)  # decode: DECODE_ATTENTION_BACKEND's choice

    def layer(self, index):
        """This layer's key and value caches, (num_blocks, kv_heads, block_size, head_dim) each."""
        return self.kv.k[index], self.kv.v[index]

    def locate(self):
        """The block and offset of every input token's position (once per forward, for every layer)."""
        block_size = self.kv.block_size
        if self.token_rows is not None:  # packed: one row of tokens from several sequences
            self.blocks = self.block_table[self.token_rows, self.positions[0] // block_size][None]
        else:
            self.blocks = self.block_table.gather(1, self.positions // block_size)
        self.offsets = self.positions % block_size

    def rows(self):
        """The batch rows' blocks when each row is one block: a slice of the cache."""
        return slice(self.first_block, self.first_block + self.block_table.shape[0])

    def prefix(self, k_cache, v_cache):
        """The batch rows' keys and values up to key_len, (B, kv_heads, key_len, head_dim): views of the cache when
        each row is one block, else gathered from the rows' blocks."""
        if self.first_block is not None:
            return k_cache[self.rows(), :, : self.key_len], v_cache[self.rows(), :, : self.key_len]
        if self.key_len <= self.kv.block_size:  # one block each: gather its first key_len positions, not all of it
            # (index_select of the sliced cache: on a CPU 4x faster than advanced indexing then slicing)
            blocks = self.block_table[:, 0]
            return (k_cache[:, :, : self.key_len].index_select(0, blocks),
                    v_cache[:, :, : self.key_len].index_select(0, blocks))
        used = self.block_table[:, : -(-self.key_len // self.kv.block_size)]
        return (gather_blocks(k_cache, used)[:, :, : self.key_len], gather_blocks(v_cache, used)[:, :, : self.key_len])

    def write(self, k_cache, v_cache, k, v):
        """Writes k, v (B, kv_heads, T, head_dim) at each input token's block and offset."""
        if self.first_block is not None:  # one block per row: scatter into views of the cache, no index_put
            index = self.positions[:, None, :, None].expand(k.shape)
            k_cache[self.rows()].scatter_(2, index, k)
            v_cache[self.rows()].scatter_(2, index, v)
        else:
            k_cache[self.blocks, :, self.offsets] = k.transpose(1, 2)  # (B, T, kv_heads, head_dim)
            v_cache[self.blocks, :, self.offsets] = v.transpose(1, 2)

    def write_and_prefix(self, k_cache, v_cache, k, v):
        """write, then prefix. With one block per row the prefix is a view of the cache and the scatter goes
        straight into it (every position written is below key_len), at the index forward made once for all layers."""
        if self.first_block is None or self.write_index is None:
            self.write(k_cache, v_cache, k, v)
            return self.prefix(k_cache, v_cache)
        keys, values = self.prefix(k_cache, v_cache)
        return keys.scatter_(2, self.write_index, k), values.scatter_(2, self.write_index, v)


def cached_decode_attention(q, keys, values, key_bias):
    """The torch decode attention: q (B, n_head, head_dim) against keys and values (B, n_kv_head, L, head_dim)
    (views of the cache, or the rows' blocks gathered), key_bias (B * n_kv_head, 1, L) -inf at the keys a row must
    not see, else 0. A group's query heads meet their shared KV head through a reshape, not a copy of the keys; one
    baddbmm takes q k^T, the scale and the bias, and the softmax is float32: kernels.decode_attention's reference
    values in three ops (a decode step on a CPU pays for each)."""
    B, n_head, head_dim = q.shape
    n_kv_head, key_len = keys.shape[1], keys.shape[2]
    grouped_q = q.reshape(B * n_kv_head, n_head // n_kv_head, head_dim)
    scores = torch.baddbmm(key_bias, grouped_q, keys.reshape(B * n_kv_head, key_len, head_dim).transpose(1, 2),
                           alpha=head_dim ** -0.5)  # (B * n_kv_head, group, L)
    probs = scores.softmax(-1, dtype=torch.float32).to(values.dtype)
    return torch.bmm(probs, values.reshape(B * n_kv_head, key_len, head_dim)).view(B, n_head, head_dim)


COMPLETIONS_PER_BUCKET = 16  # SharedPrompts: completions per attention call


class SharedPrompts:
    """The layout of a training pass over completions that continue shared prompts (GRPO's G samples of each
    prompt), so that each prompt's forward runs once however many completions continue it. The model sees one row
    without padding: the real tokens of the P distinct prompts, then those of the N completions, longest first. The
    token-wise layers (projections, norms, MLP) treat it as any row; attention puts it into padded batches, prompts
    (P, Tp) and completions in buckets of COMPLETIONS_PER_BUCKET, each padded to its longest: a prompt attends
    causally to itself, a completion to its prompt's real tokens and to its own past. (GRPO's lengths spread from a
    few tokens to max_new_tokens: one batch padded to the longest would spend most of its attention on padding.) A
    prompt's keys and values are indexed once per completion that reads them, so autograd sums their gradients over
    the group."""

    def __init__(self, prompt_ids, prompt_lengths, completion_ids, completion_lengths, prompt_index):
        """prompt_ids (P, Tp) and completion_ids (N, Tc), right-padded, with their lengths (P,) and (N,) (each at
        least 1); prompt_index (N,) the prompt each completion continues."""
        (P, Tp), (N, Tc) = prompt_ids.shape, completion_ids.shape
        device = prompt_ids.device
        self.prompt_real = torch.arange(Tp, device=device) < prompt_lengths[:, None]  # (P, Tp)
        self.prompt_tokens = int(prompt_lengths.sum())
        # the completions in the row by length (longest first): each bucket is a run of the row
        by_length = completion_lengths.argsort(descending=True, stable=True)
        lengths, self.prompt_index = completion_lengths[by_length], prompt_index[by_length]
        steps = torch.arange(Tc, device=device)
        self.completion_real = steps < lengths[:, None]  # (N, Tc), rows by length
        self.input_ids = torch.cat([prompt_ids[self.prompt_real],
                                    completion_ids[by_length][self.completion_real]])[None]
        starts = prompt_lengths[self.prompt_index]  # (N,): a completion's first position is its prompt's length
        self.position_ids = torch.cat([torch.arange(Tp, device=device).expand(P, Tp)[self.prompt_real],
                                       (starts[:, None] + steps)[self.completion_real]])[None]
        own_past = steps[None, :] <= steps[:, None]  # (Tc, Tc)
        prompt_visible = torch.arange(Tp, device=device) < starts[:, None]  # (N, Tp)
        self.visible = torch.cat([prompt_visible[:, None].expand(N, Tc, Tp), own_past.expand(N, Tc, Tc)],
                                 dim=2)[:, None]  # (N, 1, Tc, Tp + Tc)
        self.buckets = []  # (its rows, its width: the longest of them, its tokens)
        for first in range(0, N, COMPLETIONS_PER_BUCKET):
            rows = slice(first, first + COMPLETIONS_PER_BUCKET)
            self.buckets.append((rows, int(lengths[first]), int(lengths[rows].sum())))
        self.runs = [self.prompt_tokens] + [tokens for *_, tokens in self.buckets]  # the row: prompts, buckets
        # where each completion token's predictor sits in the row: its prompt's last token for the first token, the
        # completion's previous token after that (at padding, the row's last real token before it: never scored);
        # (N, Tc) in the order of completion_ids
        prompt_at = (self.prompt_real.flatten().cumsum(0) - 1).view(P, Tp)
        completion_at = torch.empty_like(self.completion_real, dtype=torch.long)
        completion_at[by_length] = (self.completion_real.flatten().cumsum(0) - 1).view(N, Tc) + self.prompt_tokens
        self.predictors = torch.cat([prompt_at[prompt_index, prompt_lengths[prompt_index] - 1][:, None],
                                     completion_at[:, :-1]], dim=1)

    def attention(self, q, k, v):
        """q (1, n_head, tokens, head_dim), k and v (1, n_kv_head, tokens, head_dim), rope applied -> the same
        layout as q."""

        def padded(t, real):  # t (heads, count, head_dim) -> (rows, heads, T, head_dim), zeros at the padding
            rows = t.new_zeros(*real.shape, t.shape[0], t.shape[2])
            rows[real] = t.transpose(0, 1)
            return rows.transpose(1, 2)

        def unpadded(t, real):  # (heads, tokens, head_dim)
            return t.transpose(1, 2)[real].transpose(0, 1)

        (prompt_q, *bucket_q), (prompt_k, *bucket_k), (prompt_v, *bucket_v) = (t[0].split(self.runs, dim=1)
                                                                               for t in (q, k, v))
        prompt_k, prompt_v = padded(prompt_k, self.prompt_real), padded(prompt_v, self.prompt_real)
        outs = [unpadded(attention(padded(prompt_q, self.prompt_real), prompt_k, prompt_v, causal=True),
                         self.prompt_real)]
        for (rows, width, _), q_run, k_run, v_run in zip(self.buckets, bucket_q, bucket_k, bucket_v):
            real = self.completion_real[rows, :width]
            keys = torch.cat([prompt_k[self.prompt_index[rows]], padded(k_run, real)], dim=2)
            values = torch.cat([prompt_v[self.prompt_index[rows]], padded(v_run, real)], dim=2)
            mask = self.visible[rows, :, :width, : self.prompt_real.shape[1] + width]
            outs.append(unpadded(attention(padded(q_run, real), keys, values, causal=False, attn_mask=mask), real))
        return torch.cat(outs, dim=1)[None]


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_index: int):
        super().__init__()
        self.layer_index = layer_index
        self.n_head, self.n_kv_head = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = config.head_dim
        dim = config.hidden_size
        # q_proj, k_proj and v_proj as one GEMM: their weights (and Qwen2's biases) concatenated along the output
        # dimension at load, split back into the Hugging Face tensors at save (fused_parts)
        self.qkv_sizes = (self.n_head * self.head_dim, self.n_kv_head * self.head_dim, self.n_kv_head * self.head_dim)
        self.qkv_proj = nn.Linear(dim, sum(self.qkv_sizes), bias=config.qkv_bias)
        self.o_proj = nn.Linear(self.n_head * self.head_dim, dim, bias=config.o_bias)
        if config.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)

    def forward(self, x, cos, signed_sin, cu_seqlens=None, cache: "CacheView | None" = None,
                prompts: SharedPrompts | None = None):
        B, T, _ = x.shape
        qkv = self.qkv_proj(x)  # (B, T, q + k + v): one GEMM
        if cache is not None and cu_seqlens is None and T == 1:
            y = self.decode(qkv.view(B, -1), cos, signed_sin, cache)
            return self.o_proj(y.view(B, 1, self.n_head * self.head_dim))
        q, k, v = qkv.split(self.qkv_sizes, dim=-1)
        q = q.view(B, T, self.n_head, self.head_dim)
        k = k.view(B, T, self.n_kv_head, self.head_dim)
        v = v.view(B, T, self.n_kv_head, self.head_dim)
        if hasattr(self, "q_norm"):  # under autocast the fp32 norm weights promote q and k: back to v's dtype
            q, k = self.q_norm(q).to(v.dtype), self.k_norm(k).to(v.dtype)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T, head_dim)
        if cos.dtype != q.dtype:  # under autocast q is bf16 while the residual stream is fp32
            cos, signed_sin = cos.to(q.dtype), signed_sin.to(q.dtype)
        q, k = apply_rope(q, cos, signed_sin), apply_rope(k, cos, signed_sin)
        if prompts is not None:
            y = prompts.attention(q, k, v)
        elif cache is None:
            y = attention(q, k, v, causal=True, cu_seqlens=cu_seqlens)
        elif cu_seqlens is not None:  # packed prefill: write the prompts' blocks, then varlen attention
            cache.write(*cache.layer(self.layer_index), k, v)
            y = attention(q, k, v, causal=True, cu_seqlens=cu_seqlens)
        else:  # right-padded prefill: write each row's keys to its blocks, then attend to the row's prefix
            k_cache, v_cache = cache.layer(self.layer_index)
            cache.write(k_cache, v_cache, k, v)
            keys, values = cache.prefix(k_cache, v_cache)  # (B, kv_heads, key_len, head_dim)
            y = attention(q, keys, values, causal=False, attn_mask=cache.visible)
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)
        return self.o_proj(y)

    def decode(self, qkv, cos, signed_sin, cache):
        """One new token per row: qkv (B, q + k + v) the fused projection's output; cos, signed_sin (B, 1, head_dim)
        (the same for every head). Rope and the cache write (ROPE_CACHE_BACKEND: one Triton kernel, or apply_rope
        over q's and k's heads at once and a write at each row's block and offset), then attention to each row's
        prefix (DECODE_ATTENTION_BACKEND: the split-KV kernel reading the blocks in place, or cached_decode_attention
        over views of the cache when each row is one block, else over its blocks gathered). Positions past a row's
        own length may hold stale values; neither path lets the query see them, and a later step overwrites them
        before they become visible. Returns (B, n_head, head_dim)."""
        B, H = qkv.shape[0], self.n_head
        qk, v = qkv.split((self.qkv_sizes[0] + self.qkv_sizes[1], self.qkv_sizes[2]), dim=-1)
        qk, v = qk.view(B, H + self.n_kv_head, self.head_dim), v.view(B, self.n_kv_head, self.head_dim)
        if hasattr(self, "q_norm"):  # q's heads, then k's: one tensor again for the rope
            qk = torch.cat((self.q_norm(qk[:, :H]), self.k_norm(qk[:, H:])), dim=1).to(v.dtype)
        k_cache, v_cache = cache.layer(self.layer_index)
        if cache.rope_backend == "triton":
            q = rope_and_cache(qk[:, :H], qk[:, H:], v, cos[:, 0], signed_sin[:, 0], k_cache, v_cache,
                               cache.block_table, cache.positions[:, 0], backend="triton")
            if cache.attention_backend == "torch":
                keys, values = cache.prefix(k_cache, v_cache)
        else:
            if cos.dtype != qk.dtype:  # under autocast q is bf16 while the residual stream is fp32
                cos, signed_sin = cos.to(qk.dtype), signed_sin.to(qk.dtype)
            qk = apply_rope(qk, cos, signed_sin)
            q, k = qk[:, :H], qk[:, H:, None]  # k (B, kv_heads, 1, head_dim)
            if cache.attention_backend == "torch":  # (B, kv_heads, key_len, head_dim) each
                keys, values = cache.write_and_prefix(k_cache, v_cache, k, v[:, :, None])
            else:
                cache.write(k_cache, v_cache, k, v[:, :, None])
        if cache.attention_backend == "triton":
            return decode_attention(q, k_cache, v_cache, cache.block_table, cache.lengths, backend="triton")
        return cached_decode_attention(q, keys, values, cache.key_bias)


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        # gate_proj and up_proj as one GEMM (gate rows first), split back at save (fused_parts)
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x):
        # silu(gate) * up; without a graph to keep (sampling, evaluation) in the GEMM's output itself
        return self.down_proj(silu_mul(self.gate_up_proj(x), inplace=not torch.is_grad_enabled()))


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer_index: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_index)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, delta, cos, signed_sin, cu_seqlens=None, cache=None, prompts=None):
        """x is the residual stream before the previous block's MLP output `delta` is added (None for the first
        block): each residual add happens in the norm that follows it (add_rms_norm: one launch with its Triton
        kernel). Returns (the residual stream, this block's MLP output, not yet added)."""
        x, normed = add_then_norm(x, delta, self.input_layernorm)
        attended = self.self_attn(normed, cos, signed_sin, cu_seqlens, cache, prompts)
        x, normed = add_then_norm(x, attended, self.post_attention_layernorm)
        return x, self.mlp(normed)


def add_then_norm(x, delta, norm):
    """(x + delta, norm(x + delta)), with nothing to add when delta is None."""
    if delta is None:
        return x, norm(x)
    return add_rms_norm(x, delta, norm.weight, norm.eps)


# -----------------------------------------------------------------------------
# the model


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = nn.Module()  # "model." prefix: Hugging Face parameter names map 1:1 (but for FUSED)
        self.model.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.model.layers = nn.ModuleList(Block(config, i) for i in range(config.num_hidden_layers))
        self.model.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        if not config.tie_word_embeddings:
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.gradient_checkpointing = False  # recompute each block in the backward: long traces need it
        self.inv_freq = None  # rope frequencies, computed on first use on the model's device (not a checkpoint tensor)

    @property
    def lm_head_weight(self) -> torch.Tensor:
        return self.model.embed_tokens.weight if self.config.tie_word_embeddings else self.lm_head.weight

    def forward(self, input_ids, position_ids=None, cu_seqlens=None, cache=None, return_hidden=False,
                targets=None, temperature=1.0, return_entropy=False, prompts: SharedPrompts | None = None,
                kl_reference: "Transformer | None" = None, kl_direction="reverse"):
        """input_ids (B, T). position_ids (B, T) default 0..T-1. cu_seqlens (n_docs + 1,) int32 prefix sums of
        document lengths for a packed row (B must be 1). cache: the sampler's CacheView (which cache blocks and
        positions this call reads and writes; position_ids default to its positions).
        Returns float32 logits (B, T, vocab); or the final normed hidden states (B, T, dim) with return_hidden;
        or, given targets (B, T) (IGNORE_INDEX where none), the float32 log-prob of each target (B, T) (and the
        entropy) from the fused log-prob path, never the logits. The head runs inside forward so that DDP and
        FSDP2 see it as part of the model. prompts: completions continuing shared prompts (SharedPrompts; input_ids
        are its row, position_ids default to its positions), where targets (N, Tc) are the completion tokens each
        position predicts (IGNORE_INDEX where none); the result is (N, Tc). kl_reference (with targets): a frozen
        model whose body runs on the same inputs, without gradients, so that the exact KL (kl_direction) of each
        target's predicting distribution to the reference's comes out as one more result, from the hidden states
        the log-probs use (one policy forward for both)."""
        x = self.hidden_states(input_ids, position_ids, cu_seqlens, cache, prompts)
        if return_hidden:
            return x
        if targets is not None:
            reference = None
            if kl_reference is not None:
                with torch.no_grad():
                    reference = (kl_reference.hidden_states(input_ids, position_ids, cu_seqlens, None, prompts),
                                 kl_reference.lm_head_weight, kl_direction)
            return self.target_logprobs(x, targets, temperature, return_entropy, reference)
        return F.linear(x, self.lm_head_weight).float()

    def hidden_states(self, input_ids, position_ids=None, cu_seqlens=None, cache=None, prompts=None):
        """The body: the final normed hidden states (B, T, dim), or with prompts (N, Tc, dim), those that predict
        each completion token."""
        B, T = input_ids.shape
        if position_ids is None and prompts is not None:
            position_ids = prompts.position_ids
        elif position_ids is None:
            position_ids = torch.arange(T, device=input_ids.device).expand(B, T) if cache is None else cache.positions
        if cache is not None:
            cache.locate()
        if cache is not None and cu_seqlens is None and T == 1:  # decoding: each row sees its first `lengths` keys
            cache.rope_backend = choose_backend("ROPE_CACHE_BACKEND", input_ids)
            cache.attention_backend = choose_backend("DECODE_ATTENTION_BACKEND", input_ids)
            cache.lengths = cache.positions[:, 0] + 1
            if cache.attention_backend == "torch":  # made once here for every layer
                n_kv, key_len = self.config.num_key_value_heads, cache.key_len
                masked = torch.arange(key_len, device=input_ids.device) >= cache.lengths[:, None]  # (B, key_len)
                bias = torch.zeros((B, n_kv, 1, key_len), dtype=cache.kv.k[0].dtype, device=input_ids.device)
                cache.key_bias = bias.masked_fill_(masked[:, None, None], float("-inf")).view(B * n_kv, 1, key_len)
                cache.write_index = cache.positions[:, None, :, None].expand(B, n_kv, 1, self.config.head_dim)
        elif cache is not None and cu_seqlens is None:  # (B, 1, T, key_len): each row sees its own prefix
            key_positions = torch.arange(cache.key_len, device=input_ids.device)
            cache.visible = (key_positions <= cache.positions[:, :, None])[:, None]
        x = self.model.embed_tokens(input_ids)  # (B, T, dim)
        if self.inv_freq is None or self.inv_freq.device != x.device:
            self.inv_freq = rope_inv_freq(self.config, x.device)
        if cache is not None:  # the positions are cache positions: rows of the cache's table, not a recomputation
            cos_table, sin_table = cache.kv.rope_table(self.inv_freq, x.dtype)
            if cu_seqlens is None and T == 1:  # decoding: (B, 1, head_dim), the same for every head
                cos, signed_sin = cos_table[position_ids[:, 0]][:, None], sin_table[position_ids[:, 0]][:, None]
            else:  # (B, 1, T, head_dim) as rope_cos_sin's
                cos, signed_sin = cos_table[position_ids][:, None], sin_table[position_ids][:, None]
        else:
            cos, signed_sin = rope_cos_sin(position_ids, self.inv_freq, x.dtype)
        delta = None  # the last block's MLP output, added to x in the next norm's kernel (Block.forward)
        for block in self.model.layers:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x, delta = torch.utils.checkpoint.checkpoint(block, x, delta, cos, signed_sin, cu_seqlens, cache,
                                                             prompts, use_reentrant=False)
            else:
                x, delta = block(x, delta, cos, signed_sin, cu_seqlens, cache, prompts)
        _, x = add_then_norm(x, delta, self.model.norm)
        if prompts is not None:  # (N, Tc, dim): the state that predicts each completion token
            x = x[0, prompts.predictors]
        return x

    def target_logprobs(self, x, targets, temperature, return_entropy, reference=None):
        """The LM head and log-prob kernel at the positions that have a target only (a prompt or padding costs no
        head FLOPs); 0 elsewhere. x (B, T, dim), targets (B, T) -> (B, T) float32 (and the entropy; and with
        reference = (its hidden states like x, its LM head weight, direction), the exact KL to it, kl_full)."""
        B, T = targets.shape
        flat_targets = targets.reshape(-1)
        rows = (flat_targets != IGNORE_INDEX).nonzero().squeeze(1)
        hidden = x.reshape(B * T, -1)[rows]
        result = token_logprobs(hidden, self.lm_head_weight, flat_targets[rows], temperature=temperature,
                                return_entropy=return_entropy)
        result = result if return_entropy else (result,)
        if reference is not None:
            ref_x, ref_weight, direction = reference
            result += (kl_full(hidden, self.lm_head_weight, ref_x.reshape(B * T, -1)[rows], ref_weight, temperature,
                               direction),)
        scatter = lambda values: values.new_zeros(B * T).index_copy(0, rows, values).view(B, T)
        return tuple(scatter(r) for r in result) if len(result) > 1 else scatter(result[0])

    # ---- checkpoint I/O -------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path, device=None, dtype=None) -> "Transformer":
        """Builds on the meta device and assigns the checkpoint's tensors, so no second copy is made (but for the
        fused qkv_proj and gate_up_proj, concatenated from their Hugging Face parts, each part freed once used)."""
        config_file = os.path.join(path, "config.json")
        with open(config_file) as f:
            try:
                hf_config = json.load(f)
            except json.JSONDecodeError as error:
                raise ValueError(f"{config_file}: not valid JSON ({error})") from None
        config = ModelConfig.from_hf(hf_config, source=config_file)
        with torch.device("meta"):
            model = cls(config)
        expected = {name: p.shape for name, p in model.hf_state_dict().items()}  # the names on disk
        state = {}
        for file in checkpoint_files(path):
            check_safetensors(file)
            with safe_open(file, framework="pt", device=str(device or "cpu")) as f:
                for name in f.keys():
                    if name == "lm_head.weight" and config.tie_word_embeddings:
                        continue  # some tied checkpoints store the shared matrix twice
                    state[name] = f.get_tensor(name)
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        wrong_shape = [f"{n}: checkpoint {tuple(state[n].shape)}, model {tuple(expected[n])}"
                       for n in expected if n in state and state[n].shape != expected[n]]
        if missing or unexpected or wrong_shape:
            raise ValueError(f"checkpoint {path} does not match its config: missing tensors {missing}, "
                             f"unexpected tensors {unexpected}, wrong shapes {wrong_shape}")
        if dtype is not None:
            state = {name: t.to(dtype) for name, t in state.items()}
        model.load_state_dict(from_hf_state(state, list(model.state_dict()), config), assign=True)
        return model

    def hf_state_dict(self) -> dict:
        """state_dict() under the Hugging Face names a checkpoint uses (q_proj, k_proj, v_proj, gate_proj, up_proj
        split out of the fused qkv_proj and gate_up_proj): views of the model's tensors, no copy."""
        return to_hf_state(self.state_dict(), self.config)

    def save_pretrained(self, path, max_shard_bytes=5 * 1024**3):
        """config.json + model.safetensors, or shards with model.safetensors.index.json above max_shard_bytes."""
        os.makedirs(path, exist_ok=True)
        self.config.torch_dtype = str(self.lm_head_weight.dtype).removeprefix("torch.")
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump(self.config.to_hf(), f, indent=2)
        # Hugging Face names; a part of a fused tensor is copied out of it, so that no two saved tensors share memory
        parts = {part for name in self.state_dict() for part, _ in fused_parts(name, self.config) or ()}
        state = {n: t.detach().to("cpu", copy=True) if n in parts else t.detach().contiguous().cpu()
                 for n, t in self.hf_state_dict().items()}
        shards, current, current_bytes = [], {}, 0
        for name, tensor in state.items():
            size = tensor.numel() * tensor.element_size()
            if current and current_bytes + size > max_shard_bytes:
                shards.append(current)
                current, current_bytes = {}, 0
            current[name], current_bytes = tensor, current_bytes + size
        shards.append(current)
        for old in os.listdir(path):  # a stale shard from an earlier, larger save would be loaded too
            if old.startswith("model") and old.endswith((".safetensors", ".safetensors.index.json")):
                os.remove(os.path.join(path, old))
        if len(shards) == 1:
            save_file(shards[0], os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
            return
        weight_map = {}
        for i, shard in enumerate(shards):
            name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, os.path.join(path, name), metadata={"format": "pt"})
            weight_map.update({tensor_name: name for tensor_name in shard})
        total = sum(t.numel() * t.element_size() for t in state.values())
        with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def sequence_logprobs(model, input_ids, position_ids=None, cu_seqlens=None, temperature=1.0, return_entropy=False,
                      loss_mask=None, kl_reference=None, kl_direction="reverse"):
    """Per-token log-probs of the given tokens, aligned with them: out[:, t] = log p(x_t | x_<t), with out[:, 0] = 0
    and 0 for the first token of each packed document. `model` may be wrapped (DDP, FSDP2). No (tokens x vocab)
    logits are held. input_ids (B, T) -> (B, T) float32; with return_entropy, also the entropy of each predicting
    distribution. With loss_mask (B, T), only the tokens it marks are scored (the LM head runs at their predecessors
    only); the others read 0. With kl_reference (Transformer.forward's), the exact KL of each scored token's
    predicting distribution to the reference's comes last, aligned the same way."""
    targets = torch.full_like(input_ids, IGNORE_INDEX)
    targets[:, :-1] = input_ids[:, 1:]  # position t predicts token t + 1
    if cu_seqlens is not None:  # the last token of a document does not predict the next document's first
        targets[0, cu_seqlens[1:-1].long() - 1] = IGNORE_INDEX
    if loss_mask is not None:
        targets[:, :-1].masked_fill_(~loss_mask[:, 1:].bool(), IGNORE_INDEX)
    result = model(input_ids, position_ids=position_ids, cu_seqlens=cu_seqlens, targets=targets,
                   temperature=temperature, return_entropy=return_entropy, kl_reference=kl_reference,
                   kl_direction=kl_direction)
    shift = lambda values: torch.cat([values.new_zeros(values.shape[0], 1), values[:, :-1]], dim=1)  # (B, T)
    return tuple(shift(r) for r in result) if isinstance(result, tuple) else shift(result)


def shared_prompt_logprobs(model, input_ids, prompt_lengths, lengths, temperature=1.0, return_entropy=False,
                           loss_mask=None, kl_reference=None, kl_direction="reverse"):
    """sequence_logprobs at the completion tokens of right-padded (prompt + completion) rows, where consecutive rows
    that repeat a prompt (GRPO's groups) share one forward of it (SharedPrompts). prompt_lengths and lengths (B,)
    count each row's prompt and prompt + completion tokens (each row: a prompt and a completion of at least one
    token each). Prompt positions read 0, as do the tokens loss_mask (B, T) leaves out; the values (and the exact KL
    with kl_reference) equal sequence_logprobs' up to float rounding."""
    B, T = input_ids.shape
    device = input_ids.device
    prompt_len = int(prompt_lengths.max())
    prompt_part = input_ids[:, :prompt_len].masked_fill(
        torch.arange(prompt_len, device=device) >= prompt_lengths[:, None], -1)
    new_prompt = torch.ones(B, dtype=torch.bool, device=device)
    new_prompt[1:] = (prompt_part[1:] != prompt_part[:-1]).any(1)
    completion_lengths = lengths - prompt_lengths
    steps = torch.arange(int(completion_lengths.max()), device=device)
    in_completion = steps < completion_lengths[:, None]  # (B, Tc)
    positions = (prompt_lengths[:, None] + steps).clamp(max=T - 1)  # (B, Tc): each completion token's column
    completion_ids = input_ids.gather(1, positions)
    scored = in_completion if loss_mask is None else in_completion & loss_mask.gather(1, positions).bool()
    layout = SharedPrompts(input_ids[new_prompt, :prompt_len], prompt_lengths[new_prompt], completion_ids,
                           completion_lengths, new_prompt.cumsum(0) - 1)
    result = model(layout.input_ids, targets=completion_ids.masked_fill(~scored, IGNORE_INDEX), temperature=temperature,
                   return_entropy=return_entropy, prompts=layout, kl_reference=kl_reference, kl_direction=kl_direction)
    rows, columns = in_completion.nonzero(as_tuple=True)
    place = lambda values: values.new_zeros(B, T).index_put((rows, positions[rows, columns]), values[rows, columns])
    return tuple(place(r) for r in result) if isinstance(result, tuple) else place(result)


def checkpoint_files(path) -> list[str]:
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            return [os.path.join(path, name) for name in sorted(set(json.load(f)["weight_map"].values()))]
    single = os.path.join(path, "model.safetensors")
    if os.path.exists(single):
        return [single]
    raise FileNotFoundError(f"{path}: neither model.safetensors nor model.safetensors.index.json")


def check_safetensors(file):
    """Refuses, naming the file, one that is not a whole safetensors file (a copy or download cut short): its
    8-byte header length, JSON header and tensor data must account for exactly its size."""
    size = os.path.getsize(file)
    with open(file, "rb") as f:
        header_length = int.from_bytes(f.read(8), "little")
        if size < 8 or header_length > size - 8:
            raise ValueError(f"{file}: truncated or not a safetensors file ({size} bytes)")
        try:
            header = json.loads(f.read(header_length))
            end = max([t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"], default=0)
        except (ValueError, TypeError, KeyError, AttributeError, IndexError):
            raise ValueError(f"{file}: not a safetensors file (its header is not a safetensors header)") from None
    if 8 + header_length + end != size:
        raise ValueError(f"{file}: truncated or padded: {size} bytes, its header describes {8 + header_length + end}")


def init_weights(model: Transformer, std=0.02, seed=0):
    """Random initialisation for models trained from scratch (the demo); checkpoints overwrite all of it. Drawn
    tensor by tensor under the Hugging Face names (each part of a fused parameter on its own), in their order."""
    generator = torch.Generator().manual_seed(seed)
    for name, p in to_hf_state(dict(model.named_parameters()), model.config).items():
        with torch.no_grad():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.copy_(torch.randn(p.shape, generator=generator) * std)
    return model
