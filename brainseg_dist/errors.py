"""Errors that carry enough context for a user to fix their input."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


class BrainsegError(Exception):
    """Base class for errors reported to the user without a traceback."""


class ConfigError(BrainsegError):
    """A config file or override is invalid."""


@dataclass(frozen=True)
class DataProblem:
    """One problem found in a dataset: the file (or folder) and what is wrong."""

    path: Path
    problem: str

    def __str__(self) -> str:
        return f"{self.path}: {self.problem}"


class DatasetError(BrainsegError):
    """A dataset failed validation; holds every problem found, not only the first."""

    def __init__(self, problems: list[DataProblem], root: Path | None = None):
        self.problems = list(problems)
        self.root = root
        head = f"{len(self.problems)} problem(s) in dataset" + (f" {root}" if root else "")
        lines = [head + ":"] + [f"  - {p}" for p in self.problems]
        super().__init__("\n".join(lines))


class NonFiniteLossError(BrainsegError):
    """Training produced a NaN or infinite loss."""
