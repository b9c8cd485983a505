"""The calibration stage: a deterministic set of token windows from a mixture of text sources.

Each source is the offline built-in corpus (its calibration half, disjoint from the held-out
evaluation half), a local file, or a Hub dataset; `format: messages` sources hold chat turns
and are rendered with the model's chat template, as instruct models see text (the built-in corpus'
pages as questions and answers). Samples are
shared out by weight; the result is hashed and cached in the run directory, and reused while
the recipe's calibration block (and the tokenizer) stay the same.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from pathlib import Path

import torch
from pydantic import BaseModel

from pipeline.corpus import CorpusError, load_conversations, load_texts, require_chat_template
from pipeline.recipe import CalibrationSpec, CalibrationSource

log = logging.getLogger(__name__)

CACHE_DIR = "calibration"


class CalibrationSet(BaseModel):
    """What the manifest records about the calibration data."""

    sha256: str  # of the token ids: same recipe → same hash
    samples: int
    seq_len: int
    per_source: dict[str, int]
    cached: bool
    mixture: str | None = None  # the mixture the windows came from (None: the recipe's own sources)
    # mixtures tried first whose sources could not be loaded, each with why (calibration.fallback)
    fell_back_from: dict[str, str] = {}


def allocate(samples: int, weights: list[float]) -> list[int]:
    """Split `samples` by weight, largest remainder first, so the counts sum exactly."""
    total = sum(weights)
    exact = [samples * w / total for w in weights]
    counts = [int(x) for x in exact]
    for i in sorted(range(len(weights)), key=lambda i: exact[i] - counts[i], reverse=True)[: samples - sum(counts)]:
        counts[i] += 1
    return counts


def render(source: CalibrationSource, tokenizer, rows: list) -> list[str]:
    if source.format == "text":
        return rows
    require_chat_template(tokenizer, source.source)
    return [tokenizer.apply_chat_template(messages, tokenize=False) for messages in rows]


def source_rows(source: CalibrationSource) -> list:
    if source.format == "text":
        return load_texts(source.source, "calibration", text_field=source.field,
                          hub_config=source.config, hub_split=source.split)
    return load_conversations(source.source, "calibration", field=source.field, hub_config=source.config,
                              hub_split=source.split)


def windows_from(texts: list[str], tokenizer, count: int, seq_len: int, seed: int, name: str) -> list[list[int]]:
    """`count` windows of `seq_len` tokens (BOS first) from the texts, shuffled by `seed`, packed end to end."""
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    step = seq_len - len(bos)
    ids: list[int] = []
    for i in order:
        if len(ids) >= count * step:
            break
        ids.extend(tokenizer(texts[i] + "\n\n", add_special_tokens=False)["input_ids"])
    if len(ids) < count * step:
        raise CorpusError(f"calibration source {name!r} has {len(ids):,} tokens, fewer than its share of "
                          f"{count} samples × {seq_len} tokens; lower samples or seq_len, or add text")
    return [bos + ids[k * step:(k + 1) * step] for k in range(count)]


def build(spec: CalibrationSpec, tokenizer) -> tuple[torch.Tensor, dict[str, int]]:
    counts = allocate(spec.samples, [s.weight for s in spec.sources])
    rows, per_source = [], {}
    for index, (source, count) in enumerate(zip(spec.sources, counts)):
        if count == 0:
            continue
        texts = render(source, tokenizer, source_rows(source))
        rows += windows_from(texts, tokenizer, count, spec.seq_len, spec.seed + index, source.source)
        per_source[source.source] = per_source.get(source.source, 0) + count
    random.Random(spec.seed).shuffle(rows)  # mix sources across batches
    return torch.tensor(rows, dtype=torch.long), per_source


def load_or_build(spec: CalibrationSpec, tokenizer, run_dir: Path, tokenizer_id: str) -> tuple[torch.Tensor, CalibrationSet]:
    """The calibration tokens for this recipe; where its mixture's sources cannot be loaded (offline, the Hub
    unreachable, a dataset gone), those of its fallback mixtures, in order, each fallback logged and recorded."""
    *firsts, last = [spec, *spec.fallback]
    fell_back_from: dict[str, str] = {}
    for candidate, following in zip(firsts, [*firsts[1:], last]):
        try:
            tokens, calibration_set = _load_or_build(candidate, tokenizer, run_dir, tokenizer_id)
            return tokens, calibration_set.model_copy(update={"mixture": candidate.mixture,
                                                              "fell_back_from": fell_back_from})
        except CorpusError as err:
            name = candidate.mixture or "the recipe's sources"
            fell_back_from[name] = str(err)
            log.warning("calibration: mixture %s could not be loaded (%s); falling back to mixture %s", name, err,
                        following.mixture)
    tokens, calibration_set = _load_or_build(last, tokenizer, run_dir, tokenizer_id)
    return tokens, calibration_set.model_copy(update={"mixture": last.mixture, "fell_back_from": fell_back_from})


def _load_or_build(spec: CalibrationSpec, tokenizer, run_dir: Path, tokenizer_id: str) -> tuple[torch.Tensor, CalibrationSet]:
    """The calibration tokens of one mixture, from the run directory's cache when still valid."""
    key = hashlib.sha256(json.dumps([spec.model_dump(mode="json"), tokenizer_id], sort_keys=True).encode()).hexdigest()
    folder = run_dir / CACHE_DIR
    meta_path, tokens_path = folder / "meta.json", folder / "tokens.pt"
    if meta_path.is_file() and tokens_path.is_file():
        meta = json.loads(meta_path.read_text())
        if meta.get("key") == key:
            tokens = torch.load(tokens_path)
            return tokens, CalibrationSet(**meta["set"], cached=True)
    tokens, per_source = build(spec, tokenizer)
    calibration_set = CalibrationSet(sha256=hashlib.sha256(tokens.numpy().tobytes()).hexdigest(),
                                     samples=tokens.shape[0], seq_len=tokens.shape[1], per_source=per_source, cached=False)
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(tokens, tokens_path)
    meta_path.write_text(json.dumps({"key": key, "set": calibration_set.model_dump(exclude={"cached"})}, indent=1))
    return tokens, calibration_set
