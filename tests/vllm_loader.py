"""Run by the vLLM interpreter (its own venv: `make vllm-setup`), not collected by pytest: builds vLLM's
model for an export folder and loads every weight through vLLM's own loader, without a forward (vLLM's
CPU build has no kernel for packed embedding tables), with vLLM's own check that every parameter came
from the checkpoint (`enable_weights_track`, which vLLM leaves off for quantized models by default).
With `--draft DRAFTER`, builds and loads the drafter (`gemma4_assistant`, which vLLM runs as `gemma4_mtp` beside
`folder`, its target) instead. Prints one line, `RESULT {json}`: for every parameter and buffer, its dtype, shape, its module's quantization
method and the sha256 of its bytes. A name or shape vLLM does not register, or a parameter the
checkpoint does not fill, fails here with vLLM's own error, as it would on a GPU."""

import hashlib
import json
import socket
import sys


def load(folder: str, draft: str | None = None) -> dict:
    import torch
    from vllm.config import set_current_vllm_config
    from vllm.distributed import init_distributed_environment, initialize_model_parallel
    from vllm.engine.arg_utils import EngineArgs
    from vllm.model_executor.model_loader import get_model_loader
    from vllm.utils.torch_utils import set_default_torch_dtype

    speculative = {"method": "mtp", "model": draft, "num_speculative_tokens": 1} if draft else None
    config = EngineArgs(model=folder, dtype="bfloat16", max_model_len=128, enforce_eager=True,
                        speculative_config=speculative,
                        model_loader_extra_config={"enable_weights_track": True}).create_engine_config()
    model_config = config.speculative_config.draft_model_config if draft else config.model_config
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with set_current_vllm_config(config):
        init_distributed_environment(world_size=1, rank=0, local_rank=0, backend="gloo",
                                     distributed_init_method=f"tcp://127.0.0.1:{port}")
        initialize_model_parallel(1, 1)
        # get_model() minus its accelerator cache flush and kernel repacking, which need a GPU
        loader = get_model_loader(config.load_config)
        with set_default_torch_dtype(model_config.dtype), torch.device("cpu"):
            model = loader.create_model(vllm_config=config, model_config=model_config)
        loader.load_weights(model, model_config)
    result = {}
    # buffers too: some checkpoint tensors load into them (Gemma 4's layer_scalar); others are vLLM's own
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        owner = model.get_submodule(name.rpartition(".")[0])
        data = tensor.detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes()
        method = type(getattr(owner, "quant_method", None)).__name__ if isinstance(tensor, torch.nn.Parameter) else "buffer"
        result[name] = {"dtype": str(tensor.dtype).removeprefix("torch."), "shape": list(tensor.shape),
                        "method": method, "sha256": hashlib.sha256(data).hexdigest()}
    return result


if __name__ == "__main__":
    print("RESULT " + json.dumps(load(sys.argv[1], sys.argv[3] if sys.argv[2:3] == ["--draft"] else None)))
