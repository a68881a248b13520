"""train.py's preference loop against updates worked out by hand: the loss it trains on (FPO's,
D(y_w) and D(y_l) each on its own side), the warm-up, the clip, AdamW and its zeroed gradients,
resume, and the held-out accuracies. On the tiny in-memory world of test_training_path.py: fast.

Each test here catches a plausible bug that the end-to-end runs, which must only learn, let
through: a swapped half, a clip after the step, a warm-up ignored or off by one, gradients that
accumulate, a resume one step late, an accuracy read from the wrong reward or model.
"""

import copy
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import data
import fpo
import train
from config import Config, PreferenceConfig, RunConfig, SAEConfig
from runtime import Interrupted, batch_indices, learning_rate
from test_training_path import CPU, drifted_copy, world  # noqa: F401 (world is a fixture)

B = 4  # pairs per step
# A clip far below the gradient's norm: the clipped gradient's entries are near AdamW's eps, so
# the update shows whether the clip came before the step (Adam is otherwise blind to a scale).
GRAD_CLIP = 1e-6
ADAM_BETAS, ADAM_EPS = (0.9, 0.999), 1e-8


def loop_config(out_dir, steps: int, **prefer) -> Config:
    """FPO with a strong constraint, a warm-up longer than the run, and the tiny clip."""
    settings = dict(method="fpo", beta=1.0, alpha=256.0, fpo_k=8, pref_steps=steps,
                    pref_batch_size=B, pref_lr=1e-3, warmup_steps=3, grad_clip=GRAD_CLIP)
    return Config(run=RunConfig(out_dir=str(out_dir), log_every=1000), sae=SAEConfig(sae_layer=0),
                  prefer=PreferenceConfig(**(settings | prefer)))


def run_the_loop(world, cfg: Config, monkeypatch, start) -> tuple[torch.nn.Module, list[dict]]:
    """train.train_preference on the world, from the policy `start` (a copy): the trained policy
    and the loop's log records."""
    _, inputs, _ = world
    policy = copy.deepcopy(start).requires_grad_(True)  # the world's reference is frozen
    monkeypatch.setattr(train, "preference_models", lambda cfg, device: (policy, inputs, None))
    train.train_preference(cfg, CPU, seed=5, tag="policy")
    log = Path(cfg.run.out_dir) / "policy_log.jsonl"
    return policy, [json.loads(line) for line in log.read_text().splitlines()]


def fpo_loss_by_hand(policy, inputs, pref_cfg, batch, swap_halves: bool = False):
    """FPO's mean loss on a batch from fpo.py's functions, dense: sequence_logps, pooled_features
    of sae.encode, feature_mse, fpo_loss; D(y_w) from the chosen rows, D(y_l) from the rejected
    ones (`swap_halves`: the other way round, the bug this file must catch)."""
    rows, input_ids, mask = batch
    logits, hidden = policy(input_ids, hidden_layer=0)
    sum_logps, n_tokens = fpo.sequence_logps(logits, input_ids, mask)
    avg_logps = sum_logps / n_tokens  # (2B,)
    reference_avg_logps = inputs.cache["sum_logps"][rows] / inputs.cache["n_tokens"][rows]
    pooled = fpo.pooled_features(inputs.sae.encode(hidden), mask)  # (2B, d_sae)
    reference_pooled = fpo.reference_pooled_features(inputs.cache, rows)
    d = fpo.feature_mse(pooled, reference_pooled, pref_cfg.fpo_k)  # D(y), (2B,)
    d_chosen, d_rejected = (d[B:], d[:B]) if swap_halves else (d[:B], d[B:])
    losses, _, _ = fpo.fpo_loss(
        avg_logps[:B], avg_logps[B:], reference_avg_logps[:B], reference_avg_logps[B:],
        d_chosen, d_rejected, beta=pref_cfg.beta, alpha=pref_cfg.alpha,
    )
    return losses.mean()


def recorded_steps(monkeypatch) -> list[dict]:
    """Every AdamW step from now on, as it starts: the weights, the gradients it steps on (after
    the loop's clip, if it clipped first) and its learning rate."""
    steps = []
    adamw_step = torch.optim.AdamW.step

    def recording(optimizer, *args, **kwargs):
        parameters = [p for group in optimizer.param_groups for p in group["params"]]
        steps.append({"weights": [p.detach().clone() for p in parameters],
                      "gradients": [p.grad.detach().clone() for p in parameters],
                      "lr": optimizer.param_groups[0]["lr"]})
        return adamw_step(optimizer, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", recording)
    return steps


def clipped_gradient_by_hand(policy, inputs, pref_cfg, step: int):
    """Step `step`'s loss at the policy's weights; its gradient clipped to grad_clip by hand,
    g * min(1, grad_clip / (||g|| + 1e-6)); and ||g||, over every parameter."""
    eos = data.eos_id(inputs.enc)
    picks = batch_indices(len(inputs.train_pairs), B, seed=5, step=step)
    batch = data.pair_batch(inputs.train_pairs, picks, row_offset=0, eos_id=eos, device=CPU)
    loss = fpo_loss_by_hand(policy, inputs, pref_cfg, batch)
    gradients = torch.autograd.grad(loss, list(policy.parameters()))  # this step's alone
    norm = torch.sqrt(sum((g * g).sum() for g in gradients)).item()
    return loss.item(), [g * min(1.0, pref_cfg.grad_clip / (norm + 1e-6)) for g in gradients], norm


def adamw_by_hand(weights, gradients, moments, lr: float, t: int) -> list[torch.Tensor]:
    """AdamW's update t (weight decay 0, as the loop's): m and v (updated in place), their bias
    corrections, w - lr * m_hat / (sqrt(v_hat) + eps)."""
    updated = []
    for w, g, (m, v) in zip(weights, gradients, moments):
        m.mul_(ADAM_BETAS[0]).add_((1 - ADAM_BETAS[0]) * g)
        v.mul_(ADAM_BETAS[1]).add_((1 - ADAM_BETAS[1]) * g * g)
        m_hat, v_hat = m / (1 - ADAM_BETAS[0] ** t), v / (1 - ADAM_BETAS[1] ** t)
        updated.append(w - lr * m_hat / (v_hat.sqrt() + ADAM_EPS))
    return updated


@pytest.mark.parametrize("n_steps, grad_clip", [(1, GRAD_CLIP), (2, GRAD_CLIP), (2, 1e9)])
def test_each_step_of_the_loop_is_adamw_on_fpo_s_clipped_gradient_at_the_warm_up_s_rate(
    world, tmp_path, monkeypatch, n_steps, grad_clip
):
    """Each step the loop takes, worked out by hand from the weights it starts at: the logged
    loss is fpo.fpo_loss's on the step's batch (D(y_w) from the chosen rows, D(y_l) from the
    rejected); the gradient it steps on is that loss's alone (zeroed before), clipped before the
    step; the learning rate is the warm-up's, lr * (step + 1) / warmup_steps; the weights after
    it are AdamW's update. Unclipped (1e9), two steps show gradients that were not zeroed: under
    the tiny clip, the first step's leftover is too small to see."""
    reference, inputs, _ = world
    start = drifted_copy(reference, seed=11)  # D(y) > 0, so its halves can be told apart
    cfg = loop_config(tmp_path, steps=n_steps, grad_clip=grad_clip)
    steps = recorded_steps(monkeypatch)
    trained, records = run_the_loop(world, cfg, monkeypatch, start)
    assert len(steps) == len(records) == n_steps
    moments = [(torch.zeros_like(p), torch.zeros_like(p)) for p in start.parameters()]
    after = [step["weights"] for step in steps[1:]] + [[p.detach() for p in trained.parameters()]]
    for number, (step, record) in enumerate(zip(steps, records)):
        policy = copy.deepcopy(start).requires_grad_(True)
        with torch.no_grad():
            for p, w in zip(policy.parameters(), step["weights"]):
                p.copy_(w)
        loss, gradients, norm = clipped_gradient_by_hand(policy, inputs, cfg.prefer, number)
        assert record["loss"] == pytest.approx(loss, rel=1e-5)
        assert grad_clip > norm or norm > 1e3 * grad_clip  # clipped hard, or not at all
        scale = max(g.abs().max().item() for g in gradients)
        for name, got, want in zip(dict(policy.named_parameters()), step["gradients"], gradients):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * scale, msg=name)
        lr = cfg.prefer.pref_lr * (number + 1) / cfg.prefer.warmup_steps
        assert step["lr"] == pytest.approx(lr, rel=1e-12)
        expected = adamw_by_hand(step["weights"], step["gradients"], moments, lr, number + 1)
        for got, want in zip(after[number], expected):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-9)
    # D(y)'s halves swapped would change the loss far beyond the tolerance
    eos = data.eos_id(inputs.enc)
    batch = data.pair_batch(inputs.train_pairs, batch_indices(len(inputs.train_pairs), B, 5, 0),
                            row_offset=0, eos_id=eos, device=CPU)
    swapped = fpo_loss_by_hand(start, inputs, cfg.prefer, batch, swap_halves=True).item()
    assert abs(swapped - records[0]["loss"]) > 100 * 1e-5 * records[0]["loss"]


@pytest.mark.parametrize("method", ["fpo", "simpo"])
def test_the_logged_d_y_is_that_of_the_weights_that_took_the_step(
    world, tmp_path, monkeypatch, method
):
    """Each step's logged D(y) is the batch's mean D(y) at the weights the step started from, by
    hand: FPO's from its loss, and a method's that does not train on it (SimPO) from the same
    forward, not from the weights after the update."""
    reference, inputs, _ = world
    start = drifted_copy(reference, seed=11)  # D(y) > 0
    cfg = loop_config(tmp_path, steps=2, method=method, grad_clip=1e9)
    steps = recorded_steps(monkeypatch)
    trained, records = run_the_loop(world, cfg, monkeypatch, start)
    eos = data.eos_id(inputs.enc)
    weights = [step["weights"] for step in steps] + [[p.detach() for p in trained.parameters()]]
    by_hand = []
    for number in range(3):  # the weights before steps 0 and 1, and after step 1
        policy = copy.deepcopy(start)
        with torch.no_grad():
            for p, w in zip(policy.parameters(), weights[number]):
                p.copy_(w)
        picks = batch_indices(len(inputs.train_pairs), B, seed=5, step=min(number, 1))
        rows, input_ids, mask = data.pair_batch(inputs.train_pairs, picks, 0, eos, CPU)
        with torch.no_grad():
            _, hidden = policy(input_ids, hidden_layer=0)
        pooled = fpo.pooled_features(inputs.sae.encode(hidden), mask)
        reference_pooled = fpo.reference_pooled_features(inputs.cache, rows)
        by_hand.append(fpo.feature_mse(pooled, reference_pooled, cfg.prefer.fpo_k).mean().item())
    assert [record["feature_mse"] for record in records] == pytest.approx(by_hand[:2], rel=1e-5)
    assert records[1]["feature_mse"] != pytest.approx(by_hand[2], rel=1e-3)  # not after it


def test_the_warm_up_rises_linearly_to_the_peak_and_stays_there():
    """Step s of a warm-up of w steps trains at peak * (s + 1) / w: never 0, the peak first at
    step w - 1, and never above it."""
    assert [learning_rate(step, 3e-3, 3, 10, "constant") for step in range(6)] == pytest.approx(
        [1e-3, 2e-3, 3e-3, 3e-3, 3e-3, 3e-3]
    )
    assert learning_rate(0, 1.0, 0, 10, "constant") == 1.0  # no warm-up
    cosine = [learning_rate(step, 1.0, 2, 12, "cosine") for step in range(12)]
    assert cosine[:2] == [0.5, 1.0] and max(cosine) == 1.0


class CtrlCBeforeStep2:
    """stop_at_step_boundary, with its Event set when step 2 is about to run."""

    def __init__(self):
        self.asked = 0

    def is_set(self) -> bool:
        self.asked += 1
        return self.asked == 3

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> bool:
        return False


class Killed(Exception):
    """The process dying mid-step, as far as the files it left are concerned."""


@pytest.mark.parametrize("stop", ["Ctrl-C before step 2", "killed in step 3"])
def test_a_run_resumed_at_its_saved_step_equals_an_uninterrupted_one(
    world, tmp_path, monkeypatch, stop
):
    """Ctrl-C before step 2 saves the state the loop had then; a run killed in step 3 (its log
    holds step 2, its resume file the state before step 2, saved every log_every = 2 steps)
    left both behind. --resume starts at the saved step, neither one step early nor late, and
    keeps the logged records before it: weights and log equal an uninterrupted run's, bit for
    bit."""
    reference, _, _ = world
    start = drifted_copy(reference, seed=12)
    uninterrupted, records = run_the_loop(
        world, loop_config(tmp_path / "once", steps=4, grad_clip=1.0), monkeypatch, start
    )
    cfg = loop_config(tmp_path / "twice", steps=4, grad_clip=1.0)
    cfg = replace(cfg, run=replace(cfg.run, log_every=2))
    if stop.startswith("Ctrl-C"):
        monkeypatch.setattr(train, "stop_at_step_boundary", CtrlCBeforeStep2)
        stopped = pytest.raises(Interrupted, match="prefer interrupted at step 2")
    else:
        update, updates = train.update, []

        def dies_in_step_3(*args):
            updates.append(1)
            if len(updates) == 4:
                raise Killed
            update(*args)

        monkeypatch.setattr(train, "update", dies_in_step_3)
        stopped = pytest.raises(Killed)
    with stopped:
        run_the_loop(world, cfg, monkeypatch, start)
    monkeypatch.undo()
    resumed, resumed_records = run_the_loop(
        world, replace(cfg, run=replace(cfg.run, resume=True)), monkeypatch, start
    )
    for got, want in zip(resumed.parameters(), uninterrupted.parameters()):
        assert torch.equal(got, want)

    def without_times(log: list[dict]) -> list[dict]:
        return [{key: value for key, value in r.items() if key != "ms_per_step"} for r in log]

    assert without_times(resumed_records) == without_times(records)


def test_held_out_accuracy_reads_the_method_s_reward_and_the_policy_s_implicit_reward(world):
    """On the held-out pairs (the cache rows after the training pairs'): the method's own reward
    accuracy (FPO's: length-normalised, against the cached average) and the implicit DPO reward's
    (summed log-probs of the policy, not the reference, against the cached sums), each by hand,
    on a policy for which the three possible readings all differ."""
    reference, inputs, _ = world
    policy = drifted_copy(reference, seed=0)
    pref_cfg = PreferenceConfig(method="fpo", fpo_k=8)
    eos = data.eos_id(inputs.enc)
    n_train = len(inputs.train_pairs)
    rows, input_ids, mask = next(data.every_pair(inputs.test_pairs, 64, n_train, eos, CPU))
    n = len(rows) // 2

    def accuracy(model, normalised: bool) -> float:
        sum_logps, n_tokens = fpo.sequence_logps(model(input_ids)[0], input_ids, mask)
        cached = inputs.cache["sum_logps"][rows]
        reward = sum_logps - cached
        if normalised:
            reward = sum_logps / n_tokens - cached / inputs.cache["n_tokens"][rows]
        return (reward[:n] > reward[n:]).float().mean().item()

    with torch.no_grad():
        own, implicit, from_reference = (accuracy(policy, True), accuracy(policy, False),
                                         accuracy(reference, False))
    assert len({own, implicit, from_reference}) == 3  # the readings can be told apart here
    measured = train.held_out_accuracy(pref_cfg, 0, policy, reference, inputs, CPU)
    assert measured["reward_accuracy"] == pytest.approx(own)
    assert measured["implicit_reward_accuracy"] == pytest.approx(implicit)
