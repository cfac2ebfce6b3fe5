"""Write docs/config.md, the reference of every config key, from the typed config tree.

    .venv/bin/python scripts/config_reference.py            # (re)write docs/config.md
    .venv/bin/python scripts/config_reference.py --check    # exit 1 if docs/config.md is stale
    .venv/bin/python scripts/config_reference.py --stdout   # print it instead

The source of truth is ``fedunlearn/config/tree.py``: one frozen dataclass per TOML section
(the fields of :class:`~fedunlearn.config.tree.Config`), each documented in the ``Attributes``
block of its class docstring (numpydoc: ``name : type`` then the indented meaning). Section,
key, type and default come from the dataclass itself; the meaning from that block.

A field with no entry in its section's ``Attributes`` block (or an entry that says nothing but
its default) is reported on stderr as UNDOCUMENTED, marked so in the page, and makes the script
exit with status 1 after writing; so does an entry that names no field. ``tests/config/
test_config_reference.py`` checks that docs/config.md is exactly what this script writes.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import math
import re
import sys
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fedunlearn.config.tree import type_name

ROOT = Path(__file__).resolve().parent.parent
TARGET = ROOT / "docs" / "config.md"
TREE = "fedunlearn/config/tree.py"

_ENTRY = re.compile(r"^(\w+)\s*:\s*(.*)$")
_DEFAULT_ONLY = re.compile(r"^\(?\s*defaults?\b[^)]*\)?\.?$", re.IGNORECASE)


@dataclasses.dataclass(frozen=True)
class Key:
    """One config key as the page shows it."""

    section: str
    name: str
    type: str
    default: str
    doc: str  # empty when undocumented


@dataclasses.dataclass(frozen=True)
class Section:
    """One TOML table: its dataclass, its summary and its keys."""

    name: str
    cls: type
    summary: str
    keys: tuple[Key, ...]
    stale: tuple[str, ...]  # documented names that are not fields


def toml_value(value: Any) -> str:
    """A default written as TOML: ``"digits"``, ``true``, ``[0, 1]``, ``{}``, ``inf``."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, float):
        return ("inf" if value > 0 else "-inf") if math.isinf(value) else repr(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + "}"
    return repr(value)


def default_of(f: dataclasses.Field) -> Any:
    """The field's default value (calling its factory)."""
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    raise ValueError(f"field {f.name!r} has no default; every config key must have one")


def parse_docstring(doc: str) -> tuple[str, dict[str, str]]:
    """Split a numpydoc class docstring into its summary and its ``Attributes`` entries
    (name -> meaning, lines joined with single spaces).

    >>> parse_docstring('''``[x]``: a section.
    ...
    ... Attributes
    ... ----------
    ... a : int
    ...     The a (default 1).
    ...     More.
    ... b : str
    ... ''')
    ('``[x]``: a section.', {'a': 'The a (default 1). More.', 'b': ''})
    """
    lines = inspect.cleandoc(doc or "").splitlines()
    for i, line in enumerate(lines):
        if line.strip() == "Attributes" and i + 1 < len(lines) and set(lines[i + 1].strip()) == {"-"}:
            head, body = lines[:i], lines[i + 2:]
            break
    else:
        head, body = lines, []
    summary = " ".join(" ".join(head).split())
    entries: dict[str, list[str]] = {}
    current: str | None = None
    for line in body:
        if not line.strip():
            continue
        match = _ENTRY.match(line) if not line.startswith((" ", "\t")) else None
        if match:
            current = match.group(1)
            entries[current] = []
        elif current is not None:
            entries[current].append(line.strip())
    return summary, {name: " ".join(parts) for name, parts in entries.items()}


def collect() -> list[Section]:
    """Every section of :class:`fedunlearn.config.tree.Config`, in the tree's order."""
    from fedunlearn.config.tree import Config

    hints = typing.get_type_hints(Config)
    sections = []
    for top in dataclasses.fields(Config):
        cls = hints[top.name]
        summary, entries = parse_docstring(cls.__doc__ or "")
        field_hints = typing.get_type_hints(cls)
        keys = []
        for f in dataclasses.fields(cls):
            doc = entries.get(f.name, "")
            if _DEFAULT_ONLY.match(doc.strip()):
                doc = ""
            keys.append(Key(top.name, f.name, type_name(field_hints[f.name]),
                            toml_value(default_of(f)), doc))
        fields = {f.name for f in dataclasses.fields(cls)}
        stale = tuple(name for name in entries if name not in fields)
        sections.append(Section(top.name, cls, summary, tuple(keys), stale))
    return sections


def problems(sections: list[Section]) -> list[str]:
    """One line per undocumented field and per documented name that is not a field."""
    out = []
    for s in sections:
        for k in s.keys:
            if not k.doc:
                out.append(f"UNDOCUMENTED: {s.name}.{k.name} has no entry (or only its default) "
                           f"in the Attributes block of {s.cls.__name__} in {TREE}")
        for name in s.stale:
            out.append(f"STALE: {s.cls.__name__}'s Attributes block in {TREE} documents "
                       f"'{name}', which is not a field of [{s.name}]")
    return out


def markdown(text: str) -> str:
    """reST inline markup as Markdown: double backquotes become single ones, roles are dropped.

    >>> markdown(":mod:`~fedunlearn.engine.faults`, ``inf``")
    '`fedunlearn.engine.faults`, `inf`'
    """
    text = re.sub(r":\w+:`~?([^`]+)`", r"`\1`", text)
    return text.replace("``", "`")


def _cell(text: str) -> str:
    return markdown(text).replace("|", "\\|")


def render(sections: list[Section]) -> str:
    """The whole page."""
    out = [
        "# Configuration reference",
        "",
        "<!-- Generated by scripts/config_reference.py from fedunlearn/config/tree.py; do not",
        "     edit by hand: run `.venv/bin/python scripts/config_reference.py` after changing",
        "     the config tree. tests/config/test_config_reference.py checks it is current. -->",
        "",
        "One TOML file per experiment (`simulations/*.toml`); every key is optional and takes the",
        "default below. `--set section.key=value` overrides any key from the command line, nested",
        "tables too (`--set unlearning.params.federaser.r=1`); the value is read as TOML (`5`,",
        "`0.1`, `\"iid\"`, `[0, 3]`, `{mu = 0.01}`). An unknown section or key, a value of the",
        "wrong type or an impossible value stops the run before any work with one line naming the",
        "key. The keys of type `table` (`data.source_params`, `model.params`,",
        "`training.step_params`, `training.strategy_params`, `unlearning.params.<method>`) are",
        "passed to the registered source, model, train step, strategy or method, which checks them",
        "([algorithms.md](algorithms.md) and the classes' docstrings document each method's",
        "parameters).",
        "",
        "Sections: " + ", ".join(f"[`[{s.name}]`](#{s.name})" for s in sections) + ".",
        "",
    ]
    for s in sections:
        out += [f"## `[{s.name}]`", "",
                markdown(s.summary) or f"**UNDOCUMENTED section** ({s.cls.__name__})",
                "", "| key | type | default | meaning |", "| --- | --- | --- | --- |"]
        for k in s.keys:
            doc = _cell(k.doc) if k.doc else (f"**UNDOCUMENTED** (no entry in "
                                               f"{s.cls.__name__}'s docstring)")
            out.append(f"| `{s.name}.{k.name}` | `{_cell(k.type)}` | `{_cell(k.default)}` "
                       f"| {doc} |")
        out.append("")
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true",
                      help="exit 1 if docs/config.md differs from what would be written")
    mode.add_argument("--stdout", action="store_true", help="print the page, write nothing")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    sections = collect()
    text = render(sections)
    issues = problems(sections)
    for line in issues:
        print(f"config_reference: {line}", file=sys.stderr)
    if args.stdout:
        sys.stdout.write(text)
    elif args.check:
        current = TARGET.read_text(encoding="utf-8") if TARGET.exists() else ""
        if current != text:
            print(f"config_reference: {TARGET.relative_to(ROOT)} is not current; run "
                  "scripts/config_reference.py", file=sys.stderr)
            return 1
    else:
        TARGET.write_text(text, encoding="utf-8")
        print(f"wrote {TARGET.relative_to(ROOT)}: "
              f"{sum(len(s.keys) for s in sections)} keys in {len(sections)} sections")
    if issues:
        print(f"config_reference: {len(issues)} problem(s) in {TREE} (above); the page marks "
              "them", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
