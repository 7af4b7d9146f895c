"""``token_topp``: token-level selection with the budget set by mass, not a fixed k.

``token_topk`` (TokenSelect, methods.md §4) with Twilight's top-p pruning (§14g) as the budget
rule: per query chunk, the init keys, the local window and (causal) the chunk's own keys are
kept as in ``token_topk``; the candidates in between are ranked by the soft vote
S(j) = Σ_h softmax_j(q̄_h · k_{g(h), j} · τ) over the chunk's candidates, and the chunk keeps
the fewest of them whose cumulative vote reaches ``p`` of the total vote, bounded by
``min_tokens`` and ``max_tokens`` (0 = no cap). Everything else — the causal-safe chunk
fingerprint q̄ (the ``chunk`` rows ending at the chunk's first row), the candidate ranges,
ties toward the lower position, padding — is ``token_topk``'s (see its module doc).

τ [PROPOSED]: ``scaled=True`` (default) uses the site's softmax scale, so each head's vote is
the attention distribution of the chunk fingerprint and p reads as attention mass;
``scaled=False`` is TokenSelect's unscaled criticality (sharper, fewer tokens for the same p).
``p = 1`` keeps every candidate (dense). Fast path ``gather``: ``token_topk``'s gather kernel on
the selected keys (each chunk's lists are padded to the largest count in a run of chunks).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from surgeon.errors import BadInput
from surgeon.kernels.geometry import pooled_queries, query_validity
from surgeon.kernels.gather_cpu import real_keys
from surgeon.attention.base import AttnContext, VariantParams, check_range
from surgeon.attention.token_topk import TokenTopK, _Selection

NEG_INF = float("-inf")


@dataclass(frozen=True)
class TokenTopPParams(VariantParams):
    """n_init / n_local: leading / most recent keys always kept; p: vote mass the chunk's voted
    keys must reach, (0, 1]; min_tokens / max_tokens: bounds on the voted keys (max 0 = none);
    chunk: query rows sharing one selection; scaled: vote with the site's softmax scale."""

    n_init: int = 128
    n_local: int = 512
    p: float = 0.95
    min_tokens: int = 0
    max_tokens: int = 0
    chunk: int = 64
    scaled: bool = True

    def __post_init__(self) -> None:
        check_range("n_init", self.n_init, 0, 1 << 30)
        check_range("n_local", self.n_local, 0, 1 << 30)
        check_range("p", self.p, 0.0, 1.0, lo_open=True)
        check_range("min_tokens", self.min_tokens, 0, 1 << 30)
        check_range("max_tokens", self.max_tokens, 0, 1 << 30)
        check_range("chunk", self.chunk, 1, 1 << 20)
        if not isinstance(self.scaled, bool):
            raise BadInput(f"scaled={self.scaled!r} is not a boolean", "use true or false")
        if self.max_tokens and self.min_tokens > self.max_tokens:
            raise BadInput(f"min_tokens={self.min_tokens} exceeds max_tokens={self.max_tokens}",
                           "give min_tokens <= max_tokens (or max_tokens 0 for no cap)")


def topp_token_counts(val: torch.Tensor, p: TokenTopPParams) -> torch.Tensor:
    """Voted keys per chunk [B, ng] long from the sorted votes ``val`` [B, ng, Nk] (descending,
    −inf = not a candidate): the fewest whose cumulative vote reaches p of the total, bounded."""
    is_c = val > NEG_INF
    v64 = torch.where(is_c, val, torch.zeros_like(val)).to(torch.float64)
    total = v64.sum(dim=-1, keepdim=True)
    before = torch.cat([torch.zeros_like(v64[..., :1]), torch.cumsum(v64, dim=-1)[..., :-1]], dim=-1)
    n_all = is_c.sum(dim=-1)
    n = n_all if p.p >= 1.0 else ((before < p.p * total) & is_c).sum(dim=-1)
    n = torch.clamp(n, min=p.min_tokens)
    if p.max_tokens:
        n = torch.clamp(n, max=p.max_tokens)
    return torch.minimum(n, n_all)


def select_tokens_topp(q: torch.Tensor, k: torch.Tensor, ctx: AttnContext, p: TokenTopPParams) -> _Selection:
    """The selection of every query chunk: indices [B, 1, ceil(Nq/chunk), S] as in
    ``token_topk.select_tokens`` (init slots, voted keys best first, local window; −1 empty)."""
    b, hq, nq, d = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    g = hq // hkv
    c = p.chunk
    ng = (nq + c - 1) // c
    dev = q.device
    off = nk - nq
    first = off + torch.arange(ng, device=dev) * c
    lim = first if ctx.causal else torch.full_like(first, nk)
    n_i = torch.clamp(lim, max=p.n_init)
    cand_hi = lim - p.n_local

    real = real_keys(ctx.key_padding, b, nk, dev)
    j = torch.arange(nk, device=dev)
    cand = (j[None, :] >= p.n_init) & (j[None, :] < cand_hi[:, None])  # [ng, Nk]
    cand = cand[None] & real[:, None, :]  # [B, ng, Nk]
    top = torch.full((b, ng, 0), -1, dtype=torch.long, device=dev)
    if ng and bool(cand.any()):
        qv = query_validity(ctx.key_padding, nq, nk, ctx.causal)
        qbar = pooled_queries(q, c, ctx.causal, qv)  # [B,Hq,ng,D]
        s_h = torch.matmul(qbar.view(b, hkv, g * ng, d), k.transpose(-1, -2)).view(b, hq, ng, nk)
        if p.scaled:
            s_h = s_h * ctx.scale
        vote = torch.softmax(s_h.masked_fill(~cand[:, None], NEG_INF), dim=-1).sum(dim=1)  # [B, ng, Nk]
        vote = vote.masked_fill(~cand, NEG_INF)
        val, order = torch.sort(vote, dim=-1, descending=True, stable=True)
        kcnt = topp_token_counts(val, p)  # [B, ng]
        kmax = int(kcnt.max().item())
        if kmax > 0:
            val, order = val[..., :kmax], order[..., :kmax]
            ok = (val > NEG_INF) & (torch.arange(kmax, device=dev)[None, None, :] < kcnt[..., None])
            top = torch.where(ok, order, torch.full_like(order, -1))

    ii = torch.arange(p.n_init, device=dev)
    init = torch.where(ii[None, :] < n_i[:, None], ii[None, :], torch.full_like(ii[None, :], -1))
    lo = torch.maximum(n_i, lim - p.n_local)
    ll = lo[:, None] + torch.arange(p.n_local, device=dev)[None, :]
    local = torch.where(ll < lim[:, None], ll, torch.full_like(ll, -1))
    idx = torch.cat([init[None].expand(b, ng, -1), top, local[None].expand(b, ng, -1)], dim=-1)
    if ctx.causal:
        return _Selection(idx=idx[:, None], diag_start=first, diag_len=c)
    return _Selection(idx=idx[:, None], diag_start=None, diag_len=0)


class TokenTopP(TokenTopK):
    """token_topk's machinery (reference, gather fast path, density accounting) with the
    budget set by vote mass: only the selection differs (:func:`select_tokens_topp`)."""

    name = "token_topp"
    lowering_module = "surgeon.attention.token_topp.lowering"
    Params = TokenTopPParams
    family = "sparse"
    description = ("token-level selection with a mass budget: per query chunk, init + the fewest soft-voted keys "
                   "whose vote reaches p (min/max bounds) + local window")

    def select(self, q, k, ctx: AttnContext, p: TokenTopPParams) -> _Selection:
        return select_tokens_topp(q, k, ctx, p)

    def _requested(self, p: TokenTopPParams, nk: int, achieved: float) -> float:
        return achieved  # adaptive: requested = achieved

    def requested_density(self, p: TokenTopPParams) -> float:
        return 1.0  # the budget follows the votes (recorded per call)

    def selection_overhead(self, p: TokenTopPParams) -> float:
        """Fingerprint scores (one row per chunk against every key) as a fraction of dense QKᵀ."""
        return 1.0 / p.chunk

    # -- test-matrix hooks ------------------------------------------------------------
    def degenerate_params(self, n: int) -> TokenTopPParams:
        return TokenTopPParams(n_init=4, n_local=8, p=1.0, chunk=16)

    def example_params(self, n: int, hq: int) -> TokenTopPParams:
        return TokenTopPParams(n_init=4, n_local=8, p=0.5, min_tokens=2, chunk=16)

    def small_example_params(self, hq: int) -> TokenTopPParams:
        """Non-trivial parameters at 24–32 tokens (small blocks / visible edits; the ONNX
        modulated × sparse matrix)."""
        return self.params_from({"n_init": 2, "n_local": 4, "p": 0.6, "chunk": 8})
