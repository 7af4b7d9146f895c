"""Calibration data for the profiler: text corpora, JSONL, image folders; calib / held-out splits.

Sources (``load_calibration``):

* ``None`` — the built-in offline English corpus: the CPython documentation topics shipped with
  every Python installation (module ``pydoc_data.topics``, a dict ``topic → text`` generated
  from the Python docs by ``make pydoc-topics``; © Python Software Foundation, distributed under
  the PSF License Agreement with the interpreter itself). About 79 topics / 465k characters
  (≈ 113k SmolLM2 tokens) — no download, identical on every machine with the same Python.
* a ``.jsonl`` file — one JSON object per line with a ``"text"`` field (one document per line);
* any other file — UTF-8 text; documents are its blank-line separated paragraphs;
* a folder of ``.txt`` files — one document per file (sorted by name);
* (vision models) a folder of images — ``.png .jpg .jpeg .bmp .webp .gif`` (sorted by name),
  preprocessed by the model's image processor (or ``transformers.ViTImageProcessor`` sized to the
  model's ``image_size``; needs Pillow).

Splits: documents (or images) are taken in sorted order and alternated: even positions form
the ``calib`` split, odd positions the ``heldout`` split, so the two never share a document. A
source with a single text document is cut in two halves by characters instead.

Rows: the split's documents are tokenised and concatenated (EOS between documents, see
:meth:`surgeon.models.LoadedModel.encode_texts`) and cut into rows of exactly ``seq_len``
tokens (no padding). ``samples`` rows are drawn without replacement by a generator seeded with
``seed`` and kept in source order. Too little data is a :class:`BadInput` that says how many
tokens were found and how many are needed.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence, Union

import torch

from surgeon.errors import BadInput
from surgeon.models import LoadedModel

SPLITS = ("calib", "heldout")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif")
# torch.export captures text models with a dynamic sequence axis of at least 16 tokens
MIN_SEQ_LEN = 16
BUILTIN_SOURCE = "builtin:pydoc_data.topics"


@dataclass
class CalibrationData:
    """Calibration rows ready for the captured program.

    ``inputs``: the model's forward arguments, batch-first, one row per sample — text models:
    ``(input_ids [S, N] long, attention_mask [S, N] long, all ones)``; vision models:
    ``(pixel_values [S, 3, H, W] float32,)``. ``fingerprint`` hashes the split name and the exact
    row contents (token ids or pixels), so equal fingerprints mean equal data.
    """

    inputs: tuple[torch.Tensor, ...]
    source: str
    split: str
    fingerprint: str
    seq_len: int
    tokens_available: int
    documents: int
    rows_available: int
    row_indices: list[int] = field(default_factory=list)

    @property
    def samples(self) -> int:
        return int(self.inputs[0].shape[0])

    def row(self, i: int, length: Optional[int] = None) -> tuple[torch.Tensor, ...]:
        """Sample ``i`` as a batch of one (text: optionally its first ``length`` tokens)."""
        out = tuple(x[i:i + 1] for x in self.inputs)
        if length is not None and self.is_text:
            out = tuple(x[:, :length] for x in out)
        return out

    @property
    def is_text(self) -> bool:
        return self.inputs[0].dtype == torch.long

    def describe(self) -> dict[str, Any]:
        return {"source": self.source, "split": self.split, "samples": self.samples, "seq_len": self.seq_len,
                "tokens_available": self.tokens_available, "documents": self.documents,
                "rows_available": self.rows_available, "rows": list(self.row_indices)}


# --------------------------------------------------------------------------- documents

def builtin_documents() -> list[str]:
    """The built-in corpus: CPython's pydoc topics, in sorted topic order (PSF licence)."""
    try:
        from pydoc_data.topics import topics  # shipped with CPython
    except ImportError as e:  # pragma: no cover - only on stripped Python builds
        raise BadInput("this Python has no pydoc_data module (the built-in calibration corpus)",
                       "give calibration text with --data FILE") from e
    return [topics[k] for k in sorted(topics)]


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise BadInput(f"{path} is not UTF-8 text", "give a UTF-8 text file, a .jsonl file or a folder of .txt files") from e
    except OSError as e:
        raise BadInput(f"{path} could not be read ({e.strerror or type(e).__name__})",
                       "check the path and its permissions") from e


def _jsonl_documents(path: Path) -> list[str]:
    docs: list[str] = []
    for i, line in enumerate(_read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise BadInput(f"{path} line {i} is not valid JSON ({e.msg})", 'write one {"text": ...} object per line') from e
        if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
            raise BadInput(f"{path} line {i} has no string field 'text'", 'write one {"text": ...} object per line')
        docs.append(obj["text"])
    return docs


def text_documents(path: Union[str, Path]) -> list[str]:
    """Documents of a text source: ``.jsonl`` lines, a folder's ``.txt`` files, or a text
    file's blank-line separated paragraphs (empty documents dropped)."""
    p = Path(path)
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() == ".txt")
        if not files:
            raise BadInput(f"{p} holds no .txt files", "give a folder of .txt files, a text file or a .jsonl file")
        docs = [_read_text(f) for f in files]
    elif p.is_file():
        if p.suffix.lower() == ".jsonl":
            docs = _jsonl_documents(p)
        else:
            text = _read_text(p)
            docs = [d for d in (x.strip() for x in text.replace("\r\n", "\n").split("\n\n")) if d]
    else:
        raise BadInput(f"no such file or folder: {p}", "give a text file, a .jsonl file or a folder of .txt files")
    return [d for d in docs if d.strip()]


def split_documents(docs: Sequence[str], split: str) -> list[str]:
    """Alternate documents into calib (even positions) / heldout (odd positions); a single
    document is cut in two halves by characters."""
    _check_split(split)
    docs = list(docs)
    if len(docs) == 1:
        d = docs[0]
        half = len(d) // 2
        return [d[:half]] if split == "calib" else [d[half:]]
    start = 0 if split == "calib" else 1
    return docs[start::2]


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise BadInput(f"unknown split '{split}'", f"use one of {', '.join(SPLITS)}")


@contextlib.contextmanager
def _quiet_tokenizer() -> Iterator[None]:
    """Silence transformers' 'sequence longer than the model maximum' warning: documents are
    tokenised whole and cut into rows of seq_len afterwards."""
    tl = logging.getLogger("transformers")
    old = tl.level
    tl.setLevel(logging.ERROR)
    try:
        yield
    finally:
        tl.setLevel(old)


def _pick_rows(n_rows: int, samples: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(int(seed))
    return sorted(int(i) for i in torch.randperm(n_rows, generator=g)[:samples])


def _fingerprint(split: str, t: torch.Tensor) -> str:
    h = hashlib.blake2b(digest_size=16)
    h.update(split.encode())
    h.update(str(tuple(t.shape)).encode())
    h.update(str(t.dtype).encode())
    h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()


# --------------------------------------------------------------------------- public API

def calibration_tokens(path: Optional[Union[str, Path]], lm: LoadedModel, split: str, *,
                       texts: Optional[Sequence[str]] = None) -> tuple[list[int], str, int]:
    """The token stream of ``split`` of a text source (documents tokenised and concatenated,
    EOS between them): ``(ids, source, documents)``. ``load_calibration`` cuts it into rows; the
    tolerance planner reads its validation rows from it too."""
    _check_split(split)
    if texts is not None:
        if isinstance(texts, str):
            texts = [texts]
        docs = [str(t) for t in texts if str(t).strip()]
        source = "texts"
    elif path is None:
        docs = builtin_documents()
        source = BUILTIN_SOURCE
    else:
        docs = text_documents(path)
        source = str(path)
    if not docs:
        raise BadInput(f"the calibration data ({source}) holds no text", "give a non-empty text source")
    part = split_documents(docs, split)
    with _quiet_tokenizer():
        ids: list[int] = []
        eos = getattr(lm.tokenizer, "eos_token_id", None)
        for d in part:
            ids.extend(lm.tokenizer(d, add_special_tokens=False)["input_ids"])
            if eos is not None:
                ids.append(int(eos))
    return ids, source, len(part)


def load_calibration(
    path: Optional[Union[str, Path]],
    lm: LoadedModel,
    samples: int,
    seq_len: int,
    split: str = "calib",
    *,
    seed: int = 0,
    texts: Optional[Sequence[str]] = None,
) -> CalibrationData:
    """Calibration rows for ``lm`` from ``path`` (None: the built-in corpus) or ``texts``.

    Text models get ``samples`` rows of ``seq_len`` tokens: ``inputs = (input_ids [S, N],
    attention_mask [S, N])``. Vision models get ``samples`` images: ``inputs = (pixel_values
    [S, 3, H, W],)`` (``seq_len`` is then fixed by the model and ignored). ``texts`` (a list of
    documents) replaces ``path``; the split alternation applies to it too.

    Raises BadInput for unreadable or empty data, fewer than ``samples × seq_len`` tokens in the
    split, ``seq_len`` beyond the model's maximum positions, or a vision model without images.
    """
    _check_split(split)
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise BadInput(f"samples={samples!r} is invalid", "use a positive number of calibration samples")
    if lm.kind == "vision" or (lm.kind == "module" and "image_size" in lm.config):
        if texts is not None:
            raise BadInput(f"{lm.name} is a vision model; text calibration data does not apply",
                           "give a folder of images with --data")
        return _load_images(path, lm, samples, split, seed)
    if not lm.is_text:
        raise BadInput(f"{lm.name} ({lm.kind}) has no tokenizer or image processor to read calibration data",
                       "profile a text or vision model")
    if lm.tokenizer is None:
        raise BadInput(f"{lm.name} has no tokenizer", "give a model folder that includes its tokenizer")
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < MIN_SEQ_LEN:
        raise BadInput(f"seq_len={seq_len!r} is too short", f"use at least {MIN_SEQ_LEN} tokens")
    if lm.max_positions and seq_len > lm.max_positions:
        raise BadInput(f"seq_len={seq_len} is beyond {lm.name}'s {lm.max_positions} positions",
                       f"use --seq-len {lm.max_positions} or less")
    ids, source, ndocs = calibration_tokens(path, lm, split, texts=texts)
    need = samples * seq_len
    if len(ids) < need:
        raise BadInput(f"the {split} split of {source} has {len(ids)} tokens but {samples} samples × {seq_len} "
                       f"tokens need {need}", "give more text, or lower --samples / --seq-len")
    n_rows = len(ids) // seq_len
    rows = torch.tensor(ids[: n_rows * seq_len], dtype=torch.long).view(n_rows, seq_len)
    pick = _pick_rows(n_rows, samples, seed)
    input_ids = rows[pick].contiguous()
    mask = torch.ones_like(input_ids)
    return CalibrationData(inputs=(input_ids, mask), source=source, split=split,
                           fingerprint=_fingerprint(split, input_ids), seq_len=seq_len, tokens_available=len(ids),
                           documents=ndocs, rows_available=n_rows, row_indices=pick)


def load_eval_rows(path: Union[str, Path], lm: LoadedModel, seq_len: int) -> CalibrationData:
    """Every token of the text at ``path`` (all documents, EOS between them) as rows of ``seq_len``
    tokens; the last row is right-padded (attention_mask 0 on the padding), so nothing of the file is
    left out. For `surgeon eval --data FILE` (the held-out split is for the built-in corpus)."""
    if not lm.is_text or lm.tokenizer is None:
        raise BadInput(f"{lm.name} ({lm.kind}) has no tokenizer to read {path}", "evaluate a text model")
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < MIN_SEQ_LEN:
        raise BadInput(f"seq_len={seq_len!r} is too short", f"use at least {MIN_SEQ_LEN} tokens")
    if lm.max_positions and seq_len > lm.max_positions:
        raise BadInput(f"seq_len={seq_len} is beyond {lm.name}'s {lm.max_positions} positions",
                       f"use --seq-len {lm.max_positions} or less")
    docs = text_documents(path)
    if not docs:
        raise BadInput(f"{path} holds no text", "give a non-empty text source")
    with _quiet_tokenizer():
        ids: list[int] = []
        eos = getattr(lm.tokenizer, "eos_token_id", None)
        for d in docs:
            ids.extend(lm.tokenizer(d, add_special_tokens=False)["input_ids"])
            if eos is not None:
                ids.append(int(eos))
        if eos is not None and len(ids) > 1:
            ids.pop()  # no EOS after the last document
    if len(ids) < 2:
        raise BadInput(f"{path} has {len(ids)} token(s)", "give at least two tokens of text")
    n_rows = -(-len(ids) // seq_len)
    pad = int(getattr(lm.tokenizer, "pad_token_id", None) or eos or 0)
    flat = torch.full((n_rows * seq_len,), pad, dtype=torch.long)
    flat[: len(ids)] = torch.tensor(ids, dtype=torch.long)
    mask = torch.zeros(n_rows * seq_len, dtype=torch.long)
    mask[: len(ids)] = 1
    input_ids, mask = flat.view(n_rows, seq_len), mask.view(n_rows, seq_len)
    return CalibrationData(inputs=(input_ids, mask), source=str(path), split="all",
                           fingerprint=_fingerprint("all", input_ids), seq_len=seq_len, tokens_available=len(ids),
                           documents=len(docs), rows_available=n_rows, row_indices=list(range(n_rows)))


def _image_processor(lm: LoadedModel) -> Any:
    if lm.processor is not None:
        return lm.processor
    try:
        from transformers import ViTImageProcessor
        import PIL  # noqa: F401  (the processor needs Pillow)
    except Exception as e:
        raise BadInput("reading calibration images needs transformers' image processors and Pillow",
                       "pip install pillow") from e
    size = int(lm.config.get("image_size", 224))
    return ViTImageProcessor(size={"height": size, "width": size})


def _load_images(path: Optional[Union[str, Path]], lm: LoadedModel, samples: int, split: str,
                 seed: int) -> CalibrationData:
    if path is None:
        raise BadInput(f"{lm.name} is a vision model and there is no built-in image corpus",
                       "give a folder of calibration images with --data")
    p = Path(path)
    if not p.is_dir():
        raise BadInput(f"{p} is not a folder of images", "give a folder of .png/.jpg images for a vision model")
    files = sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
    part = files[(0 if split == "calib" else 1)::2]
    if len(part) < samples:
        raise BadInput(f"the {split} split of {p} has {len(part)} images (of {len(files)}) but {samples} samples "
                       f"are needed", f"add images (calib and heldout alternate, so give about {2 * samples}) "
                       "or lower --samples")
    proc = _image_processor(lm)
    from PIL import Image

    pick = _pick_rows(len(part), samples, seed)
    imgs = []
    for i in pick:
        f = part[i]
        try:
            with Image.open(f) as im:
                imgs.append(im.convert("RGB"))
        except Exception as e:
            raise BadInput(f"{f} could not be read as an image ({type(e).__name__})", "remove or replace the file") from e
    try:
        pixels = proc(images=imgs, return_tensors="pt")["pixel_values"].to(torch.float32)
    except Exception as e:
        raise BadInput(f"the image processor failed on {p} ({type(e).__name__}: {str(e)[:100]})",
                       "give ordinary RGB images") from e
    tokens = int(lm.max_positions or 0)
    return CalibrationData(inputs=(pixels.contiguous(),), source=str(p), split=split,
                           fingerprint=_fingerprint(split, pixels), seq_len=tokens,
                           tokens_available=tokens * len(part), documents=len(part), rows_available=len(part),
                           row_indices=pick)


__all__ = ["BUILTIN_SOURCE", "CalibrationData", "builtin_documents", "load_calibration", "split_documents",
           "text_documents"]
