"""The block driver's chains in BF16 against float32 on this CPU: one Gemma 3 270M decoder layer
(hidden 640, MLP 2048, 4 heads of 256, one KV head), one calibration window of 256 tokens, as the
driver runs it (forward for the chains, forward + backward for SignRound's tuning). Weights are random:
the time of a matmul does not depend on its values.

    python benchmarks/block_dtype.py [--repeats 10]

Prints a Markdown table for benchmarks/RESULTS.md: median seconds and the ratio to BF16's forward.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import Gemma3TextConfig
from transformers.models.gemma3.modeling_gemma3 import Gemma3DecoderLayer, Gemma3RotaryEmbedding

from pipeline.compute import cpu_computes_bf16


def median_seconds(step, repeats: int) -> float:
    step()  # warm-up: oneDNN picks its kernels on the first call
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--tokens", type=int, default=256)
    args = parser.parse_args()
    config = Gemma3TextConfig(hidden_size=640, intermediate_size=2048, num_attention_heads=4, num_key_value_heads=1,
                              head_dim=256, num_hidden_layers=1)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    layer, rotary = Gemma3DecoderLayer(config, 0).eval(), Gemma3RotaryEmbedding(config)
    positions = torch.arange(args.tokens)[None]
    hidden = torch.randn(1, args.tokens, 640)

    def forward(dtype, grad=False):
        x = hidden.to(dtype).requires_grad_(grad)
        rope = rotary(x, positions, "sliding_attention")
        out = layer(x, position_embeddings=rope, attention_mask=None, position_ids=positions)
        out = out[0] if isinstance(out, tuple) else out
        if grad:
            out.float().pow(2).mean().backward()

    rows = []
    for dtype in (torch.bfloat16, torch.float32):
        layer.to(dtype)
        with torch.no_grad():
            rows.append((f"{dtype}".removeprefix("torch."), "forward (chains, recording)",
                         median_seconds(lambda: forward(dtype), args.repeats)))
        rows.append((f"{dtype}".removeprefix("torch."), "forward + backward (SignRound tuning)",
                     median_seconds(lambda: forward(dtype, grad=True), args.repeats)))
    base = rows[0][2]
    print(f"CPU bf16 instructions: {'yes' if cpu_computes_bf16() else 'no (bf16 emulated)'}; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.tokens} tokens, median of {args.repeats}\n")
    print("| dtype | step | seconds (median) | ratio to BF16 forward |\n|---|---|---:|---:|")
    for dtype, step, seconds in rows:
        print(f"| {dtype} | {step} | {seconds:.4f} | {seconds / base:.2f} |")


if __name__ == "__main__":
    main()
