"""How the reading side scales with the number of tensors in one safetensors header.

Writes a base and a tuned file of N one-element tensors (the tuned names carry an extra leading
component on half of them, so pairing needs its prefix-stripping pass), then times, in this
process: parsing and validating both headers (`open_checkpoint`), and pairing them
(`pair_checkpoints`). Both are linear in N; the pairing used to be quadratic (10k tensors 9.8 s,
40k 102 s).

    python bench/header_scale.py                    # N = 10k, 100k, 1M
    python bench/header_scale.py --n 1100000        # the 96 MB header of the report
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import tempfile
import time


def write(path: str, names) -> int:
    header = {n: {"dtype": "F32", "shape": [1], "data_offsets": [4 * i, 4 * i + 4]}
              for i, n in enumerate(names)}
    raw = json.dumps(header, separators=(",", ":")).encode()
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(raw)) + raw + b"\0" * (4 * len(names)))
    return len(raw)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, nargs="*", default=[10_000, 100_000, 1_000_000])
    args = ap.parse_args()
    from intruder.io import open_checkpoint, pair_checkpoints

    tmp = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
    for n in args.n:
        with tempfile.TemporaryDirectory(dir=tmp) as d:
            names = [f"model.layers.{i // 7}.mlp.p{i % 7}.weight" for i in range(n)]
            tuned = names[: n // 2] + ["transformer." + x for x in names[n // 2:]]
            size = write(os.path.join(d, "base.safetensors"), names)
            write(os.path.join(d, "tuned.safetensors"), tuned)
            t0 = time.perf_counter()
            base = open_checkpoint(os.path.join(d, "base.safetensors"))
            tun = open_checkpoint(os.path.join(d, "tuned.safetensors"))
            t1 = time.perf_counter()
            p = pair_checkpoints(base, tun)
            t2 = time.perf_counter()
            assert len(p.skipped) + len(p.pairs) == n
            print(f"N={n:>9,} header {size / 2**20:6.1f} MiB: parse both {t1 - t0:6.2f} s, "
                  f"pair {t2 - t1:6.2f} s (wall, this process, {os.cpu_count()} CPUs visible)",
                  flush=True)


if __name__ == "__main__":
    main()
