"""The profiler's speedups keep its bytes: the layer-sensitivity replay re-executes only what a
site changes, and every profile stays byte-identical to what the original code wrote."""
from __future__ import annotations

import hashlib
import json

import pytest
import torch

from surgeon.attention.registry import get_variant
from surgeon.profiles import replay
from surgeon.profiles.collect import Collector, ProfileSettings, _Mode, instrument, profile
from surgeon.profiles.replay import Replay as _Replay
from surgeon.profiles.data import load_calibration

# sha256 of the minilm-l6 profile (1 sample × 64 tokens, block 16, seed 0; model.source blanked,
# keys sorted) written by the code before the speedups (commit 00e21c6), on the machine below.
GOLDEN_MINILM = "d8c552bf97a115d59927ea308e8cae7257d6630435edaca894c48100c7513707"
GOLDEN_ENV = ("2.13.0+cpu", "AVX512", 1)


def _without_replay(monkeypatch):
    monkeypatch.setattr(replay.Replay, "of", classmethod(lambda cls, gm: None))


def _bt_params():
    bt = get_variant("block_topk")
    return bt, bt.params_from({"keep": 0.15, "block_size": 16, "sink_blocks": 1, "local_blocks": 1})


@pytest.mark.parametrize("which", ["minilm", "mha"])
def test_replay_equals_full_forwards(which, request):
    lm, cap = request.getfixturevalue(which), request.getfixturevalue(which + "_cap")
    n = 64 if lm.is_text else None
    if lm.is_text:
        inputs = load_calibration(None, lm, 1, n, "calib").row(0)
    else:
        inputs = lm.example_inputs(64, batch=1)
    col = Collector(cap, ProfileSettings(samples=1, seq_len=64, block_size=16))
    gm = instrument(cap, col)
    rep = _Replay.of(gm)
    assert rep is not None and _Replay.of(gm) is rep
    bt, params = _bt_params()
    with torch.no_grad():
        col.mode = _Mode()
        ref_full = gm(*inputs)
        ref, kept = rep.dense(inputs)
        assert torch.equal(ref, ref_full)
        changed = 0
        for i in range(len(cap.sites)):
            assert rep.steps[i][0] is gm.meta["surgeon_site_nodes"][i]
            col.mode = _Mode(policy={i: (bt, params, None)})
            col.produced = {}
            full = gm(*inputs)
            col.produced = {}
            part = rep.suffix(i, kept)
            assert torch.equal(part, full), f"site {i}"
            changed += int(not torch.equal(part, ref))
        assert changed > 0  # the block_topk site really changes the output
    # later sites re-execute fewer nodes (the point of the replay)
    sizes = [len(s) for s in rep.steps]
    assert sizes == sorted(sizes, reverse=True) and sizes[0] < len(gm.graph.nodes)
    assert len(sizes) == 1 or sizes[-1] < sizes[0]


def test_profile_bytes_do_not_depend_on_the_replay(minilm, minilm_cap, monkeypatch):
    kw = dict(samples=2, seq_len=64, block_size=16, sens_samples=2)
    fast = profile(minilm, minilm_cap, **kw).to_json()
    again = profile(minilm, minilm_cap, **kw).to_json()
    _without_replay(monkeypatch)
    slow = profile(minilm, minilm_cap, **kw).to_json()
    assert fast == again == slow


def test_causal_lm_profile_bytes_do_not_depend_on_the_replay(smollm2, smollm2_cap, monkeypatch):
    # causal, GQA, CE sensitivity and a gradient window shorter than the row (separate HeSS pass)
    kw = dict(samples=1, seq_len=64, block_size=16, grad_seq_len=32, sens_seq_len=48)
    assert _Replay.of(instrument(smollm2_cap, Collector(smollm2_cap, ProfileSettings(**kw)))) is not None
    fast = profile(smollm2, smollm2_cap, **kw)
    assert fast.settings["grad_window"] == "first 32 tokens of each sample"
    assert all(s.sensitivity is not None for s in fast.sites)
    _without_replay(monkeypatch)
    slow = profile(smollm2, smollm2_cap, **kw)
    assert fast.to_json() == slow.to_json()


def test_progress_counts_sites_and_forwards(minilm, minilm_cap):
    seen: list[tuple[str, int, int]] = []
    profile(minilm, minilm_cap, samples=2, seq_len=64, block_size=16, sens_samples=1,
            progress=lambda s, d, t: seen.append((s, d, t)))
    L = len(minilm_cap.sites)
    stats = [x for x in seen if x[0] == "statistics"]
    sens = [x for x in seen if x[0] == "sensitivity"]
    assert [d for _, d, _ in stats] == list(range(1, 2 * L + 1)) and {t for *_, t in stats} == {2 * L}
    assert [d for _, d, _ in sens] == list(range(1, L + 2)) and {t for *_, t in sens} == {L + 1}


def test_minilm_profile_matches_the_original_bytes(minilm, minilm_cap):
    env = (torch.__version__, torch.backends.cpu.get_cpu_capability(), torch.get_num_threads())
    if env != GOLDEN_ENV:
        pytest.skip(f"the golden hash was recorded with torch/CPU/threads {GOLDEN_ENV}, this is {env}")
    d = json.loads(profile(minilm, minilm_cap, samples=1, seq_len=64, block_size=16).to_json())
    d["model"]["source"] = ""
    assert hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest() == GOLDEN_MINILM
