"""experiments/features.py: the per-latent report of top-activating tokens."""

import pytest
import torch
import torch.nn as nn

from experiments import features
from experiments.features import top_activating_contexts
from model import GPT, GPTConfig
from runtime import UsageError
from tests.helpers import counting_batches


class PositionSAE(nn.Module):
    """One latent whose activation is position + 1, whatever the residual stream."""

    def encode(self, h):
        positions = torch.arange(1, h.shape[1] + 1, dtype=h.dtype, device=h.device)  # (T,)
        return positions[None, :, None].expand(len(h), -1, 1)  # (B, T, 1)


def test_top_activating_contexts_never_reports_a_masked_out_position():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=32, block_size=16, n_layer=1, n_head=2, n_embd=8))
    ids = counting_batches(n_batches=1)[0]  # (8, 16)
    mask = torch.ones(8, 16, dtype=torch.bool)
    mask[:, 10:] = False  # e.g. padding
    report = top_activating_contexts(
        model,
        PositionSAE(),
        [(ids, mask)],
        layer=-1,
        latents=[0],
        decode_fn=lambda ids: " ".join(map(str, ids)),
        n_examples=3,
        context=2,
    )
    values = [float(line.split()[0]) for line in report.splitlines()[1:]]
    assert values == [10.0, 10.0, 10.0]  # position 9, the last one masked in; never 11..16


@pytest.mark.slow
def test_the_command_writes_the_report_of_a_finished_run_and_refuses_bad_latents(tiny_run):
    out_dir, argv = tiny_run
    features.main(argv + ["--latents", "0,3"])
    report = (out_dir / "features.txt").read_text()
    assert report.startswith("latent 0:") and "latent 3:" in report
    for bad in ("3;4", "100000"):
        with pytest.raises(UsageError, match="--latents"):
            features.main(argv + ["--latents", bad])
