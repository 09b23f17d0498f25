"""Progress in a log file is one line per update, without the terminal bar's carriage returns."""

from __future__ import annotations

import io

from evspec import progress as progress_module
from evspec.progress import progress


def test_progress_in_a_log_file_is_plain_lines(monkeypatch):
    monkeypatch.setattr(progress_module, "LOG_INTERVAL_S", 0.0)  # every update a line
    log = io.StringIO()  # not a terminal, as a rule's log file
    for _ in progress(range(5), stream=log, desc="work", unit="step", miniters=1):
        pass
    text = log.getvalue()
    assert "\r" not in text and text.count("\n") >= 2
    assert "work" in text and "5/5" in text.splitlines()[-1]


def test_progress_on_a_terminal_keeps_tqdms_bar():
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    screen = Terminal()
    for _ in progress(range(3), stream=screen, desc="work", mininterval=0):
        pass
    assert "\r" in screen.getvalue()
