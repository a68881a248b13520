"""The README's "Use the loss in your own code" snippet, run as written against model.py's GPT."""

import copy
import re

import torch

import fpo
from conftest import README, readme_snippet
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
    path = text[text.index("## Reading path") : text.index("## Quickstart")]
    items = re.findall(r"`(\w+\.py)` lines (\d+)-(\d+):(.*?)(?=\n\d\.|\Z)", path, flags=re.S)
    assert len(items) == 2, items
    for file, first, last, described in items:
        lines = (README.parent / file).read_text().splitlines()[int(first) - 1 : int(last)]
        names = re.findall(r"`(\w+)`", described)
        assert names, described
        for name in names:
            assert any(line.startswith(f"def {name}(") for line in lines), (file, name)


def test_results_numbers_come_from_the_generated_files():
    """The Results section's tables are the files its commands wrote (copied into docs/), verbatim,
    and every decimal number in its prose occurs in one of them: no number typed by hand."""
    text = README.read_text()
    results = text[text.index("\n## Results") : text.index("\n## ", text.index("\n## Results") + 1)]
    generated = {path: path.read_text() for path in sorted((README.parent / "docs").glob("*.md"))}
    assert generated, "docs/*.md missing"
    for path, table in generated.items():
        assert table.strip() in results, f"{path.name} is not in the Results section verbatim"
    prose = results
    for table in generated.values():
        prose = prose.replace(table.strip(), "")
    every_number = " ".join(generated.values())
    for number in re.findall(r"(?<![\w.])\d+\.\d+", prose):
        assert number in every_number, f"{number} in the Results prose is in no generated file"
    for svg in re.findall(r"\]\((docs/\w+\.svg)\)", results):
        assert (README.parent / svg).exists(), svg
