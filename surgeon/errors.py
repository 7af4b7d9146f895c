"""Typed errors. The CLI maps each to a one-line message and a documented exit code.

Exit codes: 0 success, 1 a check failed (verification, fidelity), 2 bad input or usage.
"""
from __future__ import annotations


class SurgeonError(Exception):
    """Base class. ``exit_code`` is what the CLI returns; ``fix`` is the suggested remedy."""

    exit_code: int = 2

    def __init__(self, problem: str, fix: str | None = None) -> None:
        self.problem = problem
        self.fix = fix
        super().__init__(self.one_line())

    def one_line(self) -> str:
        msg = self.problem.rstrip(".")
        if self.fix:
            msg += f"; {self.fix.rstrip('.')}"
        return msg.replace("\n", " ")


class BadInput(SurgeonError):
    """The user gave something unusable (path, model, artifact, parameter). Exit 2."""

    exit_code = 2


class UnsupportedModel(BadInput):
    """The model loads but cannot be captured or has no attention. Exit 2."""


class ArtifactMismatch(BadInput):
    """An artifact was made for another model/data or has an unknown schema version. Exit 2."""


class CheckFailed(SurgeonError):
    """A verification or fidelity check failed. Exit 1."""

    exit_code = 1
