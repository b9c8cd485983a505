"""The PLE row cache: a model whose `embed_tokens_per_layer` reads most rows from the checkpoint file computes
bit for bit what the model with its whole table computes, and the table's memory is given back."""

import json
import shutil
import subprocess
import sys

import pytest
import torch

from pipeline.generate.kv_cache import RotorQuantCache
from pipeline.generate.ple_cache import PLECache, PLECacheError, hot_ids_from
from pipeline.model import load_config, load_model, resolve
from pipeline.recipe import ModelSpec

HOT = 48  # of the tiny vocabulary's 1,024 rows: most lookups go to the file


def _source(variant: str):
    return resolve(ModelSpec(id=f"tiny:{variant}")).path


def _model(variant: str):
    source = resolve(ModelSpec(id=f"tiny:{variant}"))
    return load_model(source, load_config(source)).eval()


def _batch() -> dict:
    """Two prompts, the second left-padded (pad id 0), as `generate` batches them."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(20, 1000, (2, 24), generator=g)
    mask = torch.ones_like(ids)
    ids[1, :7], mask[1, :7] = 0, 0
    return {"input_ids": ids, "attention_mask": mask}


@pytest.fixture(scope="module", params=["e2b", "e4b"])
def reference(request):
    return request.param, _model(request.param)


@pytest.mark.parametrize("policy", ["static", "lru"])
def test_logits_and_greedy_generation_are_bit_identical_to_the_whole_table(reference, policy):
    variant, full = reference
    model = _model(variant)
    batch = _batch()
    hot = hot_ids_from(batch["input_ids"].tolist(), HOT // 2) if policy == "static" else None
    cache = PLECache.attach(model, _source(variant), hot_rows=HOT, policy=policy, hot_ids=hot)
    assert not any(n.endswith("embed_tokens_per_layer.weight") for n, _ in model.named_parameters())
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, full(**batch).logits)
    kwargs = dict(max_new_tokens=12, do_sample=False, output_logits=True, return_dict_in_generate=True)
    ours, theirs = model.generate(**batch, **kwargs), full.generate(**batch, **kwargs)
    assert torch.equal(ours.sequences, theirs.sequences)
    assert all(torch.equal(a, b) for a, b in zip(ours.logits, theirs.logits))
    stats = cache.stats()
    assert stats.lookups == 2 * 24 + 2 * 24 + 11 * 2  # the forward; generate: its prefill, then 11 one-token steps
    assert 0 < stats.hits < stats.lookups and stats.resident_bytes * 1024 == HOT * stats.table_bytes


def test_with_the_rotated_kv_cache_generation_is_unchanged(reference):
    variant, full = reference
    model = _model(variant)
    PLECache.attach(model, _source(variant), hot_rows=HOT, policy="lru")
    ids = _batch()["input_ids"][:1]
    kwargs = dict(max_new_tokens=10, do_sample=False)
    ours = model.generate(ids, past_key_values=RotorQuantCache(model, bits=4), **kwargs)
    theirs = full.generate(ids, past_key_values=RotorQuantCache(full, bits=4), **kwargs)
    assert torch.equal(ours, theirs)


def test_hits_follow_the_policy():
    model = _model("e2b")
    ids = torch.arange(100, 140).reshape(1, -1)
    static = PLECache.attach(model, _source("e2b"), hot_rows=40, hot_ids=range(100, 120))
    with torch.no_grad():
        model(input_ids=ids)
    assert (static.stats().hits, static.stats().lookups) == (20, 40)

    model = _model("e2b")
    lru = PLECache.attach(model, _source("e2b"), hot_rows=30, policy="lru")
    with torch.no_grad():
        model(input_ids=ids[:, :30])  # all cold, all admitted
        model(input_ids=ids[:, :30])  # all hot
        model(input_ids=ids[:, 30:])  # 10 cold: they evict the 10 least recently used
        model(input_ids=ids[:, :10])  # evicted: cold again
    assert lru.stats().hits == 30 and len(lru.recent) == 30


def test_ids_outside_the_vocabulary_are_refused_as_nn_embedding_refuses_them():
    model = _model("e2b")
    full = _model("e2b")
    PLECache.attach(model, _source("e2b"), hot_rows=HOT, policy="lru")
    for bad in (1024, -1):
        ids = torch.tensor([[5, bad]])
        with pytest.raises(IndexError, match="index out of range in self"):
            full.get_decoder().embed_tokens_per_layer(ids)
        with pytest.raises(IndexError, match="index out of range in self"):
            model.get_decoder().embed_tokens_per_layer(ids)


def test_a_truncated_or_missing_table_is_named(tmp_path):
    broken = shutil.copytree(_source("e2b"), tmp_path / "broken")
    [weights] = broken.glob("*.safetensors")
    with open(weights, "r+b") as f:
        f.truncate(weights.stat().st_size // 2)
    with pytest.raises(PLECacheError, match=r"cannot read model\.safetensors \(SafetensorError"):
        PLECache.attach(_model("e2b"), broken)
    with pytest.raises(PLECacheError, match=r"no embed_tokens_per_layer.weight"):
        PLECache.attach(_model("e2b"), _source("31b"))
    with pytest.raises(PLECacheError, match=r"has no embed_tokens_per_layer"):
        PLECache.attach(_model("31b"), _source("e2b"))
    with pytest.raises(PLECacheError, match="policy 'lfu'"):
        PLECache.attach(_model("e2b"), _source("e2b"), policy="lfu")


MEMORY_PROBE = """
import gc, json, sys, torch
from transformers import AutoModelForImageTextToText
from pipeline.generate.ple_cache import PLECache

def anon():
    return int(next(l for l in open("/proc/self/status") if l.startswith("RssAnon:")).split()[1]) * 1024

model = AutoModelForImageTextToText.from_pretrained(sys.argv[1], dtype=torch.float32).eval()
ids = torch.randint(3, 262000, (1, 256), generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    full = model(input_ids=ids).logits
gc.collect()
before = anon()
PLECache.attach(model, sys.argv[1], hot_rows=5000, policy="lru")
with torch.no_grad():
    cached = model(input_ids=ids).logits
equal = torch.equal(full, cached)
del cached
gc.collect()
print(json.dumps({"before": before, "after": anon(), "equal": equal}))
"""


LOAD_PROBE = """
import json, sys, threading, time, torch
from transformers import AutoModelForImageTextToText
from pipeline.generate.ple_cache import PLECache

def anon():
    return int(next(l for l in open("/proc/self/status") if l.startswith("RssAnon:")).split()[1]) * 1024

peak, done = [0], threading.Event()
def sample():  # the anonymous-memory high-water mark of the load, sampled
    while not done.is_set():
        peak[0] = max(peak[0], anon())
        time.sleep(0.001)
base = anon()
sampler = threading.Thread(target=sample)
sampler.start()
if sys.argv[2] == "cache":
    model, _ = PLECache.load(AutoModelForImageTextToText, sys.argv[1], hot_rows=5000, policy="lru", dtype=torch.float32)
else:
    model = AutoModelForImageTextToText.from_pretrained(sys.argv[1], dtype=torch.float32)
done.set()
sampler.join()
ids = torch.randint(3, 262000, (1, 256), generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    torch.save(model(input_ids=ids).logits, sys.argv[3])
print(json.dumps({"peak": peak[0] - base}))
"""


def test_the_table_s_memory_is_given_back_on_an_e2b_sized_vocabulary(tmp_path):
    """A width-cut E2B with the real 262,144-row vocabulary, loaded in float32 (transformers widens the table
    into the process's own memory: 640 MiB here): attaching the cache gives nearly all of it back, and the
    logits stay bit-identical (rows widened from BF16 as at load); `PLECache.load` never holds it at all."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    from pipeline.tiny import tiny_config

    cfg = tiny_config("e2b")
    text = cfg["text_config"]
    text.update(vocab_size=262_144, vocab_size_per_layer_input=262_144, hidden_size=64, intermediate_size=128)
    table_bytes = 262_144 * text["num_hidden_layers"] * text["hidden_size_per_layer_input"] * 4  # float32
    torch.manual_seed(0)
    AutoModelForImageTextToText.from_config(AutoConfig.for_model(**cfg), dtype=torch.bfloat16).save_pretrained(tmp_path)
    done = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(tmp_path)], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    probe = json.loads(done.stdout.strip().splitlines()[-1])
    assert probe["equal"]
    assert probe["before"] - probe["after"] > 0.9 * table_bytes, (probe, table_bytes)

    # PLECache.load never holds the table: the load's anonymous memory peaks below the float32 table's size,
    # where a plain float32 load holds all of it; the logits are the same
    peaks = {}
    for mode in ("plain", "cache"):
        done = subprocess.run([sys.executable, "-c", LOAD_PROBE, str(tmp_path), mode, str(tmp_path / f"{mode}.pt")],
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
        peaks[mode] = json.loads(done.stdout.strip().splitlines()[-1])["peak"]
    assert peaks["plain"] > table_bytes > peaks["cache"], (peaks, table_bytes)
    assert torch.equal(torch.load(tmp_path / "plain.pt"), torch.load(tmp_path / "cache.pt"))


@pytest.mark.parametrize("table", ["int4-g32", "int8"])
def test_a_packed_table_export_through_the_cache_equals_its_packed_reload(tmp_path, table):
    """An export with its PLE table packed (int4 / int8): the cache reads the packed rows and dequantizes only
    those, and the model computes what the export's own reload (the whole table decompressed) computes."""
    from transformers import AutoModelForImageTextToText

    from pipeline.formats import FORMATS, COMPRESSED_TENSORS
    from pipeline.reload import load_quantized
    from pipeline.run import quantize_run

    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: tiny:e2b\nscheme: W4A16\nembeddings: {{per_layer: {table}}}\n"
                      f"output_dir: {tmp_path / 'run'}\n")
    quantize_run(recipe, validate=False, card=False)
    export = tmp_path / "run" / "export"
    reload = lambda: load_quantized(AutoModelForImageTextToText, export, FORMATS[COMPRESSED_TENSORS])[0].eval()  # noqa: E731
    full = reload()
    model, cache = PLECache.load(AutoModelForImageTextToText, export, hot_rows=HOT, policy="lru")  # never whole
    batch = _batch()
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, full(**batch).logits)
    kwargs = dict(max_new_tokens=8, do_sample=False)
    assert torch.equal(model.generate(**batch, **kwargs), full.generate(**batch, **kwargs))
    bits = 4 if table.startswith("int4") else 8
    assert cache.stats().table_bytes < 1024 * 10 * 64 * bits / 8 * 1.2  # the packed bytes, not BF16's


def test_the_quantize_run_records_the_hot_set_and_the_card_s_lines_run_it(tmp_path):
    """An E-model build carries its calibration text's most frequent ids (`ple_hot_ids.json`); the card's PLE cache
    lines, run as written, attach a static cache with them, and the model computes what the whole table does."""
    import re

    from pipeline.generate.ple_cache import HOT_IDS_FILE, recorded_hot_ids
    from pipeline.run import quantize_run

    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: tiny:e2b\nscheme: W4A16\ncalibration: {{samples: 8, seq_len: 64}}\n"
                      f"output_dir: {tmp_path / 'run'}\n")
    quantize_run(recipe, validate=False)
    export = tmp_path / "run" / "export"
    recorded = json.loads((export / HOT_IDS_FILE).read_text())
    assert recorded["tokens"] == 8 * 64 and recorded["counts"] == sorted(recorded["counts"], reverse=True)
    assert recorded_hot_ids(export, 5) == recorded["ids"][:5]

    card = (export / "README.md").read_text()
    code = re.search(r"#### With the PLE row cache.*?```python\n(.*?)```", card, re.S).group(1)
    scope: dict = {}
    exec(code, scope)  # noqa: S102 - the card's own lines
    cache, model = scope["cache"], scope["model"]
    assert isinstance(cache, PLECache) and cache.policy == "static" and cache.hot_rows == 1024 // 16
    from transformers import AutoModelForImageTextToText

    batch = _batch()
    reloaded = AutoModelForImageTextToText.from_pretrained(export, dtype=torch.bfloat16).eval()  # the whole table
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, reloaded(**batch).logits)
    assert cache.stats().hits > 0
    with pytest.raises(PLECacheError, match="no recorded hot set"):
        recorded_hot_ids(_source("e2b"), 5)


def test_multimodal_placeholder_ids_read_the_pad_row_as_the_whole_table_does(reference):
    """The multimodal model looks placeholder ids (image, audio) up as the pad id: through the cache too."""
    from pipeline.tiny import SPECIAL_TOKENS

    variant, full = reference
    model = _model(variant)
    cache = PLECache.attach(model, _source(variant), hot_rows=HOT, policy="lru")
    batch = _batch()
    placeholders = [SPECIAL_TOKENS.index("<|image|>"), SPECIAL_TOKENS.index("<|audio|>")]
    batch["input_ids"][:, 10:14] = torch.tensor(placeholders * 2)
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, full(**batch).logits)
    assert cache.stats().lookups == 2 * 24


def test_the_readme_s_one_command_runs_the_tiny_e2b_with_the_cache_and_prints_memory_and_hit_rate():
    import re

    done = subprocess.run([sys.executable, "-m", "pipeline.generate.ple_cache", "--hot-rows", "64",
                           "--max-new-tokens", "4"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    out = done.stdout
    assert re.search(r"PLE table: [\d.]+ MiB in the file; hot rows: 64 \(0\.08 MiB, policy lru\)", out), out
    assert re.search(r"resident after loading, above the interpreter: anonymous [\d.,]+ MiB, file-backed", out), out
    lookups, hits = map(int, re.search(r"lookups: (\d+), hits: (\d+) \(hit rate", out).groups())
    assert 0 <= hits < lookups
