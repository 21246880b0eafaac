"""The HTML audit in a real browser (Debian's chromium, headless): it renders, is not blank, logs
no errors, its inline script runs under the page's own Content Security Policy, and the table
sorts and filters. Install with `apt-get update && apt-get install -y chromium`."""

from __future__ import annotations

import os
import re
import subprocess

import numpy as np
import pytest
import synthetic

from intruder.report.html import write_html
from intruder.scan import run_scan
from intruder.types import ScanConfig

CHROMIUM = "/usr/bin/chromium"
pytestmark = pytest.mark.skipif(
    not os.path.exists(CHROMIUM),
    reason="chromium is not installed at /usr/bin/chromium (apt-get update && apt-get install -y "
           "chromium); the browser test needs it")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-quic", "--enable-logging=stderr", "--v=0"]
HOSTILE = "x<img src=x onerror=alert(1)>"


def chromium(tmp_path, url: str, *action: str):
    """Run headless chromium once with a fresh profile; returns (stdout, stderr)."""
    profile = tmp_path / f"profile-{len(list(tmp_path.glob('profile-*')))}"
    cmd = [CHROMIUM, *FLAGS, f"--user-data-dir={profile}", *action, url]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    return p.stdout, p.stderr


def page_errors(stderr: str):
    """Console messages, uncaught exceptions and CSP refusals that chromium logged."""
    return [l for l in stderr.splitlines()
            if "CONSOLE" in l or "Uncaught" in l or "Refused to" in l
            or "Content Security Policy" in l]


@pytest.fixture(scope="module")
def audit(tmp_path_factory):
    d = tmp_path_factory.mktemp("browser")
    base, tuned, _ = synthetic.llama_pair(layers=2, plants={
        "model.layers.1.mlp.up_proj.weight": [1, 4],
        "model.layers.0.self_attn.q_proj.weight": [2]}, seed=5, dense=False)
    bad = f"model.layers.0.mlp.{HOSTILE}.weight"
    for sd in (base, tuned):
        sd[bad] = sd.pop("model.layers.0.mlp.down_proj.weight")
    w0, wt, _ = synthetic.plant(*base[bad].shape, [0], seed=9)
    base[bad], tuned[bad] = w0.astype(np.float32), wt.astype(np.float32)
    sub = d / "dir<script>alert(2)</script"
    sub.mkdir(parents=True)  # the "/" makes it two levels; the path holds "<script>"
    synthetic.write_safetensors(str(sub / "base.safetensors"), base)
    synthetic.write_safetensors(str(sub / "tuned.safetensors"), tuned)
    rep = run_scan(str(sub / "base.safetensors"), str(sub / "tuned.safetensors"),
                   ScanConfig(epsilons=(0.5, 0.9)))
    out = d / "audit.html"
    write_html(rep, str(out), command="intruder report scan.json")
    return rep, out


def test_renders_not_blank_without_errors(audit, tmp_path):
    from PIL import Image

    rep, html = audit
    png = tmp_path / "shot.png"
    _, err = chromium(tmp_path, html.as_uri(), f"--screenshot={png}", "--window-size=1280,2000")
    assert png.exists(), err[-2000:]
    px = np.asarray(Image.open(png).convert("L"), dtype=float)  # (2000, 1280)
    assert px.shape == (2000, 1280)
    assert px.std() > 20  # text, figures and tables, not a blank page
    assert (px < 128).mean() > 0.01
    assert page_errors(err) == []


def test_script_ran_and_nothing_injected(audit, tmp_path):
    rep, html = audit
    dom, err = chromium(tmp_path, html.as_uri(), "--dump-dom")
    assert 'data-audit-js="ready"' in dom  # set by the inline script after it set up the table
    assert page_errors(err) == []
    imgs = re.findall(r"<img\b[^>]*>", dom)
    assert imgs and all('src="data:image/png;base64,' in i for i in imgs)
    assert len(re.findall(r"<tr data-name=", dom)) == len(rep.layers)
    assert "x&lt;img src=x onerror=alert(1)&gt;" in dom


def test_error_detector_sees_a_broken_page(tmp_path):
    """The checks above can fail: a throwing script is reported."""
    bad = tmp_path / "bad.html"
    bad.write_text("<!DOCTYPE html><html><body><p>x</p><script>notDefined();</script></body></html>")
    _, err = chromium(tmp_path, bad.as_uri(), "--dump-dom")
    assert any("notDefined" in l for l in page_errors(err))


def test_table_sorts_and_filters_in_the_browser(audit, tmp_path):
    """Drive the real table: click 'min max|cos|', type a filter, tick 'only with intruders'."""
    rep, html = audit
    page = html.read_text(encoding="utf-8")
    page = re.sub(r'<meta http-equiv="Content-Security-Policy"[^>]*>', "", page)  # admit the probe
    probe = """<script>
      var t = document.getElementById("layer-table");
      var th = Array.prototype.filter.call(t.tHead.rows[0].cells,
          function (c) { return c.textContent === "min max|cos|"; })[0];
      th.click(); th.click();  // numeric columns sort descending first: twice = ascending
      var order = Array.prototype.map.call(t.tBodies[0].rows,
          function (r) { return r.getAttribute("data-name"); });
      var f = document.getElementById("layer-table-filter");
      f.value = "mlp"; f.dispatchEvent(new Event("input"));
      var nMlp = document.getElementById("layer-table-shown").textContent;
      var only = document.getElementById("layer-table-only");
      only.checked = true; only.dispatchEvent(new Event("change"));
      var nBoth = document.getElementById("layer-table-shown").textContent;
      var out = document.createElement("pre"); out.id = "probe";
      out.textContent = JSON.stringify({order: order, mlp: nMlp, both: nBoth,
                                        sort: th.getAttribute("aria-sort")});
      document.body.appendChild(out);
    </script></body>"""
    harness = tmp_path / "harness.html"
    harness.write_text(page.replace("</body>", probe), encoding="utf-8")
    dom, err = chromium(tmp_path, harness.as_uri(), "--dump-dom")
    assert page_errors(err) == []
    import html as _html
    import json

    got = json.loads(_html.unescape(re.search(r'<pre id="probe">(.*?)</pre>', dom, re.S).group(1)))
    scanned = sorted((l for l in rep.layers if l.max_cos), key=lambda l: min(l.max_cos))
    unchanged = [l.name for l in rep.layers if not l.max_cos]
    assert got["order"] == [l.name for l in scanned] + unchanged  # missing values sort last
    assert got["sort"] == "ascending"
    assert int(got["mlp"]) == sum(1 for l in rep.layers if "mlp" in l.name.lower())
    assert int(got["both"]) == sum(1 for l in rep.layers if "mlp" in l.name.lower() and l.intruders)
