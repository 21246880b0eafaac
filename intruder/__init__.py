"""intruder: spectral forensics for fine-tuned neural networks.

Finds *intruder dimensions* (Shuttleworth et al., "LoRA vs Full Fine-tuning: An Illusion of
Equivalence", NeurIPS 2025): top singular vectors of a fine-tuned weight matrix that match none of
the base model's singular vectors. The Python API (intruder/api.py):

    import intruder
    r = intruder.scan("base-dir/", "adapter-dir/")     # or models, PEFT models, state dicts
    print(r.verdict.wording)
    r.to_dataframe(); r.save("scan.json"); r.to_html("audit.html")
    model = intruder.rescale(tuned_model, r, 0.5)       # in memory
    intruder.evaluate(model, ["wikitext"], tokenizer=tok)

Names load on first use, so `import intruder` (and the command line) stays fast.
"""

from __future__ import annotations

import importlib
import sys
import types

from .errors import (
    AdapterError,
    CheckpointError,
    EvalError,
    InputError,
    IntruderError,
    NonFiniteError,
    OutputError,
    PairingError,
    ReportError,
)

__version__ = "0.1.0"

# public name -> module that defines it (imported on first access)
_LAZY = {
    "scan": ".api", "compare": ".api", "track": ".api", "rescale": ".api", "evaluate": ".api",
    "load_report": ".api", "ScanResult": ".api", "TrackResult": ".api",
    "verdict_line": ".api",
    "Verdict": ".types", "LayerResult": ".types", "EvalResult": ".types", "ScanConfig": ".types",
    "Margin": ".types", "UpdateShape": ".types",
    "SCHEMA": ".report.schema", "plots": ".report.plots",
}
# Submodules named like API functions (intruder/scan.py, track.py, evaluate/): importing one
# must not replace the function under the package's attribute.
_SHADOWED = ("scan", "track", "evaluate")


class _Package(types.ModuleType):
    def __setattr__(self, name, value):
        if name in _SHADOWED and isinstance(value, types.ModuleType):
            return  # the submodule stays reachable as sys.modules["intruder." + name]
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


def __getattr__(name):
    where = _LAZY.get(name)
    if where is None:
        raise AttributeError(f"module 'intruder' has no attribute {name!r}")
    mod = importlib.import_module(where, __name__)
    value = mod if name == "plots" else getattr(mod, name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))


def run_scan(base, tuned, config=None, progress=False, **kwargs):
    """Scan TUNED against BASE (paths) with a ScanConfig and return the raw ScanReport (the
    entry point the command line uses; `scan` is the keyword form for scripts)."""
    return importlib.import_module(".scan", __name__).run_scan(base, tuned, config,
                                                               progress=progress, **kwargs)


__all__ = ["__version__", "scan", "compare", "track", "rescale", "evaluate", "load_report",
           "ScanResult", "TrackResult", "Verdict", "LayerResult", "Margin", "UpdateShape",
           "EvalResult", "ScanConfig",
           "SCHEMA", "verdict_line", "plots", "run_scan",
           "IntruderError", "InputError", "CheckpointError", "AdapterError", "PairingError",
           "NonFiniteError", "ReportError", "OutputError", "EvalError"]
