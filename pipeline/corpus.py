"""Text and conversations for calibration and evaluation, and the token windows cut from them.

Sources: the offline built-in corpus (the stdlib's `pydoc_data.topics`, split by a hash of each
topic's name so calibration and evaluation never share a document), local files
(.txt, .jsonl, .parquet), or a Hub dataset (`hf:<dataset id>`), which needs the network.
Conversations (`format: messages`) are rendered with the model's chat template.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from pathlib import Path
from typing import Literal

import torch

log = logging.getLogger(__name__)

BUILTIN = "builtin"
Split = Literal["calibration", "eval"]
Messages = list[dict]  # one conversation: chat turns, {"role": ..., "content": ...}


class CorpusError(ValueError):
    pass


def builtin_texts(split: Split) -> list[str]:
    """The stdlib's Python reference topics (PSF licensed, shipped with Python); one in four (by name hash) is
    held out for evaluation."""
    from pydoc_data.topics import topics

    def is_eval(name: str) -> bool:
        return hashlib.sha256(name.encode()).digest()[0] % 4 == 0

    return [topics[name] for name in sorted(topics) if is_eval(name) == (split == "eval")]


def builtin_conversations(split: Split) -> list[Messages]:
    """The same pages as conversations: a question naming each page's title (its first line, underlined with
    `*`), the rest of the page as the answer. Held out: only the pages no calibration page holds whole (the
    `compound` topic holds `for`, `class` and `function` entire, for one), so no answer was calibrated on."""
    pages = [(title, body.lstrip("*").strip()) for title, _, body in (page.partition("\n") for page in builtin_texts(split))]
    if split == "eval":
        calibration = "\n".join(builtin_texts("calibration"))
        pages = [(title, body) for title, body in pages if body not in calibration]
    return [[{"role": "user", "content": f"Explain this part of Python: {title}."},
             {"role": "assistant", "content": body}] for title, body in pages]


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


def load_conversations(source: str, split: Split, *, field: str = "messages", hub_config: str | None = None,
                       hub_split: str = "test") -> list[Messages]:
    """The conversations of a `format: messages` source: the built-in corpus' pages as questions and answers,
    or each row's `field` of a .jsonl/.parquet file or Hub dataset."""
    if source == BUILTIN:
        return builtin_conversations(split)
    rows = _records(source, hub_config, hub_split)
    if rows and field not in rows[0]:
        raise CorpusError(f"source {source!r} has no field {field!r}; fields: {', '.join(sorted(rows[0]))}")
    return [row[field] for row in rows if row.get(field)]


def _records(source: str, hub_config: str | None, hub_split: str) -> list[dict]:
    if source.startswith("hf:"):
        from datasets import load_dataset

        from pipeline.model import go_offline_if_unreachable

        if went_offline := go_offline_if_unreachable(source[3:], repo_type="dataset", filename="README.md"):
            log.warning(went_offline)
        try:
            return list(load_dataset(source[3:], hub_config, split=hub_split))
        except Exception as err:
            raise CorpusError(f"Hub dataset {source[3:]!r} could not be loaded: {err.__class__.__name__}: "
                              f"{err}. Offline? Use a local file or 'builtin'.") from None
    path = Path(source).expanduser()
    if path.suffix == ".jsonl" and path.is_file():
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if path.suffix == ".parquet" and path.is_file():
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    raise CorpusError(f"source {source!r}: format: messages needs a .jsonl or .parquet file, hf:<dataset id> "
                      "or 'builtin'")


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


def require_chat_template(tokenizer, source: str) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise CorpusError(f"source {source!r} has format: messages, but the model's tokenizer has no chat template")


# transformers' marker of the assistant's text in a chat template, which its assistant-token mask reads
_GENERATION = re.compile(r"\{%-?\s*generation\s*-?%\}")


def assistant_tokens(tokenizer, messages: Messages) -> tuple[list[int], list[bool]]:
    """A conversation's tokens in the model's chat template, and which of them are the assistant's: transformers'
    assistant-token mask where the template marks the assistant's text with `{% generation %}`; Gemma's templates
    do not, so otherwise each assistant turn is found by rendering the conversation up to it (_assistant_span)."""
    if _GENERATION.search(tokenizer.chat_template):
        encoded = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                                return_assistant_tokens_mask=True)
        return list(encoded["input_ids"]), [bool(m) for m in encoded["assistant_masks"]]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = [_assistant_span(tokenizer, messages, i, text) for i, m in enumerate(messages) if m["role"] == "assistant"]
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return encoded["input_ids"], [any(a <= start < b for a, b in spans) for start, _ in encoded["offset_mapping"]]


def _assistant_span(tokenizer, messages: Messages, i: int, text: str) -> tuple[int, int]:
    """Where the assistant's message `i` is in the rendered conversation `text` (characters): from where the
    conversation rendered through it departs from the conversation before it rendered for generation, to its end.
    Where they part, not where the generation prompt ends: Gemma 4's templates add an empty thought channel
    (`<|channel>thought\\n<channel|>`) to the generation prompt, which a finished model turn does not carry."""
    prompt = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
    through = tokenizer.apply_chat_template(messages[:i + 1], tokenize=False)
    if not text.startswith(through):
        raise CorpusError("the chat template renders a conversation's earlier turns differently once later ones "
                          "follow, so its assistant turns cannot be found by rendering it up to each")
    return len(os.path.commonprefix([prompt, through])), len(through)


def conversation_windows(tokenizer, conversations: list[Messages], samples: int,
                         seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`samples` windows of one conversation each, in the model's chat template, cut at `seq_len` tokens and padded
    after its end (causal attention: padding after a token changes nothing before it); and the positions scored
    on them, each one whose next token is the assistant's (never padding)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    windows, scored = [], []
    for messages in conversations:
        ids, assistant = (part[:seq_len] for part in assistant_tokens(tokenizer, messages))
        if not any(assistant[1:]):  # no answer within the window: nothing to score
            continue
        padding = seq_len - len(ids)
        windows.append(ids + [pad] * padding)
        scored.append(assistant[1:] + [False] * (padding + 1))
        if len(windows) == samples:
            return torch.tensor(windows), torch.tensor(scored)
    raise CorpusError(f"{len(windows)} conversations have an assistant turn within {seq_len} tokens, fewer than "
                      f"samples = {samples}; lower samples or add conversations")
