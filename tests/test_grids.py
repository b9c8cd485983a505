"""The one conversion from auto-round's grid (unsigned zero point, float32 scale) to compressed-tensors'
signed grid, used by auto-round's RTN and the block driver's SignRound alike."""

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
