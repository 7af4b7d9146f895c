"""Install a surgeon policy into a live transformers model (``surgeon.apply``).

transformers dispatches every attention call through ``ALL_ATTENTION_FUNCTIONS[config._attn_implementation]``
and builds masks through ``ALL_MASK_ATTENTION_FUNCTIONS[...]``. :func:`apply` registers the name
``"surgeon"`` in both (the mask function is transformers' own SDPA mask: without a registered mask
function transformers passes no mask at all and padding is silently dropped), switches the model to it
and tags each attention module with its site's plan (:class:`SitePlan`).

Per call of a tagged module:

* **prefill** (``q_len > 1``): the site's policy variant runs through the same ``surgeon::<variant>``
  op, with the same ``config`` string, key-padding and block-mask edges as the rewritten program
  (:func:`surgeon.passes.rewrite.rewrite`), so prefill logits equal the rewritten program's;
  block masks an anchor produces are kept, per forward, for the consumers that name it;
* **decode** (``q_len == 1``): the site's decode mode (:mod:`surgeon.generation.decode`; default
  ``dense`` over the cache).

K/V come from transformers' cache unrepeated ([B, Hkv, N, D]); the op handles GQA itself.
"""
from __future__ import annotations

import math
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from surgeon.errors import ArtifactMismatch, BadInput, UnsupportedModel

IMPL_NAME = "surgeon"
_REG_LOCK = threading.Lock()
_REGISTERED = False


@dataclass
class SitePlan:
    """What one attention module runs. ``config`` is the op's config string (as in the rewritten
    program); ``decode`` the decode mode (see :mod:`surgeon.generation.decode`)."""

    site: Any  # surgeon.capture.Site
    variant: str
    config: str
    block_mask_from: Optional[str]
    produces_block_mask: bool
    consumes_block_mask: bool
    decode: Any  # surgeon.generation.decode.DecodeMode
    state: "ModelState"


@dataclass
class ModelState:
    """Shared by all sites of one model: the policy, the previous attention implementation (to
    restore) and the block masks produced during the current forward (anchor site → flat mask)."""

    policy: Any
    previous_impl: Optional[str]
    plans: dict[str, SitePlan] = field(default_factory=dict)
    block_masks: dict[str, torch.Tensor] = field(default_factory=dict)
    decode_state: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------- registration

def _attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               attention_mask: Optional[torch.Tensor], dropout: float = 0.0, scaling: Optional[float] = None,
               **kwargs: Any):
    """The ``"surgeon"`` attention function: [B,H,N,D] in, ([B,N,H,D], None) out."""
    plan: Optional[SitePlan] = getattr(module, "_surgeon_plan", None)
    if plan is None:  # a module of a model that has no policy installed (shared config) — plain SDPA
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    if dropout and module.training:
        raise BadInput(f"{plan.site.name}: surgeon attention does not implement attention dropout",
                       "call model.eval() before generating")
    out = run_site(plan, query, key, value, attention_mask)
    return out.transpose(1, 2).contiguous(), None


def _mask(*args: Any, **kwargs: Any):
    from transformers.masking_utils import sdpa_mask

    return sdpa_mask(*args, **kwargs)


def register() -> None:
    """Register ``"surgeon"`` with transformers' attention and attention-mask interfaces (idempotent)."""
    global _REGISTERED
    with _REG_LOCK:
        if _REGISTERED:
            return
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface

        AttentionInterface.register(IMPL_NAME, _attention)
        AttentionMaskInterface.register(IMPL_NAME, _mask)
        _REGISTERED = True


# --------------------------------------------------------------------------- per-call work

def key_padding_from_mask(mask: Optional[torch.Tensor], causal: bool, nk: int) -> Optional[torch.Tensor]:
    """The [B, Nk] bool key padding transformers' 4-D bool mask encodes (None: no padding).

    For a causal mask the last query row sees every real key (all keys are at or before it), so
    that row is the key padding; a non-causal padding mask has the same row everywhere.
    """
    if mask is None:
        return None
    if mask.dtype != torch.bool:
        mask = torch.isfinite(mask) & (mask > torch.finfo(mask.dtype).min / 2)
    if mask.dim() == 2:
        return mask[:, -nk:]
    row = mask[:, 0, -1, :] if causal else mask[:, 0, 0, :]
    return row[:, -nk:]


def run_site(plan: SitePlan, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             mask: Optional[torch.Tensor]) -> torch.Tensor:
    """One site's attention: q [B,Hq,Nq,D], k/v [B,Hkv,Nk,D] → [B,Hq,Nq,Dv]."""
    site = plan.site
    nq, nk = q.shape[2], k.shape[2]
    kp = key_padding_from_mask(mask, site.causal, nk)
    if nq == 1:
        return plan.decode.run(plan, q, k, v, kp)
    plan.state.decode_state.pop(site.name, None)  # a new prefill: decode selections start afresh
    from surgeon.attention.ops import op_for

    if kp is None and "padding" in site.mask_kind:
        # the rewritten program always passes attention_mask != 0 at padding sites
        kp = torch.ones(q.shape[0], nk, dtype=torch.bool, device=q.device)
    if kp is not None and "padding" not in site.mask_kind and not bool(kp.all()):
        raise UnsupportedModel(f"{site.name}: the input has padding but the site was captured without a padding mask",
                               "generate without padding (batch of one prompt) or recapture with an attention mask")
    bm = None
    if plan.consumes_block_mask:
        bm = plan.state.block_masks.get(plan.block_mask_from)
        if bm is None:
            raise BadInput(f"{site.name} reads the block mask of {plan.block_mask_from}, which has not run in this forward",
                           "give the consumer an anchor site that runs before it")
    res = op_for(plan.variant)(q, k, v, kp, None, bool(site.causal), float(site.scale), plan.config, bm)
    if plan.produces_block_mask:
        out, produced = res
        plan.state.block_masks[site.name] = produced
        return out
    return res


# --------------------------------------------------------------------------- policy resolution

def _hf_of(model: Any) -> nn.Module:
    """The transformers module of ``model`` (a PreTrainedModel or a surgeon LoadedModel)."""
    from surgeon.models import LoadedModel

    if isinstance(model, LoadedModel):
        inner = getattr(model.module, "hf", None)
        if inner is None:
            raise UnsupportedModel(f"{model.name} is not a transformers model", "apply needs a transformers model")
        return inner
    if not isinstance(model, nn.Module) or not hasattr(model, "config"):
        raise BadInput(f"apply needs a transformers model, got {type(model).__name__}",
                       "pass a transformers PreTrainedModel (e.g. surgeon.load(...).module.hf)")
    return model


def _fingerprint(hf: nn.Module) -> str:
    from surgeon.models import _from_hf_model

    return _from_hf_model("apply", "apply", hf).fingerprint()


def _sites_from_model(hf: nn.Module, names: list[str]) -> list[Any]:
    """Site facts read from the live modules (for a policy given without its rewrite folder)."""
    from surgeon.capture import Site

    cfg = hf.config
    heads = int(getattr(cfg, "num_attention_heads"))
    kv_heads = int(getattr(cfg, "num_key_value_heads", None) or heads)
    sites = []
    for idx, name in enumerate(names):
        mod = _submodule(hf, name)
        head_dim = int(getattr(mod, "head_dim", 0) or getattr(cfg, "head_dim", 0) or cfg.hidden_size // heads)
        scale = float(getattr(mod, "scaling", 0) or 1.0 / math.sqrt(head_dim))
        causal = bool(getattr(mod, "is_causal", False))
        m = re.search(r"\.(\d+)(\.|$)", name)
        sites.append(Site(name=name, layer=int(m.group(1)) if m else idx, heads=heads, kv_heads=kv_heads,
                          head_dim=head_dim, scale=scale, causal=causal,
                          mask_kind="causal+padding" if causal else "padding", kind="sdpa",
                          module_type=type(mod).__name__))
    return sites


def _submodule(hf: nn.Module, name: str) -> nn.Module:
    try:
        return hf.get_submodule(name)
    except AttributeError as e:
        raise ArtifactMismatch(f"the model has no module {name} named by the policy",
                               "apply a policy made for this model") from e


def _attention_module_names(hf: nn.Module) -> list[str]:
    """Modules that call transformers' attention interface (they carry ``layer_idx`` and q/k/v)."""
    out = []
    for name, mod in hf.named_modules():
        if hasattr(mod, "layer_idx") and any(hasattr(mod, a) for a in ("q_proj", "query", "qkv_proj", "c_attn")):
            out.append(name)
    return out


def resolve(policy_or_dir: Any) -> tuple[Any, Optional[list[Any]], Optional[str]]:
    """(Policy, the rewrite's sites or None, the rewrite's source model name or None)."""
    from surgeon.capture import Site
    from surgeon.passes.policy import Policy

    if isinstance(policy_or_dir, Policy):
        return policy_or_dir, None, None
    if not isinstance(policy_or_dir, (str, Path)):
        raise BadInput(f"apply needs a Policy, a policy.json or a rewrite folder, got {type(policy_or_dir).__name__}",
                       "pass surgeon.passes.policy.Policy, a policy.json path or a folder written by `surgeon rewrite`")
    p = Path(policy_or_dir)
    if p.is_dir():
        if not (p / "rewrite.json").is_file():
            raise BadInput(f"{p} is not a surgeon rewrite (no rewrite.json)", "give a folder written by `surgeon rewrite`")
        from surgeon.passes.rewrite import RewriteManifest

        man = RewriteManifest.load(p / "rewrite.json")
        pol = Policy.load(p / "policy.json", model_fingerprint=man.model_fingerprint)
        fields = set(Site.__dataclass_fields__)
        sites = [Site(**{k: v for k, v in s.items() if k in fields}) for s in man.sites]
        return pol, sites, man.model
    if p.is_file():
        return Policy.load(p), None, None
    raise BadInput(f"no such policy or rewrite folder: {p}", "give a policy.json or a folder written by `surgeon rewrite`")


# --------------------------------------------------------------------------- public

def apply(model: Any, policy_or_rewrite_dir: Any, *, verify: bool = True) -> nn.Module:
    """Install a surgeon policy into a live transformers model; returns the (same) model.

    ``policy_or_rewrite_dir``: a :class:`~surgeon.passes.policy.Policy`, a ``policy.json`` path or
    a folder written by ``surgeon rewrite``. With ``verify`` the model's fingerprint must be the
    policy's (a content hash of the weights; ≈1 s for SmolLM2-135M). Sites the policy does not name
    run ``dense``. After ``apply``, ``model(...)`` and ``model.generate(...)`` run prefill through
    each site's policy variant and decode steps through its decode mode, with transformers'
    caches. :func:`remove` restores the model's previous attention implementation.
    """
    from surgeon.attention.ops import register_all
    from surgeon.attention.registry import get_variant
    from surgeon.generation.decode import decode_mode_for
    from surgeon.passes.policy import SiteChoice
    from surgeon.passes.rewrite import site_config, validate_policy

    hf = _hf_of(model)
    policy, sites, _src = resolve(policy_or_rewrite_dir)
    if not hasattr(hf, "set_attn_implementation") or not getattr(hf, "_can_set_attn_implementation", lambda: False)():
        raise UnsupportedModel(f"{type(hf).__name__} does not dispatch attention through transformers' AttentionInterface",
                               "apply works on transformers models that support set_attn_implementation")
    if verify:
        fp = _fingerprint(hf)
        if policy.model_fingerprint and fp != policy.model_fingerprint:
            raise ArtifactMismatch("the policy was made for a different model (fingerprint mismatch)",
                                   "apply a policy made for this model, or re-run `surgeon rewrite` for it")
    if sites is None:
        names = _attention_module_names(hf)
        missing = sorted(set(policy.sites) - set(names))
        if missing:
            raise ArtifactMismatch(f"the policy names site(s) this model does not have: {missing[:3]}",
                                   "apply a policy made for this model")
        sites = _sites_from_model(hf, names)
    validate_policy(policy, sites)
    register_all()
    register()
    remove(hf)
    state = ModelState(policy=policy, previous_impl=hf.config._attn_implementation)
    for site in sites:
        choice = policy.sites.get(site.name, SiteChoice(variant="dense", reason="default"))
        var = get_variant(choice.variant)
        if var.causal_only and not site.causal:
            raise BadInput(f"variant '{choice.variant}' needs a causal site but {site.name} is not causal",
                           "choose a variant that supports non-causal attention")
        plan = SitePlan(site=site, variant=choice.variant, config=site_config(site, choice),
                        block_mask_from=choice.block_mask_from, produces_block_mask=var.produces_block_mask,
                        consumes_block_mask=var.consumes_block_mask,
                        decode=decode_mode_for(choice, site), state=state)
        state.plans[site.name] = plan
    from surgeon.generation.decode import validate_decode_plans

    validate_decode_plans(state.plans)
    for name, plan in state.plans.items():
        _submodule(hf, name)._surgeon_plan = plan
    hf._surgeon_state = state
    hf.set_attn_implementation(IMPL_NAME)
    return hf


def remove(model: Any) -> nn.Module:
    """Undo :func:`apply` (no-op on a model without a surgeon policy)."""
    hf = _hf_of(model)
    state: Optional[ModelState] = getattr(hf, "_surgeon_state", None)
    if state is None:
        return hf
    for name in state.plans:
        mod = _submodule(hf, name)
        if hasattr(mod, "_surgeon_plan"):
            del mod._surgeon_plan
    del hf._surgeon_state
    hf.set_attn_implementation(state.previous_impl or "sdpa")
    return hf


def installed_policy(model: Any):
    """The policy :func:`apply` installed into ``model`` (None if none)."""
    state = getattr(_hf_of(model), "_surgeon_state", None)
    return state.policy if state is not None else None


def decode_stats(model: Any) -> dict[str, dict[str, Any]]:
    """Per site with a stateful decode mode: fresh selections, reused selections, steps run densely
    because the selection would keep every token (``dense``) and the kept fraction of visible
    cache tokens over the decode steps since the last prefill."""
    state = getattr(_hf_of(model), "_surgeon_state", None)
    if state is None:
        return {}
    out = {}
    for name, st in state.decode_state.items():
        vis = st.get("visible", 0)
        out[name] = {"selected": st.get("selected", 0), "reused": st.get("reused", 0), "dense": st.get("dense", 0),
                     "kept_fraction": (st.get("kept", 0) / vis) if vis else None}
    return out
