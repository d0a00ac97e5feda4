"""The references into the docs resolve.

* Every ``SPEC §N`` / ``docs/protocol.md §N`` citation in the source, the tests and the docs names
  a section that ``docs/protocol.md`` has (its headings are parsed), and a quoted title after it
  (``§3 "Totals"``) is the title of a subsection of that section.
* Every config key written in backticks in ``docs/coming_from_mib_plop.md`` (```train.lr```,
  ```method.weights.unkd=100```, ```seed=42```) is a field of :class:`ucdseg.config.RunConfig`.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from ucdseg.config import RunConfig

ROOT = Path(__file__).resolve().parents[1]
PROTOCOL = ROOT / "docs" / "protocol.md"
COMING_FROM = ROOT / "docs" / "coming_from_mib_plop.md"

HEADING = re.compile(r"^#{2,6}\s+(\d+(?:\.\d+)*)\.?\s+(.+?)\s*$")
# "SPEC §3", "docs/protocol.md §3.8", "SPEC §1, §5", "SPEC §3 "Totals"", "§3 'UCD contrastive distillation'"
CITING = re.compile(r"SPEC|protocol\.md")
SECTION = re.compile(r"§\s*(\d+(?:\.\d+)*)(?:\s+[\"'“]([^\"'”]+)[\"'”])?")
CONFIG_KEY = re.compile(r"`([^`\s]+)`")


def protocol_headings(text: str) -> dict[str, list[str]]:
    """Section number -> the titles of its heading and of every heading numbered under it."""
    headings: dict[str, list[str]] = {}
    for line in text.splitlines():
        match = HEADING.match(line)
        if not match:
            continue
        number, title = match.groups()
        parts = number.split(".")
        for depth in range(1, len(parts) + 1):
            headings.setdefault(".".join(parts[:depth]), []).append(title)
    return headings


def citations(text: str) -> list[tuple[int, str, str | None]]:
    """``(line number, section, quoted title or None)`` of every § reference on a citing line."""
    found = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not CITING.search(line):
            continue
        for match in SECTION.finditer(line):
            found.append((lineno, match.group(1), match.group(2)))
    return found


def cited_files() -> list[Path]:
    files = [*(ROOT / "src").rglob("*.py"), *(ROOT / "src").rglob("*.yaml"), *(ROOT / "tests").rglob("*.py"),
             *(ROOT / "docs").rglob("*.md"), ROOT / "README.md"]
    return sorted(f for f in files if f.resolve() not in (Path(__file__).resolve(), PROTOCOL.resolve()))


# ---------------------------------------------------------------------------- the parsers themselves
def test_headings_and_citations_are_parsed_as_intended():
    text = "# Title\n## 1. Intro\n### 1.2 Tasks and steps\n## 3. Losses\n### 3.9 Totals\nbody § 7\n"
    headings = protocol_headings(text)
    assert set(headings) == {"1", "1.2", "3", "3.9"}
    assert headings["3"] == ["Losses", "Totals"]
    line = 'x = 1  # SPEC §3 "Totals", see SPEC §1, §5 and docs/protocol.md §3.8; not §9 here'
    assert citations(line) == [(1, "3", "Totals"), (1, "1", None), (1, "5", None), (1, "3.8", None),
                               (1, "9", None)]
    assert citations("a § 4 on a line that cites nothing") == []


def test_a_missing_section_would_be_caught():
    headings = protocol_headings(PROTOCOL.read_text())
    assert "3" in headings and "42" not in headings
    assert not any("No such title" in title for title in headings["3"])


# ---------------------------------------------------------------------------- the repository
def test_protocol_keeps_the_specification_numbering():
    headings = protocol_headings(PROTOCOL.read_text())
    for number in ("1", "2", "3", "4", "5"):
        assert number in headings, f"docs/protocol.md has no section {number}"
    assert any("Totals" in t for t in headings["3"])
    assert any("UCD contrastive distillation" in t for t in headings["3"])


def test_every_section_citation_resolves():
    headings = protocol_headings(PROTOCOL.read_text())
    problems = []
    count = 0
    for path in cited_files():
        for lineno, number, title in citations(path.read_text(encoding="utf-8")):
            count += 1
            where = f"{path.relative_to(ROOT)}:{lineno}"
            if number not in headings:
                problems.append(f"{where} cites §{number}, which docs/protocol.md does not have")
            elif title is not None and not any(title.lower() in t.lower() for t in headings[number]):
                problems.append(f"{where} cites §{number} {title!r}, not a title under §{number} of docs/protocol.md")
    assert count > 0, "no citation found: the scan is broken"
    assert not problems, "\n".join(problems)


def config_fields(cls=RunConfig, prefix: str = "") -> set[str]:
    """Dotted names of every field of the config tree (``train.lr``, ``method.weights``, ``seed``)."""
    names = set()
    for f in dataclasses.fields(cls):
        name = prefix + f.name
        names.add(name)
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            names |= config_fields(type(default), name + ".")
    return names


SECTIONS = {f.name for f in dataclasses.fields(RunConfig)
            if f.default_factory is not dataclasses.MISSING and dataclasses.is_dataclass(f.default_factory())}


def documented_keys(text: str) -> set[str]:
    """Config keys in backticks: ``section.key`` or ``section.key=value``, and top-level ``key=value``."""
    keys = set()
    for span in CONFIG_KEY.findall(text):
        name = span.split("=", 1)[0]
        if name.split(".")[0] in SECTIONS and "." in name:
            keys.add(name)
        elif "=" in span and re.fullmatch(r"[a-z_]+", name):
            keys.add(name)
    return keys


def resolves(key: str, fields: set[str]) -> bool:
    """``method.weights.unkd`` resolves through the mapping ``method.weights``; ``data.*`` (every key
    of a section) through the section ``data``."""
    if key.endswith(".*"):
        return key[:-2] in SECTIONS
    if key.startswith("method.options."):  # a method's own option: some registered method has it
        from ucdseg.methods import list_methods

        return any(key[len("method.options."):] in m.all_options for m in list_methods())
    return key in fields or any(key.startswith(f + ".") for f in fields if f.endswith(".weights"))


def test_documented_key_parser():
    text = ("`train.lr=0.01`, `data.setting`, `seed=42`, `ucdseg eval`, `method.weights.unkd=100`, `x.y`, "
            "`--lr`, `eval.*`")
    assert documented_keys(text) == {"train.lr", "data.setting", "seed", "method.weights.unkd", "eval.*"}
    fields = config_fields()
    assert resolves("method.weights.unkd", fields) and resolves("eval.*", fields)
    assert not resolves("train.no_such_key", fields)
    assert resolves("method.options.temperature", fields) and not resolves("method.options.no_such_option", fields)
    assert not resolves("nosection.*", fields)
    assert not resolves("key", fields)


def test_coming_from_page_names_only_real_config_keys():
    fields = config_fields()
    keys = documented_keys(COMING_FROM.read_text())
    assert {"train.batch_size", "train.step0_from", "train.amp", "data.eval_crop_size", "data.setting"} <= keys
    missing = sorted(k for k in keys if not resolves(k, fields))
    assert not missing, f"docs/coming_from_mib_plop.md names config keys RunConfig does not have: {missing}"


@pytest.mark.parametrize("page", ["docs/protocol.md", "docs/coming_from_mib_plop.md"])
def test_readme_links_the_page(page):
    assert page in (ROOT / "README.md").read_text()
