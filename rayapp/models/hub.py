"""Hugging Face Hub model ids: ``model.path: ORG/NAME`` or, pinned, ``ORG/NAME@REVISION``.

A model reference that is neither an existing directory nor a built-in name, and reads as a Hub
repo id, is fetched with ``huggingface_hub.snapshot_download`` into the Hugging Face cache and read
from there. ``@REVISION`` pins a branch, a tag or a commit hash (default: ``main``); a directory
whose name contains ``@`` is still a directory, because directories are looked at first.

- **Where**: ``$RAYAPP_HF_CACHE`` when set (a mount every node of a cluster reads: download once on
  the driver, every worker and engine reads the same files), else huggingface_hub's own cache
  (``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else ``~/.cache/huggingface/hub``) on each node.
- **Once**: the driver resolves the id (see :func:`rayapp.models.io.resolve_model_info`); workers
  and engines are then handed :attr:`ResolvedModel.pinned_ref`, ``ORG/NAME@<commit>``, which a node
  whose cache has that commit answers from disk without asking the Hub, and any other node fetches
  at exactly that commit. Within one process each id is resolved once.
- **Offline**: ``HF_HUB_OFFLINE=1`` (huggingface_hub's own switch) allows only the local cache
  (``local_files_only=True``); an id that is not there stops with what to do about it.
- **What is fetched**: config, tokenizer and generation files and ``*.safetensors`` weights (plus
  ``*.py`` for ``trust_remote_code`` models); never ``*.bin``/``*.pth``/GGUF copies, Mistral's
  ``consolidated*`` duplicates or Llama's ``original/`` folder. rayapp loads safetensors only.
- **Recorded**: :class:`ResolvedModel` carries the local path and the commit hash, for
  config.resolved.yaml (:meth:`ResolvedModel.record`).
- **Credentials**: private and gated models use huggingface_hub's token (``hf auth login`` or
  ``$HF_TOKEN``); rayapp never reads or logs it.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from rayapp.errors import UserError

# huggingface_hub's rule for repo ids: an optional namespace and a name, each [\w.-]{1,96}, not
# starting or ending with '-' or '.', without '--' or '..'. A path such as outputs/run/model (two
# slashes), ./x, /x or ~/x is never a repo id.
_PART = r"[A-Za-z0-9_](?:[\w.-]{0,94}[A-Za-z0-9_])?"
_HUB_ID = re.compile(rf"^(?:{_PART}/)?{_PART}$")
_REVISION = re.compile(r"^[\w./-]{1,200}$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")

ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken", "*.jinja", "*.py"]
IGNORE_PATTERNS = ["consolidated*", "original/*"]
_TRUE = {"1", "ON", "YES", "TRUE"}


class HubModelError(UserError, ValueError):
    """A Hub model id that cannot be used here, with what to do about it."""


@dataclass(frozen=True)
class HubRef:
    repo_id: str
    revision: str | None  # as written after '@'; None means the default branch

    def __str__(self) -> str:
        return f"{self.repo_id}@{self.revision}" if self.revision else self.repo_id


@dataclass(frozen=True)
class ResolvedModel:
    """Where a model reference was found. ``source``: 'directory', 'builtin' or 'hub'."""

    ref: str  # as written in the config
    path: Path  # local directory holding config.json and *.safetensors
    source: str  # 'directory', 'builtin', 'hub' or 'uri' (s3:// / gs://, downloaded into the local cache)
    repo_id: str | None = None  # hub models only
    revision: str | None = None  # hub models: the commit hash that was read
    requested_revision: str | None = None  # hub models: what the config asked for ('main' when nothing)

    @property
    def pinned_ref(self) -> str:
        """A reference that names exactly these weights on any node, to hand to workers and engines:
        ``ORG/NAME@<commit>`` for a Hub model (read from that node's cache, or fetched at that commit);
        the name of a built-in model (built the same way on every node); a directory's absolute path."""
        if self.source == "hub":
            return f"{self.repo_id}@{self.revision}"
        return self.ref if self.source in ("builtin", "uri") else str(self.path)

    def record(self) -> dict:
        """What config.resolved.yaml keeps about this model: the local path, and for a Hub model the
        repo id, the commit hash read and the revision asked for."""
        out = {"ref": self.ref, "source": self.source, "path": str(self.path)}
        if self.source == "hub":
            out.update(repo_id=self.repo_id, revision=self.revision, requested_revision=self.requested_revision)
        return out


def parse_hub_ref(ref: str) -> HubRef | None:
    """``ORG/NAME`` or ``ORG/NAME@REVISION`` -> HubRef; None when ``ref`` cannot be a Hub id."""
    repo_id, sep, revision = ref.partition("@")
    if not _HUB_ID.match(repo_id) or "--" in repo_id or ".." in repo_id:
        return None
    if sep and not _REVISION.match(revision):
        return None
    return HubRef(repo_id, revision if sep else None)


def hub_offline() -> bool:
    """HF_HUB_OFFLINE, read when asked (huggingface_hub reads it once, at import)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in _TRUE


def hub_cache_dir() -> Path | None:
    """$RAYAPP_HF_CACHE when set, else None: huggingface_hub's own default cache."""
    value = os.environ.get("RAYAPP_HF_CACHE", "").strip()
    return Path(value).expanduser().absolute() if value else None


def _cache_label(cache: Path | None) -> str:
    if cache is not None:
        return f"{cache} ($RAYAPP_HF_CACHE)"
    from huggingface_hub import constants

    return f"{constants.HF_HUB_CACHE} (huggingface_hub's cache: $HF_HUB_CACHE or $HF_HOME/hub)"


_RESOLVED: dict[tuple, ResolvedModel] = {}


def resolve_hub_model(ref: str, hub: HubRef, field: str = "model.path", not_local: str = "") -> ResolvedModel:
    """Fetch (or find in the cache) a Hub model and return where it lies, with its commit hash.

    ``not_local`` is prepended to errors: why ``ref`` was taken as a Hub id (no such directory, not
    a built-in name). Raises HubModelError with what to do (offline and not cached, unknown repo or
    revision, gated or private, no safetensors)."""
    from huggingface_hub import snapshot_download

    cache = hub_cache_dir()
    offline = hub_offline()
    key = (hub.repo_id, hub.revision, str(cache), offline)
    if key in _RESOLVED:
        return _RESOLVED[key]
    where = f"{field} '{ref}': {not_local}"
    revision = hub.revision or "main"
    kwargs = dict(repo_id=hub.repo_id, revision=revision, cache_dir=str(cache) if cache else None,
                  allow_patterns=ALLOW_PATTERNS, ignore_patterns=IGNORE_PATTERNS)
    path = None
    if not offline and _COMMIT.match(revision):
        # A commit never changes: a node whose cache has it reads it without asking the Hub.
        try:
            path = snapshot_download(local_files_only=True, **kwargs)
        except Exception:  # not (completely) cached: fetch it below
            path = None
    if path is None:
        try:
            path = snapshot_download(local_files_only=offline, **kwargs)
        except Exception as e:
            raise _explain(e, where, hub, cache, offline) from None
    snapshot = Path(path)
    _check_snapshot(snapshot, f"{where}the Hub model {hub} ({snapshot})")
    resolved = ResolvedModel(ref=ref, path=snapshot.absolute(), source="hub", repo_id=hub.repo_id,
                             revision=snapshot.name, requested_revision=revision)
    _RESOLVED[key] = resolved
    return resolved


def hub_config_json(ref: str, hub: HubRef, field: str = "model.path") -> Path:
    """Only config.json of a Hub model (for `rayapp plan`): from the cache, or that one small file."""
    from huggingface_hub import hf_hub_download

    cache = hub_cache_dir()
    offline = hub_offline()
    try:
        return Path(hf_hub_download(hub.repo_id, "config.json", revision=hub.revision or "main",
                                    cache_dir=str(cache) if cache else None, local_files_only=offline))
    except Exception as e:
        raise _explain(e, f"{field} '{ref}': ", hub, cache, offline) from None


def _explain(e: Exception, where: str, hub: HubRef, cache: Path | None, offline: bool) -> Exception:
    """huggingface_hub's error -> a HubModelError that says what to do (other errors pass through)."""
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    revision = hub.revision or "main"
    if isinstance(e, RevisionNotFoundError):
        return HubModelError(
            f"{where}the Hub model {hub.repo_id} has no revision '{revision}' (a branch, tag or 40-character "
            f"commit hash); see https://huggingface.co/{hub.repo_id}/tree/main for its branches")
    if isinstance(e, GatedRepoError):  # before RepositoryNotFoundError, its parent class
        return HubModelError(
            f"{where}{hub.repo_id} is a gated model: accept its terms on https://huggingface.co/{hub.repo_id} "
            "with your account, then log in here (`hf auth login`, or set HF_TOKEN)")
    if isinstance(e, RepositoryNotFoundError):
        return HubModelError(
            f"{where}there is no model {hub.repo_id} on the Hugging Face Hub, or it is private and this machine "
            "is not logged in (`hf auth login`, or set HF_TOKEN). Check the id, or give a local model directory")
    if isinstance(e, HFValidationError):
        return HubModelError(f"{where}not a valid Hub model id ({e})")
    if isinstance(e, EntryNotFoundError) and not isinstance(e, LocalEntryNotFoundError):
        return HubModelError(f"{where}the Hub model {hub} has no config.json; is it a transformers model?")
    if offline and isinstance(e, (LocalEntryNotFoundError, OSError)):
        return HubModelError(
            f"{where}as a Hugging Face Hub id, {hub} is not in the local cache {_cache_label(cache)}, and "
            f"HF_HUB_OFFLINE=1 allows nothing else. Either run once with network access (unset HF_HUB_OFFLINE), "
            f"or on a machine with network run `hf download {hub.repo_id}"
            f"{' --revision ' + revision if hub.revision else ''}` and copy its cache folder "
            "(~/.cache/huggingface/hub) here, into that cache or a folder you name with RAYAPP_HF_CACHE, "
            "or give a local model directory")
    if isinstance(e, (LocalEntryNotFoundError, OSError)):
        detail = str(e).splitlines()[0] if str(e) else "no detail"
        return HubModelError(
            f"{where}could not fetch {hub} from the Hugging Face Hub ({type(e).__name__}: {detail}), and it is "
            f"not in the cache {_cache_label(cache)}. Check the network (HTTPS_PROXY, HF_ENDPOINT for a mirror), "
            f"or download it elsewhere (`hf download {hub.repo_id}`) and copy that cache folder here "
            "(RAYAPP_HF_CACHE names it)")
    return e


def _check_snapshot(path: Path, what: str) -> None:
    if not (path / "config.json").exists():
        raise HubModelError(f"{what} has no config.json; is it a transformers model?")
    if not any(path.glob("*.safetensors")):
        raise HubModelError(
            f"{what} has no *.safetensors weights; rayapp loads safetensors only. Pick a revision or a copy of the "
            "model that has them (many repos have a 'refs/pr/N' conversion), or convert it yourself and give "
            "that directory"
        )
