"""Serving speed and memory: a BF16 model against its quantized export, through vLLM's OpenAI server (as
validation's serve check starts it: pipeline/runtimes/vllm.py) and through transformers, in one run.

Per engine and model: time to first token (p50, p99) and decode tokens per second of single requests
(batch 1), output tokens per second of 8 concurrent requests (vLLM) or one batch of 8 (transformers), and
resident memory: the proportional set size of vLLM's whole process tree (server, engine core, worker;
its KV cache fixed at VLLM_CPU_KVCACHE_SPACE), or transformers' process peak. Prompts are held-out
built-in text; every request generates exactly --new-tokens tokens. Usage:

    .venv/bin/python benchmarks/serving.py --quantized runs/gemma3-270m-w4a16-gptq/export [--bf16 FOLDER]
        [--prompt-tokens 128] [--new-tokens 64] [--requests 16] [--out benchmarks/RESULTS.md]
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import torch

BATCH = 8


def prompts(folder: Path, count: int, length: int) -> torch.Tensor:
    from transformers import AutoTokenizer

    from pipeline.corpus import load_texts, token_windows

    tokenizer = AutoTokenizer.from_pretrained(folder)
    return token_windows(tokenizer, load_texts("builtin", "eval"), count, length)


def _percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


# ---------------------------------------------------------------- vLLM


def vllm_figures(folder: Path, windows: torch.Tensor, new_tokens: int) -> dict:
    from pipeline.runtimes import RUNTIMES
    from pipeline.runtimes.base import Target

    target = Target(export=folder, plan=None, config=json.loads((folder / "config.json").read_text()), kv_cache=None)
    with tempfile.TemporaryDirectory() as scratch, \
            RUNTIMES["vllm"].running(target, Path(scratch), Path(scratch) / "vllm.log", 900) as server:
        def stream(window: list[int]) -> tuple[float, float, int]:
            start = time.perf_counter()
            first, count = None, 0
            for chunk in server.client.completions.create(model=server.model, prompt=window, max_tokens=new_tokens,
                                                          temperature=0, stream=True,
                                                          extra_body={"ignore_eos": True, "min_tokens": new_tokens}):
                if chunk.choices and chunk.choices[0].text is not None:
                    first = first or time.perf_counter()
                    count += 1
            return first - start, time.perf_counter() - first, count

        stream(windows[0].tolist())  # warm-up
        single = [stream(w.tolist()) for w in windows]
        results, threads = [], [threading.Thread(target=lambda w=w: results.append(stream(w.tolist())))
                                for w in windows[:BATCH]]
        started = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        batch_wall = time.perf_counter() - started
        tree = [psutil.Process(server.process.pid), *psutil.Process(server.process.pid).children(recursive=True)]
        pss = sum(p.memory_full_info().pss for p in tree)
    ttft = [s[0] for s in single]
    return {"ttft_p50_s": statistics.median(ttft), "ttft_p99_s": _percentile(ttft, 99),
            "decode_tok_s_batch1": statistics.median((n - 1) / d for _, d, n in single),
            f"output_tok_s_batch{BATCH}": sum(n for *_, n in results) / batch_wall, "resident_bytes": pss,
            "load_s": server.load_seconds, "tokens_per_request": statistics.median(n for *_, n in single)}


# ---------------------------------------------------------------- transformers (a process per model)


def transformers_figures(folder: Path, windows: torch.Tensor, new_tokens: int) -> dict:
    done = subprocess.run([sys.executable, __file__, "--transformers-worker", str(folder), "--new-tokens", str(new_tokens)],
                          input=json.dumps(windows.tolist()), capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def transformers_worker(folder: Path, windows: torch.Tensor, new_tokens: int) -> dict:
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(psutil.cpu_count())
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).eval()

    def generate(ids: torch.Tensor, n: int) -> float:
        start = time.perf_counter()
        with torch.no_grad():
            model.generate(input_ids=ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
        return time.perf_counter() - start

    generate(windows[:1], 2)  # warm-up
    ttft, decode = [], []
    for window in windows:
        first = generate(window[None], 1)
        whole = generate(window[None], new_tokens)
        ttft.append(first)
        decode.append((new_tokens - 1) / (whole - first))
    batch = generate(windows[:BATCH], new_tokens)
    peak_kib = int(re.search(r"VmHWM:\s+(\d+)", Path("/proc/self/status").read_text())[1])
    return {"ttft_p50_s": statistics.median(ttft), "ttft_p99_s": _percentile(ttft, 99),
            "decode_tok_s_batch1": statistics.median(decode), f"output_tok_s_batch{BATCH}": BATCH * new_tokens / batch,
            "resident_bytes": peak_kib * 1024}


# ---------------------------------------------------------------- report


def machine() -> str:
    info = Path("/proc/cpuinfo").read_text()
    name = re.search(r"model name\s*:\s*(.+)", info)
    flags = set(re.findall(r"\w+", info))
    shown = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_int8") if f in flags]
    return f"{psutil.cpu_count()} × {name[1] if name else platform.processor()} ({', '.join(shown)})"


def table(rows: dict[tuple[str, str], dict]) -> list[str]:
    lines = ["| engine | model | TTFT p50 (s) | TTFT p99 (s) | decode tok/s, batch 1 | output tok/s, batch 8 | resident memory |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for (engine, model), r in rows.items():
        lines.append(f"| {engine} | {model} | {r['ttft_p50_s']:.3f} | {r['ttft_p99_s']:.3f} | "
                     f"{r['decode_tok_s_batch1']:.1f} | {r[f'output_tok_s_batch{BATCH}']:.1f} | "
                     f"{r['resident_bytes'] / 2**30:.2f} GiB |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quantized", type=Path, help="the quantized export folder")
    parser.add_argument("--bf16", type=Path, default=None, help="the BF16 model folder (default: the real Gemma 3 270M)")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--out", type=Path, default=None, help="append the table to this Markdown file")
    parser.add_argument("--transformers-worker", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.transformers_worker:
        windows = torch.tensor(json.loads(sys.stdin.read()))
        print(json.dumps(transformers_worker(args.transformers_worker, windows, args.new_tokens)))
        return
    if args.bf16 is None:
        from pipeline.model import resolve
        from pipeline.recipe import GEMMA3_270M, ModelSpec

        args.bf16 = resolve(ModelSpec(id=GEMMA3_270M)).path
    windows = prompts(args.bf16, max(args.requests, BATCH), args.prompt_tokens)[: max(args.requests, BATCH)]
    rows = {}
    for name, folder in (("BF16", args.bf16), ("W4A16 (our export)", args.quantized)):
        rows[("vLLM (OpenAI server)", name)] = vllm_figures(folder, windows, args.new_tokens)
        rows[("transformers", name)] = transformers_figures(folder, windows, args.new_tokens)
        print(json.dumps({f"{e} / {m}": r for (e, m), r in rows.items()}, indent=1), flush=True)
    versions = subprocess.run([str(Path(sys.executable)), "-c", "import transformers; print(transformers.__version__)"],
                              capture_output=True, text=True).stdout.strip()
    from pipeline.runtimes import RUNTIMES

    lines = [f"`benchmarks/serving.py`, {time.strftime('%Y-%m-%d')}, {machine()}; {RUNTIMES['vllm'].version()} "
             f"(--enforce-eager, 16-bit activations), transformers {versions}; {args.requests} prompts of "
             f"{args.prompt_tokens} held-out tokens, {args.new_tokens} new tokens each; BF16 `{args.bf16.name}`, "
             f"W4A16 `{args.quantized}`.", "", *table(rows)]
    for engine in ("vLLM (OpenAI server)", "transformers"):
        bf16, w4 = rows[(engine, "BF16")], rows[(engine, "W4A16 (our export)")]
        lines.append(f"\n{engine}, W4A16 / BF16: decode batch 1 {w4['decode_tok_s_batch1'] / bf16['decode_tok_s_batch1']:.2f}×, "
                     f"batch 8 {w4[f'output_tok_s_batch{BATCH}'] / bf16[f'output_tok_s_batch{BATCH}']:.2f}×, "
                     f"TTFT p50 {w4['ttft_p50_s'] / bf16['ttft_p50_s']:.2f}×, memory "
                     f"{w4['resident_bytes'] / bf16['resident_bytes']:.2f}×")
    text = "\n".join(lines)
    print(text)
    if args.out:
        with args.out.open("a") as out:
            out.write("\n" + text + "\n")


if __name__ == "__main__":
    main()
