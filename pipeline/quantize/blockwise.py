"""Calibrated quantization of the text decoder, one block at a time, driven by us so that every
block is calibrated on the inputs it really receives in the full model.

Why not the libraries' own loops (measured with the pinned versions, see the project notes):
auto-round caches block 0's inputs and replays them for every block, so every block gets layer
0's Per-Layer-Embedding slice and KV-shared layers read K/V from a global store that holds the
last batch's; llmcompressor's sequential tracer hands each call site a fresh, empty shared-KV
store (`KeyError: 'sliding_attention'`). Here:

1. one plain forward per calibration batch records, for every decoder layer, the arguments the
   model itself passes it: its own PLE slice, its layer type's rotary embedding and mask;
2. blocks then run one at a time on two chains, as auto-round and GPTQ propagate error: the
   quantized chain gives each block its inputs, the unquantized chain the target outputs AutoRound
   fits (for GPTQ and optimized RTN it runs only on the few batches the block error record is
   measured on); each chain keeps one shared-KV store per batch, so a KV-shared layer reads the K/V
   its own batch wrote, through the already-quantized layers;
3. MoE experts (26B-A4B), unfused into per-expert Linears, see every calibration token while the
   block's output stays the routed one (pipeline/quantize/moe_calibration.py).

The algorithms are the libraries': auto-round's SignRound (WrapperLinear, SignSGD) and
llmcompressor's GPTQ solver. Each finished block is checkpointed, so an interrupted run resumes
at the first unfinished block.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from collections import UserDict
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from pipeline.algorithms import ALGORITHMS, BLOCK_ERROR_SAMPLES, SEARCH_CHUNK_ELEMENTS
from pipeline.allocator import trim_heap
from pipeline.compute import computing_in
from pipeline.formats import unfuse_experts
from pipeline.overrides import WeightScheme
from pipeline.plan import Plan
from pipeline.quantize.grids import QuantizedWeight, from_autoround, weight_args
from pipeline.quantize.moe_calibration import every_expert_on_every_token, expert_reconstruction
from pipeline.recipe import Recipe
from pipeline.records import BlockError

log = logging.getLogger(__name__)

# Replayed per chain instead of as recorded: the shared-KV store, and the cache (none: use_cache=False).
PER_CHAIN = ("shared_kv_states", "past_key_values")


@dataclass
class LayerInputs:
    """What the model passes one decoder layer for one batch, besides hidden states and shared KV:
    for Gemma 4 the layer's PLE slice (positional), its rotary embedding, mask and positions."""

    args: tuple
    kwargs: dict
    shares_kv: bool  # the model hands this layer a shared-KV store (Gemma 4's E-models)


@dataclass
class Calibration:
    """The recorded inputs of every layer for every batch, and the two chains' running state. A batch
    is one chain forward of `batch_size` calibration samples (the last may hold fewer): the memory
    plan's `chain_batch`."""

    inputs: list[list[LayerInputs]]  # [layer][batch]
    # [batch]: the unquantized chain's input to the current block; on the batches holding the first
    # BLOCK_ERROR_SAMPLES only where the algorithm fits no targets
    fp_hidden: list[torch.Tensor]
    q_hidden: list[torch.Tensor]  # [batch]: the quantized chain's input to the current block
    fp_kv: list[UserDict] = field(default_factory=list)  # [batch]: shared-KV store of each chain
    q_kv: list[UserDict] = field(default_factory=list)
    # What the chains compute and are kept in, when wider than the model's dtype: float32 where the
    # CPU emulates bf16 (pipeline/compute.py; a Gemma 3 270M block forward: 0.18 s in BF16, 0.03 s).
    compute: torch.dtype | None = None
    batch_size: int = 1

    def computing(self, module: torch.nn.Module):
        """`module` widened to the chains' dtype for a forward on them."""
        return computing_in(module, self.compute) if self.compute is not None else nullcontext()

    @property
    def samples(self) -> int:
        return sum(h.shape[0] for h in self.q_hidden)

    def picked(self, batches: list, samples: list[int]):
        """Calibration samples taken out of their batches (per-batch `batches`: hidden states, stores or
        recorded inputs) and joined into one batch, in the order given."""
        rows = [_row(batches[s // self.batch_size], s % self.batch_size, self.q_hidden[s // self.batch_size].shape[0])
                for s in samples]
        return _joined(rows)


def decoder_layers(model) -> tuple[str, torch.nn.ModuleList]:
    """The text decoder's layer list and its module path."""
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and name.endswith("layers") and "vision" not in name \
                and "audio" not in name and len(module) and hasattr(module[0], "self_attn"):
            return name, module
    raise ValueError("no text decoder layers found in the model")


class _StopForward(Exception):
    pass


def _passthrough(hidden_states, *args, **kwargs):
    return hidden_states


@torch.no_grad()
def record_inputs(model, layers: torch.nn.ModuleList, batches: list[torch.Tensor],
                  state_device: torch.device | None = None, compute: torch.dtype | None = None,
                  reference_batches: int | None = None) -> Calibration:
    """One plain forward per batch; each layer's pre-hook records what the model hands it (moved to
    `state_device` when given: the host, when layers are onloaded to a GPU one at a time).
    The layers pass their input through meanwhile: what the model hands a layer besides the hidden
    states (PLE slice, rotary tables, masks) does not depend on the layers before it, and the chains
    compute the hidden states. The forward stops at the last layer: nothing after it is needed. With
    `compute`, the forward and so everything recorded are in that dtype. Each of `batches` is one chain
    batch; the unquantized chain starts on the first `reference_batches` (all when None), the quantized
    chain on every batch."""
    inputs: list[list[LayerInputs]] = [[] for _ in layers]
    first_hidden: list[torch.Tensor] = []
    last = len(layers) - 1

    def hook(index):
        def record(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            kept = {k: v for k, v in kwargs.items() if k not in PER_CHAIN and k != "hidden_states"}
            if state_device is not None:
                hidden, args, kept = _to(hidden, state_device), _to(args, state_device), _to(kept, state_device)
            inputs[index].append(LayerInputs(tuple(args[1:]), kept, "shared_kv_states" in kwargs))
            if index == 0:
                first_hidden.append(hidden)
            if index == last:
                raise _StopForward
        return record

    handles = [layer.register_forward_pre_hook(hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    for layer in layers:
        layer.forward = _passthrough
    device = next(model.parameters()).device
    try:
        with computing_in(model, compute) if compute is not None else nullcontext():
            for batch in tqdm(batches, desc="recording block inputs", leave=False):
                try:
                    model(input_ids=batch.to(device), use_cache=False)
                except _StopForward:
                    pass
    finally:
        for handle in handles:
            handle.remove()
        for layer in layers:
            del layer.forward  # the class's forward again
    reference = first_hidden[:reference_batches]
    # The chains rebind their entries as they advance, never write into them: both start on the same tensors.
    return Calibration(inputs=inputs, fp_hidden=list(reference), q_hidden=first_hidden,
                       fp_kv=[UserDict() for _ in reference], q_kv=[UserDict() for _ in batches], compute=compute,
                       batch_size=batches[0].shape[0])


def _cast(value, dtype: torch.dtype):
    """Floating tensors inside `value` (tensors, tuples, dicts) cast to `dtype`."""
    if isinstance(value, torch.Tensor):
        return value.to(dtype) if value.is_floating_point() else value
    if isinstance(value, (tuple, list)):
        return type(value)(_cast(v, dtype) for v in value)
    if isinstance(value, (dict, UserDict)):
        return UserDict({k: _cast(v, dtype) for k, v in value.items()})
    return value


def _to(value, device: torch.device):
    """Tensors inside `value` (tensors, tuples, dicts, recorded inputs) moved to `device`."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, LayerInputs):
        return LayerInputs(_to(value.args, device), _to(value.kwargs, device), value.shares_kv)
    if isinstance(value, (tuple, list)):
        return type(value)(_to(v, device) for v in value)
    if isinstance(value, (dict, UserDict)):
        return type(value)({k: _to(v, device) for k, v in value.items()})
    return value


def _joined(values: list):
    """Batches' recorded values (tensors, tuples, dicts, stores, LayerInputs) joined into one batch:
    tensors with a batch dimension of one are concatenated along it, anything else is the same for
    every batch and taken from the first."""
    first = values[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(values) if first.dim() and first.shape[0] == 1 else first
    if isinstance(first, LayerInputs):
        return LayerInputs(_joined([v.args for v in values]), _joined([v.kwargs for v in values]), first.shares_kv)
    if isinstance(first, (tuple, list)):
        return type(first)(_joined(list(column)) for column in zip(*values))
    if isinstance(first, (dict, UserDict)):
        return type(first)({k: _joined([v[k] for v in values]) for k in first})
    return first


def _row(value, row: int, size: int):
    """One sample of a batch of `size` (`_joined`'s inverse): tensors whose batch dimension is `size`
    sliced to `row`, anything else (the same for every sample) as it is."""
    if size == 1:
        return value
    if isinstance(value, torch.Tensor):
        return value[row:row + 1] if value.dim() and value.shape[0] == size else value
    if isinstance(value, LayerInputs):
        return LayerInputs(_row(value.args, row, size), _row(value.kwargs, row, size), value.shares_kv)
    if isinstance(value, (tuple, list)):
        return type(value)(_row(v, row, size) for v in value)
    if isinstance(value, (dict, UserDict)):
        return type(value)({k: _row(v, row, size) for k, v in value.items()})
    return value


def move_layer_state(cal: Calibration, index: int, device: torch.device) -> None:
    """Layer `index`'s recorded inputs and both chains' running state moved to `device` (in place)."""
    cal.inputs[index] = _to(cal.inputs[index], device)
    for chain in (cal.fp_hidden, cal.q_hidden):
        chain[:] = _to(chain, device)
    for stores in (cal.fp_kv, cal.q_kv):
        for store in stores:
            store.data = {k: _to(v, device) for k, v in store.items()}


@contextmanager
def onloaded_in_turn(model, layers: torch.nn.ModuleList, device: torch.device):
    """The model's non-layer parts on `device`, each decoder layer onloaded there only for its own
    forward and offloaded back to the host after it: peak device memory is about one layer."""
    held = list(layers)
    for i in range(len(layers)):  # detached while the rest of the model moves
        layers[i] = torch.nn.Identity()
    model.to(device)
    for i, layer in enumerate(held):
        layers[i] = layer
    def onload(module, args) -> None:
        module.to(device)

    def offload(module, args, output) -> None:
        module.to("cpu")

    handles = [h for layer in held for h in (layer.register_forward_pre_hook(onload),
                                              layer.register_forward_hook(offload))]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        model.to("cpu")


def run_layer(layer, hidden: torch.Tensor, recorded: LayerInputs, kv_store) -> torch.Tensor:
    shared = {"shared_kv_states": kv_store} if recorded.shares_kv else {}
    out = layer(hidden, *recorded.args, **recorded.kwargs, **shared)
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def advance(layer, index: int, cal: Calibration, chain: str) -> None:
    """Run one chain through `layer`; storing layers write their K/V into that batch's store."""
    hidden, stores = (cal.fp_hidden, cal.fp_kv) if chain == "fp" else (cal.q_hidden, cal.q_kv)
    with cal.computing(layer):
        for b in range(len(hidden)):
            hidden[b] = run_layer(layer, hidden[b], cal.inputs[index][b], stores[b])


# ---------------------------------------------------------------- algorithms


def rtn_qparams(weight: torch.Tensor, scheme: WeightScheme) -> tuple[torch.Tensor, torch.Tensor]:
    """compressed-tensors' min/max scale and zero point for a weight, per group or channel."""
    from compressed_tensors.quantization.utils import calculate_qparams

    rows, cols = weight.shape
    groups = weight.reshape(rows, cols // (scheme.group_size or cols), -1)
    return calculate_qparams(groups.amin(-1), groups.amax(-1), weight_args(scheme))


def searched_qparams(weight: torch.Tensor, scheme: WeightScheme, importance: torch.Tensor,
                     chunk_elements: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """auto-round's optimized-RTN scale per group or channel (llama.cpp's `make_qx_quants` search over
    scales around max|w| / 2^(b-1)), minimising the reconstruction error weighted per input channel by
    `importance`, the calibration activations' mean square (llama.cpp's imatrix). Symmetric only; the
    scale is signed, so a group's largest-magnitude weight lands on the -2^(b-1) end, as in auto-round
    and llama.cpp. Returned rounded to the weight's dtype, the scale compressed-tensors will store, with
    compressed-tensors' zero point. `chunk_elements`: the most weights searched at once (default: the
    memory plan's for the weight's device)."""
    from auto_round.data_type.int import quant_tensor_opt_rtn_sym

    if not scheme.symmetric:
        raise ValueError("the importance-weighted scale search is symmetric only (auto-round's "
                         "quant_tensor_opt_rtn_sym)")
    # auto-round's search sweeps the weight 200 times, a dozen temporaries its size each time. Every group
    # is searched on its own: row chunks give the same scales (pipeline/algorithms.py, SEARCH_CHUNK_ELEMENTS).
    chunk_elements = chunk_elements or SEARCH_CHUNK_ELEMENTS["cpu" if weight.device.type == "cpu" else "gpu"]
    chunk_rows = max(1, chunk_elements // weight.shape[1])
    scale = torch.cat([quant_tensor_opt_rtn_sym(chunk.float(), bits=scheme.bits, group_size=scheme.group_size or -1,
                                                imatrix=importance.float())[1].reshape(chunk.shape[0], -1)
                       for chunk in weight.split(chunk_rows)]).to(weight.dtype)
    return scale, torch.zeros(scale.shape, dtype=torch.int8)


_AUTOROUND_ATTRS = ("bits", "group_size", "sym", "data_type", "act_bits", "act_data_type", "act_sym", "act_dynamic",
                    "scale_dtype", "scale", "zp", "iters", "w_zp", "w_scale", "tuning_device")


def autoround_block(layer, targets: dict[str, torch.nn.Linear], index: int, cal: Calibration,
                    fp_out: list[torch.Tensor], recipe: Recipe,
                    schemes: dict[str, WeightScheme]) -> dict[str, QuantizedWeight]:
    """auto-round's SignRound on one block: learn rounding offsets (and min/max scale factors)
    that make the quantized block reproduce the unquantized block's outputs."""
    from auto_round.algorithms.quantization.sign_round.sign_sgd import SignSGD
    from auto_round.wrapper import WrapperLinear, unwrapper_block

    options = recipe.autoround
    lr = options.lr or 1.0 / options.iters
    dtype = next(layer.parameters()).dtype
    layer.float()  # tuning runs in float32; the block returns to its dtype once quantized
    # Only the rounding offsets and scale factors learn, as auto-round freezes the model's own parameters:
    # a gradient for every weight of the block cost 10 % of the backward (benchmarks/RESULTS.md, profile).
    learning = [p for p in layer.parameters() if p.requires_grad]
    for p in learning:
        p.requires_grad_(False)
    inputs = [LayerInputs(_cast(r.args, torch.float32), _cast(r.kwargs, torch.float32), r.shares_kv)
              for r in cal.inputs[index]]
    wrapped = {}
    for name, module in layer.named_modules():
        if isinstance(module, torch.nn.Linear):
            # The attributes auto-round's layer config would set (removed again below);
            # kept modules stay 16-bit.
            scheme = schemes.get(name)
            module.bits = scheme.bits if name in targets else 16
            module.group_size = scheme.group_size or -1 if scheme else -1
            module.sym, module.data_type = scheme.symmetric if scheme else True, "int"
            module.act_bits, module.act_data_type, module.act_sym, module.act_dynamic = 16, "float", True, True
            module.scale_dtype = torch.float32
    for name, module in targets.items():
        wrapper = WrapperLinear(module, enable_minmax_tuning=options.minmax_tuning, device=module.weight.device,
                                enable_torch_compile=False, iters=options.iters)
        layer.set_submodule(name, wrapper)
        wrapped[name] = wrapper
    params = [p for w in wrapped.values() for key, p in w.params.items() if key == "value"]
    minmax = [p for w in wrapped.values() for key, p in w.params.items() if key != "value"]
    groups = [{"params": params}] + ([{"params": minmax}] if minmax else [])
    optimizer = SignSGD(groups, lr=lr, weight_decay=0)
    schedule = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=1.0, end_factor=0.0, total_iters=options.iters)
    rng = random.Random(index)
    samples = cal.samples
    best_loss, best = float("inf"), {}
    with expert_reconstruction(layer) as expert_errors:
        for _ in range(options.iters):
            picked = rng.sample(range(samples), min(options.batch_size, samples))
            optimizer.zero_grad()
            # One forward of the picked batches joined, as auto-round's own loop: per-batch forwards and
            # backwards cost far more (benchmarks/RESULTS.md, the block driver's profile). A storing layer
            # writes its K/V into the joined store, never into the chain's.
            hidden = cal.picked(cal.q_hidden, picked).float()
            store = _cast(cal.picked(cal.q_kv, picked), torch.float32)
            expert_errors.clear()
            pred = run_layer(layer, hidden, cal.picked(inputs, picked), store)
            sample_loss = torch.nn.functional.mse_loss(pred, cal.picked(fp_out, picked).float())
            if expert_errors:  # MoE: every expert's own error over all tokens (moe_calibration)
                sample_loss = sample_loss + torch.stack(expert_errors).mean()
            sample_loss.backward()
            loss = sample_loss.item()
            if loss < best_loss:
                best_loss = loss
                best = {name: {k: p.detach().clone() for k, p in w.params.items()} for name, w in wrapped.items()}
            optimizer.step()
            schedule.step()
    unwrapper_block(layer, best)
    for p in learning:
        p.requires_grad_(True)
    layer.to(dtype)
    results = {}
    for name, module in targets.items():
        results[name] = from_autoround(module.weight, module.scale, getattr(module, "zp", None), schemes[name],
                                       module.weight.dtype)
        module.weight.data = results[name].weight  # shared, as in the other solvers (gptq_block)
    for module in layer.modules():
        for attr in _AUTOROUND_ATTRS:
            if isinstance(module, torch.nn.Linear) and attr in module.__dict__:
                delattr(module, attr)
    log.debug("block %d: best loss %.6g", index, best_loss)
    return results


@torch.no_grad()
def input_statistics(layer, targets: dict[str, torch.nn.Linear], index: int, cal: Calibration,
                     accumulate, start) -> dict:
    """Per target, `accumulate(x, module, state)` folded over every input the target sees when the
    quantized chain runs through the block (the inputs GPTQ's Hessian and the imatrix are taken on)."""
    state = {name: start(module) for name, module in targets.items()}

    def hook(name):
        def observe(module, args):
            state[name] = accumulate(args[0], module, state[name])
        return observe

    handles = [module.register_forward_pre_hook(hook(name)) for name, module in targets.items()]
    try:
        with cal.computing(layer):
            for b in range(len(cal.q_hidden)):
                run_layer(layer, cal.q_hidden[b], cal.inputs[index][b], UserDict(cal.q_kv[b]))
    finally:
        for handle in handles:
            handle.remove()
    return state


def _sum_of_squares(x: torch.Tensor, module, state):
    total, count = state
    rows = x.detach().float().reshape(-1, x.shape[-1])
    return total + rows.pow(2).sum(0), count + rows.shape[0]


@torch.no_grad()
def opt_rtn_block(layer, targets: dict[str, torch.nn.Linear], index: int, cal: Calibration,
                  fp_out: list[torch.Tensor], recipe: Recipe,
                  schemes: dict[str, WeightScheme]) -> dict[str, QuantizedWeight]:
    """auto-round's optimized RTN on one block: each weight rounded on the scale that minimises its
    reconstruction error weighted by the mean square of the inputs it receives in the quantized chain."""
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize

    stats = input_statistics(layer, targets, index, cal, _sum_of_squares,
                             lambda m: (torch.zeros(m.in_features, device=m.weight.device), 0))
    results = {}
    for name, module in targets.items():
        total, count = stats[name]
        scale, zero_point = searched_qparams(module.weight.data, schemes[name], total / max(count, 1))
        module.weight.data = fake_quantize(module.weight.data, scale, zero_point, weight_args(schemes[name]))
        results[name] = QuantizedWeight(module.weight.data, scale, zero_point)  # shared, as in gptq_block
    return results


@torch.no_grad()
def gptq_block(layer, targets: dict[str, torch.nn.Linear], index: int, cal: Calibration,
               fp_out: list[torch.Tensor], recipe: Recipe,
               schemes: dict[str, WeightScheme]) -> dict[str, QuantizedWeight]:
    """llmcompressor's GPTQ solver on one block, with Hessians from the quantized chain's inputs, on
    the recipe's starting grid: compressed-tensors' min/max, or the importance-weighted scale search
    with the Hessian's diagonal as the importance."""
    from llmcompressor.modifiers.gptq.gptq_quantize import quantize_weight
    from llmcompressor.modifiers.gptq.helpers import accumulate_hessian, make_empty_hessian

    stats = input_statistics(layer, targets, index, cal, lambda x, m, s: accumulate_hessian(x, m, *s),
                             lambda m: (make_empty_hessian(m), torch.zeros(())))
    results = {}
    for name, module in targets.items():
        hessian, count = stats[name]
        hessian = hessian / count
        args = weight_args(schemes[name]).model_copy(update={"actorder": recipe.gptq.actorder})
        scale, zero_point = (searched_qparams(module.weight.data, schemes[name], torch.diagonal(hessian))
                             if recipe.gptq.grid == "imatrix" else rtn_qparams(module.weight.data, schemes[name]))
        quantized, _, _ = quantize_weight(
            weights=module.weight.data.float().unsqueeze(0), hessians=hessian.unsqueeze(0),
            scale=scale.unsqueeze(0), zero_point=zero_point.unsqueeze(0), global_scale=None, quant_args=args,
            blocksize=recipe.gptq.block_size, percdamp=recipe.gptq.dampening,
        )
        module.weight.data = quantized[0].to(module.weight.dtype)
        # The grid shares the module's new weight, which nothing changes in place: a copy of every quantized
        # weight held to the end of the pass was the decoder's size again (benchmarks/RESULTS.md, memory plan).
        results[name] = QuantizedWeight(module.weight.data, scale, zero_point)
    return results


BLOCK_SOLVERS = {"autoround": autoround_block, "gptq": gptq_block, "opt-rtn": opt_rtn_block}  # the calibrated algorithms the driver runs


def _per_sample_mean(errors: list[float], batches: list[torch.Tensor]) -> float:
    """The mean over samples of per-batch mean errors (batches may differ in size)."""
    return sum(e * b.shape[0] for e, b in zip(errors, batches)) / sum(b.shape[0] for b in batches)


def chain_error(cal: Calibration) -> float:
    """Mean squared error of the quantized chain against the unquantized one, once both are advanced
    through the same block, on the batches the unquantized chain runs: the block's output error, which
    the calibrated algorithms minimise."""
    return _per_sample_mean([torch.nn.functional.mse_loss(q.float(), fp.float()).item()
                             for q, fp in zip(cal.q_hidden, cal.fp_hidden)], cal.fp_hidden)


@torch.no_grad()
def rtn_error(layer, targets: dict[str, torch.nn.Linear], index: int, cal: Calibration,
              schemes: dict[str, WeightScheme]) -> float:
    """The block's output error with plain RTN weights (compressed-tensors' min/max grid), as the
    baseline, on the batches the unquantized chain runs; cal.fp_hidden is already advanced through the
    block, the quantized chain is not."""
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize

    originals = {name: module.weight.data for name, module in targets.items()}
    for name, module in targets.items():
        scale, zero_point = rtn_qparams(module.weight.data, schemes[name])
        module.weight.data = fake_quantize(module.weight.data, scale, zero_point, weight_args(schemes[name]))
    errors = []
    try:
        with cal.computing(layer):
            for b, reference in enumerate(cal.fp_hidden):
                out = run_layer(layer, cal.q_hidden[b], cal.inputs[index][b], UserDict(cal.q_kv[b]))
                errors.append(torch.nn.functional.mse_loss(out.float(), reference.float()).item())
    finally:
        for name, module in targets.items():
            module.weight.data = originals[name]
    return _per_sample_mean(errors, cal.fp_hidden)


# ---------------------------------------------------------------- driver


def checkpoint_key(recipe: Recipe, calibration_sha: str, compute: torch.dtype | None = None,
                   chain_batch: int = 1) -> str:
    settings = {"model": recipe.model.model_dump(), "scheme": recipe.scheme, "group_size": recipe.group_size,
                "symmetric": recipe.symmetric, "algorithm": recipe.algorithm, "skip": recipe.skip,
                "options": recipe.algorithm_options and recipe.algorithm_options.model_dump(), "calibration": calibration_sha}
    if recipe.overrides:  # only then: keys of recipes without overrides stay as they were
        settings["overrides"] = [rule.model_dump() for rule in recipe.overrides]
    if recipe.quantize_experts:
        settings["quantize_experts"] = True
    if compute is not None:  # chains computed in float32 give other grids than BF16 chains
        settings["chain_compute"] = str(compute)
    if chain_batch != 1:  # wider matmuls may round differently
        settings["chain_batch"] = chain_batch
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def save_checkpoint(path: Path, block: dict[str, QuantizedWeight], error: BlockError) -> None:
    """One finished block's grids and error, as tensors and plain data (so resuming needs no pickle)."""
    grids = {name: {"weight": q.weight, "scale": q.scale, "zero_point": q.zero_point} for name, q in block.items()}
    torch.save({"grids": grids, "error": error.model_dump()}, path.with_suffix(".tmp"))
    path.with_suffix(".tmp").rename(path)


def load_checkpoint(path: Path) -> tuple[dict[str, QuantizedWeight], BlockError]:
    saved = torch.load(path, weights_only=True)  # tensors and plain data only: the run dir may be shared
    return ({name: QuantizedWeight(**grid) for name, grid in saved["grids"].items()},
            BlockError.model_validate(saved["error"]))


@dataclass
class BlockwiseResult:
    grids: dict[str, QuantizedWeight]
    block_errors: list[BlockError]  # per block: output MSE with RTN weights and with the algorithm's
    resumed_blocks: list[int]  # blocks read back from an interrupted run's checkpoints
    error_batches: int  # calibration samples the block errors are measured on


def quantize_blockwise(model, plan: Plan, recipe: Recipe, tokens: torch.Tensor, checkpoint_dir: Path,
                       calibration_sha: str, onload: torch.device | None = None,
                       compute: torch.dtype | None = None, chain_batch: int = 1) -> BlockwiseResult:
    """Quantize every planned module of the text decoder, block by block; returns each module's grid
    and each block's error against RTN's. Finished blocks are saved under `checkpoint_dir`; a rerun
    with the same settings resumes at the first unfinished block. With `onload` (a GPU the model does
    not fit on), the model stays on the host and each block is onloaded to `onload` in turn, with its
    recorded inputs and the chains' state; grids and state go back to the host after each block.
    With `compute` (float32 where the CPU emulates bf16), the recording pass and both chains compute
    in it; the algorithms and the grids they return are as in the model's own dtype. The chains run
    `chain_batch` samples per forward (the memory plan's)."""
    prefix, layers = decoder_layers(model)
    planned = {m.name: m.scheme for m in plan.quantized}
    outside = sorted(n for n in planned if not n.startswith(prefix + "."))
    if outside:
        raise ValueError(f"calibrated algorithms quantize the text decoder only; the plan also quantizes {outside[:3]}")
    if any(m.component == "moe_experts" for m in plan.quantized):
        unfuse_experts(model)  # per-expert Linears: what the algorithms tune and the packed exports store
    with every_expert_on_every_token(model):
        saved_dir = checkpoint_dir / checkpoint_key(recipe, calibration_sha, compute, chain_batch)
        return _quantize_blocks(model, prefix, layers, planned, recipe, saved_dir, tokens, onload, compute,
                                chain_batch)


def _quantize_blocks(model, prefix: str, layers: torch.nn.ModuleList, planned: dict[str, WeightScheme],
                     recipe: Recipe, saved_dir: Path, tokens: torch.Tensor, onload: torch.device | None,
                     compute: torch.dtype | None, chain_batch: int) -> BlockwiseResult:
    """quantize_blockwise's loop over the decoder layers, MoE experts already set to see every token."""
    saved_dir.mkdir(parents=True, exist_ok=True)
    host = torch.device("cpu") if onload is not None else None
    with onloaded_in_turn(model, layers, onload) if onload is not None else nullcontext():
        # the batches that hold the first BLOCK_ERROR_SAMPLES samples
        reference = None if ALGORITHMS[recipe.algorithm].fits_block_outputs else -(-BLOCK_ERROR_SAMPLES // chain_batch)
        cal = record_inputs(model, layers, list(tokens.split(chain_batch)), state_device=host, compute=compute,
                            reference_batches=reference)
    results: dict[str, QuantizedWeight] = {}
    errors: list[dict] = []
    resumed_blocks: list[int] = []
    progress = tqdm(range(len(layers)), desc=f"{recipe.algorithm} blocks", unit="block")
    for index in progress:
        layer, layer_prefix = layers[index], f"{prefix}.{index}."
        if onload is not None:
            layer.to(onload)
            move_layer_state(cal, index, onload)
        targets = {n[len(layer_prefix):]: model.get_submodule(n) for n in sorted(planned) if n.startswith(layer_prefix)}
        schemes = {n[len(layer_prefix):]: s for n, s in planned.items() if n.startswith(layer_prefix)}
        advance(layer, index, cal, "fp")  # the unquantized chain, before the weights change
        saved = saved_dir / f"block-{index:03d}.pt"
        resumed = saved.is_file()
        if resumed:
            block, error = load_checkpoint(saved)
            for name, q in block.items():  # onto the layer's device: a GPU when it is onloaded or spread
                weight = targets[name].weight
                targets[name].weight.data = q.weight.to(device=weight.device, dtype=weight.dtype)
            log.info("block %d: resumed from %s", index, saved)
            resumed_blocks.append(index)
        elif targets:
            baseline = rtn_error(layer, targets, index, cal, schemes)
            block = BLOCK_SOLVERS[recipe.algorithm](layer, targets, index, cal, cal.fp_hidden, recipe, schemes)
        else:
            block, error = {}, BlockError(block=index, rtn_mse=None, mse=None)
        advance(layer, index, cal, "q")  # the quantized chain, through the block's new weights
        if targets and not resumed:
            error = BlockError(block=index, rtn_mse=baseline, mse=chain_error(cal))
            save_checkpoint(saved, block, error)
        progress.set_postfix(mse=error.mse, rtn=error.rtn_mse)
        if onload is not None:
            layer.to(host)
            move_layer_state(cal, index, host)
            # the grids share the offloaded weights, as on the host (gptq_block)
            block = {name: QuantizedWeight(targets[name].weight.data, *_to((q.scale, q.zero_point), host))
                     for name, q in block.items()}
        results.update({layer_prefix + name: q for name, q in block.items()})
        errors.append(error)
        trim_heap()  # what the block's solver freed, back to the system before the next block
    return BlockwiseResult(results, errors, resumed_blocks, sum(h.shape[0] for h in cal.fp_hidden))
