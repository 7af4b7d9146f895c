"""Capture a model as a torch.fx graph (``torch.export``, non-strict) and find its attention sites.

Sites are matched at the coarsest stable boundary: the ``aten.scaled_dot_product_attention``
node (one per Hugging Face attention layer). ``nn.MultiheadAttention`` modules are first swapped
for an equivalent SDPA implementation (the module boundary becomes an SDPA node). The
hand-written matmul → softmax → matmul chain is recognised only as a last resort.
"""
from __future__ import annotations

import copy
import logging
import math
import re
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.export import Dim, ExportedProgram

from surgeon.errors import UnsupportedModel
from surgeon.models import LoadedModel

log = logging.getLogger(__name__)
SDPA = torch.ops.aten.scaled_dot_product_attention.default


@dataclass
class Site:
    """One attention call. ``name`` is the owning module's qualified name."""

    name: str
    layer: int
    heads: int
    kv_heads: int
    head_dim: int
    scale: float
    causal: bool
    mask_kind: str  # "none" | "padding" | "causal" | "causal+padding" | "explicit"
    kind: str  # "sdpa" | "module:<type>" | "matmul_chain"
    module_type: str = ""
    node: str = ""
    spans: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Captured:
    """An exported program and its sites. ``dynamic`` maps input name → {axis: (name, min, max)}."""

    model: LoadedModel
    program: ExportedProgram
    sites: list[Site]
    method: str
    seconds: float
    example: tuple
    dynamic: dict[str, dict[int, tuple[str, int, int]]]

    def site(self, name: str) -> Site:
        for s in self.sites:
            if s.name == name:
                return s
        raise KeyError(name)


# --------------------------------------------------------------------------- MHA → SDPA

class SDPAMultiheadAttention(nn.Module):
    """Drop-in for ``nn.MultiheadAttention`` (packed in-projection) computing with SDPA.

    Returns (output, None): attention weights are not materialised.
    """

    def __init__(self, mha: nn.MultiheadAttention) -> None:
        super().__init__()
        if not mha._qkv_same_embed_dim or mha.bias_k is not None or mha.add_zero_attn:
            raise UnsupportedModel("nn.MultiheadAttention with kdim/vdim, bias_k or add_zero_attn is not supported",
                                   "use the default packed projection")
        self.embed_dim = mha.embed_dim
        self.num_heads = mha.num_heads
        self.batch_first = mha.batch_first
        self.dropout = mha.dropout
        self.in_proj_weight = mha.in_proj_weight
        self.in_proj_bias = mha.in_proj_bias
        self.out_proj = mha.out_proj

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        if not self.batch_first:
            query, key, value = (x.transpose(0, 1) for x in (query, key, value))
        b, nq, e = query.shape
        nk = key.shape[1]
        h = self.num_heads
        w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        b_q = b_k = b_v = None
        if self.in_proj_bias is not None:
            b_q, b_k, b_v = self.in_proj_bias.chunk(3)
        q = F.linear(query, w_q, b_q).view(b, nq, h, e // h).transpose(1, 2)
        k = F.linear(key, w_k, b_k).view(b, nk, h, e // h).transpose(1, 2)
        v = F.linear(value, w_v, b_v).view(b, nk, h, e // h).transpose(1, 2)
        mask = None
        if attn_mask is not None:
            mask = ~attn_mask if attn_mask.dtype == torch.bool else attn_mask
        if key_padding_mask is not None:
            kp = ~key_padding_mask[:, None, None, :].to(torch.bool)
            mask = kp if mask is None else (mask & kp if mask.dtype == torch.bool else mask.masked_fill(~kp, -math.inf))
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal and mask is None)
        o = o.transpose(1, 2).reshape(b, nq, e)
        o = self.out_proj(o)
        if not self.batch_first:
            o = o.transpose(0, 1)
        return o, None


def swap_mha(module: nn.Module) -> int:
    """Replace every nn.MultiheadAttention in ``module`` (in place); returns the count."""
    n = 0
    for name, child in list(module.named_children()):
        if isinstance(child, nn.MultiheadAttention):
            setattr(module, name, SDPAMultiheadAttention(child))
            n += 1
        else:
            n += swap_mha(child)
    return n


# --------------------------------------------------------------------------- capture

def dynamic_spec(lm: LoadedModel, max_len: Optional[int] = None) -> dict[str, dict[int, tuple[str, int, int]]]:
    spec: dict[str, dict[int, tuple[str, int, int]]] = {}
    for i, name in enumerate(lm.inputs):
        axes = {0: ("batch", 1, 256)}
        hi = int(max_len or lm.max_positions or 8192)
        if lm.is_text:
            axes[1] = ("seq", 16, hi)
        elif i in lm.seq_axes:
            axes[lm.seq_axes[i]] = ("seq", 16, hi)
        spec[name] = axes
    return spec


def _dims(spec: dict[str, dict[int, tuple[str, int, int]]]) -> dict[str, dict[int, Dim]]:
    cache: dict[str, Dim] = {}
    out: dict[str, dict[int, Dim]] = {}
    for inp, axes in spec.items():
        out[inp] = {}
        for ax, (nm, lo, hi) in axes.items():
            if nm not in cache:
                cache[nm] = Dim(nm, min=lo, max=hi)
            out[inp][ax] = cache[nm]
    return out


import contextlib


@contextlib.contextmanager
def quiet_torch_logs():
    """torch.export logs failed guards (with whole graphs) as warnings; keep them out of stderr."""
    names = ["torch", "torch.fx.experimental.symbolic_shapes", "torch.export", "torch._dynamo"]
    old = [(logging.getLogger(n), logging.getLogger(n).level) for n in names]
    for lg, _ in old:
        lg.setLevel(logging.ERROR)
    import io

    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        for lg, lvl in old:
            lg.setLevel(lvl)


def export_module(module: nn.Module, example: tuple, spec: dict[str, dict[int, tuple[str, int, int]]],
                  names: list[str]) -> ExportedProgram:
    """``torch.export.export(strict=False)`` with the dynamic axes of ``spec``."""
    dims = _dims(spec)
    dyn = tuple(dims.get(n) for n in names)
    with quiet_torch_logs():
        return torch.export.export(module, example, dynamic_shapes=dyn, strict=False)


def capture(lm: LoadedModel, *, example_len: int = 32, dtype: Optional[torch.dtype] = None) -> Captured:
    """Export ``lm`` (dynamic batch and sequence axes) and find its attention sites.

    Raises UnsupportedModel if the model cannot be captured or has no attention.
    """
    t0 = time.perf_counter()
    module = lm.module
    swapped = swap_mha(module)
    if dtype is not None and dtype != next(iter(module.parameters()), torch.empty(0)).dtype:
        module = copy.deepcopy(module).to(dtype)
    example = lm.example_inputs(example_len, batch=2)
    if dtype is not None:
        example = tuple(x.to(dtype) if x.is_floating_point() else x for x in example)
    spec = dynamic_spec(lm)
    method = "torch.export"
    try:
        with torch.no_grad():
            ep = export_module(module, example, spec, lm.inputs)
    except Exception as e:
        log.info("torch.export failed (%s); trying symbolic_trace", e)
        try:
            gm = torch.fx.symbolic_trace(module)
            # re-export the traced module so every later stage sees one representation
            ep = export_module(gm, example, spec, lm.inputs)
            method = "symbolic_trace+export"
        except Exception as e2:
            raise UnsupportedModel(
                f"{lm.name} could not be captured ({type(e).__name__}: {str(e).splitlines()[0][:160]})",
                "make the model traceable by torch.export (no data-dependent Python control flow)") from e2
    try:
        sites = find_sites(ep, lm, example, swapped=swapped)
        _check_against_eager(ep, module, lm, example_len, dtype)
    except UnsupportedModel:
        raise
    except Exception as e:
        raise UnsupportedModel(
            f"{lm.name} could not be captured: the exported graph fails on new inputs "
            f"({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''})",
            "remove data-dependent Python control flow from the model's forward") from e
    if not sites:
        raise UnsupportedModel(f"{lm.name} has no attention (no SDPA, attention module or matmul-softmax chain found)",
                               "surgeon rewrites attention; give a transformer model")
    return Captured(model=lm, program=ep, sites=sites, method=method, seconds=time.perf_counter() - t0,
                    example=example, dynamic=spec)


def _check_against_eager(ep: ExportedProgram, module: nn.Module, lm: LoadedModel, example_len: int,
                         dtype: Optional[torch.dtype]) -> None:
    """Run the program at a second batch/length and compare with the eager model."""
    ex = lm.example_inputs(example_len + 8, batch=3, seed=1) if lm.kind != "module" or lm.seq_axes else \
        lm.example_inputs(example_len, batch=3, seed=1)
    if dtype is not None:
        ex = tuple(x.to(dtype) if x.is_floating_point() else x for x in ex)
    with torch.no_grad():
        a = ep.module()(*ex)
        b = module(*ex)
    err = float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))
    if not err < 1e-3:
        raise UnsupportedModel(f"{lm.name}: the captured graph differs from the eager model on new inputs "
                               f"(relative error {err:.2g})",
                               "remove data-dependent Python control flow from the model's forward")


# --------------------------------------------------------------------------- site discovery

def _owner(node: torch.fx.Node, prefix: str) -> tuple[str, str]:
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return node.name, ""
    path, typ = list(stack.values())[-1]
    typ = typ if isinstance(typ, str) else getattr(typ, "__qualname__", str(typ))
    if prefix and path.startswith(prefix):
        path = path[len(prefix):]
    return path, typ.rsplit(".", 1)[-1]


def _submodule(root: nn.Module, path: str) -> Optional[nn.Module]:
    try:
        return root.get_submodule(path)
    except AttributeError:
        return None


def sdpa_nodes(graph: torch.fx.Graph) -> list[torch.fx.Node]:
    return [n for n in graph.nodes if n.op == "call_function" and n.target == SDPA]


def _sdpa_args(node: torch.fx.Node) -> dict[str, Any]:
    names = ["query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa"]
    out = {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None, "enable_gqa": False}
    for i, a in enumerate(node.args):
        out[names[i]] = a
    out.update(node.kwargs)
    return out


def _mask_values(ep: ExportedProgram, example: tuple, nodes: list[str]) -> dict[str, Any]:
    """Run the program once and return the attn_mask value each SDPA node receives."""
    gm = ep.module()
    wanted = set(nodes)
    seen: dict[str, Any] = {}

    class Probe(torch.fx.Interpreter):
        def run_node(self, n):  # noqa: D401
            res = super().run_node(n)
            if n.op == "call_function" and n.target == SDPA and n.name in wanted:
                a = _sdpa_args(n)
                m = a["attn_mask"]
                seen[n.name] = (self.env[m] if isinstance(m, torch.fx.Node) else m, bool(a["is_causal"]))
            return res

    with torch.no_grad():
        Probe(gm).run(*example)
    return seen


def classify_mask(mask: Optional[torch.Tensor], is_causal: bool, key_padding: Optional[torch.Tensor]) -> str:
    """Which structure an SDPA mask has, checked on the rows of real tokens.

    mask: [B, 1|H, Nq, Nk] bool or float (0 / -inf); key_padding: [B, Nk] bool.
    """
    if mask is None:
        return "causal" if is_causal else "none"
    allow = mask if mask.dtype == torch.bool else torch.isfinite(mask) & (mask > -1e30)
    if mask.dtype != torch.bool and bool(((mask != 0) & torch.isfinite(mask)).any()):
        return "explicit"
    b, _, nq, nk = allow.shape if allow.dim() == 4 else (1, 1, *allow.shape[-2:])
    allow = allow.expand(b, allow.shape[1], nq, nk)
    kp = key_padding if key_padding is not None else torch.ones(b, nk, dtype=torch.bool)
    rows = kp[:, None, -nq:, None].expand(b, allow.shape[1], nq, nk)
    causal = torch.ones(nq, nk, dtype=torch.bool).tril(nk - nq)
    pad = kp[:, None, None, :]
    cands = [("none", torch.ones_like(allow)), ("causal", (causal[None, None] & torch.ones_like(allow)))]
    if key_padding is not None:
        cands.insert(1, ("padding", pad.expand_as(allow)))
        cands.append(("causal+padding", causal[None, None] & pad))
    for nm, c in reversed(cands):  # prefer the most specific structure that matches
        if torch.equal(allow[rows], c.expand_as(allow)[rows]):
            return nm
    return "explicit"


def find_sites(ep: ExportedProgram, lm: LoadedModel, example: tuple, *, swapped: int = 0) -> list[Site]:
    nodes = sdpa_nodes(ep.graph)
    kind = "sdpa"
    if not nodes:
        return _matmul_chain_sites(ep, lm)
    values = _mask_values(ep, example, [n.name for n in nodes])
    kp = None
    if lm.is_text:
        kp = example[1].to(torch.bool)
    sites: list[Site] = []
    for idx, n in enumerate(nodes):
        a = _sdpa_args(n)
        qv, kv_ = a["query"].meta["val"], a["key"].meta["val"]
        heads, head_dim = int(qv.shape[1]), int(qv.shape[-1])
        name, typ = _owner(n, lm.prefix)
        mod = _submodule(lm.module, lm.prefix.rstrip(".") + "." + name if lm.prefix else name)
        kv_heads = int(kv_.shape[1])
        groups = getattr(mod, "num_key_value_groups", None) if mod is not None else None
        if groups and int(groups) > 1:
            kv_heads = heads // int(groups)
        mask, is_causal = values.get(n.name, (None, bool(a["is_causal"])))
        if kp is not None and mask is not None and mask.shape[-1] != kp.shape[-1]:
            mk = "explicit"
        else:
            mk = classify_mask(mask, is_causal, kp)
        causal = mk.startswith("causal")
        scale = a["scale"] if a["scale"] is not None else 1.0 / math.sqrt(head_dim)
        site_kind = "module:MultiheadAttention" if typ == "SDPAMultiheadAttention" else kind
        m = re.search(r"\.(\d+)(\.|$)", name)
        layer = int(m.group(1)) if m else idx
        sites.append(Site(name=name, layer=layer, heads=heads, kv_heads=kv_heads, head_dim=head_dim,
                          scale=float(scale), causal=causal, mask_kind=mk, kind=site_kind,
                          module_type=typ, node=n.name, spans=_spans(lm)))
    # duplicate owner names (one module calling attention twice) get a suffix
    seen: dict[str, int] = {}
    for s in sites:
        c = seen.get(s.name, 0)
        seen[s.name] = c + 1
        if c:
            s.name = f"{s.name}#{c}"
    return sites


def _spans(lm: LoadedModel) -> list[dict[str, Any]]:
    if lm.kind == "vision":
        g = int(lm.config["image_size"]) // int(lm.config["patch_size"])
        return [{"name": "cls", "start": 0, "end": 1}, {"name": "patches", "start": 1, "end": 1 + g * g, "grid": [g, g]}]
    return []


def _matmul_chain_sites(ep: ExportedProgram, lm: LoadedModel) -> list[Site]:
    """Last resort: softmax nodes fed by a Q·Kᵀ matmul and feeding a ·V matmul."""
    mm = {torch.ops.aten.matmul.default, torch.ops.aten.bmm.default}
    sites = []
    for n in ep.graph.nodes:
        if n.op != "call_function" or n.target not in (torch.ops.aten.softmax.int, torch.ops.aten._softmax.default):
            continue
        users_mm = [u for u in n.users if u.target in mm]
        src = n.args[0]
        depth = 0
        while isinstance(src, torch.fx.Node) and src.target not in mm and depth < 4:
            src = src.args[0] if src.args else None
            depth += 1
        if not users_mm or not isinstance(src, torch.fx.Node) or src.target not in mm:
            continue
        val = src.meta.get("val")
        if val is None:
            continue
        name, typ = _owner(n, lm.prefix)
        qv = src.args[0].meta.get("val") if isinstance(src.args[0], torch.fx.Node) else None
        hd = int(qv.shape[-1]) if qv is not None else 0
        heads = int(val.shape[1]) if val.dim() == 4 else 1
        sites.append(Site(name=name, layer=len(sites), heads=heads, kv_heads=heads, head_dim=hd,
                          scale=1.0 / math.sqrt(hd) if hd else 1.0, causal=False, mask_kind="explicit",
                          kind="matmul_chain", module_type=typ, node=n.name))
    return sites
