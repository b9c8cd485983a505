"""One name matcher, with the semantics of the loaders that read our exports.

compressed-tensors (`compressed_tensors.utils.match.match_name`) and vLLM read an `ignore` or
`targets` entry as the exact module name, or, prefixed `re:`, as a regex matched with `re.match`:
anchored at the start of the name, not at its end. vLLM reads GPTQ `dynamic` keys (`-:` / `+:` and a
regex) the same way, the first matching key winning. The plan, the export checks and the recipe's
`skip:` entries all match through here, so what we check is what the loaders will do.
(Written here rather than imported so that recipes and plans match names without importing
compressed-tensors; tests/test_names.py holds it to compressed-tensors' own matcher.)
"""

from __future__ import annotations

import re
from collections.abc import Iterable

REGEX = "re:"


def matches(name: str, entry: str) -> bool:
    if entry.startswith(REGEX):
        return re.match(entry[len(REGEX):], name) is not None
    return entry == name


def first_match(name: str, entries: Iterable[str]) -> str | None:
    return next((entry for entry in entries if matches(name, entry)), None)


def first_dynamic_rule(name: str, dynamic: Iterable[str]) -> str | None:
    """The GPTQ `dynamic` key vLLM applies to `name`: `-:<regex>` (not quantized) or `+:<regex>`."""
    return next((key for key in dynamic if matches(name, REGEX + key[2:])), None)
