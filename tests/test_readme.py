"""The README: its snippet run as written, its reading path, its order and size, and every\nnumber, picture and command it and docs/ show."""

import copy
import re
import shlex
from xml.etree import ElementTree

import pytest
import torch

import fpo
from config import PreferenceConfig, build_parser
from conftest import DOCS, README, readme_snippet, run_script
from model import GPT, GPTConfig
from sae import train_sae


def test_readme_snippet_runs_and_matches_an_online_reference():
    torch.manual_seed(0)
    policy = GPT(GPTConfig(vocab_size=40, block_size=16, n_layer=2, n_head=2, n_embd=16))
    reference = copy.deepcopy(policy).eval().requires_grad_(False)
    gen = torch.Generator().manual_seed(0)
    activations = torch.randn(2048, 16, generator=gen)
    sae = train_sae(activations, d_sae=32, k=4, steps=20, batch_size=256, log_every=1000)
    input_ids = torch.randint(0, 40, (6, 12), generator=gen)
    response_mask = torch.zeros(6, 12, dtype=torch.bool)
    response_mask[:, 5:] = True
    response_mask[2, 9:] = False  # a shorter response, padded
    scope = {
        "torch": torch,
        "lm": lambda ids: policy(ids, hidden_layer=-1),
        "reference_lm": lambda ids: reference(ids, hidden_layer=-1),
        "sae": sae,
        "input_ids": input_ids,
        "response_mask": response_mask,
        "row_ids": torch.arange(6),
    }
    exec(readme_snippet(), scope)
    losses, drift = scope["losses"], scope["drift"]
    assert losses.shape == (3,) and torch.isfinite(losses).all()
    assert all(p.grad is not None for p in policy.parameters() if p.requires_grad)
    assert torch.all(drift.abs() < 1e-10)  # the policy still equals the reference
    # the cached reference terms are those of an online reference pass
    logits, hidden = reference(input_ids, hidden_layer=-1)
    sum_logps, n_tokens = fpo.sequence_logps(logits, input_ids, response_mask)
    torch.testing.assert_close(scope["cache"]["sum_logps"], sum_logps, atol=1e-5, rtol=0)
    torch.testing.assert_close(scope["cache"]["avg_logps"], sum_logps / n_tokens, atol=1e-5, rtol=0)
    assert drift.dtype == torch.float32 and scope["reference_pooled"].device == input_ids.device
    online_pooled = fpo.pooled_features(sae.encode(hidden), response_mask)
    torch.testing.assert_close(scope["reference_pooled"], online_pooled, atol=1e-5, rtol=0)


def test_the_reading_path_line_ranges_hold_what_it_names():
    """Each `FILE` lines A-B item of the README's reading path defines, within those lines, every
    function it names."""
    text = README.read_text()
    path = text[text.index("## Reading path") : text.index("## The files")]
    items = re.findall(r"`(\w+\.py)` lines (\d+)-(\d+):(.*?)(?=\n\d\.|\Z)", path, flags=re.S)
    assert len(items) == 2, items
    for file, first, last, described in items:
        all_lines = (README.parent / file).read_text().splitlines()
        lines = all_lines[int(first) - 1 : int(last)]
        names = re.findall(r"`(\w+)`", described)
        assert names, described
        for name in names:
            assert any(line.startswith(f"def {name}(") for line in lines), (file, name)
        # the range is tight: it starts at a section or definition and ends where one ends
        assert lines[0] and not lines[0].startswith((" ", ")")), (file, first, lines[0])
        assert not all_lines[int(last)].startswith(" "), (file, last, "cuts a definition")
        assert not lines[-1].startswith("    ") or all_lines[int(last)] == "", (file, last)


README_SECTIONS = [
    "## Quickstart",
    "## Reading path",
    "## The files",
    "## The equations in the code",
    "## Use the loss in your own code",
    "## Take FPO to a real model",
    "## The pipeline",
    "## The toy world",
    "## Results at a glance",
    "## Tests",
    "## When things go wrong",
]


def test_the_readme_is_the_learners_page_in_order_and_short():
    text = README.read_text()
    assert len(text.splitlines()) <= 250
    assert len(text.split()) <= 2800
    headings = [line for line in text.splitlines() if line.startswith("## ")]
    assert headings == README_SECTIONS
    snippet = readme_snippet()
    assert "beta=2.0" in snippet and "alpha=16.0" in snippet and "k=32" in snippet
    defaults = PreferenceConfig()
    assert (defaults.beta, defaults.alpha, defaults.fpo_k) == (2.0, 16.0, 32)


# The files the evidence commands wrote, copied into docs/ (docs/results.md lists the commands).
GENERATED = (
    "compare.md", "compare_threads1.md", "sweep.md", "seeds.md", "head_to_head.md", "ablation.md",
    "control.md", "bound.md", "bench.md",
)


def results_texts() -> dict[str, str]:
    """The README's results section and docs/results.md: the places that quote the evidence."""
    text = README.read_text()
    start = text.index("\n## Results at a glance")
    readme_results = text[start : text.index("\n## ", start + 1)]
    return {
        "README.md": readme_results,
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
        assert tables, name
        prose = text
        for table in tables:
            assert any(table.strip() in block for block in blocks), (name, table[:80])
            prose = prose.replace(table, "")
        # the paper's own numbers are quoted as percentages, the project's never are; section
        # numbers are not data
        for number in re.findall(r"(?<![\w.])(?<!Sec\. )\d+\.\d+(?![\d%])", prose):
            assert number in every_number, f"{number} in {name}'s prose is in no generated file"
    for name in ("compare.md", "compare_threads1.md"):
        assert (DOCS / "results.md").read_text().count(generated[name].strip()) == 1, name


def test_every_picture_and_page_the_docs_link_exists_and_every_svg_parses():
    pages = [README] + sorted(DOCS.glob("*.md"))
    for page in pages:
        for target in re.findall(r"\]\(([\w./-]+\.(?:svg|md))\)", page.read_text()):
            assert (page.parent / target).exists(), (page.name, target)
    for svg in DOCS.glob("*.svg"):
        assert ElementTree.parse(svg).getroot().tag.endswith("svg"), svg.name


def documented_commands() -> list[list[str]]:
    """Every `python X.py ...` line of the README's and docs/' bash blocks, as argv lists, with
    shell variables and comments removed."""
    commands = []
    for page in [README] + sorted(DOCS.glob("*.md")):
        for block in re.findall(r"```bash\n(.*?)```", page.read_text(), flags=re.S):
            for line in block.replace("\\\n", " ").splitlines():
                for command in re.findall(r"python ([\w/]+\.py(?: [^;#>|]*)?)", line):
                    commands.append(shlex.split(re.sub(r"\$\S+", "1", command)))
    return commands


def test_every_documented_command_names_a_script_and_flags_that_exist():
    """Each command's flags parse with the pipeline's own parser (a renamed flag fails here;
    shell variables stand in as 1, so only names and types are checked)."""
    commands = documented_commands()
    scripts = {command[0] for command in commands}
    assert {"train.py", "experiments.py", "evaluate.py"} <= scripts, scripts
    for script, *args in commands:
        assert (README.parent / script).exists(), script
        if script in ("train.py", "experiments.py"):
            build_parser("").parse_args(args)


@pytest.mark.slow
def test_the_scripts_answer_help_and_evaluate_tabulates_a_finished_run(tiny_run):
    out_dir, _ = tiny_run
    for script in ("train.py", "experiments.py", "evaluate.py"):
        done = run_script(script, "--help")
        assert done.returncode == 0 and "usage" in done.stdout.lower(), (script, done.stderr)
    done = run_script("evaluate.py", str(out_dir))
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("| run | seed | threads |") and out_dir.name in done.stdout
