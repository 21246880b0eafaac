"""intruder: spectral forensics for fine-tuned neural networks.

Finds *intruder dimensions* (Shuttleworth et al., "LoRA vs Full Fine-tuning: An Illusion of
Equivalence", NeurIPS 2025): top singular vectors of a fine-tuned weight matrix that match none of
the base model's singular vectors. Heavy modules are imported lazily.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__", "scan", "load_report"]


def scan(base, tuned, config=None, progress=False):
    """Scan BASE against TUNED (paths) and return a ScanReport. See intruder.scan.run_scan."""
    from .scan import run_scan

    return run_scan(base, tuned, config, progress=progress)


def load_report(path):
    """Load a scan report JSON (validated against the schema) as a ScanReport."""
    from .report.schema import load_report as _load

    return _load(path)
