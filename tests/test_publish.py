"""Publishing: exactly the validated files, in one commit, only when they deserve it; no network.

A recording fake of HfApi (tests/fake_hub.py) stands in for the Hub: it keeps the remote
repos in memory, so the tests assert what arrives there and what the repo holds afterwards.
"""

import json
import subprocess
import uuid

import httpx
import pytest

import pipeline
from pipeline import publish as publishing
from pipeline.cli import main
from pipeline.publish import PublishError, PublishRefused, prepare, publish

from fake_hub import FakeHub, http_error

REPO = "me/tiny-w4a16"


@pytest.fixture
def hub(monkeypatch):
    """The fake Hub, online, with a token; the CLI gets it as its client."""
    fake = FakeHub(user="me")
    monkeypatch.setattr(publishing, "default_api", lambda: fake)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("HF_TOKEN", "hf_test_token_for_publish_tests_0000")
    return fake


def _manifest(run) -> dict:
    return json.loads((run / "manifest.json").read_text())


def _local_files(run) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((run / "export").iterdir())}


def _calls(fake) -> list[str]:
    return [name for name, _ in fake.calls]


def test_first_publish_is_one_commit_of_exactly_the_export(validated_copy, hub):
    result = publish(prepare(validated_copy, REPO), hub, echo=lambda line: None)

    assert _calls(hub) == ["create_repo", "list_repo_tree", "create_commit"]
    assert hub.calls[0][1] == {"repo_id": REPO, "private": False, "exist_ok": True, "repo_type": "model"}
    [commit] = hub.commits
    local = _local_files(validated_copy)
    assert sorted(commit["added"]) == sorted(local) == ["README.md", "chat_template.jinja", "config.json",
                                                        "generation_config.json", "model.safetensors", "ple_hot_ids.json", "recipe.yaml",
                                                        "tokenizer.json", "tokenizer_config.json"]
    assert {path: len(data) for path, data in commit["added"].items()} == {p: len(d) for p, d in local.items()}
    assert commit["added"] == local and commit["deleted"] == []
    assert commit["message"] == f"Upload tiny-card (tiny:e2b, W4A16 rtn) with gemma-quant {pipeline.__version__}"
    assert commit["description"].startswith("Recipe tiny-card (sha256 ")
    assert "validation: validated; KL mean " in commit["description"]
    assert commit["revision"] == "main"
    # The card was rewritten for the repo it went to, and the manifest knows that card.
    assert f"vllm serve {REPO} --max-model-len 4096" in commit["added"]["README.md"].decode()
    manifest = _manifest(validated_copy)
    assert manifest["card"]["repo_id"] == REPO
    assert hub.repos[REPO]["branches"]["main"] == {".gitattributes": hub.repos[REPO]["branches"]["main"][
        ".gitattributes"], **local}
    [record] = manifest["published"]
    assert record["repo_id"] == REPO and record["revision"] == "main" and not record["up_to_date"]
    assert record["commit_oid"] == result.commit_oid and record["commit_url"].endswith(f"/commit/{result.commit_oid}")
    assert record["uploaded"] == sorted(local) and record["forced_past"] == [] and record["time"]


def test_republishing_the_same_run_makes_no_commit(validated_copy, hub, capsys):
    assert main(["publish", str(validated_copy), "--repo-id", REPO]) == 0
    head = hub.repos[REPO]["heads"]["main"]
    assert main(["publish", str(validated_copy), "--repo-id", REPO]) == 0
    out = capsys.readouterr().out
    assert f"{REPO}@main is already up to date (commit {head}): no commit made" in out.replace("\n", "")
    assert len(hub.commits) == 1 and _calls(hub).count("create_commit") == 1
    assert len(_manifest(validated_copy)["published"]) == 1


def test_a_new_run_updates_an_existing_repo_in_one_commit(validated_copy, hub):
    local = _local_files(validated_copy)
    # The repo holds an earlier, sharded export of the same model; two of its files are still current.
    hub.seed(REPO, {"model-00001-of-00002.safetensors": b"old", "model-00002-of-00002.safetensors": b"old",
                    "model.safetensors.index.json": b"{}", "config.json": b"{}",
                    "tokenizer.json": local["tokenizer.json"], "chat_template.jinja": local["chat_template.jinja"]})
    result = publish(prepare(validated_copy, REPO), hub, echo=lambda line: None)
    [commit] = hub.commits
    assert sorted(commit["added"]) == sorted(set(local) - {"tokenizer.json", "chat_template.jinja"})
    assert commit["deleted"] == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
                                 "model.safetensors.index.json"]
    assert sorted(hub.repos[REPO]["branches"]["main"]) == sorted([".gitattributes", *local])
    assert result.deleted == commit["deleted"]


def test_recipe_hub_block_and_revision(validated_copy, hub):
    manifest = _manifest(validated_copy)
    manifest["recipe"]["hub"].update(repo_id="me/from-recipe", private=True)
    (validated_copy / "manifest.json").write_text(json.dumps(manifest))
    publish(prepare(validated_copy, revision="v1"), hub, echo=lambda line: None)
    assert hub.calls[0][1]["private"] is True and hub.calls[0][1]["repo_id"] == "me/from-recipe"
    assert hub.calls[1] == ("create_branch", {"repo_id": "me/from-recipe", "branch": "v1", "exist_ok": True})
    assert hub.commits[0]["revision"] == "v1" and _manifest(validated_copy)["published"][0]["revision"] == "v1"


def test_dry_run_shows_everything_and_touches_nothing(validated_run, hub, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the dry run needs no network
    before = (validated_run / "manifest.json").read_text()
    recipe = validated_run.parent / "tiny-card.yaml"  # the run directory, found from its recipe
    assert main(["publish", str(recipe), "--repo-id", REPO, "--private", "--revision", "v2", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert hub.calls == [] and (validated_run / "manifest.json").read_text() == before
    for line in ("dry run: nothing was sent to the Hub", f"repo:     {REPO}", "revision: v2", "private:  yes",
                 f"commit:   Upload tiny-card (tiny:e2b, W4A16 rtn) with gemma-quant {pipeline.__version__}",
                 "pipeline_tag: image-text-to-text", "- gemma-quant",
                 f"note: README.md will be rewritten for {REPO} before upload", "ready to publish"):
        assert line in out
    for path in (validated_run / "export").iterdir():
        assert f"{path.stat().st_size:>15,}  {path.name}" in out


def _fail_validation(run):
    manifest = _manifest(run)
    manifest.update(status="failed_validation")
    manifest["validation"].update(passed=False, failures=["gate top1_min failed: top1_agreement 0.8 >= 0.99 required"])
    (run / "manifest.json").write_text(json.dumps(manifest))


def _skip_validation(run):
    manifest = _manifest(run)
    manifest.pop("validation")
    manifest.update(status="exported")
    (run / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("change, problems", [
    (_fail_validation, ["the run failed validation: gate top1_min failed"]),
    (_skip_validation, ["the run was not validated (status 'exported'): run `gemma-quant validate"]),
    (lambda run: (run / "export" / "tokenizer.json").unlink(),
     ["there is no tokenizer (tokenizer.json or tokenizer.model)", "tokenizer.json was validated but is missing now"]),
    (lambda run: (run / "export" / "README.md").unlink(),
     ["there is no model card (README.md): run `gemma-quant card", "README.md was validated but is missing now"]),
    (lambda run: (run / "export" / "model.safetensors").open("ab").write(b"\0"),
     ["model.safetensors changed since validation"]),
    (lambda run: (run / "export" / "README.md").open("a").write("\nHand-written note.\n"),
     ["README.md was edited after `gemma-quant card` wrote it"]),
    (lambda run: (run / "export" / "notes.txt").write_text("scratch"), ["notes.txt was added after validation"]),
])
def test_refusals_and_force(validated_copy, hub, capsys, change, problems):
    change(validated_copy)
    assert main(["publish", str(validated_copy), "--repo-id", REPO]) == 1
    out = capsys.readouterr().out.replace("\n", " ")
    assert f"publish failed: refusing to publish {validated_copy}:" in out
    for problem in problems:
        assert problem in out
    assert "pass --force to publish anyway" in out and "Nothing was pushed." in out
    assert hub.calls == []
    assert main(["publish", str(validated_copy), "--repo-id", REPO, "--dry-run"]) == 1  # the dry run agrees

    assert main(["publish", str(validated_copy), "--repo-id", REPO, "--force"]) == 0
    [commit] = hub.commits
    assert sorted(commit["added"]) == sorted(_local_files(validated_copy))
    forced = _manifest(validated_copy)["published"][0]["forced_past"]
    assert all(any(problem in f for f in forced) for problem in problems)
    if "edited" in problems[0]:  # a hand-edited card is published as edited, not regenerated
        assert commit["added"]["README.md"].decode().endswith("Hand-written note.\n")


def test_the_token_appears_nowhere(validated_copy, hub, capsys, monkeypatch):
    token = f"secret-{uuid.uuid4().hex}"  # not hf_-shaped: only exact redaction can hide it
    monkeypatch.setenv("HF_TOKEN", token)
    assert main(["publish", str(validated_copy), "--repo-id", REPO]) == 0
    # A server (or proxy) that echoes the credentials back in its error must not leak them either.
    hub.fail["create_commit"] = http_error(500, f"internal error while checking Authorization: Bearer {token}")
    assert main(["publish", str(validated_copy), "--repo-id", "me/other"]) == 1
    hub.fail["list_repo_tree"] = httpx.ConnectError(f"connection reset (token={token})")
    assert main(["publish", str(validated_copy), "--repo-id", "me/other"]) == 1
    out, err = capsys.readouterr()
    assert "the Hub answered 500: internal error while checking Authorization: Bearer hf_***" in out.replace("\n", " ")
    assert "connection reset (token=hf_***)" in out.replace("\n", " ")
    written = [p for p in validated_copy.rglob("*") if p.is_file() and p.suffix in (".log", ".json", ".md")]
    assert any(p.name.startswith("publish-") for p in written)
    for text in (out, err, *(p.read_text() for p in written)):
        assert token not in text


@pytest.mark.parametrize("method, error, expected, pushed", [
    ("create_repo", http_error(401, "Invalid credentials in Authorization header"),
     "the Hub rejected the token (401)", "Nothing was pushed."),
    ("list_repo_tree", httpx.ConnectError("[Errno -2] Name or service not known"),
     "the Hub is unreachable (ConnectError: [Errno -2] Name or service not known)", "Nothing was pushed."),
    ("create_commit", httpx.ReadTimeout("timed out"), "the Hub is unreachable (ReadTimeout: timed out)",
     f"No commit was created (a commit is all or nothing), so {REPO}@main is as it was."),
])
def test_hub_errors_say_what_was_pushed(validated_copy, hub, method, error, expected, pushed):
    hub.fail[method] = error
    with pytest.raises(PublishError) as err:
        publish(prepare(validated_copy, REPO), hub, echo=lambda line: None)
    assert expected in str(err.value) and str(err.value).endswith(pushed)
    assert hub.commits == [] and _manifest(validated_copy)["published"] == []


def test_someone_elses_namespace_is_forbidden(validated_copy, hub, capsys):
    assert main(["publish", str(validated_copy), "--repo-id", "google/gemma-4-E2B-it-W4A16"]) == 1
    out = capsys.readouterr().out.replace("\n", " ")
    assert ("forbidden (403): this token cannot write to google/gemma-4-E2B-it-W4A16. The namespace 'google' belongs "
            "to another user") in out
    assert "--repo-id YOUR_NAME/..." in out and "Nothing was pushed." in out and hub.commits == []


def test_offline_and_missing_token_and_repo_id(validated_copy, hub, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(PublishError, match=r"HF_HUB_OFFLINE is set, and publishing needs the Hub: unset it \(or use "
                                           r"--dry-run to see what would be pushed\). Nothing was pushed."):
        publish(prepare(validated_copy, REPO), hub)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.setattr("huggingface_hub.constants.HF_TOKEN_PATH", str(tmp_path / "no-token"))
    with pytest.raises(PublishError, match=r"no Hugging Face token: set HF_TOKEN .* or run `hf auth login`"):
        publish(prepare(validated_copy, REPO), hub)
    with pytest.raises(PublishError, match=r"no repo id: pass --repo-id OWNER/NAME .*set hub: \{repo_id: OWNER/NAME\} "
                                           r"in the recipe \(.*tiny-card.yaml\)"):
        prepare(validated_copy)
    with pytest.raises(PublishError, match="expected OWNER/NAME"):
        prepare(validated_copy, "no-slash")
    assert hub.calls == []


def test_refusal_is_an_exception_for_callers(validated_copy, hub):
    _skip_validation(validated_copy)
    with pytest.raises(PublishRefused):
        publish(prepare(validated_copy, REPO), hub)


def test_make_publish_passes_the_options():
    out = subprocess.run(["make", "-n", "publish", "VENV=v", "RECIPE=e2b-w4a16", "REPO_ID=me/x", "PRIVATE=1",
                          "REVISION=dev"], capture_output=True, text=True, check=True).stdout
    command = " ".join(out.replace("\\\n", " ").split())  # make -n prints the recipe's line continuations
    assert "v/bin/gemma-quant publish e2b-w4a16 --repo-id me/x --private --revision dev" in command
