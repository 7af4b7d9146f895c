"""surgeon.apply (a policy installed into a live transformers model) and `surgeon generate`."""
from __future__ import annotations

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
