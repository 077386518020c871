"""Hub model ids, resolved from a local Hugging Face cache laid out as huggingface_hub lays it out
(models--ORG--NAME/{blobs,snapshots/<commit>,refs/<name>}), holding the tiny model under a made-up
repo id. HF_HUB_OFFLINE=1 (tests/conftest.py): nothing is downloaded."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from rayapp.models import hub
from rayapp.models.hub import HubModelError, HubRef, parse_hub_ref
from rayapp.models.io import ModelError, resolve_model, resolve_model_info

COMMIT_MAIN = "1" * 40
COMMIT_V1 = "a" * 40


def add_snapshot(cache: Path, repo_id: str, commit: str, files: dict[str, Path | bytes], refs=("main",)) -> Path:
    """Lay ``files`` out in ``cache`` the way huggingface_hub does: content-addressed blobs, a snapshot
    folder of symlinks to them, and refs naming the commit."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True, exist_ok=True)
    (repo / "blobs").mkdir(exist_ok=True)
    for name, src in files.items():
        data = src.read_bytes() if isinstance(src, Path) else src
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snap / name).symlink_to(Path("../../blobs") / blob.name)
    (repo / "refs").mkdir(exist_ok=True)
    for ref in refs:
        (repo / "refs" / ref).write_text(commit)  # huggingface_hub writes the hash without a newline
    return snap


@pytest.fixture
def hf_cache(tmp_path, tiny_model_dir, monkeypatch) -> Path:
    """$RAYAPP_HF_CACHE holding the tiny model as acme/tiny-chat (main and tag v1) and a .bin-only repo."""
    cache = tmp_path / "hf-cache"
    files = {p.name: p for p in tiny_model_dir.iterdir() if p.is_file()}
    add_snapshot(cache, "acme/tiny-chat", COMMIT_MAIN, files)
    add_snapshot(cache, "acme/tiny-chat", COMMIT_V1, files, refs=("v1",))
    add_snapshot(cache, "acme/bin-only", COMMIT_MAIN,
                 {"config.json": tiny_model_dir / "config.json", "pytorch_model.bin": b"not safetensors"})
    monkeypatch.setenv("RAYAPP_HF_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub._RESOLVED.clear()
    yield cache
    hub._RESOLVED.clear()


@pytest.mark.parametrize("ref, expected", [
    ("Qwen/Qwen2.5-0.5B-Instruct", HubRef("Qwen/Qwen2.5-0.5B-Instruct", None)),
    ("gpt2", HubRef("gpt2", None)),
    ("acme/tiny-chat@v1", HubRef("acme/tiny-chat", "v1")),
    ("acme/tiny-chat@refs/pr/3", HubRef("acme/tiny-chat", "refs/pr/3")),
    (f"acme/tiny-chat@{COMMIT_MAIN}", HubRef("acme/tiny-chat", COMMIT_MAIN)),
    ("outputs/sft_tiny/model", None),  # two slashes: a path
    ("./model", None),
    ("/abs/model", None),
    ("~/model", None),
    ("acme--x/y", None),
    ("acme/x..y", None),
    ("acme/x@", None),
    ("acme/x@has space", None),
])
def test_parse_hub_ref(ref, expected):
    assert parse_hub_ref(ref) == expected


def test_hub_id_resolves_from_the_cache_offline(hf_cache):
    info = resolve_model_info("acme/tiny-chat")
    assert info.source == "hub"
    assert info.path == hf_cache / "models--acme--tiny-chat" / "snapshots" / COMMIT_MAIN
    assert info.revision == COMMIT_MAIN and info.requested_revision == "main"
    assert info.pinned_ref == f"acme/tiny-chat@{COMMIT_MAIN}"
    assert info.record() == {
        "ref": "acme/tiny-chat", "source": "hub", "path": str(info.path), "repo_id": "acme/tiny-chat",
        "revision": COMMIT_MAIN, "requested_revision": "main",
    }
    # The pinned reference names the same files; resolve_model gives the directory itself.
    assert resolve_model(info.pinned_ref) == info.path
    assert resolve_model_info("acme/tiny-chat@v1").revision == COMMIT_V1


def test_hub_model_loads_with_transformers(hf_cache, tiny_model_dir):
    from rayapp.models.io import load_causal_lm, load_tokenizer

    tok = load_tokenizer("acme/tiny-chat@v1")
    model = load_causal_lm("acme/tiny-chat@v1")
    assert model.config.num_hidden_layers == json.loads((tiny_model_dir / "config.json").read_text())["num_hidden_layers"]
    assert tok("hello")["input_ids"]


def test_pinned_commit_is_read_from_the_cache_without_asking_the_hub(hf_cache, monkeypatch):
    """Online, a commit hash that the cache holds is answered from disk: workers handed pinned_ref do
    not each call the Hub (any call would raise here; huggingface_hub's own fallback catches only
    network errors)."""
    from huggingface_hub import HfApi

    def no_network(*args, **kwargs):
        raise AssertionError("the Hub was asked")

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(HfApi, "repo_info", no_network)
    monkeypatch.setattr(HfApi, "list_repo_tree", no_network)
    info = resolve_model_info(f"acme/tiny-chat@{COMMIT_V1}")
    assert info.revision == COMMIT_V1 and info.requested_revision == COMMIT_V1


def test_offline_and_not_cached_says_what_to_do(hf_cache):
    with pytest.raises(HubModelError) as e:
        resolve_model("acme/not-here", field="stages.teacher.model.path")
    msg = str(e.value)
    assert msg.startswith("stages.teacher.model.path 'acme/not-here': no such directory and not a built-in model")
    for part in ("HF_HUB_OFFLINE=1", str(hf_cache), "hf download acme/not-here", "RAYAPP_HF_CACHE",
                 "local model directory", "run once with network access"):
        assert part in msg, part
    with pytest.raises(HubModelError, match=r"acme/tiny-chat@v9 is not in the local cache.*--revision v9"):
        resolve_model("acme/tiny-chat@v9")


def test_hub_model_without_safetensors_is_refused(hf_cache):
    with pytest.raises(HubModelError, match="no \\*.safetensors weights; rayapp loads safetensors only"):
        resolve_model("acme/bin-only")


def test_default_cache_is_huggingface_hubs_own(hf_cache, monkeypatch):
    """Without RAYAPP_HF_CACHE the id is looked up in huggingface_hub's cache (HF_HUB_CACHE / HF_HOME)."""
    from huggingface_hub import constants

    monkeypatch.delenv("RAYAPP_HF_CACHE")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hf_cache))
    assert resolve_model_info("acme/tiny-chat").path.parents[2] == hf_cache
    empty = hf_cache.parent / "empty-cache"
    empty.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(empty))
    with pytest.raises(HubModelError, match=f"not in the local cache {empty}"):
        resolve_model("acme/tiny-chat@v1")


def test_paths_and_builtins_are_not_hub_ids(tmp_path, hf_cache, tiny_model_dir):
    with pytest.raises(ModelError, match="no such directory, and not a built-in model .* or a Hugging Face Hub id"):
        resolve_model("outputs/nothing/model")
    tiny = resolve_model_info("tiny")
    assert tiny.source == "builtin" and tiny.pinned_ref == "tiny" and tiny.path == tiny_model_dir
    # A directory is looked at before the Hub, even when its name reads as an id.
    local = tmp_path / "acme" / "tiny-chat"
    shutil.copytree(tiny_model_dir, local)
    info = resolve_model_info(str(local))
    assert info.source == "directory" and info.path == local.resolve() and info.pinned_ref == str(local.resolve())


def test_plan_reads_only_config_json_of_a_hub_model(hf_cache, tiny_model_dir):
    from rayapp.plan import model_shape

    shape = model_shape("acme/tiny-chat@v1")
    assert shape == model_shape(str(tiny_model_dir))
    assert shape.exact_params is not None


def test_explain_names_the_hub_syntax():
    from rayapp.config import explain

    text = explain("sft")
    assert "'ORG/NAME@REVISION'" in text and "HF_HUB_OFFLINE=1" in text and "RAYAPP_HF_CACHE" in text
