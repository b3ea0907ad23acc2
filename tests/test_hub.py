"""Editors on the Hugging Face Hub: loading from a real Hub cache (offline), the model card, push_to_hub.

Nothing here reaches the network: the cache is laid out exactly as huggingface_hub lays it out
(``models--org--name/{blobs,refs,snapshots}``, checked with ``scan_cache_dir``), and uploads are
recorded by patching ``HfApi``'s methods.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from huggingface_hub import HfApi, ModelCard, scan_cache_dir
from huggingface_hub import constants as hub_constants
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

import hpredit
from hpredit.editors import Editor, HPREditor, load_editor
from hpredit.editors import hub as editor_hub
from hpredit.editors.kl_curve import KLCurve
from hpredit.errors import HpreditError
from hpredit.serving import check_editors, parse_editors, resolve_editors

from .conftest import random_editor, tiny_model

REPO = "org/name"
COMMIT_A = hashlib.sha1(b"commit a").hexdigest()
COMMIT_B = hashlib.sha1(b"commit b").hexdigest()
CURVE = KLCurve((0.25, 0.5, 1.0), (0.02, 0.09, 0.4), "neutral text, 300 tokens")
METRICS = {
    "val_probe_accuracy": {"0": 0.61, "1": 0.72, "2": 0.68},
    "validation": "val split",
    "train_token_pairs": 40,
    "history": [{"epoch": 1, "probe_loss": 0.6}],
}


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


def _editor(model, seed: int = 0, curve: bool = True) -> Editor:
    ed = random_editor("hpr", model, seed=seed)
    ed.model_fingerprint = dataclasses.replace(ed.model_fingerprint, name="org/base-model")
    ed.metrics = dict(METRICS)
    ed.kl_curve = CURVE if curve else None
    return ed


def _logits(model, editor: Editor | None) -> torch.Tensor:
    ids = torch.tensor([[5, 9, 200, 31, 7, 42]])
    with torch.no_grad():
        if editor is None:
            return model(ids).logits
        with editor.attach(model, strength=1.0, strict=False):
            return model(ids).logits


def _same_edits(model, a: Editor, b: Editor) -> bool:
    return (
        type(a) is type(b)
        and a.layers == b.layers
        and a.tensors().keys() == b.tensors().keys()
        and all(torch.equal(a.tensors()[k], b.tensors()[k]) for k in a.tensors())
        and torch.equal(_logits(model, a), _logits(model, b))
    )


def _git_blob_sha1(data: bytes) -> str:
    """The etag the Hub gives a file stored in git (not LFS): its git blob id."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def cache_commit(
    cache: Path, repo_id: str, files: Path, commit: str, refs: tuple[str, ...] = ("main",), missing: str = ""
) -> Path:
    """Put the files of directory ``files`` in the Hub cache ``cache`` as commit ``commit`` of model repo
    ``repo_id``, as huggingface_hub does: each file a blob named by its etag (LFS files: their SHA-256),
    the snapshot's entries relative symlinks to the blobs, each ref (branch, tag) a file holding the
    commit hash, and the commit's tree listing (``trees/<commit>.json``, what huggingface_hub 2.x keeps
    to tell a complete snapshot). ``missing``: a file listed but not downloaded (an interrupted
    download). Returns the snapshot directory."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir(exist_ok=True)
    tree = {}
    for f in sorted(files.iterdir()):
        data = f.read_bytes()
        lfs = f.suffix == ".safetensors"
        etag = hashlib.sha256(data).hexdigest() if lfs else _git_blob_sha1(data)
        tree[f.name] = {"size": len(data), "blob_id": _git_blob_sha1(data)}
        if lfs:
            tree[f.name].update(lfs_sha256=etag, lfs_size=len(data))
        if f.name == missing:
            continue
        (repo / "blobs" / etag).write_bytes(data)
        (snapshot / f.name).symlink_to(Path("..", "..", "blobs", etag))
    (repo / "trees").mkdir(exist_ok=True)
    (repo / "trees" / f"{commit}.json").write_text(json.dumps({"format_version": 1, "files": tree}, indent=1))
    for ref in refs:
        (repo / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)  # no newline, as huggingface_hub writes it
    return snapshot


@pytest.fixture
def offline(monkeypatch):
    """HF_HUB_OFFLINE on, as huggingface_hub reads it (its constants are read when it is imported)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)


@pytest.fixture
def hub(tmp_path, model, offline, monkeypatch):
    """A Hub cache (``HF_HUB_CACHE``) holding ``org/name``: commit A on ``main`` and tag ``v1``, commit B
    (another editor) on branch ``dev``. Returns ``(cache, editor A, editor B)``."""
    cache = tmp_path / "hub-cache"
    cache.mkdir()
    a, b = _editor(model, seed=0), _editor(model, seed=1, curve=False)
    cache_commit(cache, REPO, a.save_pretrained(tmp_path / "a"), COMMIT_A, refs=("main", "v1"))
    cache_commit(cache, REPO, b.save_pretrained(tmp_path / "b"), COMMIT_B, refs=("dev",))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    return cache, a, b


def test_the_cache_is_laid_out_as_huggingface_hub_lays_it_out(hub):
    cache, _, _ = hub
    info = scan_cache_dir(cache)
    assert not info.warnings
    (repo,) = info.repos
    assert repo.repo_id == REPO and repo.repo_type == "model"
    revisions = {r.commit_hash: r for r in repo.revisions}
    assert set(revisions) == {COMMIT_A, COMMIT_B}
    assert set(revisions[COMMIT_A].refs) == {"main", "v1"} and set(revisions[COMMIT_B].refs) == {"dev"}
    for r in revisions.values():
        assert {f.file_name for f in r.files} == {"README.md", "config.json", "editor.safetensors"}


def test_from_pretrained_loads_a_hub_repo_from_the_cache(hub, model):
    cache, a, b = hub
    back = Editor.from_pretrained(REPO)
    assert isinstance(back, HPREditor) and _same_edits(model, a, back)
    assert not torch.equal(_logits(model, back), _logits(model, None))  # the edit does something
    assert back.kl_curve == CURVE and back.metrics["val_probe_accuracy"] == METRICS["val_probe_accuracy"]
    assert _same_edits(model, a, HPREditor.from_pretrained(REPO))
    assert _same_edits(model, a, hpredit.load_editor(REPO))
    assert _same_edits(model, a, load_editor(Path(REPO)))  # a path-like repo id (what CLI path options make)


@pytest.mark.parametrize(
    "revision, which",
    [(COMMIT_A, "a"), ("v1", "a"), ("main", "a"), ("dev", "b"), (COMMIT_B, "b")],
)
def test_a_revision_pins_a_branch_tag_or_commit(hub, model, revision, which):
    _, a, b = hub
    back = Editor.from_pretrained(REPO, revision=revision)
    assert _same_edits(model, {"a": a, "b": b}[which], back)
    assert (back.kl_curve is not None) == (which == "a")


def test_cache_dir_and_the_other_options_pass_through(hub, model, tmp_path, monkeypatch):
    cache, a, b = hub
    empty = tmp_path / "empty-cache"
    empty.mkdir()
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(empty))  # only cache_dir can find it now
    monkeypatch.setenv("HF_HUB_CACHE", str(empty))
    with pytest.raises(HpreditError, match="is not in the local cache"):
        Editor.from_pretrained(REPO)
    assert _same_edits(model, b, Editor.from_pretrained(REPO, revision="dev", cache_dir=cache))
    # local_files_only reads the cache without HF_HUB_OFFLINE (never a download)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    calls = []
    real = editor_hub.snapshot_download
    monkeypatch.setattr(editor_hub, "snapshot_download", lambda *a, **k: calls.append((a, k)) or real(*a, **k))
    assert _same_edits(model, a, Editor.from_pretrained(REPO, cache_dir=cache, local_files_only=True, token="hf_x"))
    assert calls == [
        (
            (REPO,),
            {
                "revision": None,
                "cache_dir": cache,
                "token": "hf_x",
                "local_files_only": True,
                "allow_patterns": ["config.json", "editor.safetensors", "README.md"],
            },
        )
    ]
    with pytest.raises(HpreditError, match=re.escape("downloads are off (local_files_only=True)")):
        Editor.from_pretrained("org/other", cache_dir=cache, local_files_only=True)


def test_an_unknown_repo_or_revision_offline_is_one_clear_error(hub):
    cache, _, _ = hub
    with pytest.raises(HpreditError) as e:
        Editor.from_pretrained("org/unknown")
    assert str(e.value) == (
        f"editor artifact org/unknown: not a local directory, and the Hugging Face Hub repo org/unknown is not "
        f"in the local cache ({cache}) and downloads are off (HF_HUB_OFFLINE is set): download it first "
        "(hf download org/unknown) or unset HF_HUB_OFFLINE"
    )
    with pytest.raises(HpreditError) as e:
        Editor.from_pretrained(REPO, revision="v9")
    assert "repo org/name (revision v9) is not in the local cache" in str(e.value)
    assert "(hf download org/name --revision v9)" in str(e.value) and "\n" not in str(e.value)


def _http_error(cls, status: int, message: str):
    httpx2 = pytest.importorskip("httpx2")  # huggingface_hub 2.x's HTTP client
    request = httpx2.Request("GET", "https://huggingface.co/api/models/org/x")
    return cls(message, response=httpx2.Response(status, request=request))


@pytest.mark.parametrize(
    "error, message",
    [
        (
            lambda: _http_error(RepositoryNotFoundError, 404, "404 Repository Not Found"),
            "the Hugging Face Hub repo org/x was not found (or it is private: log in with hf auth login, or pass "
            "token=)",
        ),
        (
            lambda: _http_error(GatedRepoError, 403, "403 gated"),
            "the Hugging Face Hub repo org/x is gated: accept its conditions on the Hub",
        ),
        (
            lambda: _http_error(RevisionNotFoundError, 404, "404 Revision Not Found"),
            "editor artifact org/x: the Hugging Face Hub repo has no revision 'main'",
        ),
        (
            lambda: _http_error(HfHubHTTPError, 500, "500 Server Error\nInternal"),
            "the Hugging Face Hub repo org/x could not be downloaded: 500 Server Error",
        ),
        (
            lambda: LocalEntryNotFoundError("An error happened while trying to locate the files on the Hub"),
            "could not be downloaded (An error happened while trying to locate the files on the Hub) and is not "
            "in the local cache",
        ),
    ],
)
def test_hub_failures_online_are_one_error_line(monkeypatch, error, message):
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)

    def fail(*args, **kwargs):
        raise error()

    monkeypatch.setattr(editor_hub, "snapshot_download", fail)
    with pytest.raises(HpreditError) as e:
        Editor.from_pretrained("org/x")
    assert message in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("source", ["no-such-dir", "a/b/c", "/no/such/editor", "org/na me", "org/name/"])
def test_a_string_that_is_no_directory_and_no_repo_id_is_one_clear_error(offline, source):
    with pytest.raises(HpreditError) as e:
        Editor.from_pretrained(source)
    assert str(e.value) == (
        f"editor artifact {source} does not exist (expected a directory from save_pretrained) and is not a "
        "Hugging Face Hub repo id (namespace/name) either"
    )


def test_a_revision_suffix_in_python_says_to_pass_revision(offline):
    with pytest.raises(HpreditError, match=re.escape("pass revision='v1'")):
        Editor.from_pretrained("org/name@v1")


def test_a_revision_of_a_local_directory_is_refused(tmp_path, model):
    path = _editor(model).save_pretrained(tmp_path / "ed")
    with pytest.raises(HpreditError, match="pins a Hugging Face Hub repo, but this is a local directory"):
        Editor.from_pretrained(path, revision="main")


def test_a_partly_downloaded_snapshot_is_one_clear_error(hub, tmp_path, model):
    cache, a, _ = hub
    cache_commit(cache, "org/partial", a.save_pretrained(tmp_path / "ed"), COMMIT_A, missing="editor.safetensors")
    with pytest.raises(HpreditError) as e:
        Editor.from_pretrained("org/partial")
    assert str(e.value) == (
        "editor artifact org/partial: not a local directory, and the Hugging Face Hub repo org/partial is only "
        f"partly in the cache ({cache}) and downloads are off (HF_HUB_OFFLINE is set): download it again where "
        "the Hub is reachable (hf download org/partial)"
    )


def test_a_hub_repo_without_an_editor_says_so(hub, tmp_path):
    cache, _, _ = hub
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "README.md").write_text("# a model, not an editor\n")
    cache_commit(cache, "org/model", tmp_path / "model", COMMIT_A)
    with pytest.raises(HpreditError, match=re.escape("the Hugging Face Hub repo has no config.json")):
        Editor.from_pretrained("org/model")


# ----------------------------------------------------------------------------- the model card


def test_the_model_card_has_the_hub_metadata_and_the_curve(tmp_path, model):
    path = _editor(model).save_pretrained(tmp_path / "ed")
    assert sorted(p.name for p in path.iterdir()) == ["README.md", "config.json", "editor.safetensors"]
    card = ModelCard.load(path / "README.md")
    assert card.data.library_name == "hpredit" and card.data.base_model == "org/base-model"
    assert card.data.tags == ["hpredit", "activation-steering", "hpr"]
    text = card.text
    assert "## Strength → KL curve" in text and "| strength | KL (nats/token) |" in text
    assert "| 0.5 | 0.09 |" in text and "neutral text, 300 tokens" in text
    assert "| layer | val_probe_accuracy |" in text and "| 1 | 0.72 |" in text and "- validation: val split" in text
    assert 'Editor.from_pretrained("org/name")' in text and "hpredit serve --model org/base-model --editor hpr=" in text
    assert "layers | [0, 1, 2]" in text and "| angle_depth | 2 |" in text


def test_the_card_without_a_curve_or_a_hub_base_model(tmp_path, model):
    ed = _editor(model, curve=False)
    ed.model_fingerprint = dataclasses.replace(ed.model_fingerprint, name="tiny-llama")  # not a Hub id
    ed.metrics = {}
    card = ModelCard.load(ed.save_pretrained(tmp_path / "ed") / "README.md")
    assert card.data.library_name == "hpredit" and card.data.base_model is None
    assert "base_model" not in card.data.to_dict()
    assert "KL curve" not in card.text and "Validation metrics" not in card.text


@pytest.mark.parametrize("kind", ["iti", "caa-norm", "mirror", "spherical"])
def test_every_method_gets_a_card(tmp_path, model, kind):
    ed = random_editor(kind, model)
    card = ModelCard.load(ed.save_pretrained(tmp_path / "ed") / "README.md")
    assert card.data.tags == ["hpredit", "activation-steering", kind]
    assert f"# {kind} editor for tiny-llama" in card.text


def test_the_card_is_not_checksummed_and_not_needed(tmp_path, model, hub):
    cache, a, _ = hub
    path = a.save_pretrained(tmp_path / "ed")
    cfg = json.loads((path / "config.json").read_text())
    assert not any("README" in json.dumps(v) for k, v in cfg.items() if k.endswith("sha256"))
    (path / "README.md").write_text("---\nlibrary_name: [broken\n---\nedited by hand\n")  # tampered: documentation
    assert _same_edits(model, a, Editor.from_pretrained(path))
    (path / "README.md").unlink()  # an older artifact: no card
    assert _same_edits(model, a, Editor.from_pretrained(path))
    cache_commit(cache, "org/old", path, COMMIT_A)  # and from the Hub
    assert _same_edits(model, a, Editor.from_pretrained("org/old"))
    cfg["layers"] = [0, 1]  # tampering with config.json still fails its checksum
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(HpreditError, match=re.escape("config.json does not match its checksum (config_sha256)")):
        Editor.from_pretrained(path)


# ----------------------------------------------------------------------------- hpredit serve --editor


def test_serve_editor_specs_resolve_hub_repos_from_the_cache(hub, tmp_path, model):
    cache, a, b = hub
    local = a.save_pretrained(tmp_path / "local")
    snapshot = lambda commit: str(cache / "models--org--name" / "snapshots" / commit)  # noqa: E731
    specs = parse_editors([REPO, f"pinned={REPO}@dev", f"tag={REPO}@v1", f"mine={local}"])
    assert specs == {"default": REPO, "pinned": f"{REPO}@dev", "tag": f"{REPO}@v1", "mine": str(local)}
    assert resolve_editors(specs) == {
        "default": snapshot(COMMIT_A),
        "pinned": snapshot(COMMIT_B),
        "tag": snapshot(COMMIT_A),
        "mine": str(local),
    }
    assert resolve_editors(f"{REPO}@{COMMIT_B}") == {"default": snapshot(COMMIT_B)}
    with pytest.raises(HpreditError, match=re.escape("editor artifact org/unknown: not a local directory")):
        resolve_editors(parse_editors(["x=org/unknown"]))
    with pytest.raises(HpreditError, match=re.escape("repo org/name (revision v9) is not in the local cache")):
        resolve_editors({"x": f"{REPO}@v9"})
    # the whole check serve and llm() run before any engine starts: the editors against the model's config
    model_dir = tmp_path / "model"
    config = copy.deepcopy(model.config)
    config.architectures = ["LlamaForCausalLM"]  # what a saved model's config.json says
    config.save_pretrained(model_dir)
    editors, path, _, arch = check_editors({"t": f"{REPO}@dev", "u": REPO}, model_dir, strict=False, weights=False)
    assert editors == {"t": snapshot(COMMIT_B), "u": snapshot(COMMIT_A)} and arch == "LlamaForCausalLM"


# ----------------------------------------------------------------------------- push_to_hub


@pytest.fixture
def hf_api(monkeypatch):
    """HfApi's network calls recorded (and the uploaded folder's files kept) instead of made."""
    calls: list[tuple[str, dict]] = []
    uploaded: dict[str, bytes] = {}

    def create_repo(self, repo_id, **kw):
        calls.append(("create_repo", {"repo_id": repo_id, "token": self.token, **kw}))
        return f"https://huggingface.co/{repo_id}"

    def create_branch(self, repo_id, **kw):
        calls.append(("create_branch", {"repo_id": repo_id, **kw}))

    def upload_folder(self, **kw):
        calls.append(("upload_folder", kw))
        uploaded.update({p.name: p.read_bytes() for p in Path(kw["folder_path"]).iterdir()})
        return "commit-info"

    for name, fn in (("create_repo", create_repo), ("create_branch", create_branch), ("upload_folder", upload_folder)):
        monkeypatch.setattr(HfApi, name, fn)
    return calls, uploaded


def test_push_to_hub_uploads_the_three_files(hf_api, model, tmp_path, hub):
    calls, uploaded = hf_api
    cache, a, _ = hub
    assert a.push_to_hub("me/truthful", private=True, token="hf_secret", commit_message="first") == "commit-info"
    assert [c[0] for c in calls] == ["create_repo", "upload_folder"]
    assert calls[0][1] == {"repo_id": "me/truthful", "token": "hf_secret", "private": True, "exist_ok": True}
    upload = calls[1][1]
    assert upload["repo_id"] == "me/truthful" and upload["revision"] is None and upload["commit_message"] == "first"
    assert not Path(upload["folder_path"]).exists()  # a temporary directory, removed afterwards
    assert sorted(uploaded) == ["README.md", "config.json", "editor.safetensors"]
    card = ModelCard(uploaded["README.md"].decode())
    assert card.data.library_name == "hpredit" and 'Editor.from_pretrained("me/truthful")' in card.text
    # what was uploaded loads back (through the Hub cache) as the same editor
    files = tmp_path / "uploaded"
    files.mkdir()
    for name, data in uploaded.items():
        (files / name).write_bytes(data)
    cache_commit(cache, "me/truthful", files, COMMIT_B)
    assert _same_edits(model, a, Editor.from_pretrained("me/truthful"))


def test_push_to_hub_to_a_branch(hf_api, model):
    calls, _ = hf_api
    _editor(model).push_to_hub("me/truthful", revision="v2")
    assert [c[0] for c in calls] == ["create_repo", "create_branch", "upload_folder"]
    assert calls[1][1] == {"repo_id": "me/truthful", "branch": "v2", "exist_ok": True}
    assert calls[2][1]["revision"] == "v2" and calls[2][1]["commit_message"] == "Upload hpredit editor"


def test_push_to_hub_failures_are_one_error(hf_api, model, monkeypatch):
    calls, _ = hf_api
    with pytest.raises(HpreditError, match=re.escape("push_to_hub: 'not a repo/id/x' is not a Hugging Face Hub")):
        _editor(model).push_to_hub("not a repo/id/x")
    assert calls == []

    def refuse(self, **kw):
        raise OSError("401 Unauthorized\nmore detail")

    monkeypatch.setattr(HfApi, "upload_folder", refuse)
    with pytest.raises(HpreditError) as e:
        _editor(model).push_to_hub("me/truthful")
    assert str(e.value) == "push_to_hub me/truthful: 401 Unauthorized"


@pytest.mark.parametrize("spec", ["x=org/name@", "x=@v1", "org/na me", "a/b/c", "-"])
def test_serve_refuses_a_bad_editor_spec_in_a_real_process(spec, tmp_path):
    """Neither a directory nor a Hub repo id: one error line, exit status 2, before vLLM is imported."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "cache")}
    p = subprocess.run(
        [sys.executable, "-m", "hpredit", "serve", "--editor", spec],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=300,
    )
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert p.returncode == 2 and len(lines) == 1, p.stderr
    assert lines[0].startswith("error: editor artifact") and "is not a Hugging Face Hub repo id" in lines[0]
