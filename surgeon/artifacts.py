"""Versioned JSON artifacts: named fields, schema version, model (and data) fingerprint.

Writes are atomic (temporary file, then rename) and canonical (sorted keys, fixed float
formatting), so the same inputs give byte-identical files.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, ClassVar, Optional, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from surgeon.errors import ArtifactMismatch, BadInput

T = TypeVar("T", bound="Artifact")


class Artifact(BaseModel):
    """Base of every artifact. Subclasses set ``KIND`` and ``VERSION``."""

    model_config = ConfigDict(extra="forbid")
    KIND: ClassVar[str] = "artifact"
    VERSION: ClassVar[int] = 1

    kind: str
    schema_version: int
    model_fingerprint: str

    def to_json(self) -> str:
        return canonical_json(self.model_dump(mode="json"))

    def save(self, path: Path | str, *, force: bool = False) -> Path:
        return atomic_write_text(Path(path), self.to_json(), force=force, kind=self.KIND)

    @classmethod
    def load(cls: type[T], path: Path | str, *, model_fingerprint: Optional[str] = None) -> T:
        """Read and validate; with ``model_fingerprint`` also check the artifact's model."""
        path = Path(path)
        if path.is_dir():
            held = next((f"; it is a surgeon {k} folder" for f, k in (("rewrite.json", "rewrite"),
                         ("manifest.json", "export"), ("summary.json", "build")) if (path / f).is_file()), "")
            raise BadInput(f"{path} is a folder, not a {cls.KIND} file{held}",
                           f"give the path of a {cls.KIND} JSON file (e.g. one written by surgeon)")
        if not path.is_file():
            raise BadInput(f"no such file: {path}", f"give the path of a {cls.KIND} artifact")
        try:
            raw = json.loads(path.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise BadInput(f"{path} is not valid JSON ({e.__class__.__name__})", f"give a {cls.KIND} written by surgeon") from e
        return cls.from_raw(raw, str(path), model_fingerprint=model_fingerprint)

    @classmethod
    def from_raw(cls: type[T], raw: Any, where: str, *, model_fingerprint: Optional[str] = None) -> T:
        if not isinstance(raw, dict) or raw.get("kind") != cls.KIND:
            got = raw.get("kind") if isinstance(raw, dict) else type(raw).__name__
            raise ArtifactMismatch(f"{where} is a '{got}' document, not a '{cls.KIND}'", f"give a {cls.KIND} artifact")
        ver = raw.get("schema_version")
        if ver != cls.VERSION:
            raise ArtifactMismatch(f"{where} has schema_version {ver}; this surgeon reads version {cls.VERSION}",
                                   f"regenerate the {cls.KIND} with this version of surgeon")
        if model_fingerprint is not None and raw.get("model_fingerprint") != model_fingerprint:
            raise ArtifactMismatch(
                f"{where} was made for another model (fingerprint {str(raw.get('model_fingerprint'))[:12]}…, "
                f"this model is {model_fingerprint[:12]}…)",
                f"regenerate the {cls.KIND} for this model")
        try:
            return cls.model_validate(raw)
        except ValidationError as e:
            first = e.errors()[0]
            loc = ".".join(str(x) for x in first.get("loc", ()))
            field = f"field '{loc}': " if loc else ""
            raise ArtifactMismatch(f"{where} is not a valid {cls.KIND}: {field}{first.get('msg')}",
                                   f"regenerate the {cls.KIND} with surgeon") from e


def _round_floats(x: Any) -> Any:
    if isinstance(x, float):
        if x != x or x in (float("inf"), float("-inf")):
            return None
        return float(f"{x:.9g}")
    if isinstance(x, dict):
        return {k: _round_floats(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_round_floats(v) for v in x]
    return x


def canonical_json(obj: Any) -> str:
    """Sorted keys, floats to 9 significant digits, two-space indent, trailing newline."""
    return json.dumps(_round_floats(obj), sort_keys=True, indent=2, ensure_ascii=False) + "\n"


def atomic_write_text(path: Path, text: str, *, force: bool = False, kind: Optional[str] = None,
                      own: bool = False) -> Path:
    return atomic_write_bytes(path, text.encode(), force=force, kind=kind, own=own)


def atomic_write_bytes(path: Path, data: bytes, *, force: bool = False, kind: Optional[str] = None,
                       own: bool = False) -> Path:
    """Write ``data`` atomically (temporary file beside ``path``, then one rename; see
    :mod:`surgeon.outputs`). An existing ``path`` needs ``force`` and must be a surgeon output of
    the same kind as ``data`` (``kind``), unless ``own`` (the caller's own folder)."""
    from surgeon.outputs import write_file

    return write_file(Path(path), data, kind, force=force, own=own)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def check_writable_output(path: Path, force: bool, kind: Optional[str] = None, inputs=()) -> None:
    """Fail before any work if ``path`` may not be written (exists without ``force``, is not a
    previous output of ``kind``, is the current directory or an input, is not writable)."""
    from surgeon.outputs import check_target

    check_target(Path(path), kind or "file", force=force, inputs=inputs)
