"""The quantization algorithms: one registry, which the recipe, the backend choice, the memory plan
and the card all read. Adding an algorithm is one entry here and one backend in pipeline/quantize/.

An algorithm runs as a *pass* on a library: RTN on llmcompressor or on auto-round, AutoRound's
SignRound and GPTQ's solver inside our block driver, qat-repack as our own repack. The manifest
records both names, so "auto-round" never means two different passes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class _Options(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class AutoRoundOptions(_Options):
    """auto-round's SignRound: learnable rounding offsets and min/max scale factors per block."""

    iters: int = Field(default=200, ge=1)
    lr: float | None = Field(default=None, gt=0)  # None: 1 / iters, as auto-round does
    batch_size: int = Field(default=8, ge=1)
    minmax_tuning: bool = True

    def describe(self) -> str:
        return f"{self.iters} iterations, batch {self.batch_size}"


class GPTQOptions(_Options):
    block_size: int = Field(default=128, ge=1)
    dampening: float = Field(default=0.01, gt=0)
    # Columns solved in activation order, the grid's groups unchanged (compressed-tensors' "static", an
    # alias of "weight": no g_idx in the export). With the grid below, measured on the real 270M at W4A16
    # g128: KL 0.101 vs 0.128 in natural order, llmcompressor's own GPTQ 0.148 (README, "Quality per bit").
    actorder: Literal["static", "group", "weight"] | None = "static"
    # The grid GPTQ rounds onto: the importance-weighted scale search (opt-rtn's, with the Hessian's
    # diagonal as the importance; symmetric only), or compressed-tensors' min/max. The search measured
    # KL 0.128 vs 0.206 on the real 270M at W4A16 g128 in natural order.
    grid: Literal["imatrix", "minmax"] = "imatrix"

    def describe(self) -> str:
        return f"block {self.block_size}, dampening {self.dampening}, actorder {self.actorder}, {self.grid} grid"


@dataclass(frozen=True)
class Pass:
    """One algorithm on one library: the backend class that runs it and what it can do."""

    backend: str  # "module:Class" in pipeline/quantize/, imported only when a run needs it
    disk_offload: bool = False  # runs on compressed-tensors' disk offload (sets no `weight.data`)
    spreads_over_gpus: bool = False  # can hold the whole model over the GPUs (accelerate's device map)
    kv_cache_scales: bool = False  # can calibrate static FP8 KV-cache scales in the same pass


@dataclass(frozen=True)
class Algorithm:
    name: str
    label: str  # the card's name for it
    passes: dict[str, Pass]  # by library, the default first
    calibrated: bool  # reads calibration data to choose its weights
    data_note: str | None = None  # the card's calibration line for a pass that reads no data
    options_key: str | None = None  # the recipe key holding its options
    options: type[_Options] | None = None
    # What the solver holds per quantized module beyond weights and activations: (shape, bf16 bytes) -> bytes.
    solver_bytes: Callable[[list[int], int], int] | None = None
    # The solver fits the unquantized block's outputs: the block driver runs the unquantized chain on
    # every batch (otherwise only on those the block error record is measured on).
    fits_block_outputs: bool = False

    @property
    def libraries(self) -> tuple[str, ...]:
        return tuple(self.passes)


BLOCK_DRIVER = "pipeline.quantize.blockwise_backend:BlockwiseBackend"
# The block driver's error record (the manifest's; never an input to the algorithms) is measured on the
# first samples only where the algorithm fits no block outputs: the unquantized chain and the RTN baseline
# then cost 2 x 4 / samples of a chain pass instead of two whole passes (profile: benchmarks/RESULTS.md).
BLOCK_ERROR_SAMPLES = 4
# The scale search (opt-rtn, GPTQ's imatrix grid) runs on row chunks of at most this many weights, which
# give the same scales: on a CPU, chunks that stay in cache (15 MB held instead of 14x the module; the
# 270M's first three layers searched in 5.1 s instead of 10.5 s, 2 cores, benchmarks/RESULTS.md); on a
# GPU, chunks that bound the transient the memory plan counts.
SEARCH_CHUNK_ELEMENTS = {"cpu": 1 << 19, "gpu": 1 << 24}

ALGORITHMS: dict[str, Algorithm] = {a.name: a for a in (
    Algorithm("rtn", "RTN (round-to-nearest)", calibrated=False, data_note="none (RTN is data-free)", passes={
        "llmcompressor": Pass("pipeline.quantize.llmcompressor_backend:LLMCompressorBackend",
                              disk_offload=True, kv_cache_scales=True),
        "auto-round": Pass("pipeline.quantize.autoround_backend:AutoRoundRTNBackend")}),
    # SignRound holds the block's quantized modules in float32 (+1x their BF16 bytes) and a float32
    # rounding offset per weight with its gradient (+4x).
    Algorithm("autoround", "AutoRound", calibrated=True, options_key="autoround", options=AutoRoundOptions,
              passes={"auto-round": Pass(BLOCK_DRIVER, spreads_over_gpus=True)},
              solver_bytes=lambda shape, bf16_bytes: 5 * bf16_bytes, fits_block_outputs=True),
    # GPTQ holds one float32 Hessian [in, in] per quantized module (for MoE, one per expert).
    Algorithm("gptq", "GPTQ", calibrated=True, options_key="gptq", options=GPTQOptions,
              passes={"llmcompressor": Pass(BLOCK_DRIVER, spreads_over_gpus=True)},
              solver_bytes=lambda shape, bf16_bytes: shape[1] ** 2 * 4),
    # The importance (mean x^2 per input channel) is one float32 vector per quantized module.
    Algorithm("opt-rtn", "optimized RTN (auto-round's scale search, weighted by the calibration activations)",
              calibrated=True, passes={"auto-round": Pass(BLOCK_DRIVER, spreads_over_gpus=True)},
              solver_bytes=lambda shape, bf16_bytes: shape[1] * 4),
    Algorithm("qat-repack", "QAT repack (the source's own 4-bit grid, recovered exactly)", calibrated=False,
              data_note="none (the integers and scales come from the source's grid)",
              passes={"gemma-quant": Pass("pipeline.quantize.qat_repack:QATRepackBackend")}),
)}

AlgorithmName = Literal[tuple(ALGORITHMS)]  # the recipe's `algorithm:` values
Library = Literal["llmcompressor", "auto-round"]  # the recipe's `library:` values
