"""The written export against its own ignore list: what vLLM does at load.

vLLM gives every Linear the config's quantization scheme unless `quantization_config.ignore`
names it, so a module stored unpacked (16-bit) but missing from the list makes the load fail,
and a packed module listed there is read as 16-bit. This check reads only the safetensors
headers of the written folder and a meta-device model of the written config, never the plan,
so it catches whatever wrote the folder getting it wrong.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.names import first_match
from pipeline.tensors import StoredTensors

PACKED = "weight_packed"
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2")


def linear_like_modules(folder: Path) -> set[str]:
    """Modules that take a Linear quantization scheme in vLLM: every nn.Linear of the model the
    written config describes, and fused MoE expert blocks (3-D parameters vLLM quantizes per expert)."""
    import torch
    from transformers import AutoConfig

    from pipeline.model import model_class
    from pipeline.plan import component_of

    config = AutoConfig.from_pretrained(folder)
    with torch.device("meta"):
        model = model_class(config).from_config(config, dtype=torch.bfloat16)
    return {name for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) or component_of(name) == "moe_experts"}


def index_ignore_problems(folder: Path, ignore: list[str]) -> list[str]:
    """Unpacked floating-point Linear-like weights the ignore list misses, and packed ones it names."""
    headers = StoredTensors(folder).headers
    problems = []
    for module in sorted(linear_like_modules(folder)):
        unpacked = [key for key, (dtype, shape) in headers.items()
                    if key.startswith(module + ".") and "." not in key[len(module) + 1:]
                    and dtype in FLOAT_DTYPES and len(shape) >= 2 and not key.endswith(("_scale", "_zero_point"))]
        if unpacked and f"{module}.{PACKED}" not in headers and first_match(module, ignore) is None:
            problems.append(f"{module} is stored unpacked ({unpacked[0]}) but quantization_config.ignore does not name it")
    for key in sorted(headers):
        if key.endswith("." + PACKED):
            module = key.removesuffix("." + PACKED)
            if (entry := first_match(module, ignore)) is not None:
                problems.append(f"{module} is stored packed but quantization_config.ignore names it ({entry})")
    return problems
