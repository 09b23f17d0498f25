"""Code fingerprints: a command's hash covers the source it runs, and only that."""

from __future__ import annotations

import pytest

from evspec.fingerprint import SOURCE, _cli_source, command_files


def _names(command: str) -> set[str]:
    return {str(path.relative_to(SOURCE)) for path in command_files(command)}


def test_a_command_runs_its_handlers_imports_closed_over_function_level_imports():
    summary, speculate, report = _names("spec-summary"), _names("speculate"), _names("report")
    assert {"speculative/summary.py", "speculative/cost.py", "errors.py", "__init__.py"} <= summary
    assert not any(name.startswith(("engine/", "models/")) for name in summary)  # the summary runs no model
    # speculate -> run -> methods -> engine.head -> adapter.modules; templates only where a module reads them
    assert {"speculative/run.py", "engine/head.py", "engine/matvec.py", "adapter/modules.py", "timing.py"} <= speculate
    assert "speculative/summary.py" not in speculate and not any(name.endswith(".j2") for name in speculate)
    assert {"report/render.py", "report/templates/index.md.j2"} <= report


def test_the_cli_module_counts_only_the_commands_own_handler_and_arguments():
    summary = _cli_source("spec-summary")
    assert '"spec-summary"' in summary and "def _spec_summary" in summary and "def main" in summary
    assert '"speculate"' not in summary and "def _speculate" not in summary and "--adapter-dir" not in summary


def test_an_unknown_command_is_an_error():
    with pytest.raises(ValueError, match="no handler _no_such"):
        command_files("no-such")
