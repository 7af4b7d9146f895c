"""The tolerance contract (issue 14): `surgeon rewrite --tolerance T` plans the fastest policy whose
validation loss stays within T, gates on held-out text at the serving lengths, and exits 1 above T."""
from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from surgeon.cli import app

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def minilm_profile(tmp_path_factory):
    from surgeon import api

    d = tmp_path_factory.mktemp("tol")
    # no --budget: the report's implicit budget must never fail the profile, even where 0.15 is infeasible
    prof, pol = api.profile("minilm-l6", samples=1, seq_len=64, block_size=16, out=d / "profile.json",
                            report=d / "report.html")
    return d / "profile.json", pol


def test_profile_without_budget_never_fails_on_the_implicit_one(minilm_profile):
    _, pol = minilm_profile
    # 0.15 is below the cheapest plan at 64 tokens with 16-token blocks (≈0.44): the report shows the cheapest
    assert pol.budget is not None and pol.budget > 0.15


@pytest.mark.parametrize("t", ["0", "1", "-0.1", "1.5", "nan"])
def test_tolerance_outside_unit_interval_exit_2_before_loading(minilm_profile, tmp_path, t):
    prof, _ = minilm_profile
    r = run("rewrite", "minilm-l6", "--profile", prof, "--tolerance", t, "--out", tmp_path / "rw")
    assert r.exit_code == 2, r.output
    assert "outside (0, 1)" in r.output and r.output.count("error:") == 1
    assert not (tmp_path / "rw").exists()


def test_tolerance_with_budget_is_exit_2(minilm_profile, tmp_path):
    prof, _ = minilm_profile
    r = run("rewrite", "minilm-l6", "--profile", prof, "--tolerance", "0.01", "--budget", "0.5", "--out", tmp_path / "rw")
    assert r.exit_code == 2 and "cannot be combined" in r.output
    assert not (tmp_path / "rw").exists()


def test_tolerance_profile_of_another_model_exit_2(minilm_profile, tmp_path):
    prof, _ = minilm_profile
    r = run("rewrite", "vit-tiny", "--profile", prof, "--out", tmp_path / "rw")
    assert r.exit_code == 2 and "fingerprint" in r.output
    assert not (tmp_path / "rw").exists()


def test_unknown_family_exit_2(minilm_profile, tmp_path):
    prof, _ = minilm_profile
    r = run("rewrite", "minilm-l6", "--profile", prof, "--families", "magic", "--out", tmp_path / "rw")
    assert r.exit_code == 2 and "magic" in r.output and "block_topk" in r.output


def test_validation_rows_disjoint_from_profile_rows(minilm, minilm_profile):
    from surgeon.profiles.data import calibration_tokens
    from surgeon.profiles.profile_doc import Profile
    from surgeon.profiles.tolerance import validation_data

    prof = Profile.load(minilm_profile[0])
    ids, _, _ = calibration_tokens(None, minilm, "calib")
    s = prof.data["seq_len"]
    profiled = {tuple(ids[i * s:(i + 1) * s]) for i in prof.data["rows"]}
    for n in (64, 100):
        v = validation_data(minilm, prof, n, 3)
        assert v.inputs[0].shape == (3, n) and v.split == "validation"
        for j in v.row_indices:  # no token position shared with a profiled row
            assert all((j + 1) * n <= i * s or j * n >= (i + 1) * s for i in prof.data["rows"])
        assert not any(tuple(r.tolist()) in profiled for r in v.inputs[0])


class _FakeValidator:
    """Passes exactly the knobs gentler than index ``limit`` of the grid."""

    def __init__(self, grid, limit):
        self.grid, self.limit, self.calls = grid, limit, []

    def check(self, family, knob, policy):
        from surgeon.profiles.tolerance import Check

        self.calls.append(knob)
        i = self.grid.index(knob)
        return Check(family, knob, {64: 0.0}, i < self.limit, 1, 0.0)


@pytest.mark.parametrize("limit", [0, 1, 5, 11])
def test_bisection_finds_the_most_aggressive_passing_knob(limit):
    from surgeon.profiles.tolerance import KEEP_GRID, search_family

    v = _FakeValidator(list(KEEP_GRID), limit)
    idx, checks = search_family("block_topk", v, lambda x: None)
    assert idx == (limit - 1 if limit > 0 else None)
    assert len(checks) <= 1 + 4  # the gentlest probe plus ⌈log2(11)⌉ bisection steps
    assert len(set(v.calls)) == len(v.calls)  # no knob checked twice


def test_surgeon_family_pads_heads_to_the_largest_keep(minilm, minilm_cap, minilm_profile):
    from surgeon.profiles.profile_doc import Profile
    from surgeon.profiles.tolerance import surgeon_policy

    prof = Profile.load(minilm_profile[0])
    grid = list(prof.settings["keep_grid"])
    eps = 0.05
    pol = surgeon_policy(prof, minilm_cap, eps, dense_above=1.0, fingerprint=minilm.fingerprint())
    for sp in prof.sites:
        need = [next((g for g, c in zip(grid, cov) if 1 - c <= eps), 1.0) for cov in sp.coverage]
        ch = pol.sites[sp.name]
        assert ch.variant == "block_topk" and ch.params["keep"] == max(need)
    dense = surgeon_policy(prof, minilm_cap, eps, dense_above=min(grid) / 2, fingerprint=minilm.fingerprint())
    assert all(c.variant == "dense" for c in dense.sites.values())


def test_dense_below_runs_dense_under_the_crossover_and_sparse_above(minilm, minilm_cap):
    from surgeon.passes.policy import uniform_policy
    from surgeon.passes.rewrite import rewrite

    names = [s.name for s in minilm_cap.sites]
    sparse = uniform_policy(minilm.fingerprint(), names, "block_topk", {"keep": 0.2, "block_size": 16})
    below = sparse.model_copy(update={"sites": {n: c.model_copy(update={"dense_below": 100})
                                                for n, c in sparse.sites.items()}})
    ids = torch.randint(5, 1000, (1, 96))
    ids2 = torch.randint(5, 1000, (1, 128))
    m_dense, m_sparse, m_below = (minilm_cap.program.module(), rewrite(minilm_cap, sparse).program.module(),
                                  rewrite(minilm_cap, below).program.module())
    with torch.no_grad():
        for x, short in ((ids, True), (ids2, False)):
            mask = torch.ones_like(x)
            d, s, b = m_dense(x, mask), m_sparse(x, mask), m_below(x, mask)
            assert not torch.allclose(s, d, atol=1e-4)  # the sparse policy really is sparse here
            if short:  # 96 keys < 100: dense, identical to the original up to SDPA vs SDPA
                torch.testing.assert_close(b, d, atol=1e-5, rtol=1e-5)
            else:
                torch.testing.assert_close(b, s, atol=0, rtol=0)


def test_dense_below_on_a_dense_site_is_exit_2(minilm, minilm_cap):
    from surgeon.errors import BadInput
    from surgeon.passes.policy import identity_policy
    from surgeon.passes.rewrite import rewrite

    pol = identity_policy(minilm.fingerprint(), [s.name for s in minilm_cap.sites])
    n0 = minilm_cap.sites[0].name
    pol.sites[n0] = pol.sites[n0].model_copy(update={"dense_below": 64})
    with pytest.raises(BadInput, match="dense_below applies to sparse variants"):
        rewrite(minilm_cap, pol)


def test_tolerance_rewrite_end_to_end(minilm, minilm_profile, tmp_path):
    from surgeon import api
    from surgeon.passes.rewrite import load_rewritten

    rep = api.rewrite(minilm, profile=minilm_profile[0], out=tmp_path / "rw", tolerance=0.01, lengths=(64,),
                      plan_options={"families": ("block_topk",), "bench_repeats": 1})
    assert rep["mode"] == "tolerance" and rep["tolerance"] == 0.01
    plan = rep["plan"]
    assert plan["lengths"] == [64] and plan["speed_length"] == 64
    rw = load_rewritten(tmp_path / "rw")
    rec = rw.policy.planner
    assert rec["tolerance"] == 0.01 and rec["checks"], rec
    for c in rec["checks"]:  # every closed-loop check: pass ⇔ validation loss within margin·T
        if c["losses"]:
            assert c["passed"] == all(v <= 0.5 * 0.01 for v in c["losses"].values())
    if plan["chosen"] is None:  # nothing faster than dense within T: all dense, and the note says so
        assert set(rep["counts"]) == {"dense"} and "dense" in plan["note"]
    else:
        cand = next(c for c in plan["candidates"] if c["family"] == plan["chosen"])
        assert cand["speedup"] > 1.0 and all(v <= 0.005 for v in cand["validation"].values())
    # the gate ran on held-out text at every serving length and ok follows it
    assert [g["seq_len"] for g in rep["gate"]] == [64]
    assert rep["ok"] == (rep["worst_loss"] <= 0.01 or set(rep["counts"]) == {"dense"})
    assert json.loads((tmp_path / "rw" / "report.json").read_text())["ok"] == rep["ok"]


def test_gate_failure_exits_1_with_the_numbers(minilm, minilm_profile, tmp_path, monkeypatch):
    """A plan that passes validation but not held-out text: the CLI writes DIR, says ok false, exits 1."""
    import surgeon.profiles.tolerance as tol
    from surgeon.passes.policy import uniform_policy

    def aggressive(lm, cap, profile, settings, progress=None):
        names = [s.name for s in cap.sites]
        pol = uniform_policy(lm.fingerprint(), names, "block_topk", {"keep": 0.1, "block_size": 16})
        return tol.PlanOutcome(policy=pol, chosen="block_topk", tolerance=settings.tolerance, lengths=[64],
                               speed_length=64, note="forced for the test")

    monkeypatch.setattr(tol, "plan_within_tolerance", aggressive)
    r = run("rewrite", "minilm-l6", "--profile", minilm_profile[0], "--tolerance", "0.000001", "--out",
            tmp_path / "rw", "--eval-samples", "1")
    assert r.exit_code == 1, r.output
    assert "exceeds the tolerance 0.00%" in r.output and "report.json" in r.output
    rep = json.loads((tmp_path / "rw" / "report.json").read_text())
    assert rep["ok"] is False and rep["worst_loss"] > 1e-6


def test_build_recipe_defaults_to_the_tolerance_contract():
    from surgeon.build_stages import BuildRecipe

    rc = BuildRecipe()
    assert rc.tolerance == 0.01 and rc.budget is None


@pytest.mark.parametrize("body,needle", [("tolerance: 2\n", "outside (0, 1)"),
                                         ("export_format: zip\n", "export_format"),
                                         ("families: [magic]\n", "magic")])
def test_build_bad_recipe_exit_2_before_any_work(tmp_path, body, needle):
    (tmp_path / "b.yaml").write_text("model: minilm-l6\n" + body)
    r = run("build", "--recipe", tmp_path / "b.yaml", "--out", tmp_path / "out")
    assert r.exit_code == 2 and needle in r.output, r.output
    assert not (tmp_path / "out").exists()


def test_frontier_plot_and_report_from_a_planner_record():
    from surgeon.profiles.frontier import frontier_png, render_rewrite_report

    rec = {"tolerance": 0.01, "margin": 0.5, "lengths": [64, 512], "frontier_length": 64, "chosen": "block_topk",
           "note": "block_topk is the fastest",
           "candidates": [{"family": "block_topk", "knob": 0.5, "validation": {"64": 0.001}, "speedup": 1.2,
                           "attn_speedup": 1.5}],
           "checks": [{"family": "block_topk", "knob": k, "losses": {"64": l, "512": l}, "passed": l <= 0.005,
                       "attn_speedup": a} for k, l, a in ((0.9, 0.0, 0.8), (0.5, 0.004, 1.5), (0.3, 0.02, 2.1))]}
    png = frontier_png(rec)
    assert png is not None and png[:8] == b"\x89PNG\r\n\x1a\n"
    assert frontier_png({**rec, "checks": [{**c, "attn_speedup": None} for c in rec["checks"]]}) is None
    html = render_rewrite_report({"model": "m", "gate": [{"seq_len": 64, "loss": 0.002}], "tolerance": 0.01,
                                  "ok": True}, rec)
    assert "data:image/png;base64," in html and "block_topk" in html and "+0.200%" in html


@pytest.mark.parametrize("family", ["surgeon", "hylra", "block_topk", "token_topk", "window_sink", "block_topp",
                                    "token_topp", "head_hybrid", "vertical_slash"])
def test_every_family_builds_a_policy_that_rewrites(family, minilm, minilm_cap, minilm_profile):
    from surgeon.passes.rewrite import rewrite
    from surgeon.profiles.profile_doc import Profile
    from surgeon.profiles.tolerance import ToleranceSettings, _grid, family_policy

    prof = Profile.load(minilm_profile[0])
    grid = _grid(family)
    assert list(grid) == sorted(grid, reverse=family not in ("surgeon", "head_hybrid")), "gentle → aggressive"
    knob = grid[1] if family == "hylra" else grid[len(grid) // 2]  # hylra: above the 64-token plan's floor
    pol = family_policy(family, knob, prof, minilm_cap, minilm, 64,
                        ToleranceSettings(families=(family,)))
    assert set(pol.sites) == {s.name for s in minilm_cap.sites}
    rewrite(minilm_cap, pol)


def test_duo_family_streams_the_groups_with_most_sink_and_local_mass(minilm, minilm_cap, minilm_profile):
    from surgeon.profiles.profile_doc import Profile
    from surgeon.profiles.tolerance import duo_policy

    prof = Profile.load(minilm_profile[0])
    pol = duo_policy(prof, minilm_cap, 0.25, minilm.fingerprint())
    by = {s.name: s for s in prof.sites}
    scored = []
    for site in minilm_cap.sites:
        per = site.heads // site.kv_heads
        for j in range(site.kv_heads):
            sp = by[site.name]
            scored.append((sum(sp.local_mass[h] + sp.primary_sink_mass[h] for h in range(j * per, (j + 1) * per)) / per,
                           site.name, j))
    chosen = {(n, j) for n, ch in pol.sites.items() if ch.variant == "head_hybrid"
              for j, k in enumerate(ch.params["kinds"]) if k == "streaming"}
    assert len(chosen) == round(0.25 * len(scored))
    worst_chosen = min(s for s, n, j in scored if (n, j) in chosen)
    best_other = max(s for s, n, j in scored if (n, j) not in chosen)
    assert worst_chosen >= best_other
