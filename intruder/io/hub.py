"""Hugging Face Hub model IDs as checkpoints: `org/name` or `org/name@revision`.

`resolve(spec)` turns an ID into a local snapshot directory through `huggingface_hub`: a commit
already in the local cache is used without any network; a branch or tag costs one API call
(model info) to learn its commit, then only the files the scan needs are fetched (safetensors
weights and their index, config, tokenizer and adapter files; `.bin` only when the repository
has no safetensors), with progress on stderr. Offline (`HF_HUB_OFFLINE=1`, `--offline`) only the
cache is read. A local path of the same spelling always wins (the caller checks it first).
Gated, missing and not-cached-while-offline repositories give one line (CheckpointError).
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from ..errors import CheckpointError
from .atomic import atomic_file
from .jsonfile import read_json

DEFAULT_REVISION = "main"
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")
_NOT_REPO = (".safetensors", ".gguf", ".bin", ".pt", ".pth", ".json")
_FILE = re.compile(r"^(?:[A-Za-z0-9_][A-Za-z0-9._-]*/)*[A-Za-z0-9_][A-Za-z0-9._-]*"
                   r"\.(?:gguf|safetensors)$")
COMPANIONS = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "tokenizer.model", "special_tokens_map.json", "vocab.json", "merges.txt",
              "added_tokens.json", "chat_template.jinja", "adapter_config.json")
SAFE_INDEX = "model.safetensors.index.json"
PT_INDEX = "pytorch_model.bin.index.json"
DOWNLOAD_WORKERS = 4  # files fetched at once (huggingface_hub's snapshot_download uses 8)


@dataclass(frozen=True)
class ResolvedSource:
    """A hub ID resolved to files on this machine."""

    path: str  # the snapshot directory (models--org--name/snapshots/<commit>)
    repo_id: str
    revision: str  # as asked for (branch, tag or commit); "main" when none was given
    commit: str  # the commit sha the revision resolved to
    downloaded: tuple[str, ...] = ()  # files fetched by this call (empty: all from the cache)
    filename: str | None = None  # one file of the repository (path is then that file)


_settings = {"offline": None, "progress": True}


@contextlib.contextmanager
def settings(offline: bool | None = None, progress: bool = True) -> Iterator[None]:
    """Defaults for resolve() inside the block (the command line's --offline and -q)."""
    old = dict(_settings)
    _settings.update(offline=offline, progress=progress)
    try:
        yield
    finally:
        _settings.update(old)


def is_offline() -> bool:
    if _settings["offline"] is not None:
        return bool(_settings["offline"])
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.strip().upper() in ("1", "ON", "YES", "TRUE")


def parse(spec: str) -> tuple[str, str, str | None] | None:
    """(repo_id, revision, file or None) when `spec` reads as a hub model ID, else None.

    `org/name`, `org/name@rev` (rev may hold '/': refs/pr/1), and one weights file of the
    repository: `org/name/FILE` or `org/name@rev/FILE` (FILE ending .gguf or .safetensors; with
    @rev the revision then ends at the first '/')."""
    if not isinstance(spec, str):
        return None
    head, at, rev = spec.partition("@")
    parts = head.split("/")
    repo, filename = "/".join(parts[:2]), ("/".join(parts[2:]) if len(parts) > 2 else None)
    if at and filename is None:
        rev, slash, rest = rev.partition("/")
        if slash and _FILE.match(rest):
            filename = rest
        else:
            rev = rev + slash + rest
    if not _REPO_ID.match(repo) or "--" in repo or ".." in repo or repo.endswith((".", "-")) \
            or repo.lower().endswith(_NOT_REPO):  # a mistyped file path, not an ID
        return None
    if filename is not None and not _FILE.match(filename):
        return None
    if at and (not rev or any(c.isspace() for c in rev) or ".." in rev):
        return None
    return repo, rev or DEFAULT_REVISION, filename


def is_hub_id(spec: str) -> bool:
    """True for `org/name[@rev][/FILE]` that is not an existing local path (a path wins)."""
    return parse(spec) is not None and not os.path.lexists(spec)


def cache_dir() -> str:
    """The Hugging Face hub cache, read from the environment at call time."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return os.path.expanduser(os.environ[var])
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
        "huggingface")
    return os.path.join(os.path.expanduser(home), "hub")


def endpoint() -> str:
    return (os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")


def repo_folder(repo_id: str) -> str:
    return os.path.join(cache_dir(), "models--" + repo_id.replace("/", "--"))


def identify_snapshot(path: str) -> tuple[str, str] | None:
    """(repo_id, commit) when `path` is (a file inside) a hub cache snapshot directory."""
    d = os.path.abspath(path)
    if not os.path.isdir(d):
        d = os.path.dirname(d)
    parent = os.path.dirname(d)
    repo = os.path.basename(os.path.dirname(parent))
    if os.path.basename(parent) == "snapshots" and repo.startswith("models--") and \
            _COMMIT.match(os.path.basename(d)):
        return repo[len("models--"):].replace("--", "/"), os.path.basename(d)
    return None


def cached_commit(repo_id: str, revision: str) -> str | None:
    """The commit `revision` names in the local cache (refs/<revision>), without any network."""
    if _COMMIT.match(revision):
        return revision
    try:
        with open(os.path.join(repo_folder(repo_id), "refs", *revision.split("/"))) as fh:
            commit = fh.read().strip()
    except (OSError, UnicodeDecodeError):
        return None
    return commit if _COMMIT.match(commit) else None


def _log(msg: str) -> None:
    if _settings["progress"]:
        print(msg, file=sys.stderr, flush=True)


def resolve(spec: str, offline: bool | None = None) -> ResolvedSource:
    """Resolve `org/name[@revision]` to a complete local snapshot (see the module docstring)."""
    parsed = parse(spec)
    if parsed is None:
        raise CheckpointError(f"{spec}: not a Hugging Face model ID (org/name or org/name@rev)")
    repo_id, revision, filename = parsed
    offline = is_offline() if offline is None else offline
    src = None
    if _COMMIT.match(revision):  # immutable: a complete cached snapshot needs no network
        snap = os.path.join(repo_folder(repo_id), "snapshots", revision)
        if os.path.isdir(snap) and not missing_weights(snap, filename):
            src = _source(snap, repo_id, revision, revision, (), filename)
    if src is None and offline:
        src = _from_cache(spec, repo_id, revision, "offline (HF_HUB_OFFLINE=1 or --offline)",
                          filename)
    if src is None:
        src = _download(spec, repo_id, revision, filename)
    _log(f"hub: {repo_id}@{revision}{'/' + filename if filename else ''} is commit {src.commit} "
         f"({f'{len(src.downloaded)} file(s) downloaded' if src.downloaded else 'local cache'})")
    return src


def _source(snap, repo_id, revision, commit, downloaded, filename) -> ResolvedSource:
    path = os.path.join(snap, *filename.split("/")) if filename else snap
    return ResolvedSource(path, repo_id, revision, commit, tuple(downloaded), filename)


def _hub():
    try:
        import huggingface_hub
    except ImportError:
        raise CheckpointError("reading a hub model ID needs huggingface_hub "
                              "(pip install huggingface_hub), or give a local path") from None
    return huggingface_hub


def _from_cache(spec: str, repo_id: str, revision: str, why: str,
                filename: str | None = None) -> ResolvedSource:
    hh = _hub()
    try:
        snap = hh.snapshot_download(repo_id, revision=revision, cache_dir=cache_dir(),
                                    local_files_only=True)
    except Exception as exc:  # LocalEntryNotFoundError, IncompleteSnapshotError, ...
        raise CheckpointError(f"{spec}: no such local path, and not in the local Hugging Face "
                              f"cache ({cache_dir()}) and "
                              f"{why}; run once online, or give a local path "
                              f"({exc.__class__.__name__})") from exc
    missing = missing_weights(snap, filename)
    if missing:
        raise CheckpointError(f"{spec}: the cached snapshot {os.path.basename(snap)} lacks "
                              f"{missing[0]}{f' and {len(missing) - 1} more' if len(missing) > 1 else ''}"
                              f" and {why}; run once online to complete it")
    return _source(snap, repo_id, revision, os.path.basename(snap), (), filename)


def _error_line(spec: str, repo_id: str, revision: str, exc: BaseException) -> str:
    hh = _hub()
    err = hh.errors
    if isinstance(exc, err.GatedRepoError):
        return (f"{spec}: gated repository; accept its conditions on "
                f"{endpoint()}/{repo_id} and log in (`hf auth login` or HF_TOKEN)")
    if isinstance(exc, err.RevisionNotFoundError):
        return f"{spec}: repository {repo_id} has no revision {revision!r}"
    if isinstance(exc, err.RepositoryNotFoundError):
        return (f"{spec}: no such local path, and no model repository {repo_id} on {endpoint()} "
                f"(or it is private: log in with `hf auth login` or HF_TOKEN)")
    if isinstance(exc, err.EntryNotFoundError):
        return f"{spec}: a file listed by the hub could not be fetched ({exc.__class__.__name__})"
    if isinstance(exc, err.HfHubHTTPError):
        status = getattr(getattr(exc, "response", None), "status_code", "?")
        return f"{spec}: the hub at {endpoint()} answered HTTP {status}"
    return f"{spec}: cannot download from {endpoint()} ({exc.__class__.__name__})"


def _connection_error(exc: BaseException) -> bool:
    hh = _hub()
    if isinstance(exc, (hh.errors.OfflineModeIsEnabled, ConnectionError, TimeoutError)):
        return True
    name = type(exc).__name__
    return name in ("ConnectError", "ConnectTimeout", "ReadTimeout", "TimeoutException",
                    "ConnectionError", "NetworkError")


def _download(spec: str, repo_id: str, revision: str,
              filename: str | None = None) -> ResolvedSource:
    with _online():
        return _download_online(spec, repo_id, revision, filename)


@contextlib.contextmanager
def _online() -> Iterator[None]:
    """huggingface_hub reads HF_HUB_OFFLINE once, at import; is_offline() reads it (and
    --offline) now, and has decided that the network may be used."""
    from huggingface_hub import constants

    was = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = False
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = was


def _download_online(spec: str, repo_id: str, revision: str,
                     filename: str | None = None) -> ResolvedSource:
    hh = _hub()
    api = hh.HfApi(endpoint=endpoint())
    try:
        info = api.model_info(repo_id, revision=revision)
    except Exception as exc:
        if _connection_error(exc):
            _log(f"hub: {endpoint()} unreachable ({type(exc).__name__}); using the cached "
                 f"{repo_id}@{revision}")
            return _from_cache(spec, repo_id, revision, f"{endpoint()} is unreachable", filename)
        if isinstance(exc, hh.errors.HfHubHTTPError) or isinstance(exc, hh.errors.HFValidationError):
            raise CheckpointError(_error_line(spec, repo_id, revision, exc)) from exc
        raise
    commit = info.sha
    if not commit or not _COMMIT.match(commit):
        raise CheckpointError(f"{spec}: the hub gave no commit for revision {revision!r}")
    names = [s.rfilename for s in (info.siblings or [])]
    snap = os.path.join(repo_folder(repo_id), "snapshots", commit)
    fetched: list[str] = []

    def one(f: str) -> str:
        try:
            hh.hf_hub_download(repo_id, f, revision=commit, cache_dir=cache_dir(),
                               endpoint=endpoint())
        except Exception as exc:
            if isinstance(exc, hh.errors.HfHubHTTPError) or _connection_error(exc):
                raise CheckpointError(_error_line(spec, repo_id, revision, exc)) from exc
            raise
        return f

    def fetch(files: Sequence[str]) -> None:
        todo = [f for f in files if not os.path.exists(os.path.join(snap, f))]
        if not todo:
            return
        _log(f"hub: fetching {len(todo)} file(s) of {repo_id}@{commit[:12]} from {endpoint()}")
        with _progress(), ThreadPoolExecutor(max_workers=min(DOWNLOAD_WORKERS, len(todo))) as ex:
            fetched.extend(ex.map(one, todo))  # shards in parallel; the first error is raised

    if filename is not None:
        if filename not in names:
            raise CheckpointError(f"{spec}: repository {repo_id} has no file {filename!r} at "
                                  f"commit {commit[:12]}")
        first = [n for n in COMPANIONS if n in names and "adapter" not in n] + [filename]
        weights_of_index: Callable[[str], list[str]] = lambda snap: []  # noqa: E731
    else:
        first, weights_of_index = select_files(names)
    fetch(first)
    fetch(weights_of_index(snap))
    if revision != commit:
        _write_ref(repo_id, revision, commit)
    missing = missing_weights(snap, filename)
    if missing:
        raise CheckpointError(f"{spec}: after download, snapshot {commit[:12]} still lacks "
                              f"{missing[0]}")
    return _source(snap, repo_id, revision, commit, fetched, filename)


@contextlib.contextmanager
def _progress() -> Iterator[None]:
    from huggingface_hub.utils import (
        are_progress_bars_disabled,
        disable_progress_bars,
        enable_progress_bars,
    )

    was = are_progress_bars_disabled()
    if not _settings["progress"]:
        disable_progress_bars()
    try:
        yield
    finally:
        if not was and not _settings["progress"]:
            enable_progress_bars()


def _write_ref(repo_id: str, revision: str, commit: str) -> None:
    """refs/<revision> holds the commit, as huggingface_hub's own downloads leave it."""
    path = os.path.join(repo_folder(repo_id), "refs", *revision.split("/"))
    try:
        with open(path) as fh:
            if fh.read().strip() == commit:
                return
    except OSError:
        pass
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with atomic_file(path, "w", durable=False) as fh:
            fh.write(commit)
    except Exception:  # the ref only saves a lookup next time
        pass


def select_files(names: Sequence[str]) -> tuple[list[str], Callable[[str], list[str]]]:
    """The repository files a scan reads, in two steps: (small files first, a function of the
    snapshot directory giving the shards its index names). Never .bin when safetensors exist."""
    top = [n for n in names if "/" not in n]
    have = set(top)
    first = [n for n in COMPANIONS if n in have]
    st = sorted(n for n in top if n.endswith(".safetensors"))
    if "adapter_config.json" in have:
        w = "adapter_model.safetensors" if "adapter_model.safetensors" in have else (
            "adapter_model.bin" if "adapter_model.bin" in have else None)
        return first + ([w] if w else []), lambda snap: []
    if SAFE_INDEX in have:
        return first + [SAFE_INDEX], lambda snap: _shards(snap, SAFE_INDEX)
    if "model.safetensors" in have:
        return first + ["model.safetensors"], lambda snap: []
    if st:
        return first + st, lambda snap: []
    if PT_INDEX in have:
        return first + [PT_INDEX], lambda snap: _shards(snap, PT_INDEX)
    for n in ("pytorch_model.bin", "model.pt", "model.pth"):
        if n in have:
            return first + [n], lambda snap: []
    gguf = [n for n in names if n.endswith(".gguf")]
    extra = (f"; it holds {len(gguf)} GGUF file(s): download one and give its path"
             if gguf else "")
    raise CheckpointError(f"the repository holds no safetensors or PyTorch weights at its top "
                          f"level{extra}")


def _shards(snap: str, index: str) -> list[str]:
    doc = read_json(os.path.join(snap, index), CheckpointError, "checkpoint index")
    wm = doc.get("weight_map") if isinstance(doc, dict) else None
    if not isinstance(wm, dict):
        raise CheckpointError(f"{os.path.join(snap, index)}: no 'weight_map' object")
    out = sorted({v for v in wm.values() if isinstance(v, str)})
    bad = [v for v in out if v.startswith("/") or ".." in v.split("/")]
    if bad:
        raise CheckpointError(f"{os.path.join(snap, index)}: shard path {bad[0]!r} leaves the "
                              f"repository; refused")
    return out


def missing_weights(snap: str, filename: str | None = None) -> list[str]:
    """Weight files the snapshot needs but lacks ([] when a scan can open it); with `filename`,
    that one file."""
    def has(n: str) -> bool:
        return os.path.exists(os.path.join(snap, n))

    if filename is not None:
        return [] if has(filename) else [filename]
    if has("adapter_config.json"):
        return [] if has("adapter_model.safetensors") or has("adapter_model.bin") else \
            ["adapter_model.safetensors"]
    for index in (SAFE_INDEX, PT_INDEX):
        if has(index):
            try:
                return [s for s in _shards(snap, index) if not has(s)]
            except CheckpointError:
                return []  # the checkpoint loader names what is wrong with the index
    try:
        listing = os.listdir(snap)
    except OSError:
        return ["model.safetensors"]
    if any(n.endswith((".safetensors", ".bin", ".pt", ".pth")) for n in listing):
        return []
    return ["model.safetensors"]
