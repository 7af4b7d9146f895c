"""Generation with a KV cache: a surgeon policy installed into a live transformers model.

* :mod:`surgeon.generation.hf` — :func:`apply` / :func:`remove`: route every attention site of a
  transformers model through the site's surgeon variant (prefill) and decode mode (decode steps)
  via transformers' ``AttentionInterface`` and ``AttentionMaskInterface``, so ``model.generate()``
  runs the policy with transformers' own caches.
* :mod:`surgeon.generation.decode` — decode modes (default ``dense`` over the cache).
* :mod:`surgeon.generation.loop` — the greedy / seeded-sampling loop behind ``surgeon generate``.

Nothing is imported or registered at import time.
"""
