"""Policy evaluation and evidence helpers: run policies (or dense) on calibration or held-out
rows and compare head budgets and layer policies (README "What was measured").
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np
import torch

from surgeon.attention.base import VariantParams
from surgeon.attention.registry import get_variant
from surgeon.capture import Captured
from surgeon.errors import BadInput
from surgeon.evaluate import next_token_ce
from surgeon.models import LoadedModel
from surgeon.passes.policy import Policy
from surgeon.profiles.collector import Collector, instrument, _Mode, rel_l2
from surgeon.profiles.data import CalibrationData, load_calibration
from surgeon.profiles.profile_doc import Profile
from surgeon.profiles.profile_settings import ProfileSettings


def policy_modes(cap: Captured, policy: Optional[Policy]) -> dict[int, tuple[Any, VariantParams, Optional[int]]]:
    """site index → (variant, params, anchor index) for every non-dense site of ``policy``."""
    if policy is None:
        return {}
    order = {s.name: i for i, s in enumerate(cap.sites)}
    out: dict[int, tuple[Any, VariantParams, Optional[int]]] = {}
    for name, ch in policy.sites.items():
        if name not in order:
            raise BadInput(f"the policy names site {name} which this model does not have", "plan for this model")
        if ch.variant == "dense" and not ch.modulators:
            continue
        if ch.modulators:
            raise BadInput(f"site {name} composes modulators, which the profiler's evaluator does not run",
                           "evaluate modulated policies with `surgeon verify`")
        var = get_variant(ch.variant)
        anchor = order.get(ch.block_mask_from) if ch.block_mask_from else None
        out[order[name]] = (var, var.params_from(ch.params), anchor)
    return out


def evaluate_policies(lm: LoadedModel, cap: Captured, policies: dict[str, Optional[Policy]],
                      data: CalibrationData) -> dict[str, dict[str, float]]:
    """Run each policy (None = dense) on every row of ``data``; returns per policy the mean
    CE (causal LMs; else NaN), its increase over dense and the mean relative L2 error of the
    output (logits / hidden states) versus dense."""
    col = Collector(cap, ProfileSettings(samples=1, seq_len=max(16, data.seq_len or 16)))
    gm = instrument(cap, col)
    lm_loss = lm.kind == "causal-lm"
    modes = {k: policy_modes(cap, p) for k, p in policies.items()}
    res: dict[str, dict[str, list[float]]] = {k: {"ce": [], "rel_l2": []} for k in policies}
    base_ce: list[float] = []
    with torch.no_grad():
        for s in range(data.samples):
            inputs = data.row(s)
            col.mode = _Mode()
            ref = gm(*inputs)
            base_ce.append(next_token_ce(ref, inputs[0]) if lm_loss else float("nan"))
            for k in policies:
                col.mode = _Mode(policy=modes[k])
                col.produced = {}
                out = gm(*inputs)
                res[k]["ce"].append(next_token_ce(out, inputs[0]) if lm_loss else float("nan"))
                res[k]["rel_l2"].append(rel_l2(out, ref))
            col.produced = {}
    dense_ce = float(np.mean(base_ce))
    return {k: {"ce": float(np.mean(v["ce"])), "ce_increase": float(np.mean(v["ce"])) - dense_ce,
                "rel_l2": float(np.mean(v["rel_l2"])), "dense_ce": dense_ce} for k, v in res.items()}


def heldout_data(lm: LoadedModel, texts_heldout: Optional[Sequence[str]], samples: int, seq_len: int,
                 seed: int = 0) -> CalibrationData:
    """Held-out rows: from ``texts_heldout`` (all of it is held-out text: no alternation) or, when
    None, the built-in corpus's ``heldout`` split."""
    if texts_heldout is None:
        return load_calibration(None, lm, samples, seq_len, "heldout", seed=seed)
    from surgeon.profiles.data import _fingerprint, _pick_rows, _quiet_tokenizer

    if lm.tokenizer is None:
        raise BadInput(f"{lm.name} has no tokenizer", "held-out texts need a text model")
    if isinstance(texts_heldout, str):
        texts_heldout = [texts_heldout]
    with _quiet_tokenizer():
        ids = lm.encode_texts([str(t) for t in texts_heldout], seq_len)
    if ids.shape[0] < samples:
        raise BadInput(f"the held-out texts give {ids.shape[0]} rows of {seq_len} tokens but {samples} are needed",
                       "give more held-out text or fewer samples")
    pick = _pick_rows(int(ids.shape[0]), samples, seed)
    x = ids[pick].contiguous()
    return CalibrationData(inputs=(x, torch.ones_like(x)), source="texts", split="heldout",
                           fingerprint=_fingerprint("heldout", x), seq_len=seq_len,
                           tokens_available=int(ids.numel()), documents=len(texts_heldout),
                           rows_available=int(ids.shape[0]), row_indices=pick)


def compare_head_budgets(lm: LoadedModel, cap: Captured, profile: Profile, budget: float,
                         texts_heldout: Optional[Sequence[str]] = None, *, samples: int = 2,
                         seq_len: Optional[int] = None, seed: int = 0) -> dict[str, Any]:
    """HeSS-guided vs uniform per-head budgets at equal total compute, on held-out text.

    Every site runs ``block_topk``: "uniform" keeps ``budget`` of the key blocks in every head;
    "hess_layer" water-fills the same per-site total over the site's heads by HeSS;
    "hess_model" water-fills the same model-wide total over all heads (methods.md §1's H_tot =
    all heads). Held-out data: ``texts_heldout`` or the built-in corpus's heldout split
    (``samples`` rows of ``seq_len`` tokens, default the profile's). Returns, per policy, the CE
    on the held-out rows, its increase over dense and the relative L2 error of the final logits
    (hidden states for non-LM models), the modelled attention density of each policy at the
    evaluation length (equal nominal totals are not exactly equal densities: heads at the
    forced-block floor keep more than their nominal share), plus the settings used.
    """
    from surgeon.profiles.plan import uniform_head_policy

    profile.check_sites([s.name for s in cap.sites])
    n = int(seq_len or profile.settings["seq_len"])
    data = heldout_data(lm, texts_heldout, samples, n, seed) if lm.is_text else \
        load_calibration(None, lm, samples, n, "heldout", seed=seed)
    pols = {"uniform": uniform_head_policy(profile, budget, head_budget="uniform"),
            "hess_layer": uniform_head_policy(profile, budget, head_budget="hess", scope="layer"),
            "hess_model": uniform_head_policy(profile, budget, head_budget="hess", scope="model")}
    res = evaluate_policies(lm, cap, pols, data)
    for k, pol in pols.items():
        res[k]["density"] = policy_density(profile, pol, n)
    return {"budget": float(budget), "samples": samples, "seq_len": n, "data": data.describe(), "results": res}


def policy_density(profile: Profile, policy: Policy, n: Optional[int] = None) -> float:
    """Modelled attention density of ``policy`` at ``n`` tokens (default: the profile's length):
    mean over sites; dense = 1; block_topk/reuse at the geometric density of their (anchor's)
    per-head keeps (see :func:`surgeon.profiles.plan.block_topk_density`)."""
    from surgeon.profiles.plan import block_topk_density

    n = int(n or profile.settings["seq_len"])
    bs = int(profile.settings["block_size"])
    out = []
    for s in profile.sites:
        ch = policy.sites.get(s.name)
        if ch is None or ch.variant not in ("block_topk", "reuse"):
            out.append(1.0)
            continue
        src = policy.sites[ch.block_mask_from] if ch.variant == "reuse" and ch.block_mask_from else ch
        ks = src.params.get("head_keep") or [src.params.get("keep", 1.0)]
        out.append(float(np.mean(block_topk_density(n, bs, np.asarray(ks, dtype=np.float64), s.causal,
                                                    int(src.params.get("sink_blocks", 1)),
                                                    int(src.params.get("local_blocks", 1))))))
    return float(np.mean(out))


def compare_layer_policies(lm: LoadedModel, cap: Captured, profile: Profile, budget: float,
                           texts_heldout: Optional[Sequence[str]] = None, *, options: Any = None,
                           samples: int = 2, seq_len: Optional[int] = None, seed: int = 0) -> dict[str, Any]:
    """The planned (HyLRA DP + HeSS) policy vs "first k layers full, the rest block_topk" at equal
    modelled cost, on held-out text. k is the number of FULL layers the plan chose; the
    baseline's keep is the largest whose block_topk density d (forced blocks included, at the
    profile's length) satisfies ``(k + (L − k)(d + select_cost)) / L ≤ cost(plan)`` — or the
    forced-block floor when none does (then ``baseline_cost`` exceeds the plan's; both are
    returned). Returns CE, CE increase and relative L2 of the final logits for both (see
    :func:`compare_head_budgets`).
    """
    from surgeon.profiles.plan import first_k_policy, keep_for_density, plan_details
    from surgeon.profiles.solvers import select_overhead

    profile.check_sites([s.name for s in cap.sites])
    det = plan_details(profile, budget, options=options)
    L = len(cap.sites)
    k = sum(1 for r in det.roles if r == "full")
    bs = int(profile.settings["block_size"])
    sc = select_overhead(bs, "prefill")
    dens_b = (det.cost * L - k) / max(L - k, 1) - sc  # the baseline's sparse layers' density
    if not (0 < dens_b <= 1):
        raise BadInput(f"no first-{k}-full baseline matches the plan's cost {det.cost:.4g}", "use another budget")
    from surgeon.profiles.plan import block_topk_density

    n_ref, causal = int(profile.settings["seq_len"]), bool(cap.sites[-1].causal)
    sb, lb = int(profile.settings.get("sink_blocks", 1)), int(profile.settings.get("local_blocks", 1))
    try:
        keep_b = keep_for_density(n_ref, bs, dens_b, causal, sb, lb)
    except BadInput:  # the plan's sparse layers sit below block_topk's floor: the baseline pays the floor
        keep_b = 1e-6
    dens_real = float(block_topk_density(n_ref, bs, keep_b, causal, sb, lb))
    cost_b = (k + (L - k) * (dens_real + sc)) / L
    n = int(seq_len or profile.settings["seq_len"])
    data = heldout_data(lm, texts_heldout, samples, n, seed) if lm.is_text else \
        load_calibration(None, lm, samples, n, "heldout", seed=seed)
    pols = {"planned": det.policy, f"first_{k}_full": first_k_policy(profile, k, keep_b)}
    res = evaluate_policies(lm, cap, pols, data)
    for name, pol in pols.items():
        res[name]["density"] = policy_density(profile, pol, n)
    return {"budget": float(budget), "cost": det.cost, "full_layers": k, "plan_keep": det.keep,
            "baseline_keep": keep_b, "baseline_density": dens_real, "baseline_cost": cost_b, "roles": det.roles, "samples": samples, "seq_len": n,
            "data": data.describe(), "results": res}
