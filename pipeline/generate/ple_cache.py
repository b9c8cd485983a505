"""A Per-Layer-Embedding row cache for Gemma 4 E2B / E4B in transformers.

The PLE table (`embed_tokens_per_layer`: 262,144 × 8,960 BF16 on E2B, 4.70 GB, two thirds of the model; 5.27 GB
on E4B) is read one row per token per forward. `PLECache` replaces the loaded model's table with a module
that keeps `hot_rows` rows in memory on the model's device and reads every other row from the checkpoint's
safetensors file through a memory map, so the table is never held whole in the process's own memory (nor on
an accelerator). On a CPU in BF16, transformers 5.17 already maps the file and leaves the table file-backed,
paged in as rows are read; a model widened to float32 or placed on an accelerator holds it whole. Rows are the stored bytes, scaled as
transformers scales them (`Gemma4TextScaledWordEmbedding`: row × sqrt(hidden_size_per_layer_input) in the
table's dtype), so logits and `generate` output are bit-identical to the model with its full table.

Hot rows: `policy="static"` holds the ids it is given (the most frequent ids of a corpus: `hot_ids_from`);
`policy="lru"` fills its `hot_rows` slots with the rows last read and evicts the least recently used.

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    cache = PLECache.attach(model, path, hot_rows=5000, policy="lru")
    model.generate(**inputs)
    cache.stats()   # lookups, hit rate, resident bytes

A forward reads each of its distinct ids' rows once, hot or cold. The hot rows live on the device the table
was on when the cache was attached: place the model first.
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


class PLECache(nn.Module):
    """`embed_tokens_per_layer` with `hot_rows` rows in memory and the rest read from `rows` (the stored BF16
    table, [vocabulary, layers × per-layer width], memory-mapped), served in `dtype`, the model's."""

    def __init__(self, rows: np.memmap, dtype: torch.dtype, embed_scale: float, device: torch.device,
                 hot_rows: int, policy: str, hot_ids: Iterable[int] | None = None):
        super().__init__()
        if policy not in POLICIES:
            raise PLECacheError(f"policy {policy!r}: one of {', '.join(POLICIES)}")
        self.rows, self.dtype, self.policy = rows, dtype, policy
        self.num_embeddings, self.embedding_dim = rows.shape
        self.embed_scale = torch.tensor(embed_scale)  # as transformers' scaled embedding holds it
        self.hot_rows = min(hot_rows, self.num_embeddings)
        self.hot = torch.empty(self.hot_rows, self.embedding_dim, dtype=dtype, device=device)
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

    @classmethod
    def attach(cls, model: nn.Module, checkpoint: str | Path, hot_rows: int = 5000, policy: str = "static",
               hot_ids: Iterable[int] | None = None) -> PLECache:
        """Replace `model`'s PLE table by a cache over the table stored in `checkpoint` (the folder the model
        was loaded from), free the table's memory, and return the cache. The stored table must be the one the
        model holds: a BF16 table of the same shape."""
        name, table = _find_table(model)
        unreadable = [f"{path.name} ({why})" for path in sorted(Path(checkpoint).glob(WEIGHT_GLOB)) if (why := why_unreadable(path))]
        if unreadable:
            raise PLECacheError(f"{checkpoint}: cannot read {', '.join(unreadable)}")
        stored = StoredTensors(Path(checkpoint))
        key = next((k for k in stored.headers if k.endswith(f"{TABLE}.weight")), None)
        if key is None:
            raise PLECacheError(f"{checkpoint}: no {TABLE}.weight in its safetensors files (a packed int4/int8 table "
                                "is stored as weight_packed: not supported by this cache yet)")
        dtype, shape = stored.headers[key]
        if dtype != "BF16" or list(shape) != list(table.weight.shape) or not table.weight.dtype.is_floating_point:
            raise PLECacheError(f"{stored.files[key].name}: {key} is {dtype} {shape}, the model holds "
                                f"{table.weight.dtype} {list(table.weight.shape)}: the cache serves the BF16 table as stored")
        try:
            rows = stored.memmap(key)
        except (OSError, ValueError) as err:
            raise PLECacheError(f"{stored.files[key]}: {key} cannot be memory-mapped ({err})") from err
        cache = cls(rows, table.weight.dtype, float(table.embed_scale), table.weight.device, hot_rows, policy, hot_ids)
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
                        self.num_embeddings * self.embedding_dim * self.hot.element_size())

    def _check_ids(self, ids: torch.Tensor) -> None:
        if len(ids) and (int(ids.min()) < 0 or int(ids.max()) >= self.num_embeddings):
            raise IndexError(f"index out of range in self: token ids must lie in [0, {self.num_embeddings}), "
                             f"got {int(ids.min())}..{int(ids.max())}")  # nn.Embedding's refusal

    def _read(self, ids: np.ndarray) -> torch.Tensor:
        """Rows `ids` from the file, in that order, in the model's dtype (BF16 widens exactly, as at load)."""
        return torch.from_numpy(np.ascontiguousarray(self.rows[ids])).view(torch.bfloat16).to(self.dtype)

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
