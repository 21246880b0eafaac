"""intruder: spectral forensics for fine-tuned neural networks.

Finds *intruder dimensions* (Shuttleworth et al., "LoRA vs Full Fine-tuning: An Illusion of
Equivalence", NeurIPS 2025): top singular vectors of a fine-tuned weight matrix that match none of
the base model's singular vectors. Heavy modules are imported lazily.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__", "run_scan", "load_report", "ScanConfig"]


def run_scan(base, tuned, config=None, progress=False, **kwargs):
    """Scan TUNED against BASE (paths) and return a ScanReport (intruder.scan.run_scan).

    (The library module is `intruder.scan`; the function has another name so that importing the
    module never shadows it.)"""
    from .scan import run_scan as _run

    return _run(base, tuned, config, progress=progress, **kwargs)


def __getattr__(name):
    if name == "ScanConfig":
        from .types import ScanConfig

        return ScanConfig
    raise AttributeError(f"module 'intruder' has no attribute {name!r}")


def load_report(path):
    """Load a scan report JSON (validated against the schema) as a ScanReport."""
    from .report.schema import load_report as _load

    return _load(path)
