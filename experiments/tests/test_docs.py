"""docs/: every table the results pages quote is a file the experiments wrote, every number in
their prose is in one of those files, and every page and picture they link exists."""

import re
from xml.etree import ElementTree

from experiments.tests.helpers import DOCS, REPO

README = REPO / "README.md"
# The files the evidence commands wrote, copied into docs/ (docs/results.md lists the commands).
GENERATED = (
    "compare.md", "compare_threads2.md", "sweep.md", "seeds.md", "head_to_head.md", "ablation.md",
    "control.md", "bound.md", "bench.md",
)
# The paper's own numbers that are not percentages: the accuracies of its Table 4, quoted in
# docs/paper.md's control section and docs/results.md
PAPER_NUMBERS = {"0.46", "0.03", "0.04", "0.73"}


def results_texts() -> dict[str, str]:
    """The README's results section and the docs pages that quote the evidence."""
    text = README.read_text()
    start = text.index("\n## Results at a glance")
    return {
        "README.md": text[start : text.index("\n## ", start + 1)],
        "docs/results.md": (DOCS / "results.md").read_text(),
        "docs/paper.md": (DOCS / "paper.md").read_text(),
    }


def test_results_numbers_come_from_the_generated_files():
    """Every table quoted in the results is (a block of) a file its commands wrote, verbatim, and
    every decimal number in the prose around them occurs in one of those files: no number typed
    by hand."""
    generated = {name: (DOCS / name).read_text() for name in GENERATED}
    every_number = " ".join(generated.values())
    blocks = [block.strip() for table in generated.values() for block in table.split("\n\n")]
    for name, text in results_texts().items():
        tables = re.findall(r"(?:^\|.*\|\n)+", text, flags=re.M)
        prose = text
        for table in tables:
            assert any(table.strip() in block for block in blocks), (name, table[:80])
            prose = prose.replace(table, "")
        # the paper's own numbers are quoted as percentages, the project's never are; section
        # numbers are not data
        for number in re.findall(r"(?<![\w.])(?<!Sec\. )\d+\.\d+(?![\d%])", prose):
            assert number in every_number or number in PAPER_NUMBERS, (
                f"{number} in {name}'s prose is in no generated file"
            )
    for name in ("compare.md", "compare_threads2.md"):
        assert (DOCS / "results.md").read_text().count(generated[name].strip()) == 1, name


def test_every_picture_and_page_the_docs_link_exists_and_every_svg_parses():
    for page in sorted(DOCS.glob("*.md")):
        for target in re.findall(r"\]\(([\w./-]+\.(?:svg|md))\)", page.read_text()):
            assert (page.parent / target).exists(), (page.name, target)
    for svg in DOCS.glob("*.svg"):
        assert ElementTree.parse(svg).getroot().tag.endswith("svg"), svg.name
