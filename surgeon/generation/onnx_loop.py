"""Generation in onnxruntime with the KV cache of a ``surgeon export --kv-cache`` folder.

    from surgeon.generation.onnx_loop import generate_onnx
    res = generate_onnx("smol-rw-onnx", prompt_ids=[1, 504, 3458], max_new_tokens=64)
    res.token_ids, res.ttft_s, res.decode_tokens_per_s

One prefill run (``past_sequence_length`` 0, the whole prompt; the manifest's prefill graph),
then one run of its decode graph (the same graph, or ``decode.onnx`` where sparse sites decode
dense over the cache) per new token fed
the previous run's ``present.{i}.key/value`` as ``past_key_values.{i}.key/value`` (the layout in
the folder's ``manifest.json`` → ``kv_cache``). Greedy at temperature 0 (``argmax``, first
maximum on ties, as ``torch.argmax``); otherwise seeded sampling from ``softmax(logits / T)``
(numpy ``default_rng(seed)``: same seed, same tokens). Generation stops at ``max_new_tokens`` or
at an end-of-sequence token (the model's, recorded in the manifest) when ``stop_at_eos``.
Nothing is written.
"""
from __future__ import annotations

import functools
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np

from surgeon.errors import BadInput

KV_EXPORT_HINT = "export one with a cache: surgeon export REWRITE_DIR --format onnx --kv-cache"


@dataclass
class OnnxGenerationResult:
    """``token_ids``: the new tokens (prompt excluded); ``ttft_s``: prefill run through the first
    new token; ``decode_tokens_per_s``: tokens after the first / the time they took (0 when fewer
    than two were generated); ``stop``: ``"eos"`` or ``"length"``."""

    token_ids: list[int]
    prompt_tokens: int
    new_tokens: int
    ttft_s: float
    decode_s: float
    decode_tokens_per_s: float
    stop: str
    runtime: str = "onnxruntime"
    providers: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["providers"] = list(self.providers)
        return d


@dataclass
class KVModel:
    """A loaded KV-cache export: the onnxruntime session and the manifest's cache description."""

    path: Path
    session: Any  # the prefill graph
    decode_session: Any  # the decode graph (the same session when the export has one graph)
    num_layers: int
    kv_heads: int
    head_dim: int
    vocab_size: int
    max_positions: int
    eos_token_ids: tuple[int, ...]
    last_token_logits: bool
    manifest: Any


def kv_manifest(export_dir: Union[str, os.PathLike]) -> Any:
    """The folder's :class:`surgeon.exporters.pipeline.ExportManifest`, refused (BadInput, exit 2)
    unless it is an ONNX export with a KV cache."""
    from surgeon.exporters.pipeline import MANIFEST_FILE, ExportManifest

    d = Path(export_dir)
    if not d.is_dir() or not (d / MANIFEST_FILE).is_file():
        raise BadInput(f"{d} is not a surgeon export (no {MANIFEST_FILE})", KV_EXPORT_HINT)
    man = ExportManifest.load(d / MANIFEST_FILE)
    if man.model_kind != "causal-lm":
        raise BadInput(f"{d} is an export of a {man.model_kind} model, which cannot generate text",
                       "generation needs a causal language model; " + KV_EXPORT_HINT)
    if man.kv_cache is None:
        raise BadInput(f"{d} is a full-sequence export without KV-cache inputs (past_key_values.*), so it cannot "
                       "generate without recomputing the whole prefix each token", KV_EXPORT_HINT)
    if not (d / man.onnx).is_file():
        raise BadInput(f"{d / man.onnx} is missing", "re-export the model")
    return man


@functools.lru_cache(maxsize=2)
def _load(path: str, mtime_ns: int, threads: Optional[int], providers: tuple[str, ...]) -> KVModel:
    import onnxruntime as ort

    man = kv_manifest(path)
    kv = man.kv_cache
    opts = ort.SessionOptions()
    if threads is not None:
        opts.intra_op_num_threads = int(threads)
    graphs = kv.get("graphs") if isinstance(kv.get("graphs"), dict) else {}
    prefill_file, decode_file = graphs.get("prefill", man.onnx), graphs.get("decode", man.onnx)
    sessions = {}
    for f in dict.fromkeys([prefill_file, decode_file]):
        if not (Path(path) / f).is_file():
            raise BadInput(f"{Path(path) / f} is missing", "re-export the model")
        sess = ort.InferenceSession(str(Path(path) / f), sess_options=opts, providers=list(providers))
        names = [i.name for i in sess.get_inputs()]
        if names != list(kv["inputs"]):
            raise BadInput(f"{path}: the inputs of {f} ({', '.join(names[:4])}, …) differ from the manifest's",
                           "re-export the model")
        sessions[f] = sess
    return KVModel(path=Path(path), session=sessions[prefill_file], decode_session=sessions[decode_file], num_layers=int(kv["num_layers"]), kv_heads=int(kv["kv_heads"]),
                   head_dim=int(kv["head_dim"]), vocab_size=int(man.vocab_size or 0),
                   max_positions=int(kv["max_positions"]), eos_token_ids=tuple(int(e) for e in kv["eos_token_ids"]),
                   last_token_logits=bool(kv["last_token_logits"]), manifest=man)


def load_kv_model(export_dir: Union[str, os.PathLike], *, threads: Optional[int] = None,
                  providers: Sequence[str] = ("CPUExecutionProvider",)) -> KVModel:
    """Open a KV-cache export (sessions are cached per folder and file time)."""
    man = kv_manifest(export_dir)  # refuse early, with the message, before any session work
    p = Path(export_dir).resolve()
    return _load(str(p), (p / man.onnx).stat().st_mtime_ns, threads, tuple(providers))


def _prompt_array(prompt_ids: Any, vocab: int) -> np.ndarray:
    arr = np.asarray(prompt_ids.tolist() if hasattr(prompt_ids, "tolist") else list(prompt_ids), dtype=object)
    if arr.ndim == 2 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 1:
        raise BadInput(f"prompt_ids has shape {list(arr.shape)}", "give one prompt: a list of token ids")
    if arr.size == 0:
        raise BadInput("the prompt is empty", "give at least one token")
    if not all(isinstance(x, (int, np.integer)) and not isinstance(x, bool) for x in arr):
        raise BadInput("prompt_ids holds non-integer values", "give token ids (integers)")
    ids = arr.astype(np.int64)
    if vocab and (ids.min() < 0 or ids.max() >= vocab):
        raise BadInput(f"prompt token id {int(ids.max() if ids.max() >= vocab else ids.min())} is outside the "
                       f"vocabulary (0..{vocab - 1})", "tokenise the prompt with the model's tokenizer")
    return ids


def _pick(logits: np.ndarray, temperature: float, rng: np.random.Generator) -> int:
    if temperature == 0.0:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / temperature
    z -= z.max()
    p = np.exp(z)
    p /= p.sum()
    return int(rng.choice(p.size, p=p))


def generate_onnx(export_dir: Union[str, os.PathLike], prompt_ids: Any, max_new_tokens: int,
                  temperature: float = 0.0, seed: int = 0, *, stop_at_eos: bool = True,
                  eos_token_ids: Optional[Sequence[int]] = None, threads: Optional[int] = None,
                  providers: Sequence[str] = ("CPUExecutionProvider",)) -> OnnxGenerationResult:
    """Generate up to ``max_new_tokens`` tokens after ``prompt_ids`` (a list / 1-D array of token
    ids, or [1, N]) with the KV-cache export in ``export_dir``; see the module doc.

    Raises :class:`BadInput` (exit 2) for an export without cache inputs (a full-sequence or an
    encoder export: the message says how to export one with a cache), ``max_new_tokens`` < 1,
    prompt plus new tokens beyond the model's positions (naming both numbers), a negative
    temperature, or token ids outside the vocabulary.
    """
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
        raise BadInput(f"--max-new-tokens {max_new_tokens} must be a positive integer", "e.g. --max-new-tokens 64")
    if not isinstance(temperature, (int, float)) or isinstance(temperature, bool) or not temperature >= 0.0 or \
            not np.isfinite(temperature):
        raise BadInput(f"--temperature {temperature} must be a finite number >= 0", "use 0 for greedy decoding")
    m = load_kv_model(export_dir, threads=threads, providers=providers)
    ids = _prompt_array(prompt_ids, m.vocab_size)
    n = int(ids.size)
    if m.max_positions and n + int(max_new_tokens) > m.max_positions:
        raise BadInput(f"the prompt ({n} tokens) plus {int(max_new_tokens)} new tokens is {n + int(max_new_tokens)} "
                       f"positions, beyond the model's {m.max_positions}",
                       f"shorten the prompt or ask for at most {max(m.max_positions - n, 0)} new tokens")
    eos = set(m.eos_token_ids if eos_token_ids is None else (int(e) for e in eos_token_ids)) if stop_at_eos else set()
    rng = np.random.default_rng(int(seed))
    sess, L = m.session, m.num_layers
    past_names = [f"past_key_values.{i}.{kind}" for i in range(L) for kind in ("key", "value")]
    feed: dict[str, np.ndarray] = {name: np.zeros((1, m.kv_heads, 0, m.head_dim), dtype=np.float32)
                                   for name in past_names}
    feed["input_ids"] = ids[None, :]
    feed["attention_mask"] = np.ones((1, n), dtype=np.int64)
    feed["position_ids"] = np.arange(n, dtype=np.int64)[None, :]
    out: list[int] = []
    stop = "length"
    t0 = time.perf_counter()
    t_first = t0
    total = n
    for step in range(int(max_new_tokens)):
        res = (sess if step == 0 else m.decode_session).run(None, feed)
        tok = _pick(res[0][0, -1], float(temperature), rng)
        out.append(tok)
        if step == 0:
            t_first = time.perf_counter()
        if tok in eos:
            stop = "eos"
            break
        if step == int(max_new_tokens) - 1:
            break
        for name, t in zip(past_names, res[1:]):
            feed[name] = t
        feed["input_ids"] = np.array([[tok]], dtype=np.int64)
        feed["position_ids"] = np.array([[total]], dtype=np.int64)
        total += 1
        feed["attention_mask"] = np.ones((1, total), dtype=np.int64)
    t_end = time.perf_counter()
    decode_s = t_end - t_first
    rate = (len(out) - 1) / decode_s if len(out) > 1 and decode_s > 0 else 0.0
    return OnnxGenerationResult(token_ids=out, prompt_tokens=n, new_tokens=len(out), ttft_s=t_first - t0,
                                decode_s=decode_s, decode_tokens_per_s=rate, stop=stop,
                                providers=tuple(sess.get_providers()))
