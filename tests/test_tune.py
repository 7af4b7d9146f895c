"""`surgeon tune`: calibration of the modulated variants (surgeon/profiles/tune.py).

Real models at short lengths (2 rows × 128 tokens, coarse grids). Properties: the tuned value
is never worse than the dense point it searched, "before" is the dense model's objective, the
recipe reproduces "after" and is accepted by rewrite, measured head strengths follow the
measured masses, bad input is exit 2 with nothing written.
"""
from __future__ import annotations

import math
import sys
import textwrap

import pytest
import torch
from typer.testing import CliRunner

from surgeon import api
from surgeon.cli import app
from surgeon.errors import BadInput
from surgeon.passes.policy import load_recipe, policy_from_recipe
from surgeon.profiles import tune as T
from surgeon.profiles import tune_options as TO
from surgeon.profiles import tune_probes as TP
from surgeon.profiles.evidence import evaluate_policies
from surgeon.profiles.data import load_calibration

SEQ, ROWS = 128, 2
runner = CliRunner()


@pytest.fixture(scope="module")
def objmod(tmp_path_factory):
    """A user objective module on sys.path (module name returned)."""
    d = tmp_path_factory.mktemp("objectives")
    (d / "tune_test_objectives.py").write_text(textwrap.dedent('''
        import torch
        from surgeon.profiles.objectives import calibration_ce

        def neg_ce(logits, input_ids):          # maximises CE: pushes the strength up
            return -calibration_ce(logits, input_ids)

        def gap(output, input_ids, dense):      # distance to the dense model (0 at dense)
            return float((output.float() - dense.float()).abs().mean())

        def hidden_norm(output, input_ids):
            return float(output.float().norm(dim=-1).mean())

        def as_string(output, input_ids):
            return "low"

        def as_vector(output, input_ids):
            return torch.ones(3)

        def raises(output, input_ids):
            raise ZeroDivisionError("boom")
    '''))
    sys.path.insert(0, str(d))
    yield "tune_test_objectives"
    sys.path.remove(str(d))
    sys.modules.pop("tune_test_objectives", None)


def _calib(lm):
    return load_calibration(None, lm, ROWS, SEQ, "calib", seed=0)


def _recipe_ce(lm, cap, path):
    """Mean calibration CE of the written recipe, read back the way `surgeon rewrite` reads it."""
    names = [s.name for s in cap.sites]
    pol = policy_from_recipe(load_recipe(path), lm.fingerprint(), names)
    return evaluate_policies(lm, cap, {"r": pol}, _calib(lm))["r"]


# --------------------------------------------------------------------------- pure parts

def test_search_1d_finds_interior_minimum_and_never_loses_to_the_grid():
    f = lambda x: (x - 0.37) ** 2  # noqa: E731
    x, fx = T.search_1d(f, [0.0, 0.1, 0.5, 1.0], 0.0, 1.0, refine=10)
    assert abs(x - 0.37) < 0.02 and fx <= min(f(g) for g in (0.0, 0.1, 0.5, 1.0))
    calls = []
    g = lambda x: calls.append(x) or (0.0 if x == 0 else 1.0 + x)  # noqa: E731  best at the grid's 0
    x, fx = T.search_1d(g, [0.0, 0.02, 0.05], 0.0, 1.0, refine=3)
    assert (x, fx) == (0.0, 0.0) and len(calls) == len(set(calls))  # memoised: no point evaluated twice


def test_option_parsing_and_checks():
    assert TO.parse_spans("16:20,0:8") == ((0, 8), (16, 20))
    assert TO.parse_index_list("0-2,5", "--layers") == (0, 1, 2, 5)
    assert TO.parse_grid("0.05,0,0.05") == (0.0, 0.05)
    bad = [dict(variant="bogus"),
           dict(variant="identity_blend", strength=1.5),
           dict(variant="identity_blend", strength=0.0),
           dict(variant="sink_redistribute", strength=1.0),
           dict(variant="head_boost", strength=-0.1),
           dict(variant="head_boost", scope="layer"),
           dict(variant="temperature", scope="both"),
           dict(variant="temperature", grid="0,2"),
           dict(variant="temperature", grid="0"),
           dict(variant="temperature", strength=0.5),
           dict(variant="temperature", spans="0:4"),
           dict(variant="identity_blend", grid="0,0.5"),
           dict(variant="head_boost", spans="0:8,4:12"),
           dict(variant="head_boost", spans="8:4"),
           dict(variant="head_boost", spans="0:200", seq_len=128),
           dict(variant="sink_redistribute", spans="0:4,8:12"),
           dict(variant="local_boost", windows="0,5"),
           dict(variant="temperature", layers="x"),
           dict(variant="temperature", objective="no_such_module_xyz:f"),
           dict(variant="temperature", objective="surgeon.profiles.objectives:nothing"),
           dict(variant="temperature", objective="not-a-spec")]
    for kw in bad:
        with pytest.raises(BadInput):
            TO.check_options(**kw)
    o = TO.check_options("local_boost", grid="0,0.5", windows="2,5", seq_len=128)
    assert o.grid == (0.0, 0.5) and o.windows == (2, 5)


# --------------------------------------------------------------------------- temperature

def test_temperature_global_never_worse_than_sigma_zero(smollm2, smollm2_cap, tmp_path):
    out = tmp_path / "t.yaml"
    doc = api.tune(smollm2_cap, "temperature", samples=ROWS, seq_len=SEQ, grid="0,0.02,0.05", refine=2, out=out)
    ob = doc["objective"]
    dense = evaluate_policies(smollm2, smollm2_cap, {"d": None}, _calib(smollm2))["d"]["dense_ce"]
    assert ob["before_dense"] == pytest.approx(dense, abs=1e-9)  # "before" is the dense calibration CE
    sigma0 = [e for e in doc["trace"] if e.get("sigma") == 0.0]
    assert sigma0 and sigma0[0]["objective"] == ob["before_dense"]  # σ = 0 was in the search set
    assert ob["after"] <= ob["before_dense"]
    assert all(e["objective"] >= ob["after"] for e in doc["trace"])  # the best point searched is kept
    assert {e["sigma"] for e in doc["trace"] if "sigma" in e} >= {0.0, 0.02, 0.05}
    text = out.read_text()
    assert "before (dense)" in text and (tmp_path / "t.tune.json").exists()
    assert set(load_recipe(out)) == {s.name for s in smollm2_cap.sites}
    assert _recipe_ce(smollm2, smollm2_cap, out)["ce"] == pytest.approx(ob["after"], abs=1e-6)


def test_temperature_search_moves_sigma_and_recipe_round_trips_through_rewrite(smollm2, smollm2_cap, objmod,
                                                                                tmp_path):
    out = tmp_path / "t.yaml"
    doc = api.tune(smollm2_cap, "temperature", samples=ROWS, seq_len=SEQ, layers="3-4", grid="0,0.05,0.2",
                   refine=2, objective=f"{objmod}:neg_ce", out=out)
    rec = load_recipe(out)
    assert sorted(rec) == ["model.layers.3.self_attn", "model.layers.4.self_attn"]
    sig = {v["sigma"] for v in rec.values()}
    assert len(sig) == 1 and sig.pop() >= 0.2  # maximising CE drives σ to the top of the search
    # the recipe reproduces the calibration number: CE of the recipe == −(objective after)
    assert _recipe_ce(smollm2, smollm2_cap, out)["ce"] == pytest.approx(-doc["objective"]["after"], abs=1e-6)
    rep = api.rewrite(smollm2, recipe=out, out=tmp_path / "rw", eval_seq_len=64, eval_samples=1)
    assert rep["counts"].get("temperature") == 2
    assert rep["fidelity"]["ppl"] > rep["fidelity"]["dense_ppl"]


def test_temperature_layer_scope_improves_on_global(smollm2, smollm2_cap):
    doc = api.tune(smollm2_cap, "temperature", samples=ROWS, seq_len=SEQ, layers="0-1", grid="0,0.02,0.1",
                   refine=1, scope="layer", sweeps=1, out=None)
    ob, det = doc["objective"], doc["details"]
    assert ob["after"] <= det["global"]["objective"] <= ob["before_dense"]
    assert set(det["per_site"]) == {"model.layers.0.self_attn", "model.layers.1.self_attn"}
    assert any(e.get("scope") == "layer" for e in doc["trace"])
    for name, spec in doc["recipe"].items():
        assert spec["variant"] == "dense" if det["per_site"][name] == 0 else spec["sigma"] == det["per_site"][name]


# --------------------------------------------------------------------------- head_boost

def test_probe_span_mass_of_all_keys_is_one(smollm2, smollm2_cap):
    m = TP.measure_span_mass(smollm2_cap, _calib(smollm2), [0, 7], [(0, SEQ)])
    for v in m.values():
        assert torch.allclose(v, torch.ones_like(v), atol=1e-5)


def test_head_boost_alpha_follows_measured_span_mass(smollm2, smollm2_cap, tmp_path):
    doc = api.tune(smollm2_cap, "head_boost", samples=ROWS, seq_len=SEQ, layers="2-3", spans="0:8", out=None)
    alpha = 0.7
    for name, spec in doc["recipe"].items():
        m = torch.tensor(doc["details"]["span_mass"][name], dtype=torch.float64)
        assert ((m > 0) & (m < 1)).all()
        want = torch.clamp(alpha * m / m.mean(), 0, 2 * alpha)
        assert torch.allclose(torch.tensor(spec["head_alpha"], dtype=torch.float64), want, atol=6e-5)
        assert spec["spans"] == [[0, 8]] and spec["alpha"] == alpha
    # heads restricted: one strength per listed head
    doc2 = api.tune(smollm2_cap, "head_boost", samples=ROWS, seq_len=SEQ, layers="2", spans="0:8", heads="0,4",
                    strength=0.3, out=tmp_path / "h.yaml")
    spec = doc2["recipe"]["model.layers.2.self_attn"]
    assert spec["heads"] == [0, 4] and len(spec["head_alpha"]) == 2
    assert _recipe_ce(smollm2, smollm2_cap, tmp_path / "h.yaml")["ce"] == pytest.approx(doc2["objective"]["after"],
                                                                                       abs=1e-6)


# --------------------------------------------------------------------------- sink_redistribute

def test_sink_redistribute_finds_first_token_sink_and_qualifying_heads(smollm2, smollm2_cap, tmp_path):
    out = tmp_path / "s.yaml"
    doc = api.tune(smollm2_cap, "sink_redistribute", samples=ROWS, seq_len=SEQ, layers="2-6", out=out)
    det = doc["details"]
    assert det["residual_source"].startswith("hidden_states") and det["sink_dims"]
    # independently: in at least 3 of the 5 layer inputs the first token's |value| in each sink
    # dimension is > 100× the median |activation|
    with torch.no_grad():
        hs = smollm2.module.hf(input_ids=_calib(smollm2).inputs[0], output_hidden_states=True,
                               use_cache=False).hidden_states
    for d in det["sink_dims"]:
        assert sum(float(hs[l].abs()[:, 0, d].mean()) > 100 * float(hs[l].abs().median()) for l in range(2, 7)) >= 3
    assert all(0 in s for s in det["sinks"].values())
    assert doc["recipe"]
    for name, spec in doc["recipe"].items():
        assert spec["p"] == 0.6 and spec["target"] == [0, 16] and spec["sinks"] == det["sinks"][name]
        frac = det["head_fraction"][name]
        assert spec["heads"] == [h for h, f in enumerate(frac) if f >= 0.5]
    assert _recipe_ce(smollm2, smollm2_cap, out)["ce"] == pytest.approx(doc["objective"]["after"], abs=1e-6)


# --------------------------------------------------------------------------- identity_blend

def test_identity_blend_headhunter_picks_best_heads_of_the_objective(smollm2_cap, objmod):
    doc = api.tune(smollm2_cap, "identity_blend", samples=ROWS, seq_len=SEQ, layers="5", k=2,
                   objective=f"{objmod}:gap", out=None)
    det = doc["details"]
    assert doc["objective"]["before_dense"] == 0.0  # the dense model is at distance 0 from itself
    rnd = det["rounds"][0]
    assert len(rnd) == 9 and [r["objective"] for r in rnd] == sorted(r["objective"] for r in rnd)
    assert all(r["objective"] > 0 for r in rnd)
    assert [(s["site"], s["head"]) for s in det["selected"]] == [(r["site"], r["head"]) for r in rnd[:2]]
    spec = doc["recipe"]["model.layers.5.self_attn"]
    assert spec == {"variant": "identity_blend", "u": 0.5, "heads": sorted(r["head"] for r in rnd[:2])}
    assert doc["objective"]["after"] > 0


def test_identity_blend_default_objective_is_calibration_ce(smollm2, smollm2_cap, tmp_path):
    out = tmp_path / "i.yaml"
    doc = api.tune(smollm2_cap, "identity_blend", samples=ROWS, seq_len=SEQ, layers="5", k=1, heads="0-2",
                   strength=0.3, out=out)
    rnd = doc["details"]["rounds"][0]
    assert [r["head"] for r in rnd] != [] and {r["head"] for r in rnd} == {0, 1, 2}
    assert _recipe_ce(smollm2, smollm2_cap, out)["ce"] == pytest.approx(doc["objective"]["after"], abs=1e-6)
    assert doc["objective"]["after"] == pytest.approx(rnd[0]["objective"], abs=1e-12)


# --------------------------------------------------------------------------- local_boost

def test_local_boost_never_worse_than_gamma_zero(smollm2_cap):
    doc = api.tune(smollm2_cap, "local_boost", samples=ROWS, seq_len=SEQ, layers="10", grid="0,0.5",
                   windows="2,5", refine=1, out=None)
    ob, det = doc["objective"], doc["details"]
    assert ob["after"] <= ob["before_dense"]
    assert [w["window"] for w in det["windows"]] == [2, 5]
    assert {(e.get("window"), e.get("gamma")) for e in doc["trace"]} >= {(2, 0.5), (5, 0.5)}
    spec = doc["recipe"]["model.layers.10.self_attn"]
    assert spec["variant"] == "dense" or (spec["gamma"] > 0 and spec["window"] == det["global"]["window"])


# --------------------------------------------------------------------------- CLI

def _cli(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def test_cli_tune_then_rewrite(objmod, tmp_path):
    out = tmp_path / "r.yaml"
    r = _cli("tune", "minilm-l6", "--variant", "identity_blend", "--layers", "2", "--heads", "0-2", "--k", "1",
             "--objective", f"{objmod}:hidden_norm", "--samples", "1", "--seq-len", "64", "--out", out)
    assert r.exit_code == 0, r.output
    assert "identity_blend" in r.output and "dense" in r.output and out.exists()
    assert list(load_recipe(out)) == ["encoder.layer.2.attention.self"]
    r2 = _cli("rewrite", "minilm-l6", "--recipe", out, "--out", tmp_path / "rw", "--eval-seq-len", "64",
              "--eval-samples", "1", "--json")
    assert r2.exit_code == 0, r2.output
    assert '"identity_blend": 1' in r2.output
    r3 = _cli("tune", "minilm-l6", "--variant", "identity_blend", "--objective", f"{objmod}:hidden_norm",
              "--out", out)
    assert r3.exit_code == 2 and "already exists" in r3.output  # no overwrite without --force


def test_cli_same_inputs_give_identical_outputs(objmod, tmp_path):
    out = tmp_path / "m.yaml"
    args = ["tune", "minilm-l6", "--variant", "temperature", "--objective", f"{objmod}:hidden_norm",
            "--samples", "2", "--seq-len", "64", "--grid", "0,0.05", "--refine", "1", "--out", out]
    assert _cli(*args).exit_code == 0
    first = (out.read_bytes(), (tmp_path / "m.tune.json").read_bytes())
    assert _cli(*args, "--force").exit_code == 0
    assert (out.read_bytes(), (tmp_path / "m.tune.json").read_bytes()) == first


@pytest.mark.parametrize("case", ["variant", "strength", "spans", "layer", "head", "import", "string", "vector",
                                  "raises", "scope", "encoder_default"])
def test_cli_bad_input_exit_2_nothing_written(case, objmod, tmp_path):
    out = tmp_path / "r.yaml"
    base = ["tune", "minilm-l6", "--samples", "1", "--seq-len", "32", "--out", out]
    obj = ["--objective", f"{objmod}:hidden_norm"]
    args, needle = {
        "variant": (["--variant", "softmax_plus"] + obj, "unknown variant"),
        "strength": (["--variant", "identity_blend", "--strength", "1.5"] + obj, "out of range"),
        "spans": (["--variant", "head_boost", "--spans", "0:100"] + obj, "outside the 32-token"),
        "layer": (["--variant", "temperature", "--layers", "9"] + obj, "do not exist"),
        "head": (["--variant", "identity_blend", "--heads", "12"] + obj, "has 12 query heads"),
        "import": (["--variant", "temperature", "--objective", "no_such_module_xyz:f"], "cannot import"),
        "string": (["--variant", "temperature", "--objective", f"{objmod}:as_string"], "not a number"),
        "vector": (["--variant", "temperature", "--objective", f"{objmod}:as_vector"], "not a number"),
        "raises": (["--variant", "temperature", "--objective", f"{objmod}:raises"], "raised ZeroDivisionError"),
        "scope": (["--variant", "head_boost", "--scope", "layer"] + obj, "--scope layer applies"),
        "encoder_default": (["--variant", "temperature"], "needs a causal language model"),
    }[case]
    r = _cli(*base, *args)
    assert r.exit_code == 2, r.output
    errs = [ln for ln in r.output.splitlines() if ln.startswith("error:")]
    assert len(errs) == 1 and needle in errs[0], r.output
    assert not list(tmp_path.iterdir())


def test_objectives_module_rejects_non_lm_output():
    from surgeon.profiles.objectives import calibration_ce, guided_ce

    ids = torch.tensor([[1, 2, 3, 4]])
    logits = torch.zeros(1, 4, 10)
    assert calibration_ce(logits, ids) == pytest.approx(math.log(10))
    assert guided_ce(logits, ids, dense=logits) == pytest.approx(math.log(10))
    with pytest.raises(BadInput):
        calibration_ce(torch.zeros(1, 4, 3), ids)  # ids beyond the columns: not a vocabulary
    with pytest.raises(BadInput):
        calibration_ce(torch.zeros(4, 10), ids)
