"""Load a causal language model for evaluation (local files only; transformers imported lazily).

Accepted inputs:
* a Hugging Face model directory (config.json + weights + tokenizer files);
* a directory of `*.safetensors` weights without config.json, with `model_config` naming the
  directory that holds config.json and the tokenizer;
* a bare `.safetensors` file (what `intruder scale` writes), with `model_config` likewise.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import EvalError

DEFAULT_MAX_LENGTH = 2048  # lm-eval's fallback when neither config nor tokenizer knows
_CONTEXT_ATTRS = ("n_positions", "max_position_embeddings", "n_ctx")  # lm-eval's lookup order
_DTYPES = ("float32", "bfloat16", "float16")
_TOKENIZER_INFINITY = 1000000000000000019884624838656  # transformers' "no limit" sentinel


@dataclass(frozen=True)
class LoadedModel:
    """A model ready to score text: module in eval mode, its tokenizer, and its context length."""

    model: Any  # transformers PreTrainedModel (causal LM)
    tokenizer: Any  # transformers tokenizer
    device: str  # "cpu", "cuda", "cuda:1" ...
    max_length: int  # tokens per forward pass (config's context length unless overridden)
    path: str = ""
    dtype: str = "float32"

    @property
    def prefix_token_id(self) -> int:
        """Token that conditions the first prediction: BOS, else EOS (lm-eval's choice)."""
        tok = self.tokenizer
        for tid in (tok.bos_token_id, tok.eos_token_id):
            if tid is not None:
                return int(tid)
        raise EvalError(f"tokenizer of {self.path or 'the model'} has neither a BOS nor an EOS token")

    @property
    def pad_token_id(self) -> int:
        """Any valid id will do: padded positions sit after the scored ones and are masked."""
        tok = self.tokenizer
        for tid in (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id):
            if tid is not None:
                return int(tid)
        return 0

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of `text`; by default without BOS/EOS (the scorers add the prefix token)."""
        # verbose=False: long texts are windowed by the scorers, the length warning is noise
        return list(self.tokenizer.encode(text, add_special_tokens=add_special_tokens,
                                          verbose=False))

    def vocab_size(self) -> int:
        return int(self.model.get_output_embeddings().weight.shape[0])


def resolve_device(device: str = "auto") -> str:
    """'auto' picks CUDA when available; 'cuda' without a GPU is a clear error."""
    import torch

    device = (device or "auto").strip().lower()
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        return "cpu"
    if device == "cuda" or device.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise EvalError(f"device {device!r} requested but CUDA is not available")
        return device
    raise EvalError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N")


def _resolve_dtype(dtype: str | None, config: Any, device: str):
    """None/'auto': float32 on CPU (bf16 matmuls there are slow and lossy), the checkpoint's
    own dtype on CUDA (float32 if it names none)."""
    import torch

    if dtype in (None, "auto"):
        if device == "cpu":
            return torch.float32
        cfg_dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
        if isinstance(cfg_dtype, str):
            cfg_dtype = getattr(torch, cfg_dtype, None)
        return cfg_dtype if cfg_dtype in (torch.float16, torch.bfloat16, torch.float32) else torch.float32
    name = str(dtype).replace("torch.", "")
    if name not in _DTYPES:
        raise EvalError(f"unknown dtype {dtype!r}; use one of auto, {', '.join(_DTYPES)}")
    return getattr(torch, name)


def context_length(config: Any, tokenizer: Any = None) -> int:
    """The model's context length, looked up as lm-eval does (config, then tokenizer, then 2048)."""
    cfg = getattr(config, "text_config", None) or config
    for attr in _CONTEXT_ATTRS:
        value = getattr(cfg, attr, None)
        if value is not None:
            return int(value)
    mml = getattr(tokenizer, "model_max_length", None)
    if mml is not None and int(mml) < _TOKENIZER_INFINITY:
        return int(mml)
    return DEFAULT_MAX_LENGTH


def load_model(path: str | Path, model_config: str | Path | None = None,
               device: str = "auto", dtype: str | None = None,
               max_length: int | None = None, progress: bool = True,
               device_map: str | None = None) -> LoadedModel:
    """Load MODEL (HF dir, weights dir, or .safetensors file) for scoring; never touches the network.

    Args:
        model_config: directory with config.json and tokenizer files, required when `path` has
            no config.json (a bare .safetensors file or a weights-only directory).
        dtype: None/'auto', 'float32', 'bfloat16' or 'float16'.
        max_length: tokens per forward pass; defaults to the config's context length.
        progress: False silences transformers' weight-loading progress bar.
        device_map: "auto" shards the model over every visible GPU (accelerate), for a model
            larger than one GPU; `device` is then ignored.
    """

    p = Path(path).expanduser()
    if not p.exists():
        raise EvalError(f"model not found: {p}")
    if not os.access(p, os.R_OK | (os.X_OK if p.is_dir() else 0)):
        raise EvalError(f"{p}: cannot read (permission denied)")
    cfg_dir = Path(model_config).expanduser() if model_config else None
    if cfg_dir is not None and not (cfg_dir / "config.json").is_file():
        raise EvalError(f"--model-config {cfg_dir} has no config.json")
    if p.is_dir() and (p / "adapter_config.json").is_file() and not (p / "config.json").is_file():
        raise EvalError(f"{p} is a PEFT adapter; evaluate a merged model or a full checkpoint "
                        "(e.g. the output of `intruder scale`)")

    dev = resolve_device(device)
    transformers = _import_transformers()
    if p.is_dir() and (p / "config.json").is_file():
        model_dir, weight_files = p, None
    else:
        weight_files = _weight_files(p)
        if cfg_dir is None:
            raise EvalError(f"{p} holds weights but no config.json: pass --model-config DIR "
                            "(a directory with the model's config.json and tokenizer files)")
        model_dir = cfg_dir
    tok_dir = model_dir if _has_tokenizer(model_dir) else (cfg_dir or model_dir)

    try:
        config = transformers.AutoConfig.from_pretrained(str(model_dir), local_files_only=True)
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(tok_dir), local_files_only=True)
    except Exception as exc:  # OSError, ValueError, KeyError from unknown architectures ...
        raise EvalError(f"cannot load config/tokenizer from {model_dir}: {_short(exc)}") from exc
    torch_dtype = _resolve_dtype(dtype, config, dev)

    hf_logging = transformers.utils.logging
    bars_were_on = hf_logging.is_progress_bar_enabled()
    if not progress:
        hf_logging.disable_progress_bar()
    try:
        if weight_files is None:
            extra = {"device_map": device_map} if device_map else {}
            model = transformers.AutoModelForCausalLM.from_pretrained(
                str(model_dir), config=config, dtype=torch_dtype, local_files_only=True, **extra)
        else:
            model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
            _load_weights(model, weight_files, p)
            if device_map:
                model = _dispatch(model)
    except EvalError:
        raise
    except Exception as exc:
        raise EvalError(f"cannot load model {p}: {_short(exc)}") from exc
    finally:
        if bars_were_on and not progress:
            hf_logging.enable_progress_bar()
    if device_map:
        dev = str(model.device)  # where the input embeddings live
    else:
        model.to(dev)
    model.eval()

    if max_length is None:
        max_length = context_length(config, tokenizer)
    if int(max_length) < 2:
        raise EvalError(f"max length must be at least 2 tokens, got {max_length}")
    return LoadedModel(model=model, tokenizer=tokenizer, device=dev, max_length=int(max_length),
                       path=str(p), dtype=str(torch_dtype).replace("torch.", ""))


def _dispatch(model: Any) -> Any:
    """Spread a model loaded on the CPU over the visible GPUs (accelerate's balanced map)."""
    try:
        from accelerate import dispatch_model, infer_auto_device_map
    except ImportError as exc:
        raise EvalError("sharding a model over GPUs needs accelerate: pip install 'intruder[shard]'") from exc
    no_split = getattr(model, "_no_split_modules", None) or []
    device_map = infer_auto_device_map(model, no_split_module_classes=list(no_split),
                                       dtype=next(model.parameters()).dtype)
    return dispatch_model(model, device_map=device_map)


def _import_transformers():
    try:
        import transformers
    except ImportError as exc:
        raise EvalError("evaluation needs transformers: pip install 'intruder[eval]'") from exc
    return transformers


def _has_tokenizer(d: Path) -> bool:
    names = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
    return any((d / n).is_file() for n in names)


def _weight_files(p: Path) -> list[Path]:
    if p.is_file():
        if p.suffix != ".safetensors":
            raise EvalError(f"{p}: expected a .safetensors file or a model directory")
        return [p]
    files = sorted(p.glob("*.safetensors"))
    if not files:
        raise EvalError(f"{p} has neither config.json nor *.safetensors weights")
    return files


def _load_weights(model: Any, files: list[Path], shown: Path) -> None:
    """Load safetensors weights into a freshly built model; every parameter must be covered."""
    from safetensors.torch import load_file

    state = {}
    for f in files:
        try:
            state.update(load_file(str(f)))
        except Exception as exc:
            raise EvalError(f"cannot read {f}: {_short(exc)}") from exc
    own = set(model.state_dict().keys())
    if not own & set(state) and any(("model." + k) in own for k in state):
        state = {"model." + k: v for k, v in state.items()}  # saved from the bare backbone
    missing, unexpected = model.load_state_dict(state, strict=False)
    model.tie_weights()
    tied = _tied_names(model)
    missing = [k for k in missing if k not in tied and not k.endswith("rotary_emb.inv_freq")]
    if missing:
        raise EvalError(f"{shown} does not match --model-config: {len(missing)} tensors missing "
                        f"(e.g. {', '.join(missing[:3])})")
    if unexpected:
        raise EvalError(f"{shown} does not match --model-config: {len(unexpected)} unexpected "
                        f"tensors (e.g. {', '.join(unexpected[:3])})")


def _tied_names(model: Any) -> set[str]:
    """Parameter names that share storage with another parameter (e.g. a tied lm_head)."""
    seen: dict[tuple[int, tuple[int, ...]], str] = {}
    tied: set[str] = set()
    for name, tensor in model.state_dict(keep_vars=True).items():
        key = (tensor.data_ptr(), tuple(tensor.shape))
        if key in seen:
            tied.add(name)
            tied.add(seen[key])
        else:
            seen[key] = name
    return tied


def _short(exc: BaseException) -> str:
    msg = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {msg[0] if msg else ''}".rstrip(": ")
