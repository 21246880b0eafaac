"""Hostile and broken inputs: one clear line, exit 1, inputs untouched, nothing written.

The corpus (tests/hostile_corpus.py) is run through the real entry point, `python -m intruder`, in
forked children of one warm interpreter (tests/cli_batch.py; a few cases are re-run as plain
subprocesses to show the two agree). Write failures and Ctrl-C are simulated in process and with a
real SIGINT to a subprocess.
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import re
import signal
import subprocess
import sys
import tempfile
import time

import hostile_corpus as hc
import hostile_reports as hr
import pytest
from click.testing import CliRunner

from intruder import errors
from intruder.cli import cli

TESTS = os.path.dirname(os.path.abspath(__file__))
CACHE, ENV, _private_cache, _remove_cache = hr.private_cache("intruder-hostile-cache-")


def _cases():
    with tempfile.TemporaryDirectory() as d:
        return hc.build_corpus(d)["cases"]


_CASES = _cases()
CASE_IDS = [c.id for c in _CASES]
SCAN_IDS = [c.id for c in _CASES if c.scan[0]]  # cases run_scan itself must refuse


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    built = hc.build_corpus(str(root / "corpus"))
    built["by_id"] = {c.id: c for c in built["cases"]}
    built["before"] = hc.snapshot(built["root"])
    built["outs"] = str(root / "outs")
    return built


def _fill(argv, out):
    return [a.replace("{OUT}", out) for a in argv]


@pytest.fixture(scope="module")
def batch(corpus, tmp_path_factory):
    """Run every case and both controls through `python -m intruder` once; {id: result}."""
    work = tmp_path_factory.mktemp("batch")
    jobs, keys = [], []
    registered = set(cli.commands)
    for c in corpus["cases"]:
        if c.needs and c.needs not in registered:
            continue
        out = os.path.join(corpus["outs"], c.id)
        os.makedirs(out)
        jobs.append({"argv": _fill(c.argv, out), "cwd": c.cwd or out, "timeout": 30})
        keys.append(c.id)
    for i, argv in enumerate(corpus["controls"]):
        out = os.path.join(corpus["outs"], f"control-{i}")
        os.makedirs(out)
        jobs.append({"argv": _fill(argv, out), "cwd": out, "timeout": 60})
        keys.append(f"control-{i}")
    (work / "jobs.json").write_text(json.dumps(jobs))
    subprocess.run([sys.executable, os.path.join(TESTS, "cli_batch.py"), str(work / "jobs.json"),
                    str(work / "results.json")], env=ENV, check=True, timeout=600)
    results = json.loads((work / "results.json").read_text())
    return dict(zip(keys, results))


def test_corpus_covers_the_issue(corpus):
    """At least 25 cases, and every kind of hostile input listed below is among them."""
    cases = corpus["cases"]
    assert len(cases) >= 25
    assert len({c.id for c in cases}) == len(cases)
    covers = {c.covers for c in cases}
    required = [
        "missing path", "directory without weights", "empty file", "truncated file",
        "random bytes", "header length larger than the file", "header that is not JSON",
        "header offsets inconsistent with the byte length",
        "header shape inconsistent with the byte length", "duplicate tensors",
        "overlapping tensors", "unsupported dtype", "index.json that is not JSON",
        "index.json naming a missing shard", "index.json naming a path outside the model directory",
        "a symlink leaving the model directory", "no tensor names in common",
        "shape mismatch (fine-tune of another base)", "shape mismatch (adapter of another base)",
        "NaN in a weight", "Inf in a weight", "adapter_config.json missing",
        "adapter_config.json not JSON", "unknown peft_type", "r inconsistent with the tensors",
        "PiSSA-style init unconverted", "a pickle that would execute code", "character device",
        "FIFO", "a hand-edited scan JSON violating the schema", "a hand-edited scan JSON given to scale",
        "-o pointing at an input file", "-o pointing into an input directory"]
    assert not [r for r in required if r not in covers]


@pytest.mark.parametrize("case_id", CASE_IDS)
def test_cli_fails_cleanly(case_id, corpus, batch):
    c = corpus["by_id"][case_id]
    if case_id not in batch:
        pytest.skip(f"`intruder {c.needs}` is not registered yet")
    r = batch[case_id]
    assert not r["timed_out"], f"{case_id}: hung (killed after 30 s)"
    lines = r["stderr"].splitlines()
    assert len(lines) == 1, f"{case_id}: stderr is not one line:\n{r['stderr']}"
    line = lines[0]
    assert line.startswith("Error: "), line
    assert r["rc"] == 1, (r["rc"], line)
    assert re.search(c.expect, line), f"{case_id}: {c.expect!r} not in {line!r}"
    missing = [n for n in c.names if n not in line]
    assert not missing, f"{case_id}: the message does not name {missing}: {line!r}"
    assert r["stdout"] == ""
    out = os.path.join(corpus["outs"], case_id)
    assert os.listdir(out) == [], f"{case_id}: left {os.listdir(out)} behind"
    if c.marker:
        assert not os.path.lexists(c.marker), f"{case_id}: the pickle payload ran"


@pytest.mark.parametrize("case_id", SCAN_IDS)
def test_library_raises_the_declared_error(case_id, corpus):
    """run_scan raises the IntruderError subclass the case declares (and nothing else)."""
    from intruder.scan import run_scan
    from intruder.types import ScanConfig

    c = corpus["by_id"][case_id]
    with pytest.raises(errors.IntruderError) as info:
        run_scan(c.scan[0], c.scan[1], ScanConfig(device="cpu"))
    assert type(info.value).__name__ == c.error, str(info.value)
    if c.marker:
        assert not os.path.lexists(c.marker)


def test_controls_succeed_and_write_only_the_report(corpus, batch):
    for i in range(len(corpus["controls"])):
        r = batch[f"control-{i}"]
        out = os.path.join(corpus["outs"], f"control-{i}")
        assert r["rc"] == 0 and r["stderr"] == "", r["stderr"]
        assert os.listdir(out) == ["report.json"]
        doc = json.loads(open(os.path.join(out, "report.json")).read())
        assert doc["summary"]["layers_scanned"] >= 2


def test_inputs_unchanged_and_nothing_written_beside_them(corpus, batch):
    """Every byte of every input is the same after all cases ran, and no file appeared."""
    assert batch  # all cases have run
    after = hc.snapshot(corpus["root"])
    assert after == corpus["before"]
    markers = os.path.join(corpus["root"], "markers")
    assert os.listdir(markers) == []


def test_forked_harness_matches_plain_subprocess(corpus, batch):
    """The fork harness reports what a plain `python -m intruder` reports, byte for byte."""
    ids = ["fifo_file", "pickle_code_execution_zip"]
    procs = []
    for case_id in ids:
        c = corpus["by_id"][case_id]
        out = tempfile.mkdtemp(dir=corpus["outs"])
        procs.append((case_id, out, subprocess.Popen(
            [sys.executable, "-m", "intruder"] + _fill(c.argv, out), cwd=out, env=ENV,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)))
    for case_id, out, p in procs:
        stdout, stderr = p.communicate(timeout=120)  # a FIFO read would hang here
        b = batch[case_id]
        assert (p.returncode, stdout, stderr.replace(out, "")) == (
            b["rc"], b["stdout"], b["stderr"].replace(os.path.join(corpus["outs"], case_id), ""))
        assert os.listdir(out) == []


# ------------------------------------------------------------------------ the dangerous pickles


def test_pickle_payloads_are_live_but_never_run(tmp_path, corpus):
    """The corpus pickles do execute code when unpickled the unsafe way; intruder never does."""
    import torch

    from intruder.io import open_checkpoint

    for fmt in ("legacy", "zip"):
        marker = tmp_path / f"ran-{fmt}"
        path = hc.evil_pickle(str(tmp_path / f"evil-{fmt}.bin"), str(marker), fmt)
        with pytest.raises(errors.CheckpointError, match="refused: the pickle calls posix.mkdir"):
            open_checkpoint(path)
        assert not marker.exists()
        if fmt == "legacy":
            with open(path, "rb") as fh:
                pickle.load(fh)  # what an unsafe loader would do
        else:
            torch.load(path, weights_only=False)
        assert marker.is_dir(), "the payload is not live; the refusal test would prove nothing"


# ------------------------------------------------------------------------ FIFOs and devices


def test_special_files_are_never_opened(corpus, monkeypatch):
    """The type is checked with stat before any open: a FIFO is never opened (an open for reading
    would block until a writer appears), a device never read."""
    import builtins

    from intruder.io import open_checkpoint

    opened = []
    real_open, real_os_open = builtins.open, os.open

    def spy_open(file, *a, **k):
        opened.append(os.fspath(file) if isinstance(file, (str, os.PathLike)) else file)
        return real_open(file, *a, **k)

    def spy_os_open(path, *a, **k):
        opened.append(os.fspath(path))
        return real_os_open(path, *a, **k)

    monkeypatch.setattr(builtins, "open", spy_open)
    monkeypatch.setattr(os, "open", spy_os_open)
    r = corpus["root"]
    fifo = os.path.join(r, "fifo", "tuned.safetensors")
    specials = ["/dev/null", "/dev/zero", fifo, os.path.join(r, "fifo-dir", "model.safetensors"),
                os.path.join(r, "fifo-adapter", "adapter_config.json")]
    for given in ("/dev/null", "/dev/zero", fifo, os.path.join(r, "fifo-dir"),
                  os.path.join(r, "fifo-adapter")):
        with pytest.raises(errors.CheckpointError, match="not a regular file"):
            open_checkpoint(given)
    assert not [p for p in opened if p in specials]
    clean = os.path.join(r, "clean", "tuned.safetensors")
    open_checkpoint(clean)
    assert clean in opened, "the spy does not see opens; it would prove nothing"


def test_file_swapped_for_fifo_after_the_check_cannot_block(tmp_path, monkeypatch):
    """Race: the path is a regular file at the stat, a FIFO at the open. The non-blocking open and
    the fstat on the descriptor refuse it instead of blocking."""
    from intruder.io import safetensors_file as sf

    path = str(tmp_path / "x.safetensors")
    hc.write_st(path, {"w": hc.model_tensors(0)["model.norm.weight"]})
    real_check = sf.check_regular_file

    def check_then_swap(p, what="checkpoint"):
        st = real_check(p, what)
        os.unlink(p)
        os.mkfifo(p)
        return st

    monkeypatch.setattr(sf, "check_regular_file", check_then_swap)
    t0 = time.monotonic()
    with pytest.raises(errors.CheckpointError, match=r"not a regular file \(a FIFO\)"):
        sf.parse_header(path)
    assert time.monotonic() - t0 < 5


# ------------------------------------------------------------------------ outputs


def _scan_args(corpus, out):
    return ["scan", os.path.join(corpus["root"], "clean", "base.safetensors"),
            os.path.join(corpus["root"], "clean", "tuned.safetensors"), "-q", "-o", out]


def _one_error_line(result) -> str:
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


_immutable, _mutable = hc.immutable, hc.mutable  # a folder even root cannot write to


def test_read_only_output_directory(tmp_path, corpus):
    """A directory that really refuses writes (immutable, so even root cannot create a file)."""
    from intruder.io.atomic import write_text

    ro = tmp_path / "ro"
    ro.mkdir()
    (ro / "keep.txt").write_text("old")
    if not _immutable(ro):
        pytest.skip("cannot make a directory read-only here (chattr unavailable)")
    try:
        with pytest.raises(OSError):  # the premise: the directory really refuses a new file
            open(ro / "probe", "w")
        out = str(ro / "report.json")
        res = CliRunner().invoke(cli, _scan_args(corpus, out))
        line = _one_error_line(res)
        assert res.exit_code == 1 and line.startswith("Error: ") and out in line
        assert "not writable" in line or "cannot write" in line
        # past the up-front check too: the atomic writer itself fails cleanly
        with pytest.raises(errors.OutputError, match=re.escape(out) + ": cannot write"):
            write_text(out, "{}")
        assert sorted(os.listdir(ro)) == ["keep.txt"]
        assert (ro / "keep.txt").read_text() == "old"
    finally:
        _mutable(ro)


class _FailingFile:
    """Wraps the temporary report file: passes the first `after` bytes, then raises `exc`."""

    def __init__(self, fh, after, exc):
        self._fh, self._left, self._exc = fh, after, exc

    def write(self, data):
        if len(data) > self._left:
            self._fh.write(data[: self._left])
            self._fh.flush()
            self._left = 0
            raise self._exc
        self._left -= len(data)
        return self._fh.write(data)

    def __getattr__(self, name):
        return getattr(self._fh, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return self._fh.__exit__(*exc)


@pytest.mark.parametrize("exc,code,message", [
    (OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), 1, "No space left on device"),
    (KeyboardInterrupt(), 130, "Interrupted"),
])
def test_failure_midway_through_writing_leaves_nothing(tmp_path, corpus, monkeypatch, exc, code,
                                                       message):
    """The report write fails (disk full) or is interrupted after 100 bytes: the old report is
    intact, no temporary file is left, one line on stderr."""
    from intruder.io import atomic

    out = tmp_path / "out"
    out.mkdir()
    (out / "report.json").write_text("previous report\n")
    seen = []
    real_fdopen = os.fdopen

    def failing_fdopen(fd, *a, **k):
        fh = real_fdopen(fd, *a, **k)
        target = os.readlink(f"/proc/self/fd/{fd}")
        if os.path.dirname(target) != str(out):
            return fh
        seen.append(sorted(os.listdir(out)))  # the temporary file exists at this point
        return _FailingFile(fh, 100, exc)

    monkeypatch.setattr(atomic.os, "fdopen", failing_fdopen)
    res = CliRunner().invoke(cli, _scan_args(corpus, str(out / "report.json")))
    line = _one_error_line(res)
    assert res.exit_code == code and message in line, line
    if code == 1:
        assert line.startswith("Error: ") and str(out / "report.json") in line
    assert len(seen) == 1 and len(seen[0]) == 2  # the write really started on a temporary file
    assert seen[0][0].startswith(".report.json.") and seen[0][0].endswith(".tmp")
    assert os.listdir(out) == ["report.json"]
    assert (out / "report.json").read_text() == "previous report\n"


_SIGINT_DRIVER = r"""
import os, sys, time
ready, where = sys.argv[1], sys.argv[2]
def pause(*a, **k):
    open(ready, "w").close()
    time.sleep(60)  # SIGINT arrives here
if where == "write":
    import intruder.io.atomic as m
    m.os.fsync = pause  # the temporary file is written, not yet renamed
else:
    import intruder.run.driver as m
    real = m.scan_pairs
    def scan_pairs(*a, **k):  # midway through the scan: after the second layer's result
        for i, result in enumerate(real(*a, **k)):
            if i == 2:
                pause()
            yield result
    m.scan_pairs = scan_pairs
from intruder.cli import main
sys.argv = ["intruder"] + sys.argv[3:]
main()
"""


@pytest.mark.parametrize("sig,code,word", [(signal.SIGINT, 130, "Interrupted"),
                                           (signal.SIGTERM, 143, "Terminated")])
def test_real_signal_midway_leaves_nothing(tmp_path, corpus, sig, code, word):
    """A real SIGINT / SIGTERM to `intruder scan`, once midway through the scan and once while
    the report's temporary file is on disk: exit 130 / 143, one line, no output, no temporary
    file, old report kept."""
    procs = []
    for where in ("scan", "write"):
        out = tmp_path / where
        out.mkdir()
        (out / "report.json").write_text("previous report\n")
        ready = tmp_path / f"ready-{where}"
        p = subprocess.Popen([sys.executable, "-c", _SIGINT_DRIVER, str(ready), where]
                             + _scan_args(corpus, str(out / "report.json")),
                             env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        procs.append((where, out, ready, p))
    for where, out, ready, p in procs:
        t0 = time.monotonic()
        while not ready.exists():
            assert p.poll() is None, p.communicate()
            assert time.monotonic() - t0 < 120
            time.sleep(0.05)
        if where == "write":
            assert len(os.listdir(out)) == 2  # report.json + the temporary file
        p.send_signal(sig)
        stdout, stderr = p.communicate(timeout=60)
        assert p.returncode == code, stderr
        assert stderr.splitlines() == [f"{word}; no partial output was left behind."]
        assert stdout == ""
        assert os.listdir(out) == ["report.json"]
        assert (out / "report.json").read_text() == "previous report\n"


# ------------------------------------------------------------------------ scan reports


@pytest.mark.parametrize("edit", sorted(hc.REPORT_EDITS))
def test_hand_edited_report_is_refused_by_load_report(tmp_path, edit):
    from intruder.report.schema import load_report

    path = hc.hand_edited_report(str(tmp_path / "intruder-scan.json"), edit)
    with pytest.raises(errors.ReportError) as info:
        load_report(path)
    msg = str(info.value)
    assert path in msg and re.search(hc.REPORT_EDITS[edit], msg), msg
    assert "\n" not in msg


def test_unedited_report_loads(tmp_path):
    """The control for the edits above: the same document without an edit is valid."""
    from intruder.report.schema import load_report

    path = str(tmp_path / "r.json")
    hc.hand_edited_report(path, "future_major")
    doc = json.loads(open(path).read())
    doc["schema_version"] = "1.0"
    hc.write_json(path, doc)
    rep = load_report(path)
    assert rep.layers[0].intruders[0].index == 0 and rep.config.top_k == 2


# ------------------------------------------------------------------------ names from strangers


def test_hostile_tensor_names_cannot_drive_the_terminal_or_the_page(tmp_path):
    """A tensor name carrying terminal escapes, a line break, a bidi override and HTML: the table
    shows it escaped, the JSON keeps it exactly, the HTML page does not execute it."""
    from intruder.report.table import printable

    base, tuned, name = hc.hostile_names_pair(str(tmp_path))
    out = tmp_path / "out"
    out.mkdir()
    res = CliRunner().invoke(cli, ["scan", base, tuned, "-q", "-o", str(out / "r.json")])
    assert res.exit_code == 0, res.output
    for text in (res.stdout, res.stderr):
        assert not [ch for ch in "\x1b\x07\r\u202e" if ch in text]
    assert printable(name) in res.stdout  # the table row: named, escaped, on one line
    assert "\\x1b[2J" in printable(name) and "\\u202e" in printable(name)
    doc = json.loads((out / "r.json").read_text())
    layer = [l for l in doc["layers"] if l["name"] == name]
    assert layer and [i["index"] for i in layer[0]["intruders"]] == [0]
    res = CliRunner().invoke(cli, ["report", str(out / "r.json"), "-q", "-o", str(out / "r.html")])
    assert res.exit_code == 0, res.output
    page = (out / "r.html").read_text()
    assert "<script>alert(1)" not in page and "<img src=x>" not in page


def test_html_audit_keeps_stderr_clean_with_hostile_names(tmp_path):
    base, tuned, name = hc.hostile_names_pair(str(tmp_path))
    out = tmp_path / "out"
    out.mkdir()
    proc = subprocess.run([sys.executable, "-m", "intruder", "scan", base, tuned, "-q", "-o",
                           str(out / "r.json"), "--html", str(out / "r.html")],
                          env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
