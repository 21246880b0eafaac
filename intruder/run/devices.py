"""Which torch devices a scan runs on: `--device` parsed and checked against this machine."""

from __future__ import annotations

import torch

from ..errors import IntruderError


def resolve_device(spec: str) -> torch.device:
    """auto -> first CUDA device if present, else CPU."""
    if spec in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(spec)
    except RuntimeError:
        raise IntruderError(f"--device {spec!r}: not a device (use auto, cpu, cuda or cuda:N)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise IntruderError(f"--device {spec}: CUDA is not available on this machine")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise IntruderError(f"--device {spec}: only {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type != "cpu":
        raise IntruderError(f"--device {spec}: only cpu and cuda are supported")
    return dev


def resolve_devices(spec: str | None) -> list[torch.device]:
    """auto / cuda -> every visible CUDA device (else the CPU for auto); cuda:N -> that one;
    cuda:0,1 -> those; cpu -> the CPU."""
    spec = (spec or "auto").strip()
    if spec in ("auto", "cuda"):
        if torch.cuda.is_available():
            return [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
        return [resolve_device(spec)]
    if spec.startswith("cuda:") and "," in spec:
        out = []
        for part in spec[len("cuda:"):].split(","):
            part = part.strip()
            if not part.isdigit():
                raise IntruderError(f"--device {spec!r}: expected cuda:N or cuda:N,M,...")
            out.append(resolve_device(f"cuda:{part}"))
        return out
    return [resolve_device(spec)]
