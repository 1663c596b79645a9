"""The user documentation stays true: the configuration reference is the recipe's own help texts, the README stays
short, and every relative link in README.md, README.zh.md and docs/ leads to a file (and heading) that exists."""

from __future__ import annotations

import re

import pytest

from conftest import ROOT
from dist_dpo import config_reference

PAGES = sorted([ROOT / "README.md", ROOT / "README.zh.md", *(ROOT / "docs").glob("*.md")])
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.S | re.M)


def test_configuration_reference_is_generated_from_the_recipe():
    page = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
    assert page == config_reference.markdown(), \
        "regenerate with: python -m dist_dpo.config_reference > docs/configuration.md"


def test_every_recipe_key_is_in_the_configuration_reference():
    page = config_reference.markdown()
    from dist_dpo.config import KEYS

    assert all(f"| `{key}` |" in page for key in KEYS)


def test_readme_stays_short():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").count("\n")
    assert lines <= 160, f"README.md has {lines} lines: move depth to docs/"


def _anchors(page) -> set[str]:
    """GitHub's heading ids: lower case, punctuation dropped, spaces to hyphens."""
    text = FENCE.sub("", page.read_text(encoding="utf-8"))
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
            for h in re.findall(r"^#{1,6} (.+)$", text, re.M)}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_lead_somewhere(page):
    text = FENCE.sub("", page.read_text(encoding="utf-8"))
    broken = []
    for target in LINK.findall(text):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(target)
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            broken.append(f"{target} (no such heading)")
    assert not broken, f"{page.relative_to(ROOT)}: {broken}"


def test_benchmarks_readme_lists_the_ab_switches_as_the_module_has_them():
    from dist_dpo import ab_switches

    text = (ROOT / "benchmarks" / "README.md").read_text(encoding="utf-8")
    block = text.split("<!-- ab-switches:begin -->\n", 1)[1].split("\n<!-- ab-switches:end -->", 1)[0]
    assert block == ab_switches.markdown()
