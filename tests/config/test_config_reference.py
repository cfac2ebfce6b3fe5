"""docs/config.md is the generated reference of every config key, complete and current.

``scripts/config_reference.py`` writes it from the dataclasses of ``fedunlearn/config/tree.py``;
after changing the config tree, run ``.venv/bin/python scripts/config_reference.py``.
"""

from __future__ import annotations

import dataclasses
import doctest
import importlib.util
import sys
import typing
from pathlib import Path

from fedunlearn.config.tree import Config

ROOT = Path(__file__).resolve().parents[2]
PAGE = ROOT / "docs" / "config.md"


def _script():
    if "config_reference" in sys.modules:
        return sys.modules["config_reference"]
    spec = importlib.util.spec_from_file_location("config_reference",
                                                  ROOT / "scripts" / "config_reference.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["config_reference"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_page_is_exactly_what_the_script_writes_now():
    script = _script()
    expected = script.render(script.collect())
    assert PAGE.read_text(encoding="utf-8") == expected, (
        "docs/config.md is not current: run .venv/bin/python scripts/config_reference.py")


def test_every_field_of_every_section_has_its_row():
    page = PAGE.read_text(encoding="utf-8")
    rows = {line.split("|")[1].strip().strip("`") for line in page.splitlines()
            if line.startswith("| `")}
    hints = typing.get_type_hints(Config)
    expected = {f"{section.name}.{f.name}"
                for section in dataclasses.fields(Config)
                for f in dataclasses.fields(hints[section.name])}
    assert len(expected) > 50
    assert expected == rows
    for section in dataclasses.fields(Config):
        assert f"## `[{section.name}]`" in page


def test_defaults_shown_are_the_dataclass_defaults():
    script = _script()
    cfg = Config()
    for section in script.collect():
        for key in section.keys:
            assert key.default == script.toml_value(getattr(getattr(cfg, section.name),
                                                            key.name))


def test_undocumented_fields_are_marked_and_reported():
    script = _script()
    sections = script.collect()
    missing = {f"{s.name}.{k.name}" for s in sections for k in s.keys if not k.doc}
    page = script.render(sections)
    reported = script.problems(sections)
    assert len(reported) == len(missing) + sum(len(s.stale) for s in sections)
    for key in missing:
        row = next(line for line in page.splitlines() if line.startswith(f"| `{key}`"))
        assert "**UNDOCUMENTED**" in row
        assert any(key in line for line in reported)


def test_docstring_parser():
    failed, attempted = doctest.testmod(_script())
    assert attempted and not failed
