"""Hub model IDs, adapters' declared bases and content identity, offline and against a local
HTTP server that answers the few hub endpoints huggingface_hub calls (never the internet)."""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import shutil
import subprocess
import threading

import pytest
from click.testing import CliRunner

from intruder.cli import cli
from intruder.io import hub, identity

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(ROOT, "fixtures", "demo")
BASE = os.path.join(DEMO, "models", "base")
TUNED = os.path.join(DEMO, "models", "lora_r8")
ADAPTER = os.path.join(DEMO, "adapters", "lora_r8")
C_BASE = "1" * 40
C_TUNED = "2" * 40
C_TUNED_OLD = "3" * 40
C_LORA = "4" * 40


def _files(d):
    return {f: open(os.path.join(d, f), "rb").read() for f in sorted(os.listdir(d))}


def _blob_id(name, data):
    """As the hub names blobs: sha256 for LFS (weights), git's sha1 for small text files."""
    if name.endswith((".safetensors", ".bin")):
        return hashlib.sha256(data).hexdigest()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def add_to_cache(cache, repo_id, commit, files, refs=("main",)):
    """Lay out files as huggingface_hub does: blobs/<id>, snapshots/<commit>/<name> -> symlink
    into blobs, refs/<branch> holding the commit."""
    repo = os.path.join(cache, "models--" + repo_id.replace("/", "--"))
    os.makedirs(os.path.join(repo, "blobs"), exist_ok=True)
    snap = os.path.join(repo, "snapshots", commit)
    os.makedirs(snap, exist_ok=True)
    for name, data in files.items():
        bid = _blob_id(name, data)
        with open(os.path.join(repo, "blobs", bid), "wb") as fh:
            fh.write(data)
        os.symlink(os.path.join("..", "..", "blobs", bid), os.path.join(snap, name))
    for r in refs:
        os.makedirs(os.path.join(repo, "refs"), exist_ok=True)
        with open(os.path.join(repo, "refs", r), "w") as fh:
            fh.write(commit)
    return snap


def adapter_files(declared):
    files = _files(ADAPTER)
    cfg = json.loads(files["adapter_config.json"])
    cfg["base_model_name_or_path"] = declared
    files["adapter_config.json"] = json.dumps(cfg, indent=2).encode()
    return files


@pytest.fixture
def env(tmp_path, monkeypatch):
    cache = tmp_path / "hf"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("INTRUDER_CACHE_DIR", str(tmp_path / "intruder-cache"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def cached(env):
    """org/base (main), org/tuned (main and an older commit), org/lora declaring org/base."""
    cache = str(env / "hf")
    add_to_cache(cache, "org/base", C_BASE, _files(BASE))
    add_to_cache(cache, "org/tuned", C_TUNED, _files(TUNED))
    add_to_cache(cache, "org/tuned", C_TUNED_OLD, _files(os.path.join(DEMO, "models", "full_ft")),
                 refs=("v0",))
    add_to_cache(cache, "org/lora", C_LORA, adapter_files("org/base"))
    return env


def scan(args, expect=0):
    r = CliRunner().invoke(cli, ["scan", *args, "-q", "--no-cache"])
    assert r.exit_code == expect, (r.output, r.exception)
    return r


def load(path):
    with open(path) as fh:
        return json.load(fh)


def same_numbers(a, b):
    assert [l["name"] for l in a["layers"]] == [l["name"] for l in b["layers"]]
    for x, y in zip(a["layers"], b["layers"]):
        assert x["max_cos"] == y["max_cos"] and x["sigma_tuned"] == y["sigma_tuned"]
        assert [i["index"] for i in x["intruders"]] == [i["index"] for i in y["intruders"]]
    assert a["summary"]["total_intruders"] == b["summary"]["total_intruders"]


def test_parse_ids():
    assert hub.parse("org/name") == ("org/name", "main", None)
    assert hub.parse("org/name@v1.0") == ("org/name", "v1.0", None)
    assert hub.parse("org/name@" + C_BASE) == ("org/name", C_BASE, None)
    assert hub.parse("org/name@refs/pr/1") == ("org/name", "refs/pr/1", None)
    assert hub.parse("org/name/m-Q8_0.gguf") == ("org/name", "main", "m-Q8_0.gguf")
    assert hub.parse("org/name@v2/q/m.safetensors") == ("org/name", "v2", "q/m.safetensors")
    for bad in ("name", "org/name/sub", "./org/name", "org/name/", "/abs/path", "org/na--me",
                "org/..", "org/name@", "a/b@x y", "org/name.safetensors/x", "org/name/../x.gguf",
                "org/name/a.bin", "out/model.safetensors", "dir/model.gguf", "dir/x.json"):
        assert hub.parse(bad) is None, bad


def test_offline_ids_scan_like_paths(cached, monkeypatch):
    scan([BASE, TUNED, "-o", "paths.json"])
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    scan(["org/base", f"org/tuned@{C_TUNED}", "-o", "hub.json"])
    a, b = load("paths.json"), load("hub.json")
    same_numbers(a, b)
    assert b["schema_version"] == "1.2"
    assert (b["base"]["repo_id"], b["base"]["revision"], b["base"]["commit"]) == \
        ("org/base", "main", C_BASE)
    assert (b["tuned"]["repo_id"], b["tuned"]["revision"], b["tuned"]["commit"]) == \
        ("org/tuned", C_TUNED, C_TUNED)
    # the same bytes read through the cache's symlinks: the same content hashes
    assert a["base"]["sha256"] == b["base"]["sha256"] and a["tuned"]["sha256"] == b["tuned"]["sha256"]
    assert a["base"]["repo_id"] is None
    # the new fields validate (Draft 2020-12) and survive a reload
    import jsonschema

    from intruder.report.schema import SCHEMA, load_report

    jsonschema.Draft202012Validator(SCHEMA).validate(b)
    rep = load_report("hub.json")
    assert rep.tuned.commit == C_TUNED and rep.base.files[0]["sha256"] == b["base"]["files"][0]["sha256"]


def test_branch_and_tag_from_cache_with_flag(cached):
    scan(["org/base", "org/tuned@v0", "--offline", "-o", "tag.json"])
    scan([BASE, os.path.join(DEMO, "models", "full_ft"), "-o", "paths.json"])
    same_numbers(load("tag.json"), load("paths.json"))
    assert load("tag.json")["tuned"]["commit"] == C_TUNED_OLD


def test_adapter_alone_takes_its_declared_hub_base(cached):
    scan([BASE, ADAPTER, "-o", "paths.json"])
    r = scan(["org/lora", "--offline", "-o", "hub.json"])
    a, b = load("paths.json"), load("hub.json")
    same_numbers(a, b)
    assert b["base"]["repo_id"] == "org/base" and b["base"]["commit"] == C_BASE
    check = b["tuned"]["declared_base"]
    assert (check["declared"], check["status"], check["by"]) == ("org/base", "match", "commit")
    assert "Warning" not in r.stderr


def test_adapter_alone_local_relative_base():
    """The demo adapters declare 'models/base', relative to fixtures/demo: found upwards."""
    from intruder.io import open_checkpoint
    from intruder.io.basecheck import declared_base_spec

    spec = declared_base_spec(open_checkpoint(ADAPTER))
    assert os.path.samefile(spec, BASE)


def test_offline_not_cached_is_one_line(env):
    r = scan(["org/absent", TUNED, "--offline"], expect=1)
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("Error: org/absent: no such local path, and not in "
                                               "the local Hugging Face")
    assert "offline" in err[0] and "Traceback" not in r.output


def test_incomplete_snapshot_offline(env):
    files = _files(BASE)
    index = {"metadata": {}, "weight_map": {"x": "model-00001-of-00002.safetensors",
                                             "y": "model-00002-of-00002.safetensors"}}
    add_to_cache(str(env / "hf"), "org/sharded", C_BASE,
                 {"config.json": files["config.json"],
                  "model.safetensors.index.json": json.dumps(index).encode(),
                  "model-00001-of-00002.safetensors": files["model.safetensors"]})
    r = scan(["org/sharded", TUNED, "--offline"], expect=1)
    assert "lacks model-00002-of-00002.safetensors" in r.stderr


def test_local_path_wins_over_id(cached):
    os.makedirs("org")
    shutil.copytree(BASE, "org/base")
    scan(["org/base", TUNED, "-o", "local.json", "--offline"])
    doc = load("local.json")
    assert doc["base"]["path"] == "org/base" and doc["base"]["repo_id"] is None


def test_snapshot_path_names_repo_and_commit(cached):
    snap = os.path.join(str(cached / "hf"), "models--org--base", "snapshots", C_BASE)
    scan([snap, TUNED, "-o", "snap.json"])
    doc = load("snap.json")
    assert (doc["base"]["repo_id"], doc["base"]["commit"], doc["base"]["revision"]) == \
        ("org/base", C_BASE, None)


# ------------------------------------------------------------------------------------------------
# content identity
# ------------------------------------------------------------------------------------------------


def test_sha256_matches_sha256sum_and_differs_between_models(env):
    scan([BASE, TUNED, "-o", "r.json"])
    doc = load("r.json")
    for side, d in (("base", BASE), ("tuned", TUNED)):
        f = doc[side]["files"][0]
        path = os.path.join(d, f["name"])
        assert f["sha256"] == hashlib.sha256(open(path, "rb").read()).hexdigest()
        if shutil.which("sha256sum"):
            out = subprocess.run(["sha256sum", path], capture_output=True, text=True).stdout
            assert out.split()[0] == f["sha256"]
        digests = sorted(x["sha256"] for x in doc[side]["files"])
        assert doc[side]["sha256"] == hashlib.sha256(
            "".join(x + "\n" for x in digests).encode()).hexdigest()
        assert doc[side]["fingerprint"] == doc[side]["sha256"][:16]
    assert doc["base"]["sha256"] != doc["tuned"]["sha256"]
    assert doc["base"]["fingerprint"] != doc["tuned"]["fingerprint"]


def test_every_demo_model_has_its_own_fingerprint():
    from intruder.io import open_checkpoint

    dirs = [os.path.join(DEMO, "models", d) for d in sorted(os.listdir(os.path.join(DEMO, "models")))]
    prints = {open_checkpoint(d).info().fingerprint for d in dirs}
    assert len(prints) == len(dirs)


def test_digest_cache_avoids_rehash(env, monkeypatch):
    src = env / "m.safetensors"
    shutil.copy(os.path.join(BASE, "model.safetensors"), src)
    want = hashlib.sha256(src.read_bytes()).hexdigest()
    assert identity.sha256_file(str(src)) == want
    identity._jobs.clear()  # a new process: only the on-disk cache remains
    assert identity._cached(identity._key(str(src))) is None  # just written: not remembered
    monkeypatch.setattr(identity, "RACY_NS", 0)
    assert identity.sha256_file(str(src)) == want
    identity._jobs.clear()

    def boom(*a):
        raise AssertionError("hashed again")

    monkeypatch.setattr(identity, "_hash_file", boom)
    assert identity.sha256_file(str(src)) == want
    # a changed file (size or mtime) is hashed again
    identity._jobs.clear()
    with open(src, "ab") as fh:
        fh.write(b"\0")
    monkeypatch.undo()
    monkeypatch.setenv("INTRUDER_CACHE_DIR", str(env / "intruder-cache"))
    assert identity.sha256_file(str(src)) == hashlib.sha256(src.read_bytes()).hexdigest() != want


def test_scaled_output_metadata_names_input_digests(env):
    from safetensors import safe_open

    r = CliRunner().invoke(cli, ["scale", BASE, TUNED, "--alpha", "0.5", "-o", "out", "-q"])
    assert r.exit_code == 0, r.output
    doc = load("out/intruder-scan.json")
    out = [os.path.join(dp, f) for dp, _, fs in os.walk("out") for f in fs
           if f.endswith(".safetensors")]
    assert out
    with safe_open(out[0], "pt") as fh:
        meta = fh.metadata()
    assert meta["intruder.base_sha256"] == doc["base"]["sha256"]
    assert meta["intruder.tuned_sha256"] == doc["tuned"]["sha256"]
    assert json.loads(meta["intruder.tuned_files"]) == {"model.safetensors":
                                                         doc["tuned"]["files"][0]["sha256"]}


# ------------------------------------------------------------------------------------------------
# declared base
# ------------------------------------------------------------------------------------------------


def test_declared_base_mismatch_warns_and_strict_fails(env):
    other = os.path.join(DEMO, "models", "full_ft")
    r = scan([other, ADAPTER, "-o", "r.json", "--html", "r.html"])
    assert "Warning: adapter" in r.stderr and "differs from BASE" in r.stderr
    doc = load("r.json")
    check = doc["tuned"]["declared_base"]
    assert (check["status"], check["by"]) == ("mismatch", "sha256")
    assert any("declared base" in w for w in doc["warnings"])
    html = open("r.html").read()
    assert 'id="declared-base"' in html and "differs from BASE" in html
    r = scan([other, ADAPTER, "--strict-base"], expect=1)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "--strict-base: mismatch" in lines[0]
    # the declared base itself: a match by path, no warning, strict passes
    r = scan([BASE, ADAPTER, "--strict-base", "-o", "ok.json"])
    assert "Warning" not in r.stderr
    assert load("ok.json")["tuned"]["declared_base"]["status"] == "match"


def test_declared_base_same_content_elsewhere_matches(env):
    shutil.copytree(BASE, "copy-of-base")
    scan(["copy-of-base", ADAPTER, "-o", "r.json", "--strict-base"])
    check = load("r.json")["tuned"]["declared_base"]
    assert (check["status"], check["by"]) == ("match", "sha256")


def test_declared_hub_base_other_commit_warns(cached):
    add_to_cache(str(cached / "hf"), "org/lora2", C_LORA, adapter_files("org/tuned"))
    r = scan(["org/tuned@v0", "org/lora2", "--offline", "-o", "r.json"])
    check = load("r.json")["tuned"]["declared_base"]
    assert (check["status"], check["by"]) == ("mismatch", "commit")
    assert "Warning" in r.stderr


def test_compare_checks_declared_bases(env):
    other = os.path.join(DEMO, "models", "full_ft")
    r = CliRunner().invoke(cli, ["compare", other, ADAPTER, "-q", "--no-cache", "-o", "c.json"])
    assert r.exit_code == 0, r.output
    assert "Warning: adapter" in r.stderr
    r = CliRunner().invoke(cli, ["compare", other, ADAPTER, "-q", "--strict-base"])
    assert r.exit_code == 1 and "--strict-base" in r.stderr


# ------------------------------------------------------------------------------------------------
# downloads from a local server speaking the hub's few endpoints
# ------------------------------------------------------------------------------------------------


class _Hub(http.server.BaseHTTPRequestHandler):
    repos: dict = {}  # repo_id -> (commit, {name: bytes}, {revision: commit})
    gated: set = set()
    log: list = []

    def log_message(self, *a):
        pass

    def _send(self, code, body=b"", headers=None, head=False):
        self.send_response(code)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _route(self, head):
        self.log.append((self.command, self.path))
        parts = self.path.split("?")[0].strip("/").split("/")
        if parts[:2] == ["api", "models"]:
            repo_id = "/".join(parts[2:4])
            rev = parts[5] if len(parts) > 5 else "main"
            if repo_id in self.gated:
                return self._send(403, b'{"error": "gated"}', {"X-Error-Code": "GatedRepo"})
            if repo_id not in self.repos:
                return self._send(404, b'{"error": "not found"}', {"X-Error-Code": "RepoNotFound"})
            commit, files, refs = self.repos[repo_id]
            sha = refs.get(rev, rev if rev == commit else None)
            if sha is None:
                return self._send(404, b'{"error": "rev"}', {"X-Error-Code": "RevisionNotFound"})
            doc = {"id": repo_id, "modelId": repo_id, "sha": sha, "private": False,
                   "siblings": [{"rfilename": n} for n in files]}
            return self._send(200, json.dumps(doc).encode(), {"Content-Type": "application/json"})
        if len(parts) >= 5 and parts[2] == "resolve":
            repo_id, rev, name = "/".join(parts[:2]), parts[3], "/".join(parts[4:])
            commit, files, _ = self.repos.get(repo_id, (None, {}, {}))
            if rev != commit or name not in files:
                return self._send(404, b"", {"X-Error-Code": "EntryNotFound"}, head)
            data = files[name]
            etag = _blob_id(name, data)
            return self._send(200, data, {"X-Repo-Commit": commit, "ETag": f'"{etag}"',
                                          "Content-Type": "application/octet-stream"}, head)
        return self._send(404, b"", {}, head)

    def do_GET(self):
        self._route(False)

    def do_HEAD(self):
        self._route(True)


@pytest.fixture
def server(env, monkeypatch):
    tuned_files = _files(TUNED)
    tuned_files["pytorch_model.bin"] = b"never to be fetched"
    _Hub.repos = {"org/base": (C_BASE, _files(BASE), {"main": C_BASE}),
                  "org/tuned": (C_TUNED, tuned_files, {"main": C_TUNED, "v1": C_TUNED})}
    _Hub.gated = {"org/gated"}
    _Hub.log = []
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Hub)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{srv.server_address[1]}")
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    yield _Hub
    srv.shutdown()
    srv.server_close()


def test_download_then_scan(server):
    r = CliRunner().invoke(cli, ["scan", "org/base", "org/tuned@v1", "--no-cache", "-o", "dl.json"])
    assert r.exit_code == 0, (r.output, r.exception)
    assert "hub: fetching" in r.stderr
    fetched = {p for m, p in server.log if m == "GET" and "/resolve/" in p}
    assert not any(p.endswith(".bin") for p in fetched)  # safetensors exist: never the .bin
    assert any(p.endswith("/model.safetensors") for p in fetched)
    doc = load("dl.json")
    assert (doc["tuned"]["repo_id"], doc["tuned"]["revision"], doc["tuned"]["commit"]) == \
        ("org/tuned", "v1", C_TUNED)
    scan([BASE, TUNED, "-o", "paths.json"])
    same_numbers(doc, load("paths.json"))
    # cached now: a commit needs no network at all, a branch one API call, no file transfer
    server.log.clear()
    scan(["org/base@" + C_BASE, "org/tuned@" + C_TUNED, "-o", "again.json"])
    assert server.log == []
    scan(["org/base", "org/tuned@v1", "-o", "again.json"])
    assert all("/api/models/" in p for _, p in server.log)
    ref = os.path.join(str(server and os.environ["HF_HUB_CACHE"]), "models--org--tuned", "refs", "v1")
    assert open(ref).read() == C_TUNED
    # and offline, the snapshot huggingface_hub laid out serves the same IDs
    server.log.clear()
    scan(["org/base", "org/tuned@v1", "--offline", "-o", "offline.json"])
    assert server.log == []
    same_numbers(doc, load("offline.json"))


@pytest.mark.parametrize("spec,needle", [
    ("org/gated", "gated repository"),
    ("org/missing", "no such local path, and no model repository org/missing"),
    ("org/base@nope", "has no revision 'nope'"),
])
def test_hub_errors_are_one_line(server, spec, needle):
    r = scan([spec, TUNED], expect=1)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], r.stderr


def test_layers_accepts_an_id(server):
    r = CliRunner().invoke(cli, ["layers", "org/base", "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["repo_id"] == "org/base" and doc["commit"] == C_BASE


def test_track_checks_each_adapter_against_the_step_it_is_applied_to(env):
    steps = [os.path.join(DEMO, "adapters", f"continual_{i}") for i in (1, 2)]
    r = CliRunner().invoke(cli, ["track", BASE, *steps, "-q", "--no-cache", "-o", "t.json"])
    assert r.exit_code == 0, r.output
    doc = load("t.json")
    checks = [e["vs_base"]["tuned"]["declared_base"] for e in doc["entries"]]
    assert (checks[0]["status"], checks[0]["by"]) == ("match", "path")
    assert checks[1]["status"] == "unverified"  # applied to an adapter merged in memory
    assert "Warning" not in r.stderr


def test_report_inputs_fall_back_to_the_hub_commit(env):
    import dataclasses

    from intruder.intervene import resolve_inputs
    from intruder.report.schema import load_report

    scan([BASE, TUNED, "-o", "r.json"])
    rep = load_report("r.json")
    gone = dataclasses.replace(rep.base, path=str(env / "cleared-cache" / "snapshot"),
                               repo_id="org/base", commit=C_BASE)
    rep = dataclasses.replace(rep, base=gone)
    assert resolve_inputs(rep, "r.json") == (f"org/base@{C_BASE}", TUNED)


def test_eval_and_compare_take_ids_offline(cached):
    r = CliRunner().invoke(cli, ["eval", "org/absent", "--offline", "-q", "--limit", "1"])
    assert r.exit_code == 1 and r.stderr.count("\n") == 1 and "org/absent: no such local" in r.stderr
    from intruder.cli.hubopts import resolve_model  # what eval loads (its JSON's "source")

    with hub.settings(offline=True, progress=False):
        path, source = resolve_model("org/base")
    assert os.path.basename(path) == C_BASE and os.path.exists(os.path.join(path, "tokenizer.json"))
    assert source == {"repo_id": "org/base", "revision": "main", "commit": C_BASE}
    r = CliRunner().invoke(cli, ["compare", "org/base", "org/lora", f"org/tuned@{C_TUNED}",
                                 "--offline", "-q", "--no-cache", "-o", "c.json"])
    assert r.exit_code == 0, r.output
    doc = load("c.json")
    assert [e["vs_base"]["tuned"]["commit"] for e in doc["entries"]] == [C_LORA, C_TUNED]
    assert doc["entries"][0]["vs_base"]["tuned"]["declared_base"]["status"] == "match"


def test_unreachable_hub_falls_back_to_the_cache(cached, monkeypatch):
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there: connection refused at once
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    r = CliRunner().invoke(cli, ["scan", "org/base", TUNED, "--no-cache", "-o", "r.json"])
    assert r.exit_code == 0, r.output
    assert "unreachable" in r.stderr
    assert load("r.json")["base"]["commit"] == C_BASE
    r = scan(["org/uncached", TUNED], expect=1)
    assert "is unreachable" in r.stderr and r.stderr.count("\n") == 1


def test_scale_from_ids_writes_a_model_naming_its_sources(cached):
    from safetensors import safe_open

    r = CliRunner().invoke(cli, ["scale", "org/base", f"org/tuned@{C_TUNED}", "--alpha", "0.5",
                                 "-o", "out", "-q", "--offline"])
    assert r.exit_code == 0, (r.output, r.exception)
    out = [os.path.join(dp, f) for dp, _, fs in os.walk("out") for f in fs
           if f.endswith(".safetensors")]
    assert out and os.path.exists(os.path.join(os.path.dirname(out[0]), "config.json"))
    with safe_open(out[0], "pt") as fh:
        meta = fh.metadata()
    assert (meta["intruder.base_repo_id"], meta["intruder.base_commit"]) == ("org/base", C_BASE)
    assert meta["intruder.tuned_commit"] == C_TUNED and meta["intruder.tuned_revision"] == C_TUNED


def test_altered_cache_blob_is_refused(cached):
    snap = os.path.join(str(cached / "hf"), "models--org--tuned", "snapshots", C_TUNED)
    blob = os.path.realpath(os.path.join(snap, "model.safetensors"))
    data = bytearray(open(blob, "rb").read())
    data[-1] ^= 1  # one bit of one weight
    with open(blob, "wb") as fh:
        fh.write(data)
    r = scan(["org/base", f"org/tuned@{C_TUNED}", "--offline"], expect=1)
    assert "holds other bytes" in r.stderr and r.stderr.count("\n") == 1


def test_sharded_download_fetches_the_index_shards_only(server, synth):
    files = _files(synth["base_sharded"])
    assert sum(n.endswith(".safetensors") for n in files) == 2
    files["consolidated.safetensors"] = b"a second copy of the weights, never fetched"
    files["original/params.json"] = b"{}"
    server.repos["org/sharded"] = (C_BASE, files, {"main": C_BASE})
    r = CliRunner().invoke(cli, ["layers", "org/sharded", "--json"])
    assert r.exit_code == 0, (r.output, r.exception)
    got = {p.rsplit("/", 1)[-1] for m, p in server.log if m == "GET" and "/resolve/" in p}
    shards = {n for n in files if n.startswith("model-")}
    companions = {n for n in files if n in hub.COMPANIONS}
    assert got == shards | companions | {"model.safetensors.index.json"}


def test_one_file_of_a_repository_gguf(server, tmp_path):
    """A repository of quantized files: org/name/FILE fetches that file only."""
    import quantize_demo as qd

    q8, f16 = str(tmp_path / "m-Q8_0.gguf"), str(tmp_path / "m-F16.gguf")
    qd.write_gguf(BASE, q8, "Q8_0")
    qd.write_gguf(BASE, f16, "F16")
    files = {"m-Q8_0.gguf": open(q8, "rb").read(), "m-F16.gguf": open(f16, "rb").read(),
             "README.md": b"quants"}
    server.repos["org/quants"] = (C_TUNED_OLD, files, {"main": C_TUNED_OLD})
    scan(["org/base", "org/quants/m-Q8_0.gguf", "-o", "hub.json"])
    got = {p.rsplit("/", 1)[-1] for m, p in server.log if m == "GET" and "/org/quants/resolve/" in p}
    assert got == {"m-Q8_0.gguf"}
    doc = load("hub.json")
    assert (doc["tuned"]["repo_id"], doc["tuned"]["commit"]) == ("org/quants", C_TUNED_OLD)
    assert doc["tuned"]["files"][0]["sha256"] == hashlib.sha256(files["m-Q8_0.gguf"]).hexdigest()
    scan([BASE, q8, "-o", "paths.json"])
    same_numbers(doc, load("paths.json"))
    # offline, from the cache; a file the repository lacks is one line
    scan(["org/base", f"org/quants@{C_TUNED_OLD}/m-Q8_0.gguf", "--offline", "-o", "off.json"])
    r = scan(["org/base", "org/quants/m-Q4_0.gguf"], expect=1)
    assert "has no file 'm-Q4_0.gguf'" in r.stderr and r.stderr.count("\n") == 1
