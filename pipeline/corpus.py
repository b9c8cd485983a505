"""Text for calibration and evaluation, and the token windows cut from it.

Sources: the offline built-in corpus (the stdlib's `pydoc_data.topics`, split by a hash of each
topic's name so calibration and evaluation never share a document), local files
(.txt, .jsonl, .parquet), or a Hub dataset (`hf:<dataset id>`), which needs the network.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Literal

import torch

BUILTIN = "builtin"
Split = Literal["calibration", "eval"]


class CorpusError(ValueError):
    pass


def builtin_texts(split: Split) -> list[str]:
    """The stdlib's Python reference topics; one in four (by name hash) is held out for evaluation."""
    from pydoc_data.topics import topics

    def is_eval(name: str) -> bool:
        return hashlib.sha256(name.encode()).digest()[0] % 4 == 0

    return [topics[name] for name in sorted(topics) if is_eval(name) == (split == "eval")]


def load_texts(source: str, split: Split, *, text_field: str = "text", hub_config: str | None = None,
               hub_split: str = "test") -> list[str]:
    if source == BUILTIN:
        return builtin_texts(split)
    if source.startswith("hf:"):
        return _hub_texts(source.removeprefix("hf:"), hub_config, hub_split, text_field)
    path = Path(source).expanduser()
    if not path.is_file():
        raise CorpusError(f"text source {source!r}: no such file (use 'builtin', a .txt/.jsonl/.parquet file, "
                          "or hf:<dataset id>)")
    if path.suffix == ".txt":
        return [t for t in path.read_text().split("\n\n") if t.strip()]
    if path.suffix == ".jsonl":
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    elif path.suffix == ".parquet":
        import pyarrow.parquet as pq

        rows = pq.read_table(path).to_pylist()
    else:
        raise CorpusError(f"text source {source!r}: unsupported file type {path.suffix!r}; use .txt, .jsonl or .parquet")
    return _field(rows, text_field, source)


def _field(rows: list[dict], text_field: str, source: str) -> list[str]:
    if rows and text_field not in rows[0]:
        raise CorpusError(f"text source {source!r} has no field {text_field!r}; fields: {', '.join(sorted(rows[0]))}")
    return [str(row[text_field]) for row in rows if row.get(text_field)]


def _hub_texts(dataset: str, config: str | None, split: str, text_field: str) -> list[str]:
    from datasets import load_dataset

    try:
        rows = load_dataset(dataset, config, split=split)
    except Exception as err:  # datasets raises many kinds; all mean the same to the user
        raise CorpusError(f"Hub dataset {dataset!r} (config {config!r}, split {split!r}) could not be loaded: "
                          f"{err.__class__.__name__}: {err}. Offline? Use a local file or 'builtin'.") from None
    if text_field not in rows.column_names:
        raise CorpusError(f"Hub dataset {dataset!r} has no field {text_field!r}; fields: {', '.join(rows.column_names)}")
    return [t for t in rows[text_field] if t]


def token_windows(tokenizer, texts: list[str], samples: int, seq_len: int) -> torch.Tensor:
    """`samples` windows of `seq_len` tokens from the concatenated texts, each starting with BOS."""
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    step = seq_len - len(bos)
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text + "\n\n", add_special_tokens=False)["input_ids"])
        if len(ids) >= samples * step:
            break
    if len(ids) < samples * step:
        raise CorpusError(f"the text has {len(ids):,} tokens, fewer than samples × seq_len = "
                          f"{samples} × {seq_len}; lower them or add text")
    return torch.tensor([bos + ids[i * step:(i + 1) * step] for i in range(samples)])
