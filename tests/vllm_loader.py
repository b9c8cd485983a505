"""Run by the vLLM interpreter (its own venv: `make vllm-setup`), not collected by pytest: builds vLLM's
model for an export folder and loads every weight through vLLM's own loader, without a forward (vLLM's
CPU build has no kernel for packed embedding tables). Prints one line, `RESULT {json}`: for each
parameter of the token tables and the head, its dtype, shape, quantization method and sha256.
A name or shape vLLM does not register fails here with vLLM's own error, as it would on a GPU."""

import hashlib
import json
import socket
import sys

TABLES = ("embed_tokens", "lm_head")


def load(folder: str) -> dict:
    import torch
    from vllm.config import set_current_vllm_config
    from vllm.distributed import init_distributed_environment, initialize_model_parallel
    from vllm.engine.arg_utils import EngineArgs
    from vllm.model_executor.model_loader import get_model_loader
    from vllm.utils.torch_utils import set_default_torch_dtype

    config = EngineArgs(model=folder, dtype="bfloat16", max_model_len=128, enforce_eager=True).create_engine_config()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with set_current_vllm_config(config):
        init_distributed_environment(world_size=1, rank=0, local_rank=0, backend="gloo",
                                     distributed_init_method=f"tcp://127.0.0.1:{port}")
        initialize_model_parallel(1, 1)
        # get_model() minus its accelerator cache flush and kernel repacking, which need a GPU
        loader = get_model_loader(config.load_config)
        with set_default_torch_dtype(config.model_config.dtype), torch.device("cpu"):
            model = loader.create_model(vllm_config=config, model_config=config.model_config)
        loader.load_weights(model, config.model_config)
    result = {}
    for name, param in model.named_parameters():
        if any(table in name for table in TABLES):
            owner = model.get_submodule(name.rpartition(".")[0])
            data = param.detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes()
            result[name] = {"dtype": str(param.dtype).removeprefix("torch."), "shape": list(param.shape),
                            "method": type(getattr(owner, "quant_method", None)).__name__,
                            "sha256": hashlib.sha256(data).hexdigest()}
    return result


if __name__ == "__main__":
    print("RESULT " + json.dumps(load(sys.argv[1])))
