"""TensorRT export: a self-contained bundle, and the engine where TensorRT and a GPU exist.

The bundle (written next to the verified ``model.onnx`` by
:func:`surgeon.exporters.pipeline.export_rewritten` with ``fmt="tensorrt"``)::

    model.onnx, model.onnx.data   standard ONNX; surgeon ops are ONNX functions (onnxruntime runs it)
    model_trt.onnx                the same graph (same weights file) with every surgeon node turned
                                  into a TensorRT plugin node (see :func:`plugin_model`)
    plugins/surgeon_qdp.py        the plugins' registrations (tensorrt.plugin, TensorRT >= 10.6),
                                  generated for the ops this model uses (:func:`plugin_source`)
    plugins/surgeon_runtime.py    their implementation: the installed surgeon op on TensorRT's
                                  CUDA stream (Triton block-sparse kernel for block_topk/reuse)
    build_engine.py               registers the plugins, parses, builds (precision flag, one
                                  optimisation profile over batch/seq), saves model.engine,
                                  compares the engine with onnxruntime
    README.txt, manifest.json

Why a second ONNX file: TensorRT's ONNX parser imports a model-local function by *name* only
(overloads would collide) and lets a registered plugin of the node's op type take precedence;
plugin tensors cannot be bool. ``model_trt.onnx`` therefore names each surgeon node after its
plugin (``<variant>_<inputs>``, e.g. ``block_topk_qkvp``: one plugin per input signature,
because a plugin has a fixed number of inputs), marks it with ``plugin_namespace="surgeon"``,
casts bool inputs (key padding, block masks) to int32 and produced block masks back to bool,
and drops the function bodies.
"""
from __future__ import annotations

import importlib.resources
import json
import logging
from pathlib import Path
from typing import Any, Callable, Optional

from surgeon.errors import BadInput
from surgeon.exporters.verification import VerificationFailed, error_table

log = logging.getLogger(__name__)

NAMESPACE = "surgeon"
TRT_MODEL = "model_trt.onnx"
PLUGIN_DIR = "plugins"
PLUGIN_MODULE = "surgeon_qdp.py"
RUNTIME_MODULE = "surgeon_runtime.py"
BUILD_SCRIPT = "build_engine.py"
ENGINE_FILE = "model.engine"
_LETTER = {"q": "q", "k": "k", "v": "v", "key_padding": "p", "attn_mask": "m", "block_mask": "b"}
_INT32_INPUTS = ("key_padding", "block_mask")


def plugin_name(variant: str, inputs: list[str]) -> str:
    """Plugin (and node op type) of a surgeon node: ``<variant>_<one letter per input>``."""
    return f"{variant}_{''.join(_LETTER[n] for n in inputs)}"


def _elem_types(model: Any) -> dict[str, int]:
    g = model.graph
    out = {}
    for vi in list(g.input) + list(g.output) + list(g.value_info):
        if vi.type.HasField("tensor_type"):
            out[vi.name] = vi.type.tensor_type.elem_type
    for init in g.initializer:
        out[init.name] = init.data_type
    return out


def plugin_model(src: Path, dst: Path) -> list[dict[str, Any]]:
    """Write ``dst``: ``src`` with surgeon nodes as TensorRT plugin nodes (module doc).

    ``src`` keeps its weights in an external data file next to it; ``dst`` (same folder)
    references the same file. Returns one spec per plugin: ``id``, ``op``, ``variant``,
    ``inputs``, ``num_outputs``, ``nodes`` (count), ``int32_inputs``.
    """
    import onnx
    from onnx import TensorProto, helper

    model = onnx.load(str(src), load_external_data=False)
    types = _elem_types(model)
    g = model.graph
    new_nodes = []
    casts: dict[str, str] = {}
    specs: dict[str, dict[str, Any]] = {}
    for node in g.node:
        if node.domain != NAMESPACE:
            new_nodes.append(node)
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        names = attrs.get("inputs", b"q,k,v")
        names = (names.decode() if isinstance(names, bytes) else str(names)).split(",")
        op = plugin_name(node.op_type, names)
        int32 = [n for n in names if n in _INT32_INPUTS or
                 (n == "attn_mask" and types.get(node.input[names.index(n)]) == TensorProto.BOOL)]
        ins = []
        for n, x in zip(names, node.input):
            if n in int32:
                if x not in casts:  # one Cast per tensor, shared by its plugin consumers
                    casts[x] = f"{x}__i32"
                    new_nodes.append(helper.make_node("Cast", [x], [casts[x]], to=TensorProto.INT32,
                                                      name=f"{x}__cast_i32"))
                ins.append(casts[x])
            else:
                ins.append(x)
        outs = list(node.output)
        post = []
        if len(outs) == 2:
            mask_i32 = f"{outs[1]}__i32out"
            post.append(helper.make_node("Cast", [mask_i32], [outs[1]], to=TensorProto.BOOL,
                                         name=f"{node.name}__cast_block_mask_out"))
            outs[1] = mask_i32
        plug = helper.make_node(op, ins, outs, name=node.name, domain=NAMESPACE)
        for a in node.attribute:
            plug.attribute.append(a)
        plug.attribute.extend([helper.make_attribute("plugin_namespace", NAMESPACE),
                               helper.make_attribute("plugin_version", "1")])
        new_nodes.append(plug)
        new_nodes.extend(post)
        spec = specs.setdefault(op, {"id": f"{NAMESPACE}::{op}", "op": op, "variant": node.op_type, "inputs": names,
                                     "num_outputs": len(node.output), "nodes": 0, "int32_inputs": int32})
        spec["nodes"] += 1
    del g.node[:]
    g.node.extend(new_nodes)
    keep = [f for f in model.functions if f.domain != NAMESPACE]
    del model.functions[:]
    model.functions.extend(keep)
    if not any(f.domain == NAMESPACE for f in model.functions):
        imports = [o for o in model.opset_import if o.domain != NAMESPACE]
        del model.opset_import[:]
        model.opset_import.extend(imports)
        model.opset_import.append(helper.make_opsetid(NAMESPACE, 1))
    tmp = dst.with_name(dst.name + ".tmp")
    onnx.save(model, str(tmp))
    tmp.replace(dst)
    return [specs[k] for k in sorted(specs)]


_HEADER = '''\
"""TensorRT plugins for the surgeon ops of this model (generated by surgeon; TensorRT >= 10.6).

Each ``surgeon::<variant>_<inputs>`` plugin matches the nodes of ``model_trt.onnx`` with that op
type: its shape function gives out [B, Hq, Nq, Dv] (like q, last axis of v) and, for variants
that produce one, the flattened block mask int32 [B, Hq * ceil(Nq/q_block) * ceil(Nk/k_block)];
its implementation is ``surgeon_runtime.run_plugin`` (the installed surgeon package's op on
TensorRT's stream). Importing this file does nothing; call :func:`register` (before parsing
the ONNX model or deserializing an engine that uses these plugins).
"""
import json
import sys
from pathlib import Path
from typing import List, Tuple

try:  # keep the module importable (and testable) where TensorRT is not installed
    import tensorrt as trt
    import tensorrt.plugin as trtp
except Exception:  # ImportError, or OSError when the TensorRT libraries are missing
    trt = trtp = None

PLUGINS = {plugins!r}
_REGISTERED = []


def _blocks(config):
    """(query block, key block) of a producer's config."""
    p = json.loads(config)["params"]
    return int(p.get("q_block") or p["block_size"]), int(p.get("page_size") or p["block_size"])


def _out_desc(q, v):
    shape = trtp.ShapeExprs.from_tuple((q.shape_expr[0], q.shape_expr[1], q.shape_expr[2], v.shape_expr[3]))
    return trtp.from_shape_expr(shape, dtype=q.dtype)


def _mask_desc(q, k, config):
    qb, kb = _blocks(config)
    n = q.shape_expr[1] * trtp.cdiv(q.shape_expr[2], qb) * trtp.cdiv(k.shape_expr[2], kb)
    return trtp.from_shape_expr(trtp.ShapeExprs.from_tuple((q.shape_expr[0], n)), dtype=trt.int32)


def _run(variant, tensors, inputs, config, causal, scale, outputs, stream):
    from surgeon_runtime import run_plugin

    run_plugin(variant, tensors, inputs, config, causal, scale, outputs, stream)
'''

_PLUGIN = '''

def _register_{op}():
    @trtp.register("{pid}")
    def _desc({desc_args}, config: str, causal: int, scale: float, inputs: str) -> {ret_type}:
        return {ret_expr}

    @trtp.impl("{pid}")
    def _impl({impl_args}, config: str, causal: int, scale: float, inputs: str,
              outputs: Tuple[trtp.Tensor], stream: int) -> None:
        _run("{variant}", ({names},), inputs, config, causal, scale, outputs, stream)
'''

_FOOTER = '''

def register() -> List[str]:
    """Register every plugin above with TensorRT (idempotent); returns their ids."""
    if trtp is None:
        raise RuntimeError("TensorRT >= 10.6 with tensorrt.plugin is needed to register the surgeon plugins")
    here = str(Path(__file__).resolve().parent)
    if here not in sys.path:
        sys.path.insert(0, here)  # surgeon_runtime.py lives next to this file
    if not _REGISTERED:
        for fn in ({fns}):
            fn()
        _REGISTERED.extend(PLUGINS)
    return list(_REGISTERED)
'''


def plugin_source(specs: list[dict[str, Any]]) -> str:
    """Python source registering one ``tensorrt.plugin`` per spec of :func:`plugin_model`."""
    parts = [_HEADER.format(plugins=[s["id"] for s in specs])]
    for s in specs:
        names = list(s["inputs"])
        two = s["num_outputs"] == 2
        parts.append(_PLUGIN.format(
            op=s["op"], pid=s["id"], variant=s["variant"], names=", ".join(names),
            desc_args=", ".join(f"{n}: trtp.TensorDesc" for n in names),
            impl_args=", ".join(f"{n}: trtp.Tensor" for n in names),
            ret_type="Tuple[trtp.TensorDesc, trtp.TensorDesc]" if two else "trtp.TensorDesc",
            ret_expr="_out_desc(q, v), _mask_desc(q, k, config)" if two else "_out_desc(q, v)"))
    fns = "".join(f"_register_{s['op']}, " for s in specs)
    parts.append(_FOOTER.format(fns=fns))
    return "".join(parts)


def default_profile(ranges: dict[str, tuple[int, int]]) -> dict[str, list[int]]:
    """[min, opt, max] per dynamic axis: batch 1/1/min(8, max); seq min/min(512, max)/min(4096, max)."""
    prof = {}
    for name, (lo, hi) in sorted(ranges.items()):
        if name == "batch":
            prof[name] = [max(1, lo), max(1, lo), max(lo, min(8, hi))]
        elif name == "seq":
            prof[name] = [lo, max(lo, min(512, hi)), max(lo, min(4096, hi))]
        else:
            prof[name] = [lo, lo, hi]
    return prof


_README = """\
surgeon TensorRT bundle — {model} ({kind})

Files
  model.onnx (+ {data})  the exported model; each surgeon op is an ONNX function of domain "surgeon"
                         with a standard-op body, so stock onnxruntime runs it (this file was checked
                         against PyTorch in onnxruntime: see manifest.json, "verification")
  model_trt.onnx         the same graph with each surgeon node as a TensorRT plugin node (same weights file)
  plugins/               surgeon_qdp.py (plugin registrations, tensorrt.plugin API) and
                         surgeon_runtime.py (plugin implementation)
  build_engine.py        builds model.engine and compares it with onnxruntime
  manifest.json          ops, opset, verification errors, sha256 of every file

Plugins used by this model
{plugins}

Build the engine on the target GPU machine
  requirements: NVIDIA GPU, TensorRT >= 10.6 (python package with tensorrt.plugin), torch with CUDA,
  onnxruntime, and the surgeon package that wrote this bundle (the plugins call its ops; the Triton
  block-sparse kernel serves block_topk and reuse)
      python build_engine.py                                  # precision {precision}, profile below
      python build_engine.py --precision fp32 --axis seq=16,1024,8192
  optimisation profile (axis: min, opt, max): {profile}
  exit codes: 0 built and matches onnxruntime, 1 outputs differ, 2 missing requirement / bad input

Run the engine in your own code
  import the plugins first (sys.path.insert(0, "plugins"); import surgeon_qdp; surgeon_qdp.register()),
  then tensorrt.Runtime(...).deserialize_cuda_engine(open("model.engine", "rb").read()).

{status}
"""


def write_bundle(folder: Path, model_file: str, ranges: dict[str, tuple[int, int]], *, precision: str,
                 model: str, model_kind: str) -> dict[str, Any]:
    """Write model_trt.onnx, plugins/, build_engine.py and README.txt into ``folder`` (which
    holds ``model_file``); returns the manifest's ``tensorrt`` section."""
    folder = Path(folder)
    specs = plugin_model(folder / model_file, folder / TRT_MODEL)
    pdir = folder / PLUGIN_DIR
    pdir.mkdir(exist_ok=True)
    (pdir / PLUGIN_MODULE).write_text(plugin_source(specs))
    res = importlib.resources.files("surgeon.exporters.trt_plugins")
    (pdir / RUNTIME_MODULE).write_text(res.joinpath("surgeon_runtime.py").read_text())
    (folder / BUILD_SCRIPT).write_text(res.joinpath("build_engine.py").read_text())
    profile = default_profile(ranges)
    info = {
        "model": TRT_MODEL, "plugin_dir": PLUGIN_DIR, "plugin_module": PLUGIN_MODULE, "runtime_module": RUNTIME_MODULE,
        "build_script": BUILD_SCRIPT, "engine_file": ENGINE_FILE, "precision": precision, "profile": profile,
        "plugins": [{k: s[k] for k in ("id", "variant", "inputs", "num_outputs", "nodes", "int32_inputs")}
                    for s in specs],
        "requires": "NVIDIA GPU, TensorRT >= 10.6 (tensorrt.plugin), torch with CUDA, onnxruntime, surgeon",
    }
    write_readme(folder, info, model, model_kind, status="")
    return info


def write_readme(folder: Path, info: dict[str, Any], model: str, model_kind: str, status: str) -> None:
    """(Re)write the bundle's README.txt; ``status`` says whether the engine was built."""
    plugins = "\n".join(f"  {p['id']:<36} {p['nodes']:>3} node(s), inputs {','.join(p['inputs'])}"
                        for p in info["plugins"]) or "  (none: the model has no surgeon op)"
    (folder / "README.txt").write_text(_README.format(
        model=model, kind=model_kind, data="model.onnx.data", plugins=plugins, precision=info["precision"],
        profile=json.dumps(info["profile"]), status=status))


def tensorrt_status() -> tuple[bool, str]:
    """(True, version) where ``import tensorrt`` (with tensorrt.plugin) works and torch sees a
    CUDA GPU; else (False, the reason)."""
    try:
        import tensorrt as trt  # noqa: F401
        import tensorrt.plugin  # noqa: F401
    except Exception as e:  # ImportError, or OSError when the libraries are missing
        first = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        return False, f"TensorRT is not available here (import tensorrt: {type(e).__name__}: {first})"
    import torch

    if not torch.cuda.is_available():
        return False, "no CUDA GPU is visible here"
    return True, str(getattr(trt, "__version__", "unknown"))


def maybe_build_engine(folder: Path, info: dict[str, Any], *, onnx_file: str, inputs: list[dict[str, Any]],
                       vocab_size: Optional[int], model: str, model_kind: str, lengths: tuple[int, ...] = (32, 96),
                       progress: Optional[Callable[[str], None]] = None) -> tuple[Optional[str], Optional[str]]:
    """Build ``model.engine`` in ``folder`` where TensorRT and a GPU exist: (engine file, None).
    Elsewhere: (None, reason) and the README says the engine must be built on the target.

    Raises :class:`surgeon.exporters.verification.VerificationFailed` when the engine's outputs differ
    from onnxruntime, :class:`BadInput` when TensorRT rejects the model.
    """
    ok, why = tensorrt_status()
    if not ok:
        reason = f"{why}; build the engine on the target GPU with: python {BUILD_SCRIPT}"
        write_readme(folder, info, model, model_kind, status=f"Engine: not built here ({reason}).")
        return None, reason
    from surgeon.exporters.trt_plugins import build_engine as B

    info["tensorrt_version"] = why
    man = json.loads(json.dumps({"kind": "export-manifest", "tensorrt": info, "inputs": inputs, "onnx": onnx_file,
                                 "vocab_size": vocab_size}))
    try:
        if progress:
            progress(f"building the TensorRT engine ({info['precision']})")
        B.register_plugins(folder, man)
        plan = B.build_engine(folder, man, info["precision"], B.profile_shapes(man, {}), log=log.info)
        (folder / ENGINE_FILE).write_bytes(plan)
        if progress:
            progress("checking the engine against onnxruntime")
        rows = B.verify(folder, man, plan, lengths, B.DEFAULT_RTOL[info["precision"]], 1e-3, log=log.info)
    except B.BundleError as e:
        raise BadInput(f"TensorRT could not build the engine: {e}",
                       "see the TensorRT log; the bundle was not written") from e
    info["engine_verification"] = rows
    if not all(r["ok"] for r in rows):
        raise VerificationFailed("the TensorRT engine differs from onnxruntime",
                                 "nothing was written; try --precision fp32", error_table(rows), rows)
    write_readme(folder, info, model, model_kind, status=f"Engine: {ENGINE_FILE} (built here with TensorRT {why}).")
    return ENGINE_FILE, None
