#!/usr/bin/env python3
"""Build (and check) a TensorRT engine from a surgeon TensorRT bundle. Run it on the target GPU.

    python build_engine.py                       # the bundle is this script's folder
    python build_engine.py --precision fp32 --max-seq 2048 --lengths 64 300

Steps: register the bundle's ``surgeon::`` plugins (plugins/surgeon_qdp.py, TensorRT >= 10.6
``tensorrt.plugin``), parse ``model_trt.onnx`` (surgeon nodes become plugin layers), build with
one optimisation profile over the dynamic batch/sequence axes and the chosen precision flag,
save the engine, then run engine and onnxruntime (``model.onnx``, whose surgeon ops are standard
ONNX functions) on random inputs at two or more lengths and compare the outputs.

Needs: an NVIDIA GPU, TensorRT >= 10.6 (Python), torch with CUDA, the ``surgeon`` package that
wrote the bundle (the plugins run its ops), onnxruntime. Exit codes: 0 built (and checked),
1 the engine's outputs differ from onnxruntime, 2 missing requirement or bad arguments.

This file is also imported by surgeon itself (``surgeon.exporters.trt_plugins.build_engine``) to
build in-process where TensorRT is installed; it does not import TensorRT at import time.
"""
import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

HERE = Path(__file__).resolve().parent
EXIT_OK, EXIT_MISMATCH, EXIT_USAGE = 0, 1, 2


class BundleError(Exception):
    """A missing requirement or an unusable bundle (exit 2)."""


def load_manifest(bundle: Path) -> Dict[str, Any]:
    path = bundle / "manifest.json"
    if not path.is_file():
        raise BundleError(f"{path} not found: run this script inside a surgeon TensorRT bundle (or pass --bundle)")
    man = json.loads(path.read_text())
    if man.get("kind") != "export-manifest" or not man.get("tensorrt"):
        raise BundleError(f"{path} is not the manifest of a surgeon TensorRT bundle")
    verify_files(bundle, man.get("files") or {})
    return man


def verify_files(bundle: Path, files: Dict[str, str]) -> None:
    """Every file the manifest lists has the recorded sha256 (engines excepted: this script
    rebuilds them). A changed, truncated or missing model or plugin file is a BundleError."""
    import hashlib

    for name, digest in sorted(files.items()):
        if name.endswith(".engine"):
            continue
        f = bundle / name
        if not f.is_file():
            raise BundleError(f"{f} is missing (listed in {bundle / 'manifest.json'})")
        h = hashlib.sha256()
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        if h.hexdigest() != digest:
            raise BundleError(f"{f} does not match the sha256 recorded in {bundle / 'manifest.json'} "
                              "(changed, truncated or replaced after export)")


def import_tensorrt() -> Any:
    try:
        import tensorrt as trt  # noqa: F401
        import tensorrt.plugin  # noqa: F401  (TensorRT >= 10.6)
    except Exception as e:  # ImportError, or OSError when the libraries are missing
        raise BundleError(f"TensorRT >= 10.6 with tensorrt.plugin is required ({type(e).__name__}: {e})") from e
    return trt


def register_plugins(bundle: Path, man: Dict[str, Any]) -> List[str]:
    """Import plugins/surgeon_qdp.py from the bundle and register every plugin it defines."""
    info = man["tensorrt"]
    plugin_dir = bundle / info.get("plugin_dir", "plugins")
    module_path = plugin_dir / info.get("plugin_module", "surgeon_qdp.py")
    if str(plugin_dir) not in sys.path:
        sys.path.insert(0, str(plugin_dir))
    name = module_path.stem
    mod = sys.modules.get(name)
    if mod is None:
        spec = importlib.util.spec_from_file_location(name, module_path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
    return list(mod.register())


def profile_shapes(man: Dict[str, Any], overrides: Dict[str, Tuple[int, int, int]]) -> Dict[str, List[List[int]]]:
    """{input: [min, opt, max]} shapes from the manifest's inputs and the profile's axis ranges."""
    axes = dict(man["tensorrt"]["profile"])
    axes.update({k: list(v) for k, v in overrides.items()})
    shapes: Dict[str, List[List[int]]] = {}
    for spec in man["inputs"]:
        mins, opts, maxs = [], [], []
        for d in spec["shape"]:
            if isinstance(d, int) and d > 0:
                lo = opt = hi = d
            elif d in axes:
                lo, opt, hi = axes[d]
            else:
                raise BundleError(f"input {spec['name']} has an axis '{d}' without a profile range; "
                                  f"pass --axis {d}=MIN,OPT,MAX")
            mins.append(lo)
            opts.append(opt)
            maxs.append(hi)
        shapes[spec["name"]] = [mins, opts, maxs]
    return shapes


def build_engine(bundle: Path, man: Dict[str, Any], precision: str, shapes: Dict[str, List[List[int]]],
                 workspace_gb: float = 8.0, log=print) -> bytes:
    """Parse the plugin ONNX model and build a serialized engine (plugins must be registered)."""
    trt = import_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # TensorRT 10: explicit batch is the only mode
    parser = trt.OnnxParser(network, logger)
    onnx_path = bundle / man["tensorrt"]["model"]
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise BundleError(f"TensorRT could not parse {onnx_path.name}: " + " | ".join(errors[:5]))
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    flag = {"fp16": "FP16", "bf16": "BF16", "fp32": None}[precision]
    if flag is not None:
        config.set_flag(getattr(trt.BuilderFlag, flag))
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        t = network.get_input(i)
        if t.name not in shapes:
            raise BundleError(f"network input {t.name} is not in the manifest")
        lo, opt, hi = shapes[t.name]
        profile.set_shape(t.name, lo, opt, hi)
    config.add_optimization_profile(profile)
    t0 = time.perf_counter()
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise BundleError("TensorRT failed to build the engine (see the TensorRT log above)")
    log(f"built the engine in {time.perf_counter() - t0:.1f} s")
    return bytes(plan)


def make_inputs(man: Dict[str, Any], batch: int, length: int, seed: int) -> Dict[str, Any]:
    """Random inputs like surgeon's verification: text ids + left-padded mask, or random tensors."""
    import numpy as np

    rng = np.random.default_rng(seed)
    names = [s["name"] for s in man["inputs"]]
    feeds: Dict[str, Any] = {}
    for spec in man["inputs"]:
        shape = [batch if d == "batch" else length if d == "seq" else int(d) for d in spec["shape"]]
        dtype = np.dtype(spec["dtype"])
        if spec["name"] == "input_ids":
            vocab = int(man.get("vocab_size") or 1000)
            feeds[spec["name"]] = rng.integers(min(5, vocab - 1), vocab, size=shape).astype(dtype)
        elif spec["name"] == "attention_mask":
            m = np.ones(shape, dtype=dtype)
            if shape[0] > 1:
                m[1, : max(1, shape[1] // 5)] = 0
            feeds[spec["name"]] = m
        elif dtype.kind == "f":
            feeds[spec["name"]] = rng.standard_normal(shape).astype(dtype)
        else:
            feeds[spec["name"]] = np.ones(shape, dtype=dtype)
    return {n: feeds[n] for n in names}


def run_engine(engine: Any, feeds: Dict[str, Any]) -> Dict[str, Any]:
    """Run a deserialized engine on numpy inputs (torch CUDA buffers); numpy outputs by name."""
    import numpy as np
    import tensorrt as trt
    import torch

    ctx = engine.create_execution_context()
    keep = []
    for name, arr in feeds.items():
        t = torch.from_numpy(np.ascontiguousarray(arr)).cuda()
        keep.append(t)
        ctx.set_input_shape(name, tuple(arr.shape))
        ctx.set_tensor_address(name, t.data_ptr())
    outs: Dict[str, Any] = {}
    to_torch = {trt.float32: torch.float32, trt.float16: torch.float16, trt.bfloat16: torch.bfloat16,
                trt.int32: torch.int32, trt.int64: torch.int64, trt.bool: torch.bool, trt.int8: torch.int8}
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        if engine.get_tensor_mode(name) != trt.TensorIOMode.OUTPUT:
            continue
        shape = tuple(ctx.get_tensor_shape(name))
        buf = torch.empty(shape, dtype=to_torch[engine.get_tensor_dtype(name)], device="cuda")
        outs[name] = buf
        ctx.set_tensor_address(name, buf.data_ptr())
    stream = torch.cuda.Stream()
    if not ctx.execute_async_v3(stream.cuda_stream):
        raise BundleError("TensorRT execution failed")
    stream.synchronize()
    return {n: t.float().cpu().numpy() if t.is_floating_point() else t.cpu().numpy() for n, t in outs.items()}


def verify(bundle: Path, man: Dict[str, Any], engine_bytes: bytes, lengths: Sequence[int], rtol: float,
           atol: float, log=print) -> List[Dict[str, Any]]:
    """Engine vs onnxruntime on model.onnx at each length (batch 2); one row per (length, output)."""
    import numpy as np
    import onnxruntime as ort
    import tensorrt as trt

    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    engine = runtime.deserialize_cuda_engine(engine_bytes)
    providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in ort.get_available_providers()]
    sess = ort.InferenceSession(str(bundle / man["onnx"]), providers=providers)
    has_seq = any(d == "seq" for s in man["inputs"] for d in s["shape"])
    rows: List[Dict[str, Any]] = []
    for i, n in enumerate(lengths if has_seq else [0, 0]):
        batch = 2 if has_seq else 2 + i
        feeds = make_inputs(man, batch, n, seed=2000 + i)
        want = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))
        got = run_engine(engine, feeds)
        valid = feeds["attention_mask"] != 0 if "attention_mask" in feeds else None
        for name, w in want.items():
            g = got[name]
            if valid is not None and w.ndim >= 2 and w.shape[:2] == valid.shape:
                w, g = w[valid], g[valid]
            w64, g64 = w.astype(np.float64), g.astype(np.float64)
            scale = float(np.abs(w64).max()) if w64.size else 0.0
            err = float(np.abs(w64 - g64).max()) if w64.size else 0.0
            tol = atol + rtol * scale
            rows.append({"batch": batch, "length": n, "output": name, "max_abs_err": err,
                         "max_rel_err": err / scale if scale else 0.0, "tol": tol, "ok": bool(err <= tol)})
            log(f"  batch {batch} length {n} {name}: max abs err {err:.3e} (tolerance {tol:.3e}) "
                f"{'ok' if err <= tol else 'MISMATCH'}")
    return rows


DEFAULT_RTOL = {"fp32": 1e-3, "fp16": 3e-2, "bf16": 6e-2}


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", type=Path, default=HERE, help="bundle folder (default: this script's folder)")
    ap.add_argument("--precision", choices=("fp16", "bf16", "fp32"), default=None,
                    help="builder precision flag (default: the manifest's)")
    ap.add_argument("--axis", action="append", default=[], metavar="NAME=MIN,OPT,MAX",
                    help="profile range of a dynamic axis, e.g. seq=16,512,4096 (default: the manifest's)")
    ap.add_argument("--engine", default="model.engine", help="engine file name inside the bundle")
    ap.add_argument("--lengths", type=int, nargs="+", default=[32, 96], help="verification sequence lengths")
    ap.add_argument("--no-verify", action="store_true", help="skip the onnxruntime comparison")
    ap.add_argument("--workspace-gb", type=float, default=8.0)
    args = ap.parse_args(argv)
    try:
        bundle = args.bundle.resolve()
        man = load_manifest(bundle)
        precision = args.precision or man["tensorrt"].get("precision", "fp16")
        overrides: Dict[str, Tuple[int, int, int]] = {}
        for a in args.axis:
            try:
                name, vals = a.split("=")
                lo, opt, hi = (int(x) for x in vals.split(","))
            except ValueError:
                raise BundleError(f"--axis {a!r}: write NAME=MIN,OPT,MAX") from None
            overrides[name] = (lo, opt, hi)
        import_tensorrt()
        import torch

        if not torch.cuda.is_available():
            raise BundleError("no CUDA GPU is visible to torch; build the engine on the target GPU machine")
        ids = register_plugins(bundle, man)
        print(f"registered {len(ids)} plugin(s): {', '.join(ids)}")
        plan = build_engine(bundle, man, precision, profile_shapes(man, overrides), args.workspace_gb)
        out = bundle / args.engine
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_bytes(plan)
        tmp.replace(out)
        print(f"wrote {out} ({len(plan) / 1e6:.1f} MB, {precision})")
        if not args.no_verify:
            rows = verify(bundle, man, plan, args.lengths, DEFAULT_RTOL[precision], 1e-3)
            if not all(r["ok"] for r in rows):
                print("error: the engine's outputs differ from onnxruntime", file=sys.stderr)
                return EXIT_MISMATCH
    except BundleError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
