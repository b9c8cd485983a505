"""Publishing a run's export to the Hugging Face Hub, in one commit.

Only a run that passed validation, is complete, and is still the folder that was validated gets
published (`--force` overrides, and the commit says so). The repo ends up holding exactly the
export: changed files are added, files the export does not have are deleted (stale shards would
otherwise still load), all in one commit. A repo that already holds these files gets no commit.

One commit, `create_commit`, whatever the checkpoint's size: it is all or nothing, so a failed
or interrupted push leaves the repo as it was, never a half-pushed checkpoint that users could
download. The alternatives commit in batches: `upload_large_folder` (deprecated in the pinned
huggingface_hub 1.33) and `upload_folder`, which with hf_xet now also splits large uploads into
several commits. The price of one commit is that nothing is visible until everything is uploaded;
large files are uploaded before the commit and deduplicated by content, so re-running an
interrupted push does not send the files that had finished again.

The Hub client is a parameter (`api`), so tests drive the whole flow with a recording fake.
The token comes from huggingface_hub (`HF_TOKEN` or `hf auth login`) and is redacted from every
message, log line and record this module writes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

import yaml
from pydantic import BaseModel, ValidationError

from pipeline import __version__
from pipeline.card import CARD, write_card
from pipeline.recipe import HubSpec, Recipe
from pipeline.rundir import EXPORT, MANIFEST, FileSum, Manifest, Published
from pipeline.runlock import run_lock

log = logging.getLogger(__name__)

KEEP_REMOTE = (".gitattributes",)  # the Hub's LFS rules, created with the repo: never deleted
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")


class PublishError(RuntimeError):
    """A publish that did not happen; the message says what to do and what, if anything, was pushed."""


class PublishRefused(PublishError):
    pass


class Target(BaseModel):
    repo_id: str
    revision: str
    private: bool


class LocalFile(BaseModel):
    path: str
    bytes: int
    sha256: str


class PublishPlan(BaseModel):
    """What would arrive at the Hub, and why it should not (problems), computed without the network."""

    run_dir: Path
    target: Target
    files: list[LocalFile]
    problems: list[str]
    card_metadata: dict
    card_repo_id: str | None  # the repo the card's usage snippets name
    card_is_generated: bool  # README.md is the one `gemma-quant card` wrote (so it may be rewritten)
    commit_message: str
    commit_description: str

    @property
    def total_bytes(self) -> int:
        return sum(f.bytes for f in self.files)


# ---------------------------------------------------------------- local checks


def prepare(run_dir: Path, repo_id: str | None = None, private: bool | None = None,
            revision: str | None = None) -> PublishPlan:
    """Read the run, pick the target, list the files and everything that should stop the push."""
    from pipeline.export import file_checksums

    run_dir = Path(run_dir)
    if not (run_dir / MANIFEST).is_file():
        raise PublishError(f"{run_dir} is not a run directory (no {MANIFEST}): quantize a recipe first, "
                           "e.g. `gemma-quant quantize RECIPE`")
    manifest = Manifest.load(run_dir)
    recipe = manifest.recipe
    target = Target(repo_id=_repo_id(repo_id, recipe, manifest), revision=revision or "main",
                    private=recipe.hub.private if private is None else private)
    export = run_dir / EXPORT
    sums = file_checksums(export) if export.is_dir() else {}
    files = [LocalFile(path=name, bytes=s.bytes, sha256=s.sha256) for name, s in sums.items()]
    card = manifest.card
    card_is_generated = card is not None and CARD in sums and sums[CARD].sha256 == card.sha256
    return PublishPlan(
        run_dir=run_dir, target=target, files=files,
        problems=status_problems(manifest, run_dir) + completeness_problems(export, manifest) + drift_problems(manifest, sums),
        card_metadata=_card_metadata(export / CARD) if CARD in sums else {},
        card_repo_id=card.repo_id if card else None, card_is_generated=card_is_generated,
        commit_message=f"Upload {recipe.name} ({recipe.model.id}, {recipe.scheme} {recipe.algorithm}) "
                       f"with gemma-quant {__version__}",
        commit_description=_description(manifest, recipe),
    )


def _card_metadata(path: Path) -> dict:
    from huggingface_hub import ModelCard

    return ModelCard.load(path, ignore_metadata_errors=True).data.to_dict()


def _repo_id(given: str | None, recipe: Recipe, manifest: Manifest) -> str:
    repo_id = given or recipe.hub.repo_id
    if not repo_id:
        raise PublishError(f"no repo id: pass --repo-id OWNER/NAME (make: REPO_ID=OWNER/NAME), or set "
                           f"hub: {{repo_id: OWNER/NAME}} in the recipe ({manifest.recipe_file})")
    try:
        HubSpec(repo_id=repo_id)
    except ValidationError as err:
        raise PublishError(f"repo id: {err.errors()[0]['msg'].removeprefix('Value error, ')}") from None
    return repo_id


def status_problems(manifest: Manifest, run_dir: Path) -> list[str]:
    status = manifest.status
    if status == "validated":
        return []
    if status == "failed_validation":
        return ["the run failed validation: " + "; ".join(manifest.validation.failures if manifest.validation else [])]
    return [f"the run was not validated (status {status!r}): run `gemma-quant validate {run_dir}` first"]


def completeness_problems(export: Path, manifest: Manifest | None = None) -> list[str]:
    """What users need to load and serve the folder: config with quantization_config, every weight
    file, tokenizer, and the card; for a GGUF build, every GGUF file it wrote (each carries its tokenizer
    and chat template; the projector file where it wrote one) and the card."""
    from pipeline.export import written_quantization_config

    if not export.is_dir():
        return [f"there is no export folder ({export})"]
    names = {p.name for p in export.iterdir() if p.is_file()}
    problems = []
    if manifest is not None and manifest.export.gguf:
        written = [f.name for f in manifest.export.gguf]
        if manifest.export.projector and manifest.export.projector.name:
            written.append(manifest.export.projector.name)
        problems += [f"{name} is missing" for name in written if name not in names]
        if CARD not in names:
            problems.append(f"there is no model card ({CARD}): run `gemma-quant card {export.parent}`")
        return problems
    if "config.json" not in names:
        problems.append("config.json is missing")
    elif (unreadable := written_quantization_config(export)[1]):
        problems += unreadable
    if not any(n.endswith(".safetensors") for n in names):
        problems.append("there are no *.safetensors weights")
    index = export / "model.safetensors.index.json"
    if index.is_file():
        try:
            listed = set(json.loads(index.read_text())["weight_map"].values())
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            listed = set()
            problems.append(f"{index.name} cannot be read ({type(err).__name__}: {str(err)[:200]})")
        if missing := sorted(listed - names):
            problems.append(f"weight files listed in the index are missing: {', '.join(missing)}")
    if not names & set(TOKENIZER_FILES):
        problems.append(f"there is no tokenizer ({' or '.join(TOKENIZER_FILES)})")
    if "tokenizer_config.json" not in names:
        problems.append("tokenizer_config.json is missing")
    if CARD not in names:
        problems.append(f"there is no model card ({CARD}): run `gemma-quant card {export.parent}`")
    return problems


def drift_problems(manifest: Manifest, files: dict[str, FileSum]) -> list[str]:
    """Files added, removed or changed since validation checksummed them (the card: since
    `gemma-quant card` wrote it, which is after validation)."""
    if not manifest.validation:
        return []  # never validated: status_problems says so
    expected = {name: s.sha256 for name, s in manifest.validation.export_files.items()}
    if card := manifest.card:
        expected[CARD] = card.sha256
    problems = []
    for name in sorted(expected.keys() | files.keys()):
        if name not in files:
            problems.append(f"{name} was validated but is missing now")
        elif name not in expected:
            problems.append(f"{name} was added after validation")
        elif files[name].sha256 != expected[name]:
            problems.append(f"{name} was edited after `gemma-quant card` wrote it" if name == CARD
                            else f"{name} changed since validation")
    return problems


def _description(manifest: Manifest, recipe: Recipe) -> str:
    quality = manifest.validation.quality if manifest.validation else None
    measured = (f"KL mean {quality.kl_mean:.5f}, top-1 agreement {quality.top1_agreement:.4f}, "
                f"perplexity ratio {quality.ppl_ratio:.4f}") if quality else "quality not measured"
    serving = manifest.validation.serving if manifest.validation else None
    return "\n".join([
        f"Recipe {recipe.name} (sha256 {manifest.recipe_sha256[:12]}), source {recipe.model.id}"
        + (f"@{recipe.model.revision}" if recipe.model.revision else ""),
        f"Quantized with gemma-quant {manifest.tool.version}; validation: {manifest.status}; {measured}",
        *([f"Served by {serving.engine}: {serving.summary}"] if serving else []),
    ])


def describe(plan: PublishPlan, force: bool = False) -> str:
    """The dry run: where, what, and whether it would go."""
    t = plan.target
    lines = [
        "dry run: nothing was sent to the Hub",
        f"repo:     {t.repo_id}",
        f"revision: {t.revision}",
        f"private:  {'yes' if t.private else 'no'} (applies when the repo is created; an existing repo keeps its "
        "visibility)",
        f"commit:   {plan.commit_message}",
        *[f"          {line}" for line in plan.commit_description.splitlines()],
        f"files:    {len(plan.files)}, {plan.total_bytes:,} bytes, in one commit; files on the Hub that are not "
        f"listed here are deleted in the same commit (except {', '.join(KEEP_REMOTE)})",
        *[f"  {f.bytes:>15,}  {f.path}" for f in plan.files],
        "card metadata:",
        *[f"  {line}" for line in yaml.safe_dump(plan.card_metadata, sort_keys=False).splitlines()],
    ]
    if _card_needs_rewrite(plan):
        lines.append(f"note: {CARD} will be rewritten for {t.repo_id} before upload "
                     f"(its usage snippets name {plan.card_repo_id or 'the local export folder'})")
    if plan.problems:
        lines += [f"{'forced past' if force else 'would refuse'}:", *[f"  - {p}" for p in plan.problems]]
        if not force:
            lines.append("fix these, or pass --force to publish anyway")
    else:
        lines.append("ready to publish")
    return "\n".join(lines)


def _card_needs_rewrite(plan: PublishPlan) -> bool:
    return plan.card_is_generated and plan.card_repo_id != plan.target.repo_id


# ---------------------------------------------------------------- the push


def default_api():
    from huggingface_hub import HfApi

    return HfApi()


def publish(plan: PublishPlan, api=None, *, force: bool = False, echo=print) -> Published:
    """Push the plan's files to its target in one commit (or none, when the Hub already has them)
    and record the result in the manifest. Raises PublishRefused / PublishError, both redacted."""
    from huggingface_hub import get_token

    token = get_token()
    with run_lock(plan.run_dir), _publish_log(plan.run_dir, token):
        if plan.problems and not force:
            raise PublishRefused(f"refusing to publish {plan.run_dir}:\n" + "\n".join(f"  - {p}" for p in plan.problems)
                                 + "\nfix these, or pass --force to publish anyway (the card says what was measured)."
                                 " Nothing was pushed.")
        if _offline():
            raise PublishError("HF_HUB_OFFLINE is set, and publishing needs the Hub: unset it (or use --dry-run to "
                               "see what would be pushed). Nothing was pushed.")
        if not token:
            raise PublishError("no Hugging Face token: set HF_TOKEN to a write token "
                               "(https://huggingface.co/settings/tokens) or run `hf auth login`. Nothing was pushed.")
        if _card_needs_rewrite(plan):
            plan = _rewrite_card(plan)
        result = _push(plan, api or default_api(), token, echo)
        result.forced_past = plan.problems
        _record(plan.run_dir, result)
        log.info("published %s@%s: %s", result.repo_id, result.revision,
                 "already up to date" if result.up_to_date else result.commit_url)
        return result


def _rewrite_card(plan: PublishPlan) -> PublishPlan:
    """The card gemma-quant wrote, with its usage snippets naming the repo it is pushed to."""
    path = write_card(plan.run_dir, plan.target.repo_id)
    card = LocalFile(path=CARD, bytes=path.stat().st_size, sha256=hashlib.sha256(path.read_bytes()).hexdigest())
    return plan.model_copy(update={"files": [card if f.path == CARD else f for f in plan.files],
                                   "card_repo_id": plan.target.repo_id,
                                   "card_metadata": _card_metadata(path)})


def _push(plan: PublishPlan, api, token: str, echo) -> Published:
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete
    from huggingface_hub.hf_api import RepoFile

    t = plan.target
    export = plan.run_dir / EXPORT
    nothing = "Nothing was pushed."
    with _hub_errors(t, token, nothing):
        api.create_repo(t.repo_id, private=t.private, exist_ok=True, repo_type="model")
        if t.revision != "main":
            api.create_branch(t.repo_id, branch=t.revision, exist_ok=True, repo_type="model")
        remote = {f.path: f for f in api.list_repo_tree(t.repo_id, revision=t.revision, recursive=True,
                                                        repo_type="model") if isinstance(f, RepoFile)}
    changed = [f for f in plan.files if not _same(remote.get(f.path), f, export)]
    stale = sorted(set(remote) - {f.path for f in plan.files} - set(KEEP_REMOTE))
    url = f"https://huggingface.co/{t.repo_id}/tree/{t.revision}"
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    if not changed and not stale:
        with _hub_errors(t, token, nothing):
            head = api.repo_info(t.repo_id, revision=t.revision, repo_type="model").sha
        echo(f"{t.repo_id}@{t.revision} is already up to date (commit {head}): no commit made")
        return Published(repo_id=t.repo_id, revision=t.revision, url=url, commit_oid=head, commit_url=None,
                         uploaded=[], deleted=[], up_to_date=True, forced_past=[], time=now)
    operations = ([CommitOperationAdd(path_in_repo=f.path, path_or_fileobj=export / f.path) for f in changed]
                  + [CommitOperationDelete(path_in_repo=path) for path in stale])
    echo(f"pushing {len(changed)} files ({sum(f.bytes for f in changed):,} bytes)"
         + (f" and deleting {len(stale)} stale files ({', '.join(stale)})" if stale else "")
         + f" to {t.repo_id}@{t.revision} in one commit ...")
    with _hub_errors(t, token, f"No commit was created (a commit is all or nothing), so {t.repo_id}@{t.revision} "
                               "is as it was."):
        info = api.create_commit(t.repo_id, operations, commit_message=plan.commit_message,
                                 commit_description=plan.commit_description, revision=t.revision, repo_type="model")
    echo(f"published to {url}: {info.commit_url}")
    return Published(repo_id=t.repo_id, revision=t.revision, url=url, commit_oid=info.oid, commit_url=info.commit_url,
                     uploaded=[f.path for f in changed], deleted=stale, up_to_date=False, forced_past=[], time=now)


def _same(remote, local: LocalFile, export: Path) -> bool:
    """Whether the Hub's file has the local content: LFS/Xet files by their sha256, regular
    files by their git blob id (sha1 of a header and the content)."""
    if remote is None or remote.size != local.bytes:
        return False
    if remote.lfs is not None:
        return remote.lfs.sha256 == local.sha256
    data = (export / local.path).read_bytes()
    return remote.blob_id == hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _record(run_dir: Path, result: Published) -> None:
    """Append to the manifest's `published` list; an up-to-date re-publish adds nothing new."""
    manifest = Manifest.load(run_dir)
    if result.up_to_date and any(p.repo_id == result.repo_id and p.revision == result.revision
                                 and p.commit_oid == result.commit_oid for p in manifest.published):
        return
    manifest.published.append(result)
    manifest.save(run_dir)


# ---------------------------------------------------------------- errors, token, log


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def redact(text: str, token: str | None) -> str:
    if token:
        text = text.replace(token, "hf_***")
    return re.sub(r"\bhf_[A-Za-z0-9]{20,}", "hf_***", text)  # any other token a server might echo


@contextmanager
def _hub_errors(target: Target, token: str | None, pushed: str):
    """Hub and network failures, as one clear, redacted message that says what was pushed."""
    try:
        yield
    except Exception as err:
        raise PublishError(redact(f"{explain(err, target)} {pushed}", token)) from None


def explain(err: Exception, target: Target) -> str:
    import httpx
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if isinstance(err, OfflineModeIsEnabled):
        return "HF_HUB_OFFLINE is set, and publishing needs the Hub: unset it (or use --dry-run)."
    if isinstance(err, HfHubHTTPError) and err.response is not None:
        status = err.response.status_code
        owner = target.repo_id.split("/")[0]
        if status == 401:
            return ("the Hub rejected the token (401): it is invalid, expired or revoked. Create a write token at "
                    "https://huggingface.co/settings/tokens and set HF_TOKEN, or run `hf auth login`.")
        if status == 403:
            return (f"forbidden (403): this token cannot write to {target.repo_id}. The namespace '{owner}' belongs "
                    "to another user or an organization you cannot write to, or the token is read-only: publish "
                    "under your own namespace (--repo-id YOUR_NAME/...) or use a write token with access to "
                    f"'{owner}'.")
        if status == 404:
            return f"{target.repo_id} (revision {target.revision}) was not found, or this token cannot see it (404)."
        return f"the Hub answered {status}: {first_line}"
    if isinstance(err, (httpx.TransportError, ConnectionError, TimeoutError)):
        return (f"the Hub is unreachable ({type(err).__name__}: {first_line}). Check the network (and HF_ENDPOINT "
                "if set), then run the same command again.")
    return f"{type(err).__name__}: {first_line}"


class _Redact(logging.Filter):
    def __init__(self, token: str | None):
        super().__init__()
        self.token = token

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg, record.args = redact(record.getMessage(), self.token), None
        if record.exc_info:
            record.exc_text = redact(logging.Formatter().formatException(record.exc_info), self.token)
            record.exc_info = None
        return True


@contextmanager
def _publish_log(run_dir: Path, token: str | None):
    """logs/publish-<time>.log: what was pushed or why not. While publishing, every log handler
    (this file's, the console's) redacts the token from every record, ours and huggingface_hub's."""
    path = run_dir / "logs" / f"publish-{datetime.now(timezone.utc):%Y%m%dT%H%M%S}.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    redacting = _Redact(token)
    handlers = list(root.handlers)
    for h in handlers:
        h.addFilter(redacting)
    try:
        yield
    except PublishError as err:  # into the file only: the caller shows it to the user
        handler.handle(log.makeRecord(log.name, logging.ERROR, __file__, 0, "%s", (err,), None))
        raise
    finally:
        for h in handlers:
            h.removeFilter(redacting)
        root.removeHandler(handler)
        handler.close()
