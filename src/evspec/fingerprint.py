"""Fingerprints: what produced a cached result, so a changed input means a rerun, not stale reuse.

Three kinds, each a short hex digest:
- `command_code(command)`: the evspec source a `python -m evspec <command>` runs: its handler's
  imports and everything they import in turn (read from the source, not by importing it), with
  the templates beside them. The Snakefile passes it as each rule's `code` param (Snakemake does
  not see what a command imports), so editing a module reruns exactly the rules whose commands
  import it; the feature caches stamp it.
- `model_fingerprint(directory)`: a checkpoint's config and weights, hashed by content.
- `settings_digest(values)`: canonical JSON of any settings mapping.
"""

from __future__ import annotations

import ast
import hashlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

SOURCE = Path(__file__).resolve().parent
CHUNK_BYTES = 1 << 24
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt")


def _hash_files(files: Iterable[Path]) -> str:
    digest = hashlib.sha256()
    for file in sorted(set(files)):
        digest.update(str(file.relative_to(SOURCE)).encode())
        digest.update(file.read_bytes())
    return digest.hexdigest()[:16]


def command_code(command: str) -> str:
    """Hash of what `python -m evspec <command>` runs: `command_files` and its own part of the CLI module."""
    files = command_files(command) - {MAIN}
    return hashlib.sha256((_hash_files(files) + _cli_source(command)).encode()).hexdigest()[:16]


MAIN = SOURCE / "__main__.py"


def command_files(command: str) -> set[Path]:
    """The evspec files a command runs: `__main__.py`, its top-level imports and the imports inside the
    command's handler (`_<command with _ for ->`), closed over every import in those files (function-level
    ones too), each package's `__init__.py` on the way, and the `templates/` folder beside any of them."""
    tree = ast.parse(MAIN.read_text(), str(MAIN))
    handler = _handlers(tree).get(command)
    if handler is None:
        raise ValueError(f"{MAIN}: no handler _{command.replace('-', '_')} for the command {command!r}")
    top_level = [node for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom))]
    files, queue = {MAIN}, [*_imported_files(top_level), *_imported_files(ast.walk(handler))]
    while queue:
        file = queue.pop()
        if file not in files:
            files.add(file)
            queue += _imported_files(ast.walk(ast.parse(file.read_text(), str(file))))
    templates = {t for f in files if (f.parent / "templates").is_dir() for t in (f.parent / "templates").rglob("*.j2")}
    return files | templates


def _handlers(tree: ast.Module) -> dict[str, ast.FunctionDef]:
    return {node.name[1:].replace("_", "-"): node for node in tree.body
            if isinstance(node, ast.FunctionDef) and node.name.startswith("_")}  # fmt: skip


def _cli_source(command: str) -> str:
    """The lines of `__main__.py` a command depends on: all but the other commands' handlers and argument
    blocks (a block runs from its `commands.add_parser("name", ...)` to the next one), so editing one
    command's arguments reruns that command's rules only."""
    text = MAIN.read_text()
    tree = ast.parse(text, str(MAIN))
    owned: dict[str, list[tuple[int, int]]] = {}
    for name, handler in _handlers(tree).items():
        owned.setdefault(name, []).append((handler.lineno, handler.end_lineno))
    builder = next(node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == "build_parser")
    starts = [(statement.lineno, call.args[0].value) for statement in builder.body for call in ast.walk(statement)
              if isinstance(call, ast.Call) and getattr(call.func, "attr", "") == "add_parser"]  # fmt: skip
    ends = [line - 1 for line, _ in starts[1:]] + [builder.body[-1].lineno - 1]  # the last block ends before `return`
    for (start, name), end in zip(starts, ends):
        owned.setdefault(name, []).append((start, end))
    lines = text.splitlines()
    foreign = {line for name, spans in owned.items() if name != command for a, b in spans for line in range(a, b + 1)}
    return "\n".join(line for number, line in enumerate(lines, start=1) if number not in foreign)


def _imported_files(nodes: Iterable[ast.AST]) -> list[Path]:
    """The evspec source files the import statements among `nodes` load (packages' __init__.py included)."""
    names = []
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "evspec":
            names += [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
        elif isinstance(node, ast.Import):
            names += [alias.name for alias in node.names if alias.name.split(".")[0] == "evspec"]
    files = []
    for name in names:
        parts = name.split(".")[1:]
        for depth in range(len(parts) + 1):  # every package on the way, then the module itself
            base = SOURCE.joinpath(*parts[:depth])
            for candidate in (base / "__init__.py", base.with_suffix(".py")):
                if depth and candidate.is_file() or not depth and candidate == SOURCE / "__init__.py":
                    files.append(candidate)
    return files


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()[:16]


def model_fingerprint(directory: str | Path) -> str:
    """Content hash of a checkpoint directory's config.json and weight files (not its tokenizer)."""
    directory = Path(directory)
    digest = hashlib.sha256()
    for path in sorted(directory.iterdir()):
        if path.name == "config.json" or path.name.endswith(WEIGHT_SUFFIXES):
            digest.update(path.name.encode())
            digest.update(file_digest(path).encode())
    return digest.hexdigest()[:16]


def settings_digest(values: Any) -> str:
    return hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()[:16]
