"""The README: its snippet run as pasted, its reading path, its order and size, FPO's defaults
against the sweep's pick, and the commands it and docs/ show."""

import copy
import json
import re
import shlex

import pytest
import torch

import fpo
from config import PreferenceConfig, build_parser
from conftest import DOCS, README, readme_snippet, run_script
from model import GPT, GPTConfig
from sae import train_sae


def test_readme_snippet_runs_as_pasted_and_matches_an_online_reference():
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
    scope = {  # what the snippet says you bring; it imports torch and fpo itself
        "lm": lambda ids: policy(ids, hidden_layer=-1),
        "reference_lm": lambda ids: reference(ids, hidden_layer=-1),
        "sae": sae,
        "input_ids": input_ids,
        "response_mask": response_mask,
        "row_ids": torch.arange(6),
    }
    exec(readme_snippet(), scope)
    losses, feature_mse = scope["losses"], scope["feature_mse"]
    assert losses.shape == (3,) and torch.isfinite(losses).all()
    assert all(p.grad is not None for p in policy.parameters() if p.requires_grad)
    assert torch.all(feature_mse.abs() < 1e-10)  # the policy still equals the reference
    # the cached reference terms are those of an online reference pass
    logits, hidden = reference(input_ids, hidden_layer=-1)
    sum_logps, n_tokens = fpo.sequence_logps(logits, input_ids, response_mask)
    torch.testing.assert_close(scope["cache"]["sum_logps"], sum_logps, atol=1e-5, rtol=0)
    torch.testing.assert_close(scope["cache"]["avg_logps"], sum_logps / n_tokens, atol=1e-5, rtol=0)
    assert feature_mse.dtype == torch.float32
    assert scope["reference_pooled"].device == input_ids.device
    online_pooled = fpo.pooled_features(sae.encode(hidden), response_mask)
    torch.testing.assert_close(scope["reference_pooled"], online_pooled, atol=1e-5, rtol=0)


def test_the_reading_path_line_ranges_hold_what_it_names_and_state_their_length():
    """Each `FILE` lines A-B item of the README's reading path is one contiguous range that
    defines every function it names; together they are at most 700 lines, and the README states
    their true total."""
    text = README.read_text()
    path = text[text.index("## Reading path") : text.index("## The files")]
    items = re.findall(r"`(\w+\.py)` lines (\d+)-(\d+):(.*?)(?=\n\d\.|\Z)", path, flags=re.S)
    assert [file for file, *_ in items] == ["fpo.py", "train.py"], items
    total = 0
    for file, first, last, described in items:
        all_lines = (README.parent / file).read_text().splitlines()
        lines = all_lines[int(first) - 1 : int(last)]
        total += len(lines)
        names = re.findall(r"`(\w+)`", described)
        assert names, described
        for name in names:
            assert any(line.startswith(f"def {name}(") for line in lines), (file, name)
        # the range is tight: it starts at a section or definition and ends where one ends
        assert lines[0] and not lines[0].startswith((" ", ")")), (file, first, lines[0])
        assert not all_lines[int(last)].startswith(" "), (file, last, "cuts a definition")
        assert not lines[-1].startswith("    ") or all_lines[int(last)] == "", (file, last)
    assert total <= 700
    assert f"{total} lines in all" in path
    # it covers the offline cache and the batch layout
    ranges = {}
    for file, first, last, _ in items:
        all_lines = (README.parent / file).read_text().splitlines()
        ranges[file] = "\n".join(all_lines[int(first) - 1 : int(last)])
    assert "def build_reference_cache(" in ranges["fpo.py"]
    assert "def cached_feature_mse(" in ranges["fpo.py"]
    assert "def build_cache(" in ranges["train.py"] and "A batch is 2B rows" in ranges["train.py"]


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
    assert "import torch" in snippet
    defaults = PreferenceConfig()
    for name, value in (("beta", defaults.beta), ("alpha", defaults.alpha), ("k", defaults.fpo_k)):
        assert f"{name}={value}" in snippet, name


def test_fpo_defaults_are_the_sweeps_fpo_pick():
    """config.py's FPO defaults are the pick docs/sweep_picks.json holds, and the README, the
    snippet and docs/toy_world.md state them."""
    picks = json.loads((DOCS / "sweep_picks.json").read_text())["picks"]["FPO"]["settings"]
    defaults = PreferenceConfig()
    assert picks["method"] == defaults.method == "fpo"
    for name in ("beta", "alpha", "pref_lr", "pref_steps"):
        assert getattr(defaults, name) == picks[name], name
    stated = f"beta {picks['beta']:g}, alpha {picks['alpha']:g}"
    for page in (README, DOCS / "toy_world.md", DOCS / "results.md"):
        assert stated in page.read_text(), page.name


def documented_train_commands() -> list[list[str]]:
    """Every `python train.py ...` line of the README's and docs/' bash blocks, as argv lists, with
    shell variables and comments removed."""
    commands = []
    for page in [README] + sorted(DOCS.glob("*.md")):
        for block in re.findall(r"```bash\n(.*?)```", page.read_text(), flags=re.S):
            for line in block.replace("\\\n", " ").splitlines():
                for command in re.findall(r"python train\.py((?: [^;#>|]*)?)", line):
                    commands.append(shlex.split(re.sub(r"\$\S+", "1", command)))
    return commands


def test_every_documented_train_py_command_has_flags_that_exist():
    """Each command's flags parse with the pipeline's own parser (a renamed flag fails here;
    shell variables stand in as 1, so only names and types are checked)."""
    commands = documented_train_commands()
    assert commands
    for args in commands:
        build_parser("").parse_args(args)


def test_every_page_the_readme_links_exists():
    for target in re.findall(r"\]\(([\w./-]+\.(?:svg|md))\)", README.read_text()):
        assert (README.parent / target).exists(), target


def test_the_file_list_names_every_top_level_python_file_and_nothing_else():
    listing = README.read_text().split("## The files\n")[1].split("```")[1]
    listed = {line.split()[0] for line in listing.splitlines() if line.strip()}
    on_disk = {path.name for path in README.parent.glob("*.py")}
    assert {name for name in listed if name.endswith(".py")} == on_disk
    for name in listed - on_disk:  # the rest are folders (some listed with a trailing /)
        assert (README.parent / name.rstrip("/")).is_dir(), name


@pytest.mark.slow
def test_train_py_answers_help():
    done = run_script("train.py", "--help")
    assert done.returncode == 0 and "usage" in done.stdout.lower(), done.stderr
