"""Quantized token tables (recipe `embeddings:`): planned sizes, packed exports in vLLM's layout, the
untied head, the guarded transformers load, and the structural check that catches a wrong table."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig

from pipeline.export import tensor_digest
from pipeline.model import build_meta_model, load_config, load_model, model_class, resolve
from pipeline.plan import Plan, build_plan, quantized_bytes
from pipeline.recipe import ModelSpec, RecipeError, load_recipe, parse_recipe
from pipeline.run import quantize_run
from pipeline.tables import loading_packed_tables, pack_tables, packed_layout, quantize_tables, table_problems
from pipeline.tensors import StoredTensors
from pipeline.tiny import full_config, tiny_config

from conftest import vllm_load

PLE = "model.language_model.embed_tokens_per_layer"
TOKENS = "model.language_model.embed_tokens"


def _plan(variant: str, **embeddings) -> Plan:
    config = AutoConfig.for_model(**tiny_config(variant))
    recipe = parse_recipe({"name": "t", "model": f"tiny:{variant}", "scheme": "W4A16", "embeddings": embeddings})
    return build_plan(build_meta_model(config), config, recipe)


def test_recipe_refuses_tables_outside_compressed_tensors_and_unknown_schemes(write_recipe):
    with pytest.raises(RecipeError) as err:
        load_recipe(write_recipe(model="tiny:e2b", scheme="W4A16", export="gptq", embeddings={"tokens": "int8"}))
    assert err.value.key == "embeddings" and "export: compressed-tensors" in str(err.value)
    with pytest.raises(RecipeError) as err:
        load_recipe(write_recipe(model="tiny:e2b", scheme="W4A16", embeddings={"per_layer": "int4"}))
    assert err.value.key == "embeddings.per_layer" and "int4-g32" in str(err.value)


def test_plan_refuses_a_table_the_model_lacks_or_a_group_that_does_not_divide_it():
    with pytest.raises(RecipeError, match=r"embeddings\.per_layer: tiny:31b has no embed_tokens_per_layer table"):
        _plan("31b", per_layer="int4-g32")
    config = tiny_config("e2b")
    config["text_config"]["hidden_size_per_layer_input"] = 48  # 10 layers x 48 = 480 per row: g32 only
    recipe = parse_recipe({"name": "t", "model": "tiny:e2b", "scheme": "W4A16",
                           "embeddings": {"per_layer": "int4-g64"}})
    hf_config = AutoConfig.for_model(**config)
    with pytest.raises(RecipeError, match=r"group 64 does not divide .*480; allowed: bf16, int8, int4-g32$"):
        build_plan(build_meta_model(hf_config), hf_config, recipe)


def test_plan_sizes_each_table_and_the_untied_head():
    tied = _plan("e2b")
    plan = _plan("e2b", per_layer="int4-g32", tokens="int8")
    fates = {m.name: m for m in plan.modules}
    ple, tokens, head = fates[PLE], fates[TOKENS], fates["lm_head"]
    assert (ple.bits, ple.group_size, tokens.bits, tokens.group_size) == (4, 32, 8, None)
    assert ple.export_bytes == quantized_bytes(*ple.shape, 4, 32, True) == ple.shape[0] * ple.shape[1] // 2 \
        + ple.shape[0] * ple.shape[1] // 32 * 2 + 16
    assert tokens.export_bytes == tokens.shape[0] * tokens.shape[1] + tokens.shape[0] * 2 + 16
    # Quantizing the input table unties the head: the export stores it in full (the source stores it once).
    assert plan.untied and not head.quantize and head.export_bytes == 2 * head.params and head.bf16_bytes == 0
    assert plan.export_bytes - tied.export_bytes == (ple.export_bytes - ple.bf16_bytes) \
        + (tokens.export_bytes - tokens.bf16_bytes) + head.export_bytes
    # The pass never sees the tables; the quantized head is skipped by it and kept out of the export's ignore.
    assert {m.name for m in plan.tables} == {PLE, TOKENS} and not {PLE, TOKENS} & {m.name for m in plan.quantized}
    quantized_head = _plan("e2b", lm_head="int4-g64")
    assert "lm_head" in quantized_head.pass_ignore and "lm_head" not in quantized_head.ignore
    assert not _plan("e2b", per_layer="int4-g32").untied


def test_full_size_e2b_with_every_table_at_4_bits_plans_under_3_5_gib():
    recipe = load_recipe("e2b-w4a16-emb4")
    config = AutoConfig.for_model(**full_config("e2b"))
    plan = build_plan(build_meta_model(config), config, recipe)
    assert {m.name for m in plan.tables} == {PLE, TOKENS, "lm_head"}
    assert plan.export_bytes <= 3.5 * 2**30 < _bf16_tables_plan(config, recipe).export_bytes


def _bf16_tables_plan(config, recipe) -> Plan:
    return build_plan(build_meta_model(config), config, recipe.model_copy(update={"embeddings": type(recipe.embeddings)()}))


def _run(tmp_path, embeddings: dict, validate: bool):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"model: tiny:e2b\nscheme: W4A16\noutput_dir: {tmp_path / 'run'}\n"
                      f"embeddings: {json.dumps(embeddings)}\neval: {{samples: 2, seq_len: 64, max_new_tokens: 4}}\n")
    manifest = quantize_run(recipe, validate=validate, card=validate)
    return manifest, Plan.load(tmp_path / "run" / "plan.json"), tmp_path / "run" / "export"


def test_every_table_at_4_bits_exports_packed_untied_and_validates(tmp_path):
    manifest, plan, folder = _run(tmp_path, {"per_layer": "int4-g32", "tokens": "int4-g32", "lm_head": "int4-g64"}, True)
    headers = StoredTensors(folder).headers
    for fate in plan.tables:  # vLLM's CompressedTensorsEmbeddingWNA16Int names, dtypes and shapes
        assert f"{fate.name}.weight" not in headers
        for leaf, layout in packed_layout(fate).items():
            assert headers[f"{fate.name}.{leaf}"] == layout
    config = json.loads((folder / "config.json").read_text())
    assert config["tie_word_embeddings"] is False and config["text_config"]["tie_word_embeddings"] is False
    groups = config["quantization_config"]["config_groups"].values()
    head_group = next(g for g in groups if g["targets"] == ["lm_head"])
    assert head_group["format"] == "pack-quantized" and head_group["weights"]["group_size"] == 64
    # Sizes on disk are the plan's; the validation's structural checks cover the tables.
    assert abs(StoredTensors(folder).data_bytes() / plan.export_bytes - 1) < 1e-3
    assert manifest.status == "validated" and manifest.reload.vs_in_memory.kl_mean < 1e-3
    report = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert report["structure"]["problems"] == [] and report["structure"]["quantized_stored"] == len(plan.quantized) + 3
    assert report["serving"]["status"] == "not_run" and "Triton kernel in vLLM" in report["serving"]["reason"]
    card = (folder / "README.md").read_text()  # no SGLang snippet (it serves such tables wrong), and why not
    assert f"Not checked in vLLM: {report['serving']['reason']}." in card and "### SGLang" not in card
    assert "SGLang is not shown: it serves compressed-tensors-quantized embeddings silently wrong" in card

    # Plain from_pretrained fails on transformers 5.17 (its _init_weights draws into the packed table's
    # missing weight); the guarded load gives the tables' integers x scales.
    cls = model_class(AutoConfig.from_pretrained(folder))
    with pytest.raises(AttributeError, match="has no attribute 'weight'"):
        cls.from_pretrained(folder, dtype=torch.bfloat16)
    with loading_packed_tables():
        model = cls.from_pretrained(folder, dtype=torch.bfloat16)
    model(input_ids=torch.tensor([[2, 5, 9]]))  # compressed-tensors decompresses on the first forward
    stored = StoredTensors(folder)
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    ints = unpack_from_int32(stored.get(f"{PLE}.weight_packed"), 4, torch.Size(stored.get(f"{PLE}.weight_shape").tolist()))
    scale = stored.get(f"{PLE}.weight_scale").float()
    expected = (ints.float().reshape(ints.shape[0], -1, 32) * scale.unsqueeze(-1)).reshape(ints.shape)
    assert torch.equal(model.get_submodule(PLE).weight.float(), expected.to(torch.bfloat16).float())


def test_tables_packed_block_by_block_equal_compressed_tensors_packing_them_whole(monkeypatch):
    import copy

    from compressed_tensors.compressors import compress_module

    source = resolve(ModelSpec(id="tiny:e2b"))
    model = load_model(source, load_config(source))
    plan = _plan("e2b", per_layer="int4-g32", tokens="int8")
    quantize_tables(model, plan)
    whole = copy.deepcopy(model)
    monkeypatch.setattr("pipeline.tables.ROWS_PER_BLOCK", 300)  # 1024 rows: four blocks, the last one short
    pack_tables(model, plan)
    for fate in plan.tables:
        compress_module(whole.get_submodule(fate.name))
        ours, theirs = (dict(m.get_submodule(fate.name).named_parameters(recurse=False)) for m in (model, whole))
        assert ours.keys() == theirs.keys() == {"weight_packed", "weight_scale", "weight_shape"}
        assert all(torch.equal(ours[k], theirs[k]) for k in ours), fate.name


def test_structure_check_catches_a_misnamed_or_wrong_table(tmp_path):
    _, plan, folder = _run(tmp_path, {"per_layer": "int4-g32"}, False)
    source = _tiny_source_tensors()
    assert table_problems(StoredTensors(folder), source, plan) == []
    [weights] = folder.glob("*.safetensors")
    tensors = load_file(weights)
    broken = tmp_path / "broken"

    def problems_with(changed: dict) -> list[str]:
        shutil.rmtree(broken, ignore_errors=True)
        shutil.copytree(folder, broken)
        save_file(changed, broken / weights.name, metadata={"format": "pt"})
        return table_problems(StoredTensors(broken), source, plan)

    renamed = {(k.replace("embed_tokens_per_layer.weight_scale", "embed_tokens_per_layer.scales")): v
               for k, v in tensors.items()}
    assert problems_with(renamed) == [f"{PLE}: {PLE}.weight_scale is missing from the export"]
    doubled = dict(tensors, **{f"{PLE}.weight_scale": tensors[f"{PLE}.weight_scale"] * 2})
    assert "further than 0.58 steps" in problems_with(doubled)[0]
    flat = dict(tensors, **{f"{PLE}.weight_scale": tensors[f"{PLE}.weight_scale"].reshape(-1, 1)[: plan_rows(plan)]})
    wanted = packed_layout(_ple(plan))["weight_scale"]
    assert problems_with(flat) == [f"{PLE}: weight_scale is BF16 [{plan_rows(plan)}, 1], vLLM reads BF16 {wanted[1]}"]


def _ple(plan: Plan):
    return next(m for m in plan.tables if m.name == PLE)


def plan_rows(plan: Plan) -> int:
    return _ple(plan).shape[0]


def _tiny_source_tensors() -> StoredTensors:
    return StoredTensors(resolve(ModelSpec(id="tiny:e2b")).path)


def test_per_layer_table_alone_keeps_the_head_tied_and_stored_once(tmp_path):
    manifest, plan, folder = _run(tmp_path, {"per_layer": "int4-g64"}, False)
    headers = StoredTensors(folder).headers
    assert not [k for k in headers if k.startswith("lm_head.")] and headers[f"{TOKENS}.weight"][0] == "BF16"
    assert f"{PLE}.weight_packed" in headers
    config = AutoConfig.from_pretrained(folder)
    assert config.get_text_config().tie_word_embeddings
    assert manifest.reload.vs_in_memory.kl_mean < 1e-3


def test_int8_tokens_write_the_source_table_as_the_bf16_head(tmp_path):
    _, plan, folder = _run(tmp_path, {"tokens": "int8"}, False)
    source = _tiny_source_tensors()
    stored = StoredTensors(folder)
    assert torch.equal(stored.get("lm_head.weight"), source.get(f"{TOKENS}.weight"))
    assert stored.headers[f"{TOKENS}.weight_packed"] == ("I32", [1024, 64])
    assert table_problems(stored, source, plan) == []


@pytest.mark.slow
def test_vllm_loads_every_table_with_its_names_dtypes_and_shapes_and_refuses_a_misnamed_one(tmp_path):
    """vLLM's own model construction and weight loader (its CPU build, no forward: the packed-table
    kernel is Triton, GPU only) take the export's tables as CompressedTensorsEmbeddingWNA16Int with
    exactly the stored names, dtypes, shapes and bytes; a renamed scale fails with vLLM's error."""
    run = tmp_path / "run"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"model: tiny:e2b\nscheme: W4A16\nmodalities: text\noutput_dir: {run}\n"
                      "embeddings: {per_layer: int4-g32, tokens: int8, lm_head: int4-g64}\n")  # CPU: no int8 Linear kernel
    quantize_run(recipe, validate=False, card=False)
    folder = run / "export"
    done = vllm_load(folder)
    assert done.returncode == 0, done.stderr[-3000:]
    loaded = json.loads(done.stdout.strip().splitlines()[-1].removeprefix("RESULT "))
    loaded = {name: v for name, v in loaded.items() if name.rpartition(".")[0] in
              ("model.embed_tokens", "model.embed_tokens_per_layer", "lm_head")}
    stored = StoredTensors(folder)
    dtypes = {"I32": "int32", "BF16": "bfloat16", "I64": "int64"}
    expected = {k: v for k, v in stored.headers.items() if k.rpartition(".")[0] in
                ("model.embed_tokens", "model.embed_tokens_per_layer", "lm_head")}
    assert set(loaded) == set(expected) and len(expected) == 9
    for key, (dtype, shape) in expected.items():
        assert (loaded[key]["dtype"], loaded[key]["shape"]) == (dtypes[dtype], shape), key
        assert loaded[key]["sha256"] == tensor_digest(stored.get(key)), key
        assert loaded[key]["method"] == ("CompressedTensorsLinearMethod" if key.startswith("lm_head")
                                         else "CompressedTensorsEmbeddingWNA16Int"), key

    broken = tmp_path / "misnamed"
    shutil.copytree(folder, broken)
    [weights] = broken.glob("*.safetensors")
    tensors = {k.replace("embed_tokens_per_layer.weight_scale", "embed_tokens_per_layer.scales"): v
               for k, v in load_file(weights).items()}
    save_file(tensors, weights, metadata={"format": "pt"})
    done = vllm_load(broken)
    assert done.returncode != 0 and "There is no module or parameter named 'embed_tokens_per_layer.scales'" in done.stderr
