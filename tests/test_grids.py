"""The one conversion from auto-round's grid (unsigned zero point, float32 scale) to compressed-tensors'
signed grid, used by auto-round's RTN and the block driver's SignRound alike."""

import pytest
import torch
from compressed_tensors.quantization.lifecycle.forward import dequantize, quantize

from pipeline.overrides import WeightScheme
from pipeline.quantize.grids import from_autoround, weight_args


def _autoround_grid(unsigned: torch.Tensor, zero: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """What auto-round leaves in `module.weight`: (q - zp) * scale per group, in float32."""
    return ((unsigned - zero.unsqueeze(-1)) * scale.unsqueeze(-1)).reshape(unsigned.shape[0], -1)


def test_symmetric_steps_are_recovered_and_clamped_to_the_signed_range():
    torch.manual_seed(0)
    rows, groups, size = 4, 3, 32
    unsigned = torch.randint(0, 16, (rows, groups, size)).float()
    scale = torch.rand(rows, groups) * 0.01 + 1e-3
    weight = _autoround_grid(unsigned, torch.full((rows, groups), 8.0), scale)
    weight[0, 0] = 8.4 * scale[0, 0]  # one step past the top of the 4-bit range
    scheme = WeightScheme(bits=4, group_size=size, symmetric=True)
    grid = from_autoround(weight, scale, None, scheme, torch.bfloat16)
    assert grid.zero_point is None and grid.weight.dtype == grid.scale.dtype == torch.bfloat16
    ints = quantize(grid.weight.float(), grid.scale.float(), None, weight_args(scheme))
    expected = unsigned - 8
    expected[0, 0, 0] = 7  # clamped, not wrapped
    assert torch.equal(ints.reshape(rows, groups, size), expected)
    # the stored weight is what a loader dequantizes: the clamped step, not the one past the range
    assert torch.equal(dequantize(ints, grid.scale.float(), None, weight_args(scheme)).to(torch.bfloat16), grid.weight)


def test_asymmetric_grids_keep_auto_round_s_zero_point_signed():
    torch.manual_seed(1)
    rows, groups, size = 3, 2, 64
    unsigned = torch.randint(0, 16, (rows, groups, size)).float()
    zero = torch.randint(0, 16, (rows, groups)).float()
    scale = torch.rand(rows, groups) * 0.01 + 1e-3
    weight = _autoround_grid(unsigned, zero, scale)
    scheme = WeightScheme(bits=4, group_size=size, symmetric=False)
    grid = from_autoround(weight, scale, zero, scheme, torch.bfloat16)
    assert torch.equal(grid.zero_point, (zero - 8).to(torch.int8))
    args = weight_args(scheme)
    ints = quantize(grid.weight.float(), grid.scale.float(), grid.zero_point, args)
    assert torch.equal(ints.reshape(rows, groups, size), unsigned - 8)  # compressed-tensors' signed integers
    # and what a loader dequantizes is the stored weight, exactly
    back = dequantize(ints, grid.scale.float(), grid.zero_point, args)
    assert torch.equal(back.to(torch.bfloat16), grid.weight)


def _weighted_error(weight, quantized, importance) -> float:
    return ((weight.float() - quantized.float()).pow(2) * importance).sum().item()


@pytest.mark.parametrize("variant, bits, group_size", [("e2b", 4, 128), ("31b", 4, 32)])
def test_the_importance_weighted_search_beats_min_max_on_every_tensor(variant, bits, group_size):
    """Every decoder Linear of a tiny model, at 4 bits (the bits the search is for), with a heavy-tailed importance per input channel (real
    activations' mean squares span orders of magnitude): the searched grid's weighted reconstruction
    error is below compressed-tensors' min/max grid's, and the weight it leaves packs to its integers."""
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize

    from pipeline.model import load_config, load_model, resolve
    from pipeline.quantize.blockwise import rtn_qparams, searched_qparams
    from pipeline.recipe import parse_recipe

    source = resolve(parse_recipe({"name": "t", "model": f"tiny:{variant}", "scheme": "W4A16"}).model)
    model = load_model(source, load_config(source))
    scheme = WeightScheme(bits=bits, group_size=group_size, symmetric=True)
    args = weight_args(scheme)
    generator = torch.Generator().manual_seed(0)
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
               and "language_model.layers." in n and m.in_features % (group_size or 1) == 0]
    assert len(linears) > 20
    for name, module in linears:
        weight = module.weight.data
        importance = torch.randn(module.in_features, generator=generator).mul(2).exp()
        scale, zero_point = searched_qparams(weight, scheme, importance)
        assert scale.dtype == weight.dtype and scale.shape == (weight.shape[0], module.in_features // (group_size or module.in_features))
        searched = fake_quantize(weight, scale, zero_point, args)
        minmax = fake_quantize(weight, *rtn_qparams(weight, scheme), args)
        assert _weighted_error(weight, searched, importance) < _weighted_error(weight, minmax, importance), name
        # compressed-tensors' compressor packs round(weight / scale) in the weight's dtype: the same integers
        ints = quantize(weight, scale, zero_point, args)
        assert ints.min() >= -(2 ** (bits - 1)) and ints.max() <= 2 ** (bits - 1) - 1
        assert torch.equal(quantize(searched, scale, zero_point, args), ints)


def test_the_search_is_refused_for_asymmetric_grids():
    from pipeline.quantize.blockwise import searched_qparams
    from pipeline.recipe import RecipeError, parse_recipe

    with pytest.raises(ValueError, match="symmetric only"):
        searched_qparams(torch.randn(4, 64), WeightScheme(bits=4, group_size=32, symmetric=False), torch.ones(64))
    for fields in ({"algorithm": "opt-rtn", "symmetric": False},
                   {"algorithm": "gptq", "gptq": {"grid": "imatrix"},
                    "overrides": [{"layer_type": "full_attention", "symmetric": False}]}):
        with pytest.raises(RecipeError) as err:
            parse_recipe({"name": "r", "model": "tiny:e2b", "scheme": "W4A16", **fields}, source="r.yaml")
        assert err.value.key == "symmetric" and "grid: minmax" in str(err.value)
