"""What an integrity check of data at rest found: the one report type of ``headwater doctor``.

Each store checks itself where its format is defined (the lake in :mod:`processors.lake.integrity`,
the online store's :meth:`~serving.online_store.base.OnlineStore.check`, processor state in
:mod:`processors.state_store`) and returns a :class:`CheckReport`; the command only prints them.
Like :mod:`headwater.errors`, plain data any layer may import.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

__all__ = ["CheckReport", "Finding"]

Severity = Literal["error", "warning"]


@dataclass(frozen=True)
class Finding:
    """One problem: ``error`` means data is lost, changed or unreadable; ``warning``, something to
    look at that loses nothing (a file the lake did not record, a check that could not run)."""

    severity: Severity
    where: str  # a path, a key, a model version
    message: str


@dataclass
class CheckReport:
    """What one check read (``checked``, e.g. "1,204 files, 3.1 GiB") and what it found."""

    name: str
    checked: str = ""
    findings: list[Finding] = field(default_factory=list)
    advice: str = ""  # what to do when it found errors

    def error(self, where: str, message: str) -> None:
        self.findings.append(Finding("error", where, message))

    def warning(self, where: str, message: str) -> None:
        self.findings.append(Finding("warning", where, message))

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "error"]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "warning"]

    @property
    def ok(self) -> bool:
        return not self.errors
