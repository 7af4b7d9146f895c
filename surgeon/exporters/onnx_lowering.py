"""ONNX lowering of ``surgeon::`` ops: one ONNX *function* per op, standard ops in the body.

Every ``surgeon::<variant>`` call in the graph exports as ONE node of domain ``surgeon`` and
op_type ``<variant>``, calling a local ``FunctionProto`` (domain ``surgeon``, name ``<variant>``)
whose body is standard ONNX ops. Stock onnxruntime runs the body; a runtime that knows the op
(e.g. a TensorRT plugin named ``<variant>``) may replace the node instead of inlining it.

How it works (three steps):

1. :func:`translation_table` maps each registered variant's OpOverload to a translator. The
   dynamo exporter calls it once per op; it emits one *placeholder* node ``surgeon::<variant>``
   whose inputs are the present tensors among (q, k, v, key_padding, attn_mask, block_mask)
   and whose attributes are ``config`` (the op's JSON), ``causal`` (int), ``scale`` (float) and
   ``inputs`` (comma-separated names of the present inputs, so a plugin can bind them).
2. :func:`attach_functions` builds, for every placeholder, the function body from the
   variant's lowering (:func:`get_lowering`: the registered variant's
   :meth:`~surgeon.attention.base.Variant.lowerings`, which live in its folder's
   ``lowering.py``; ``lowering="gather"`` picks a variant's gathered body where it has one, else
   its token-mask body) and points the node at it. The body depends on static facts (parameters,
   causal, scale, head counts, which optional inputs are present), so each distinct body is an
   *overload* of the function (ONNX IR >= 10, ``FunctionProto.overload``); sites with equal
   facts share one.
3. :func:`export_program` runs the exporter with that table, attaches the functions, saves
   (weights as external data) and runs ``onnx.checker.check_model(full_check=True)``.

Why functions are attached after export: the dynamo exporter records a (non-traceable)
onnxscript function called from a translator as a function node, but its ``optimize`` step
(``onnxscript.optimizer.optimize_ir``, ``inline=True``) then inlines every model-local
function. Placeholders are opaque to the optimizer, so exporting with ``optimize=True`` and
adding the functions afterwards keeps both the optimised graph and the function boundary.

The lowering contract, the builder, the shared pieces and the modulator edits are in
:mod:`surgeon.exporters.onnx_kit`; block geometry, selection helpers and the gathered
block-sparse attention in :mod:`surgeon.exporters.onnx_blocks`. This module keeps translation,
function building, export and verification. :func:`build_function` refuses (BadInput, naming
site, variant and modulators) a config with modulators whose lowering did not call
:func:`surgeon.exporters.onnx_kit.modulator_edits`, so a modulated site is never exported without
its modulation.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np
import onnx
import onnx_ir as ir
import torch

from surgeon.attention.ops import op_for, parse_config
from surgeon.attention.registry import VARIANTS, get_variant
from surgeon.errors import BadInput, CheckFailed
from surgeon.exporters.onnx_kit import INT64_MAX, LoweringBuilder, LoweringFacts, LoweringFn


DOMAIN = "surgeon"
DOMAIN_VERSION = 1
INPUT_NAMES = ("q", "k", "v", "key_padding", "attn_mask", "block_mask")
_SITE_KEYS = ("site", "layer")  # static facts that never change a function body
_MAX_PROTO_BYTES = 2**31 - 1
LOWERING_MODES = ("gather", "mask")  # gathered block-sparse bodies where a variant has one / token masks


# --------------------------------------------------------------------------- lowerings of the variants

def _check_mode(lowering: str) -> None:
    if lowering not in LOWERING_MODES:
        raise BadInput(f"unknown block-sparse lowering '{lowering}'", f"use one of: {', '.join(LOWERING_MODES)}")


def get_lowering(name: str, lowering: str = "mask") -> LoweringFn:
    """The ONNX lowering of variant ``name`` (from :meth:`~surgeon.attention.base.Variant.lowerings`):
    its ``lowering`` body ("gather" or "mask") where it has one, else its token-mask body."""
    _check_mode(lowering)
    bodies = get_variant(name).lowerings() if name in VARIANTS else {}
    if "mask" not in bodies:
        raise BadInput(
            f"variant '{name}' has no ONNX lowering",
            f"give its class lowering_module = 'surgeon.attention.<folder>.lowering', a module whose LOWERINGS "
            f"maps '{name}' to {{'mask': lower_fn}} (lowerings exist for: {', '.join(lowered_variants())})",
        )
    return bodies.get(lowering, bodies["mask"])


def lowered_variants() -> list[str]:
    """Names of the registered variants that have an ONNX lowering."""
    return [name for name in sorted(VARIANTS) if "mask" in get_variant(name).lowerings()]


def gathered_variants() -> list[str]:
    """Names of the registered variants with a gathered block-sparse body (``lowering="gather"``)."""
    return [name for name in sorted(VARIANTS) if "gather" in get_variant(name).lowerings()]


_TYPES_FLOAT = ["tensor(float)", "tensor(float16)", "tensor(bfloat16)", "tensor(double)"]


_TYPES_ANY = _TYPES_FLOAT + ["tensor(bool)", "tensor(int64)", "tensor(int32)", "tensor(int8)", "tensor(uint8)"]


def _placeholder_schema(name: str, inputs: tuple[str, ...], num_outputs: int) -> onnx.defs.OpSchema:
    S = onnx.defs.OpSchema
    type_of = {"q": "T", "k": "T", "v": "T", "key_padding": "TP", "attn_mask": "TM", "block_mask": "TB"}
    formal = [S.FormalParameter(n, type_of[n]) for n in inputs]
    outs = [S.FormalParameter("out", "T")]
    if num_outputs == 2:
        outs.append(S.FormalParameter("block_mask_out", "TB"))
    used = {type_of[n] for n in inputs} | ({"TB"} if num_outputs == 2 else set())
    constraints = [(t, _TYPES_FLOAT if t == "T" else _TYPES_ANY, "") for t in ("T", "TP", "TM", "TB") if t in used]
    attrs = [
        S.Attribute("config", S.AttrType.STRING, "variant JSON", required=False),
        S.Attribute("causal", S.AttrType.INT, "1 when causal", required=False),
        S.Attribute("scale", S.AttrType.FLOAT, "logit scale", required=False),
        S.Attribute("inputs", S.AttrType.STRING, "present inputs", required=False),
    ]
    return S(name, DOMAIN, DOMAIN_VERSION, inputs=formal, outputs=outs, type_constraints=constraints,
             attributes=attrs)


def _translator(name: str, num_outputs: int) -> Callable[..., Any]:
    from onnxscript.values import Op, Opset  # lazy: only needed while exporting

    opset = Opset(DOMAIN, DOMAIN_VERSION)

    # Parameter names mirror the op schema (the exporter binds by them); no annotations so
    # the exporter's dispatcher does not type-filter this callable.
    def translate(q, k, v, key_padding=None, attn_mask=None, causal=False, scale=1.0, config="", block_mask=None):
        given = dict(q=q, k=k, v=v, key_padding=key_padding, attn_mask=attn_mask, block_mask=block_mask)
        names = tuple(n for n in INPUT_NAMES if given[n] is not None)
        node = Op(opset, name, _placeholder_schema(name, names, num_outputs))
        return node(*[given[n] for n in names], config=str(config), causal=int(bool(causal)),
                    scale=float(scale), inputs=",".join(names))

    translate.__name__ = f"surgeon_{name}"
    return translate


def translation_table() -> dict[Any, Callable[..., Any]]:
    """``custom_translation_table`` for ``torch.onnx.export(dynamo=True)``: every registered
    variant's OpOverload → a translator emitting one placeholder ``surgeon::<variant>`` node.

    Call :func:`attach_functions` on the exported model afterwards (``export_program`` does).
    """
    table = {}
    for name in sorted(VARIANTS):
        var = get_variant(name)
        table[op_for(name)] = _translator(name, 2 if var.produces_block_mask else 1)
    return table


def _static_int(v: ir.Value, axis: int, what: str, node: ir.Node) -> int:
    shape = v.shape
    if shape is None or len(shape) <= axis or not isinstance(shape[axis], int):
        raise BadInput(
            f"{what} of surgeon::{node.op_type} node '{node.name}' is not static (shape {shape})",
            "export with static head counts; only batch and sequence axes may be dynamic",
        )
    return int(shape[axis])


def _attr(node: ir.Node, name: str, default: Any) -> Any:
    a = node.attributes.get(name)
    return default if a is None else a.value


def _same_dim(a: ir.Value, b: ir.Value, axis: int) -> bool:
    """Whether axis ``axis`` of a and b is provably the same length (equal ints or one named symbol)."""
    if a.shape is None or b.shape is None or len(a.shape) <= axis or len(b.shape) <= axis:
        return False
    da, db = a.shape[axis], b.shape[axis]
    if isinstance(da, int) or isinstance(db, int):
        return da == db
    return da.value is not None and da.value == db.value


def _facts_for(node: ir.Node, opset: int) -> tuple[LoweringFacts, str, bool, float, str]:
    name = node.op_type
    inputs = tuple(str(_attr(node, "inputs", "q,k,v")).split(","))
    config = str(_attr(node, "config", ""))
    causal = bool(_attr(node, "causal", 0))
    scale = float(_attr(node, "scale", 1.0))
    if len(inputs) != len(node.inputs) or inputs[:3] != ("q", "k", "v"):
        raise BadInput(f"surgeon::{name} node '{node.name}' has inputs {inputs} for {len(node.inputs)} values",
                       "export through surgeon.exporters.onnx_lowering.translation_table()")
    if not config:
        raise BadInput(f"surgeon::{name} node '{node.name}' has no config attribute",
                       "export through surgeon.exporters.onnx_lowering.translation_table()")
    var, _params, static = parse_config(config)
    if var.name != name:
        raise BadInput(f"surgeon::{name} node carries config of variant '{var.name}'", "re-run the rewrite")
    hq = _static_int(node.inputs[0], 1, "query head count", node)
    hk = _static_int(node.inputs[1], 1, "key head count", node)
    kvh = int(static.get("kv_heads", hk))
    # Same rule as surgeon.attention.base.unrepeat_kv.
    if hk == kvh or kvh <= 0:
        hkv = hk
    elif hk == hq and hq % kvh == 0:
        hkv = kvh
    else:
        raise BadInput(f"surgeon::{name} node '{node.name}': K/V have {hk} heads, expected {kvh} or {hq}",
                       "fix kv_heads in the op's config")
    if hq % hkv:
        raise BadInput(f"surgeon::{name} node '{node.name}': {hq} query heads not a multiple of {hkv} KV heads",
                       "fix kv_heads in the op's config")
    mask_bool = None
    if "attn_mask" in inputs:
        mv = node.inputs[inputs.index("attn_mask")]
        mask_bool = mv.dtype == ir.DataType.BOOL
    self_attn = _same_dim(node.inputs[0], node.inputs[1], 2)
    facts = LoweringFacts(variant=name, q_heads=hq, k_heads=hk, kv_heads=hkv, inputs=inputs,
                          attn_mask_bool=mask_bool, self_attention=self_attn, num_outputs=len(node.outputs),
                          opset=opset)
    return facts, config, causal, scale, _body_config(config)


def _body_config(config: str) -> str:
    d = json.loads(config)
    for key in _SITE_KEYS:
        d.pop(key, None)
    return json.dumps(d, sort_keys=True, separators=(",", ":"))


def _overload_key(facts: LoweringFacts, body_config: str, causal: bool, scale: float) -> str:
    blob = json.dumps({"facts": dataclasses.asdict(facts), "config": body_config, "causal": causal,
                       "scale": float(scale).hex()}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def build_function(
    facts: LoweringFacts, config: str, causal: bool, scale: float, overload: str = "", *, site: str = "",
    lowering: str = "mask",
) -> ir.Function:
    """The ``surgeon::<variant>`` FunctionProto body for one set of static facts.

    Formal inputs: ``facts.inputs`` (q [B,Hq,Nq,D], k/v [B,Hk,Nk,D], key_padding [B,Nk] bool,
    attn_mask broadcastable to [B,Hq,Nq,Nk], block_mask [B,Hq,nqb,nkb] bool); outputs: out
    [B,Hq,Nq,Dv] (+ block mask). Attributes ``config``/``causal``/``scale``/``inputs`` are
    declared (with this overload's values as defaults) so the calling node may carry them.
    ``site`` only names the site in error messages; ``lowering`` picks the body (see
    :func:`get_lowering`).

    A config with ``modulators`` needs a lowering that composes them (calls
    :func:`modulator_edits` and applies the edits); any other lowering is refused with
    :class:`BadInput` rather than exported without the modulation.
    """
    lower = get_lowering(facts.variant, lowering)
    op = LoweringBuilder(facts, site)
    formal = {n: ir.Value(name=n) for n in facts.inputs}
    k, v = formal["k"], formal["v"]
    if facts.k_heads != facts.kv_heads:  # graph repeated K/V: take k[:, ::rep] like the torch op
        rep = facts.q_heads // facts.kv_heads
        sl = (op.ints([0]), op.ints([INT64_MAX]), op.ints([1]), op.ints([rep]))
        k, v = op.Slice(k, *sl), op.Slice(v, *sl)
    bm_in = formal.get("block_mask")
    if bm_in is not None:  # ops pass block masks flat [B, Hq*nqb*nkb]; the consumer restores 4-D
        _v, _p, _s = parse_config(config)
        qb = int(getattr(_p, "q_block", None) or getattr(_p, "block_size"))
        nq = op.Shape(formal["q"], start=2, end=3)
        nqb = op.Div(op.Add(nq, op.ints([qb - 1])), op.ints([qb]))
        shape = op.Concat(op.ints([0]), op.ints([facts.q_heads]), nqb, op.ints([-1]), axis=0)
        bm_in = op.Reshape(bm_in, shape)
    res = lower(op, formal["q"], k, v, formal.get("key_padding"), formal.get("attn_mask"), causal, scale,
                config, bm_in)
    mods = [str(m.get("variant")) for m in (parse_config(config)[2].get("modulators") or [])]
    if mods and not op.modulators_applied:
        where = f"site '{site}'" if site else "a site"
        raise BadInput(
            f"{where} uses variant '{facts.variant}' with modulator(s) {', '.join(mods)}, but the ONNX lowering of "
            f"'{facts.variant}' does not compose modulators (the export would differ from PyTorch)",
            f"remove the modulators from this site's policy entry, or pick a variant whose lowering applies "
            f"modulator_edits() (e.g. dense, window_sink, block_topk, reuse, delta, delta_sparse)",
        )
    outs = list(res) if isinstance(res, (tuple, list)) else [res]
    if len(outs) == 2:
        outs[1] = op.Reshape(outs[1], op.ints([0, -1]))
    if len(outs) != facts.num_outputs:
        raise BadInput(f"lowering of '{facts.variant}' returned {len(outs)} outputs, the op has {facts.num_outputs}",
                       "fix the lowering's return value")
    formal_ids = {id(x) for x in formal.values()}
    outs = [op.Identity(o) if id(o) in formal_ids else o for o in outs]
    for i, o in enumerate(outs):
        o.name = "out" if i == 0 else "block_mask_out"
    graph = ir.Graph(inputs=list(formal.values()), outputs=outs, nodes=op.nodes,
                     opset_imports={"": facts.opset}, name=facts.variant)
    attrs = [ir.AttrString("config", config), ir.AttrInt64("causal", int(causal)),
             ir.AttrFloat32("scale", float(scale)), ir.AttrString("inputs", ",".join(facts.inputs))]
    return ir.Function(DOMAIN, facts.variant, overload, graph=graph, attributes=attrs)


def attach_functions(model: ir.Model, lowering: str = "mask") -> dict[str, int]:
    """Give every ``surgeon::`` node of ``model`` its function (in place); returns variant → nodes.
    ``lowering``: "mask" (token-mask bodies) or "gather" (gathered block-sparse bodies where a
    variant has one).

    Nodes with equal static facts share one overload. Raises :class:`BadInput` when a
    variant has no lowering or a node lacks static head counts.
    """
    _check_mode(lowering)
    opset = model.opset_imports.get("", 18)
    if opset < 18:
        raise BadInput(f"model uses ONNX opset {opset}; surgeon function bodies need opset 18 or newer",
                       "export with opset 18 or newer")
    counts: dict[str, int] = {}
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        if node.domain != DOMAIN:
            continue
        facts, config, causal, scale, body_config = _facts_for(node, opset)
        key = _overload_key(facts, body_config, causal, scale)
        ident = (DOMAIN, facts.variant, key)
        if ident not in model.functions:
            site = str(parse_config(config)[2].get("site") or node.name or "")
            model.functions[ident] = build_function(facts, body_config, causal, scale, key, site=site,
                                                    lowering=lowering)
        node.overload = key
        node.version = DOMAIN_VERSION
        counts[facts.variant] = counts.get(facts.variant, 0) + 1
    if counts:
        model.opset_imports[DOMAIN] = DOMAIN_VERSION
        model.ir_version = max(model.ir_version or 0, 10)  # function overloads need IR v10
    return counts


def surgeon_functions(model: Union[onnx.ModelProto, ir.Model]) -> list[tuple[str, str, str]]:
    """``(domain, name, overload)`` of the model's ``surgeon`` functions."""
    if isinstance(model, ir.Model):
        return sorted(f for f in model.functions if f[0] == DOMAIN)
    return sorted((f.domain, f.name, f.overload) for f in model.functions if f.domain == DOMAIN)


_ONNX_DTYPE = {
    torch.float32: ir.DataType.FLOAT, torch.float16: ir.DataType.FLOAT16, torch.bfloat16: ir.DataType.BFLOAT16,
    torch.float64: ir.DataType.DOUBLE, torch.bool: ir.DataType.BOOL, torch.int64: ir.DataType.INT64,
    torch.int32: ir.DataType.INT32,
}


def single_op_model(
    name: str,
    config: str,
    causal: bool,
    scale: float,
    inputs: dict[str, Optional[torch.Tensor]],
    opset: int = 18,
    lowering: str = "mask",
) -> onnx.ModelProto:
    """A model holding one ``surgeon::<name>`` node (with its function), for testing lowerings.

    ``inputs`` maps names from :data:`INPUT_NAMES` to example tensors (None/absent: not
    given); they fix dtypes, ranks and head counts. Every other axis is symbolic, so the model
    runs at any batch and sequence length. Graph inputs/outputs are named like the op's.
    ``lowering`` picks the function body (see :func:`get_lowering`).
    """
    var = get_variant(name)
    given = {n: t for n, t in inputs.items() if t is not None}
    present = [n for n in INPUT_NAMES if n in given]
    if present[:3] != ["q", "k", "v"]:
        raise BadInput("single_op_model needs q, k and v", "pass example tensors for q, k and v")
    q, k, v = given["q"], given["k"], given["v"]
    values = []
    for n in present:
        t = given[n]
        if t.dtype not in _ONNX_DTYPE:
            raise BadInput(f"input {n} has unsupported dtype {t.dtype}", f"use one of {sorted(map(str, _ONNX_DTYPE))}")
        if n in ("q", "k", "v"):
            # Equal example lengths: one shared symbol (self-attention); else Nq and Nk.
            same = q.shape[2] == k.shape[2]
            seq = "N" if same else ("Nq" if n == "q" else "Nk")
            dims: list[Any] = ["B", t.shape[1], seq, t.shape[3]]
        else:
            dims = [f"{n}_{i}" for i in range(t.dim())]
        values.append(ir.Value(name=n, type=ir.TensorType(_ONNX_DTYPE[t.dtype]), shape=ir.Shape(dims)))
    out = ir.Value(name="out", type=ir.TensorType(_ONNX_DTYPE[q.dtype]),
                   shape=ir.Shape(["B", q.shape[1], values[0].shape[2], v.shape[3]]))
    outs = [out]
    if var.produces_block_mask:
        outs.append(ir.Value(name="block_mask_out", type=ir.TensorType(ir.DataType.BOOL),
                             shape=ir.Shape(["B", "heads_x_blocks"])))  # flat, as the torch op
    attrs = [ir.AttrString("config", config), ir.AttrInt64("causal", int(causal)),
             ir.AttrFloat32("scale", float(scale)), ir.AttrString("inputs", ",".join(present))]
    node = ir.Node(DOMAIN, name, values, attributes=attrs, outputs=outs, version=DOMAIN_VERSION, name=f"node_{name}")
    graph = ir.Graph(values, outs, nodes=[node], opset_imports={"": opset, DOMAIN: DOMAIN_VERSION}, name="single_op")
    model = ir.Model(graph, ir_version=10, producer_name="surgeon")
    attach_functions(model, lowering)
    return ir.serde.serialize_model(model)


@dataclasses.dataclass(frozen=True)
class ExportResult:
    """What :func:`export_program` wrote."""

    path: str
    external_data: Optional[str]  # file name next to ``path``, or None
    surgeon_nodes: dict[str, int]  # variant → number of nodes
    functions: list[tuple[str, str, str]]  # (domain, name, overload)
    opset: int


def batch_seq_dynamic_shapes(example_inputs: Sequence[Any]) -> tuple[Any, ...]:
    """``dynamic_shapes`` marking axis 0 (batch) and axis 1 (sequence) of every tensor input.

    Tensors of rank 1 get only the batch axis; non-tensors get None. All inputs share the two
    dims (the usual ``input_ids``/``attention_mask`` case). Use examples with batch and sequence
    length of at least 2: ``torch.export`` specialises axes of size 0 or 1.
    """
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq")
    out: list[Any] = []
    for x in example_inputs:
        if isinstance(x, torch.Tensor) and x.dim() >= 2:
            out.append({0: batch, 1: seq})
        elif isinstance(x, torch.Tensor) and x.dim() == 1:
            out.append({0: batch})
        else:
            out.append(None)
    return tuple(out)


def _initializer_bytes(model: ir.Model) -> int:
    total = 0
    for v in model.graph.initializers.values():
        if v.const_value is not None:
            total += v.const_value.nbytes
    return total


def export_program(
    program_or_module: Union[torch.nn.Module, torch.export.ExportedProgram],
    example_inputs: Sequence[Any],
    dynamic_shapes: Any,
    path: Union[str, os.PathLike],
    opset: int = 18,
    external_data: bool = True,
    lowering: str = "mask",
) -> ExportResult:
    """Export to ONNX with every ``surgeon::`` op as one node calling a ``surgeon`` function.

    ``dynamic_shapes`` follows ``torch.export`` (e.g. :func:`batch_seq_dynamic_shapes`); it is
    ignored for an ExportedProgram, whose dims are already fixed or symbolic. Weights go to
    ``<name>.data`` next to ``path`` when ``external_data`` (or when over 2 GB). The file is
    written atomically after ``onnx.checker.check_model(full_check=True)`` passed on it.
    ``lowering``: the function bodies, "mask" or "gather" (see :func:`get_lowering`).
    Raises :class:`CheckFailed` when the checker rejects the model.
    """
    path = Path(path)
    if path.suffix != ".onnx":
        raise BadInput(f"ONNX output path '{path}' does not end in .onnx", "name the file <something>.onnx")
    if not path.parent.is_dir():
        raise BadInput(f"output directory '{path.parent}' does not exist", "create it first")
    if opset < 18:
        raise BadInput(f"opset {opset} is too old for surgeon function bodies", "export with opset 18 or newer")
    _check_mode(lowering)
    is_program = isinstance(program_or_module, torch.export.ExportedProgram)
    try:
        with warnings.catch_warnings():
            # Inputs sharing a named Dim make the exporter warn once per extra use of the name.
            warnings.filterwarnings("ignore", message=r".*axis name: .* will not be used")
            prog = torch.onnx.export(
                program_or_module,
                tuple(example_inputs),
                dynamic_shapes=None if is_program else dynamic_shapes,
                dynamo=True,
                custom_translation_table=translation_table(),
                opset_version=opset,
                optimize=True,  # safe: surgeon functions are attached after the optimizer
                verbose=False,
                report=False,
                verify=False,
            )
    except torch.onnx.errors.OnnxExporterError as e:  # pragma: no cover - depends on the model
        msg = str(e).strip().splitlines()
        raise BadInput(f"torch.onnx.export failed: {msg[-1] if msg else type(e).__name__}",
                       "check that the model runs under torch.export with these dynamic shapes") from e
    model = prog.model
    counts = attach_functions(model, lowering)
    use_external = external_data or _initializer_bytes(model) > _MAX_PROTO_BYTES
    data_name = f"{path.name}.data" if use_external else None
    tmpdir = Path(tempfile.mkdtemp(prefix=".surgeon-export-", dir=path.parent))
    try:
        tmp = tmpdir / path.name
        if data_name is not None:
            ir.save(model, tmp, external_data=data_name)
        else:
            ir.save(model, tmp)
        try:
            onnx.checker.check_model(str(tmp), full_check=True)
        except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CheckFailed(f"exported ONNX model fails onnx.checker: {first}",
                              "report this with the model; the export was not written") from e
        if data_name is not None:
            os.replace(tmpdir / data_name, path.parent / data_name)
        elif (path.parent / f"{path.name}.data").exists():
            (path.parent / f"{path.name}.data").unlink()  # stale weights of an earlier export
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    return ExportResult(path=str(path), external_data=data_name, surgeon_nodes=counts,
                        functions=surgeon_functions(model), opset=int(model.opset_imports.get("", opset)))


def _tensor_leaves(x: Any) -> list[torch.Tensor]:
    leaves, _ = torch.utils._pytree.tree_flatten(x)
    return [t for t in leaves if isinstance(t, torch.Tensor)]


def verify_onnx(
    path: Union[str, os.PathLike],
    module: Union[torch.nn.Module, torch.export.ExportedProgram],
    inputs_list: Sequence[Sequence[Any]],
    rtol: float = 1e-4,
    atol: float = 1e-4,
    min_shapes: int = 2,
) -> list[dict[str, Any]]:
    """Run the ONNX file in onnxruntime (CPU) and PyTorch on each input set; compare outputs.

    ``inputs_list`` must hold at least ``min_shapes`` input sets with distinct shapes (e.g.
    two sequence lengths) so dynamic axes are exercised. Returns one dict per (input set,
    output): ``case``, ``output``, ``name``, ``shape``, ``max_abs_err``, ``max_rel_err``,
    ``mismatched`` (elements outside ``atol + rtol*|torch|``, or unequal for bool/int) and ``ok``.
    """
    import onnxruntime as ort  # lazy: heavy import

    shapes = {tuple(tuple(t.shape) for t in _tensor_leaves(inp)) for inp in inputs_list}
    if len(shapes) < min_shapes:
        raise BadInput(f"verify_onnx got {len(shapes)} distinct input shape(s), needs {min_shapes}",
                       "pass inputs at two or more sequence lengths")
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    in_names = [i.name for i in sess.get_inputs()]
    out_names = [o.name for o in sess.get_outputs()]
    fn = module.module() if isinstance(module, torch.export.ExportedProgram) else module
    results: list[dict[str, Any]] = []
    for case, inp in enumerate(inputs_list):
        tensors = _tensor_leaves(inp)
        if len(tensors) != len(in_names):
            raise BadInput(f"input set {case} has {len(tensors)} tensors, the ONNX model takes {len(in_names)} "
                           f"({', '.join(in_names)})", "pass the same inputs as at export")
        feed = {n: t.detach().cpu().numpy() for n, t in zip(in_names, tensors)}
        got = sess.run(None, feed)
        with torch.no_grad():
            want = _tensor_leaves(fn(*inp))
        if len(want) != len(got):
            raise CheckFailed(f"ONNX model returns {len(got)} outputs, PyTorch {len(want)}",
                              "re-export the model")
        for j, (w, g) in enumerate(zip(want, got)):
            results.append(_compare(case, j, out_names[j], w.detach().cpu().numpy(), g, rtol, atol))
    return results


def _compare(case: int, j: int, name: str, want: np.ndarray, got: np.ndarray, rtol: float, atol: float) -> dict:
    res: dict[str, Any] = {"case": case, "output": j, "name": name, "shape": list(want.shape)}
    if want.shape != got.shape:
        res.update(max_abs_err=math.inf, max_rel_err=math.inf, mismatched=int(want.size), ok=False,
                   got_shape=list(got.shape))
        return res
    if want.dtype.kind in "biu" or got.dtype.kind in "biu":
        bad = int(np.count_nonzero(want.astype(np.int64) != got.astype(np.int64)))
        res.update(max_abs_err=float(bad > 0), max_rel_err=float(bad > 0), mismatched=bad, ok=bad == 0)
        return res
    w, g = want.astype(np.float64), got.astype(np.float64)
    both_nan = np.isnan(w) & np.isnan(g)
    diff = np.where(both_nan, 0.0, np.abs(w - g))
    diff = np.where(np.isnan(diff), np.inf, diff)
    rel = diff / np.maximum(np.abs(w), 1e-12)
    bad = int(np.count_nonzero(diff > atol + rtol * np.abs(w)))
    res.update(max_abs_err=float(diff.max()) if diff.size else 0.0,
               max_rel_err=float(rel.max()) if rel.size else 0.0, mismatched=bad, ok=bad == 0)
    return res
