"""Frozen dataclasses passed between the pipeline's stages.

io -> LayerPair -> spectral -> LayerResult -> ScanReport -> report / intervene / evaluate.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

DEFAULT_TOP_K = 10
DEFAULT_EPSILONS = (0.5,)
SWEEP_EPSILONS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


@dataclass(frozen=True)
class ScanConfig:
    """What to scan and how (the paper's Algorithm 1 parameters plus selection)."""

    top_k: int = DEFAULT_TOP_K
    epsilons: tuple[float, ...] = DEFAULT_EPSILONS  # first one decides `intruders`
    vectors: str = "left"  # left | right | both
    include: str | None = None  # regex: extra tensors to scan (embeddings, lm_head ...)
    exclude: str | None = None  # regex: tensors to drop
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    allow_nonfinite: bool = False
    near_window: float = 0.1  # relative sigma window for the near-degenerate subspace overlap
    cache_dir: str | None = None  # base spectral cache; None disables

    @property
    def epsilon(self) -> float:
        return self.epsilons[0]


@dataclass(frozen=True)
class Storage:
    """How a stored tensor becomes float weights (quantized or scaled storage; io/dequant.py)."""

    kind: str  # what the report says, e.g. "fp8_e4m3 per-channel scale", "gguf Q8_0"
    scale: TensorRef | None = None  # scale tensor beside the weight (safetensors layouts)
    block: tuple[int, int] = (0, 0)  # rows x columns sharing one scale (0: from the shapes)
    divisor: float = 1.0  # w = codes * scale / divisor (bitsandbytes SCB: 127)
    heads: int = 0  # GGUF q/k projection: undo llama.cpp's rotary row order in this many heads
    parts: tuple[tuple[str, object], ...] = ()  # more tensors / numbers of the layout, by name
    problem: str = ""  # set when the layout is recognised but cannot be decoded (then skipped)


@dataclass(frozen=True)
class TensorRef:
    """Where a tensor lives; holds no data."""

    path: str  # file holding the tensor
    name: str  # name inside that file
    shape: tuple[int, ...]
    dtype: str  # safetensors dtype string (F32, BF16, F8_E4M3 ...) or GGUF type (Q8_0 ...)
    storage: Storage | None = None  # set when reading needs a decode step (io/dequant.py)


@dataclass(frozen=True)
class LoraInfo:
    """The LoRA factors that produce a tuned tensor from its base (PEFT adapter input)."""

    a: TensorRef  # lora_A (r, in)  or lora_embedding_A (r, num_embeddings)
    b: TensorRef  # lora_B (out, r) or lora_embedding_B (dim, r)
    rank: int
    alpha: float
    scaling: float
    fan_in_fan_out: bool = False  # base stored (in, out): transpose dW
    embedding: bool = False  # dW = (B @ A).T
    magnitude: TensorRef | None = None  # DoRA lora_magnitude_vector (out,)


@dataclass(frozen=True)
class LayerPair:
    """One base tensor and how to obtain its tuned counterpart."""

    name: str  # canonical name (base checkpoint's)
    base: TensorRef
    tuned: TensorRef | None = None  # full tuned tensor (merged model / modules_to_save)
    lora: LoraInfo | None = None  # or LoRA factors applied to base

    @property
    def tuned_path(self) -> str:
        """The file the tuned side is read from: the tuned tensor's, or lora_A's."""
        if self.lora is not None:
            return self.lora.a.path
        if self.tuned is None:
            raise ValueError(f"pair {self.name!r} has neither a tuned tensor nor LoRA factors")
        return self.tuned.path


@dataclass(frozen=True)
class Intruder:
    """A tuned singular vector that matches no base singular vector."""

    index: int  # 0-based rank in the tuned spectrum
    sigma: float
    max_cos: float
    base_index: int  # base vector it matches best (argmax |cos|)
    side: str = "left"  # left | right
    near_overlap: float = 0.0  # ||projection onto base vectors with sigma near this sigma||
    top_overlap: float = 0.0  # ||projection onto the top-r base subspace||
    in_cluster: bool = False  # low max_cos but lies in a near-degenerate base cluster
    max_cos_bound: bool = False  # max_cos is a certified upper bound, not the exact value


@dataclass(frozen=True)
class Margin:
    """How close one matrix stands to its first intruder (intruder/spectral/margin.py,
    docs/margin.md). None: the measure could not be computed (null in the JSON)."""

    min_max_cos: float | None = None  # lowest max|cos| of the top-k = epsilon of the first intruder
    cos_margin: float | None = None  # min_max_cos - epsilon (< 0: intruders at epsilon)
    novel_strength: float | None = None  # ||(I - U0_k U0_k^T) dW||_2 / sigma_k(W0)
    subspace_cos: float | None = None  # cos of the largest principal angle, top-k subspaces
    weight_cos: float | None = None  # <W0, Wt> / (||W0||_F ||Wt||_F): near 0 for unrelated weights


@dataclass(frozen=True)
class UpdateShape:
    """The spectrum of dW = Wt - W0 against the storage rounding floor: its rank above the floor
    and the cliff there (LoRA: a cliff at r; full fine-tuning: none). intruder/provenance.py reads
    it. In the JSON each field is `delta_<field>`. None: not computed (null in the JSON)."""

    stable_rank: float | None = None  # ||dW||_F^2 / ||dW||_2^2
    rank: int | None = None  # singular values of dW above `floor`
    rank_seen: bool | None = None  # a computed singular value lies below the floor (cliff seen)
    rank_gap: float | None = None  # sv[rank-1] / sv[rank]; None when not finite
    tail_ratio: float | None = None  # energy beyond the rank / expected rounding energy
    next_edge: float | None = None  # sv[rank] / rounding-noise edge
    floor: float | None = None  # rounding-noise edge (sigma units of W)
    grid: str | None = None  # storage grid of the noise: bfloat16 | float16 | float32 | float64 | quantized
    sv_method: str | None = None  # gram (all values, exact) | randomized (top values)
    sv: tuple[float, ...] = ()  # top singular values of dW, descending (at most 64)


@dataclass(frozen=True)
class Analysis:
    """What Algorithm 1 and the caveat measures found on one pair (spectral.engine.analyse): the
    measured fields of a LayerResult; `layer` adds the matrix's identity."""

    sigma_base: tuple[float, ...] = ()
    sigma_tuned: tuple[float, ...] = ()
    max_cos: tuple[float, ...] = ()
    base_index: tuple[int, ...] = ()
    max_cos_right: tuple[float, ...] = ()
    base_index_right: tuple[int, ...] = ()
    near_overlap: tuple[float, ...] = ()
    top_overlap: tuple[float, ...] = ()
    intruders: tuple[Intruder, ...] = ()
    counts_by_epsilon: tuple[tuple[float, int], ...] = ()
    intruder_energy: float = 0.0
    delta_norm_rel: float = 0.0
    delta_fro_rel: float = 0.0
    method: str = ""
    max_cos_bound: tuple[bool, ...] = ()
    margin: Margin | None = None
    update_shape: UpdateShape | None = None

    def layer(self, name: str, shape: tuple[int, int], dtype: str,
              seconds: float = 0.0) -> LayerResult:
        """The LayerResult of a scanned matrix with these measures."""
        return LayerResult(name=name, shape=shape, dtype=dtype, status="scanned", seconds=seconds,
                           **{f.name: getattr(self, f.name) for f in fields(self)})


@dataclass(frozen=True)
class LayerResult:
    """Algorithm 1 on one matrix."""

    name: str
    shape: tuple[int, int]
    dtype: str
    status: str  # scanned | unchanged | nonfinite
    sigma_base: tuple[float, ...] = ()  # top singular values of W0 (first top_k + a few)
    sigma_tuned: tuple[float, ...] = ()  # top-k singular values of Wt
    max_cos: tuple[float, ...] = ()  # per top-k tuned vector (left, or per `vectors`)
    base_index: tuple[int, ...] = ()
    max_cos_right: tuple[float, ...] = ()  # when vectors is right|both
    base_index_right: tuple[int, ...] = ()
    near_overlap: tuple[float, ...] = ()
    top_overlap: tuple[float, ...] = ()
    intruders: tuple[Intruder, ...] = ()  # at config.epsilons[0]
    counts_by_epsilon: tuple[tuple[float, int], ...] = ()
    intruder_energy: float = 0.0  # sum sigma^2 of intruders / sum sigma^2 of top-k
    delta_norm_rel: float = 0.0  # ||Wt - W0||_2 / sigma_k(W0)
    delta_fro_rel: float = 0.0  # ||Wt - W0||_F / ||W0||_F
    method: str = ""  # decomposition used (for provenance / debugging)
    # per max_cos entry: True where it is a certified upper bound on max|cos| (spectral slices
    # proved the decisions without every base vector; base_index is then the best kept one);
    # empty when every value is exact
    max_cos_bound: tuple[bool, ...] = ()
    seconds: float = 0.0
    margin: Margin | None = None  # None: not measured (unchanged / non-finite, schema 1.0)
    update_shape: UpdateShape | None = None  # the spectrum of dW (provenance reads it)
    # how each side was stored and decoded before the analysis (io/dequant.py, io/gguf.py), e.g.
    # "fp8_e4m3 per-channel scale", "gguf Q8_0"; only for pairs where a side was stored that way
    storage_base: str | None = None
    storage_tuned: str | None = None


@dataclass(frozen=True)
class CheckpointInfo:
    """Identity of a checkpoint as shown in reports."""

    path: str
    kind: str  # safetensors | sharded | directory | adapter | pickle
    n_tensors: int
    bytes: int
    dtypes: tuple[str, ...]
    fingerprint: str  # first 16 hex digits of sha256 below (schema < 1.2: of names and sizes)
    adapter: dict | None = None  # summary of adapter_config.json when kind == adapter
    # content identity and hub source (intruder/io/identity.py, intruder/io/hub.py)
    sha256: str | None = None  # sha256 of the sorted per-file sha256s (content hash)
    files: tuple[dict, ...] = ()  # {name, bytes, sha256} per file read
    repo_id: str | None = None  # hub repository, when read from the hub or its cache
    revision: str | None = None  # the revision asked for (branch, tag or commit)
    commit: str | None = None  # the commit sha it resolved to
    declared_base: dict | None = None  # adapters: base_model_name_or_path and its check


@dataclass(frozen=True)
class Verdict:
    """The one verdict of a scan: what the update looks like, from the intruder counts, the
    margin to the first intruder and the update's shape (provenance) together. Computed once
    (intruder.report.verdict.decide), stored in the JSON, shown as is by every view."""

    label: str  # lora-like | full-ft-like | mixed | unresolved | precision-only | unchanged |
    #             unrelated | empty | unknown
    wording: str  # the one sentence shown in the terminal, the HTML banner and the API
    confidence: float | None  # 0..1 from the update-shape vote; None when not estimated
    evidence: tuple[str, ...]  # the numbers behind it, one sentence each
    epsilon: float  # the decision threshold of the intruder counts
    intruders: int  # intruders at epsilon (all scanned matrices)
    matrices_with_intruders: int
    matrices_changed: int  # scanned (not bit-identical) matrices
    lowest_max_cos: float | None  # the epsilon at which the first intruder would appear
    margin: float | None  # lowest_max_cos - epsilon (< 0: there are intruders)
    novel_strength: float | None  # largest ||(I - U0_k U0_k^T) dW||_2 / sigma_k(W0)
    update: str  # update shape from provenance: lora-like | full-ft-like | mixed | ... | unknown
    estimated_rank: int | None  # most common rank of the low-rank updates
    agree: bool  # the intruder counts and the update shape tell the same story

    @property
    def tone(self) -> str:
        """How a view colours it: intruders | lowrank | none | warn."""
        if self.label in ("unrelated", "unchanged", "empty", "precision-only", "unknown"):
            return "warn"
        if self.intruders:
            return "intruders"
        return "lowrank" if self.update in ("lora-like", "mixed") else "none"


@dataclass(frozen=True)
class ScanReport:
    """Everything a scan found; serialisable to the versioned JSON schema."""

    base: CheckpointInfo
    tuned: CheckpointInfo
    config: ScanConfig
    layers: tuple[LayerResult, ...]
    unpaired_base: tuple[str, ...] = ()
    unpaired_tuned: tuple[str, ...] = ()
    skipped: tuple[tuple[str, str], ...] = ()  # (name, reason)
    warnings: tuple[str, ...] = ()
    seconds: float = 0.0
    device: str = "cpu"
    created: str = ""
    command: str = ""
    tool_version: str = ""
    schema_version: str = ""
    verdict: Verdict | None = None  # set by the scan / loaded from the JSON
    # as a pandas DataFrame: intruder.report.frame.to_dataframe (or the API's ScanResult)


@dataclass(frozen=True)
class EvalResult:
    """One number an evaluator produced, with its protocol and unit."""

    evaluator: str  # wikitext | task:NAME
    metric: str  # word_perplexity | accuracy | ...
    value: float
    n_units: int  # documents, items, tokens ... that the number averages over
    unit: str  # what n_units counts, and the metric's unit
    protocol: str  # e.g. "lm-eval wikitext protocol, rolling windows of 2048"
    extra: tuple[tuple[str, object], ...] = field(default_factory=tuple)
