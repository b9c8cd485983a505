"""A Per-Layer-Embedding row cache for Gemma 4 E2B / E4B in transformers.

The PLE table (`embed_tokens_per_layer`: 262,144 × 8,960 BF16 on E2B, 4.70 GB, two thirds of the model; 5.27 GB
on E4B) is read one row per token per forward. `PLECache` replaces the loaded model's table with a module
that keeps `hot_rows` rows in memory on the model's device and reads every other row from the checkpoint's
safetensors file through a memory map, so the table is never held whole in the process's own memory (nor on
an accelerator). The stored table is BF16, or an export's packed int4/int8 table, whose rows are dequantized as
they are read, as the reload dequantizes the whole table. On a CPU in BF16, transformers 5.17 already maps the file and leaves the table file-backed,
paged in as rows are read; a model widened to float32 or placed on an accelerator holds it whole. Rows are the stored bytes, scaled as
transformers scales them (`Gemma4TextScaledWordEmbedding`: row × sqrt(hidden_size_per_layer_input) in the
table's dtype), so logits and `generate` output are bit-identical to the model with its full table.

Hot rows: `policy="static"` holds the ids it is given (the most frequent ids of a corpus: `hot_ids_from`);
`policy="lru"` fills its `hot_rows` slots with the rows last read and evicts the least recently used.

    model, cache = PLECache.load(AutoModelForImageTextToText, path, hot_rows=5000, policy="lru", device="cuda")
    # or, on a model already loaded: cache = PLECache.attach(model, path, hot_rows=5000, policy="lru")
    model.generate(**inputs)
    cache.stats()   # lookups, hit rate, resident bytes

A forward reads each of its distinct ids' rows once, hot or cold. The hot rows are buffers: they follow
`model.to(device, dtype)`.
"""

from __future__ import annotations

import gc
from collections import Counter, OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pipeline.tensors import WEIGHT_GLOB, StoredTensors, why_unreadable

TABLE = "embed_tokens_per_layer"
POLICIES = ("static", "lru")
HOT_IDS_FILE = "ple_hot_ids.json"  # in an E-model export: the calibration text's most frequent ids, for policy="static"
RECORDED_IDS = 20_000  # ids kept there, most frequent first: more than any hot set worth holding


class PLECacheError(ValueError):
    pass


@dataclass
class PLEStats:
    lookups: int  # tokens looked up
    hits: int  # of them, tokens whose row was among the hot rows
    hot_rows: int
    resident_bytes: int  # hot rows held in memory (cold rows are the file's pages, the OS's to keep or drop)
    table_bytes: int  # the whole table, as stored

    @property
    def hit_rate(self) -> float:
        return self.hits / self.lookups if self.lookups else 0.0


class StoredRows:
    """A BF16 table's rows, memory-mapped from the checkpoint."""

    def __init__(self, rows: np.memmap):
        self.rows = rows
        self.shape = rows.shape
        self.nbytes = rows.nbytes

    def read(self, ids: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(self.rows[ids])).view(torch.bfloat16)


class PackedRows:
    """A pack-quantized table's rows (compressed-tensors' int4/int8 `weight_packed` and `weight_scale`, as our
    exports store PLE tables), memory-mapped; the rows read are unpacked and dequantized by compressed-tensors'
    own `unpack_from_int32` and `dequantize`, as its decompressor does the whole table when the export reloads,
    so they are the reloaded table's rows bit for bit. Fills a gap: compressed-tensors decompresses whole tables."""

    def __init__(self, packed: np.memmap, scale: np.memmap, columns: int, args):
        self.packed, self.scale, self.args = packed, scale, args
        self.shape = (packed.shape[0], columns)
        self.nbytes = packed.nbytes + scale.nbytes

    def read(self, ids: np.ndarray) -> torch.Tensor:
        from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
        from compressed_tensors.quantization.lifecycle.forward import dequantize

        packed = torch.from_numpy(np.ascontiguousarray(self.packed[ids]))
        scale = torch.from_numpy(np.ascontiguousarray(self.scale[ids])).view(torch.bfloat16)
        ints = unpack_from_int32(packed, self.args.num_bits, torch.Size([len(ids), self.shape[1]]))
        return dequantize(x_q=ints, scale=scale, zero_point=None, args=self.args)


class PLECache(nn.Module):
    """`embed_tokens_per_layer` with `hot_rows` rows in memory and the rest read from `rows` (the stored table,
    [vocabulary, layers × per-layer width], memory-mapped: BF16, or packed int4/int8), served in `dtype`, the
    model's."""

    def __init__(self, rows: StoredRows | PackedRows, dtype: torch.dtype, embed_scale: float, device: torch.device,
                 hot_rows: int, policy: str, hot_ids: Iterable[int] | None = None):
        super().__init__()
        if policy not in POLICIES:
            raise PLECacheError(f"policy {policy!r}: one of {', '.join(POLICIES)}")
        self.rows, self.policy = rows, policy
        self.num_embeddings, self.embedding_dim = rows.shape
        # buffers (not saved): `model.to(device, dtype)` moves and casts them with the rest of the model
        self.register_buffer("embed_scale", torch.tensor(embed_scale), persistent=False)  # as transformers holds it
        self.hot_rows = min(hot_rows, self.num_embeddings)
        self.register_buffer("hot", torch.empty(self.hot_rows, self.embedding_dim, dtype=dtype, device=device),
                             persistent=False)
        self.slot = torch.full((self.num_embeddings,), -1, dtype=torch.long)  # id → its hot row, -1: cold
        self.recent: OrderedDict[int, int] = OrderedDict()  # lru: id → slot, least recent first
        self.lookups = self.hits = 0
        if policy == "static":
            ids = list(dict.fromkeys(int(i) for i in (hot_ids or [])))[: self.hot_rows]
            self._check_ids(torch.tensor(ids, dtype=torch.long))
            if ids:
                self.hot[: len(ids)] = self._read(np.array(ids)).to(device)
                self.slot[ids] = torch.arange(len(ids))
        elif hot_ids is not None:
            raise PLECacheError("hot_ids are for policy='static'; 'lru' chooses its rows as it reads them")

    @property
    def dtype(self) -> torch.dtype:
        """What the rows are served in: the model's dtype, which the hot rows follow."""
        return self.hot.dtype

    @classmethod
    def load(cls, model_class, checkpoint: str | Path, hot_rows: int = 5000, policy: str = "static",
             hot_ids: Iterable[int] | None = None, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
             **from_pretrained) -> tuple[nn.Module, PLECache]:
        """`model_class.from_pretrained(checkpoint)` with the PLE table served by the cache and never held whole:
        loaded in BF16 on the CPU, where transformers maps the checkpoint and leaves the table file-backed, the
        cache attached, then the model moved to `device` and `dtype` without its table. (Loaded straight to an
        accelerator, or in float32, transformers would hold the whole table there first.) An export's packed
        tables load as its reload loads them (pipeline/tables.py, loading_packed_tables)."""
        from pipeline.tables import loading_packed_tables

        with loading_packed_tables():
            model = model_class.from_pretrained(checkpoint, dtype=torch.bfloat16, device_map="cpu", **from_pretrained)
        cache = cls.attach(model, checkpoint, hot_rows, policy, hot_ids)
        model.to(device=device, dtype=dtype)
        return model, cache

    @classmethod
    def attach(cls, model: nn.Module, checkpoint: str | Path, hot_rows: int = 5000, policy: str = "static",
               hot_ids: Iterable[int] | None = None) -> PLECache:
        """Replace `model`'s PLE table by a cache over the table stored in `checkpoint` (the folder the model
        was loaded from), free the table's memory, and return the cache. The stored table must be the one the
        model holds: BF16, or an export's packed int4/int8 table (the model is its reload), of the same shape."""
        name, table = _find_table(model)
        unreadable = [f"{path.name} ({why})" for path in sorted(Path(checkpoint).glob(WEIGHT_GLOB)) if (why := why_unreadable(path))]
        if unreadable:
            raise PLECacheError(f"{checkpoint}: cannot read {', '.join(unreadable)}")
        rows = stored_rows(Path(checkpoint))
        # a reloaded packed table has no `weight` until compressed-tensors decompresses it at the first forward
        weight = table._parameters.get("weight")
        shape, dtype, device = ((list(weight.shape), weight.dtype, weight.device) if weight is not None else
                                (table.weight_shape.tolist(), table.weight_scale.dtype, table.weight_scale.device))
        if list(rows.shape) != shape or not dtype.is_floating_point:
            raise PLECacheError(f"{checkpoint}: its {TABLE} is {list(rows.shape)}, the model holds {dtype} {shape}: "
                                "not the table this model was loaded with")
        cache = cls(rows, dtype, float(table.embed_scale.detach()), device, hot_rows, policy, hot_ids)
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent), attr, cache)
        del table
        gc.collect()
        return cache

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        unique, inverse, counts = torch.unique(input_ids.reshape(-1).cpu(), return_inverse=True, return_counts=True)
        self._check_ids(unique)
        slots = self.slot[unique]
        hot = slots >= 0
        self.lookups += input_ids.numel()
        self.hits += int(counts[hot].sum())
        device = self.hot.device
        found = torch.empty(len(unique), self.embedding_dim, dtype=self.dtype, device=device)
        found[hot.to(device)] = self.hot[slots[hot].to(device)]
        if self.policy == "lru":
            for i in unique[hot].tolist():
                self.recent.move_to_end(i)
        if (~hot).any():
            cold = unique[~hot]
            found[(~hot).to(device)] = self._read(cold.numpy()).to(device)
            if self.policy == "lru" and self.hot_rows:
                self._admit(cold, found[(~hot).to(device)])
        rows = found[inverse.to(device)].reshape(*input_ids.shape, self.embedding_dim)
        return rows * self.embed_scale.to(self.dtype)  # transformers' Gemma4TextScaledWordEmbedding arithmetic

    def stats(self) -> PLEStats:
        return PLEStats(self.lookups, self.hits, self.hot_rows, self.hot.numel() * self.hot.element_size(),
                        self.rows.nbytes)

    def _check_ids(self, ids: torch.Tensor) -> None:
        if len(ids) and (int(ids.min()) < 0 or int(ids.max()) >= self.num_embeddings):
            raise IndexError(f"index out of range in self: token ids must lie in [0, {self.num_embeddings}), "
                             f"got {int(ids.min())}..{int(ids.max())}")  # nn.Embedding's refusal

    def _read(self, ids: np.ndarray) -> torch.Tensor:
        """Rows `ids` from the file, in that order, in the model's dtype (BF16 widens exactly, as at load)."""
        return self.rows.read(ids).to(self.dtype)

    def _admit(self, ids: torch.Tensor, rows: torch.Tensor) -> None:
        """lru: put freshly read rows into free slots, else into the least recently used ones."""
        for i, row in zip(ids.tolist()[-self.hot_rows:], rows[-self.hot_rows:]):
            if len(self.recent) < self.hot_rows:
                slot = len(self.recent)
            else:
                evicted, slot = self.recent.popitem(last=False)
                self.slot[evicted] = -1
            self.hot[slot] = row
            self.slot[i] = slot
            self.recent[i] = slot


def stored_rows(checkpoint: Path) -> StoredRows | PackedRows:
    """The PLE table stored in `checkpoint`, memory-mapped: the BF16 `weight`, or the packed tensors with the
    quantization args its `config.json` gives them."""
    import json

    from compressed_tensors.quantization import QuantizationArgs

    from pipeline.names import first_match

    stored = StoredTensors(checkpoint)
    keys = {leaf: next((k for k in stored.headers if k.endswith(f"{TABLE}.{leaf}")), None)
            for leaf in ("weight", "weight_packed", "weight_scale", "weight_shape")}
    try:
        if keys["weight"]:
            if stored.headers[keys["weight"]][0] != "BF16":
                raise PLECacheError(f"{stored.files[keys['weight']].name}: {keys['weight']} is "
                                    f"{stored.headers[keys['weight']][0]}: the cache serves BF16 or packed tables")
            return StoredRows(stored.memmap(keys["weight"]))
        if keys["weight_packed"] and keys["weight_scale"] and keys["weight_shape"]:
            module = keys["weight_packed"].removesuffix(".weight_packed")
            config = json.loads((checkpoint / "config.json").read_text()).get("quantization_config") or {}
            group = next((g for g in (config.get("config_groups") or {}).values()
                          if first_match(module, g.get("targets", []))), None)
            if group is None:
                raise PLECacheError(f"{checkpoint / 'config.json'}: no quantization_config group names {module}")
            columns = int(stored.get(keys["weight_shape"])[1])
            return PackedRows(stored.memmap(keys["weight_packed"]), stored.memmap(keys["weight_scale"]), columns,
                              QuantizationArgs(**group["weights"]))
    except PLECacheError:
        raise
    except (OSError, ValueError) as err:
        raise PLECacheError(f"{checkpoint}: the {TABLE} table cannot be memory-mapped ({err})") from err
    raise PLECacheError(f"{checkpoint}: no {TABLE}.weight (BF16) or {TABLE}.weight_packed (int4/int8) in its "
                        "safetensors files")


def write_hot_ids(folder: Path, token_ids: torch.Tensor, mixture: str) -> Path:
    """Record the most frequent ids of the run's calibration tokens in the export, so that a user of a published
    build gets a static hot set without the calibration text."""
    import json

    counts = Counter(token_ids.reshape(-1).tolist()).most_common(RECORDED_IDS)
    path = Path(folder) / HOT_IDS_FILE
    path.write_text(json.dumps({"mixture": mixture, "tokens": int(token_ids.numel()),
                                "ids": [i for i, _ in counts], "counts": [c for _, c in counts]}))
    return path


def recorded_hot_ids(checkpoint: str | Path, hot_rows: int) -> list[int]:
    """The `hot_rows` most frequent ids the quantize run recorded in `checkpoint` (`policy="static"`)."""
    import json

    path = Path(checkpoint) / HOT_IDS_FILE
    try:
        return json.loads(path.read_text())["ids"][:hot_rows]
    except (OSError, ValueError, KeyError) as err:
        raise PLECacheError(f"{path}: no recorded hot set ({type(err).__name__}: {err}); give hot_ids="
                            "hot_ids_from(your token ids, hot_rows), or policy='lru'") from err


def hot_ids_from(token_ids: Iterable[Iterable[int]], hot_rows: int) -> list[int]:
    """The `hot_rows` most frequent ids of tokenized text (`policy="static"`)."""
    counts = Counter(int(i) for ids in token_ids for i in ids)
    return [i for i, _ in counts.most_common(hot_rows)]


def _find_table(model: nn.Module) -> tuple[str, nn.Embedding]:
    found = [(name, module) for name, module in model.named_modules() if name.endswith(TABLE)]
    if not found:
        raise PLECacheError(f"{type(model).__name__} has no {TABLE}: the PLE cache is for Gemma 4 E2B / E4B")
    name, module = found[0]
    if isinstance(module, PLECache):
        raise PLECacheError(f"{name} is already a PLECache")
    return name, module


def _resident() -> dict[str, int]:
    """This process's anonymous and file-backed resident memory (Linux), bytes."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return {key: int(fields[key].split()[0]) * 1024 for key in ("RssAnon", "RssFile")}


def main(argv: list[str] | None = None) -> None:
    """`python -m pipeline.generate.ple_cache [MODEL] [--text TEXT]`: an E-model (default the tiny E2B) loaded with
    the cache, one greedy generation, and what it held and hit."""
    import argparse

    from huggingface_hub import snapshot_download
    from transformers import AutoModelForImageTextToText, AutoTokenizer

    from pipeline.model import resolve
    from pipeline.recipe import ModelSpec

    parser = argparse.ArgumentParser(prog="python -m pipeline.generate.ple_cache", description=main.__doc__)
    parser.add_argument("model", nargs="?", default="tiny:e2b", help="a folder, Hub id or tiny:e2b|e4b")
    parser.add_argument("--text", default="The Python language reference describes the syntax and core semantics.")
    parser.add_argument("--hot-rows", type=int, default=5000)
    parser.add_argument("--policy", choices=POLICIES, default="lru")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    args = parser.parse_args(argv)

    source = resolve(ModelSpec(id=args.model))
    folder = source.path or Path(snapshot_download(args.model))
    before = _resident()
    model, cache = PLECache.load(AutoModelForImageTextToText, folder, hot_rows=args.hot_rows, policy=args.policy)
    loaded = _resident()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    inputs = tokenizer(args.text, return_tensors="pt")
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False)
    stats = cache.stats()
    print(f"model: {args.model} ({folder})")
    print(f"PLE table: {stats.table_bytes / 2**20:,.1f} MiB in the file; hot rows: {stats.hot_rows:,} "
          f"({stats.resident_bytes / 2**20:,.2f} MiB, policy {args.policy})")
    print(f"resident after loading, above the interpreter: anonymous {(loaded['RssAnon'] - before['RssAnon']) / 2**20:,.1f} "
          f"MiB, file-backed {(loaded['RssFile'] - before['RssFile']) / 2**20:,.1f} MiB")
    print(f"lookups: {stats.lookups:,}, hits: {stats.hits:,} (hit rate {stats.hit_rate:.1%})")
    print(f"generated: {tokenizer.decode(output[0, inputs['input_ids'].shape[1]:])!r}")


if __name__ == "__main__":
    main()
