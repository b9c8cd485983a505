"""Calibrated passes (GPTQ, AutoRound) over 26B-A4B's MoE experts: every expert sees every token,
while each block's output stays the model's own."""

import json

import pytest
import torch
from compressed_tensors.quantization.lifecycle.forward import fake_quantize
from transformers.models.gemma4.modeling_gemma4 import Gemma4TextRouter

from conftest import read_tensors
from pipeline.formats import unfuse_experts
from pipeline.quantize import blockwise
from pipeline.quantize.grids import weight_args
from pipeline.quantize.moe_calibration import every_expert_on_every_token
from pipeline.run import quantize_run

from test_blockwise import _setup

NEVER_ROUTED = 0


@pytest.fixture
def router_never_picks_expert_0(monkeypatch):
    """A router that never sends a token to expert 0: the extreme of a rarely routed expert."""
    def forward(self, hidden_states):
        normed = self.norm(hidden_states) * self.scale * self.scalar_root_size
        probabilities = torch.softmax(self.proj(normed), dim=-1, dtype=torch.float32)
        never = torch.arange(probabilities.shape[-1]) == NEVER_ROUTED
        weights, index = torch.topk(probabilities.masked_fill(never, 0), k=self.config.top_k_experts, dim=-1)
        weights = weights / weights.sum(dim=-1, keepdim=True) * self.per_expert_scale[index]
        return probabilities, weights, index

    monkeypatch.setattr(Gemma4TextRouter, "forward", forward)


def _moe_setup(algorithm: str, **options):
    # group 64: the tiny experts' down_proj reads 64 features, so all three projections are quantized
    return _setup("26b-a4b", algorithm, quantize_experts=True, export="gptq", group_size=64, **options)


def test_every_token_forward_gives_the_routed_output():
    _, _, model, tokens = _moe_setup("gptq")
    model.float()
    with torch.no_grad():
        fused = model(input_ids=tokens).logits
        unfuse_experts(model)
        routed = model(input_ids=tokens).logits
        with every_expert_on_every_token(model) as experts:
            every_token = model(input_ids=tokens).logits
        assert len(experts) == model.config.text_config.num_hidden_layers
        restored = model(input_ids=tokens).logits
    assert torch.allclose(routed, fused, atol=1e-4)
    assert torch.allclose(every_token, routed, atol=1e-4)
    assert torch.equal(restored, routed)


def _expert_output(weights: dict[str, torch.Tensor], tokens: torch.Tensor, act) -> torch.Tensor:
    gate, up = tokens @ weights["gate_proj"].float().T, tokens @ weights["up_proj"].float().T
    return (act(gate) * up) @ weights["down_proj"].float().T


def _never_routed_expert_errors(algorithm: str, options: dict, tmp_path) -> dict[str, float]:
    """Output error, over the tokens the layer-0 experts receive, of the never-routed expert 0 as the
    pass quantized it and with plain rounding (compressed-tensors' min/max grid)."""
    recipe, plan, model, tokens = _moe_setup(algorithm, **options)
    _, layers = blockwise.decoder_layers(model)
    experts = layers[0].experts
    gate, up = experts.gate_up_proj[NEVER_ROUTED].detach().float().chunk(2, dim=0)
    original = {"gate_proj": gate, "up_proj": up, "down_proj": experts.down_proj[NEVER_ROUTED].detach().float()}
    blockwise.quantize_blockwise(model, plan, recipe, tokens, tmp_path, "sha")
    expert = getattr(experts, str(NEVER_ROUTED))
    quantized = {name: getattr(expert, name).weight.detach() for name in original}
    scheme = next(m.scheme for m in plan.quantized if m.component == "moe_experts")
    assert {m.submodule for m in plan.quantized if m.component == "moe_experts"} == set(original)
    rounded = {}
    for name, weight in original.items():
        scale, zero_point = blockwise.rtn_qparams(weight, scheme)
        rounded[name] = fake_quantize(weight, scale, zero_point, weight_args(scheme))

    seen = []
    handle = experts.register_forward_pre_hook(lambda module, args: seen.append(args[0].float()))
    with torch.no_grad():
        model(input_ids=tokens)
    handle.remove()
    inputs = torch.cat(seen)
    target = _expert_output(original, inputs, experts.act_fn)
    return {label: torch.nn.functional.mse_loss(_expert_output(w, inputs, experts.act_fn), target).item()
            for label, w in (("quantized", quantized), ("rtn", rounded))}


@pytest.mark.parametrize("algorithm, options", [("gptq", {}), ("autoround", {"autoround": {"iters": 12, "batch_size": 3}})])
def test_an_expert_the_router_never_picks_is_calibrated(algorithm, options, router_never_picks_expert_0, tmp_path):
    # GPTQ would build an empty Hessian for it (the solver then zeroes its columns) and SignRound would
    # give it no gradient: both only see it through every token reaching every expert.
    errors = _never_routed_expert_errors(algorithm, options, tmp_path)
    assert errors["quantized"] < 0.9 * errors["rtn"], errors


@pytest.mark.slow
def test_calibrated_moe_export_reloads_with_experts_quantized(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text("model: tiny:26b-a4b\nscheme: W4A16\ngroup_size: 64\nalgorithm: gptq\nquantize_experts: true\n"
                    "export: gptq\ncalibration: {samples: 4, seq_len: 64}\n"
                    f"output_dir: {tmp_path / 'run'}\neval: {{samples: 2, seq_len: 64, max_new_tokens: 2}}\n")
    manifest = quantize_run(path)
    assert manifest.status == "validated"
    assert manifest.reload.missing_keys == [] and manifest.reload.unexpected_keys == []
    errors = manifest.quantize_report.block_errors
    assert sum(e.mse for e in errors) < sum(e.rtn_mse for e in errors)
    stored = read_tensors(tmp_path / "run" / "export")
    experts = [k for k in stored if ".experts." in k and k.endswith(".qweight")]
    config = json.loads((tmp_path / "run" / "export" / "config.json").read_text())["text_config"]
    assert len(experts) == config["num_hidden_layers"] * config["num_experts"] * 3
    assert all(stored[k].dtype == torch.int32 for k in experts)
    card = (tmp_path / "run" / "export" / "README.md").read_text()
    assert "The experts are quantized too, stored per expert; the router stays BF16." in card
    assert "every expert, however rarely routed, was calibrated on every calibration token" in card
