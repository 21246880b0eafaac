#!/usr/bin/env python
"""Regenerate the committed example audits in reports/ from the bundled demo models.

    python reports/make_example.py                     # needs fixtures/demo (fixtures/build_demo.py)
    python reports/make_example.py --demo /tmp/demo --limit 20

For each fine-tune named by --tuned (default: LoRA r=1, then full fine-tuning for contrast):
scan it against the demo's base (epsilon 0.5, also counted at 0.7 and 0.9), save the scan JSON,
and write the HTML audit. The first fine-tune also gets the causal experiment: an alpha sweep
(`intruder scale`) evaluated on WikiText-2 (lm-eval protocol) and Social IQa multiple choice,
whose trade-off plot and table go into its audit. When that fine-tune has no intruder at epsilon
0.5 the sweep rescales those at the smallest of 0.7 / 0.9 that has some, and says so.

Paths are recorded relative to the repository root, so the pages read the same on any machine.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _rel(p: str) -> str:
    p = os.path.abspath(p)
    return os.path.relpath(p, REPO) if os.path.commonpath([p, REPO]) == REPO else p


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--demo", default=os.path.join(REPO, "fixtures", "demo"),
                    help="demo build directory (holds manifest.json)")
    ap.add_argument("--out", default=os.path.join(REPO, "reports"))
    ap.add_argument("--tuned", default="lora_r1,full_ft",
                    help="comma list of demo fine-tunes; the first gets the alpha sweep")
    ap.add_argument("--alphas", default="0,0.25,0.5,0.75,1")
    ap.add_argument("--limit", type=int, default=None,
                    help="documents / items per evaluator (default: all)")
    ap.add_argument("--data-dir", default=os.environ.get("INTRUDER_DATA_DIR")
                    or os.path.join(os.path.dirname(REPO), "shared", "data"))
    ap.add_argument("--no-sweep", action="store_true", help="skip the alpha sweep")
    args = ap.parse_args(argv)
    sys.path.insert(0, REPO)
    os.chdir(REPO)  # relative paths in the reports

    from intruder.report import views
    from intruder.report.html import write_html
    from intruder.report.schema import save_report
    from intruder.scan import run_scan
    from intruder.types import ScanConfig

    manifest_path = os.path.join(args.demo, "manifest.json")
    if not os.path.isfile(manifest_path):
        sys.exit(f"{manifest_path}: not found; build the demo first (python fixtures/build_demo.py)")
    with open(manifest_path) as fh:
        arts = {a["name"]: a for a in json.load(fh)["artefacts"]}
    base = _rel(os.path.join(args.demo, arts["base"]["path"]))
    os.makedirs(args.out, exist_ok=True)
    names = [n for n in args.tuned.split(",") if n]
    for i, name in enumerate(names):
        if name not in arts:
            sys.exit(f"{name}: not in {manifest_path} (have {', '.join(arts)})")
        tuned = _rel(os.path.join(args.demo, arts[name]["path"]))
        t0 = time.perf_counter()
        cmd = f"intruder scan {base} {tuned} --epsilon 0.5,0.7,0.9"
        report = run_scan(base, tuned, ScanConfig(epsilons=(0.5, 0.7, 0.9)), command=cmd)
        scan_json = os.path.join(args.out, f"{name}-scan.json")
        save_report(report, scan_json)
        print(f"{name}: {views.verdict(report).headline}", flush=True)
        scale = None
        tmp = None
        if i == 0 and not args.no_sweep:
            eps = next((e for e in (0.5, 0.7, 0.9) if views.sweep(report, (e,))[0][1]), None)
            if eps is None:
                print(f"{name}: no intruders even at epsilon 0.9; no sweep", flush=True)
            else:
                from intruder.scale_sweep import format_sweep, run_sweep

                tmp = tempfile.mkdtemp(prefix="intruder-example-")
                evals = [f"wikitext:{os.path.join(args.data_dir, 'wikitext-2-raw', 'wiki.test.raw')}",
                         f"task:{os.path.join(args.data_dir, 'social_i_qa', 'test.json')}"]
                alphas = [float(a) for a in args.alphas.split(",")]
                sweep = run_sweep(report, alphas, os.path.join(tmp, "sweep"), epsilon=eps,
                                  evals=evals, limit=args.limit, device="cpu", progress=True,
                                  log=lambda m: print(m, flush=True), scan_report=_rel(scan_json))
                print(format_sweep(sweep), flush=True)
                scale = os.path.join(args.out, f"{name}-scale-results.json")
                shutil.copyfile(sweep.files["json"], scale)
        html = os.path.join(args.out, f"audit-{name}.html")
        info = write_html(report, html, scale_results=scale,
                          command=f"python reports/make_example.py --tuned {args.tuned}")
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
        print(f"{name}: {html} ({info.bytes / 1e3:.0f} kB, {info.figures} figures, "
              f"{time.perf_counter() - t0:.1f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
