"""Hostile and careless outputs and option values: every output target is checked before any
work, nothing but a regular file is ever replaced, an input is never written, a failing run
leaves the previous outputs as they were, and a closed or full stdout ends with one line instead
of a traceback. (Reports and JSON files from strangers: tests/test_hostile_report_files.py.)

Grouped by kind: output targets; scale and its outputs; stdout, option values and locale; exit
codes. Runs in process (CliRunner) except where the real stdout, the
locale or a signal matter.
"""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys

import hostile_corpus as hc
import hostile_reports as hr
import numpy as np
import pytest
from click.testing import CliRunner

from intruder import errors, exitcodes
from intruder.cli import cli

ROOT = hr.ROOT
CACHE, ENV, _private_cache, _remove_cache = hr.private_cache("intruder-outputs-cache-")


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return hr.scanned_pair(str(tmp_path_factory.mktemp("pair")))


_sha, _run, _error_line = hr.sha, hr.run_cli, hr.error_line


def _inputs_unchanged(pair):
    assert {k: _sha(pair[k]) for k in pair["snapshot"]} == pair["snapshot"]


# ------------------------------------------------------------------------------ output targets


def _specials(d):
    """A FIFO and a symlink (to a regular file) as output targets; root may not touch /dev."""
    fifo = os.path.join(d, "target.fifo")
    os.mkfifo(fifo)
    victim = os.path.join(d, "victim.txt")
    with open(victim, "w") as fh:
        fh.write("keep me\n")
    link = os.path.join(d, "target.link")
    os.symlink(victim, link)
    return fifo, link, victim


def _commands(pair, out, target):
    """Each command with `target` as one of its outputs; {OUT} outputs go to a fresh folder."""
    b, t = pair["base"], pair["tuned"]
    j = os.path.join
    return {
        "scan -o": ["scan", b, t, "-q", "-o", target],
        "scan --html": ["scan", b, t, "-q", "-o", j(out, "r.json"), "--html", target],
        "report -o": ["report", pair["report"], "-q", "-o", target],
        "compare -o": ["compare", b, t, "-q", "-o", target],
        "track --html": ["track", b, t, "-q", "-o", j(out, "t.json"), "--html", target],
        "scale --html": ["scale", "--scan", pair["report"], "--alpha", "0.5", "-q", "-o",
                         j(out, "s"), "--html", target],
    }


@pytest.mark.parametrize("kind", ["fifo", "symlink"])
def test_fifo_and_symlink_targets_are_refused_and_kept(pair, tmp_path, kind):
    """As root, `-o /dev/full` and `--html /dev/null` used to replace the device nodes with
    regular files; a FIFO and a symlink stand in for them here. Every command refuses them with
    one line, before any work, and leaves them exactly as they were."""
    fifo, link, victim = _specials(str(tmp_path))
    target = fifo if kind == "fifo" else link
    for name, args in _commands(pair, str(tmp_path / "out"), target).items():
        os.makedirs(tmp_path / "out", exist_ok=True)
        res = _run(args)
        line = _error_line(res)
        assert res.exit_code == 1, (name, line)
        assert target in line and ("FIFO" if kind == "fifo" else "symbolic link") in line, line
        assert "refusing to replace it" in line
        assert stat.S_ISFIFO(os.lstat(fifo).st_mode), name
        assert os.path.islink(link) and os.readlink(link) == victim, name
        assert open(victim).read() == "keep me\n"
        assert os.listdir(tmp_path / "out") == [], (name, os.listdir(tmp_path / "out"))
    _inputs_unchanged(pair)


def test_python_api_saves_through_the_same_gate(pair, tmp_path):
    import intruder

    fifo, link, victim = _specials(str(tmp_path))
    rep = intruder.scan(pair["base"], pair["tuned"], device="cpu")
    for path, expect in ((pair["tuned"], "overwrite the input"), (fifo, "is a FIFO"),
                         (link, "is a symbolic link")):
        for write in (rep.save, rep.to_html):
            with pytest.raises(errors.OutputError, match=expect):
                write(path)
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode) and os.readlink(link) == victim
    _inputs_unchanged(pair)


def test_atomic_writer_never_renames_onto_a_special_file(tmp_path):
    """Past the up-front check (a FIFO appearing in between): the writer itself refuses."""
    from intruder.io.atomic import write_text

    fifo = str(tmp_path / "late.fifo")
    os.mkfifo(fifo)
    with pytest.raises(errors.OutputError, match="is a FIFO; refusing to replace it"):
        write_text(fifo, "{}")
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    assert os.listdir(tmp_path) == ["late.fifo"]  # no temporary left


def test_an_input_is_never_an_output(pair, tmp_path):
    """By resolved path, by inode (a hard link to an input file, or to a shard inside an input
    model directory), and with folders that do not exist yet inside an input directory."""
    hard = str(tmp_path / "hard-link-to-tuned.json")
    os.link(pair["tuned"], hard)
    shard = os.path.join(pair["base_dir"], "model.safetensors")
    hard_shard = str(tmp_path / "hard-link-to-shard.html")
    os.link(shard, hard_shard)
    before_shard = _sha(shard)
    b, t = pair["base"], pair["tuned"]
    res = _run(["scan", pair["base_dir"], t, "-q", "-o", tmp_path / "rdir.json"])
    assert res.exit_code == 0, res.output
    cases = [
        (["report", pair["report"], "-q", "-o", pair["base"]], "overwrite the input"),
        (["report", pair["report"], "-q", "-o", pair["report"]], "overwrite the input"),
        (["scan", b, t, "-q", "-o", hard], "same file as the input"),
        (["scan", pair["base_dir"], t, "-q", "-o", str(tmp_path / "r.json"), "--html",
          hard_shard], "same file as the input"),
        (["report", str(tmp_path / "rdir.json"), "-q", "-o",
          os.path.join(pair["base_dir"], "sub", "deeper", "a.html")], "inside the input"),
        (["scan", pair["base_dir"], t, "-q", "-o",
          os.path.join(pair["base_dir"], "new", "r.json")], "inside the input"),
        (["scale", pair["base_dir"], t, "--alpha", "0.5", "-q", "-o",
          os.path.join(pair["base_dir"], "out")], "inside the input"),
    ]
    for args, expect in cases:
        res = _run(args)
        assert res.exit_code == 1, args
        line = _error_line(res)
        assert expect in line, (args, line)
    assert not os.path.exists(os.path.join(pair["base_dir"], "sub"))
    assert not os.path.exists(os.path.join(pair["base_dir"], "new"))
    assert not os.path.exists(os.path.join(pair["base_dir"], "out"))
    assert sorted(os.listdir(pair["base_dir"])) == ["config.json", "model.safetensors"]
    assert _sha(shard) == before_shard
    _inputs_unchanged(pair)


def test_two_outputs_of_one_command_never_coincide(pair, tmp_path):
    b, t = pair["base"], pair["tuned"]
    x = str(tmp_path / "x.json")
    out = str(tmp_path / "s")
    cases = [
        (["scan", b, t, "-q", "-o", x, "--html", x], "name the same path"),
        (["compare", b, t, "-q", "-o", x, "--html", x], "name the same path"),
        (["scale", "--scan", pair["report"], "--alpha", "0.5", "-q", "-o", out, "--html",
          pair["report"]], "overwrite the input"),
        (["scale", "--scan", pair["report"], "--alpha", "0.5", "-q", "-o", out, "--html",
          os.path.join(out, "scale-results.json")], "name the same path"),
        (["scale", b, t, "--alpha", "0.5", "-q", "-o", out, "--html",
          os.path.join(out, "intruder-scan.json")], "name the same path"),
    ]
    for args, expect in cases:
        res = _run(args)
        line = _error_line(res)
        assert res.exit_code == 1 and expect in line, (args, line)
        assert os.listdir(tmp_path) == [], (args, os.listdir(tmp_path))
    # two existing names of one file (a hard link) are one output too
    with open(x, "w") as fh:
        fh.write("old\n")
    y = str(tmp_path / "y.html")
    os.link(x, y)
    res = _run(["scan", b, t, "-q", "-o", x, "--html", y])
    assert res.exit_code == 1 and "is the same file as -o" in _error_line(res)
    assert open(x).read() == "old\n"
    _inputs_unchanged(pair)


def test_report_output_under_a_file_or_an_unwritable_folder(pair, tmp_path):
    """`report -o` used to end in a traceback from makedirs."""
    afile = tmp_path / "plain.txt"
    afile.write_text("x")
    res = _run(["report", pair["report"], "-q", "-o", str(afile / "sub" / "a.html")])
    line = _error_line(res)
    assert res.exit_code == 1 and str(afile) in line and "not a directory" in line
    ro = tmp_path / "ro"
    ro.mkdir()
    if not hc.immutable(ro):
        pytest.skip("cannot make a folder unwritable here")
    try:
        res = _run(["report", pair["report"], "-q", "-o", str(ro / "new" / "a.html")])
        line = _error_line(res)
        assert res.exit_code == 1 and "not writable" in line, line
        assert os.listdir(ro) == []
    finally:
        hc.mutable(ro)


def test_report_creates_missing_folders_and_removes_them_on_failure(pair, tmp_path,
                                                                     monkeypatch):
    from intruder.report import html

    target = tmp_path / "a" / "b" / "audit.html"
    res = _run(["report", pair["report"], "-q", "-o", str(target)])
    assert res.exit_code == 0, res.output
    assert target.is_file()

    def fail(*a, **k):
        raise errors.ReportError("drawing failed")

    monkeypatch.setattr(html, "write_html", fail)
    res = _run(["report", pair["report"], "-q", "-o", str(tmp_path / "c" / "d" / "x.html")])
    assert res.exit_code == 1
    assert not (tmp_path / "c").exists()


# ------------------------------------------------------------------------------ scale outputs


def test_failing_second_scale_run_keeps_the_previous_outputs(pair, tmp_path):
    """The second run scans again, then fails (its alpha overflows float32): the report of the
    first run, and its model, are as they were; no temporary is left."""
    out = tmp_path / "out"
    args = ["scale", pair["base"], pair["tuned"], "-q", "-o", str(out), "--epsilon", "0.9"]
    res = _run(args + ["--alpha", "0.5"])
    assert res.exit_code == 0, res.output
    first = {n: _sha(out / n) for n in os.listdir(out)}
    assert set(first) == {"intruder-scan.json", "alpha-0.5.safetensors", "scale-results.json"}
    res = _run(args[:-1] + ["0.8", "--alpha", "0.5,1e300", "--force"])
    line = _error_line(res)
    assert res.exit_code == 1 and "exceeds the range of F32" in line, line
    assert {n: _sha(out / n) for n in os.listdir(out)} == first
    # a failure after the new models are written (an evaluation, Ctrl-C): they were staged
    # beside the old ones and are discarded; the old ones stay
    from intruder import scale_sweep

    real = scale_sweep.scale_checkpoint
    written = []

    def write_then_fail(*a, **k):
        written.extend(r.path for r in real(*a, **k))
        assert all(os.path.exists(p) for p in written)
        raise KeyboardInterrupt

    scale_sweep.scale_checkpoint = write_then_fail
    try:
        res = _run(args[:-1] + ["0.8", "--alpha", "0.5,0.25", "--force"])
    finally:
        scale_sweep.scale_checkpoint = real
    assert res.exit_code == exitcodes.INTERRUPTED and len(written) == 2, res.output
    assert {n: _sha(out / n) for n in os.listdir(out)} == first  # nothing staged is left
    # without --force the existing model is refused before anything is scanned or written
    res = _run(args[:-1] + ["0.8", "--alpha", "0.5"])
    assert res.exit_code == 1 and "already exists (use --force" in _error_line(res)
    assert {n: _sha(out / n) for n in os.listdir(out)} == first
    _inputs_unchanged(pair)


@pytest.mark.parametrize("alpha", ["nan", "inf", "-inf", "1e400", "0.5,nan"])
def test_non_finite_alpha_is_refused_when_parsed(pair, tmp_path, alpha):
    res = _run(["scale", "--scan", pair["report"], "--alpha", alpha, "-q", "-o",
                str(tmp_path / "out")])
    assert res.exit_code == exitcodes.USAGE, res.output
    assert "--alpha must hold finite numbers" in res.stderr
    assert os.listdir(tmp_path) == []


def test_alpha_whose_weights_overflow_writes_nothing(pair, tmp_path, monkeypatch):
    """1e300 is refused from the recorded singular values before any output is opened; with
    that bound switched off, the check on each rescaled tensor refuses it before the rename."""
    from intruder import intervene

    out = tmp_path / "out"
    res = _run(["scale", "--scan", pair["report"], "--alpha", "1e300", "-q", "-o", str(out)])
    line = _error_line(res)
    assert res.exit_code == 1 and "--alpha 1e+300" in line and "nothing was written" in line
    assert not out.exists()
    monkeypatch.setattr(intervene, "overflow_alpha", lambda *a: False)
    res = _run(["scale", "--scan", pair["report"], "--alpha", "1e300", "-q", "-o", str(out)])
    line = _error_line(res)
    assert res.exit_code == 1 and "beyond the range of F32" in line, line
    assert not out.exists()


def test_in_memory_alpha_that_overflows_is_refused_and_undone(pair):
    """The in-memory sweep (--eval without --save-alpha) never evaluates inf weights: the
    rescaled float16 values overflow, the matrix is put back, one error."""
    import torch

    from intruder.inplace import InPlaceRescaler
    from intruder.io import open_checkpoint
    from intruder.report.schema import load_report

    ck = open_checkpoint(pair["tuned"])
    model = torch.nn.Module()
    for name in ck.refs:
        *path, leaf = name.split(".")
        mod = model
        for part in path:
            if not hasattr(mod, part):
                mod.add_module(part, torch.nn.Module())
            mod = getattr(mod, part)
        mod.register_parameter(leaf, torch.nn.Parameter(ck.read(name).float(),
                                                        requires_grad=False))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = load_report(pair["report"])
    r = InPlaceRescaler(model, report, storage_dtypes={l.name: torch.float16
                                                       for l in report.layers})
    with pytest.raises(errors.IntruderError, match="beyond the range of torch.float16"):
        r.set_alpha(1e9)
    r.restore()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_overflow_bound_is_a_lower_bound():
    """The bound used before writing never refuses an alpha whose result fits: checked against
    the exact rescaled matrix."""
    import torch

    from intruder.intervene import LayerIntruders, intruder_factors, overflow_alpha, rescale

    rng = np.random.default_rng(3)
    w = torch.tensor(rng.standard_normal((24, 16)), dtype=torch.float64)
    sig = torch.linalg.svdvals(w)
    sel = LayerIntruders("w", (0, 2), tuple(sig[:4].tolist()), 4, (24, 16))
    comp = intruder_factors(w, sel)
    for alpha in (1e30, 1e36, 1e37, 1e38, 1e39, 1e40, 1e300):
        exact = rescale(w, comp, alpha).to(torch.float32)
        if overflow_alpha(sel, alpha, torch.float32):
            assert not torch.isfinite(exact).all(), alpha
    assert overflow_alpha(sel, 1e300, torch.float32)
    assert not overflow_alpha(sel, 1e300, torch.float64)


# ------------------------------------------------------------- stdout, option values, locale


def _scan_cmd(pair, out, *extra):
    return [sys.executable, "-m", "intruder", "scan", pair["base"], pair["tuned"], "-q", "-o",
            str(out), *extra]


def test_stdout_on_dev_full_gives_one_line(pair, tmp_path):
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full")
    with open("/dev/full", "w") as full:  # written to, never replaced
        p = subprocess.run(_scan_cmd(pair, tmp_path / "r.json", "--json"), stdout=full,
                           stderr=subprocess.PIPE, text=True, env=ENV, timeout=120)
    assert p.returncode == exitcodes.ERROR, p.stderr
    assert p.stderr.splitlines() == [
        "Error: standard output: cannot write (No space left on device); the output files, if "
        "any, are complete"]
    assert json.loads((tmp_path / "r.json").read_text())["summary"]["layers_scanned"] == 7


def test_stdout_closed_by_the_reader_gives_one_line(pair, tmp_path):
    """`intruder scan ... | head`: the reader is gone before anything is written."""
    p = subprocess.Popen(_scan_cmd(pair, tmp_path / "r.json"), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=ENV)
    p.stdout.close()
    stderr = p.stderr.read()
    p.wait(timeout=120)
    assert p.returncode == exitcodes.BROKEN_PIPE, stderr
    assert stderr.splitlines() == [
        "Error: standard output: cannot write (Broken pipe); the output files, if any, are "
        "complete"]


@pytest.mark.parametrize("args", [
    ["scan", "{B}", "{T}", "--fail-on-margin", "nan"],
    ["scan", "{B}", "{T}", "--fail-on-strength", "inf"],
    ["scan", "{B}", "{T}", "--epsilon", "0.5,nan"],
    ["compare", "{B}", "{T}", "--fail-on-margin", "nan"],
    ["track", "{B}", "{T}", "--fail-on-strength", "-inf"],
    ["scale", "{B}", "{T}", "--alpha", "0.5", "--epsilon", "nan"],
])
def test_non_finite_option_values_are_refused(pair, tmp_path, args):
    args = [a.replace("{B}", pair["base"]).replace("{T}", pair["tuned"]) for a in args]
    res = CliRunner().invoke(cli, args + ["-q", "-o", str(tmp_path / "out")])
    assert res.exit_code == exitcodes.USAGE, res.output
    assert re.search(r"finite number", res.stderr), res.stderr
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("env", [{"LANG": "C", "LC_ALL": "C"},
                                 {"LC_ALL": "C", "PYTHONUTF8": "0"}])
def test_non_ascii_and_non_utf8_names_under_the_c_locale(pair, tmp_path, env):
    """Names that are not ASCII under LANG=C (with and without Python's UTF-8 mode), and a
    name whose bytes are not UTF-8 at all: scan, report and scale succeed, escape the name
    where it is shown, and the report reopens the file."""
    import shutil

    d = os.fsencode(str(tmp_path))
    base = os.path.join(d, "bäse-模型.safetensors".encode())
    tuned = os.path.join(d, b"tun\xe9d.safetensors")  # Latin-1 bytes: not UTF-8
    shutil.copy(pair["base"], base)
    shutil.copy(pair["tuned"], tuned)
    run_env = dict(ENV, **env)
    run_env.pop("PYTHONIOENCODING", None)
    report = os.path.join(d, "rapport-\xe9.json".encode())
    steps = [[b"scan", base, tuned, b"-q", b"-o", report, b"--epsilon", b"0.9",
              b"--html", os.path.join(d, b"scan-\xe9.html")],
             [b"report", report, b"-q", b"-o", os.path.join(d, b"audit-\xe9.html")],
             [b"scale", b"--scan", report, b"--alpha", b"0.5", b"-q", b"-o",
              os.path.join(d, b"scaled-\xe9")]]
    for args in steps:
        p = subprocess.run([os.fsencode(sys.executable), b"-m", b"intruder", *args],
                           capture_output=True, env=run_env, timeout=300)
        assert p.returncode == 0, p.stderr.decode("utf-8", "replace")
        assert b"Traceback" not in p.stderr
    page = open(os.path.join(d, b"audit-\xe9.html"), "rb").read().decode("utf-8")  # valid
    assert "tun\\xe9d.safetensors" in page
    assert os.path.isfile(os.path.join(d, b"scaled-\xe9", b"alpha-0.5.safetensors"))


# ---------------------------------------------------------------------------------- exit codes


def test_exit_codes_are_defined_once():
    """EXIT_* numbers live in intruder/exitcodes.py; elsewhere they are imported, not redefined."""
    pkg = os.path.join(ROOT, "intruder")
    defined = []
    for dirpath, _, files in os.walk(pkg):
        for f in files:
            if f.endswith(".py") and f != "exitcodes.py":
                text = open(os.path.join(dirpath, f)).read()
                defined += [(f, m) for m in re.findall(r"^\s*EXIT_\w+\s*=\s*\d+", text, re.M)]
                defined += [(f, m) for m in re.findall(r"ctx\.exit\((?:1|130|143)\)", text)]
                defined += [(f, m) for m in re.findall(r"exit_code\s*=\s*\d+", text)]
    assert defined == []


def test_gate_exit_codes(pair, tmp_path):
    res = _run(["scan", pair["base"], pair["tuned"], "-q", "-o", tmp_path / "r.json",
                "--epsilon", "0.9", "--fail-on-intruders"])
    assert res.exit_code == exitcodes.INTRUDERS
    res = _run(["scan", pair["base"], pair["tuned"], "-q", "-o", tmp_path / "r.json",
                "--fail-on-margin", "1"])
    assert res.exit_code == exitcodes.MARGIN
