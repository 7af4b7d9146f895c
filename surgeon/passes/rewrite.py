"""The rewrite pass: replace each site's SDPA node by the ``surgeon::`` op its policy names.

The pass works on the unlifted fx graph of the captured program, wires block-mask edges
between anchor and consumer sites, removes the mask-building code that became dead, and
re-exports the result with ``torch.export`` (same dynamic axes).
"""
from __future__ import annotations

import json
import logging
import operator
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from torch.export import ExportedProgram

from surgeon.artifacts import Artifact, canonical_json
from surgeon.capture import SDPA, Captured, Site, _sdpa_args, export_module, sdpa_nodes
from surgeon.errors import ArtifactMismatch, BadInput
from surgeon.passes.policy import Policy, SiteChoice
from surgeon.attention.base import encode_config
from surgeon.attention.ops import op_for, register_all
from surgeon.attention.registry import VARIANTS, get_variant

log = logging.getLogger(__name__)


@dataclass
class RewriteResult:
    program: ExportedProgram
    policy: Policy
    counts: dict[str, int]
    seconds: float
    configs: dict[str, str] = field(default_factory=dict)


def site_config(site: Site, choice: SiteChoice) -> str:
    """The op's ``config`` string for ``site`` under ``choice`` (parameters validated)."""
    var = get_variant(choice.variant)
    params = var.params_from(choice.params)
    check = getattr(var, "validate_for_site", None)
    if check is not None:
        check(params, heads=site.heads, kv_heads=site.kv_heads, causal=site.causal, site=site.name)
    mods = []
    for m in choice.modulators:
        mv = get_variant(m.variant)
        if mv.family != "modulated":
            raise BadInput(f"'{m.variant}' is not a modulated variant and cannot be composed onto {site.name}",
                           "list only modulated variants under modulators")
        mp = mv.params_from(m.params)
        mcheck = getattr(mv, "validate_for_site", None)
        if mcheck is not None:
            mcheck(mp, heads=site.heads, kv_heads=site.kv_heads, causal=site.causal, site=site.name)
        mods.append({"variant": m.variant, "params": mp.to_dict()})
    static: dict[str, Any] = {"kv_heads": site.kv_heads, "site": site.name, "layer": site.layer}
    if mods:
        static["modulators"] = mods
    if choice.dense_below is not None:
        if var.family != "sparse":
            raise BadInput(f"site {site.name}: dense_below applies to sparse variants, not '{choice.variant}'",
                           "remove dense_below from this site")
        if isinstance(choice.dense_below, bool) or int(choice.dense_below) < 1:
            raise BadInput(f"site {site.name}: dense_below={choice.dense_below!r} is invalid",
                           "give a positive number of tokens")
        static["dense_below"] = int(choice.dense_below)
    return encode_config(choice.variant, params, static)


def validate_policy(policy: Policy, sites: list[Site]) -> None:
    names = [s.name for s in sites]
    unknown = sorted(set(policy.sites) - set(names))
    if unknown:
        raise ArtifactMismatch(f"the policy names site(s) this model does not have: {unknown[:3]}",
                               "make the policy for this model")
    order = {s.name: i for i, s in enumerate(sites)}
    for name, ch in policy.sites.items():
        if ch.variant not in VARIANTS:
            raise BadInput(f"site {name}: unknown variant '{ch.variant}'", f"valid variants: {', '.join(sorted(VARIANTS))}")
        var = get_variant(ch.variant)
        if var.consumes_block_mask:
            src = ch.block_mask_from
            if src is None or src not in order:
                raise BadInput(f"site {name} runs '{ch.variant}' but names no valid anchor (block_mask_from={src!r})",
                               "set block_mask_from to an earlier site that produces a block mask")
            if order[src] >= order[name]:
                raise BadInput(f"site {name} reads the block mask of {src}, which runs after it",
                               "choose an earlier anchor site")
            anchor = policy.sites.get(src)
            if anchor is None or not get_variant(anchor.variant).produces_block_mask:
                raise BadInput(f"anchor site {src} does not produce a block mask",
                               "give the anchor a variant that produces one (e.g. block_topk)")
            av = get_variant(anchor.variant)
            probe = torch.empty(1, 1, 1000, 1)
            a_shape = av.block_mask_shape(probe, probe, av.params_from(anchor.params))
            c_shape = var.block_mask_shape(probe, probe, var.params_from(ch.params))
            if tuple(a_shape) != tuple(c_shape):
                raise BadInput(f"site {name} reads {src}'s block mask with other block sizes "
                               f"(blocks {tuple(c_shape[2:])} vs {tuple(a_shape[2:])} at 1000 tokens)",
                               "give the consumer the same block_size (or q_block/page_size) as its anchor")


def rewrite(cap: Captured, policy: Policy) -> RewriteResult:
    """Apply ``policy`` to the captured program; returns the re-exported program."""
    t0 = time.perf_counter()
    register_all()
    validate_policy(policy, cap.sites)
    gm = cap.program.module()
    graph = gm.graph
    nodes = sdpa_nodes(graph)
    if len(nodes) != len(cap.sites):
        raise BadInput(f"graph has {len(nodes)} attention nodes but the capture lists {len(cap.sites)} sites",
                       "capture the model again")
    placeholders = {n.name: n for n in graph.nodes if n.op == "placeholder"}
    kp_node = None
    am = placeholders.get("attention_mask")
    if am is not None:
        last_ph = [n for n in graph.nodes if n.op == "placeholder"][-1]
        with graph.inserting_after(last_ph):
            kp_node = graph.call_function(torch.ops.aten.ne.Scalar, (am, 0))
    produced: dict[str, torch.fx.Node] = {}
    counts: dict[str, int] = {}
    configs: dict[str, str] = {}
    for node, site in zip(nodes, cap.sites):
        choice = policy.sites.get(site.name, SiteChoice(variant="dense", reason="default"))
        var = get_variant(choice.variant)
        if var.causal_only and not site.causal:
            raise BadInput(f"variant '{choice.variant}' needs a causal site but {site.name} is not causal",
                           "choose a variant that supports non-causal attention")
        cfg = site_config(site, choice)
        configs[site.name] = cfg
        a = _sdpa_args(node)
        if site.mask_kind == "explicit":
            kp, mask = None, a["attn_mask"]
        else:
            mask = None
            kp = kp_node if ("padding" in site.mask_kind and kp_node is not None) else None
        bm = produced[choice.block_mask_from] if var.consumes_block_mask else None
        with graph.inserting_before(node):
            new = graph.call_function(op_for(choice.variant),
                                      (a["query"], a["key"], a["value"], kp, mask, bool(site.causal),
                                       float(site.scale), cfg, bm))
            new.meta.update({k: v for k, v in node.meta.items() if k in ("nn_module_stack", "stack_trace")})
            out = new
            if var.produces_block_mask:
                out = graph.call_function(operator.getitem, (new, 0))
                produced[site.name] = graph.call_function(operator.getitem, (new, 1))
        node.replace_all_uses_with(out)
        graph.erase_node(node)
        counts[choice.variant] = counts.get(choice.variant, 0) + 1
    graph.eliminate_dead_code()
    gm.recompile()
    with torch.no_grad():
        ep = export_module(gm, cap.example, cap.dynamic, cap.model.inputs)
    return RewriteResult(program=ep, policy=policy, counts=counts, seconds=time.perf_counter() - t0, configs=configs)


# --------------------------------------------------------------------------- the rewritten folder

class RewriteManifest(Artifact):
    """DIR/rewrite.json: what DIR holds and what it was made from."""

    KIND = "rewrite"
    VERSION = 1
    kind: str = "rewrite"
    schema_version: int = 1
    model: str
    model_kind: str
    inputs: list[str]
    dynamic: dict[str, dict[str, list[Any]]]
    sites: list[dict[str, Any]]
    counts: dict[str, int]
    max_positions: int
    files: dict[str, str] = {}


def save_rewritten(out_dir: Path, cap: Captured, res: RewriteResult, *, force: bool = False,
                   extra: Optional[dict[str, bytes]] = None, inputs: tuple = ()) -> Path:
    """Write DIR/program.pt2, policy.json, rewrite.json (+ tokenizer/) atomically as a folder
    (built beside DIR and switched in, see :mod:`surgeon.outputs`; an existing DIR needs ``force``
    and must be a previous rewrite folder)."""
    from surgeon.artifacts import file_sha256
    from surgeon.outputs import Output

    with Output(out_dir, "rewrite", force=force, folder=True, inputs=inputs) as o:
        tmp = o.temp()
        torch.export.save(res.program, str(tmp / "program.pt2"))
        (tmp / "policy.json").write_text(res.policy.to_json())
        if cap.model.tokenizer is not None:
            cap.model.tokenizer.save_pretrained(str(tmp / "tokenizer"))
        for name, data in (extra or {}).items():
            (tmp / name).write_bytes(data)
        files = {p.relative_to(tmp).as_posix(): file_sha256(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
        man = RewriteManifest(model_fingerprint=cap.model.fingerprint(), model=cap.model.name,
                              model_kind=cap.model.kind, inputs=cap.model.inputs,
                              dynamic={k: {str(ax): list(v) for ax, v in d.items()} for k, d in cap.dynamic.items()},
                              sites=[s.to_dict() for s in cap.sites], counts=res.counts,
                              max_positions=cap.model.max_positions, files=files)
        (tmp / "rewrite.json").write_text(man.to_json())
        return o.commit()


def verify_files(root: Path, files: dict[str, str], manifest: str) -> None:
    """Every file ``manifest`` lists is present with the recorded sha256 (BadInput naming the first
    that is not)."""
    from surgeon.artifacts import file_sha256

    for name, digest in sorted(files.items()):
        f = root / name
        if not f.is_file():
            raise BadInput(f"{f} is missing (listed in {root / manifest})",
                           "the folder is incomplete; regenerate it with surgeon")
        if file_sha256(f) != digest:
            raise BadInput(f"{f} does not match the sha256 recorded in {root / manifest} (changed, truncated or "
                           "replaced after surgeon wrote it)", "regenerate the folder with surgeon")


@dataclass
class Rewritten:
    """A loaded rewritten folder."""

    path: Path
    manifest: RewriteManifest
    policy: Policy
    program: ExportedProgram
    tokenizer: Any = None

    def module(self) -> torch.nn.Module:
        return self.program.module()


def load_rewritten(path: Path | str) -> Rewritten:
    """Load a folder written by :func:`save_rewritten` (registers the surgeon ops first)."""
    path = Path(path)
    if not path.is_dir() or not (path / "rewrite.json").is_file() or not (path / "program.pt2").is_file():
        raise BadInput(f"{path} is not a surgeon rewrite (no rewrite.json/program.pt2)",
                       "give a folder written by `surgeon rewrite`")
    man = RewriteManifest.load(path / "rewrite.json")
    verify_files(path, man.files, "rewrite.json")
    policy = Policy.load(path / "policy.json", model_fingerprint=man.model_fingerprint)
    register_all()
    try:
        ep = torch.export.load(str(path / "program.pt2"))
    except Exception as e:
        raise BadInput(f"{path / 'program.pt2'} could not be loaded ({type(e).__name__})",
                       "re-run `surgeon rewrite` to regenerate the folder") from e
    tok = None
    if (path / "tokenizer").is_dir():
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(path / "tokenizer"))
    return Rewritten(path=path, manifest=man, policy=policy, program=ep, tokenizer=tok)
