"""INTRUDER_* environment variables (intruder/settings.py): documented in one table, read only
there, garbage in any of them one line and exit 2 before any work, never a hang; and `cache
clear` saying what it did."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner

from intruder import settings
from intruder.cli import cli
from intruder.io import open_checkpoint, pair_checkpoints, read_ref
from intruder.types import ScanConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _scan(base, tuned, out, *extra):
    res = CliRunner().invoke(cli, ["scan", base, tuned, "-q", "-o", out, *extra])
    assert res.exit_code in (0, 3), res.output
    with open(out) as fh:
        return {l["name"]: l for l in json.load(fh)["layers"]}


# -- INTRUDER_* environment variables ----------------------------------------------------------

GARBAGE = {"INTRUDER_CACHE_DIR": " ", "INTRUDER_CACHE_MAX_GB": "nan",
           "INTRUDER_CPU_WORKERS": "0", "INTRUDER_STREAMS": "3x", "INTRUDER_READERS": "-1",
           "INTRUDER_HOST_BUDGET_MB": "-5", "INTRUDER_EXACT_DIM": "1e3",
           "INTRUDER_SLICE_MIN_DIM": "-1", "INTRUDER_HASH_WORKERS": "two",
           "INTRUDER_DATA_DIR": "   ",
           "INTRUDER_WIKITEXT": " "}


def test_every_knob_is_documented_and_has_a_garbage_case():
    doc = settings.__doc__
    assert set(GARBAGE) == set(settings.KNOBS)
    for name, knob in settings.KNOBS.items():
        assert name in doc and knob.meaning and knob.default


def test_knobs_are_read_only_through_settings():
    """No module but intruder/settings.py reads an INTRUDER_* variable from the environment."""
    offenders = []
    for d, _, files in os.walk(os.path.join(ROOT, "intruder")):
        for f in files:
            if not f.endswith(".py") or (f == "settings.py" and d.endswith("intruder")):
                continue
            text = open(os.path.join(d, f), encoding="utf-8").read()
            for line in text.splitlines():
                if ("environ" in line or "getenv" in line) and "INTRUDER_" in line:
                    offenders.append(f"{f}: {line.strip()}")
    assert offenders == []


@pytest.mark.parametrize("name", sorted(GARBAGE))
def test_garbage_in_a_knob_is_one_line_and_exit_2(synth, tmp_path, monkeypatch, name):
    monkeypatch.setenv(name, GARBAGE[name])
    res = CliRunner().invoke(cli, ["scan", synth["base_file"], synth["tuned_file"], "-q",
                                   "-o", str(tmp_path / "x.json")])
    assert res.exit_code == 2, res.output
    lines = [l for l in res.output.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"Error: ${name}="), res.output
    assert "Traceback" not in res.output and not (tmp_path / "x.json").exists()


def test_negative_readers_does_not_hang_the_library(synth):
    """The library (no command line): INTRUDER_READERS=-1 used to start no reader thread and
    wait forever; now one line, at once."""
    code = (f"import sys; sys.path.insert(0, {ROOT!r})\n"
            "from intruder.errors import IntruderError\n"
            "from intruder.scan import run_scan\n")
    code += ("try:\n    run_scan({!r}, {!r})\nexcept IntruderError as e:\n"
             "    print('ERR', e); sys.exit(2)\n".format(synth["base_file"], synth["tuned_file"]))
    env = dict(os.environ, INTRUDER_READERS="-1", PYTHONPATH=ROOT)
    p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 2 and "INTRUDER_READERS" in p.stdout, p.stdout + p.stderr[-2000:]


def test_pipeline_readers_and_streams_are_at_least_one(synth):
    from intruder.run.stream import Pipeline

    pairs = list(pair_checkpoints(open_checkpoint(synth["base_file"]),
                                  open_checkpoint(synth["tuned_file"])).pairs)
    p = Pipeline(pairs, lambda r: read_ref(r, {}), ScanConfig(), [torch.device("cpu")],
                 readers=-3, per_device=-1)
    assert p.n_readers >= 1 and p.per_device >= 1
    assert len(list(p)) == len(pairs)


# -- cache clear says what it did ---------------------------------------------------------------

def test_cache_clear_reports_what_it_removed(synth, tmp_path, monkeypatch):
    cache = str(tmp_path / "cache")
    r = CliRunner()
    res = r.invoke(cli, ["cache", "clear", "--cache-dir", cache])
    assert res.exit_code == 0 and res.output.startswith("nothing to remove"), res.output
    _scan(synth["base_file"], synth["tuned_file"], str(tmp_path / "c.json"), "--cache-dir", cache)
    os.makedirs(os.path.join(cache, "spectra-v1"))  # an older version's folder goes too
    open(os.path.join(cache, "spectra-v1", "x.safetensors"), "wb").write(b"old")

    def refuse(path, *a, **kw):
        raise PermissionError(13, "Permission denied", path)

    monkeypatch.setattr(os, "unlink", refuse)
    res = r.invoke(cli, ["cache", "clear", "--cache-dir", cache])
    assert res.exit_code == 1 and "removed" not in res.output.replace("could not remove", "")
    assert "could not remove" in res.output and "Permission denied" in res.output
    monkeypatch.undo()
    res = r.invoke(cli, ["cache", "clear", "--cache-dir", cache])
    assert res.exit_code == 0 and res.output.startswith("removed "), res.output
    assert not [f for _, _, fs in os.walk(cache) for f in fs]
