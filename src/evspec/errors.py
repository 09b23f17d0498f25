"""The one exception type for bad user input.

Users see it when a file, a window or a config value is wrong; its message always
names the file (or key) and the problem, so the fix is obvious without a traceback.
Internal invariants use `assert` instead.
"""

from __future__ import annotations

from pathlib import Path


class InputError(ValueError):
    """A user-supplied file or value is unusable: `source` says which, `problem` why."""

    def __init__(self, source: str | Path, problem: str) -> None:
        self.source = str(source)
        self.problem = problem
        super().__init__(f"{self.source}: {problem}")
