"""The dtype that measuring forwards (probe logits, reload check, validation) compute in.

Weights are stored and exported in their own dtype (BF16) whatever happens here. A CPU without bf16
instructions emulates every bf16 matmul: on an AMD EPYC with AVX2 only, a one-token Linear 256 → 1024
took 7.4 ms in bf16 and 0.07 ms in float32, which made a tiny model's validation 100× slower than
it needed to be. There, and where memory allows, measurements run in float32, which is also the
quantization error itself, without bf16's own rounding on top (BF16 → float32 → BF16 is exact).
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

import torch

ComputeDtype = Literal["bfloat16", "float32"]
_BF16_FLAGS = {"avx512_bf16", "amx_bf16", "bf16"}  # x86 AVX-512/AMX, Arm's FEAT_BF16 ("bf16" in Features)


def cpu_computes_bf16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """Whether this CPU has bf16 matmul instructions (torch emulates bf16 without them)."""
    try:
        words = set(re.findall(r"\w+", cpuinfo.read_text()))
    except OSError:
        return False
    return bool(words & _BF16_FLAGS)


def host_compute_dtype() -> ComputeDtype:
    """What a model held in this host's RAM measures in: float32 where the CPU emulates bf16."""
    return "bfloat16" if cpu_computes_bf16() else "float32"


def torch_dtype(name: ComputeDtype) -> torch.dtype:
    return getattr(torch, name)


@contextmanager
def computing_in(model: torch.nn.Module, dtype: torch.dtype):
    """The model's narrower floating tensors widened to `dtype` for the block, each restored to its own
    dtype after: exactly, since a widening cast loses nothing (BF16 → float32 → BF16 gives back the same
    bits). Tensors already as wide (float32 rotary frequencies) are left as they are.

    A module that compressed-tensors fake-quantizes on the fly (llmcompressor's in-memory model) would
    round its weight to the grid in `dtype`, and float32 rounds some weights to other integers than the
    BF16 arithmetic of the export's compressor. So its integers are taken once in the stored dtype, as the
    compressor takes them, and dequantized in `dtype`, as the reloaded export dequantizes them."""
    bits = torch.finfo(dtype).bits
    folded = [_fold_weight_quantization(m, dtype) for m in model.modules()
              if _fake_quantizes_weight(m) and torch.finfo(m.weight.dtype).bits < bits]
    tensors = [t for t in (*model.parameters(), *model.buffers())
               if t.is_floating_point() and torch.finfo(t.dtype).bits < bits]
    originals = [t.dtype for t in tensors]
    for t in tensors:
        t.data = t.data.to(dtype)
    try:
        yield model
    finally:
        for t, original in zip(tensors, originals):
            t.data = t.data.to(original)
        for module, weight in folded:
            module.weight.data = weight
            module.quantization_enabled = True


def _fake_quantizes_weight(module: torch.nn.Module) -> bool:
    from compressed_tensors.quantization import QuantizationStatus

    scheme, status = getattr(module, "quantization_scheme", None), getattr(module, "quantization_status", None)
    return (scheme is not None and scheme.weights is not None and status is not None
            and status < QuantizationStatus.COMPRESSED and getattr(module, "quantization_enabled", True)
            and scheme.input_activations is None and scheme.output_activations is None)


def _fold_weight_quantization(module: torch.nn.Module, dtype: torch.dtype) -> tuple[torch.nn.Module, torch.Tensor]:
    """The weight replaced by its quantized value in `dtype`, the on-the-fly pass turned off; returns what
    restores the weight."""
    from compressed_tensors.quantization.lifecycle.forward import dequantize, quantize

    args, weight = module.quantization_scheme.weights, module.weight.data
    scale, zero_point = module.weight_scale, getattr(module, "weight_zero_point", None)
    ints = quantize(weight, scale, zero_point, args)
    module.weight.data = dequantize(ints.to(dtype), scale.to(dtype), zero_point, args, dtype)
    module.quantization_enabled = False
    return module, weight
