"""MoE experts in the calibrated passes: every expert sees every calibration token.

A router sends each token to a few experts (26B-A4B: 8 of 128), so on a calibration set some experts
get few tokens or none. Calibrating only on routed tokens leaves such experts badly served: GPTQ's
Hessian of an expert that saw no token is empty (llmcompressor's solver then zeroes its columns), and
SignRound's block loss gives it no gradient, so it stays at plain rounding.

During the calibrated pass the experts (unfused into per-expert Linears, the layout the packed
exports store) therefore run with a forward that feeds every token to every expert, and combines
the outputs with the router's weights, which are zero for the experts a token was not routed to:
the block's output is the model's own (only the summation order differs), so both calibration
chains stay true, while every expert's Linears see the block's whole input distribution — the
approach of llmcompressor's `calibrate_all_experts`. GPTQ builds every expert's Hessian from all
tokens; SignRound adds to the block's output error each expert's own output error over all tokens
(`expert_reconstruction`), so rarely routed experts are tuned too. Cost: the experts' share of
calibration compute grows by experts / top-k (16x on 26B-A4B); inference is unchanged.
"""

from __future__ import annotations

from contextlib import contextmanager
from types import MethodType
from typing import Iterator

import torch

_ERRORS = "expert_reconstruction_errors"


def unfused_experts(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The MoE experts modules that were unfused into per-expert Linears (auto-round's unfusing)."""
    return [m for m in model.modules() if getattr(m, "_unfused_experts", False)]


def _expert_output(experts: torch.nn.Module, index: int, tokens: torch.Tensor, original: bool = False) -> torch.Tensor:
    """One expert's output on `tokens`; `original`: with the unquantized weights of a wrapped
    (being tuned) Linear, auto-round's WrapperLinear keeping them on its `orig_layer`."""
    expert = getattr(experts, str(index))

    def project(name: str, inputs: torch.Tensor) -> torch.Tensor:
        linear = getattr(expert, name)
        return (getattr(linear, "orig_layer", linear) if original else linear)(inputs)

    gate, up = project("gate_proj", tokens), project("up_proj", tokens)
    gated = experts._apply_gate(torch.cat([gate, up], dim=-1)) if hasattr(experts, "_apply_gate") \
        else experts.act_fn(gate) * up
    return project("down_proj", gated)


def every_token_forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                        top_k_weights: torch.Tensor) -> torch.Tensor:
    """The experts' forward with every token through every expert; each output weighted by the
    router's weight for that expert, zero where the token was not routed to it."""
    tokens = hidden_states.reshape(-1, hidden_states.shape[-1])
    index = top_k_index.reshape(tokens.shape[0], -1)
    weights = top_k_weights.reshape(tokens.shape[0], -1)
    errors = self.__dict__.get(_ERRORS)
    combined = torch.zeros_like(tokens)
    for expert in range(self.num_experts):
        output = _expert_output(self, expert, tokens)
        routed = (weights * (index == expert)).sum(-1, keepdim=True).to(output.dtype)
        combined = combined + (output * routed).to(combined.dtype)
        if errors is not None:
            with torch.no_grad():
                target = _expert_output(self, expert, tokens, original=True)
            errors.append(torch.nn.functional.mse_loss(output.float(), target.float()))
    return combined.view_as(hidden_states)


@contextmanager
def every_expert_on_every_token(model: torch.nn.Module) -> Iterator[list[torch.nn.Module]]:
    """The model's unfused experts run `every_token_forward` inside the block; restored after."""
    modules = unfused_experts(model)
    for module in modules:
        module.forward = MethodType(every_token_forward, module)
    try:
        yield modules
    finally:
        for module in modules:
            del module.forward


@contextmanager
def expert_reconstruction(layer: torch.nn.Module) -> Iterator[list[torch.Tensor]]:
    """While active, each forward of `layer`'s experts (in `every_token_forward`) appends every
    expert's output error against its unquantized weights, over all tokens, to the yielded list."""
    errors: list[torch.Tensor] = []
    modules = unfused_experts(layer)
    for module in modules:
        setattr(module, _ERRORS, errors)
    try:
        yield errors
    finally:
        for module in modules:
            delattr(module, _ERRORS)
