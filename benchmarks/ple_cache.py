"""PLECache on a full-size E2B-shaped Per-Layer-Embedding table, measured in one run.

The table: random BF16 weights, 262,144 × 8,960 (E2B's `embed_tokens_per_layer`, 4.70 GB), written as one
safetensors file holding `model.language_model.embed_tokens_per_layer.weight`. The cache is attached to a
stand-in model whose only module is that table (transformers' `Gemma4TextScaledWordEmbedding`, scale 16), so
what is measured is the table and its cache, not a random 5B model around it. Reported:

- memory: RssAnon and RssFile (/proc/self/status) after a fixed lookup workload (held-out text of the three
  kinds below), each configuration in its own process: the table held in memory (anonymous), the table mapped
  from the file (what transformers 5.17 leaves on a CPU in BF16), and PLECache with 0, 1k, 5k, 20k static
  hot rows;
- time per lookup (1 id, and a batch of 256) through each, cold page cache (the file's pages evicted with
  posix_fadvise(POSIX_FADV_DONTNEED) before the process maps it) and warm (the same workload again);
- hit rate with a Gemma tokenizer on held-out text: English prose (Python's own docs, `pydoc_data.topics`),
  code (the stdlib's .py files), German and Chinese (the gettext catalogs in /usr/share/locale: translated
  program messages). The hot set is chosen on each text's first half, scored on its second; LRU is warmed on
  the end of the first half and scored one token per lookup (decode);
- decode time per token of the tiny E2B (`tiny:e2b`) with and without the cache, cold and warm.

The tokenizer is Gemma 3's 262k one (the 270M package, `gguf:gemma3-270m`): Gemma 4's is a different BPE with
the same vocabulary size, so hit rates are a proxy. One torch thread. Usage:

    .venv/bin/python benchmarks/ple_cache.py [--workdir DIR] [--heldout 20000] [--out benchmarks/RESULTS.md]
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pipeline.generate.ple_cache import PLECache, hot_ids_from
from pipeline.tensors import StoredTensors

ROWS, WIDTH = 262_144, 8_960  # E2B: 35 layers × 256 per layer
SCALE = 256 ** 0.5  # transformers: hidden_size_per_layer_input ** 0.5
KEY = "model.language_model.embed_tokens_per_layer.weight"
HOT = (0, 1000, 5000, 20000)
SINGLE, BATCH, BATCHES = 2048, 256, 64  # the lookup workload: 2,048 one-id lookups, then 64 batches of 256 ids
MiB = 2 ** 20


# ---------------------------------------------------------------- the table on disk


def write_table(folder: Path, chunk: int = 8192) -> bool:
    """The random table as one safetensors file, written chunk by chunk (safetensors' own writers take the
    whole tensor: 4.70 GB held twice). Kept if a complete one is there (--workdir)."""
    path = folder / "model.safetensors"
    nbytes = ROWS * WIDTH * 2
    header = json.dumps({KEY: {"dtype": "BF16", "shape": [ROWS, WIDTH], "data_offsets": [0, nbytes]}}).encode()
    header += b" " * (-len(header) % 8)  # the format pads its header with spaces to 8 bytes
    if path.is_file() and path.stat().st_size == 8 + len(header) + nbytes:
        return False
    folder.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    g = torch.Generator().manual_seed(0)
    with open(partial, "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header)
        for start in range(0, ROWS, chunk):
            rows = (torch.randn(min(chunk, ROWS - start), WIDTH, generator=g) * 0.05).to(torch.bfloat16)
            f.write(rows.view(torch.int16).numpy())
    partial.replace(path)
    return True


def evict(path: Path) -> None:
    """Drop the file's pages from the page cache (unprivileged; pages a process still maps stay)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def mapped(folder: Path) -> torch.Tensor:
    """The stored table as a file-backed BF16 tensor, as transformers leaves it on a CPU in BF16."""
    with warnings.catch_warnings():  # read-only map: nothing writes to it
        warnings.simplefilter("ignore")
        return torch.from_numpy(StoredTensors(folder).memmap(KEY)).view(torch.bfloat16)


def in_memory(folder: Path, chunk: int = 8192) -> torch.Tensor:
    """The whole table in the process's own (anonymous) memory: a model widened to float32 or on an
    accelerator holds it so (here BF16, 4.70 GB, read in chunks)."""
    rows = StoredTensors(folder).memmap(KEY)
    weight = torch.empty(ROWS, WIDTH, dtype=torch.bfloat16)
    out = weight.view(torch.int16).numpy().view(np.uint16)
    for start in range(0, ROWS, chunk):
        out[start:start + chunk] = rows[start:start + chunk]
    return weight


class StandIn(nn.Module):
    """A model reduced to its PLE table, under the name `PLECache.attach` looks for."""

    def __init__(self, weight: torch.Tensor):
        from transformers.models.gemma4.modeling_gemma4 import Gemma4TextScaledWordEmbedding

        super().__init__()
        with torch.device("meta"):  # no 4.70 GB initialisation: the weight is given
            table = Gemma4TextScaledWordEmbedding(ROWS, WIDTH, 0, SCALE)
        table.weight = nn.Parameter(weight, requires_grad=False)
        table.embed_scale = torch.tensor(SCALE)
        self.embed_tokens_per_layer = table


def rss() -> dict:
    status = {line.split(":")[0]: line.split()[1] for line in open("/proc/self/status") if line.startswith("Rss")}
    return {"anon": int(status["RssAnon"]) * 1024, "file": int(status["RssFile"]) * 1024}


# ---------------------------------------------------------------- one configuration, in its own process


@torch.no_grad()
def child(spec: dict) -> dict:
    import importlib

    importlib.import_module("transformers.models.gemma4.modeling_gemma4")  # before the baseline RSS is read

    torch.set_num_threads(1)
    folder = Path(spec["folder"])
    ids = torch.from_numpy(np.load(spec["ids"]))
    single, batched = ids[:SINGLE].reshape(-1, 1, 1), ids[SINGLE:SINGLE + BATCH * BATCHES].reshape(-1, 1, BATCH)
    gc.collect()
    base = rss()
    evict(folder / "model.safetensors")  # cold: nothing of the file in the page cache
    start = time.perf_counter()
    model = StandIn(in_memory(folder) if spec["mode"] == "memory" else mapped(folder))
    lookup = model.embed_tokens_per_layer
    if spec["mode"] == "cache":
        hot = np.load(spec["hot"])[: spec["hot_rows"]].tolist()
        lookup = PLECache.attach(model, folder, hot_rows=spec["hot_rows"], policy="static", hot_ids=hot)
    out = {"ready_s": time.perf_counter() - start}
    # the same lookups again and again: the first pass reads the file (cold), the next ones not (warm: the best
    # of 5, the machine being shared)
    for page_cache in ("cold", *["warm"] * 5):
        for name, calls in (("single", single), ("batch", batched)):
            start = time.perf_counter()
            for call in calls:
                lookup(call)
            seconds = (time.perf_counter() - start) / len(calls)
            out[f"{page_cache}_{name}_s"] = min(seconds, out.get(f"{page_cache}_{name}_s", seconds))
    gc.collect()
    out.update({"base": base, "after": rss()})
    if spec["mode"] == "cache":
        stats = lookup.stats()  # static: every pass hits the same ids
        out.update({"hit_rate": stats.hit_rate, "resident_bytes": stats.resident_bytes, "table_bytes": stats.table_bytes})
    return out


def run_child(spec: dict) -> dict:
    result = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    if result.returncode:
        raise RuntimeError(f"{spec['mode']} {spec.get('hot_rows')}: {result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- the texts and hit rates


def mo_strings(path: Path) -> list[str]:
    """The translations (msgstr) of a gettext .mo catalog, the header entry left out."""
    data = path.read_bytes()
    order = "<" if data[:4] == b"\xde\x12\x04\x95" else ">"
    _, count, originals, translations = struct.unpack(order + "4I", data[4:20])
    found = []
    for i in range(count):
        if struct.unpack(order + "2I", data[originals + 8 * i: originals + 8 * i + 8])[0] == 0:
            continue  # msgid "": the catalog's metadata
        length, offset = struct.unpack(order + "2I", data[translations + 8 * i: translations + 8 * i + 8])
        found += data[offset: offset + length].decode("utf-8", "replace").split("\x00")  # plural forms
    return found


def texts(code_chars: int = 3_000_000) -> dict[str, tuple[str, str]]:
    """kind -> (where it comes from, the text): what ships on this machine offline."""
    import pydoc_data.topics

    topics = pydoc_data.topics.topics
    stdlib = Path(os.__file__).parent
    code, size = [], 0
    for path in sorted(stdlib.glob("*.py")):
        if size >= code_chars:
            break
        code.append(path.read_text(errors="replace"))
        size += len(code[-1])
    found = {"English prose": ("Python's docs, pydoc_data.topics", "\n\n".join(topics[k] for k in sorted(topics))),
             "code": (f"Python {platform.python_version()} stdlib Lib/*.py, first {len(code)} files", "\n\n".join(code))}
    for kind, lang in (("German", "de"), ("Chinese", "zh_CN")):
        catalogs = sorted(Path("/usr/share/locale", lang, "LC_MESSAGES").glob("*.mo"))
        if catalogs:
            found[kind] = (f"/usr/share/locale/{lang} gettext catalogs ({len(catalogs)}): translated messages",
                           "\n".join(s for path in catalogs for s in mo_strings(path)))
    return found


@torch.no_grad()
def hit_rates(folder: Path, tokens: dict[str, list[int]], heldout: int) -> list[dict]:
    """Static top-K (each text's own first half, and the mixture of all first halves) and LRU, per text."""
    halves = {kind: (ids[: len(ids) // 2], ids[len(ids) // 2:][:heldout]) for kind, ids in tokens.items()}
    scored = {kind: torch.tensor(ids).reshape(1, -1) for kind, (_, ids) in halves.items()}
    rows = {kind: {"kind": kind, "first": len(first), "scored": len(ids)} for kind, (first, ids) in halves.items()}

    def static(k: int, hot: list[int], kinds) -> None:
        cache = PLECache.attach(StandIn(mapped(folder)), folder, hot_rows=k, policy="static", hot_ids=hot)
        for kind, label in kinds:
            before = cache.stats()
            cache(scored[kind])
            rows[kind][f"static_{label}_{k}"] = (cache.stats().hits - before.hits) / scored[kind].numel()

    for k in HOT[1:]:
        static(k, hot_ids_from([first for first, _ in halves.values()], k), [(kind, "mix") for kind in halves])
        for kind, (first, _) in halves.items():
            static(k, hot_ids_from([first], k), [(kind, "own")])
            cache = PLECache.attach(StandIn(mapped(folder)), folder, hot_rows=k, policy="lru")
            for chunk in torch.tensor(first[-heldout:]).split(64):  # warm-up: the end of the first half
                cache(chunk.reshape(1, -1))
            before = cache.stats()
            for token in scored[kind].reshape(-1, 1, 1):  # decode: one id per lookup
                cache(token)
            rows[kind][f"lru_{k}"] = (cache.stats().hits - before.hits) / scored[kind].numel()
            del cache
            gc.collect()
    return list(rows.values())


# ---------------------------------------------------------------- tiny E2B decode


@torch.no_grad()
def tiny_decode(prompt: int = 32, decode: int = 64, repeats: int = 3) -> dict:
    from transformers import DynamicCache

    from pipeline.model import load_config, load_model, resolve
    from pipeline.recipe import ModelSpec

    source = resolve(ModelSpec(id="tiny:e2b"))
    full = load_model(source, load_config(source)).eval()
    cached = load_model(source, load_config(source)).eval()
    vocab = full.config.get_text_config().vocab_size
    cache = PLECache.attach(cached, source.path, hot_rows=vocab // 16, policy="lru")  # ~6 % of the rows
    ids = torch.randint(20, vocab, (1, prompt + decode), generator=torch.Generator().manual_seed(0))

    def run(model) -> tuple[float, torch.Tensor]:
        kv = DynamicCache(config=model.config)
        model(input_ids=ids[:, :prompt], past_key_values=kv, use_cache=True)
        start = time.perf_counter()
        logits = [model(input_ids=ids[:, t: t + 1], past_key_values=kv, use_cache=True).logits[0, -1]
                  for t in range(prompt, ids.shape[1])]
        return (time.perf_counter() - start) / decode, torch.stack(logits)

    files = sorted(Path(source.path).glob("*.safetensors"))
    out = {"vocab": vocab, "hot_rows": cache.hot_rows}
    for name, model in (("without", full), ("with", cached)):
        for path in files:
            evict(path)
        out[f"cold_{name}"], logits = run(model)
        out[f"logits_{name}"] = logits
    out["equal"] = torch.equal(out.pop("logits_without"), out.pop("logits_with"))
    for name, model in (("without", full), ("with", cached)):
        out[f"warm_{name}"] = statistics.median(run(model)[0] for _ in range(repeats))
    out["hit_rate"] = cache.stats().hit_rate
    return out


# ---------------------------------------------------------------- report


def machine(load: tuple[float, float]) -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    flags = set(next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split())
    isa = ", ".join(f for f in ("avx2", "avx512f", "avx512_bf16", "amx_tile") if f in flags)
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30
    import transformers

    return (f"{os.cpu_count()} × {cpu} ({isa}), {ram:.0f} GiB RAM, Linux {platform.release()}; torch {torch.__version__}, "
            f"transformers {transformers.__version__}, one torch thread; load average {load[0]:.1f} at the start, "
            f"{load[1]:.1f} at the end (the machine is shared: timings are indicative)")


def markdown(configs: list[dict], hits: list[dict], sources: dict, tiny: dict, args, write_s: float | None,
             load: tuple[float, float]) -> str:
    today = datetime.date.today().isoformat()
    mem = next(c for c in configs if c["mode"] == "memory")
    written = f"written in {write_s:.0f} s" if write_s else "reused from --workdir"
    lines = [f"## PLE row cache: a full-size E2B-shaped table (262,144 × 8,960 BF16, {ROWS * WIDTH * 2 / 1e9:.2f} GB), "
             f"CPU, {today}", "",
             f"`{' '.join(['benchmarks/ple_cache.py', *sys.argv[1:]])}` on {machine(load)}. Random BF16 table written as "
             f"one safetensors file ({written}); the cache attached to a stand-in model holding only the table "
             "(transformers' `Gemma4TextScaledWordEmbedding`). Each configuration in its own process, the file's "
             "pages evicted first (`posix_fadvise(POSIX_FADV_DONTNEED)`); the workload: "
             f"{SINGLE:,} one-id lookups, then {BATCHES} batches of {BATCH} ids, of held-out tokens of the four texts "
             "below (interleaved), run once on a cold page cache, then 5 times warm (the best of 5). Static hot rows: the most frequent ids of "
             "the texts' first halves together. RSS after the warm pass, less the process before the table "
             f"(RssAnon {mem['base']['anon'] / MiB:.0f} MiB, RssFile {mem['base']['file'] / MiB:.0f} MiB: Python, "
             "torch, the workload). Ratios: time over the in-memory table's, same pass.", "",
             "| table held as | hot rows | hot rows' bytes | RssAnon + | RssFile + | hit rate | ready (s) | "
             "1 id cold (µs) | 1 id warm (µs) | 256 ids cold (ms) | 256 ids warm (ms) | × in memory, 1 id cold / warm | "
             "× in memory, 256 ids cold / warm |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for c in configs:
        label = {"memory": "in memory (anonymous)", "mapped": "mapped from the file (transformers, CPU BF16)",
                 "cache": "PLECache, static"}[c["mode"]]
        hot = f"{c['hot_rows']:,}" if c["mode"] == "cache" else "—"
        resident = f"{c['resident_bytes'] / MiB:.1f} MiB" if c["mode"] == "cache" else f"{ROWS * WIDTH * 2 / MiB:,.0f} MiB (whole table)"
        hit = f"{c['hit_rate']:.1%}" if c["mode"] == "cache" else "—"
        lines.append(
            f"| {label} | {hot} | {resident} | {(c['after']['anon'] - c['base']['anon']) / MiB:,.0f} MiB | "
            f"{(c['after']['file'] - c['base']['file']) / MiB:,.0f} MiB | {hit} | {c['ready_s']:.1f} | "
            f"{c['cold_single_s'] * 1e6:.0f} | {c['warm_single_s'] * 1e6:.0f} | {c['cold_batch_s'] * 1e3:.2f} | "
            f"{c['warm_batch_s'] * 1e3:.2f} | {c['cold_single_s'] / mem['cold_single_s']:.1f} / "
            f"{c['warm_single_s'] / mem['warm_single_s']:.1f} | {c['cold_batch_s'] / mem['cold_batch_s']:.1f} / "
            f"{c['warm_batch_s'] / mem['warm_batch_s']:.1f} |")
    ks = HOT[1:]
    lines += ["", "Hit rate, tokens whose row was hot. Tokenizer: Gemma 3's 262k (the 270M package) — Gemma 4's is a "
              "different BPE with the same vocabulary size, so these are a proxy. Static: top-K of the text's own first "
              "half (own) or of all four first halves together (mix), scored on the second half; LRU: warmed on the "
              f"last {args.heldout:,} tokens of the first half, scored one token per lookup (decode) on the second. "
              "Sources: " + "; ".join(f"{kind}: {where}" for kind, (where, _) in sources.items()) + ".", "",
              "| text | tokens, first half / scored | " + " | ".join(f"static own {k:,}" for k in ks) + " | "
              + " | ".join(f"static mix {k:,}" for k in ks) + " | " + " | ".join(f"LRU {k:,}" for k in ks) + " |",
              "|---|---:|" + "---:|" * (3 * len(ks))]
    for h in hits:
        lines.append(f"| {h['kind']} | {h['first']:,} / {h['scored']:,} | "
                     + " | ".join(f"{h[f'static_own_{k}']:.1%}" for k in ks) + " | "
                     + " | ".join(f"{h[f'static_mix_{k}']:.1%}" for k in ks) + " | "
                     + " | ".join(f"{h[f'lru_{k}']:.1%}" for k in ks) + " |")
    lines += ["", f"Decode, tiny E2B (`tiny:e2b`, {tiny['vocab']:,}-row table, random weights), 32-token prompt then "
              f"64 one-token steps, seconds per token; with the cache: LRU of {tiny['hot_rows']} rows (hit rate over "
              f"the runs {tiny['hit_rate']:.1%}). Cold: the checkpoint's pages evicted before the run (pages the "
              f"model maps stay); warm: median of 3. Logits bit-identical: {tiny['equal']}.", "",
              "| page cache | without the cache (ms/token) | with the cache (ms/token) | with / without |",
              "|---|---:|---:|---:|"]
    for name in ("cold", "warm"):
        lines.append(f"| {name} | {tiny[f'{name}_without'] * 1e3:.2f} | {tiny[f'{name}_with'] * 1e3:.2f} | "
                     f"{tiny[f'{name}_with'] / tiny[f'{name}_without']:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, help="keep the 4.70 GB table here (reused); default: a temp dir, removed")
    parser.add_argument("--heldout", type=int, default=20000, help="scored tokens per text (LRU warm-up too)")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    torch.set_num_threads(1)
    load = os.getloadavg()[0]
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench-ple-"))
    try:
        start = time.perf_counter()
        folder = work / "e2b-ple"
        written = write_table(folder)
        write_s = time.perf_counter() - start if written else None
        print(f"table written in {write_s:.0f} s" if written else "table reused", flush=True)

        from transformers import AutoTokenizer

        from pipeline.gguf_source import gemma3_270m_source

        tokenizer = AutoTokenizer.from_pretrained(gemma3_270m_source())
        sources = texts()
        tokens = {kind: tokenizer(text, add_special_tokens=False)["input_ids"] for kind, (_, text) in sources.items()}
        hits = hit_rates(folder, tokens, args.heldout)
        print(json.dumps(hits), flush=True)

        # the memory/timing workload: the held-out halves interleaved, so every text is in both passes' lookups
        need = SINGLE + BATCH * BATCHES
        held = [ids[len(ids) // 2:] for ids in tokens.values()]
        ids = np.array([h[i] for i in range(need) for h in held if i < len(h)][:need], dtype=np.int64)
        np.save(work / "ids.npy", ids)
        np.save(work / "hot.npy", np.array(hot_ids_from([ids_[: len(ids_) // 2] for ids_ in tokens.values()], HOT[-1])))
        configs = []
        for mode, hot_rows in (("memory", None), ("mapped", None), *(("cache", k) for k in HOT)):
            spec = {"mode": mode, "hot_rows": hot_rows, "folder": str(folder), "ids": str(work / "ids.npy"),
                    "hot": str(work / "hot.npy")}
            configs.append({**spec, **run_child(spec)})
            print(json.dumps(configs[-1]), flush=True)
        tiny = tiny_decode()
        report = markdown(configs, hits, sources, tiny, args, write_s, (load, os.getloadavg()[0]))
        print(report)
        if args.out:
            text = args.out.read_text() if args.out.is_file() else "# Benchmarks\n"
            args.out.write_text(text.rstrip() + "\n\n`benchmarks/ple_cache.py`\n\n" + report)
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
