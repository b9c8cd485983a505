"""What the stages measured, typed once: the quantize pass's report (in the manifest) and validation's
eval.json. The stages write them; the manifest, the card and publish read them."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel

from pipeline.recipe import EvalSpec

MAX_LISTED = 10  # structural problems named in the verdict; eval.json keeps them all


class BlockError(BaseModel):
    """The block driver's output error for one decoder block (None where it had nothing to quantize)."""

    block: int
    rtn_mse: float | None  # with round-to-nearest weights: what the algorithm improves on
    mse: float | None  # with the algorithm's weights


class RepackReport(BaseModel):
    """How exactly qat-repack's integers and scales reproduce the source."""

    tensors: int
    groups: int
    off_grid_groups: int
    values: int
    identical_share: float
    worst_relative_error: float  # of the group's largest magnitude
    worst_tensor: str
    negative_scale_groups: int


class QuantizeReport(BaseModel):
    """What a quantize pass measured, for the manifest (empty for the RTN passes)."""

    block_errors: list[BlockError] = []
    error_batches: int | None = None  # the calibration samples the block errors are measured on
    resumed_blocks: list[int] = []  # blocks read back from an interrupted run's checkpoints
    qat_repack: RepackReport | None = None
    # ||W - Q(W)|| / ||W|| per layer type, where the run had an unquantized copy to compare with (the sweep)
    weight_error: dict[str, float] | None = None


class Quality(BaseModel):
    """The quantized model against the unquantized one, both computing in `dtype`."""
    dtype: str
    samples: int
    seq_len: int
    tokens: int
    kl_mean: float
    kl_p99: float
    top1_agreement: float
    ppl_reference: float
    ppl_quantized: float
    ppl_ratio: float


class Floor(BaseModel):
    """bf16's own rounding: the unquantized model computing in bf16 against itself in float32, how far
    bf16 arithmetic alone moves the output (an as-served figure near it is about as close as bf16 allows)."""
    kl_mean: float
    kl_p99: float
    top1_agreement: float
    ppl_ratio: float  # bf16's perplexity over float32's


class HeldOutQuality(BaseModel):
    """The figures on `eval.conversations`, measured as the eval set's are (the gates apply to those)."""
    quality: Quality  # both computing in float32 (bf16 where float32 did not fit)
    served: Quality | None  # both in bf16
    bf16_floor: Floor | None


class MeasuredSizes(BaseModel):
    source_weights_bytes: int
    source_measured: bool  # False: the source's files were not local, the plan's BF16 estimate is used
    export_weights_bytes: int
    export_total_bytes: int
    export_vs_source: float
    quantized_params: int
    quantized_bytes: int
    bits_per_quantized_param: float


class Generation(BaseModel):
    prompt: str
    reference: str
    quantized: str


class Structure(BaseModel):
    tensors_checked: int
    kept_identical: int
    quantized_stored: int
    problems: list[str]


class GateResult(BaseModel):
    gate: str
    limit: float
    value: float
    passed: bool
    message: str


class Agreement(BaseModel):
    """One runtime's log-probs against another's on the same windows (pipeline/runtimes/scores.py)."""
    positions: int
    top1_agreement: float
    mean_abs_logprob_diff: float  # of the actual next token
    kl_topk: float  # KL(reference ‖ runtime) over the runtime's top-k tokens and one bucket for the rest


class Serving(BaseModel):
    """The export served by a runtime (vLLM) on validation's held-out windows, its log-probs compared with
    transformers' bf16 log-probs on the same export; or why it was not run, decided before starting it."""
    engine: Literal["vllm"] = "vllm"
    status: Literal["passed", "failed", "not_run"]
    reason: str | None = None  # not_run: why; failed: what failed
    version: str | None = None
    device: str | None = None
    command: str | None = None  # what was started
    served: str | None = None  # the export, or a view of it and why
    load_seconds: float | None = None
    positions: int | None = None
    top1_agreement: float | None = None
    mean_abs_logprob_diff: float | None = None
    kl_topk: float | None = None
    reference_dtype: str | None = None  # what transformers computed in (bf16, else float32)
    floor: Agreement | None = None  # transformers bf16 against float32 on the same export and windows
    gates: list[GateResult] = []
    chat_reply: str | None = None

    @property
    def summary(self) -> str:
        if self.status == "not_run":
            return f"not run ({self.reason})"
        if self.top1_agreement is None:
            return f"{self.status} ({self.reason})"
        floor = f", floor {self.floor.top1_agreement:.4f}" if self.floor else ""
        return (f"{self.status}, top-1 agreement {self.top1_agreement:.4f} with transformers over {self.positions:,} "
                f"positions{floor} ({self.version}, {self.device})")

    @property
    def failures(self) -> list[str]:
        if self.status != "failed":
            return []
        return [f"served by {self.engine}: {self.reason}"] if self.reason else [g.message for g in self.gates if not g.passed]


class GGUFResult(BaseModel):
    """One GGUF file of an `export: gguf` run, loaded and scored by llama.cpp against the unquantized model."""
    type: str
    label: str  # e.g. GPTQ-Q4_0 where the file carries the run's own integers
    file: str
    calibrated: bool
    bytes: int
    bits_per_weight: float  # the file's bytes over the parameters it stores
    quality: Quality | None  # None: llama.cpp did not load or score it (`problem`)
    conversations: Quality | None = None  # on eval.conversations, where the recipe has them
    load_seconds: float | None = None
    chat_reply: str | None = None
    problem: str | None = None


class ProjectorResult(BaseModel):
    """The vision/audio projector GGUF of a GGUF build, loaded by llama.cpp's mtmd beside a text file."""
    file: str | None  # None: not written (`why_not`)
    bytes: int = 0
    vision: bool = False  # mtmd reports an image encoder
    audio: bool = False  # and an audio encoder
    problem: str | None = None  # why llama.cpp did not load it
    why_not: str | None = None


class DraftAcceptance(BaseModel):
    """A drafter's top-1 against its target's own next token, teacher-forced on the held-out windows: the
    share of drafted tokens a greedy target accepts one step ahead (pipeline/drafter.py)."""
    positions: int
    reference: float  # the unquantized drafter's
    quantized: float


class EvalReport(BaseModel):
    created: str
    model_id: str
    scheme: str
    eval: EvalSpec
    # The quantization error: both models computing in float32, so bf16's rounding is not counted (where
    # float32 does not fit the memory budget, in bf16, and `dtype` says so). Gates and cards use it.
    # None: the export does not load cleanly, so nothing was measured.
    quality: Quality | None
    served: Quality | None  # both in bf16, as vLLM and transformers serve the export; None where `quality` is
    bf16_floor: Floor | None  # measured with `served`
    conversations: HeldOutQuality | None = None  # eval.conversations, where the recipe has them
    sizes: MeasuredSizes
    generations: list[Generation]
    structure: Structure
    gates: list[GateResult]
    serving: Serving
    versions: dict[str, str]
    gguf: list[GGUFResult] = []  # export: gguf, one per file
    projector: ProjectorResult | None = None  # export: gguf keeping the towers
    draft_acceptance: DraftAcceptance | None = None  # a drafter's (gemma4_assistant)

    load_problems: list[str]

    @property
    def passed(self) -> bool:
        return not self.failures

    @property
    def failures(self) -> list[str]:
        """All failures, structural ones capped (they come in hundreds when a layout is wrong)."""
        structure = self.structure.problems
        if len(structure) > MAX_LISTED:
            structure = structure[:MAX_LISTED] + [f"... and {len(structure) - MAX_LISTED} more structural problems (eval.json)"]
        projector = [f"{self.projector.file}: {self.projector.problem}"] if self.projector and self.projector.problem else []
        return (self.load_problems + structure + [f"{g.file}: {g.problem}" for g in self.gguf if g.problem] + projector
                + [g.message for g in self.gates if not g.passed] + self.serving.failures)


