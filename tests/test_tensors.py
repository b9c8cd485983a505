"""The one safetensors reader (pipeline/tensors.py): headers without data, tensors by name, renames,
and truncated files named rather than raised from the middle of a check."""

import json
import struct

import pytest
import torch
from safetensors.torch import save_file

from pipeline.tensors import StoredTensors, why_unreadable


@pytest.fixture
def folder(tmp_path):
    save_file({"a.weight": torch.arange(6, dtype=torch.bfloat16).reshape(2, 3), "a.bias": torch.ones(2)},
              tmp_path / "model-00001-of-00002.safetensors")
    save_file({"b.weight_packed": torch.arange(8, dtype=torch.int32).reshape(2, 4)},
              tmp_path / "model-00002-of-00002.safetensors")
    return tmp_path


def test_headers_tensors_and_sizes(folder):
    stored = StoredTensors(folder)
    assert stored.headers == {"a.weight": ("BF16", [2, 3]), "a.bias": ("F32", [2]), "b.weight_packed": ("I32", [2, 4])}
    assert torch.equal(stored.get("b.weight_packed"), torch.arange(8, dtype=torch.int32).reshape(2, 4))
    assert {name: t.shape for name, t in stored.items()} == {
        "a.weight": (2, 3), "a.bias": (2,), "b.weight_packed": (2, 4)}
    # data bytes as the files' own headers count them (offsets), headers excluded
    offsets = 0
    for path in folder.glob("*.safetensors"):
        with path.open("rb") as f:
            header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
        offsets += sum(v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items() if k != "__metadata__")
    assert stored.data_bytes() == offsets == 2 * 6 + 4 * 2 + 4 * 8


def test_rename_and_leave_out(folder):
    stored = StoredTensors(folder, rename=lambda key: None if key.startswith("b.") else f"model.{key}")
    assert sorted(stored.files) == ["model.a.bias", "model.a.weight"]
    assert torch.equal(stored.get("model.a.bias"), torch.ones(2)) and stored.nbytes("model.a.weight") == 12


def test_a_truncated_file_is_named_and_can_be_left_out(folder):
    path = folder / "model-00002-of-00002.safetensors"
    path.write_bytes(path.read_bytes()[:20])
    assert why_unreadable(path) and why_unreadable(folder / "model-00001-of-00002.safetensors") is None
    assert sorted(StoredTensors(folder, skip_unreadable=True).files) == ["a.bias", "a.weight"]
    with pytest.raises(Exception):
        StoredTensors(folder)
