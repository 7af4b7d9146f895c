"""surgeon.apply (a policy installed into a live transformers model) and `surgeon generate`."""
from __future__ import annotations

import json

import pytest
import torch

SPARSE_RECIPE = {
    "model.layers.[1-3].self_attn": {"variant": "block_topk", "keep": 0.3, "block_size": 16},
    "model.layers.5.self_attn": {"variant": "reuse", "block_mask_from": "model.layers.3.self_attn", "block_size": 16},
}


@pytest.fixture(scope="module")
def sparse_dir(smollm2, smollm2_cap, tmp_path_factory):
    """A rewrite of SmolLM2 with block_topk anchors on layers 1-3 and a reuse consumer on layer 5."""
    from surgeon.passes.policy import policy_from_recipe
    from surgeon.passes.rewrite import rewrite, save_rewritten

    pol = policy_from_recipe(SPARSE_RECIPE, smollm2.fingerprint(), [s.name for s in smollm2_cap.sites])
    out = tmp_path_factory.mktemp("gen") / "sparse"
    save_rewritten(out, smollm2_cap, rewrite(smollm2_cap, pol))
    return out


@pytest.fixture(scope="module")
def identity_dir(smollm2, smollm2_cap, tmp_path_factory):
    from surgeon.passes.policy import identity_policy
    from surgeon.passes.rewrite import rewrite, save_rewritten

    pol = identity_policy(smollm2.fingerprint(), [s.name for s in smollm2_cap.sites])
    out = tmp_path_factory.mktemp("gen") / "identity"
    save_rewritten(out, smollm2_cap, rewrite(smollm2_cap, pol))
    return out


def _padded_batch(lm, n: int):
    ids, am = lm.example_inputs(n, batch=2, padding=True, seed=3)
    return ids, am


def test_apply_prefill_logits_equal_rewritten_program(smollm2, sparse_dir):
    """Prefill through the installed policy runs the same ops (same configs, key padding and
    anchor → consumer block masks) as the rewritten program: equal logits, with padding."""
    import surgeon
    from surgeon.generation.hf import remove
    from surgeon.passes.rewrite import load_rewritten

    hf = smollm2.module.hf
    prog = load_rewritten(sparse_dir).module()
    ids, am = _padded_batch(smollm2, 160)  # 10 blocks of 16: block_topk keeps ~30% of them
    try:
        with torch.no_grad():
            ref = prog(ids, am)
            dense = smollm2.module(ids, am)
            assert surgeon.apply(hf, sparse_dir) is hf
            got = hf(input_ids=ids, attention_mask=am, use_cache=False).logits
    finally:
        remove(hf)
    rows = am.bool()
    # the same ops run on the same inputs: equal up to float reassociation in the surrounding layers
    torch.testing.assert_close(got[rows], ref[rows], rtol=0, atol=1e-4)
    # the policy is really sparse at this length (else the comparison above would prove nothing)
    assert float((dense[rows] - ref[rows]).abs().max()) > 1e-2
    with torch.no_grad():
        back = smollm2.module(ids, am)
    torch.testing.assert_close(back, dense, rtol=0, atol=0)  # remove() restored the model


def test_apply_accepts_policy_object_and_json(smollm2, sparse_dir, tmp_path):
    from surgeon.generation.hf import apply, installed_policy, remove
    from surgeon.passes.policy import Policy

    pol = Policy.load(sparse_dir / "policy.json")
    hf = smollm2.module.hf
    ids, am = smollm2.example_inputs(96, batch=1)
    outs = []
    try:
        for src in (sparse_dir, pol, sparse_dir / "policy.json"):
            apply(hf, src, verify=False)
            assert installed_policy(hf).sites == pol.sites
            with torch.no_grad():
                outs.append(hf(input_ids=ids, attention_mask=am, use_cache=False).logits)
    finally:
        remove(hf)
    assert installed_policy(hf) is None
    torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(outs[2], outs[0], rtol=0, atol=1e-5)


def test_apply_rejects_policy_of_other_model(smollm2, minilm, sparse_dir):
    from surgeon.errors import ArtifactMismatch, BadInput
    from surgeon.generation.hf import apply

    with pytest.raises(ArtifactMismatch):
        apply(minilm.module.hf, sparse_dir)
    with pytest.raises(BadInput):
        apply(smollm2.module.hf, sparse_dir / "nope")
    with pytest.raises(BadInput):
        apply(object(), sparse_dir)


# --------------------------------------------------------------------------- generation

_BASE = ("The history of the city begins in the early medieval period, when a small settlement grew around a "
         "river crossing. ")
PROMPTS = ["Once upon a time", _BASE * 3, _BASE * 14]  # 4, 67 and 309 tokens with SmolLM2's tokenizer


def _hf_greedy(lm, prompt: str, n: int) -> tuple[list[int], list[int]]:
    hf = lm.module.hf
    ids = lm.tokenizer(prompt)["input_ids"]
    with torch.no_grad():
        g = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                        do_sample=False, max_new_tokens=n)
    return ids, g[0, len(ids):].tolist()


def test_identity_generate_equals_transformers_generate(smollm2, identity_dir):
    """Issue 15 item 5 (PyTorch): the identity rewrite generates exactly transformers' greedy tokens."""
    import surgeon

    lens = []
    for prompt in PROMPTS:
        ids, ref = _hf_greedy(smollm2, prompt, 64)
        res = surgeon.generate(smollm2, prompt, policy=identity_dir, max_new_tokens=64)
        lens.append(res.prompt_tokens)
        assert res.prompt_tokens == len(ids)
        assert res.token_ids == ref, prompt[:20]
        assert res.new_tokens == len(ref) and (res.stop == "eos" or len(ref) == 64)
        assert res.text == smollm2.tokenizer.decode(ref, skip_special_tokens=True)
        assert res.ttft_s > 0 and res.decode_tokens_per_s > 0
    assert lens[0] < 10 < 40 < lens[1] < 100 < 250 < lens[2]
    assert smollm2.module.hf.config._attn_implementation == "sdpa"  # generate removed what it installed


def test_cli_generate_identity_rewrite_json(smollm2, identity_dir):
    from typer.testing import CliRunner

    from surgeon.cli import app

    _, ref = _hf_greedy(smollm2, PROMPTS[1], 64)
    r = CliRunner().invoke(app, ["generate", str(identity_dir), "--prompt", PROMPTS[1], "--max-new-tokens", "64",
                                 "--json"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["token_ids"] == ref
    assert doc["prompt_tokens"] == 67 and doc["policy"] == str(identity_dir)
    assert {"text", "ttft_s", "decode_tokens_per_s", "new_tokens", "stop"} <= set(doc)


def test_sparse_prefill_then_dense_decode_over_its_cache(smollm2, sparse_dir):
    """With a sparse prefill policy the first token is the rewritten program's argmax, and each
    decode step is dense attention over the cache the sparse prefill wrote."""
    import surgeon
    from transformers import DynamicCache

    from surgeon.generation.hf import apply, remove
    from surgeon.passes.rewrite import load_rewritten

    hf = smollm2.module.hf
    prompt = PROMPTS[2]
    ids = torch.tensor([smollm2.tokenizer(prompt)["input_ids"]])
    am = torch.ones_like(ids)
    with torch.no_grad():
        prog_last = load_rewritten(sparse_dir).module()(ids, am)[0, -1]
        dense_last = smollm2.module(ids, am)[0, -1]
    res = surgeon.generate(sparse_dir, prompt, max_new_tokens=4, stop_at_eos=False)
    assert res.token_ids[0] == int(prog_last.argmax())
    assert res.policy == str(sparse_dir)
    # the decode step: surgeon's decode mode vs transformers' own SDPA on the same (sparse-prefill) cache
    tok = torch.tensor([[res.token_ids[0]]])
    am2 = torch.ones(1, ids.shape[1] + 1, dtype=torch.long)
    try:
        apply(hf, sparse_dir, verify=False)
        with torch.no_grad():
            cache = DynamicCache(config=hf.config)
            pre = hf(input_ids=ids, attention_mask=am, cache=cache, use_cache=True).logits[0, -1]
            torch.testing.assert_close(pre, prog_last, rtol=0, atol=1e-4)
            ours = hf(input_ids=tok, attention_mask=am2, cache=cache, use_cache=True).logits[0, -1]
            cache.crop(-1)
            remove(hf)
            theirs = hf(input_ids=tok, attention_mask=am2, cache=cache, use_cache=True).logits[0, -1]
    finally:
        remove(hf)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    assert res.token_ids[1] == int(ours.argmax())
    # the sparse prefill really differs from dense (so the cache is the sparse one)
    assert float((prog_last - dense_last).abs().max()) > 1e-2


def test_sampling_is_seeded(smollm2):
    import surgeon

    a = surgeon.generate(smollm2, "Once upon a time", max_new_tokens=12, temperature=0.8, seed=7, stop_at_eos=False)
    b = surgeon.generate(smollm2, "Once upon a time", max_new_tokens=12, temperature=0.8, seed=7, stop_at_eos=False)
    assert a.token_ids == b.token_ids and len(a.token_ids) == 12 and a.temperature == 0.8


# --------------------------------------------------------------------------- bad input

def _cli(*args):
    from typer.testing import CliRunner

    from surgeon.cli import app

    return CliRunner().invoke(app, ["generate", *args], catch_exceptions=False)


def test_generate_prompt_usage_errors(tmp_path):
    r = _cli("smollm2-135m")
    assert r.exit_code == 2 and "exactly one of --prompt and --prompt-file" in r.output
    f = tmp_path / "p.txt"
    f.write_text("hello")
    r = _cli("smollm2-135m", "--prompt", "x", "--prompt-file", str(f))
    assert r.exit_code == 2 and "exactly one of" in r.output
    r = _cli("smollm2-135m", "--prompt-file", str(tmp_path / "missing.txt"))
    assert r.exit_code == 2 and "cannot read --prompt-file" in r.output
    for n in ("0", "-3"):
        r = _cli("smollm2-135m", "--prompt", "x", "--max-new-tokens", n)
        assert r.exit_code == 2 and f"--max-new-tokens {n} must be a positive integer" in r.output
    assert list(tmp_path.iterdir()) == [f]  # nothing written


def test_generate_beyond_max_positions_names_both_numbers(smollm2):
    import surgeon
    from surgeon.errors import BadInput

    with pytest.raises(BadInput) as e:
        surgeon.generate(smollm2, "Once upon a time", max_new_tokens=8190)
    msg = str(e.value)
    assert "4 tokens" in msg and "8190 new tokens" in msg and "8192" in msg and "at most 8188" in msg
    with pytest.raises(BadInput, match="temperature"):
        surgeon.generate(smollm2, "Once upon a time", max_new_tokens=2, temperature=-1.0)


def test_generate_refuses_encoder_and_bad_onnx(minilm, tmp_path):
    import importlib.util

    import surgeon
    from surgeon.errors import UnsupportedModel

    with pytest.raises(UnsupportedModel, match="not a causal language model"):
        surgeon.generate(minilm, "hello", max_new_tokens=4)
    r = _cli("minilm-l6", "--prompt", "hello")
    assert r.exit_code == 2 and "not a causal language model" in r.output
    if importlib.util.find_spec("surgeon.generation.onnx_loop") is None:
        r = _cli("smollm2-135m", "--prompt", "hello", "--onnx", str(tmp_path))
        assert r.exit_code == 2 and "needs an export with a KV cache" in r.output


# --------------------------------------------------------------------------- decode modes end to end

def _token_select_policy(lm, cap, params, reuse: bool = False):
    """token_select decode on layers 2-9 (with ``reuse``: layer 2 selects, 3-9 reuse its positions)."""
    from surgeon.passes.policy import policy_from_recipe

    rec = {"model.layers.*": {"variant": "dense"},
           "model.layers.[2-9].self_attn": {"variant": "dense", "decode": {"mode": "token_select", "params": params}}}
    if reuse:
        rec["model.layers.[3-9].self_attn"] = {"variant": "dense", "decode": {
            "mode": "token_reuse", "params": {"anchor": "model.layers.2.self_attn"}}}
    return policy_from_recipe(rec, lm.fingerprint(), [s.name for s in cap.sites])


def test_token_select_decode_degenerate_generates_dense_tokens(smollm2, smollm2_cap):
    import surgeon

    pol = _token_select_policy(smollm2, smollm2_cap, {"n_init": 4, "n_local": 8, "top_k": 8192})
    _, ref = _hf_greedy(smollm2, PROMPTS[1], 24)
    res = surgeon.generate(smollm2, PROMPTS[1], policy=pol, max_new_tokens=24)
    assert res.token_ids == ref
    stats = res.extra["decode"]
    assert sorted(stats) == [f"model.layers.{i}.self_attn" for i in range(2, 10)]
    # a selection that would keep every token runs dense attention outright (counted as dense steps)
    assert all(s["kept_fraction"] == 1.0 and s["dense"] >= 1 and s["selected"] == 0 for s in stats.values())
    pol = _token_select_policy(smollm2, smollm2_cap, {"n_init": 4, "n_local": 8, "top_k": 8192}, reuse=True)
    res = surgeon.generate(smollm2, PROMPTS[1], policy=pol, max_new_tokens=24)
    assert res.token_ids == ref
    stats = res.extra["decode"]
    assert stats["model.layers.2.self_attn"]["dense"] >= 1 and stats["model.layers.5.self_attn"]["selected"] == 0
    assert all(s["kept_fraction"] == 1.0 for s in stats.values())


def _page_policy(lm, cap, page: dict, delta: dict):
    """Quest page_select decode on layers 2-9, DELTA on 10-15 (10 plans, 11-15 reuse its pages)."""
    from surgeon.passes.policy import policy_from_recipe

    rec = {"model.layers.*": {"variant": "dense"},
           "model.layers.[2-9].self_attn": {"variant": "dense", "decode": {"mode": "page_select", "params": page}},
           "model.layers.10.self_attn": {"variant": "dense", "decode": {"mode": "delta_plan", "params": delta}},
           "model.layers.1[1-5].self_attn": {"variant": "dense", "decode": {
               "mode": "token_reuse", "params": {"anchor": "model.layers.10.self_attn"}}}}
    return policy_from_recipe(rec, lm.fingerprint(), [s.name for s in cap.sites])


def test_page_decode_modes_degenerate_generate_dense_tokens(smollm2, smollm2_cap):
    """Quest and DELTA with budgets above the cache generate exactly transformers' greedy tokens."""
    import surgeon

    pol = _page_policy(smollm2, smollm2_cap, {"page_size": 16, "top_pages": 4096}, {"top_pages": 4096})
    _, ref = _hf_greedy(smollm2, PROMPTS[1], 24)
    res = surgeon.generate(smollm2, PROMPTS[1], policy=pol, max_new_tokens=24)
    assert res.token_ids == ref
    stats = res.extra["decode"]
    assert all(s["kept_fraction"] == 1.0 for s in stats.values()) and len(stats) == 14
    assert stats["model.layers.3.self_attn"]["dense"] >= 1 and stats["model.layers.10.self_attn"]["selected"] >= 1


def test_page_decode_modes_in_model_fast_equals_reference(smollm2, smollm2_cap):
    """A sparse Quest / DELTA decode step inside SmolLM2: fast paths == references, a small part of
    the cache kept, and the logits differ from dense decode."""
    from transformers import DynamicCache

    from surgeon.attention.base import use_impl
    from surgeon.generation.hf import apply, decode_stats, remove

    pol = _page_policy(smollm2, smollm2_cap, {"page_size": 8, "top_pages": 2}, {"page_size": 8, "top_pages": 3,
                                                                                   "recent_pages": 1})
    hf = smollm2.module.hf
    ids = torch.tensor([smollm2.tokenizer(PROMPTS[2])["input_ids"]])
    n = ids.shape[1]
    tok = torch.tensor([[42]])
    am2 = torch.ones(1, n + 1, dtype=torch.long)
    try:
        apply(hf, pol, verify=False)
        with torch.no_grad():
            cache = DynamicCache(config=hf.config)
            hf(input_ids=ids, attention_mask=torch.ones_like(ids), cache=cache, use_cache=True)
            with use_impl("reference"):
                a = hf(input_ids=tok, attention_mask=am2, cache=cache, use_cache=True).logits[0, -1]
            cache.crop(-1)
            b = hf(input_ids=tok, attention_mask=am2, cache=cache, use_cache=True).logits[0, -1]
            stats = decode_stats(hf)
            cache.crop(-1)
            remove(hf)
            dense = hf(input_ids=tok, attention_mask=am2, cache=cache, use_cache=True).logits[0, -1]
    finally:
        remove(hf)
    torch.testing.assert_close(b, a, rtol=0, atol=1e-4)
    assert n + 1 > 8 * 8  # enough pages for a real selection
    assert all(s["kept_fraction"] < 0.6 for name, s in stats.items() if not name.endswith(".10.self_attn"))
    assert stats["model.layers.10.self_attn"]["kept_fraction"] == 1.0  # the Δ-layer itself is dense
    assert float((b - dense).abs().max()) > 1e-3


@pytest.mark.parametrize("reuse", [False, True])
def test_token_select_decode_in_model_fast_equals_reference(smollm2, smollm2_cap, reuse):
    """A sparse TokenSelect decode step inside SmolLM2: the gather fast path and the reference
    give the same logits; the selection keeps a small part of the cache and changes the logits."""
    from transformers import DynamicCache

    from surgeon.attention.base import use_impl
    from surgeon.generation.hf import apply, decode_stats, remove

    pol = _token_select_policy(smollm2, smollm2_cap, {"n_init": 4, "n_local": 16, "top_k": 16}, reuse=reuse)
    hf = smollm2.module.hf
    ids = torch.tensor([smollm2.tokenizer(PROMPTS[2])["input_ids"]])
    n = ids.shape[1]
    tok = torch.tensor([[42]])
    am2 = torch.ones(1, n + 1, dtype=torch.long)
    try:
        apply(hf, pol, verify=False)
        with torch.no_grad():
            cache = DynamicCache(config=hf.config)
            hf(input_ids=ids, attention_mask=torch.ones_like(ids), cache=cache, use_cache=True)
            with use_impl("reference"):
                a = hf(input_ids=tok, attention_mask=am2, cache=cache, use_cache=True).logits[0, -1]
            cache.crop(-1)
            b = hf(input_ids=tok, attention_mask=am2, cache=cache, use_cache=True).logits[0, -1]
            stats = decode_stats(hf)
            cache.crop(-1)
            remove(hf)
            dense = hf(input_ids=tok, attention_mask=am2, cache=cache, use_cache=True).logits[0, -1]
    finally:
        remove(hf)
    torch.testing.assert_close(b, a, rtol=0, atol=1e-4)
    kept = (4 + 16 + 16 + 1) / (n + 1)
    assert len(stats) == 8 and all(abs(s["kept_fraction"] - kept) < 1e-9 for s in stats.values())
    assert all(s["selected"] == (2 if name.endswith(".2.self_attn") or not reuse else 0) for name, s in stats.items())
    assert float((b - dense).abs().max()) > 1e-3


def test_transformers_generate_runs_the_installed_policy(smollm2, sparse_dir):
    """After apply, transformers' own generate (its cache, its loop) gives surgeon generate's tokens."""
    import surgeon
    from surgeon.generation.hf import apply, remove

    hf = smollm2.module.hf
    ids = smollm2.tokenizer(PROMPTS[2])["input_ids"]
    res = surgeon.generate(sparse_dir, PROMPTS[2], max_new_tokens=6, stop_at_eos=False)
    try:
        apply(hf, sparse_dir)
        with torch.no_grad():
            g = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                            do_sample=False, max_new_tokens=6, min_new_tokens=6)
    finally:
        remove(hf)
    assert g[0, len(ids):].tolist() == res.token_ids
    assert smollm2.module.hf.config._attn_implementation == "sdpa"


def test_generate_refuses_policy_of_other_model(smollm2):
    import surgeon
    from surgeon.errors import ArtifactMismatch
    from surgeon.passes.policy import identity_policy

    pol = identity_policy("0" * 32, ["model.layers.0.self_attn"])
    with pytest.raises(ArtifactMismatch, match="different model"):
        surgeon.generate(smollm2, "Once upon a time", policy=pol, max_new_tokens=2)
    assert smollm2.module.hf.config._attn_implementation == "sdpa"


def test_batched_left_padded_generate_with_identity_policy(smollm2, identity_dir):
    """Padding reaches the installed attention through the mask interface, in prefill and decode:
    a left-padded batch generates what the original model generates."""
    from surgeon.generation.hf import apply, remove

    hf, tok = smollm2.module.hf, smollm2.tokenizer
    rows = [tok(p)["input_ids"] for p in PROMPTS[:2]]
    n = max(len(r) for r in rows)
    ids = torch.tensor([[0] * (n - len(r)) + r for r in rows])
    am = torch.tensor([[0] * (n - len(r)) + [1] * len(r) for r in rows])
    kw = dict(attention_mask=am, do_sample=False, max_new_tokens=12, min_new_tokens=12, pad_token_id=0)
    with torch.no_grad():
        ref = hf.generate(ids, **kw)
        try:
            apply(hf, identity_dir)
            got = hf.generate(ids, **kw)
        finally:
            remove(hf)
    assert torch.equal(got, ref)
