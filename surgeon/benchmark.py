"""Speed of a rewritten model against the same model with every site dense.

``bench(DIR)`` loads a folder written by ``surgeon rewrite`` and builds two modules from its
program:

* **rewritten**: the program as saved (each site runs the ``surgeon::`` op its policy chose);
* **dense**: the same graph with every ``surgeon::`` op node retargeted to ``surgeon::dense``
  (SDPA), block-mask edges and modulators dropped (:func:`densify`). Everything outside
  attention — weights, projections, norms, MLPs — is the identical graph, so the difference
  is attention alone.

Whole-model time is one prefill of batch 1. For causal language models the LM head is applied
to the last position only (:func:`last_token_only` slices the hidden states before the final
``linear``; the [N, vocab] logits would otherwise cost as much as several layers: 1.6 GB at
8192 tokens for SmolLM2). Models without an LM head (encoders, vision) return their full output.

Per-site attention time: every ``surgeon::`` op node is wrapped by a timer
(:class:`SiteTimer`), so each prefill also yields the time of each site's op call on that
site's real q/k/v — dense SDPA in the dense module, the rewritten op in the rewritten one.

Density: one untimed forward of the rewritten module runs under
:func:`surgeon.attention.base.recording`; each site reports its achieved density (kept
(query, key) pairs / the pairs dense attention uses; dense and modulated sites report 1) and
its relative output error against dense SDPA on the same inputs. ``density`` of a result is
the mean over sites (all sites of a transformer have the same shape, so this is the fraction
of dense attention pairs the rewritten model computes).

Protocol: one warm-up forward of each module (the rewritten one is the density run), then
``repeats`` rounds, each timing the dense and the rewritten prefill back to back (the order
alternates between rounds), so background load hits both alike; medians are reported, and
the raw times too. Speedups are ratios of medians.

CPU threads: on a machine shared with other busy processes, torch's OpenMP threads with the
default (active) wait policy can make block-sparse ops (many small parallel regions) an order of
magnitude slower while dense SDPA is barely affected; run with ``OMP_WAIT_POLICY=PASSIVE`` (set
before Python starts) or one thread there. ``device`` in the result records both.

Input text: the held-out split of the built-in corpus (real tokens, so content-dependent
variants select as they would in use), cut to each length; random token ids when the corpus is
too short. Vision models run one image-sized input (``seq_lens`` does not apply).

Inputs: a rewritten folder is the normal case (its policy came from a profile and its fidelity
was measured by ``surgeon rewrite``). A bare model is rewritten with uniform ``block_topk`` at
``keep=budget`` on every site, and the result's ``policy_source`` says that this speedup has
no fidelity measurement behind it.
"""
from __future__ import annotations

import logging
import operator
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

from surgeon.errors import ArtifactMismatch, BadInput

log = logging.getLogger(__name__)

ProgressFn = Callable[[str], None]
_SLICE_END = (1 << 63) - 1


# --------------------------------------------------------------------------- machine description

def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_description(device: str = "cpu") -> dict[str, Any]:
    """What the numbers were measured on: CPU model, cores, threads, torch version (and GPU
    name, capability and CUDA version for ``cuda``)."""
    d: dict[str, Any] = {"device": device, "torch": torch.__version__, "python": platform.python_version(),
                         "platform": platform.platform(), "cpu": _cpu_model(), "cpu_cores": os.cpu_count(),
                         "torch_threads": torch.get_num_threads(),
                         "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")}
    if device == "cuda":
        d["gpu"] = torch.cuda.get_device_name(0)
        d["gpu_capability"] = ".".join(str(x) for x in torch.cuda.get_device_capability(0))
        d["cuda"] = torch.version.cuda
    return d


def load_average() -> Optional[list[float]]:
    """The 1, 5 and 15 minute load averages (None where the OS has none)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def check_device(device: str) -> str:
    """Validate ``device`` ("cpu" or "cuda"); BadInput when CUDA is asked for but absent."""
    if device not in ("cpu", "cuda"):
        raise BadInput(f"device '{device}' is not supported", "use --device cpu or --device cuda")
    if device == "cuda" and not torch.cuda.is_available():
        raise BadInput("--device cuda was asked for but this torch sees no CUDA GPU "
                       f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'no'})",
                       "run on a machine with an NVIDIA GPU and a CUDA build of torch, or use --device cpu")
    return device


# --------------------------------------------------------------------------- graph edits

def is_surgeon_op(node: torch.fx.Node) -> bool:
    """True for a ``call_function`` node whose target is a ``torch.ops.surgeon.*`` overload."""
    if node.op != "call_function":
        return False
    t = node.target
    return isinstance(t, torch._ops.OpOverload) and t.namespace == "surgeon"


def surgeon_nodes(graph: torch.fx.Graph) -> list[torch.fx.Node]:
    """The ``surgeon::`` op nodes of ``graph`` in execution order."""
    return [n for n in graph.nodes if is_surgeon_op(n)]


def _op_args(node: torch.fx.Node) -> list[Any]:
    """The nine positional arguments (q, k, v, key_padding, attn_mask, causal, scale, config,
    block_mask) of a surgeon op node, kwargs folded in."""
    names = ("q", "k", "v", "key_padding", "attn_mask", "causal", "scale", "config", "block_mask")
    args = list(node.args) + [None] * (len(names) - len(node.args))
    for i, nm in enumerate(names):
        if nm in node.kwargs:
            args[i] = node.kwargs[nm]
    return args


def densify(gm: torch.fx.GraphModule) -> int:
    """Retarget every ``surgeon::`` op of ``gm`` (in place) to ``surgeon::dense`` with the same
    q/k/v, masks, causality and scale; block-mask edges and modulators are dropped. Returns the
    number of sites."""
    from surgeon.attention.base import decode_config, encode_config
    from surgeon.attention.dense import DenseParams
    from surgeon.attention.ops import op_for
    from surgeon.attention.registry import get_variant

    graph = gm.graph
    dense_op = op_for("dense")
    nodes = surgeon_nodes(graph)
    mask_edges: list[torch.fx.Node] = []
    for node in nodes:
        args = _op_args(node)
        cfg = decode_config(str(args[7]))
        static = {k: cfg[k] for k in ("kv_heads", "site", "layer") if k in cfg}
        args[7] = encode_config("dense", DenseParams(), static)
        args[8] = None
        produces = get_variant(str(cfg.get("variant", "dense"))).produces_block_mask
        node.target = dense_op
        node.args = tuple(args)
        node.kwargs = {}
        if produces:
            for user in list(node.users):
                if user.op == "call_function" and user.target is operator.getitem and user.args[1] == 0:
                    user.replace_all_uses_with(node)
                    graph.erase_node(user)
                else:
                    mask_edges.append(user)
    for edge in mask_edges:
        if edge.users:
            raise BadInput(f"the block mask of {edge.args[0]} feeds a non-attention node ({next(iter(edge.users))})",
                           "bench only graphs written by `surgeon rewrite`")
        graph.erase_node(edge)
    graph.lint()
    gm.recompile()
    return len(nodes)


def last_token_only(gm: torch.fx.GraphModule) -> bool:
    """If ``gm``'s output is an LM head (``linear`` on [B, N, C] hidden states with a 2-D weight),
    slice its input to the last position in place, so the output is logits [B, 1, V]. Returns
    whether it did."""
    out = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    vals = out.args[0]
    if isinstance(vals, (tuple, list)):
        if len(vals) != 1:
            return False
        vals = vals[0]
    if not isinstance(vals, torch.fx.Node) or vals.op != "call_function" or \
            vals.target is not torch.ops.aten.linear.default:
        return False
    x, w = vals.args[0], vals.args[1]
    xv = x.meta.get("val") if isinstance(x, torch.fx.Node) else None
    wv = w.meta.get("val") if isinstance(w, torch.fx.Node) else None
    if wv is None and isinstance(w, torch.fx.Node) and w.op == "get_attr":
        wv = getattr(gm, str(w.target), None)
    if xv is None or getattr(xv, "dim", lambda: 0)() != 3 or wv is None or wv.dim() != 2:
        return False
    with gm.graph.inserting_before(vals):
        sl = gm.graph.call_function(torch.ops.aten.slice.Tensor, (x, 1, -1, _SLICE_END))
    vals.args = (sl,) + tuple(vals.args[1:])
    gm.recompile()
    return True


class SiteTimer:
    """Wraps every ``surgeon::`` op node of a GraphModule with a wall-clock timer.

    ``times[site]`` accumulates seconds per site while ``active``; :meth:`take` returns and
    clears them. On CUDA each call is bracketed by ``torch.cuda.synchronize()``.
    """

    def __init__(self, gm: torch.fx.GraphModule, *, sync: bool = False) -> None:
        from surgeon.attention.base import decode_config

        self.sites: list[str] = []
        self.times: dict[str, float] = {}
        self.active = False
        for i, node in enumerate(surgeon_nodes(gm.graph)):
            site = str(decode_config(str(_op_args(node)[7])).get("site") or f"site{i}")
            self.sites.append(site)
            node.target = self._wrap(node.target, site, i, sync)
        gm.recompile()

    def _wrap(self, op: Any, site: str, i: int, sync: bool) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            if not self.active:
                return op(*args, **kwargs)
            if sync:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = op(*args, **kwargs)
            if sync:
                torch.cuda.synchronize()
            self.times[site] = self.times.get(site, 0.0) + time.perf_counter() - t0
            return out

        timed.__name__ = f"surgeon_bench_site_{i}"
        return timed

    def take(self) -> dict[str, float]:
        t, self.times = self.times, {}
        return t


# --------------------------------------------------------------------------- inputs

def _seq_limits(man_dynamic: dict[str, Any], max_positions: int) -> tuple[int, int]:
    lo, hi = 1, 1 << 30
    for axes in (man_dynamic or {}).values():
        for spec in axes.values():
            if isinstance(spec, (list, tuple)) and len(spec) == 3 and spec[0] == "seq":
                lo, hi = max(lo, int(spec[1])), min(hi, int(spec[2]))
    if max_positions:
        hi = min(hi, int(max_positions))
    return lo, hi


def bench_inputs(lm: Any, seq_lens: Sequence[int], limits: tuple[int, int]) -> tuple[dict[int, tuple], list[int], str]:
    """Inputs per length (batch 1), lengths skipped as outside ``limits``, and the data source.

    Text: held-out rows of the built-in corpus (``input_ids [1, N]``, ``attention_mask [1, N]``),
    random ids if the corpus is too short. Vision / fixed-size modules: one input at the model's
    own size, keyed by its token count.
    """
    lo, hi = limits
    if lm.is_text:
        lens = sorted({int(n) for n in seq_lens})
        ok = [n for n in lens if lo <= n <= hi]
        skipped = [n for n in lens if not lo <= n <= hi]
        if not ok:
            raise BadInput(f"no sequence length in {lens} fits {lm.name} (it takes {lo} to {hi} tokens)",
                           f"pass --seq-lens within [{lo}, {hi}]")
        from surgeon.profiles.data import load_calibration

        try:
            data = load_calibration(None, lm, 1, max(ok), "heldout")
            ids, source = data.inputs[0], data.source + ":heldout"
        except BadInput:
            ids = lm.example_inputs(max(ok), batch=1)[0]
            source = "random token ids"
        return {n: (ids[:, :n].contiguous(), torch.ones(1, n, dtype=torch.long)) for n in ok}, skipped, source
    if lm.kind == "module" and lm.seq_axes:
        lens = sorted({int(n) for n in seq_lens})
        ok = [n for n in lens if lo <= n <= hi]
        if not ok:
            raise BadInput(f"no sequence length in {lens} fits {lm.name} (it takes {lo} to {hi})",
                           f"pass --seq-lens within [{lo}, {hi}]")
        return ({n: lm.example_inputs(n, batch=1) for n in ok}, [n for n in lens if n not in ok],
                "random example inputs")
    x = lm.example_inputs(batch=1)
    n = int(lm.max_positions or 0)
    return {n: x}, [int(s) for s in seq_lens], "random example inputs (fixed size: seq_lens do not apply)"


# --------------------------------------------------------------------------- measurement

def _median_ms(xs: list[float]) -> float:
    return statistics.median(xs) * 1e3


def _site_densities(records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    from surgeon.evaluate import summarize_sites

    return {s["site"]: s for s in summarize_sites(records)}


def _measure_length(rew: torch.nn.Module, dense: torch.nn.Module, t_rew: SiteTimer, t_dense: SiteTimer,
                    inputs: tuple, repeats: int, warmup: int, sync: bool) -> dict[str, Any]:
    from surgeon.attention.base import recording

    def run(m: torch.nn.Module) -> float:
        if sync:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        m(*inputs)
        if sync:
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    load_before = load_average()
    with torch.no_grad():
        with recording() as rec:  # warm-up of the rewritten module, and its densities
            rew(*inputs)
        dens = _site_densities(rec.records)
        for i in range(warmup):
            run(dense)
            if i > 0:
                run(rew)
        whole: dict[str, list[float]] = {"dense": [], "rewritten": []}
        per_site: dict[str, dict[str, list[float]]] = {"dense": {}, "rewritten": {}}
        for r in range(repeats):
            order = [("dense", dense, t_dense), ("rewritten", rew, t_rew)]
            if r % 2:
                order.reverse()
            for key, mod, timer in order:
                timer.active = True
                try:
                    whole[key].append(run(mod))
                finally:
                    timer.active = False
                for site, sec in timer.take().items():
                    per_site[key].setdefault(site, []).append(sec)
    load_after = load_average()
    sites = []
    for site in t_rew.sites:
        d_ms = _median_ms(per_site["dense"].get(site, [0.0]))
        r_ms = _median_ms(per_site["rewritten"].get(site, [0.0]))
        info = dens.get(site, {})
        sites.append({"site": site, "variant": info.get("variant", "?"), "dense_ms": d_ms, "rewritten_ms": r_ms,
                      "speedup": d_ms / r_ms if r_ms > 0 else None,
                      "requested_density": info.get("requested_density", 1.0),
                      "achieved_density": info.get("achieved_density", 1.0), "rel_error": info.get("rel_error")})
    # attention time of one forward = sum over sites of that forward's site times (median over rounds)
    attn = {k: statistics.median(sum(per_site[k][s][r] for s in per_site[k]) for r in range(repeats)) * 1e3
            if per_site[k] else 0.0 for k in ("dense", "rewritten")}
    d_ms, r_ms = _median_ms(whole["dense"]), _median_ms(whole["rewritten"])
    densities = [s["achieved_density"] for s in sites]
    return {
        "dense_ms": d_ms, "rewritten_ms": r_ms, "speedup": d_ms / r_ms,
        "density": sum(densities) / len(densities) if densities else 1.0,
        "attn_dense_ms": attn["dense"], "attn_rewritten_ms": attn["rewritten"],
        "attn_speedup": attn["dense"] / attn["rewritten"] if attn["rewritten"] > 0 else None,
        "speedup_per_round": [a / b for a, b in zip(whole["dense"], whole["rewritten"])],
        "dense_runs_ms": [x * 1e3 for x in whole["dense"]], "rewritten_runs_ms": [x * 1e3 for x in whole["rewritten"]],
        "load_average_before": load_before, "load_average_after": load_after, "sites": sites,
    }


def bench_program(program: torch.export.ExportedProgram, lm: Any, *, seq_lens: Sequence[int] = (2048, 4096, 8192),
                  device: str = "cpu", repeats: int = 3, warmup: int = 1, progress: Optional[ProgressFn] = None,
                  limits: Optional[tuple[int, int]] = None) -> dict[str, Any]:
    """Time a rewritten ``program`` (an ExportedProgram with ``surgeon::`` ops) against its
    densified copy on ``lm``'s inputs; see the module docstring. Returns
    ``{"device", "settings", "data", "skipped_seq_lens", "results": [...]}``.
    """
    check_device(device)
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise BadInput(f"repeats={repeats!r} is invalid", "use at least 1 repeat")
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 1:
        raise BadInput(f"warmup={warmup!r} is invalid", "use at least 1 warm-up run")
    if not seq_lens:
        raise BadInput("no sequence lengths were given", "pass e.g. --seq-lens 2048 4096")
    step = progress or (lambda msg: None)
    from surgeon.attention.ops import register_all

    register_all()
    sync = device == "cuda"
    if sync:
        from torch.export.passes import move_to_device_pass

        program = move_to_device_pass(program, "cuda")
    rew, dense = program.module(), program.module()
    if not surgeon_nodes(rew.graph):
        raise BadInput("the program has no surgeon ops (nothing was rewritten)", "bench a folder written by `surgeon rewrite`")
    densify(dense)
    head_rew, head_dense = last_token_only(rew), last_token_only(dense)
    t_rew, t_dense = SiteTimer(rew, sync=sync), SiteTimer(dense, sync=sync)
    inputs, skipped, source = bench_inputs(lm, seq_lens, limits or (16, int(lm.max_positions or 1 << 30)))
    results = []
    for n, x in inputs.items():
        step(f"timing {n} tokens (dense and rewritten, {repeats} rounds)")
        x = tuple(t.to(device) for t in x)
        r = _measure_length(rew, dense, t_rew, t_dense, x, repeats, warmup, sync)
        results.append({"seq_len": n, **r})
        log.info("bench %s tokens: dense %.1f ms, rewritten %.1f ms (%.2fx); attention %.2fx",
                 n, r["dense_ms"], r["rewritten_ms"], r["speedup"], r["attn_speedup"] or 0.0)
    return {
        "device": device_description(device),
        "settings": {"repeats": repeats, "warmup": warmup, "batch": 1, "dtype": "float32",
                     "output": "last-token logits" if head_rew and head_dense else "full output",
                     "timing": "wall clock; dense and rewritten prefills alternate round by round; medians",
                     "per_site": "each surgeon op call timed inside the prefill on its real q/k/v"},
        "data": source, "skipped_seq_lens": skipped, "results": results,
    }


def bench(model_or_dir: str | Path | Any = None, seq_lens: Sequence[int] = (2048, 4096, 8192), device: str = "cpu",
          repeats: int = 3, progress: Optional[ProgressFn] = None, *, warmup: int = 1,
          budget: float = 0.15, block_size: int = 64) -> dict[str, Any]:
    """Benchmark a rewritten model against the same model with every site dense.

    ``model_or_dir``: a folder written by ``surgeon rewrite`` (or a loaded
    :class:`surgeon.passes.rewrite.Rewritten`) — the usual case: its policy and its measured
    fidelity are in that folder. A model (alias, path, ``None`` for the default) is rewritten
    here with **uniform** ``block_topk`` at ``keep=budget`` on every site, with no profile; the
    result says so in ``policy_source``, and its fidelity is not measured (use ``surgeon
    rewrite`` + ``surgeon eval`` for that).

    Returns a dict with ``device`` (CPU model/cores/torch, or GPU name), ``model``, ``counts``,
    ``settings``, ``data`` and ``results``: one entry per sequence length with ``seq_len``,
    ``dense_ms``, ``rewritten_ms``, ``speedup`` (whole prefill, batch 1), ``density`` (mean
    achieved attention density over sites), ``attn_dense_ms``, ``attn_rewritten_ms``,
    ``attn_speedup`` (sum of the per-site op times), the raw runs, the load average, and
    ``sites`` (per-site times, densities and output errors). Raises BadInput for
    ``device="cuda"`` without CUDA, a budget outside (0, 1], or no usable length.
    """
    from surgeon.models import DEFAULT_MODEL
    from surgeon.models import load as load_model
    from surgeon.passes.rewrite import Rewritten, load_rewritten

    check_device(device)
    step = progress or (lambda msg: None)
    if model_or_dir is None:
        model_or_dir = DEFAULT_MODEL
    is_path = isinstance(model_or_dir, (str, os.PathLike))
    if isinstance(model_or_dir, Rewritten) or (is_path and Path(model_or_dir).is_dir()
                                               and (Path(model_or_dir) / "rewrite.json").exists()):
        if isinstance(model_or_dir, Rewritten):
            rw = model_or_dir
        else:
            step("loading the rewritten folder")
            rw = load_rewritten(Path(model_or_dir))
        step(f"loading {rw.manifest.model}")
        lm = load_model(rw.manifest.model)
        if lm.fingerprint() != rw.manifest.model_fingerprint:
            raise ArtifactMismatch(f"{rw.path} was made from a different {rw.manifest.model} than the one installed",
                                   "re-run `surgeon rewrite` for the installed model")
        limits = _seq_limits(rw.manifest.dynamic, rw.manifest.max_positions)
        out = bench_program(rw.program, lm, seq_lens=seq_lens, device=device, repeats=repeats, warmup=warmup,
                            progress=progress, limits=limits)
        return {"model": rw.manifest.model, "rewritten": str(rw.path), "policy_source": rw.policy.source,
                "budget": rw.policy.budget, "counts": dict(rw.manifest.counts), **out}
    # a model: uniform block_topk at keep=budget (no profile)
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0.0 < float(budget) <= 1.0:
        raise BadInput(f"--budget {budget} is outside (0, 1]", "give the fraction of attention keys to keep, e.g. 0.15")
    from surgeon.capture import capture
    from surgeon.passes.policy import uniform_policy
    from surgeon.passes.rewrite import rewrite

    step(f"loading {model_or_dir}")
    lm = load_model(str(model_or_dir)) if is_path else model_or_dir
    step("capturing")
    cap = capture(lm)
    names = [s.name for s in cap.sites]
    pol = uniform_policy(lm.fingerprint(), names, "block_topk", {"keep": float(budget), "block_size": int(block_size)})
    step(f"rewriting {len(names)} sites to block_topk keep={budget}")
    res = rewrite(cap, pol)
    limits = _seq_limits({k: {a: list(v) for a, v in ax.items()} for k, ax in cap.dynamic.items()},
                         int(lm.max_positions or 0))
    out = bench_program(res.program, lm, seq_lens=seq_lens, device=device, repeats=repeats, warmup=warmup,
                        progress=progress, limits=limits)
    return {"model": lm.name, "rewritten": None,
            "policy_source": f"uniform block_topk keep={budget} block_size={block_size} (no profile; fidelity "
                             "not measured: use `surgeon rewrite` and `surgeon eval`)",
            "budget": float(budget), "counts": dict(res.counts), **out}
