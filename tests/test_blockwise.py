"""Calibrated passes (AutoRound, GPTQ) through the Gemma 4-aware block driver.

The first test is the one that would have caught the libraries' silent miscalibration: every
block must be calibrated on exactly what it receives in a plain forward of the full model
(with the already-quantized blocks before it): its own PLE slice, its own layer type's rotary
embedding, and, for KV-shared layers, the K/V that the same batch wrote.
"""

import json

import pytest
import torch
from transformers import AutoTokenizer

from pipeline import calibration
from pipeline.compute import computing_in
from pipeline.model import build_meta_model, load_config, load_model, resolve
from pipeline.plan import build_plan
from pipeline.quantize import blockwise
from pipeline.recipe import parse_recipe
from pipeline.run import quantize_run


def _setup(variant: str, algorithm: str, **options):
    recipe = parse_recipe({"name": "t", "model": f"tiny:{variant}", "scheme": "W4A16", "algorithm": algorithm,
                           "calibration": {"samples": 3, "seq_len": 48}} | options)
    source = resolve(recipe.model)
    config = load_config(source)
    plan = build_plan(build_meta_model(config), config, recipe)
    tokens, _ = calibration.build(recipe.calibration, AutoTokenizer.from_pretrained(source.path))
    return recipe, plan, load_model(source, config), tokens


def _snapshot(store) -> dict:
    return {k: tuple(t.clone() for t in v) for k, v in store.items()}


@pytest.mark.parametrize("variant, compute, chain_batch", [("e2b", None, 1), ("e4b", None, 1),
                                                           ("e2b", torch.float32, 1), ("e2b", None, 2)],
                         ids=["e2b", "e4b", "e2b-float32-chains", "e2b-chain-batches-of-2"])
def test_each_block_is_calibrated_on_what_it_sees_in_the_full_model(variant, compute, chain_batch, tmp_path,
                                                                    monkeypatch):
    """With float32 chains (a CPU that emulates bf16), what a block sees is the full model's float32 forward;
    with chain batches, each sample's row of its batch is what that sample's own forward gives the block."""
    recipe, plan, model, tokens = _setup(variant, "autoround", autoround={"iters": 2, "batch_size": 2})
    fed = {}
    original_advance = blockwise.advance

    def recording_advance(layer, index, cal, chain):
        if chain == "q":  # what the block is given, through the already-quantized blocks
            for s in range(cal.samples):
                hidden, recorded, store = (cal.picked(values, [s]) for values in (cal.q_hidden, cal.inputs[index],
                                                                                  cal.q_kv))
                fed[index, s] = (hidden.clone(), recorded.args[0], recorded.kwargs["position_embeddings"],
                                 _snapshot(store))
        original_advance(layer, index, cal, chain)

    monkeypatch.setattr(blockwise, "advance", recording_advance)
    blockwise.quantize_blockwise(model, plan, recipe, tokens, tmp_path, "sha", compute=compute,
                                 chain_batch=chain_batch)

    # A plain forward of the finished model, one batch at a time, recording each layer's inputs.
    _, layers = blockwise.decoder_layers(model)
    seen, batch_index = {}, [0]

    def hook(index):
        def record(module, args, kwargs):
            seen[index, batch_index[0]] = (args[0].clone(), args[1], kwargs["position_embeddings"],
                                           _snapshot(kwargs["shared_kv_states"]))
        return record

    handles = [layer.register_forward_pre_hook(hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    with torch.no_grad(), computing_in(model, compute or torch.bfloat16):
        for b, batch in enumerate(tokens.split(1)):
            batch_index[0] = b
            model(input_ids=batch, use_cache=False)
    for handle in handles:
        handle.remove()
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}

    text = model.config.text_config
    first_shared = text.num_hidden_layers - text.num_kv_shared_layers
    assert set(fed) == set(seen) and len(fed) == len(layers) * len(tokens)
    for (index, b), (hidden, per_layer, rope, kv) in fed.items():
        p_hidden, p_per_layer, p_rope, p_kv = seen[index, b]
        assert torch.equal(per_layer, p_per_layer), f"layer {index} batch {b}: PLE slice"
        assert all(torch.equal(x, y) for x, y in zip(rope, p_rope)), f"layer {index} batch {b}: rotary embedding"
        assert torch.allclose(hidden, p_hidden, atol=1e-2, rtol=1e-2), f"layer {index} batch {b}: hidden states"
        if index >= first_shared:  # KV-shared: the K/V of its own type, written by the same batch
            layer_type = text.layer_types[index]
            assert all(torch.allclose(x, y, atol=1e-2, rtol=1e-2) for x, y in zip(kv[layer_type], p_kv[layer_type]))
    # The inputs really differ where the libraries' replay made them equal.
    assert not torch.equal(fed[0, 0][1], fed[1, 0][1])  # PLE slice per layer
    assert not torch.equal(fed[0, 0][1], fed[0, 1][1])  # ... and per batch
    sliding, full = text.layer_types.index("sliding_attention"), text.layer_types.index("full_attention")
    assert fed[sliding, 0][2][0].shape != fed[full, 0][2][0].shape or not torch.equal(fed[sliding, 0][2][0], fed[full, 0][2][0])
    shared = first_shared + text.layer_types[first_shared:].index("full_attention")
    assert not torch.equal(fed[shared, 0][3]["full_attention"][0], fed[shared, 1][3]["full_attention"][0])


@pytest.mark.parametrize("algorithm, options", [("autoround", {"autoround": {"iters": 16, "batch_size": 3}}),
                                                ("gptq", {}), ("gptq", {"gptq": {"grid": "imatrix"}}),
                                                ("opt-rtn", {})])
def test_calibrated_blocks_beat_rtn(algorithm, options, tmp_path):
    recipe, plan, model, tokens = _setup("31b", algorithm, **options)
    result = blockwise.quantize_blockwise(model, plan, recipe, tokens, tmp_path, "sha")
    errors = result.block_errors
    assert len(errors) == 6 and all(e.mse is not None for e in errors)
    assert sum(e.mse for e in errors) < sum(e.rtn_mse for e in errors)
    assert all(e.mse <= e.rtn_mse * 1.05 for e in errors), errors


@pytest.mark.parametrize("algorithm, measured_on", [("gptq", blockwise.BLOCK_ERROR_SAMPLES), ("autoround", 6)])
def test_the_block_error_record_is_the_unquantized_chain_s_on_the_batches_it_runs(algorithm, measured_on, tmp_path,
                                                                                   monkeypatch):
    """GPTQ fits no block outputs: the unquantized chain runs only on the batches the error record is measured
    on, and the record is the quantized chain's error against it there. AutoRound's targets need every batch."""
    recipe, plan, model, tokens = _setup("31b", algorithm, calibration={"samples": 6, "seq_len": 48},
                                         autoround={"iters": 2, "batch_size": 2})
    chains, original_error = {}, blockwise.chain_error

    def recording_error(cal):
        chains[len(chains)] = (len(cal.fp_hidden), sum(torch.nn.functional.mse_loss(q.float(), fp.float()).item()
                                                       for q, fp in zip(cal.q_hidden, cal.fp_hidden)))
        return original_error(cal)

    monkeypatch.setattr(blockwise, "chain_error", recording_error)
    result = blockwise.quantize_blockwise(model, plan, recipe, tokens, tmp_path, "sha")
    assert result.error_batches == measured_on and len(tokens) == 6
    assert [batches for batches, _ in chains.values()] == [measured_on] * 6
    assert [e.mse for e in result.block_errors] == pytest.approx([total / measured_on for _, total in chains.values()])
    assert all(e.mse > 0 and e.rtn_mse > 0 for e in result.block_errors)


@pytest.mark.parametrize("algorithm", ["gptq", "opt-rtn", "autoround"])
def test_chain_batches_calibrate_as_one_sample_per_forward(algorithm, tmp_path, monkeypatch):
    """Samples joined into chain batches (2, 2 and 1 of 5 on the E2B: PLE slices and KV-shared layers per
    sample) give the blocks the same inputs, so the same grids and block errors, up to the rounding of
    wider matmuls; a sample paired with another's PLE slice or K/V would not. GPTQ is compared on the
    Hessians its solver is handed for the first block: on 240 tokens a Hessian of 1,024 columns is
    rank-deficient, and the solver turns rounding-level differences into other grids, so later blocks'
    inputs part (a real run has 16k+ tokens)."""
    import llmcompressor.modifiers.gptq.gptq_quantize as gptq_quantize

    options = {"calibration": {"samples": 5, "seq_len": 48}, "autoround": {"iters": 2, "batch_size": 3}}
    runs, hessians, solve = {}, {1: [], 2: []}, gptq_quantize.quantize_weight
    for chain_batch in (1, 2):
        def recording_solve(**kwargs):
            hessians[chain_batch].append(kwargs["hessians"].clone())
            return solve(**kwargs)

        monkeypatch.setattr(gptq_quantize, "quantize_weight", recording_solve)
        recipe, plan, model, tokens = _setup("e2b", algorithm, **options)
        runs[chain_batch] = blockwise.quantize_blockwise(model, plan, recipe, tokens, tmp_path, "sha",
                                                         compute=torch.float32, chain_batch=chain_batch)
    single, batched = runs[1], runs[2]
    assert single.error_batches == batched.error_batches == (5 if algorithm == "autoround" else 4)
    if algorithm == "gptq":
        first_block = sum(".layers.0." in name for name in single.grids)
        assert len(hessians[1]) == len(hessians[2]) == len(single.grids) and first_block > 1
        assert all(torch.allclose(h2, h1, rtol=1e-5, atol=1e-6 * h1.abs().max().item())
                   for h1, h2 in zip(hessians[1][:first_block], hessians[2][:first_block]))
        return
    # identical on an AMD EPYC (avx512); at 3 x 32 tokens the errors part by 5e-4: a few scales flip on ties
    assert [e.mse for e in batched.block_errors] == pytest.approx([e.mse for e in single.block_errors], rel=2e-3)
    assert [e.rtn_mse for e in batched.block_errors] == pytest.approx([e.rtn_mse for e in single.block_errors],
                                                                      rel=2e-3)
    same = sum((batched.grids[n].weight == single.grids[n].weight).sum().item() for n in single.grids)
    assert same / sum(g.weight.numel() for g in single.grids.values()) > 0.999
    # Two runs, two checkpoint folders: a resumed run never mixes grids from another batch size.
    assert len([p for p in tmp_path.iterdir() if p.is_dir()]) == 2


def test_interrupted_run_resumes_at_the_first_unfinished_block(tmp_path, monkeypatch):
    recipe, plan, model, tokens = _setup("31b", "gptq")
    complete = blockwise.quantize_blockwise(model, plan, recipe, tokens, tmp_path / "full", "sha").grids

    recipe, plan, model, tokens = _setup("31b", "gptq")
    calls = []
    original = blockwise.BLOCK_SOLVERS["gptq"]

    def interrupted(layer, targets, index, *args):
        calls.append(index)
        if index == 3 and len(calls) == 4:
            raise KeyboardInterrupt
        return original(layer, targets, index, *args)

    monkeypatch.setitem(blockwise.BLOCK_SOLVERS, "gptq", interrupted)
    with pytest.raises(KeyboardInterrupt):
        blockwise.quantize_blockwise(model, plan, recipe, tokens, tmp_path / "resumed", "sha")
    recipe, plan, model, tokens = _setup("31b", "gptq")
    calls.clear()
    resumed = blockwise.quantize_blockwise(model, plan, recipe, tokens, tmp_path / "resumed", "sha").grids
    assert calls == [3, 4, 5]
    assert resumed.keys() == complete.keys()
    assert all(torch.equal(resumed[n].weight, complete[n].weight) for n in complete)


@pytest.mark.parametrize("algorithm", ["autoround", "gptq", "opt-rtn"])
def test_calibrated_export_reloads_and_validates(algorithm, tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text(f"model: tiny:e2b\nscheme: W4A16\nalgorithm: {algorithm}\n"
                    "autoround: {iters: 2, batch_size: 2}\ncalibration: {samples: 2, seq_len: 32}\n"
                    f"output_dir: {tmp_path / 'run'}\neval: {{samples: 2, seq_len: 64, max_new_tokens: 2}}\n")
    manifest = quantize_run(path)
    assert manifest.status == "validated"
    assert manifest.reload.vs_in_memory.max_abs_diff == 0.0
    assert manifest.calibration.samples == 2 and not manifest.calibration.cached
    errors = manifest.quantize_report.block_errors
    assert len(errors) == 10
    config = json.loads((tmp_path / "run" / "export" / "config.json").read_text())
    assert config["quantization_config"]["config_groups"]["group_0"]["weights"]["num_bits"] == 4
    # The same recipe again: calibration tokens come from the run's cache, blocks from checkpoints.
    again = quantize_run(path, validate=False)
    assert again.calibration.cached and again.calibration.sha256 == manifest.calibration.sha256
    assert again.quantize_report.block_errors == errors
    assert manifest.quantize_report.resumed_blocks == [] and again.quantize_report.resumed_blocks == list(range(10))
    log = sorted((tmp_path / "run" / "logs").glob("quantize-*.log"))[-1].read_text()
    assert "block 9: resumed from" in log


def test_block_driver_replays_a_model_without_ple_like_a_plain_forward():
    """Gemma 3 (the real 270M) has no per-layer input and takes position_embeddings second: the driver
    replays each layer's recorded arguments as the model passed them."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    config = Gemma3TextConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                              num_attention_heads=2, num_key_value_heads=1, head_dim=32, sliding_window=8,
                              layer_types=["sliding_attention", "sliding_attention", "full_attention"])
    model = Gemma3ForCausalLM(config).eval()
    tokens = torch.randint(0, 128, (2, 16))
    _, layers = blockwise.decoder_layers(model)
    cal = blockwise.record_inputs(model, layers, list(tokens.split(1)))
    assert not any(r.shares_kv for r in cal.inputs[0])
    for index, layer in enumerate(layers):
        blockwise.advance(layer, index, cal, "fp")
    with torch.no_grad():
        for b, batch in enumerate(tokens.split(1)):
            final = model(input_ids=batch, output_hidden_states=True, use_cache=False).hidden_states[-1]
            assert torch.allclose(model.model.norm(cal.fp_hidden[b]), final, atol=1e-5)


def test_float32_chains_keep_the_model_dtype_and_calibrate_as_the_bf16_ones(tmp_path):
    """Where the CPU emulates bf16 the chains compute in float32 (pipeline/compute.py): weights and grids
    stay BF16, every planned module gets its grid, the checkpoints are kept apart from BF16 chains', and
    each block's error is the BF16 chains' to within BF16 arithmetic. In natural column order: activation
    order sorts the Hessian's diagonal, whose near-ties on a random tiny model fall apart differently in
    float32 and BF16 (measured: 10 % apart), which is the order, not the chains' arithmetic."""
    natural_order = {"gptq": {"actorder": None}}
    recipe, plan, model, tokens = _setup("e2b", "gptq", **natural_order)
    bf16 = blockwise.quantize_blockwise(model, plan, recipe, tokens, tmp_path, "sha")
    _, _, model, _ = _setup("e2b", "gptq", **natural_order)
    wide = blockwise.quantize_blockwise(model, plan, recipe, tokens, tmp_path, "sha", compute=torch.float32)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert wide.grids.keys() == bf16.grids.keys() and len(wide.grids) == len(plan.quantized)
    assert all(g.weight.dtype == torch.bfloat16 for g in wide.grids.values())
    assert len(list(tmp_path.iterdir())) == 2  # two checkpoint folders: not resumed from the BF16 blocks
    for ours, theirs in zip(wide.block_errors, bf16.block_errors):
        assert ours.mse < ours.rtn_mse
        assert ours.mse == pytest.approx(theirs.mse, rel=0.1) and ours.mse != theirs.mse
