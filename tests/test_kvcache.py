"""RotorQuantCache: round-trip error bounds, exactness against DynamicCache, Gemma 4 layer kinds."""

import math

import pytest
import torch
from transformers import DynamicCache

from pipeline.generate.kv_cache import (
    BITS, ROTATIONS, RotorQuantCache, RotorQuantLayer, decode_logits, dynamic_cache_bytes, make_rotation,
    next_token_agreement, pack_codes, unpack_codes,
)
from pipeline.model import load_config, load_model, resolve
from pipeline.recipe import GEMMA3_270M, ModelSpec


@pytest.fixture(scope="module")
def tiny_models():
    models = {}
    for variant in ("e2b", "31b"):
        source = resolve(ModelSpec(id=f"tiny:{variant}"))
        models[variant] = load_model(source, load_config(source)).float().eval()
    return models


def _prompt(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(20, 1000, (1, n), generator=torch.Generator().manual_seed(seed))


def _layer_bytes(layer: RotorQuantLayer, batch: int, heads: int, head_dim: int, fp_bytes: int) -> int:
    """K + V bytes by formula: packed codes plus fp16 scale and minimum per group, plus the window."""
    quantized = layer.quantized_tokens * (head_dim * layer.bits // 8 + 2 * 2 * head_dim // layer.group_size)
    window = (layer.stored_tokens() - layer.quantized_tokens) * head_dim * fp_bytes
    return 2 * batch * heads * (quantized + window)


@pytest.mark.parametrize("name", [r for r in ROTATIONS if r != "rotor3"])
def test_rotations_are_orthogonal_seeded_and_not_identity(name):
    d = 64
    rot = make_rotation(name, d, seed=1)
    matrix = rot.apply(torch.eye(d))
    assert torch.allclose(matrix @ matrix.T, torch.eye(d), atol=1e-5)
    assert torch.allclose(rot.invert(rot.apply(torch.eye(d))), torch.eye(d), atol=1e-5)
    assert torch.equal(make_rotation(name, d, seed=1).apply(torch.eye(d)), matrix)
    if name != "none":
        assert not torch.allclose(matrix, torch.eye(d))
        assert not torch.allclose(make_rotation(name, d, seed=2).apply(torch.eye(d)), matrix)
    if name in ("givens", "quaternion"):  # block rotations mix only within their blocks
        block = {"givens": 2, "quaternion": 4}[name]
        mask = torch.block_diag(*[torch.ones(block, block)] * (d // block)).bool()
        assert matrix[~mask].abs().max() == 0 and matrix[mask].abs().min() > 0


def test_rotor3_needs_a_head_dim_divisible_by_three():
    rot = make_rotation("rotor3", 48)
    matrix = rot.apply(torch.eye(48))
    assert torch.allclose(matrix @ matrix.T, torch.eye(48), atol=1e-5)
    assert torch.linalg.det(matrix[:3, :3]) == pytest.approx(1.0, abs=1e-5)  # proper rotations
    with pytest.raises(ValueError, match="head dim 64 is not a multiple"):
        make_rotation("rotor3", 64)


@pytest.mark.parametrize("bits", BITS)
def test_packing_round_trips_and_uses_bits_per_value(bits):
    codes = torch.randint(0, 2**bits, (2, 3, 5, 64), dtype=torch.uint8)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape[-1] == 64 * bits // 8
    assert torch.equal(unpack_codes(packed, bits), codes)


@pytest.mark.parametrize("rotation", ["none", "givens", "quaternion", "hadamard", "dense"])
@pytest.mark.parametrize("bits", BITS)
def test_round_trip_error_within_the_b_bit_bound(bits, rotation):
    gen = torch.Generator().manual_seed(bits)
    keys = torch.randn(2, 3, 40, 64, generator=gen) * torch.linspace(0.1, 8, 64)  # outlier channels
    values = torch.randn(2, 3, 40, 64, generator=gen)
    layer = RotorQuantLayer(bits=bits, rotation=rotation, residual_window=8, group_size=32)
    layer.update(keys, values)
    read_k, read_v = layer.update(keys[..., :0, :], values[..., :0, :])  # a read of what is stored
    assert layer.quantized_tokens == 32 and torch.equal(read_k[..., 32:, :], keys[..., 32:, :])
    for original, read, packed in ((keys, read_k, layer.qkeys), (values, read_v, layer.qvalues)):
        rotated = layer.rotation.apply(original[..., :32, :]).reshape(2, 3, 32, 2, 32)
        # The bound of a b-bit min/max quantizer: half a step, step = group range / (2^b - 1).
        step = (rotated.amax(-1) - rotated.amin(-1)) / (2**bits - 1)
        scale = packed.scale.float()
        assert (scale <= step * (1 + 2**-9) + 2**-14).all()  # fp16 rounding of the stored step only
        err_rot = layer.rotation.apply(read[..., :32, :] - original[..., :32, :]).reshape(rotated.shape)
        assert (err_rot.abs() <= scale[..., None] / 2 * (1 + 1e-4) + 1e-5).all()
        # Rotations are orthogonal: each vector's L2 error is the rotated coordinates' L2 error.
        l2_bound = (32 * (scale / 2) ** 2).sum(-1).sqrt()
        assert ((read[..., :32, :] - original[..., :32, :]).norm(dim=-1) <= l2_bound * (1 + 1e-4) + 1e-5).all()
    if bits < 8:
        assert (read_k[..., :32, :] != keys[..., :32, :]).any()


def test_the_cache_stores_packed_bits(tiny_models):
    model = tiny_models["31b"]
    ids = _prompt(48)
    sizes = {}
    for bits in BITS:
        cache = RotorQuantCache(model, bits=bits, residual_window=0, group_size=None)
        model(input_ids=ids, past_key_values=cache)
        sizes[bits] = cache.memory_bytes()
        for layer in cache.layers:
            _, heads, _, head_dim = layer.keys.shape
            assert layer.qkeys.codes.dtype == torch.uint8 and layer.qkeys.codes.shape[-1] == head_dim * bits // 8
            assert layer.memory_bytes() == _layer_bytes(layer, 1, heads, head_dim, 4)
    dense = DynamicCache(config=model.config)
    model(input_ids=ids, past_key_values=dense)
    assert sizes[2] < sizes[3] < sizes[4] < sizes[8] < dynamic_cache_bytes(dense) / 3.5  # fp32 model


@pytest.mark.parametrize("variant", ["e2b", "31b"])
def test_generate_equals_dynamic_cache_exactly_while_the_window_covers_the_sequence(tiny_models, variant):
    model = tiny_models[variant]
    ids = _prompt(40)
    kwargs = dict(max_new_tokens=16, do_sample=False, output_logits=True, return_dict_in_generate=True)
    ref = model.generate(ids, past_key_values=DynamicCache(config=model.config), **kwargs)
    cache = RotorQuantCache(model, bits=2, rotation="hadamard", residual_window=64)
    out = model.generate(ids, past_key_values=cache, **kwargs)
    # Nothing left the full-precision window: the very same tensors reach attention, bit for bit.
    assert all(layer.quantized_tokens == 0 for layer in cache.layers)
    assert torch.equal(out.sequences, ref.sequences)
    assert all(torch.equal(a, b) for a, b in zip(out.logits, ref.logits))


@pytest.mark.parametrize("variant", ["e2b", "31b"])
def test_generate_at_8_bits_matches_dynamic_cache_tokens(tiny_models, variant):
    model = tiny_models[variant]
    ids = _prompt(40, seed=1)
    kwargs = dict(max_new_tokens=16, do_sample=False, output_logits=True, return_dict_in_generate=True)
    ref = model.generate(ids, past_key_values=DynamicCache(config=model.config), **kwargs)
    for rotation in ("quaternion", "hadamard"):
        cache = RotorQuantCache(model, bits=8, rotation=rotation, residual_window=0)
        out = model.generate(ids, past_key_values=cache, **kwargs)
        assert all(layer.quantized_tokens > 0 for layer in cache.layers)
        assert torch.equal(out.sequences, ref.sequences)
        logits, ref_logits = torch.stack(out.logits), torch.stack(ref.logits)
        assert not torch.equal(logits, ref_logits)  # quantized, yet close
        # Random tiny models amplify perturbations (4 bits moves their logits by ~50-100 %); 8 bits stays close.
        assert next_token_agreement(ref_logits[:, 0], logits[:, 0])["kl_mean"] < 0.01


def test_sliding_layers_keep_at_most_the_window_and_full_layers_everything(tiny_models):
    model = tiny_models["e2b"]
    text = model.config.get_text_config()
    window, total = text.sliding_window, 40 + 24
    cache = RotorQuantCache(model, bits=4, residual_window=8)
    model.generate(_prompt(40), past_key_values=cache, max_new_tokens=25, do_sample=False)
    kinds = [layer.is_sliding for layer in cache.layers]
    assert kinds == [t == "sliding_attention" for t in text.layer_types[: len(cache.layers)]] and any(kinds)
    for layer in cache.layers:
        # generate writes the last generated token's K/V on no step: `total` tokens went through.
        assert layer.get_seq_length() == total
        assert layer.stored_tokens() == (window - 1 if layer.is_sliding else total)
        assert layer.keys.shape[-2] == 8 and layer.quantized_tokens == layer.stored_tokens() - 8


def test_kv_shared_layers_store_nothing_extra(tiny_models):
    model = tiny_models["e2b"]
    text = model.config.get_text_config()
    shared = text.num_kv_shared_layers
    assert shared > 0
    cache = RotorQuantCache(model, bits=4, residual_window=4, group_size=32)
    model(input_ids=_prompt(50), past_key_values=cache)
    # Only the layers that compute K/V have a cache layer; the shared ones read their source's.
    assert len(cache.layers) == text.num_hidden_layers - shared
    expected = 0
    head_dims = set()
    for idx, layer in enumerate(cache.layers):
        head_dim = text.per_layer_config[idx].head_dim
        assert layer.keys.shape[-1] == head_dim  # per-layer-type head dims
        head_dims.add(head_dim)
        expected += _layer_bytes(layer, 1, layer.keys.shape[1], head_dim, 4)
    assert cache.memory_bytes() == expected and len(head_dims) == 2
    # With everything in the window the cache holds exactly what DynamicCache holds, no second copy.
    full = RotorQuantCache(model, bits=4, residual_window=1000)
    dense = DynamicCache(config=model.config)
    model(input_ids=_prompt(50), past_key_values=full)
    model(input_ids=_prompt(50), past_key_values=dense)
    assert full.memory_bytes() == dynamic_cache_bytes(dense) > 0


def test_partial_rope_layers_round_trip_the_stored_keys(tiny_models):
    model = tiny_models["e2b"]
    text = model.config.get_text_config()
    rotary = model.model.language_model.rotary_emb
    full_freqs = rotary.full_attention_inv_freq
    # p-RoPE: only a quarter of the global head dim's frequency pairs rotate with position.
    assert (full_freqs != 0).float().mean().item() == pytest.approx(0.25)
    assert (rotary.sliding_attention_inv_freq != 0).all()
    ids = _prompt(30)
    dense = DynamicCache(config=model.config)
    model(input_ids=ids, past_key_values=dense)
    cache = RotorQuantCache(model, bits_by_layer_type={"full_attention": 8, "sliding_attention": 3},
                            rotation="quaternion", residual_window=0, group_size=None)
    model(input_ids=ids, past_key_values=cache)
    full_idx = text.layer_types.index("full_attention")
    for idx, layer in enumerate(cache.layers):
        assert layer.bits == (3 if layer.is_sliding else 8)
        stored = dense.layers[idx].keys[..., -layer.quantized_tokens:, :]
        read = layer.update(stored[..., :0, :], stored[..., :0, :])[0]
        # The cached keys are post-RoPE (rotated dims and unrotated dims alike) and come back within the bound.
        scale = layer.qkeys.scale.float()
        assert ((read - stored).norm(dim=-1) <= (layer.group_size * (scale / 2) ** 2).sum(-1).sqrt() * 1.001).all()
    # The nope part of a full layer's keys is position-independent: equal token, equal nope part.
    rotated_dims = torch.cat([full_freqs != 0, full_freqs != 0])
    same = torch.full((1, 6), 77)
    dense = DynamicCache(config=model.config)
    model(input_ids=same, past_key_values=dense)
    keys = dense.layers[full_idx].keys[0, 0]
    assert torch.allclose(keys[1, ~rotated_dims], keys[5, ~rotated_dims], atol=1e-6)
    assert not torch.allclose(keys[1, rotated_dims], keys[5, rotated_dims], atol=1e-3)


def test_bad_arguments_are_rejected(tiny_models):
    model = tiny_models["31b"]
    with pytest.raises(ValueError, match="bits must be one of"):
        RotorQuantCache(model, bits=5)
    with pytest.raises(ValueError, match="unknown rotation"):
        RotorQuantCache(model, rotation="spin")
    with pytest.raises(ValueError, match="layer types"):
        RotorQuantCache(model, bits_by_layer_type={"global": 4})
    cache = RotorQuantCache(model, rotation="rotor3")
    with pytest.raises(ValueError, match="not a multiple"):
        model(input_ids=_prompt(4), past_key_values=cache)


@pytest.mark.slow
def test_4_bit_cache_on_gemma3_270m_stays_within_a_kl_bound():
    from pipeline.corpus import builtin_texts, token_windows

    source = resolve(ModelSpec(id=GEMMA3_270M))
    config = load_config(source)
    model = load_model(source, config).float().eval()
    from transformers import AutoTokenizer

    ids = token_windows(AutoTokenizer.from_pretrained(source.path), builtin_texts("eval"), 1, 320)
    prefill = 288
    ref = decode_logits(model, ids, prefill, DynamicCache(config=model.config))
    results = {}
    for bits in (4, 2):
        cache = RotorQuantCache(model, bits=bits, rotation="hadamard", residual_window=16)
        results[bits] = next_token_agreement(ref, decode_logits(model, ids, prefill, cache))
        assert all(layer.quantized_tokens >= prefill - 16 for layer in cache.layers)
    assert results[4]["kl_mean"] < 0.05 and results[4]["top1"] >= 0.9, results
    assert results[2]["kl_mean"] > results[4]["kl_mean"], results  # the bound is not met trivially
    assert math.isfinite(results[2]["kl_mean"])




def _read_back(layer: RotorQuantLayer, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """What attention would read from `layer` (an update with no new tokens)."""
    empty = torch.empty(batch, layer.keys.shape[1], 0, layer.keys.shape[-1])
    return layer.update(empty, empty)


def test_batch_reordering_moves_the_packed_tokens_with_the_window():
    """Beam search and batch expansion reorder the cache along the batch; quantized tokens must follow."""
    keys, values = torch.randn(3, 2, 20, 64), torch.randn(3, 2, 20, 64)
    layer = RotorQuantLayer(bits=4, rotation="quaternion", residual_window=4, group_size=32)
    layer.update(keys, values)
    read = _read_back(layer, 3)
    order = torch.tensor([2, 0, 1])
    layer.reorder_cache(order)
    assert all(torch.equal(a, b[order]) for a, b in zip(_read_back(layer, 3), read))
    layer.batch_repeat_interleave(2)
    assert torch.equal(_read_back(layer, 6)[0], read[0][order].repeat_interleave(2, 0))
    layer.batch_select_indices(torch.tensor([1, 4]))
    assert torch.equal(_read_back(layer, 2)[1], read[1][order[[0, 2]]])
