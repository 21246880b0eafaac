"""`intruder layers CHECKPOINT`: what the loader sees."""

from __future__ import annotations

import json
from typing import Any

import click

from ..io import open_checkpoint
from ..io.dequant import unusable
from ..io.pairing import is_default_target
from ..report.table import format_table
from . import cli
from .common import emit, handle_errors
from .hubopts import offline_option


@cli.command("layers")
@click.argument("checkpoint", type=click.Path(file_okay=True, dir_okay=True, readable=False))
@click.option("--json", "as_json", is_flag=True, help="One JSON document on stdout.")
@click.option("--all", "show_all", is_flag=True, help="List every tensor, not only scan targets.")
@offline_option
def layers_command(checkpoint: str, as_json: bool, show_all: bool) -> None:
    """List tensors of CHECKPOINT: name, shape, dtype, source file, LoRA rank/alpha.

    CHECKPOINT may be a Hugging Face model ID, org/name or org/name@revision.

    \b
    Examples:
      intruder layers model-dir/
      intruder layers adapter-dir/ --json
      intruder layers org/name@main
    """
    _layers(checkpoint, as_json, show_all)


@handle_errors
def _layers(checkpoint: str, as_json: bool, show_all: bool) -> None:
    import os

    ck = open_checkpoint(checkpoint)
    rows = []
    ad = ck.adapter if ck.kind == "adapter" else None
    if ad is not None:
        for mod, parts in sorted(ad.modules.items()):
            r, alpha = ad.rank_alpha(mod)
            # both factors are present: the adapter loader refuses a module without one
            a = parts.get("lora_A") or parts["lora_embedding_A"]
            b = parts.get("lora_B") or parts["lora_embedding_B"]
            shape = [b.shape[0], a.shape[1]]
            kinds = "+".join(sorted(k for k in parts if k not in ("lora_A", "lora_B")))
            rows.append({"name": mod, "shape": shape, "dtype": a.dtype,
                         "file": os.path.basename(a.path), "lora_rank": r, "lora_alpha": alpha,
                         "scaling": ad.scaling(mod, r, alpha), "extra": kinds or ""})
        for name, ref in sorted(ad.replacements.items()):
            rows.append({"name": name, "shape": list(ref.shape), "dtype": ref.dtype,
                         "file": os.path.basename(ref.path), "lora_rank": None,
                         "lora_alpha": None, "scaling": None, "extra": "modules_to_save"})
    else:
        for name, ref in ck.refs.items():
            target = is_default_target(name, ref.shape)
            if target or show_all:
                # storage: how a quantized tensor is decoded; unusable: why the scan skips it
                rows.append({"name": name, "shape": list(ref.shape), "dtype": ref.dtype,
                             "file": os.path.basename(ref.path), "scan_target": target,
                             "storage": ref.storage.kind if ref.storage is not None else None,
                             "unusable": unusable(ref)})
    if as_json:
        info = ck.info(identity=False)
        emit(json.dumps({"checkpoint": checkpoint, "kind": ck.kind,
                               "n_tensors": info.n_tensors, "bytes": info.bytes,
                               "adapter": info.adapter, "path": ck.path, "repo_id": info.repo_id,
                               "revision": info.revision, "commit": info.commit,
                               "tensors": rows}, indent=1))
        return
    if ck.kind == "adapter":
        table = format_table(["module", "dW shape", "dtype", "file", "r", "alpha", "scaling", "extra"],
                             [[r["name"], "x".join(map(str, r["shape"])), r["dtype"], r["file"],
                               r["lora_rank"] if r["lora_rank"] is not None else "-",
                               r["lora_alpha"] if r["lora_alpha"] is not None else "-",
                               r["scaling"] if r["scaling"] is not None else "-", r["extra"]]
                              for r in rows], "llllrrrl")
    else:
        stored = any(r["storage"] for r in rows)
        table = format_table(["tensor", "shape", "dtype", "file"] + (["stored as"] if stored else [])
                             + (["scanned"] if show_all else []),
                             [[r["name"], "x".join(map(str, r["shape"])), r["dtype"], r["file"]]
                              + ([r["storage"] or ""] if stored else [])
                              + ([_scanned(r)] if show_all else [])
                              for r in rows])
    emit(table)
    src = ck.info(identity=False)
    hub_note = f"; hub {src.repo_id} commit {src.commit}" if src.repo_id else ""
    click.echo(f"{len(rows)} {'modules' if ck.kind == 'adapter' else 'tensors'} listed; "
               f"{ck.kind} checkpoint with {len(ck.refs)} tensors{hub_note}", err=True)


def _scanned(row: dict[str, Any]) -> str:
    if not row["scan_target"]:
        return "no"
    return "no (skipped: its dtype holds codes, not weights)" if row["unusable"] else "yes"
