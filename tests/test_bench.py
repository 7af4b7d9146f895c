"""surgeon.benchmark: a rewritten MiniLM folder against its densified copy at short lengths.

No timing thresholds: the tests check the result's fields, the density the recorder reports,
the graph edits (densify / last-token head / site timers) and the errors.
"""
from __future__ import annotations

import math
import operator

import pytest
import torch

from surgeon.benchmark import bench, bench_program, densify, last_token_only, surgeon_nodes, SiteTimer
from surgeon.errors import BadInput
from surgeon.passes.policy import uniform_policy
from surgeon.passes.rewrite import rewrite, save_rewritten
from surgeon.attention.base import decode_config


@pytest.fixture(scope="module")
def minilm_sparse(minilm, minilm_cap):
    names = [s.name for s in minilm_cap.sites]
    pol = uniform_policy(minilm.fingerprint(), names, "block_topk", {"keep": 0.3, "block_size": 16})
    return rewrite(minilm_cap, pol)


@pytest.fixture(scope="module")
def minilm_dir(tmp_path_factory, minilm_cap, minilm_sparse):
    out = tmp_path_factory.mktemp("bench") / "rw"
    save_rewritten(out, minilm_cap, minilm_sparse)
    return out


def test_bench_rewritten_folder(minilm_dir):
    msgs: list[str] = []
    out = bench(minilm_dir, seq_lens=(64, 128, 100000), repeats=2, progress=msgs.append)
    assert out["model"] == "minilm-l6"
    assert out["counts"] == {"block_topk": 6}
    dev = out["device"]
    assert dev["device"] == "cpu" and dev["torch"] == torch.__version__ and dev["cpu_cores"] >= 1 and dev["cpu"]
    assert out["settings"]["repeats"] == 2 and out["settings"]["output"] == "full output"  # an encoder has no LM head
    assert out["skipped_seq_lens"] == [100000]  # beyond MiniLM's 512 positions
    assert [r["seq_len"] for r in out["results"]] == [64, 128]
    assert any("128 tokens" in m for m in msgs)
    for r in out["results"]:
        for key in ("dense_ms", "rewritten_ms", "attn_dense_ms", "attn_rewritten_ms"):
            assert r[key] > 0 and math.isfinite(r[key])
        assert r["speedup"] == pytest.approx(r["dense_ms"] / r["rewritten_ms"])
        assert r["attn_speedup"] == pytest.approx(r["attn_dense_ms"] / r["attn_rewritten_ms"])
        assert len(r["dense_runs_ms"]) == len(r["rewritten_runs_ms"]) == len(r["speedup_per_round"]) == 2
        assert 0 < r["density"] < 1  # block_topk at keep 0.3 skips blocks
        assert len(r["sites"]) == 6
        for s in r["sites"]:
            assert s["variant"] == "block_topk" and s["requested_density"] == 0.3
            assert 0 < s["achieved_density"] < 1 and s["rel_error"] > 0
            assert s["dense_ms"] > 0 and s["rewritten_ms"] > 0
        # one forward's attention time is the sum of its sites (medians over rounds may differ slightly)
        assert r["attn_rewritten_ms"] <= r["rewritten_ms"]
    # longer sequences keep a smaller share of the allowed blocks beyond the forced ones
    assert out["results"][1]["density"] <= out["results"][0]["density"]


def test_densify_equals_dense_and_keeps_inputs(minilm_cap, minilm_sparse, minilm):
    gm = minilm_sparse.program.module()
    n = densify(gm)
    assert n == 6
    nodes = surgeon_nodes(gm.graph)
    assert all(nd.target.name() == "surgeon::dense" for nd in nodes)
    assert all(decode_config(nd.args[7])["site"] for nd in nodes)
    x = minilm.example_inputs(40, batch=2, padding=True)
    with torch.no_grad():
        a, b = gm(*x), minilm_cap.program.module()(*x)
        c = minilm_sparse.program.module()(*x)
    valid = x[1].bool()
    assert torch.allclose(a[valid], b[valid], atol=1e-4)
    assert not torch.allclose(c[valid], b[valid], atol=1e-3)  # the sparse program differs


def test_densify_drops_block_mask_edges(minilm, minilm_cap):
    from surgeon.passes.policy import policy_from_recipe

    names = [s.name for s in minilm_cap.sites]
    recipe = {names[0]: {"variant": "block_topk", "keep": 0.3, "block_size": 16},
              names[1]: {"variant": "reuse", "block_size": 16, "block_mask_from": names[0]}}
    res = rewrite(minilm_cap, policy_from_recipe(recipe, minilm.fingerprint(), names))
    gm = res.program.module()
    assert any(len(n.users) and n.target is operator.getitem for n in gm.graph.nodes)
    densify(gm)
    assert [n.target.name() for n in surgeon_nodes(gm.graph)] == ["surgeon::dense"] * 6
    assert not any(n.op == "call_function" and n.target is operator.getitem for n in gm.graph.nodes)
    x = minilm.example_inputs(64, batch=1)
    with torch.no_grad():
        assert torch.allclose(gm(*x), minilm_cap.program.module()(*x), atol=1e-4)


def test_last_token_only(smollm2, smollm2_cap, minilm_cap):
    gm = smollm2_cap.program.module()
    assert last_token_only(gm)
    x = smollm2.example_inputs(48, batch=1)
    with torch.no_grad():
        full = smollm2_cap.program.module()(*x)
        last = gm(*x)
    assert last.shape == (1, 1, full.shape[-1])
    assert torch.allclose(last[:, -1], full[:, -1], atol=1e-4)
    assert not last_token_only(minilm_cap.program.module())  # an encoder's output is not an LM head


def test_site_timer_records_each_site_only_when_active(minilm_sparse, minilm):
    gm = minilm_sparse.program.module()
    timer = SiteTimer(gm)
    x = minilm.example_inputs(32, batch=1)
    with torch.no_grad():
        gm(*x)
        assert timer.take() == {}
        timer.active = True
        gm(*x)
    t = timer.take()
    assert list(t) == timer.sites and len(t) == 6 and all(v > 0 for v in t.values())
    assert timer.take() == {}


def test_bench_a_bare_model_is_uniform_block_topk_and_labelled(minilm):
    out = bench(minilm, seq_lens=(64,), repeats=1, budget=0.3, block_size=16)
    assert out["counts"] == {"block_topk": 6} and out["rewritten"] is None
    assert "uniform block_topk keep=0.3" in out["policy_source"] and "fidelity" in out["policy_source"]
    (r,) = out["results"]
    assert r["seq_len"] == 64 and 0 < r["density"] < 1 and r["speedup"] > 0


def test_bench_refuses_bad_budget_and_missing_cuda(tmp_path, minilm_sparse, minilm):
    for b in (0.0, 1.5):
        with pytest.raises(BadInput, match="outside"):
            bench(minilm, seq_lens=(64,), budget=b)
    if not torch.cuda.is_available():
        with pytest.raises(BadInput, match="no CUDA"):
            bench(tmp_path, device="cuda")
        with pytest.raises(BadInput, match="no CUDA"):
            bench_program(minilm_sparse.program, minilm, seq_lens=(64,), device="cuda")
    with pytest.raises(BadInput, match="not supported"):
        bench_program(minilm_sparse.program, minilm, seq_lens=(64,), device="tpu")
    with pytest.raises(BadInput, match="repeats"):
        bench_program(minilm_sparse.program, minilm, seq_lens=(64,), repeats=0)
    with pytest.raises(BadInput, match="fits"):
        bench_program(minilm_sparse.program, minilm, seq_lens=(4096,))
