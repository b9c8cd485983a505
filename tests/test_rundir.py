"""The run directory's one manifest: typed, round-tripping through manifest.json unchanged, refusing
what this gemma-quant did not write, and written atomically."""

import json

import pytest

from pipeline.records import QuantizeReport
from pipeline.rundir import MANIFEST, Manifest, ManifestError, write_json_atomically


def test_the_manifest_round_trips(validated_run, tmp_path):
    manifest = Manifest.load(validated_run)
    manifest.save(tmp_path)
    again = Manifest.load(tmp_path)
    assert again == manifest
    assert json.loads((tmp_path / MANIFEST).read_text()) == json.loads((validated_run / MANIFEST).read_text())
    # what the stages wrote is typed all the way down
    assert (again.algorithm, again.library) == (again.recipe.algorithm, again.recipe.runs_on)
    assert isinstance(again.quantize_report, QuantizeReport)
    assert again.validation.passed and 0 < again.validation.quality.top1_agreement <= 1
    assert again.card is not None and again.card.sha256


@pytest.mark.parametrize(("edit", "where"), [
    (lambda m: m.pop("library"), "library"),
    (lambda m: m["validation"]["quality"].update(kl_mean="low"), "validation.quality.kl_mean"),
    (lambda m: m.update(backend="llmcompressor"), "backend"),
])
def test_a_manifest_this_tool_did_not_write_is_refused_naming_the_field(validated_run, tmp_path, edit, where):
    data = json.loads((validated_run / MANIFEST).read_text())
    edit(data)
    (tmp_path / MANIFEST).write_text(json.dumps(data))
    with pytest.raises(ManifestError) as err:
        Manifest.load(tmp_path)
    assert f"{where}:" in str(err.value) and "re-run `gemma-quant quantize`" in str(err.value)


def test_json_is_replaced_whole_or_not_at_all(tmp_path, monkeypatch):
    path = tmp_path / "eval.json"
    write_json_atomically(path, {"a": 1})

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("pipeline.rundir.os.replace", fail)
    with pytest.raises(OSError):
        write_json_atomically(path, {"a": 2})
    assert json.loads(path.read_text()) == {"a": 1}
