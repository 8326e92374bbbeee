"""The documentation: every command-line option is documented, every relative link resolves, the README stays short."""
import re

import pytest

import HUDD
import RQ2
from conftest import ROOT

README_MAX_LINES = 260
LINK = re.compile(r"\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^```.*?^```", re.S | re.M)


def doc_pages():
    return sorted((ROOT / "docs").glob("*.md"))


def linking_pages():
    pages = [ROOT / "README.md", ROOT / "CONTRIBUTING.md", *doc_pages(), *sorted((ROOT / "results").glob("*.md"))]
    return [p for p in pages if p.is_file()]


def option_strings(parser):
    return sorted({s for action in parser._actions for s in action.option_strings})


def undocumented(options, text):
    """The options that appear nowhere in `text` as a whole word (so `-m` is not found inside `-mode`)."""
    return [o for o in options if not re.search(rf"(?<![\w-]){re.escape(o)}(?![\w-])", text)]


def relative_links(text):
    """The link targets of a Markdown text that point into this repository, without their #fragment."""
    targets = []
    for target in LINK.findall(FENCE.sub("", text)):
        if re.match(r"^(https?:|mailto:|#)", target):
            continue
        targets.append(target.split("#", 1)[0])
    return targets


@pytest.mark.parametrize("parser", [HUDD.parser, RQ2.parser], ids=["HUDD.py", "RQ2.py"])
def test_every_option_is_documented(parser):
    docs = "\n".join(p.read_text(encoding="utf-8") for p in doc_pages())
    missing = undocumented(option_strings(parser()), docs)
    assert not missing, f"options in no docs/*.md page: {missing}; document them (docs/cli.md lists every flag)"


def test_an_undocumented_option_is_found():
    text = "use `-m MODEL`, `-mode HUDD` and --engine-x"
    assert undocumented(["-m", "-mode", "--engine", "-rq"], text) == ["--engine", "-rq"]


@pytest.mark.parametrize("page", linking_pages(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page):
    broken = [t for t in relative_links(page.read_text(encoding="utf-8")) if t and not (page.parent / t).exists()]
    assert not broken, f"{page.relative_to(ROOT)}: links to missing files {broken}"


def test_links_are_found_outside_code_only():
    text = "[a](docs/a.md#x) [b](https://x.org) [c](#top) ![d](img.png)\n```\n[e](not/a/link.md)\n```\n"
    assert relative_links(text) == ["docs/a.md", "img.png"]


def test_readme_is_short():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").count("\n")
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; move reference to docs/, measurements to results/"
