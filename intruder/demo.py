"""The bundled demo: audit tiny LoRA and full fine-tunes of one base end to end, into reports/.

    python -m intruder.demo [--demo fixtures/demo] [--out reports] [--limit N] [--alphas 0,0.5,1]

Steps (each prints what it measured, with its protocol):
1. the demo models (fixtures/demo, built by fixtures/build_demo.py when missing);
2. `intruder scan` of every single-step fine-tune against the base: counts per epsilon;
3. `intruder compare` (base decomposed once) with a provenance verdict per fine-tune;
4. `intruder track` over the three-step continual-learning chain;
5. `intruder scale` on the LoRA r=1 and r=8 fine-tunes: an alpha sweep evaluated on WikiText-2 (lm-eval
   wikitext protocol) and on held-out fine-tuning text (token loss), the paper's causal experiment;
6. HTML audits and reports/demo/SUMMARY.md, every number produced by this run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping

from . import settings
from .evaluate import register
from .evaluate.wikitext import WikitextEvaluator
from .report.html import write_html
from .report.schema import save_report
from .report.summary import summary
from .report.table import scan_table
from .report.track_view import write_track_html
from .scale_sweep import format_sweep, run_sweep
from .scan import run_scan
from .track import dumps as track_dumps
from .track import run_compare, run_track
from .types import ScanConfig, ScanReport

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SWEEP_EPS = (0.5, 0.3, 0.4, 0.6, 0.7, 0.8, 0.9)  # first decides the listed intruders
SINGLE = ("lora_r1", "lora_r8", "rslora_r64", "full_ft")
CHAIN = ("continual_1", "continual_2", "continual_3")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _rel(p: str) -> str:
    p = os.path.abspath(p)
    return os.path.relpath(p, REPO) if os.path.commonpath([p, REPO]) == REPO else p


def ensure_models(demo: str, data_dir: str) -> dict[str, dict]:
    """The manifest's artefacts by name; builds the demo models first if they are missing."""
    manifest = os.path.join(demo, "manifest.json")
    if not os.path.isfile(manifest):
        script = os.path.join(REPO, "fixtures", "build_demo.py")
        log(f"[1/6] building the demo models into {demo} (seeded, about 6-12 minutes on 2 cores)")
        subprocess.run([sys.executable, script, "--out", demo, "--data-dir", data_dir], check=True)
    with open(manifest) as fh:
        return {a["name"]: a for a in json.load(fh)["artefacts"]}


def heldout_text(data_dir: str, path: str, per_task: int = 150, seed: int = 0) -> int:
    """Write the fine-tuning items the demo held out (same seeded split as the build)."""
    sys.path.insert(0, os.path.join(REPO, "fixtures"))
    from pathlib import Path

    import demo_data  # noqa: E402  (the builder's own split, so the text is truly held out)

    tasks = demo_data.load_tasks(Path(data_dir), per_task, seed)
    texts = demo_data.texts_for(tasks, "mix", "heldout")
    with open(path, "w", encoding="utf-8") as fh:
        fh.write("\n\n".join(texts) + "\n")
    return len(texts)


def counts_table(reports: Mapping[str, ScanReport]) -> list[str]:

    eps = sorted(SWEEP_EPS)
    head = "| fine-tune | " + " | ".join(f"eps {e:g}" for e in eps) + \
        " | matrices with one at 0.5 | lowest max\\|cos\\| | verdict |"
    lines = [head, "|" + " --- |" * (len(eps) + 4)]
    for name, rep in reports.items():
        s = summary(rep)
        c = s["counts_by_epsilon"]
        prov = s.get("provenance") or {}
        verdict = prov.get("verdict", "") if isinstance(prov, dict) else str(prov)
        lines.append(f"| {name} | " + " | ".join(str(c[format(e, 'g')]) for e in eps) +
                     f" | {s['layers_with_intruders']} / {s['layers_scanned']} | "
                     f"{s['min_max_cos']:.3f} | {verdict} |")
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--demo", default=os.path.join(REPO, "fixtures", "demo"))
    ap.add_argument("--out", default=os.path.join(REPO, "reports"))
    ap.add_argument("--data-dir", default=settings.data_dir()
                    or os.path.join(os.path.dirname(REPO), "shared", "data"))
    ap.add_argument("--alphas", default="0,0.25,0.5,0.75,1")
    ap.add_argument("--sweep-model", default="lora_r1,lora_r8",
                    help="comma list of demo fine-tunes that get the alpha sweep")
    ap.add_argument("--limit", type=int, default=20,
                    help="WikiText test articles per evaluation (0: all 62; the default keeps "
                         "the sweep to a few minutes on 2 cores)")
    args = ap.parse_args(argv)
    t_start = time.perf_counter()
    os.chdir(REPO)  # reports record repository-relative paths
    wikitext = os.path.join(args.data_dir, "wikitext-2-raw", "wiki.test.raw")
    if not os.path.isfile(wikitext):
        sys.exit(f"{wikitext}: not found; set INTRUDER_DATA_DIR to the shared data directory")
    arts = ensure_models(args.demo, args.data_dir)
    path = {n: _rel(os.path.join(args.demo, a["path"])) for n, a in arts.items()}
    out = os.path.join(args.out, "demo")
    os.makedirs(out, exist_ok=True)
    config = ScanConfig(epsilons=SWEEP_EPS, device="cpu")
    md = ["# Demo audit: LoRA vs full fine-tuning on the bundled tiny models", "",
          f"Produced by `bash scripts/demo.sh` (`python -m intruder.demo`) on "
          f"{time.strftime('%Y-%m-%d')}; every number below comes from that run.", ""]

    # 2. scans
    log("[2/6] scanning each fine-tune against the base (Algorithm 1, top-10 left vectors)")
    reports = {}
    for name in SINGLE + (("lora_r1_adapter",) if "lora_r1_adapter" in arts else ()):
        tuned = path[name]
        cmd = f"intruder scan {path['base']} {tuned} --epsilon {','.join(map(str, SWEEP_EPS))}"
        rep = run_scan(path["base"], tuned, config, command=cmd)
        save_report(rep, os.path.join(out, f"{name}-scan.json"))
        s = summary(rep)
        log(f"  {name}: {s['total_intruders']} intruders at epsilon 0.5 in "
            f"{s['layers_with_intruders']} of {s['layers_scanned']} matrices "
            f"({s['seconds']:.1f} s)")
        reports[name] = rep
    adapter_rep = reports.pop("lora_r1_adapter", None)
    md += ["## 1. Intruder counts per epsilon", "",
           "Left singular vectors, top k = 10 of each tuned matrix, max |cos| against every base "
           "left singular vector; counts over the 28 projection matrices (4 layers x q,k,v,o,gate,"
           "up,down). Verdict: `intruder.provenance` from the spectrum of Wt - W0.", ""]
    md += counts_table(reports) + [""]
    if adapter_rep is not None:
        same = ([len(l.intruders) for l in adapter_rep.layers] ==
                [len(l.intruders) for l in reports["lora_r1"].layers])
        md += [f"Scanning the PEFT adapter directory of lora_r1 instead of its merged model gives "
               f"{summary(adapter_rep)['total_intruders']} intruders at 0.5 "
               f"({'the same per-matrix counts' if same else 'DIFFERENT per-matrix counts'}).", ""]

    # 3. compare
    log("[3/6] intruder compare: all single-step fine-tunes, base decomposed once")
    cmp = run_compare(path["base"], [path[n] for n in SINGLE], config,
                      command="intruder compare " + " ".join([path["base"]] + [path[n] for n in SINGLE]))
    with open(os.path.join(out, "compare.json"), "w") as fh:
        fh.write(track_dumps(cmp) + "\n")
    write_track_html(cmp, os.path.join(out, "compare.html"))

    # 4. track
    chain = [n for n in CHAIN if n in arts]
    if chain:
        log("[4/6] intruder track: the continual-learning chain")
        tr = run_track(path["base"], [path[n] for n in chain], config,
                       command="intruder track " + " ".join([path["base"]] + [path[n] for n in chain]))
        with open(os.path.join(out, "track.json"), "w") as fh:
            fh.write(track_dumps(tr) + "\n")
        write_track_html(tr, os.path.join(out, "track.html"))
        md += ["## 2. Continual learning (intruder track)", "",
               "Each step is a LoRA r=8 fine-tune of the previous step's merged model "
               "(WinoGrande, then Social IQa, then prose). Counts at epsilon 0.5, against the "
               "original base and against the previous step:", "",
               "| step | vs base | vs previous |", "| --- | --- | --- |"]
        for i, e in enumerate(tr.entries):
            vb = sum(len(l.intruders) for l in e.vs_base.layers)
            vp = (sum(len(l.intruders) for l in e.vs_previous.layers)
                  if e.vs_previous is not None else "-")
            md.append(f"| {chain[i]} | {vb} | {vp} |")
        md.append("")

    # 5. scale sweeps
    sweep_names = [n for n in args.sweep_model.split(",") if n]
    log(f"[5/6] intruder scale on {', '.join(sweep_names)}: alpha sweep, WikiText-2 + held-out "
        f"task text")
    # lm-eval wikitext metrics on the first N test articles (the held-out task text stays whole)
    wt_name = f"wikitext-first{args.limit}" if args.limit else "wikitext-lmeval"
    register(wt_name, lambda arg: WikitextEvaluator(path=arg, stride=None, limit=args.limit or None),
             f"{wt_name}[:PATH]")
    scale_json = {}
    md += ["## 3. Rescaling the intruders (intruder scale)", ""]
    tmp = tempfile.mkdtemp(prefix="intruder-demo-")
    try:
        held = os.path.join(tmp, "heldout-finetune-text.txt")
        n_held = heldout_text(args.data_dir, held)
        md += [f"W' = Wt + (alpha - 1) * sum over the intruders (epsilon 0.5) of sigma_j u_j v_j^T. "
               f"WikiText-2 test: lm-eval wikitext protocol ("
               f"{'all 62 articles' if not args.limit else f'first {args.limit} articles'}). "
               f"Task text: next-token loss (nats/token) and next-token accuracy on {n_held} "
               f"held-out WinoGrande + Social IQa fine-tuning items (the build's own split).", ""]
        alphas = [float(a) for a in args.alphas.split(",")]
        for name in sweep_names:
            sweep = run_sweep(reports[name], alphas, os.path.join(tmp, f"sweep-{name}"),
                              evals=[f"{wt_name}:{wikitext}", f"task:{held}"],
                              limit=None, device="cpu", progress=True, log=log,
                              scan_report=_rel(os.path.join(out, f"{name}-scan.json")))
            assert sweep is not None  # None only on a torchrun rank other than 0; the demo is one process
            table = format_sweep(sweep)
            print(table, flush=True)
            for src in (sweep.files or {}).values():
                if src and os.path.exists(src):
                    shutil.copyfile(src, os.path.join(out, f"{name}-{os.path.basename(src)}"))
            scale_json[name] = os.path.join(out, f"{name}-scale-results.json")
            md += [f"### {name}", "", "```", table, "```", ""]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    # 6. HTML audits
    log("[6/6] writing the HTML audits")
    for name, rep in reports.items():
        html = os.path.join(out, f"audit-{name}.html")
        write_html(rep, html, scale_results=scale_json.get(name),
                   command="bash scripts/demo.sh")
    md += ["## Files", "",
           "- `audit-<fine-tune>.html`: the self-contained HTML audit of each scan",
           "- `<fine-tune>-scan.json`: the scan reports (schema 1.x)",
           "- `compare.html`, `compare.json`: all fine-tunes side by side",
           "- `track.html`, `track.json`: the continual-learning chain",
           "- `<fine-tune>-scale-results.json|csv`, `<fine-tune>-scale-tradeoff.png`: the alpha "
           "sweeps", "",
           f"Total demo time: {time.perf_counter() - t_start:.0f} s.", ""]
    with open(os.path.join(out, "SUMMARY.md"), "w") as fh:
        fh.write("\n".join(md))
    print()
    print("\n".join(md))
    print(scan_table(reports[sweep_names[0]]))
    log(f"done in {time.perf_counter() - t_start:.0f} s: open {out}/audit-{sweep_names[0]}.html")
    return 0


if __name__ == "__main__":
    sys.exit(main())
