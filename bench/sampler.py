"""
Sampler throughput: generated tokens per second of sampler.generate vs transformers' generate on the same
random-weight model, prompts, lengths and sampling settings, measured in the same run; on CUDA also against the
memory-bandwidth roofline (bytes of weights + KV cache read per decode step / measured copy bandwidth).

    python bench/sampler.py                 # CPU: 4 layers, hidden 256; batch 1 and 32; 128 new tokens
    python bench/sampler.py --device cuda   # Qwen2.5-1.5B shapes in bf16; batch 1, 64, 256; 256 + 512 tokens
"""

import argparse
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from model import Transformer  # noqa: E402
from sampler import generate  # noqa: E402

QWEN25_15B = dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                  num_attention_heads=12, num_key_value_heads=2, rope_theta=1e6, tie_word_embeddings=True,
                  max_position_embeddings=32768)
CPU_SMALL = dict(vocab_size=4096, hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=8,
                 num_key_value_heads=2, max_position_embeddings=4096)


def build_pair(shape, device, dtype):
    """The same random weights in transformers' Qwen2 and in ours (written by transformers, loaded by us)."""
    import transformers

    torch.manual_seed(0)
    hf_model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**shape)).to(dtype)
    with tempfile.TemporaryDirectory() as path:
        hf_model.save_pretrained(path)
        ours = Transformer.from_pretrained(path, device=device, dtype=dtype)
    return hf_model.to(device).eval(), ours.eval()


def copy_bandwidth(device):
    x = torch.empty(256 * 2**20, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    y.copy_(x)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(10):
        y.copy_(x)
    torch.cuda.synchronize()
    return 2 * x.numel() * 10 / (time.perf_counter() - start)  # read + write


def timed(fn, device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batches", default=None, help="comma-separated batch sizes")
    parser.add_argument("--skip_hf", action="store_true")
    args = parser.parse_args()
    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    shape, dtype = (QWEN25_15B, torch.bfloat16) if on_gpu else (CPU_SMALL, torch.float32)
    prompt_len, new_tokens = (256, 512) if on_gpu else (32, 128)
    batches = [int(b) for b in args.batches.split(",")] if args.batches else ([1, 64, 256] if on_gpu else [1, 32])
    hf_model, ours = build_pair(shape, device, dtype)
    weight_bytes = sum(p.numel() * p.element_size() for p in ours.parameters())
    bandwidth = copy_bandwidth(device) if on_gpu else None
    print(f"device {device} | {ours.num_parameters() / 1e6:.1f}M params | {dtype} | prompt {prompt_len} | "
          f"new {new_tokens}" + (f" | copy bandwidth {bandwidth / 1e9:.0f} GB/s" if bandwidth else ""))
    print(f"{'batch':>6} {'ours tok/s':>11} {'hf tok/s':>10} {'ratio':>6}" + (f" {'roofline':>9}" if on_gpu else ""))
    rows = []
    for batch in batches:
        prompts = torch.randint(0, shape["vocab_size"], (batch, prompt_len), generator=torch.Generator().manual_seed(1))
        generate(ours, prompts[:1, :8].tolist(), max_new_tokens=4, seed=0)  # warm-up
        ours_time = timed(lambda: generate(ours, prompts.tolist(), max_new_tokens=new_tokens, seed=0), device)
        ours_rate = batch * new_tokens / ours_time
        hf_rate = None
        if not args.skip_hf:
            ids = prompts.to(device)
            hf_time = timed(lambda: hf_model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True,
                                                      max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                                      temperature=1.0, top_p=1.0, top_k=0, pad_token_id=0), device)
            hf_rate = batch * new_tokens / hf_time
        row = dict(batch=batch, ours_tokens_per_s=ours_rate, hf_tokens_per_s=hf_rate)
        line = f"{batch:>6} {ours_rate:>11,.0f} {hf_rate or float('nan'):>10,.0f} " \
               f"{(ours_rate / hf_rate if hf_rate else float('nan')):>5.1f}x"
        if on_gpu:
            config = ours.config
            mean_context = prompt_len + new_tokens / 2
            kv_bytes = 2 * config.num_hidden_layers * batch * config.num_key_value_heads * mean_context * \
                config.head_dim * 2
            roofline = batch * bandwidth / (weight_bytes + kv_bytes)  # tokens/s if each step only read memory
            row["roofline_tokens_per_s"] = roofline
            line += f" {ours_rate / roofline:>8.0%}"
        print(line, flush=True)
        rows.append(row)
    return rows


if __name__ == "__main__":
    main()
