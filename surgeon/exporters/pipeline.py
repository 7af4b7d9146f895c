"""The export stage: a rewritten folder → ONNX (+ onnxruntime verification) or a TensorRT bundle.

    from surgeon.exporters.pipeline import export_rewritten
    man = export_rewritten("smol-rw", fmt="onnx")        # → smol-rw-onnx/{model.onnx, model.onnx.data, manifest.json}

What :func:`export_rewritten` does, in order (nothing is written until every step passed):

1. checks the arguments (format, opset in :data:`SUPPORTED_OPSETS`, verification lengths, the
   output folder) and loads DIR with :func:`surgeon.passes.rewrite.load_rewritten` (a folder
   that is not a surgeon rewrite is :class:`BadInput`);
2. exports the rewritten program with :func:`surgeon.exporters.onnx_lowering.export_program`:
   every ``surgeon::`` op is one node calling an ONNX function of domain ``surgeon`` whose body
   is standard ONNX (block-sparse variants use their gathered bodies with ``lowering="gather"``,
   see :mod:`surgeon.exporters.onnx_blocks`); batch and sequence axes stay dynamic and are
   named after the rewrite's dynamic-axes spec (``batch``, ``seq``); weights go to
   ``model.onnx.data``; ``onnx.checker.check_model(full_check=True)`` must pass;
3. verifies (default on): onnxruntime (CPU) and PyTorch (the loaded rewritten program) run the
   same inputs at two or more sequence lengths (text: batch 2, the second row left-padded;
   fixed-size inputs: two batch sizes); per output the max absolute error, the max error
   relative to the largest reference magnitude, and the tolerance ``atol + rtol·max|ref|`` are
   recorded. Outputs at padded positions are not compared;
4. for ``fmt="tensorrt"``: writes the TensorRT bundle (:mod:`surgeon.exporters.tensorrt`) and, where
   ``import tensorrt`` works and a CUDA GPU is present, builds and checks the engine;
5. writes ``manifest.json`` (:class:`ExportManifest`: ops used, opset, lengths, providers,
   errors, sha256 of every file) and switches the temporary folder (``.<OUT>.surgeon-tmp-…``
   beside OUT) in atomically (:mod:`surgeon.outputs`).

OUT defaults to a sibling of DIR, ``<DIR>-onnx`` or ``<DIR>-tensorrt`` (DIR stays exactly the
folder ``surgeon rewrite`` wrote, whose own manifest hashes its files). An existing OUT needs
``force`` and must be a previous export (its ``manifest.json``); nothing else is replaced.
A failed comparison raises :class:`VerificationFailed` (a :class:`CheckFailed`, exit
1) carrying the error table, and writes nothing — re-run with ``verify=False`` to keep an
unverified export for debugging.
"""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np
import torch
from pydantic import PrivateAttr

from surgeon.artifacts import Artifact, file_sha256
from surgeon.errors import BadInput, CheckFailed
from surgeon.exporters.verification import VerificationFailed, compare_output, error_table

log = logging.getLogger(__name__)

FORMATS = ("onnx", "tensorrt")
# Opsets tested end to end (export, onnx.checker, onnxruntime == PyTorch); newer ones go through
# the onnx C API version converter and older ones cannot express the function bodies.
SUPPORTED_OPSETS = (18, 25)
DEFAULT_LENGTHS = (32, 96)
DEFAULT_RTOL = 1e-3  # relative to the largest |reference| of each output
DEFAULT_ATOL = 1e-4
VERIFY_BATCH = 2
PRECISIONS = ("fp16", "bf16", "fp32")
MODEL_FILE = "model.onnx"
MANIFEST_FILE = "manifest.json"
_OUTPUT_NAMES = {"causal-lm": "logits", "encoder": "last_hidden_state", "vision": "last_hidden_state"}

Progress = Optional[Callable[[str], None]]


class ExportManifest(Artifact):
    """OUT/manifest.json: what the export holds, how it was checked, and the sha256 of every file.

    ``verification`` holds ``enabled``, ``lengths``, ``batch``, ``padding``, ``providers``,
    ``rtol``/``atol`` and one row per (input case, output) with ``max_abs_err``,
    ``max_rel_err`` (max abs error / max |reference|), ``tol`` and ``ok``. ``verified`` is None
    when verification was off. ``engine``/``reason``: the TensorRT engine file, or None and why.
    """

    KIND = "export-manifest"
    VERSION = 1
    kind: str = "export-manifest"
    schema_version: int = 1
    model: str
    model_kind: str
    format: str
    source: dict[str, Any]
    opset: int
    onnx: str
    external_data: Optional[str]
    inputs: list[dict[str, Any]]
    outputs: list[dict[str, Any]]
    dims: dict[str, list[int]]
    vocab_size: Optional[int] = None
    surgeon_ops: dict[str, int]
    functions: list[dict[str, str]]
    lowering: str
    verified: Optional[bool]
    verification: dict[str, Any]
    tensorrt: Optional[dict[str, Any]] = None
    engine: Optional[str] = None
    reason: Optional[str] = None
    kv_cache: Optional[dict[str, Any]] = None  # KV-cache exports (surgeon.exporters.kv_export): the cache layout
    files: dict[str, str]
    _seconds: dict[str, float] = PrivateAttr(default_factory=dict)

    @property
    def seconds(self) -> dict[str, float]:
        """Wall time of each stage of the run that made this manifest (not saved: artifacts are
        byte-identical across runs)."""
        return self._seconds


# --------------------------------------------------------------------------- arguments

def _check_args(fmt: str, opset: int, lengths: Sequence[int], precision: str) -> None:
    if fmt not in FORMATS:
        raise BadInput(f"unknown export format '{fmt}'", f"use one of: {', '.join(FORMATS)}")
    lo, hi = SUPPORTED_OPSETS
    if not isinstance(opset, int) or isinstance(opset, bool) or not lo <= opset <= hi:
        raise BadInput(f"ONNX opset {opset} is not supported", f"use an opset from {lo} to {hi} (default 18)")
    if precision not in PRECISIONS:
        raise BadInput(f"unknown TensorRT precision '{precision}'", f"use one of: {', '.join(PRECISIONS)}")
    if any(not isinstance(n, int) or isinstance(n, bool) or n < 1 for n in lengths):
        raise BadInput(f"verification lengths {list(lengths)} must be positive integers", "e.g. lengths=(32, 96)")


def default_out(rewritten: Union[str, os.PathLike], fmt: str) -> Path:
    """OUT when none is given: ``<DIR>-onnx`` / ``<DIR>-tensorrt`` next to DIR."""
    d = Path(rewritten).resolve()
    return d.parent / f"{d.name}-{fmt}"


def _resolve_out(src: Path, out: Optional[Union[str, os.PathLike]], fmt: str, force: bool) -> Path:
    dest = default_out(src, fmt) if out is None else Path(out).resolve()
    s = src.resolve()
    if dest == s or s in dest.parents or dest in s.parents:
        raise BadInput(f"output folder {dest} overlaps the rewritten folder {s}",
                       "choose an output folder outside the rewritten folder")
    from surgeon.outputs import check_target

    return check_target(dest, "export", force=force, inputs=[src])


# --------------------------------------------------------------------------- inputs

def _user_placeholders(program: torch.export.ExportedProgram) -> list[torch.fx.Node]:
    names = set(program.graph_signature.user_inputs)
    return [n for n in program.graph.nodes if n.op == "placeholder" and n.name in names]


def _vocab_size(program: torch.export.ExportedProgram, input_name: str = "input_ids") -> Optional[int]:
    """Rows of the embedding table that ``input_name`` indexes (None when there is none)."""
    for n in _user_placeholders(program):
        if n.name != input_name:
            continue
        for user in n.users:
            if user.target in (torch.ops.aten.embedding.default,) and user.args[1] is n:
                val = user.args[0].meta.get("val")
                if val is not None:
                    return int(val.shape[0])
    return None


class _Inputs:
    """Input sets for verification: text (ids + left-padded mask) or shapes from the program."""

    def __init__(self, program: torch.export.ExportedProgram, manifest: Any, lengths: Sequence[int]) -> None:
        self.places = _user_placeholders(program)
        self.names = [n.name for n in self.places]
        self.dynamic = {inp: {int(ax): (str(v[0]), int(v[1]), int(v[2])) for ax, v in axes.items()}
                        for inp, axes in manifest.dynamic.items()}
        self.text = self.names == ["input_ids", "attention_mask"]
        self.vocab = _vocab_size(program) if self.text else None
        self.symbols: dict[str, str] = {}  # program symbol (e.g. s43) → axis name (batch, seq)
        self.has_seq = False
        for n in self.places:
            for ax, d in enumerate(n.meta["val"].shape):
                spec = self.dynamic.get(n.name, {}).get(ax)
                if spec is not None and isinstance(d, torch.SymInt):
                    self.symbols[str(d)] = spec[0]
                if spec is not None and spec[0] == "seq":
                    self.has_seq = True
        self.ranges: dict[str, tuple[int, int]] = {}
        for axes in self.dynamic.values():
            for name, lo, hi in axes.values():
                self.ranges[name] = (lo, hi)
        if self.has_seq:
            lo, hi = self.ranges.get("seq", (1, 1 << 30))
            bad = [n for n in lengths if not lo <= n <= hi]
            if bad:
                raise BadInput(f"verification length(s) {bad} outside the model's sequence range {lo}..{hi}",
                               f"give lengths between {lo} and {hi}")
            if len(set(lengths)) < 2:
                raise BadInput(f"verification needs two or more distinct sequence lengths, got {list(lengths)}",
                               "e.g. lengths=(32, 96)")
            self.cases = [(VERIFY_BATCH, int(n)) for n in dict.fromkeys(lengths)]
        else:  # fixed-size inputs (vision): two batch sizes exercise the dynamic batch axis
            self.cases = [(VERIFY_BATCH, 0), (VERIFY_BATCH + 1, 0)]

    def make(self, batch: int, length: int, seed: int) -> tuple[torch.Tensor, ...]:
        g = torch.Generator().manual_seed(seed)
        if self.text:
            vocab = self.vocab or 1000
            ids = torch.randint(min(5, vocab - 1), vocab, (batch, length), generator=g)
            mask = torch.ones(batch, length, dtype=torch.long)
            if batch > 1:
                mask[1, : max(1, length // 5)] = 0  # left padding in the second row
            return ids, mask
        out = []
        for n in self.places:
            val = n.meta["val"]
            shape = []
            for ax, d in enumerate(val.shape):
                spec = self.dynamic.get(n.name, {}).get(ax)
                if spec is not None and spec[0] == "batch":
                    shape.append(batch)
                elif spec is not None and spec[0] == "seq":
                    shape.append(length)
                elif isinstance(d, torch.SymInt):
                    shape.append(int(d.node.hint) if d.node.hint is not None else 2)
                else:
                    shape.append(int(d))
            if val.dtype.is_floating_point:
                out.append(torch.randn(*shape, generator=g, dtype=val.dtype))
            elif val.dtype == torch.bool:
                out.append(torch.ones(*shape, dtype=torch.bool))
            else:
                out.append(torch.zeros(*shape, dtype=val.dtype))
        return tuple(out)

    def valid_rows(self, inputs: tuple[torch.Tensor, ...]) -> Optional[np.ndarray]:
        """Bool [B, N]: positions that are real tokens (text), else None."""
        if not self.text:
            return None
        return inputs[1].numpy() != 0


# --------------------------------------------------------------------------- ONNX post-processing

def _rename_io(path: Path, symbols: dict[str, str], output_names: list[str]) -> list[str]:
    """Name the symbolic dims (``s43`` → ``batch``) and the graph outputs; returns the output names.

    Only the .onnx file is rewritten; initializers keep pointing at the external data file.
    """
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    g = model.graph

    def fix_dims(vi: Any) -> None:
        if not vi.type.HasField("tensor_type"):
            return
        for d in vi.type.tensor_type.shape.dim:
            if d.HasField("dim_param") and d.dim_param in symbols:
                d.dim_param = symbols[d.dim_param]

    for vi in list(g.input) + list(g.output) + list(g.value_info):
        fix_dims(vi)
    taken = {vi.name for vi in g.input} | {init.name for init in g.initializer} | \
            {o for n in g.node for o in n.output}
    names = []
    for i, vi in enumerate(g.output):
        want = output_names[i] if i < len(output_names) else f"output_{i}"
        old = vi.name
        if want != old and want not in taken:
            for n in g.node:
                n.output[:] = [want if o == old else o for o in n.output]
                n.input[:] = [want if x == old else x for x in n.input]
            for v in g.value_info:
                if v.name == old:
                    v.name = want
            vi.name = want
            taken.add(want)
        names.append(vi.name)
    tmp = path.with_name(path.name + ".tmp")
    onnx.save(model, str(tmp))
    os.replace(tmp, path)
    onnx.checker.check_model(str(path), full_check=True)  # names only changed; cheap re-check
    return names


def _io_spec(path: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    import onnx

    model = onnx.load(str(path), load_external_data=False)

    def spec(vi: Any) -> dict[str, Any]:
        tt = vi.type.tensor_type
        dims: list[Any] = [d.dim_param if d.HasField("dim_param") else int(d.dim_value) for d in tt.shape.dim]
        return {"name": vi.name, "dtype": onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type).name, "shape": dims}

    return [spec(v) for v in model.graph.input], [spec(v) for v in model.graph.output]


# --------------------------------------------------------------------------- verification

def _verify(path: Path, program: torch.export.ExportedProgram, inputs: _Inputs, rtol: float, atol: float,
            progress: Progress) -> tuple[list[dict[str, Any]], list[str]]:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    in_names = [i.name for i in sess.get_inputs()]
    out_names = [o.name for o in sess.get_outputs()]
    module = program.module()
    rows: list[dict[str, Any]] = []
    for case, (batch, length) in enumerate(inputs.cases):
        if progress is not None:
            progress(f"verifying in onnxruntime: batch {batch}" + (f", {length} tokens" if length else ""))
        x = inputs.make(batch, length, seed=1000 + case)
        if len(x) != len(in_names):
            raise CheckFailed(f"the ONNX model takes {len(in_names)} inputs ({', '.join(in_names)}), "
                              f"the program {len(x)}", "re-export the model")
        got = sess.run(None, {n: t.numpy() for n, t in zip(in_names, x)})
        with torch.no_grad():
            want_tree = module(*x)
        want = [t for t in torch.utils._pytree.tree_leaves(want_tree) if isinstance(t, torch.Tensor)]
        if len(want) != len(got):
            raise CheckFailed(f"the ONNX model returns {len(got)} outputs, PyTorch {len(want)}", "re-export the model")
        valid = inputs.valid_rows(x)
        for j, (w, g) in enumerate(zip(want, got)):
            row: dict[str, Any] = {"case": case, "batch": batch, "length": length, "output": out_names[j]}
            row.update(compare_output(w.detach().cpu().numpy(), g, valid, rtol, atol))
            row["compared"] = "real tokens" if valid is not None and w.dim() >= 2 else "all"
            rows.append(row)
    return rows, list(sess.get_providers())


# --------------------------------------------------------------------------- the stage

def _default_permissions(root: Path) -> None:
    """mkdtemp/mkstemp make owner-only folders and files; give them the umask's usual modes."""
    umask = os.umask(0)
    os.umask(umask)
    for p in [root, *root.rglob("*")]:
        os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~umask)


def _hash_files(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): file_sha256(p) for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != MANIFEST_FILE}


def export_rewritten(
    rewritten: Union[str, os.PathLike],
    fmt: str = "onnx",
    out: Optional[Union[str, os.PathLike]] = None,
    opset: int = 18,
    verify: bool = True,
    force: bool = False,
    lengths: Sequence[int] = DEFAULT_LENGTHS,
    progress: Progress = None,
    *,
    precision: str = "fp16",
    rtol: float = DEFAULT_RTOL,
    atol: float = DEFAULT_ATOL,
    lowering: str = "gather",
) -> ExportManifest:
    """Export the rewritten folder ``rewritten`` (see module doc); returns the saved manifest.

    fmt: "onnx" or "tensorrt" (ONNX plus the TensorRT bundle, and the engine where TensorRT and
    a GPU exist). out: the output folder (default :func:`default_out`). opset: ONNX opset in
    :data:`SUPPORTED_OPSETS`. verify: compare onnxruntime with PyTorch at ``lengths`` (sequence
    lengths; fixed-size models use two batch sizes instead). force: replace an existing ``out``.
    progress: called with a short message per stage. precision: TensorRT builder precision
    (fp16, bf16, fp32). rtol/atol: the verification tolerance ``atol + rtol·max|ref|``.
    lowering: "gather" (block-sparse variants attend only to kept blocks) or "mask" (token masks).
    Raises :class:`BadInput` (exit 2) for unusable arguments or folders and
    :class:`VerificationFailed` (exit 1) when outputs differ; nothing is written then.
    """
    from surgeon.exporters import onnx_lowering as L
    from surgeon.passes.rewrite import load_rewritten

    t_start = time.perf_counter()
    seconds: dict[str, float] = {}
    lengths = tuple(lengths)
    _check_args(fmt, opset, lengths, precision)
    if lowering not in L.LOWERING_MODES:
        raise BadInput(f"unknown block-sparse lowering '{lowering}'", f"use one of: {', '.join(L.LOWERING_MODES)}")
    src = Path(rewritten)
    if not src.is_dir():
        raise BadInput(f"{src} is not a folder", "give a folder written by `surgeon rewrite`")
    dest = _resolve_out(src, out, fmt, force)

    def say(msg: str) -> None:
        log.info(msg)
        if progress is not None:
            progress(msg)

    say(f"loading {src}")
    t0 = time.perf_counter()
    rw = load_rewritten(src)
    lowered = L.lowered_variants()
    missing = sorted(v for v in rw.manifest.counts if v not in lowered)
    if missing:
        raise BadInput(f"variant(s) {', '.join(missing)} of this rewrite have no ONNX lowering",
                       f"rewrite those sites with a variant that has one ({', '.join(lowered)})")
    inputs = _Inputs(rw.program, rw.manifest, lengths)
    seconds["load"] = time.perf_counter() - t0

    from surgeon.outputs import Output

    with Output(dest, "export", force=force, folder=True, inputs=[src]) as o:  # built beside OUT, then switched in
        tmp = o.temp()
        say(f"exporting to ONNX (opset {opset})")
        t0 = time.perf_counter()
        example = inputs.make(*inputs.cases[0], seed=0)
        res = L.export_program(rw.program, example, None, tmp / MODEL_FILE, opset=opset, external_data=True,
                               lowering=lowering)
        n_out = len(rw.program.graph_signature.user_outputs)
        wanted = [_OUTPUT_NAMES.get(rw.manifest.model_kind, "output")] if n_out == 1 else \
            [f"output_{i}" for i in range(n_out)]
        _rename_io(tmp / MODEL_FILE, inputs.symbols, wanted)
        in_spec, out_spec = _io_spec(tmp / MODEL_FILE)
        seconds["export"] = time.perf_counter() - t0

        rows: list[dict[str, Any]] = []
        providers: list[str] = []
        verified: Optional[bool] = None
        if verify:
            t0 = time.perf_counter()
            rows, providers = _verify(tmp / MODEL_FILE, rw.program, inputs, rtol, atol, say)
            verified = all(r["ok"] for r in rows)
            seconds["verify"] = time.perf_counter() - t0
        verification = {
            "enabled": bool(verify), "runtime": "onnxruntime", "providers": providers,
            "lengths": [n for _, n in inputs.cases] if inputs.has_seq else [],
            "batches": [b for b, _ in inputs.cases], "padding": "left (second row)" if inputs.text else "none",
            "rtol": rtol, "atol": atol, "tolerance": "max_abs_err <= atol + rtol * max|pytorch|",
            "results": rows,
        }
        if verified is False:
            bad = [r for r in rows if not r["ok"]]
            worst = max(bad, key=lambda r: r["max_abs_err"] / max(r["tol"], 1e-30))
            where = f"batch {worst['batch']}" + (f", {worst['length']} tokens" if worst["length"] else "")
            raise VerificationFailed(
                f"onnxruntime differs from PyTorch in {len(bad)} of {len(rows)} comparisons (worst: output "
                f"'{worst['output']}' at {where}: max abs error {worst['max_abs_err']:.3g} > tolerance "
                f"{worst['tol']:.3g})",
                "nothing was written; see the error table, or export with verification off to inspect the model",
                error_table(rows), rows)

        trt_info: Optional[dict[str, Any]] = None
        engine = reason = None
        if fmt == "tensorrt":
            from surgeon.exporters import tensorrt as T

            say("writing the TensorRT bundle")
            t0 = time.perf_counter()
            trt_info = T.write_bundle(tmp, MODEL_FILE, inputs.ranges, precision=precision, model=rw.manifest.model,
                                      model_kind=rw.manifest.model_kind)
            engine, reason = T.maybe_build_engine(
                tmp, trt_info, onnx_file=MODEL_FILE, inputs=in_spec, vocab_size=inputs.vocab, model=rw.manifest.model,
                model_kind=rw.manifest.model_kind, lengths=tuple(n for _, n in inputs.cases), progress=say)
            trt_info["engine_built"] = engine is not None
            seconds["tensorrt"] = time.perf_counter() - t0

        man = ExportManifest(
            model_fingerprint=rw.manifest.model_fingerprint, model=rw.manifest.model,
            model_kind=rw.manifest.model_kind, format=fmt,
            source={"folder": src.resolve().name, "rewrite_json": file_sha256(src / "rewrite.json"),
                    "files": dict(rw.manifest.files)},
            opset=res.opset, onnx=MODEL_FILE, external_data=res.external_data, inputs=in_spec, outputs=out_spec,
            dims={k: [lo, hi] for k, (lo, hi) in sorted(inputs.ranges.items())}, vocab_size=inputs.vocab,
            surgeon_ops=dict(sorted(res.surgeon_nodes.items())),
            functions=[{"domain": d, "name": n, "overload": o} for d, n, o in res.functions],
            lowering=lowering, verified=verified, verification=verification, tensorrt=trt_info,
            engine=engine, reason=reason, files=_hash_files(tmp))
        (tmp / MANIFEST_FILE).write_text(man.to_json())
        _default_permissions(tmp)
        o.commit()
    seconds["total"] = time.perf_counter() - t_start
    man._seconds.update(seconds)
    say(f"wrote {dest}")
    return man
