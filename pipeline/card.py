"""The model card: `export/README.md`, written from what the run recorded and measured.

Every fact on the card comes from the run directory: manifest.json (recipe, source, versions),
plan.json (what was quantized, what was kept and why), eval.json (measured quality) and the
export's config.json. Nothing is guessed: a number the run did not measure is said to be not
measured, and a license nobody declared is left out and said to be unknown.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import defaultdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

import yaml
from huggingface_hub import ModelCard, ModelCardData
from pydantic import BaseModel

from pipeline.plan import Kept, Plan
from pipeline.recipe import RECIPES_DIR, HeldOutSpec, Recipe, clip
from pipeline.records import EvalReport
from pipeline.rundir import EXPORT, PLAN, CardRecord, Manifest
from pipeline.text_only import PROCESSOR_FILES
from pipeline.runlock import holds_run_lock

log = logging.getLogger(__name__)

CARD = "README.md"
MODEL_CARDS_DIR = Path(__file__).resolve().parent.parent / "model_cards"
TEMPLATE = "README.md.j2"

# How each export format is described and loaded.
FORMATS = {
    "compressed-tensors": {
        "stored_in": "stored in the compressed-tensors format that vLLM, SGLang and transformers load directly",
        "scale": "BF16", "needs": "Needs `pip install compressed-tensors` beside transformers.",
        "import": "", "load_args": "",
    },
    "gptq": {
        "stored_in": "stored in the GPTQ layout (AutoGPTQ / GPTQModel: int32 `qweight`/`qzeros`, FP16 `scales`, "
                     "`desc_act: false`) that vLLM and SGLang serve with their GPTQ kernels",
        "scale": "FP16",
        "needs": "transformers' own GPTQ loader needs optimum and gptqmodel; auto-round's loader reads the same "
                 "folder with `pip install auto-round`, as below.",
        "import": ", AutoRoundConfig", "load_args": ", quantization_config=AutoRoundConfig()",
    },
    "auto-round": {
        "stored_in": "stored in auto-round's native format (GPTQ-style packing, `quant_method: auto-round`) that "
                     "transformers and vLLM load",
        "scale": "FP16", "needs": "Needs `pip install auto-round` beside transformers.",
        "import": "", "load_args": "",
    },
    "gguf": {
        "stored_in": "written as GGUF files for llama.cpp, LM Studio and Ollama by llama.cpp's own converter and "
                     "quantizer",
        "scale": "FP16", "needs": "", "import": "", "load_args": "",
    },
}


def calibration_text(manifest: Manifest, recipe: Recipe) -> str:
    """What the calibrated pass saw, from the manifest; and the algorithm's settings."""
    data = manifest.calibration
    if not data:
        return recipe.algorithm_spec.data_note or "none recorded in the manifest"
    sources = ", ".join(f"{name} ({count})" for name, count in data.per_source.items())
    if data.fell_back_from:  # calibration.fallback: the mixture that ran, and why the ones before it did not
        tried = "; ".join(f"`{name}` could not be loaded: {clip(why, 160)}" for name, why in data.fell_back_from.items())
        sources += f" (mixture `{data.mixture}`, its fallback: {tried})"
    if recipe.algorithm == "rtn":  # calibration data only for the static FP8 KV-cache scales
        return (f"{data.samples} × {data.seq_len} tokens from {sources} (sha256 {data.sha256[:12]}), "
                f"for the FP8 KV-cache scales only; the weights are round-to-nearest")
    options = recipe.algorithm_options
    settings = f"{options.describe()}; " if options else ""
    return (f"{data.samples} × {data.seq_len} tokens from {sources} (sha256 {data.sha256[:12]}); "
            f"{settings}every decoder block calibrated on its own PLE slice, rotary embedding and same-batch shared K/V")
# vLLM and SGLang reserve KV cache for the whole context length; the configs allow 128K-256K, which
# rarely fits beside the weights on one GPU. The snippets start here; the card says how far it goes.
SUGGESTED_CONTEXT = 8192
LICENSE_KEYS = ("license", "license_name", "license_link")


class SourceFacts(BaseModel):
    kind: Literal["hub", "local", "tiny"]
    id: str
    revision: str | None
    name: str  # what the title calls it
    shape: str | None = None  # a tiny model: the real variant whose architecture it shrinks
    base_model: str | None  # the Hub id for the metadata; None rather than a guess


class Architecture(BaseModel):
    layers: int
    sliding: int
    full: int
    sliding_window: int | None
    kv_shared_layers: int
    experts: int | None
    experts_per_token: int | None
    ple: bool
    vision: bool
    audio: bool
    towers: bool  # vision / audio through encoder towers; False: through small embedders only (the 12B)
    max_positions: int
    total_params: int
    ple_params: int

    @property
    def multimodal(self) -> bool:
        return self.vision or self.audio


class KeptGroup(BaseModel):
    label: str
    modules: int
    params: int
    tied: bool
    why: str


class LicenseFacts(BaseModel):
    metadata: dict[str, str]  # license (and license_name/link) for the front matter; empty when unknown
    origin: str  # where it came from, or why it is unknown
    language: list[str] | None


class PLECacheFacts(BaseModel):
    """What running this build with the PLE row cache holds in memory instead of the table."""
    hot_rows: int
    hot_bytes: int  # the hot rows, in BF16
    table_bytes: int  # the table as stored in this build
    mixture: str  # where the recorded hot set came from
    tokens: int
    download: bool  # the card's reference is a Hub repo (else a local folder)


class CardFacts(BaseModel):
    title: str
    source: SourceFacts
    arch: Architecture
    recipe: Recipe
    quant_format: str
    calibration: str
    versions: dict[str, str]
    linears: int
    quantized_modules: int
    quantized_params: int
    kept: list[KeptGroup]
    other_params: int
    mix: dict[str, int] = {}  # scheme label → modules, when `overrides:` mixed schemes
    mix_bits: str = ""  # e.g. "8/4"
    status: Literal["passed", "failed", "not validated"]
    failures: list[str]
    measured: EvalReport | None
    not_measured: str | None  # why the quality section has no numbers
    eval_text: str | None
    conversations_text: str | None = None  # eval.conversations, where the recipe has them
    weights_bytes: int
    source_bytes: int
    source_measured: bool
    bits_per_param: float | None
    ref: str  # what users pass to vllm / from_pretrained: the Hub repo, else the export folder
    model_class: str
    preprocessor: Literal["AutoProcessor", "AutoTokenizer"]
    context: int
    recipe_yaml: str
    recipe_verbatim: bool
    settings: list[str]  # given on the command line, applied to the recipe file
    command: str
    recipe_shipped: bool  # the recipe is one of gemma-quant's recipes/
    license: LicenseFacts
    limitations: list[str]
    dropped_towers: dict[str, int] = {}  # text-only builds: parameters left out, per tower component
    tables: dict[str, str] = {}  # quantized token tables (pipeline/tables.py): name -> scheme label
    ple_cache: PLECacheFacts | None = None  # E-model builds with a recorded hot set (pipeline/generate/ple_cache.py)



# ---------------------------------------------------------------- facts


def gather(run_dir: Path, repo_id: str | None = None, export_at: Path | None = None) -> CardFacts:
    """Everything the card says, from the run directory alone (plus the source's card, for its license)."""
    manifest = Manifest.load(run_dir)
    recipe = manifest.recipe
    plan = Plan.load(run_dir / PLAN)
    export = run_dir / EXPORT
    config = json.loads((export / "config.json").read_text()) if recipe.export != "gguf" else source_config(recipe)
    source = source_facts(manifest, recipe)
    arch = architecture(config, plan)
    measured, not_measured = measurements(run_dir, manifest)
    validation = manifest.validation
    status = "not validated" if not validation else "passed" if validation.passed else "failed"
    sizes = measured.sizes if measured else None
    quantized_params = sum(m.params for m in plan.quantized)
    recipe_yaml, verbatim = recipe_text(manifest)
    kept = kept_groups(plan)
    facts = CardFacts(
        title=f"{source.name}: {recipe.scheme} ({recipe.algorithm_spec.label.split(' (')[0]}, {recipe.export})",
        source=source, arch=arch, recipe=recipe,
        quant_format=config.get("quantization_config", {}).get("format", recipe.export),
        calibration=calibration_text(manifest, recipe),
        versions=manifest.versions,
        linears=plan.counts()["linear"], quantized_modules=len(plan.quantized), quantized_params=quantized_params,
        kept=kept, other_params=plan.other_params,
        status=status, failures=validation.failures if validation else [],
        measured=measured, not_measured=not_measured, eval_text=eval_text(measured.eval) if measured else None,
        conversations_text=eval_text(measured.eval.conversations) if measured and measured.eval.conversations else None,
        weights_bytes=sizes.export_weights_bytes if sizes else manifest.sizes.export_weights_bytes,
        source_bytes=sizes.source_weights_bytes if sizes else manifest.sizes.source_bf16_bytes_estimate,
        source_measured=bool(sizes and sizes.source_measured),
        bits_per_param=sizes.bits_per_quantized_param if sizes else None,
        ref=repo_id or str(export_at or export),
        model_class="AutoModelForImageTextToText" if arch.multimodal else "AutoModelForCausalLM",
        preprocessor="AutoProcessor" if any((export / f).is_file() for f in PROCESSOR_FILES) else "AutoTokenizer",
        context=min(arch.max_positions, SUGGESTED_CONTEXT),
        recipe_yaml=recipe_yaml, recipe_verbatim=verbatim, settings=manifest.settings,
        command=quantize_command(manifest, recipe), recipe_shipped=shipped_recipe(manifest, recipe),
        license=license_facts(manifest, recipe, source),
        limitations=[],
        dropped_towers=manifest.modalities.dropped_params,
        tables={m.name: m.scheme.label for m in plan.tables},
        ple_cache=ple_cache_facts(export, plan, download=repo_id is not None),
    )
    if plan.mixed:
        facts.mix = {scheme.label: len(names) for scheme, names in plan.schemes().items()}
        facts.mix_bits = "/".join(map(str, sorted({s.bits for s in plan.schemes()}, reverse=True)))
    facts.limitations = limitations(facts, plan)
    return facts


def ple_cache_facts(export: Path, plan: Plan, download: bool) -> PLECacheFacts | None:
    """The card's PLE cache lines: 5,000 hot rows of a 262k vocabulary (a tiny one: a sixteenth of its rows)."""
    from pipeline.generate.ple_cache import HOT_IDS_FILE

    table = next((m for m in plan.modules if m.table == "per_layer"), None)
    if table is None or not (export / HOT_IDS_FILE).is_file():
        return None
    recorded = json.loads((export / HOT_IDS_FILE).read_text())
    rows = min(5000, table.shape[0] // 16)
    return PLECacheFacts(hot_rows=rows, hot_bytes=2 * rows * table.shape[1], table_bytes=table.export_bytes,
                         mixture=recorded["mixture"], tokens=recorded["tokens"], download=download)


def source_config(recipe: Recipe) -> dict:
    """The source's config as the build holds it (a GGUF export has no config.json of its own)."""
    from pipeline import text_only
    from pipeline.model import load_config, resolve

    config = load_config(resolve(recipe.model))
    return (text_only.text_only_config(config) if text_only.wanted(recipe) else config).to_dict()


def source_facts(manifest: Manifest, recipe: Recipe) -> SourceFacts:
    spec = recipe.model
    if spec.id.startswith("tiny:"):
        from pipeline.tiny import VARIANTS

        shape = VARIANTS[spec.id.removeprefix("tiny:")]
        return SourceFacts(kind="tiny", id=spec.id, revision=None, base_model=recipe.hub.base_model,
                           name=f"Tiny random {shape} (seed {spec.seed})", shape=shape)
    if manifest.source.path:  # a local folder: its name is not a Hub id, whatever it looks like
        return SourceFacts(kind="local", id=spec.id, revision=None, base_model=recipe.hub.base_model,
                           name=recipe.hub.base_model.split("/")[-1] if recipe.hub.base_model else Path(spec.id).name)
    return SourceFacts(kind="hub", id=spec.id, revision=spec.revision, base_model=recipe.hub.base_model or spec.id,
                       name=spec.id.split("/")[-1])


def architecture(config: dict, plan: Plan) -> Architecture:
    text = config.get("text_config") or config
    types = text.get("layer_types") or []
    moe = bool(text.get("enable_moe_block"))
    return Architecture(
        layers=text["num_hidden_layers"],
        sliding=types.count("sliding_attention"), full=types.count("full_attention"),
        sliding_window=text.get("sliding_window"), kv_shared_layers=text.get("num_kv_shared_layers") or 0,
        experts=text.get("num_experts") if moe else None, experts_per_token=text.get("top_k_experts") if moe else None,
        ple=bool(text.get("hidden_size_per_layer_input")),
        vision=bool(config.get("vision_config")), audio=bool(config.get("audio_config")),
        towers=any(m.component in ("vision", "audio") for m in plan.modules),
        max_positions=text["max_position_embeddings"],
        total_params=plan.total_params,
        ple_params=sum(m.params for m in plan.modules if m.component == "ple" and not m.tied_to),
    )


def kept_groups(plan: Plan) -> list[KeptGroup]:
    """What stays BF16, grouped by why (the plan's reason label), largest first."""
    groups: dict[Kept, dict] = defaultdict(lambda: {"modules": 0, "params": 0, "tied": False})
    for m in plan.modules:
        if m.quantize:
            continue
        group = groups[m.kept_because]
        group["modules"] += 1
        group["params"] += 0 if m.tied_to else m.params
        group["tied"] |= m.tied_to is not None
    return sorted((KeptGroup(label=kept, why=kept.why, **g) for kept, g in groups.items()),
                  key=lambda g: -g.params)


def measurements(run_dir: Path, manifest: Manifest) -> tuple[EvalReport | None, str | None]:
    """The validation report, or why there is none. eval.json counts only when the manifest says this
    export was validated: a report left over from an earlier export in the same run folder does not."""
    if not manifest.validation:
        return None, ("this checkpoint was not validated (quantized with `--no-validate`, or validation did not "
                      "finish), so its quality was not measured")
    path = run_dir / manifest.validation.report
    if not path.is_file():
        return None, f"the validation report ({path.name}) is missing from the run, so no numbers can be quoted"
    measured = EvalReport.model_validate_json(path.read_text())
    if measured.gguf:
        scored = [g for g in measured.gguf if g.quality]
        return measured, None if scored else "llama.cpp scored none of the GGUF files: " + "; ".join(
            f"{g.file}: {g.problem}" for g in measured.gguf)
    if measured.quality is None:
        return measured, "the export did not load cleanly in transformers: " + "; ".join(measured.load_problems)
    return measured, None


def eval_text(spec: HeldOutSpec) -> str:
    source = spec.source
    if source == "builtin" and spec.format == "messages":
        return ("gemma-quant's built-in held-out conversations (a question naming a page of the Python reference "
                "documentation, the page as the answer; never used for calibration)")
    if source == "builtin":
        return "gemma-quant's built-in held-out text (Python reference documentation; never used for calibration)"
    if source.startswith("hf:"):
        dataset = source.removeprefix("hf:")
        detail = ", ".join(x for x in (spec.config, spec.split) if x)
        return f"[{dataset}](https://huggingface.co/datasets/{dataset}) ({detail})"
    return f"a local file, `{Path(source).name}`"


def recipe_text(manifest: Manifest) -> tuple[str, bool]:
    """The recipe file as written (comments included) when it is still the one the run used,
    else the resolved recipe from the manifest."""
    path = Path(manifest.recipe_file)
    if path.is_file() and hashlib.sha256(path.read_bytes()).hexdigest() == manifest.recipe_sha256:
        return path.read_text().rstrip("\n"), True
    return yaml.safe_dump(manifest.recipe.model_dump(mode="json"), sort_keys=False).rstrip("\n"), False


def shipped_recipe(manifest: Manifest, recipe: Recipe) -> bool:
    path = Path(manifest.recipe_file)
    return path.parent.resolve() == RECIPES_DIR and path.stem == recipe.name


def quantize_command(manifest: Manifest, recipe: Recipe) -> str:
    """The command that ran, settings given on the command line included."""
    import shlex

    name = recipe.name if shipped_recipe(manifest, recipe) else recipe.name + ".yaml"
    given = [part for text in manifest.settings
             for part in (text.split(" ", 1) if text.startswith("--model ") else [text])]
    return shlex.join(["gemma-quant", "quantize", name, *given])


def source_card_metadata(manifest: Manifest, source: SourceFacts) -> tuple[dict, str]:
    """The source model's own card metadata, and what to call that card ('' when there is none)."""
    if source.kind == "tiny":
        return {}, ""
    try:
        if source.kind == "local":
            path = Path(manifest.source.path) / CARD
            if not path.is_file():
                return {}, ""
        else:
            from huggingface_hub import hf_hub_download

            # The Hub cache answers offline when the card was downloaded before.
            path = Path(hf_hub_download(source.id, CARD, revision=source.revision))
        return ModelCard.load(path, ignore_metadata_errors=True).data.to_dict(), f"the card of {source.id}"
    except Exception as err:  # offline, gated, or no card: the license stays unknown, never guessed
        log.warning("could not read the model card of %s (%s): the card's license falls back to the recipe",
                    source.id, type(err).__name__)
        return {}, ""


def license_facts(manifest: Manifest, recipe: Recipe, source: SourceFacts) -> LicenseFacts:
    data, where = source_card_metadata(manifest, source)
    language = data.get("language") or recipe.hub.language
    language = [language] if isinstance(language, str) else language
    if data.get("license"):
        return LicenseFacts(metadata={k: str(data[k]) for k in LICENSE_KEYS if data.get(k)},
                            origin=f"copied from {where}", language=language)
    if recipe.hub.license:
        why = f"{where} declares none" if where else "the source has no model card to copy it from"
        return LicenseFacts(metadata={"license": recipe.hub.license},
                            origin=f"set by the recipe (`hub.license`); {why}", language=language)
    why = f"{where} declares none" if where else {
        "tiny": "a tiny random model has no model card",
        "local": "the source folder has no README.md model card",
        "hub": f"the card of {source.id} could not be read (offline?)",
    }[source.kind]
    return LicenseFacts(metadata={}, origin=f"unknown: {why}, and the recipe sets no `hub.license`", language=language)


def limitations(facts: CardFacts, plan: Plan) -> list[str]:
    notes = []
    if facts.source.kind == "tiny":
        notes.append("Random weights: this is a tiny model built by gemma-quant to test the toolchain. "
                     "Its outputs are meaningless; use it for tests only.")
    experts = [m for m in plan.modules if m.component == "moe_experts" and not m.quantize]
    if experts:
        params = sum(m.params for m in experts)
        notes.append(f"The fused MoE experts ({len(experts)} blocks, {_params(params)} parameters, "
                     f"{params / facts.arch.total_params:.0%} of the model) are stored in BF16: RTN through "
                     "llmcompressor cannot quantize fused 3-D expert weights in a layout transformers loads, "
                     "so this checkpoint is much larger than a fully 4-bit one.")
    if plan.mixed:
        mix = ", ".join(f"{scheme.label} × {len(names)}" for scheme, names in plan.schemes().items())
        notes.append(f"Mixed precision (the recipe's `overrides:`): {mix} modules; the scheme above is the default "
                     "for modules no rule selects. Each scheme is one compressed-tensors config group.")
        notes += [f"Serving: {note}." for note in plan.serving_notes()]
    shape = next((g for g in facts.kept if g.label == "shape"), None)
    if shape:
        notes.append(f"{shape.modules} decoder linear layers stay BF16 because the scheme cannot take their input "
                     f"width (group size {facts.recipe.group_size}).")
    if facts.arch.multimodal and facts.preprocessor == "AutoTokenizer":
        notes.append("No processor files: the source folder had none, so image and audio inputs need a Gemma 4 "
                     "processor from elsewhere; text works with the tokenizer.")
    if facts.tables:
        listed = ", ".join(f"`{name}` {label}" for name, label in facts.tables.items())
        notes.append(f"Quantized token tables ({listed}), stored as compressed-tensors' packed embeddings. vLLM "
                     "dequantizes them with a Triton kernel: GPU only, its CPU build loads them but cannot run them. SGLang is "
                     "not shown: it serves compressed-tensors-quantized embeddings silently wrong "
                     "(sgl-project/sglang#36137, #38224).")
    if facts.status == "failed":
        notes.append("This checkpoint FAILED its validation (see Quality); it is published as is.")
    elif facts.not_measured:
        notes.append("Quality not measured: " + facts.not_measured + ".")
    else:
        report = facts.measured
        text, conversations = ((report.quality, report.conversations and report.conversations.quality) if report.quality
                               else next((g.quality, g.conversations) for g in report.gguf if g.quality))
        held_out = "conversations" if report.eval.format == "messages" else "text"
        notes.append(f"Quality was measured against the unquantized model on {text.tokens:,} tokens of held-out "
                     f"{held_out}" + (f" and {conversations.tokens:,} assistant tokens of held-out conversations"
                                      if conversations else "") + " only; no task benchmarks were run.")
    return notes


# ---------------------------------------------------------------- rendering


def metadata(facts: CardFacts) -> ModelCardData:
    recipe = facts.recipe
    tags = ["gemma4", "quantized", recipe.scheme.lower(), f"int{recipe.bits}", recipe.export,
            recipe.algorithm, "vllm", "gemma-quant"]
    base = facts.source.base_model
    base = {"base_model": base, "base_model_relation": "quantized"} if base else {}
    return ModelCardData(
        **base, **facts.license.metadata, language=facts.license.language, library_name="transformers",
        pipeline_tag="image-text-to-text" if facts.arch.multimodal else "text-generation", tags=tags,
    )


def _params(n: int) -> str:
    for scale, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return str(n)


def _bytes(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.2f} MB"


def _environment():
    import jinja2

    env = jinja2.Environment(loader=jinja2.FileSystemLoader(MODEL_CARDS_DIR), undefined=jinja2.StrictUndefined,
                             trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)
    env.filters.update(params=_params, bytes=_bytes, thousands=lambda n: f"{n:,}")
    return env


def render_card(run_dir: Path, repo_id: str | None = None, export_at: Path | None = None) -> ModelCard:
    facts = gather(run_dir, repo_id, export_at)
    body = _environment().get_template(TEMPLATE).render(f=facts, fmt=FORMATS[facts.recipe.export])
    return ModelCard(f"---\n{metadata(facts).to_yaml()}\n---\n\n{body}")


@holds_run_lock
def write_card(run_dir: Path, repo_id: str | None = None, export_at: Path | None = None) -> Path:
    """Write export/README.md and record its checksum in the manifest, so `publish` can tell
    the card gemma-quant wrote from one edited since. The usage snippets name `repo_id`, else the
    repo the card was last written for, else the recipe's hub.repo_id, else the export folder (`export_at`:
    where it will be, for a card written before the run moves the export into place)."""
    run_dir = Path(run_dir)
    manifest = Manifest.load(run_dir)
    repo_id = repo_id or (manifest.card and manifest.card.repo_id) or manifest.recipe.hub.repo_id
    text = str(render_card(run_dir, repo_id, export_at))
    path = run_dir / EXPORT / CARD
    path.write_text(text)
    manifest.card = CardRecord(file=f"{EXPORT}/{CARD}", repo_id=repo_id, bytes=path.stat().st_size,
                               sha256=hashlib.sha256(path.read_bytes()).hexdigest(),
                               written=datetime.now(timezone.utc).isoformat(timespec="seconds"))
    manifest.save(run_dir)
    log.info("model card written: %s", path)
    return path
