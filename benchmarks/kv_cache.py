"""RotorQuantCache against transformers' DynamicCache and QuantizedCache, measured in one run.

For each model: prefill a long prompt of held-out text, then decode the following tokens one at a
time (teacher-forced, so every cache sees the same inputs). Reported per cache: KV memory after the
run and its ratio to DynamicCache, next-token KL (mean, max) and top-1 agreement of the decode
steps against DynamicCache's, and prefill / decode tokens per second on this machine. Usage:

    .venv/bin/python benchmarks/kv_cache.py [--prompt 1024] [--decode 64] [--out benchmarks/RESULTS.md]
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import torch

from pipeline.generate.kv_cache import RotorQuantCache, dynamic_cache_bytes, next_token_agreement

ROTATIONS = ("none", "givens", "quaternion", "hadamard", "dense")
BITS = (2, 3, 4)


def load(model_id: str):
    from transformers import AutoTokenizer

    from pipeline.model import load_config, load_model, resolve
    from pipeline.recipe import ModelSpec

    source = resolve(ModelSpec(id=model_id))
    model = load_model(source, load_config(source)).eval()
    return model, AutoTokenizer.from_pretrained(source.ref)


def prompt_ids(tokenizer, length: int) -> torch.Tensor:
    from pipeline.corpus import builtin_texts, token_windows

    return token_windows(tokenizer, builtin_texts("eval"), 1, length)


@torch.no_grad()
def run_cache(model, ids: torch.Tensor, prefill: int, cache) -> dict:
    """Prefill, then decode the rest one token at a time; logits of the decode steps and timings."""
    start = time.perf_counter()
    model(input_ids=ids[:, :prefill], past_key_values=cache, use_cache=True, logits_to_keep=1)
    prefill_s = time.perf_counter() - start
    start = time.perf_counter()
    steps = [model(input_ids=ids[:, t: t + 1], past_key_values=cache, use_cache=True).logits[0, -1]
             for t in range(prefill, ids.shape[1])]
    decode_s = time.perf_counter() - start
    return {"logits": torch.stack(steps).float(), "prefill_tok_s": prefill / prefill_s,
            "decode_tok_s": len(steps) / decode_s}


def transformers_quantized_cache(model, backend: str, bits: int, residual: int):
    """transformers' QuantizedCache refuses models with sliding layers; the same layers (its
    Quanto/HQQ QuantizedLayer) on the full-attention layers, sliding layers left as DynamicCache has them."""
    from transformers.cache_utils import (Cache, DynamicSlidingWindowLayer, HQQQuantizedLayer,
                                          QuantoQuantizedLayer, get_layer_types_and_kwargs)

    text = model.config.get_text_config(decoder=True)
    kinds, kwargs = get_layer_types_and_kwargs(text)
    layer_cls = {"quanto": QuantoQuantizedLayer, "hqq": HQQQuantizedLayer}[backend]
    axis = {"quanto": 0, "hqq": 1}[backend]  # per-channel keys and values (KIVI-style, as documented)
    layers = [DynamicSlidingWindowLayer(kwargs["sliding_window"]) if kind == "sliding_attention" else
              layer_cls(nbits=bits, axis_key=axis, axis_value=axis, q_group_size=64, residual_length=residual)
              for kind in kinds]
    return Cache(layers=layers)


def quantized_layer_bytes(layer) -> int:
    """Bytes of a transformers QuantizedLayer's quantized part (quanto QTensor or HQQ tensor + meta)
    plus its full-precision residual; DynamicLayer's tensors otherwise."""
    total = sum(t.numel() * t.element_size() for t in (layer.keys, layer.values) if t is not None)
    for q in (getattr(layer, "_quantized_keys", None), getattr(layer, "_quantized_values", None)):
        if q is None:
            continue
        if isinstance(q, tuple):  # HQQ: (packed tensor, meta with scale / zero)
            tensor, meta = q
            total += tensor.numel() * tensor.element_size()
            total += sum(v.numel() * v.element_size() for v in meta.values() if isinstance(v, torch.Tensor))
        else:
            total += tensor_bytes(q)
    return total


def tensor_bytes(t: torch.Tensor) -> int:
    """Storage bytes of a tensor; tensor subclasses (quanto's QTensor, its packed uint8 data) counted
    through their inner tensors, since their own shape is the unpacked one."""
    if hasattr(t, "__tensor_flatten__") and type(t) is not torch.Tensor:
        inner, _ = t.__tensor_flatten__()
        return sum(tensor_bytes(getattr(t, name)) for name in inner)
    return t.numel() * t.element_size()


def layer_bytes(layer) -> int:
    if hasattr(layer, "memory_bytes"):  # RotorQuantLayer
        return layer.memory_bytes()
    return quantized_layer_bytes(layer)  # DynamicLayer / transformers' QuantizedLayer


def full_attention_bytes(cache) -> int:
    """Bytes in the full-attention layers only: where the caches differ most (sliding layers are capped)."""
    return sum(layer_bytes(layer) for layer in cache.layers if not getattr(layer, "is_sliding", False))


def warm_up(model, ids: torch.Tensor, make_cache) -> None:
    """One short untimed run, so one-time costs (kernel builds, first-call dispatch) stay out of the timings."""
    run_cache(model, ids[:, :40], 32, make_cache())


def bench_model(model_id: str, prompt: int, decode: int, residual: int) -> tuple[list[dict], dict]:
    from transformers import DynamicCache

    model, tokenizer = load(model_id)
    if model_id.startswith("tiny:"):  # random weights: any token ids will do
        ids = torch.randint(20, model.config.get_text_config().vocab_size, (1, prompt + decode),
                            generator=torch.Generator().manual_seed(0))
    else:
        ids = prompt_ids(tokenizer, prompt + decode)
    warm_up(model, ids, lambda: DynamicCache(config=model.config))
    dense = DynamicCache(config=model.config)
    ref = run_cache(model, ids, prompt, dense)
    base = dynamic_cache_bytes(dense)
    base_full = full_attention_bytes(dense)
    rows = [{"cache": "DynamicCache (bf16)", "bits": 16, "bytes": base, "full_bytes": base_full, **ref}]
    for bits in BITS:
        for rotation in ROTATIONS:
            def make(bits=bits, rotation=rotation):
                return RotorQuantCache(model, bits=bits, rotation=rotation, residual_window=residual)

            warm_up(model, ids, make)
            cache = make()
            rows.append({"cache": f"RotorQuantCache {rotation}", "bits": bits,
                         **run_cache(model, ids, prompt, cache), "bytes": cache.memory_bytes(),
                         "full_bytes": full_attention_bytes(cache)})
    for backend in ("quanto", "hqq"):
        for bits in (2, 4):
            try:
                warm_up(model, ids, lambda: transformers_quantized_cache(model, backend, bits, residual))
                cache = transformers_quantized_cache(model, backend, bits, residual)
                result = run_cache(model, ids, prompt, cache)
            except Exception as err:  # not installed, or refuses this model: say so in the table
                rows.append({"cache": f"QuantizedCache {backend}", "bits": bits, "error": f"{type(err).__name__}: {err}"[:160]})
                continue
            rows.append({"cache": f"QuantizedCache {backend} (full layers)", "bits": bits, **result,
                         "bytes": sum(quantized_layer_bytes(layer) for layer in cache.layers),
                         "full_bytes": full_attention_bytes(cache)})
    for row in rows:
        if "logits" in row:
            row.update(next_token_agreement(ref["logits"], row.pop("logits")))
            row["ratio"] = row["bytes"] / base
            row["full_ratio"] = row["full_bytes"] / base_full
    text = model.config.get_text_config()
    info = {"model": model_id, "layers": len(dense.layers), "layer_types": list(text.layer_types),
            "sliding_window": text.sliding_window, "tokens": ids.shape[1]}
    return rows, info


def markdown(results: list[tuple[list[dict], dict]], args) -> str:
    lines = ["## KV cache: RotorQuantCache vs DynamicCache and QuantizedCache, CPU "
             f"({os.cpu_count()} cores, torch {torch.__version__}, {platform.machine()})", "",
             f"Prompt {args.prompt} tokens of held-out built-in text (random ids on tiny models), then "
             f"{args.decode} decode steps, teacher-forced; quantized caches keep the last {args.residual} tokens "
             "per layer in bf16 (RotorQuantCache's `residual_window`, QuantizedCache's `residual_length`); "
             "RotorQuantCache groups of 64 rotated coordinates per token, fp16 scale and minimum. KL and top-1 are "
             "over the decode steps against DynamicCache's logits; memory is what each cache holds after the run. "
             "transformers' `QuantizedCache` raises ValueError on models with sliding layers, so its quanto/HQQ "
             "layers are measured on the full-attention layers with the sliding ones as DynamicCache keeps them "
             "(bf16); the full-attention column compares like with like. One torch thread "
             "(OMP_NUM_THREADS=1) on a shared machine: tokens/s are indicative, ±30 %.", ""]
    for rows, info in results:
        lines += [f"### {info['model']}: {info['layers']} cache layers, sliding window {info['sliding_window']}, "
                  f"{info['tokens']} tokens", "",
                  "| cache | bits | KV bytes | vs DynamicCache | full-attention layers vs DynamicCache's | KL mean | KL max | "
                  "top-1 | prefill tok/s | decode tok/s |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in rows:
            if "error" in r:
                lines.append(f"| {r['cache']} | {r['bits']} | — | — | — | — | — | — | — | {r['error']} |")
                continue
            lines.append(f"| {r['cache']} | {r['bits']} | {r['bytes']:,} | {r['ratio']:.3f} | {r['full_ratio']:.3f} | "
                         f"{r['kl_mean']:.4f} | {r['kl_max']:.4f} | {r['top1']:.3f} | {r['prefill_tok_s']:.0f} | "
                         f"{r['decode_tok_s']:.1f} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["gguf:gemma3-270m", "tiny:e2b"])
    parser.add_argument("--prompt", type=int, default=1024)
    parser.add_argument("--decode", type=int, default=64)
    parser.add_argument("--residual", type=int, default=64)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.manual_seed(0)
    results = [bench_model(m, args.prompt, args.decode, args.residual) for m in args.models]
    report = markdown(results, args)
    print(report)
    if args.out:
        text = args.out.read_text() if args.out.is_file() else "# Benchmarks\n"
        marker = "## KV cache:"
        if marker in text:  # replace the previous run's section
            head, _, tail = text.partition(marker)
            rest = tail.split("\n## ", 1)
            text = head + (("## " + rest[1]) if len(rest) > 1 else "")
        args.out.write_text(text.rstrip() + "\n\n`benchmarks/kv_cache.py`\n\n" + report)


if __name__ == "__main__":
    main()
