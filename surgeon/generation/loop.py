"""The generation loop behind ``surgeon generate`` (PyTorch, transformers' DynamicCache).

One prefill forward over the prompt (last-position logits only), then one forward per new token
through the cache. Greedy when ``temperature`` is 0; otherwise the next token is sampled from
softmax(logits / temperature) with a ``torch.Generator`` seeded by ``seed`` (same seed, same
tokens). Generation stops after ``max_new_tokens`` or at an end-of-sequence token.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

import torch

from surgeon.errors import BadInput, UnsupportedModel


@dataclass
class GenerationResult:
    """``token_ids``: the new tokens (the prompt excluded); ``ttft_s``: prefill through the first
    new token; ``decode_tokens_per_s``: tokens after the first / the time they took (0 when fewer
    than two tokens were generated); ``stop``: ``"eos"`` or ``"length"``."""

    text: str
    token_ids: list[int]
    prompt_tokens: int
    new_tokens: int
    ttft_s: float
    decode_s: float
    decode_tokens_per_s: float
    stop: str
    backend: str = "pytorch"
    model: str = ""
    policy: str = "dense"
    temperature: float = 0.0
    seed: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_request(prompt_tokens: int, max_new_tokens: int, max_positions: int, temperature: float) -> None:
    """Refuse, before any model work, a request no generation can serve."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens <= 0:
        raise BadInput(f"--max-new-tokens {max_new_tokens} must be a positive integer", "give at least 1")
    if prompt_tokens <= 0:
        raise BadInput("the prompt is empty (0 tokens)", "give a prompt with at least one token")
    if not isinstance(temperature, (int, float)) or math.isnan(float(temperature)) or float(temperature) < 0:
        raise BadInput(f"--temperature {temperature} must be ≥ 0", "use 0 for greedy decoding or a positive value to sample")
    if max_positions and prompt_tokens + max_new_tokens > max_positions:
        raise BadInput(f"the prompt has {prompt_tokens} tokens and {max_new_tokens} new tokens were asked for: "
                       f"{prompt_tokens + max_new_tokens} positions, but the model has {max_positions}",
                       f"shorten the prompt or ask for at most {max(max_positions - prompt_tokens, 0)} new tokens")


def eos_ids(hf: Any, tokenizer: Any = None) -> set[int]:
    """The end-of-sequence ids transformers' generate stops at (generation config, else tokenizer)."""
    ids: Any = None
    gc = getattr(hf, "generation_config", None)
    if gc is not None:
        ids = getattr(gc, "eos_token_id", None)
    if ids is None:
        ids = getattr(hf.config, "eos_token_id", None)
    if ids is None and tokenizer is not None:
        ids = getattr(tokenizer, "eos_token_id", None)
    if ids is None:
        return set()
    return {int(i) for i in (ids if isinstance(ids, (list, tuple)) else [ids])}


def next_token(logits: torch.Tensor, temperature: float, gen: Optional[torch.Generator]) -> int:
    """logits [V] → the next token id (greedy at temperature 0)."""
    if temperature == 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.double() / float(temperature), dim=-1)
    return int(torch.multinomial(probs, 1, generator=gen))


@torch.no_grad()
def generate_ids(hf: Any, prompt_ids: list[int], max_new_tokens: int, *, temperature: float = 0.0, seed: int = 0,
                 eos: Optional[set[int]] = None, stop_at_eos: bool = True) -> tuple[list[int], float, float, str]:
    """Run the loop on a transformers causal LM; returns (new ids, ttft_s, decode_s, stop)."""
    from transformers import DynamicCache

    if getattr(hf, "training", False):
        hf.eval()
    device = next(iter(hf.parameters())).device
    gen = None
    if temperature:
        gen = torch.Generator(device="cpu").manual_seed(int(seed))
    eos = eos if eos is not None else set()
    ids = torch.tensor([prompt_ids], dtype=torch.long, device=device)
    n = ids.shape[1]
    cache = DynamicCache(config=hf.config)
    t0 = time.perf_counter()
    out = hf(input_ids=ids, attention_mask=torch.ones_like(ids), cache=cache, use_cache=True,
             logits_to_keep=1)
    tok = next_token(out.logits[0, -1].float().cpu(), temperature, gen)
    ttft = time.perf_counter() - t0
    new = [tok]
    stop = "length"
    t1 = time.perf_counter()
    if stop_at_eos and tok in eos:
        stop = "eos"
    else:
        for i in range(1, max_new_tokens):
            step = torch.tensor([[tok]], dtype=torch.long, device=device)
            am = torch.ones(1, n + i, dtype=torch.long, device=device)
            out = hf(input_ids=step, attention_mask=am, cache=cache, use_cache=True,
                     logits_to_keep=1)
            tok = next_token(out.logits[0, -1].float().cpu(), temperature, gen)
            new.append(tok)
            if stop_at_eos and tok in eos:
                stop = "eos"
                break
    return new, ttft, time.perf_counter() - t1, stop


def run(hf: Any, tokenizer: Any, prompt_ids: list[int], max_new_tokens: int, *, max_positions: int = 0,
        temperature: float = 0.0, seed: int = 0, stop_at_eos: bool = True, model: str = "",
        policy: str = "dense") -> GenerationResult:
    """Check the request, generate and decode the text."""
    check_request(len(prompt_ids), max_new_tokens, max_positions, temperature)
    if not type(hf).__name__.endswith("ForCausalLM"):
        raise UnsupportedModel(f"{model or type(hf).__name__} is not a causal language model",
                               "generate needs a decoder (causal LM), not an encoder or vision model")
    new, ttft, dec, stop = generate_ids(hf, prompt_ids, max_new_tokens, temperature=float(temperature), seed=seed,
                                        eos=eos_ids(hf, tokenizer), stop_at_eos=stop_at_eos)
    text = tokenizer.decode(new, skip_special_tokens=True) if tokenizer is not None else ""
    rate = (len(new) - 1) / dec if len(new) > 1 and dec > 0 else 0.0
    from surgeon.generation.hf import decode_stats

    stats = decode_stats(hf)
    return GenerationResult(text=text, token_ids=new, prompt_tokens=len(prompt_ids), new_tokens=len(new), ttft_s=ttft,
                            decode_s=dec, decode_tokens_per_s=rate, stop=stop, model=model, policy=policy,
                            temperature=float(temperature), seed=int(seed),
                            extra={"decode": stats} if stats else {})
