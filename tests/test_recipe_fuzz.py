"""Malformed recipes, generated: every one ends `gemma-quant plan` with exit 2 and one bounded message
that names the file and the key, never a traceback, a hang or a run."""

import io
import re
import string
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rich.console import Console

import pipeline.cli as cli
from pipeline.recipe import GROUP_SIZES, Recipe

EXAMPLES = 240
SECTIONS = ("", "calibration", "eval", "gates", "autoround", "gptq", "hub", "memory")
INF, NAN = float("inf"), float("nan")


def _fields(section: str) -> set[str]:
    model = Recipe if not section else Recipe.model_fields[section].annotation
    return set(model.model_fields)


words = st.text(alphabet=string.ascii_lowercase + "_", min_size=1, max_size=12)
junk = st.text(alphabet=string.ascii_letters + string.digits + "[]/.:-_ ", min_size=1, max_size=20)


@st.composite
def unknown_key(draw):
    section = draw(st.sampled_from(sorted(SECTIONS)))
    name = draw(words.filter(lambda w: w not in _fields(section) and w != "name"))
    return {section: {name: draw(st.integers())}} if section else {name: 1}, [f"{section}.{name}".strip(".")]


@st.composite
def bad_literal(draw):
    key = draw(st.sampled_from(["scheme", "algorithm", "export", "modalities", "kv_cache", "library"]))
    return {key: draw(junk.filter(lambda v: v.strip() not in ("fp8", "rtn", "gptq")))}, [key]


BAD_NUMBERS = {
    "group_size": st.integers().filter(lambda v: v not in GROUP_SIZES),
    "calibration.samples": st.integers(max_value=0),
    "calibration.seq_len": st.integers(max_value=7),
    "eval.samples": st.integers(max_value=0),
    "eval.max_new_tokens": st.integers(max_value=0),
    "autoround.iters": st.integers(max_value=0),
    "autoround.lr": st.sampled_from([INF, -INF, NAN, 0.0, -1.0]),
    "gptq.dampening": st.sampled_from([INF, NAN, 0.0, -0.5]),
    "gates.top1_min": st.sampled_from([INF, NAN, 1.5, -0.1]),
    "gates.kl_mean_max": st.sampled_from([INF, NAN, 0.0, -2.0]),
    "gates.ppl_ratio_max": st.sampled_from([INF, NAN, 0.5]),
    "memory.max_cpu_memory": st.sampled_from(["-1GiB", "0", "lots", "20 parsecs", [1, 2]]),
}


def _nested(dotted: str, value) -> dict:
    for part in reversed(dotted.split(".")):
        value = {part: value}
    return value


@st.composite
def bad_number(draw):
    key = draw(st.sampled_from(sorted(BAD_NUMBERS)))
    return _nested(key, draw(BAD_NUMBERS[key])), [key]


@st.composite
def calibration_weight(draw):
    weight = draw(st.sampled_from([INF, NAN, 0.0, -1.0]))
    return {"calibration": {"sources": [{"source": "builtin", "weight": weight}]}}, ["calibration.sources.0.weight"]


@st.composite
def wrong_type(draw):
    key = draw(st.sampled_from(["description", "name", "symmetric", "reload_check", "quantize_experts", "skip",
                                "overrides", "eval.prompts", "hub.private"]))
    value = draw(st.sampled_from([{"a": 1}, [{"b": [1]}]]) if key not in ("skip", "overrides", "eval.prompts")
                 else st.integers())
    return _nested(key, value), [key]


bad_hub_ids = st.one_of(
    st.builds(lambda a: f"../{a}", words), st.builds(lambda a: f"{a}/..", words),
    st.builds(lambda a, b: f"{a}--{b}/x", words, words), st.builds(lambda a: f".{a}/x", words),
    st.builds(lambda a: f"{a}/x.", words), st.builds(lambda a, b: f"{a}/{b}/c", words, words),
    st.builds(lambda a: f"{a} x/y", words))


@st.composite
def bad_hub_id(draw):
    key = draw(st.sampled_from(["hub.repo_id", "hub.base_model"]))
    return _nested(key, draw(bad_hub_ids)), [key]


@st.composite
def bad_model(draw):
    name = draw(words)
    model = draw(st.sampled_from([f"tiny:{name}x", f"gguf:{name}", f"./no-such-{name}", f"~/no-such-{name}",
                                  f"/no/such/{name}", f"{name}--x/y", f"-{name}/y", f"{name}/y."]))
    return {"model": model}, ["model.id"]


@st.composite
def bad_output_dir(draw):
    return {"output_dir": "../" * draw(st.integers(1, 6)) + draw(words)}, ["output_dir"]


@st.composite
def bad_override(draw):
    selector = draw(st.sampled_from(["layer_type", "submodule", "layers", "regex"]))
    kind = draw(st.sampled_from(["null", "none", "skip-and-set", "null-bits"]))
    if kind == "null":
        return {"overrides": [{selector: None, "bits": 8}]}, [f"overrides.0.{selector}"]
    if kind == "null-bits":
        return {"overrides": [{"layers": "0-1", "bits": None}]}, ["overrides.0.bits"]
    if kind == "none":
        return {"overrides": [{"bits": 8}]}, ["overrides.0"]
    return {"overrides": [{"layers": "0-1", "skip": True, "bits": 8}]}, ["overrides.0.bits"]


@st.composite
def missing_file(draw, tmp: Path):
    name = draw(words) + draw(st.sampled_from([".txt", ".jsonl", ".parquet"]))
    where = draw(st.sampled_from(["calibration", "eval"]))
    if where == "eval":
        return {"eval": {"source": str(tmp / "absent" / name)}}, ["eval.source"]
    return {"calibration": {"sources": [{"source": str(tmp / "absent" / name)}]}}, ["calibration.sources.0.source"]


@st.composite
def two_problems(draw):
    first = draw(st.one_of(bad_literal(), bad_number(), bad_hub_id()))
    second = draw(unknown_key().filter(lambda s: not set(s[0]) & set(first[0])))
    return {**first[0], **second[0]}, first[1] + second[1]


def _text(fields: dict, tmp: Path) -> str:
    recipe = {"model": "tiny:e2b", "scheme": "W4A16", "output_dir": str(tmp / "runs" / "fuzz")}
    for key, value in fields.items():  # one level of merging: sections given twice keep both halves
        recipe[key] = {**recipe[key], **value} if isinstance(value, dict) and isinstance(recipe.get(key), dict) else value
    return yaml.safe_dump(recipe, sort_keys=False)


BASE = "model: tiny:e2b\nscheme: W4A16\n"


@st.composite
def text_problem(draw):
    """Problems below the schema: the bytes, the YAML."""
    kind = draw(st.sampled_from(["duplicate", "latin-1", "utf-16", "deep", "alias-bomb", "binary"]))
    key = draw(st.sampled_from(["description", "calibration", "skip", "eval"]))
    if kind == "duplicate":
        dup = draw(st.sampled_from(["scheme: W8A16", "model: tiny:e4b", "gates:\n  top1_min: 0.5\n  top1_min: 0.9"]))
        return (BASE + dup + "\n").encode(), ["gates.top1_min" if "gates" in dup else dup.split(":")[0]]
    if kind == "latin-1":
        byte = bytes([draw(st.integers(0x80, 0xFF))])
        return BASE.encode() + b"description: caf" + byte + b"s\n", ["description"]
    if kind == "utf-16":
        return (BASE + f"description: {draw(junk)!r}\n").encode(draw(st.sampled_from(["utf-16", "utf-16-be"]))), \
            [("recipe", "yaml")]
    if kind == "deep":
        depth = draw(st.integers(33, 5000))
        return (BASE + f"{key}: " + "[" * depth + "]" * depth + "\n").encode(), [key]
    if kind == "alias-bomb":
        levels = draw(st.integers(5, 9))
        rows = [f"  - &a0 [{', '.join(['x'] * 9)}]"]
        rows += [f"  - &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, levels)]
        return (BASE + f"{key}:\n" + "\n".join(rows) + "\n").encode(), [key]
    return b"\x00" + draw(st.binary(min_size=1, max_size=64)), []  # random bytes: no key to expect, the file


@contextmanager
def _captured():
    out = io.StringIO()
    console, cli.console = cli.console, Console(file=out, width=100_000, color_system=None)
    try:
        with redirect_stdout(out), redirect_stderr(out):
            yield out
    finally:
        cli.console = console


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


def _plan_fails_clearly(path: Path, keys: list) -> None:
    """Exit 2, no traceback, a bounded message naming the file and each expected key (a str, or a tuple
    of keys any one of which will do)."""
    with _captured() as out:
        code = cli.main(["plan", str(path)])
    text = out.getvalue()
    assert code == 2, text
    assert "Traceback" not in text and len(text) < 20_000, text[:2000]
    assert f"recipe error {path}: " in text, text
    for key in keys:
        assert any(re.search(re.escape(f"{path}: {k}") + "[.:]", text) for k in ([key] if isinstance(key, str) else key)), \
            (key, text)


@pytest.mark.timeout(300)
@settings(max_examples=EXAMPLES, derandomize=True, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_malformed_recipes_fail_with_file_and_key(fuzz_dir, data):
    schema = st.one_of(unknown_key(), bad_literal(), bad_number(), calibration_weight(), wrong_type(), bad_hub_id(),
                       bad_model(), bad_output_dir(), bad_override(), missing_file(fuzz_dir), two_problems())
    kind = data.draw(st.sampled_from(["schema", "schema", "schema", "text"]))
    path = fuzz_dir / "recipe.yaml"
    if kind == "schema":
        fields, keys = data.draw(schema)
        path.write_text(_text(fields, fuzz_dir))
    else:
        raw, keys = data.draw(text_problem())
        path.write_bytes(raw)
    _plan_fails_clearly(path, keys)
