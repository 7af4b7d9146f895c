"""The calibration profiler, the planner and the report (small settings: seconds, not minutes)."""
from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from surgeon.capture import Site
from surgeon.errors import ArtifactMismatch, BadInput
from surgeon.passes.rewrite import rewrite, validate_policy
from surgeon.profiles.collect import profile
from surgeon.profiles.collector import Collector, _Mode
from surgeon.profiles.evidence import compare_head_budgets, compare_layer_policies
from surgeon.profiles.profile_settings import ProfileSettings
from surgeon.profiles.data import load_calibration, split_documents
from surgeon.profiles.plan import PlanOptions, block_topk_density, keep_for_density, plan, plan_details
from surgeon.profiles.profile_doc import Profile
from surgeon.profiles.report import write_report
from surgeon.profiles.solvers import policy_cost, select_overhead
from surgeon.attention.base import AttnContext
from surgeon.attention.registry import get_variant

SMALL = dict(samples=2, seq_len=128, block_size=16, grad_samples=1, sens_samples=1)


@pytest.fixture(scope="module")
def smol_profile(smollm2, smollm2_cap):
    return profile(smollm2, smollm2_cap, **SMALL)


# --------------------------------------------------------------------------- data

def test_builtin_corpus_splits(smollm2):
    a = load_calibration(None, smollm2, 2, 128, "calib")
    b = load_calibration(None, smollm2, 2, 128, "heldout")
    a2 = load_calibration(None, smollm2, 2, 128, "calib")
    ids, mask = a.inputs
    assert ids.shape == (2, 128) and ids.dtype == torch.long and bool((mask == 1).all())
    assert torch.equal(ids, a2.inputs[0]) and a.fingerprint == a2.fingerprint
    assert a.fingerprint != b.fingerprint and not torch.equal(ids, b.inputs[0])
    assert a.source == "builtin:pydoc_data.topics" and a.tokens_available > 10_000
    docs = ["d0", "d1", "d2", "d3", "d4"]
    assert split_documents(docs, "calib") == ["d0", "d2", "d4"]
    assert split_documents(docs, "heldout") == ["d1", "d3"]


def test_text_sources(smollm2, tmp_path):
    para = " ".join(["The quick brown fox jumps over the lazy dog."] * 40)
    txt = tmp_path / "a.txt"
    txt.write_text("\n\n".join([para] * 6))
    folder = tmp_path / "docs"
    folder.mkdir()
    for i in range(4):
        (folder / f"{i}.txt").write_text(para)
    jl = tmp_path / "d.jsonl"
    jl.write_text("\n".join(json.dumps({"text": para}) for _ in range(4)) + "\n")
    for src in (txt, folder, jl):
        d = load_calibration(src, smollm2, 2, 64, "heldout")
        assert d.inputs[0].shape == (2, 64) and d.source == str(src)


def test_bad_inputs(smollm2, minilm, vit, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("only a few words here\n\nand a second paragraph")
    with pytest.raises(BadInput, match=r"has \d+ tokens but 8 samples × 2048 tokens need 16384"):
        load_calibration(short, smollm2, 8, 2048)
    empty = tmp_path / "empty.txt"
    empty.write_text("   \n\n  ")
    with pytest.raises(BadInput, match="holds no text"):
        load_calibration(empty, smollm2, 1, 64)
    with pytest.raises(BadInput, match="beyond"):
        load_calibration(None, minilm, 1, 1024)
    with pytest.raises(BadInput, match="no such file"):
        load_calibration(tmp_path / "missing.txt", smollm2, 1, 64)
    binary = tmp_path / "bin.txt"
    binary.write_bytes(b"\xff\xfe\x00\x81" * 100)
    with pytest.raises(BadInput, match="not UTF-8"):
        load_calibration(binary, smollm2, 1, 64)
    bad_jl = tmp_path / "bad.jsonl"
    bad_jl.write_text('{"text": "ok"}\n{"txt": 3}\n')
    with pytest.raises(BadInput, match="line 2 has no string field 'text'"):
        load_calibration(bad_jl, smollm2, 1, 64)
    with pytest.raises(BadInput, match="no built-in image corpus"):
        load_calibration(None, vit, 1, 64)
    with pytest.raises(BadInput, match="too short"):
        load_calibration(None, smollm2, 1, 4)
    with pytest.raises(BadInput, match="split"):
        load_calibration(None, smollm2, 1, 64, "train")


# --------------------------------------------------------------------------- statistics

def test_profile_sanity(smol_profile, smollm2_cap):
    p = smol_profile
    L = len(smollm2_cap.sites)
    assert p.site_names == [s.name for s in smollm2_cap.sites]
    assert p.settings["hess_method"] == "gradient" and p.settings["grad_window"] == "full"
    assert p.settings["sens_samples"] == 1 and p.settings["grad_checkpointing"] is False
    for s in p.sites:
        for f in ("mass_fraction_90", "mass_fraction_95"):
            v = np.asarray(getattr(s, f))
            assert v.shape == (9,) and (v > 0).all() and (v <= 1).all()
        assert (np.asarray(s.mass_fraction_95) >= np.asarray(s.mass_fraction_90) - 1e-9).all()
        assert 0 < s.hash_ratio <= 1
        ent = np.asarray(s.entropy)
        assert (ent >= 0).all() and (ent <= s.entropy_max + 1e-6).all() and s.entropy_max <= math.log(128) + 1e-9
        assert ((np.asarray(s.entropy_normalized) >= 0) & (np.asarray(s.entropy_normalized) <= 1 + 1e-6)).all()
        cov = np.asarray(s.coverage)
        assert cov.shape == (9, len(p.settings["keep_grid"]))
        assert (np.diff(cov, axis=1) >= -1e-9).all() and np.allclose(cov[:, -1], 1.0, atol=1e-5)
        assert ((np.asarray(s.local_mass) >= 0) & (np.asarray(s.local_mass) <= 1 + 1e-5)).all()
        assert ((np.asarray(s.primary_sink_mass) >= 0) & (np.asarray(s.primary_sink_mass) <= 1 + 1e-6)).all()
        assert (np.asarray(s.hess_proxy) > 0).all() and s.sensitivity is not None
        assert set(s.hess_terms) == {"ce", "pseudo_ce"}
    o = np.asarray(p.overlap)
    assert o.shape == (L, L) and np.allclose(np.diag(o), 1.0)
    assert ((o >= 0) & (o <= 1)).all() and np.allclose(np.tril(o, -1), 0)
    assert np.asarray(p.overlap_per_kv_head).shape == (3, L, L)
    # HeSS: each of the two terms is normalised over all heads → total 2
    assert math.isclose(float(np.nansum(p.matrix("hess"))), 2.0, rel_tol=1e-6)
    assert len(p.hash_ratios) == L and len(p.layer_sensitivity) == L
    assert len(p.sinks["primary_score"]) == L and p.sinks["secondary_count"] >= 0


def test_profile_is_deterministic(smol_profile, smollm2, smollm2_cap, tmp_path):
    again = profile(smollm2, smollm2_cap, **SMALL)
    assert again.to_json() == smol_profile.to_json()
    path = smol_profile.save(tmp_path / "profile.json")
    back = Profile.load(path, model_fingerprint=smollm2.fingerprint())
    assert back.to_json() == smol_profile.to_json()
    with pytest.raises(ArtifactMismatch, match="another model"):
        Profile.load(path, model_fingerprint="0" * 32)


def test_chunked_equals_unchunked(minilm, minilm_cap):
    kw = dict(samples=2, seq_len=64, block_size=16, sens_samples=1)
    a = profile(minilm, minilm_cap, chunk_elems=1, **kw)  # one query block per chunk
    b = profile(minilm, minilm_cap, chunk_elems=1 << 30, **kw)  # all rows at once
    assert a.settings["hess_method"] == "label-free"
    for sa, sb in zip(a.sites, b.sites):
        for f in ("mass_fraction_90", "mass_fraction_95", "coverage", "entropy", "local_mass", "primary_sink_mass",
                  "hess", "hess_proxy"):
            np.testing.assert_allclose(getattr(sa, f), getattr(sb, f), rtol=1e-4, atol=1e-6, err_msg=f)
    np.testing.assert_allclose(a.overlap, b.overlap, atol=1e-9)


def _toy_collector(causal: bool, hq: int = 4, hkv: int = 2, block: int = 8, **kw) -> Collector:
    site = Site(name="toy.attn", layer=0, heads=hq, kv_heads=hkv, head_dim=16, scale=0.25, causal=causal,
                mask_kind="causal" if causal else "none", kind="sdpa")
    return Collector(SimpleNamespace(sites=[site]), ProfileSettings(samples=1, seq_len=64, block_size=block, **kw))


@pytest.mark.parametrize("causal", [True, False])
def test_delta_equals_block_topk(causal):
    torch.manual_seed(0)
    col = _toy_collector(causal, chunk_elems=4 * 64 * 16)
    q = torch.randn(1, 4, 64, 16)
    k, v = torch.randn(1, 2, 64, 16), torch.randn(1, 2, 64, 16)
    col.mode = _Mode(delta=True, keep_delta=True)
    out = col.call(0, q, k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1), None, 0.0, causal, 0.25)
    dense = F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), is_causal=causal,
                                           scale=0.25)
    torch.testing.assert_close(out, dense)
    bt = get_variant("block_topk")
    p = bt.params_from({"keep": 0.15, "block_size": 8, "sink_blocks": 1, "local_blocks": 1})
    ctx = AttnContext(causal=causal, scale=0.25, kv_heads=2)
    sparse, _ = bt.reference(q.double(), k.double(), v.double(), ctx, p)
    torch.testing.assert_close(col.deltas[0].double(), sparse - dense.double(), atol=2e-5, rtol=1e-4)
    assert float(col.deltas[0].abs().max()) > 1e-3  # the sparse pattern really drops something


def test_secondary_sink_rule():
    col = _toy_collector(True, hq=1, hkv=1, sink_min_queries=4)
    acc = col.acc[0]
    n = 64
    cnt = torch.tensor([n - 1 - j for j in range(n)], dtype=torch.float64)
    sigma = torch.full((n,), 0.01, dtype=torch.float64)
    sigma[0], sigma[7], sigma[9] = 0.5, 0.2, 0.2
    hidden = torch.randn(1, n, 8)
    hidden[0, 7] = 3 * hidden[0, 0]  # aligned with the first token
    hidden[0, 9] = -hidden[0, 0]  # anti-aligned: not a sink
    col._sinks(0, acc, sigma * cnt, n, n, 0, True, 1, hidden)
    assert [p for p, _, _ in col.sample_sinks[0]] == [7]
    col.end_stats_sample(0, None, None)
    assert col.secondary[0]["position"] == 7 and col.secondary[0]["start_layer"] == 0


def test_vision_profile_label_free(vit, vit_cap, tmp_path):
    from PIL import Image

    g = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(g.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(tmp_path / f"im{i}.png")
    p = profile(vit, vit_cap, data_path=str(tmp_path), samples=2, block_size=16, sens_samples=1)
    assert p.settings["hess_method"] == "label-free" and p.settings["sensitivity_metric"] == "rel_l2"
    assert p.settings["seq_len"] == 197 and len(p.sites) == 12
    assert all(s.sensitivity is not None and s.sensitivity >= 0 for s in p.sites)


# --------------------------------------------------------------------------- plan

@pytest.mark.parametrize("budget", [0.4, 0.6])
def test_plan_meets_budget(smol_profile, smollm2_cap, budget):
    det = plan_details(smol_profile, budget)
    assert det.cost <= budget + 1e-12
    validate_policy(det.policy, smollm2_cap.sites)
    pol = det.policy
    # the cost is the geometric density block_topk really keeps at 128 tokens (forced blocks included)
    dens = []
    for name, role in zip(smol_profile.site_names, det.roles):
        ch = pol.sites[name]
        src = pol.sites[ch.block_mask_from] if ch.variant == "reuse" else ch
        ks = src.params.get("head_keep", [src.params.get("keep", 1.0)])
        dens.append(1.0 if ch.variant == "dense" else float(block_topk_density(128, 16, np.asarray(ks), True).mean()))
    assert policy_cost(det.roles, dens, select_overhead(16)) == pytest.approx(det.cost)
    assert pol.budget == budget and set(pol.sites) == set(smol_profile.site_names)
    for name, ch in pol.sites.items():
        if ch.variant == "block_topk":
            hk = ch.params["head_keep"]
            assert len(hk) == 9 and np.mean(hk) == pytest.approx(ch.params["keep"], abs=1e-5)
        if ch.variant == "reuse":
            assert pol.sites[ch.block_mask_from].variant == "block_topk"
    assert plan(smol_profile, budget).to_json() == pol.to_json()  # pure


def test_block_topk_density_matches_variant():
    """The planner's geometric density equals what block_topk reports on real tensors."""
    bt = get_variant("block_topk")
    torch.manual_seed(0)
    q, k = torch.randn(1, 2, 200, 8), torch.randn(1, 2, 200, 8)
    for causal in (True, False):
        for keep in (0.02, 0.3, 0.7):
            p = bt.params_from({"keep": keep, "block_size": 16})
            got = bt.achieved_density(q, k, k, AttnContext(causal=causal, scale=0.3, kv_heads=2), p)
            assert float(block_topk_density(200, 16, keep, causal)) == pytest.approx(got, abs=0.02)
    kf = keep_for_density(2048, 64, 0.2, True)
    assert float(block_topk_density(2048, 64, kf, True)) <= 0.2 < float(block_topk_density(2048, 64, kf + 1e-6, True))
    with pytest.raises(BadInput, match="floor"):
        keep_for_density(2048, 64, 0.05, True)


def test_plan_options_and_limits(smol_profile):
    uni = plan(smol_profile, 0.5, options={"head_budget": "uniform"})
    assert all("head_keep" not in ch.params for ch in uni.sites.values())
    noreuse = plan_details(smol_profile, 0.5, options=PlanOptions(reuse=False, head_scope="layer"))
    assert "reuse" not in noreuse.roles
    capped = plan_details(smol_profile, 0.5, options={"rho_search": False, "mode": "decode"})
    assert "reuse" in capped.roles and capped.cost <= 0.5
    searched = plan_details(smol_profile, 0.5)
    assert {c["rho"] for c in searched.candidates} == {0.3, 1.0}
    best = min(c["predicted_error"] for c in searched.candidates if c["feasible"])
    assert searched.predicted_error == pytest.approx(best)
    dense = plan(smol_profile, 1.0)
    assert {ch.variant for ch in dense.sites.values()} == {"dense"}
    # 128 tokens in blocks of 16: block_topk's forced blocks alone keep ≈ 0.35 of the causal pairs
    with pytest.raises(BadInput, match=r"below the cheapest plan for this profile \(≈0\.349 of dense attention at 128 tokens"):
        plan(smol_profile, 0.15)
    from surgeon.profiles.plan import min_budget

    mb = min_budget(smol_profile)
    assert 0.349 < mb < 0.36 and plan_details(smol_profile, mb + 0.01).cost <= mb + 0.01
    with pytest.raises(BadInput, match="unknown plan option"):
        plan(smol_profile, 0.5, options={"nope": 1})


def test_planned_policy_rewrites_and_runs(smol_profile, smollm2, smollm2_cap):
    pol = plan(smol_profile, 0.5, options={"rho_search": False})  # HyLRA's anchor cap: REUSE edges
    res = rewrite(smollm2_cap, pol)
    assert res.counts.get("block_topk", 0) >= 1 and res.counts.get("reuse", 0) >= 1
    ids = load_calibration(None, smollm2, 1, 128, "heldout").inputs
    with torch.no_grad():
        out = res.program.module()(*ids)
    assert out.shape == (1, 128, 49152) and bool(torch.isfinite(out).all())


# --------------------------------------------------------------------------- report and evidence

def test_report(smol_profile, tmp_path):
    path = write_report(smol_profile, plan(smol_profile, 0.5), tmp_path / "report.html")
    text = path.read_text()
    assert text.count("data:image/png;base64,") >= 5
    assert "http://" not in text and "https://" not in text
    assert "model.layers.29.self_attn" in text and "block_topk" in text
    with pytest.raises(BadInput, match="already exists"):
        write_report(smol_profile, None, path)


def test_evidence_helpers(smol_profile, smollm2, smollm2_cap):
    hb = compare_head_budgets(smollm2, smollm2_cap, smol_profile, 0.4, samples=1, seq_len=128)
    assert set(hb["results"]) == {"uniform", "hess_layer", "hess_model"}
    for r in hb["results"].values():
        assert math.isfinite(r["ce"]) and r["rel_l2"] > 0 and 0 < r["density"] < 1
    lp = compare_layer_policies(smollm2, smollm2_cap, smol_profile, 0.5, samples=1, seq_len=128)
    assert set(lp["results"]) == {"planned", f"first_{lp['full_layers']}_full"}
    assert 0 < lp["baseline_keep"] <= 1 and lp["cost"] <= 0.5 and lp["baseline_cost"] > 0


@pytest.mark.parametrize("causal", [True, False])
def test_chunk_stats_match_dense_reference(causal):
    """Chunked statistics (with the causal upper triangle skipped) equal a direct N×N computation."""
    from surgeon.profiles.solvers import mass_fraction_needed

    torch.manual_seed(1)
    n, hq, bs, w = 72, 4, 8, 5  # ragged last block
    q = torch.randn(1, hq, n, 16) * 2
    k, v = torch.randn(1, 2, n, 16) * 2, torch.randn(1, 2, n, 16)
    accs = []
    for chunk in (hq * n * bs, 1 << 30):  # one query block per chunk / everything at once
        col = _toy_collector(causal, hq=hq, block=bs, chunk_elems=chunk, local_window=w)
        col.mode = _Mode(stats=True, delta=True)
        col.call(0, q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), None, 0.0, causal, 0.25)
        accs.append(col.acc[0])
    kk = k.repeat_interleave(2, 1)
    z = (q @ kk.transpose(-1, -2) * 0.25)[0]
    i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    if causal:
        z = z.masked_fill(j > i, float("-inf"))
    p = torch.softmax(z.double(), dim=-1)  # [H, N, N]
    ent = -(torch.special.xlogy(p, p)).sum(-1).mean(-1)
    band = ((j <= i) & (j > i - w)) if causal else ((j - i).abs() < w)
    local = (p * band).sum(-1).mean(-1)
    sink0 = p[:, 1:, 0].mean(-1)
    nb = -(-n // bs)
    bm = torch.nn.functional.pad(p, (0, nb * bs - n, 0, nb * bs - n)).view(hq, nb, bs, nb, bs).sum((2, 4))
    for a in accs:
        np.testing.assert_allclose(a.ent_sum / a.rows, ent.numpy(), rtol=1e-5)
        np.testing.assert_allclose(a.local_sum / a.rows, local.numpy(), rtol=1e-5)
        np.testing.assert_allclose(a.sink0_sum / a.sink0_rows, sink0.numpy(), rtol=1e-5)
        f90 = np.concatenate(a.f90, axis=0)  # [steps, H]
        steps = [qb for qb in range(nb) if (qb + 1 if causal else nb) > (2 if causal else 2)]
        ref = [[float(mass_fraction_needed(bm[h, qb, : (qb + 1 if causal else nb)].numpy(), 0.9))
                for h in range(hq)] for qb in steps]
        np.testing.assert_allclose(f90, np.asarray(ref), atol=1e-12)
    np.testing.assert_allclose(accs[0].d2, accs[1].d2, rtol=1e-4)
    np.testing.assert_allclose(accs[0].cov_sum, accs[1].cov_sum, atol=1e-9)


def test_encoder_profile_without_sensitivity_plans(minilm, minilm_cap):
    p = profile(minilm, minilm_cap, samples=1, seq_len=64, block_size=16, sensitivity=False)
    assert p.settings["sensitivity"] is False and p.layer_sensitivity == [None] * 6
    assert math.isclose(float(np.nansum(p.matrix("hess"))), 1.0, rel_tol=1e-6)  # label-free proxy, normalised
    det = plan_details(p, 0.6)
    assert det.cost <= 0.6
    validate_policy(det.policy, minilm_cap.sites)
