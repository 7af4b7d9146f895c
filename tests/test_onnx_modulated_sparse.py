"""Sparse + modulated sites in ONNX: the exported function equals the ``surgeon::`` torch op.

A site's config may carry ``modulators`` (composed onto the site's variant through AttnContext by
``compose_modulators``). Every sparse lowering must apply them exactly as the torch op does, or
the export must refuse the site; it must never silently drop them. Where the torch op itself
refuses a modulated site (``pyramid``: pooled keys have no per-token logits), the export refuses
it too.
"""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from surgeon.attention import AttnContext, get_variant
from surgeon.attention.base import encode_config
from surgeon.attention.ops import op_for
from surgeon.errors import BadInput
from surgeon.exporters import blocksparse_lowering as BL
from surgeon.exporters import onnx_lowering as L
from test_onnx_lowering import D, HKV, HQ, _rand  # shared sizes and seeded inputs

SCALE = D ** -0.5

# Modulator parameters that visibly change attention at 24–32 tokens (checked per case below).
MODULATORS = {
    "temperature": {"sigma": 0.4},
    "head_boost": {"alpha": 1.5, "heads": [1, 4], "spans": [[0, 3], [10, 16]], "span_scale": [1.0, 0.5]},
    "sink_redistribute": {"p": 0.2, "rho": 0.9, "summ": 0.05, "sinks": [0, 3], "target": [2, 20],
                          "after_target_only": False},
    "identity_blend": {"u": 0.4, "heads": [0, 5]},
    "local_boost": {"gamma": 3.0, "window": 3, "decay": 0.5, "heads": [1, 2, 5], "first_key": 2},
}
# A chain of every kind of edit (logit, prob, out, and the order between same-kind edits).
CHAIN = ["local_boost", "temperature", "sink_redistribute", "head_boost", "identity_blend"]
MOD_SETS = {name: [name] for name in MODULATORS} | {"chain": CHAIN}

# Sparse site variants (small blocks so selections matter); consumers name their producer.
SPARSE = {
    "block_topk": {"keep": 0.4, "block_size": 4, "sink_blocks": 1, "local_blocks": 1},
    "reuse": {"block_size": 4, "sink_blocks": 1, "local_blocks": 0},
    "window_sink": {"sink_tokens": 2, "window": 6},
    "delta": {"keep": 0.4, "page_size": 4, "q_block": 8, "sink_pages": 1, "recent_pages": 1, "score_queries": 4},
    "delta_sparse": {"page_size": 4, "q_block": 8, "sink_pages": 0, "recent_pages": 1},
    "token_topk": {"n_init": 2, "n_local": 4, "top_k": 4, "chunk": 8},
    "knn": {"top_k": 0, "frac": 0.3, "context_token": True},
    "dhsa": {"chunk": 8, "budget": 0.3, "sink_chunks": 1, "local_chunks": 1},
    # 4 extra tokens + a 4-row grid (4x7 at 32 keys, 4x5 at 24), 16 regions, 4 kept
    "routing": {"grid_h": 4, "n_extra": 4, "n_win": 4, "topk": 4},
    "pyramid": {"block_size": 8, "intervals": [[1, 0.0, 0.3], [2, 0.3, 0.5], [4, 0.5, 0.7], [8, 0.7, 0.9]]},
    "block_topp": {"p": 0.6, "block_size": 4, "stride": 2, "sink_blocks": 1, "local_blocks": 1},
    "head_hybrid": {"kinds": ["streaming", "sparse"], "sink_tokens": 2, "window": 6, "p": 0.6, "block_size": 4,
                    "stride": 2},
    "token_topp": {"n_init": 2, "n_local": 4, "p": 0.6, "chunk": 8},
    "vertical_slash": {"n_vertical": 3, "n_slash": 3, "last_q": 4, "block_size": 8, "sink_tokens": 1, "local": 2},
}
PRODUCER = {"reuse": "block_topk", "delta_sparse": "delta"}
# Variants whose torch op refuses a modulated site (BadInput): the export must refuse it as well.
TORCH_REFUSES = {"pyramid"}

# (b, nq, nk, seed): two lengths through one model (ragged last block at 27)
SHAPES = [(2, 32, 32, 0), (1, 27, 27, 5)]
SHAPES_SUFFIX = [(2, 20, 32, 7), (1, 9, 30, 9)]  # causal: queries are the last Nq of Nk
# routing needs key lengths its grid fits (Nk − n_extra a multiple of grid_h)
SHAPES_OF = {"routing": [(2, 32, 32, 0), (1, 24, 24, 5)]}
SHAPES_SUFFIX_OF = {"routing": [(2, 20, 32, 7), (1, 9, 24, 9)]}


def _mods(names):
    out = []
    for n in names:
        p = get_variant(n).params_from(MODULATORS[n])
        out.append({"variant": n, "params": p.to_dict()})
    return out


def _config(name, params, mods, site="layers.3.attn"):
    static = {"kv_heads": HKV, "site": site, "layer": 3}
    if mods:
        static["modulators"] = mods
    return encode_config(name, get_variant(name).params_from(params), static)


def _inputs(b, nq, nk, seed):
    q, k, v = _rand((b, HQ, nq, D), seed), _rand((b, HKV, nk, D), seed + 1), _rand((b, HKV, nk, D), seed + 2)
    kp = torch.ones(b, nk, dtype=torch.bool)
    kp[-1, :4] = False  # left padding in the last row
    return q, k, v, kp


def _torch_op(name, cfg, q, k, v, kp, causal, bm=None):
    with torch.no_grad():
        out = op_for(name)(q, k, v, kp, None, causal, SCALE, cfg, bm)
    return [t.numpy() for t in out] if isinstance(out, (tuple, list)) else [out.numpy()]


def _session(proto: onnx.ModelProto) -> ort.InferenceSession:
    onnx.checker.check_model(proto, full_check=True)
    assert all(n.domain == "" for f in proto.functions for n in f.node)
    return ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])


def _check_refused(name: str, mod_names, cfg: str, plain_cfg: str, causal: bool, shapes) -> None:
    """The torch op refuses the modulated site; the export refuses it too (one line naming site,
    variant and modulators, with a fix), while the same site without modulators exports and
    equals the op."""
    b, nq, nk, seed = shapes[0]
    q, k, v, kp = _inputs(b, nq, nk, seed)
    feeds = {"q": q, "k": k, "v": v, "key_padding": kp}
    with pytest.raises(BadInput):
        _torch_op(name, cfg, q, k, v, kp, causal)
    with pytest.raises(BadInput) as e:
        L.single_op_model(name, cfg, causal, SCALE, feeds)
    _one_line_naming(e.value, "layers.3.attn", name, *mod_names)
    assert e.value.fix
    sess = _session(L.single_op_model(name, plain_cfg, causal, SCALE, feeds))
    for b, nq, nk, seed in shapes:
        q, k, v, kp = _inputs(b, nq, nk, seed)
        got = sess.run(None, {"q": q.numpy(), "k": k.numpy(), "v": v.numpy(), "key_padding": kp.numpy()})
        want = _torch_op(name, plain_cfg, q, k, v, kp, causal)
        np.testing.assert_allclose(got[0], want[0], rtol=1e-4, atol=3e-5, err_msg=f"{name} nq={nq} nk={nk}")


def _check(name: str, mod_names, causal: bool, shapes) -> None:
    """One single-op model for ``name`` with ``mod_names`` composed; at each shape its onnxruntime
    outputs equal the torch op's (block masks bit-equal), and the modulation is not a no-op.
    Variants whose torch op refuses modulators (:data:`TORCH_REFUSES`) must be refused alike."""
    mods = _mods(mod_names)
    cfg = _config(name, SPARSE[name], mods)
    plain_cfg = _config(name, SPARSE[name], None)
    if name in TORCH_REFUSES:
        _check_refused(name, mod_names, cfg, plain_cfg, causal, shapes)
        return
    sess, moved = None, 0.0
    for b, nq, nk, seed in shapes:
        q, k, v, kp = _inputs(b, nq, nk, seed)
        feeds = {"q": q, "k": k, "v": v, "key_padding": kp}
        if name in PRODUCER:  # the producer's block mask, as it would arrive in the graph
            prod = PRODUCER[name]
            feeds["block_mask"] = torch.from_numpy(
                _torch_op(prod, _config(prod, SPARSE[prod], mods), q, k, v, kp, causal)[1])
        if sess is None:
            sess = _session(L.single_op_model(name, cfg, causal, SCALE, feeds))
        got = sess.run(None, {i.name: feeds[i.name].numpy() for i in sess.get_inputs()})
        want = _torch_op(name, cfg, q, k, v, kp, causal, feeds.get("block_mask"))
        assert len(got) == len(want) == (2 if get_variant(name).produces_block_mask else 1)
        np.testing.assert_allclose(got[0], want[0], rtol=1e-4, atol=3e-5,
                                   err_msg=f"{name}+{mod_names} causal={causal} nq={nq} nk={nk}")
        for g, w in zip(got[1:], want[1:]):
            np.testing.assert_array_equal(g, w, err_msg=f"{name}+{mod_names} block mask nq={nq} nk={nk}")
        plain = _torch_op(name, plain_cfg, q, k, v, kp, causal, feeds.get("block_mask"))
        moved = max(moved, float(np.abs(plain[0] - want[0]).max()))
        for g, w in zip(plain[1:], want[1:]):  # selections never see the modulation
            np.testing.assert_array_equal(g, w)
    assert moved > 1e-3, f"{mod_names} did not change {name}'s output (max change {moved})"


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize("mods", list(MOD_SETS), ids=list(MOD_SETS))
@pytest.mark.parametrize("name", list(SPARSE))
def test_sparse_with_modulators_matches_op(name, mods, causal):
    _check(name, MOD_SETS[mods], causal, SHAPES_OF.get(name, SHAPES))


@pytest.mark.parametrize("name", list(SPARSE))
def test_sparse_with_modulators_suffix_queries(name):
    """Causal sites whose queries are the last Nq of Nk keys (chunked prefill / decode shapes)."""
    _check(name, CHAIN, True, SHAPES_SUFFIX_OF.get(name, SHAPES_SUFFIX))


def test_matrix_covers_every_lowered_sparse_variant():
    """Every lowered variant of the sparse family is in the modulator matrix above."""
    sparse = {n for n in L.lowered_variants() if get_variant(n).family == "sparse"}
    assert sparse <= set(SPARSE), sorted(sparse - set(SPARSE))


@pytest.mark.parametrize("name", [n for n in BL.FAST_VARIANTS if n in SPARSE])
def test_gather_lowering_falls_back_to_mask_with_modulators(name):
    """The gathered block-sparse bodies cannot apply edits; with modulators they use the token-mask
    body (same function as the "mask" mode) and still equal the op."""
    cfg = _config(name, SPARSE[name], _mods(CHAIN))
    q, k, v, kp = _inputs(*SHAPES[0])
    feeds = {"q": q, "k": k, "v": v, "key_padding": kp}
    if name in PRODUCER:
        prod = PRODUCER[name]
        feeds["block_mask"] = torch.from_numpy(_torch_op(prod, _config(prod, SPARSE[prod], None), q, k, v, kp,
                                                         True)[1])
    bodies = {}
    for mode in BL.LOWERING_MODES:
        with BL.use_lowerings(mode):
            proto = L.single_op_model(name, cfg, True, SCALE, feeds)
        bodies[mode] = [n.op_type for f in proto.functions for n in f.node]
        sess = _session(proto)
        got = sess.run(None, {i.name: feeds[i.name].numpy() for i in sess.get_inputs()})
        want = _torch_op(name, cfg, q, k, v, kp, True, feeds.get("block_mask"))
        np.testing.assert_allclose(got[0], want[0], rtol=1e-4, atol=3e-5, err_msg=f"{name} mode={mode}")
    assert bodies["gather"] == bodies["mask"]


def test_modulated_site_variant_with_modulators_matches_op():
    """A modulated site variant keeps its own hooks first (definition form), then its modulators:
    identity_blend's probability blend precedes sink_redistribute, local_boost's renormalised boost
    follows the modulators' logit edits."""
    for own, own_params, mod_names in (("identity_blend", MODULATORS["identity_blend"], ["sink_redistribute"]),
                                       ("local_boost", MODULATORS["local_boost"], ["temperature", "head_boost"])):
        cfg = encode_config(own, get_variant(own).params_from(own_params),
                            {"kv_heads": HKV, "site": "s", "layer": 0, "modulators": _mods(mod_names)})
        sess = None
        for b, nq, nk, seed in SHAPES:
            q, k, v, kp = _inputs(b, nq, nk, seed)
            feeds = {"q": q, "k": k, "v": v, "key_padding": kp}
            if sess is None:
                sess = _session(L.single_op_model(own, cfg, True, SCALE, feeds))
            got = sess.run(None, {i.name: feeds[i.name].numpy() for i in sess.get_inputs()})[0]
            want = _torch_op(own, cfg, q, k, v, kp, True)[0]
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=3e-5, err_msg=f"{own}+{mod_names} n={nq}")


# --------------------------------------------------------------------------- refusals

def _one_line_naming(err: BadInput, *names: str) -> None:
    msg = str(err)
    assert "\n" not in msg
    for n in names:
        assert n in msg, (n, msg)


def test_lowering_that_ignores_modulators_is_refused(monkeypatch):
    """A lowering that never calls modulator_edits cannot export a modulated site."""

    def ignores(op, q, k, v, key_padding, attn_mask, causal, scale, config, block_mask):
        p = L._params(config)
        keep = L.window_keep(op, q, k, causal, int(p.sink_tokens), int(p.window))
        return L.attention(op, q, k, v, key_padding, attn_mask, causal, scale, keep)

    monkeypatch.setitem(L._LOWERINGS, "window_sink", ignores)
    q, k, v, kp = _inputs(*SHAPES[0])
    feeds = {"q": q, "k": k, "v": v, "key_padding": kp}
    with pytest.raises(BadInput) as e:
        L.single_op_model("window_sink", _config("window_sink", SPARSE["window_sink"], _mods(["temperature"])),
                          True, SCALE, feeds)
    _one_line_naming(e.value, "layers.3.attn", "window_sink", "temperature")
    assert e.value.fix
    # the same lowering is fine for a site without modulators
    L.single_op_model("window_sink", _config("window_sink", SPARSE["window_sink"], None), True, SCALE, feeds)


def test_modulator_not_fitting_the_site_is_refused():
    """Modulator parameters the site cannot take (a head it does not have) fail the export with
    one line naming site, variant and modulator."""
    mods = [{"variant": "head_boost", "params": {"alpha": 1.0, "heads": [HQ + 3], "spans": [[0, 4]]}}]
    q, k, v, kp = _inputs(*SHAPES[0])
    with pytest.raises(BadInput) as e:
        L.single_op_model("block_topk", _config("block_topk", SPARSE["block_topk"], mods), True, SCALE,
                          {"q": q, "k": k, "v": v, "key_padding": kp})
    _one_line_naming(e.value, "layers.3.attn", "block_topk", "head_boost", str(HQ + 3))


@pytest.mark.parametrize("name", [n for n in L.lowered_variants()
                                  if get_variant(n).family != "modulated" and n not in SPARSE])
def test_other_lowerings_compose_or_refuse(name):
    """Every other lowered site variant with a modulator either equals the op or is refused
    (BadInput naming site, variant and modulator): never a silent difference."""
    var = get_variant(name)
    p = var.example_params(64, HQ)
    if name == "routing":
        p = var.params_from({"grid_h": 8, "n_extra": 8, "n_win": 4, "topk": 4})
    mods = _mods(["temperature", "identity_blend"])
    cfg = encode_config(name, p, {"kv_heads": HKV, "site": "layers.5.attn", "layer": 5, "modulators": mods})
    q, k, v, kp = _inputs(2, 48, 48, 3)
    feeds = {"q": q, "k": k, "v": v, "key_padding": kp}
    if var.consumes_block_mask:
        feeds["block_mask"] = var.make_block_mask(q, k, v, AttnContext(causal=True, scale=SCALE, kv_heads=HKV,
                                                                       key_padding=kp), p)
    try:
        proto = L.single_op_model(name, cfg, True, SCALE, feeds)
    except BadInput as e:
        _one_line_naming(e, "layers.5.attn", name, "temperature")
        return
    sess = _session(proto)
    got = sess.run(None, {i.name: feeds[i.name].numpy() for i in sess.get_inputs()})
    want = _torch_op(name, cfg, q, k, v, kp, True, feeds.get("block_mask"))
    np.testing.assert_allclose(got[0], want[0], rtol=1e-4, atol=3e-5, err_msg=name)
