"""evaluate.py's metrics, against values worked out by hand."""

import copy
import json
import math
from xml.etree import ElementTree

import pytest
import torch

import config
import data
import evaluate
import experiments
import fpo
import report
import train
from model import GPT, GPTConfig
from sae import SparseAutoencoder, train_sae

CPU = torch.device("cpu")


def tiny_gpt(enc, seed=0) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=enc.n_vocab, block_size=32, n_layer=1, n_head=2, n_embd=16)).eval()


def test_distinct_2_hand_computed():
    # bigrams (1,2) (2,3) (1,2) (2,4): 3 distinct of 4
    assert evaluate.distinct_2([[1, 2, 3], [1, 2, 4]]) == 3 / 4
    assert evaluate.distinct_2([[7], []]) == 0.0  # no bigram at all


def test_kl_on_the_models_own_samples_averages_to_the_exact_kl_of_whole_responses():
    """Every response of 2 tokens over a 3-token vocabulary, each weighted by its probability under
    the policy: the estimator's expectation against KL(pi || pi_ref) enumerated over all 9 responses."""
    torch.manual_seed(0)
    policy, reference = (GPT(GPTConfig(vocab_size=3, block_size=4, n_layer=1, n_head=1, n_embd=8)).eval() for _ in range(2))
    with torch.no_grad():
        policy.lm_head.weight.mul_(30)  # sharpen the policy, so the two models differ clearly
    prompt, bos = [1], 0
    responses = [[a, b] for a in range(3) for b in range(3)]
    input_ids, mask = data.collate_responses([prompt] * 9, responses, bos)
    logp = fpo.sequence_logps(policy(input_ids)[0], input_ids, mask)[0].double()  # log pi(y), (9,)
    reference_logp = fpo.sequence_logps(reference(input_ids)[0], input_ids, mask)[0].double()
    assert math.isclose(logp.exp().sum().item(), 1.0, rel_tol=1e-5)  # the 9 responses are every outcome
    exact_kl = (logp.exp() * (logp - reference_logp)).sum().item()
    per_response = torch.tensor([evaluate.score_samples(policy, reference, [prompt], [y], bos, CPU)["kl_from_reference"] for y in responses])
    assert exact_kl > 0.1
    assert math.isclose((logp.exp() * per_response).sum().item(), exact_kl, rel_tol=1e-4)
    # per response it is a sum of KLs, never negative, unlike the log-ratio log pi(y) - log pi_ref(y)
    assert (per_response >= 0).all() and (logp - reference_logp).min() < 0


def test_win_rate_counts_ties_half():
    # prompt 1 a win, prompt 2 a tie, prompt 3 a loss, prompt 4 a win: (1 + 0.5 + 0 + 1) / 4
    assert evaluate.win_rate([0.9, 0.1, 0.0, 0.55], [0.5, 0.1, 1.0, 0.1]) == 2.5 / 4


def test_a_response_cut_off_before_eos_is_invalid_even_after_a_full_stop():
    assert data.judge("review the soup :", " the soup was great .").valid
    cut = data.judge("review the soup :", " the soup was great .", complete=False)
    assert not cut.valid and cut.score == 0.0


def test_policy_and_reference_share_random_draws_in_sampling():
    enc = data.load_tokenizer()
    model = tiny_gpt(enc)
    prompts = [data.encode(enc, text) for text in data.make_prompts(6, seed=0)]
    settings = config.EvalConfig(temperature=1.0, top_k=0, max_new_tokens=8)
    first = evaluate.sample_responses(model, prompts, enc, settings, seed=3, device=CPU)
    assert evaluate.sample_responses(copy.deepcopy(model), prompts, enc, settings, seed=3, device=CPU) == first
    assert evaluate.sample_responses(model, prompts, enc, settings, seed=4, device=CPU) != first


def test_score_samples_entropy_of_a_uniform_model_and_kl_to_itself():
    enc = data.load_tokenizer()
    model = tiny_gpt(enc)
    torch.nn.init.zeros_(model.lm_head.weight)  # every next-token distribution is uniform
    prompts, responses = [[5, 6], [7]], [[8, 9, data.eos_id(enc)], [10]]
    stats = evaluate.score_samples(model, model, prompts, responses, data.eos_id(enc), CPU)
    assert math.isclose(stats["entropy_per_token"], math.log(enc.n_vocab), rel_tol=1e-5)
    assert stats["kl_from_reference"] == 0.0


def test_loop_memory_sees_a_tensor_allocated_inside_and_not_one_from_before():
    before = torch.zeros(1_000_000)  # 4 MB that the loop did not allocate
    with experiments.LoopPeakMemory(CPU) as memory:
        inside = torch.ones(2_000_000)  # 8 MB
        doubled = inside * 2  # 8 MB more, both live at once
        del inside, doubled
        before.add_(1)  # in place: allocates nothing
        view = before[:10]  # a view: allocates nothing
    assert 16 <= memory.loop_mb * 2**20 / 1e6 < 16.1, memory.loop_mb
    assert memory.tensors.live == 0 and view.shape == (10,)
    assert memory.rss_mb > 0


def test_fpo_and_simpo_losses_stay_float32_under_bfloat16_autocast_and_match_float32():
    """A bfloat16 policy (CUDA's autocast, here on the CPU) gives float32 D(y) and losses, close to float32's."""
    enc = data.load_tokenizer()
    torch.manual_seed(0)
    policy = GPT(GPTConfig(vocab_size=enc.n_vocab, block_size=48, n_layer=1, n_head=2, n_embd=32))
    sae = train_sae(torch.randn(2048, 32, generator=torch.Generator().manual_seed(0)), 64, 4, steps=20, batch_size=256, log_every=1000)
    pairs, _ = data.tokenize_pairs(data.make_preference_pairs(8, seed=0), enc, 48)
    batch = data.pair_batch(pairs, torch.arange(8), 0, data.eos_id(enc), CPU)
    cache = fpo.build_reference_cache(lambda ids: policy(ids, hidden_layer=-1), sae.encode, [batch], n_rows=16, d_sae=64)
    inputs = train.PreferenceInputs(enc, sae, pairs, [], cache, {})
    with torch.no_grad():  # move the policy off the reference, so D(y) is not 0
        for p in policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    outputs = {}
    for method in ("fpo", "simpo"):
        pref = train.PreferenceConfig(method=method, fpo_k=8)
        exact = train.preference_losses(pref, -1, policy, batch, inputs, None)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = train.preference_losses(pref, -1, policy, batch, inputs, None)
        assert low[0].dtype == torch.float32, method
        torch.testing.assert_close(low[0], exact[0], rtol=0.05, atol=0.02)
        outputs[method] = exact, low
    exact_drift, drift = outputs["fpo"][0][3], outputs["fpo"][1][3]  # D(y) of every response
    assert drift.dtype == torch.float32 and exact_drift.abs().max() > 0
    torch.testing.assert_close(drift, exact_drift, rtol=0.2, atol=2e-3)


def test_paired_difference_on_hand_made_examples():
    # Two prompts whose differences are 1 and 0: a bootstrap mean is 0, 0.5 or 1 (odds 1:2:1), so the
    # 95% interval is [0, 1] around the mean 0.5.
    assert evaluate.paired_difference([[1.0, 0.0]], [[0.0, 0.0]]) == (0.5, 0.0, 1.0)
    # The same difference everywhere: no spread at all.
    assert evaluate.paired_difference([[0.5, 1.0], [1.0, 0.5]], [[0.0, 0.5], [0.5, 0.0]]) == (0.5, 0.5, 0.5)
    # References that disagree, each with no spread over its prompts: the interval comes from
    # resampling references alone, whose mean is 0, 0.5 or 1 (odds 1:2:1).
    assert evaluate.paired_difference([[1.0, 1.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, 0.0]]) == (0.5, 0.0, 1.0)
    # Each reference's prompts are resampled on their own (they are other prompts): two references
    # of prompt differences 1, 0 and 0, 1 give means from 0 to 1, not the collapsed 0.5 of one
    # draw shared by both.
    mean, low, high = evaluate.paired_difference([[1.0, 0.0], [0.0, 1.0]], [[0.0, 0.0], [0.0, 0.0]])
    assert (mean, low, high) == (0.5, 0.0, 1.0)


def test_pick_setting_takes_the_best_worst_case_judge_score_that_keeps_validity_everywhere():
    def run(tag, *points):
        return {"tag": tag, "overrides": {"pref_lr": 1e-4}, "points": [{"step": s, "judge_score": j, "valid_rate": v} for s, j, v in points]}

    # One reference: the floor is 0.9, so b's step 50 (0.90) is in and a's step 100 (0.80) is out.
    one = {1: [run("a", (50, 0.70, 0.95), (100, 0.90, 0.80)), run("b", (50, 0.75, 0.90), (100, 0.72, 0.99))]}
    pick = experiments.pick_setting(one, reference_valid={1: 1.0})
    assert (pick["run"], pick["settings"], pick["validation"]["1"]["judge_score"]) == ("b", {"pref_lr": 1e-4, "pref_steps": 50}, 0.75)
    # None keeps 0.9 x 1.2: the one whose validity is closest to the floor.
    assert experiments.pick_setting(one, reference_valid={1: 1.2})["validation"]["1"]["valid_rate"] == 0.99
    # Two references: a is best on the first but worst on the second; b is good on both, so its
    # worst case (0.70) beats a's (0.50).
    two = {
        1: [run("a", (50, 0.95, 0.95)), run("b", (50, 0.80, 0.95))],
        2: [run("a", (50, 0.50, 0.95)), run("b", (50, 0.70, 0.95))],
    }
    pick = experiments.pick_setting(two, reference_valid={1: 1.0, 2: 1.0})
    assert pick["run"] == "b" and pick["validation"] == {"1": two[1][1]["points"][0], "2": two[2][1]["points"][0]}
    # Each reference's own floor: 0.9 x 0.8 on the second lets a point of valid rate 0.75 in there.
    low = {1: [run("a", (50, 0.95, 0.95)), run("b", (50, 0.60, 0.95))], 2: [run("a", (50, 0.90, 0.75)), run("b", (50, 0.60, 0.95))]}
    assert experiments.pick_setting(low, reference_valid={1: 1.0, 2: 0.8})["run"] == "a"
    assert experiments.pick_setting(low, reference_valid={1: 1.0, 2: 1.0})["run"] == "b"


def test_pick_at_kl_takes_the_fluent_point_nearest_the_target_kl_on_a_log_scale():
    def run(tag, *points):
        return {"tag": tag, "overrides": {}, "points": [{"step": s, "kl_from_reference": kl, "valid_rate": v, "judge_score": 0.5} for s, kl, v in points]}

    runs = {1: [run("a", (50, 0.4, 1.0), (100, 1.6, 1.0), (150, 0.9, 0.5))], 2: [run("a", (50, 0.6, 1.0), (100, 2.4, 1.0), (150, 1.1, 0.5))]}
    target = {"validation": {"1": {"kl_from_reference": 0.8}, "2": {"kl_from_reference": 1.2}}}  # mean 1.0
    # Mean KLs 0.5, 2.0 and 1.0: step 150 matches, but is not fluent; 0.5 and 2.0 are equally far
    # on a log scale, and the first found is kept.
    pick = experiments.pick_at_kl(runs, {1: 1.0, 2: 1.0}, target)
    assert pick["settings"] == {"pref_steps": 50}
    target["validation"]["2"]["kl_from_reference"] = 2.4  # mean 1.6: nearer 2.0 than 0.5
    assert experiments.pick_at_kl(runs, {1: 1.0, 2: 1.0}, target)["settings"] == {"pref_steps": 100}


def test_grid_edges_name_each_knob_at_its_extreme_along_the_pick_s_line_and_the_end_steps():
    lrs = (2e-5, 6e-5, 1.8e-4)
    fpo_knobs = ((2.0, 4.0), (2.0, 16.0), (4.0, 16.0))
    fpo_grid = [{"method": "fpo", "beta": beta, "alpha": alpha, "pref_lr": lr}
                for beta, alpha in fpo_knobs for lr in lrs]
    dpo_grid = [{"method": "dpo", "beta": beta, "pref_lr": lr}
                for beta in (0.05, 0.1, 0.3) for lr in lrs]
    pref_cfg = config.PreferenceConfig(pref_steps=150)  # judged every 50 steps, to 300
    top = {"method": "fpo", "beta": 4.0, "alpha": 16.0, "pref_lr": 1.8e-4, "pref_steps": 300}
    # At beta 4 the grid has no other alpha: alpha 16 is not an edge there.
    assert experiments.grid_edges(top, fpo_grid, 50, pref_cfg) == [
        "largest beta", "largest pref_lr", "last judged step"
    ]
    # Nor is beta 2 at alpha 4, but alpha 4 is the smallest alpha at beta 2.
    corner = top | {"beta": 2.0, "alpha": 4.0, "pref_lr": 6e-5, "pref_steps": 100}
    assert experiments.grid_edges(corner, fpo_grid, 50, pref_cfg) == ["smallest alpha"]
    middle = {"method": "dpo", "beta": 0.1, "pref_lr": 6e-5, "pref_steps": 100}
    assert experiments.grid_edges(middle, dpo_grid, 50, pref_cfg) == []
    low = middle | {"beta": 0.05, "pref_lr": 2e-5, "pref_steps": 50}
    assert experiments.grid_edges(low, dpo_grid, 50, pref_cfg) == [
        "smallest beta", "smallest pref_lr", "first judged step"
    ]
    # One setting past both edges brackets neither: only the pick's own lines count.
    extended = dpo_grid + [{"method": "dpo", "beta": 0.02, "pref_lr": 6.7e-6}]
    assert experiments.grid_edges(low, extended, 50, pref_cfg) == [
        "smallest beta", "smallest pref_lr", "first judged step"
    ]
    extended += [{"method": "dpo", "beta": 0.05, "pref_lr": 6.7e-6}]
    assert experiments.grid_edges(low, extended, 50, pref_cfg) == [
        "smallest beta", "first judged step"
    ]


def test_svg_chart_parses_with_one_series_per_label():
    series = {"FPO": [(0.5, 0.6), (2.0, 0.7)], "DPO": [(10.0, 0.3)], "SimPO & co": []}
    for lines, log_x in ((True, False), (False, True)):
        root = ElementTree.fromstring(report.svg_chart("t", "x", "y", series, lines=lines, log_x=log_x))
        groups = root.findall("{http://www.w3.org/2000/svg}g[@class='series']")
        assert [g.get("data-label") for g in groups] == list(series)
        assert [len(g.findall("{http://www.w3.org/2000/svg}circle")) for g in groups] == [2, 1, 0]


def test_a_child_process_uses_this_process_thread_count():
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert experiments.in_child_process(torch.get_num_threads) == 1
    finally:
        torch.set_num_threads(threads)


def test_training_chart_has_one_panel_per_logged_quantity(tmp_path):
    log = tmp_path / "log.jsonl"
    records = [
        {"step": step, "loss": 0.7 - 0.1 * step, "margin": 0.2 * step, "accuracy": 0.5,
         "feature_drift": 0.001 * step, "ms_per_step": 30.0}
        for step in range(4)
    ]
    log.write_text("".join(json.dumps(record) + "\n" for record in records))
    root = ElementTree.fromstring(report.training_chart(log, "t"))
    series = root.findall(".//{http://www.w3.org/2000/svg}g[@class='series']")
    assert [g.get("data-label") for g in series] == ["loss", "margin", "accuracy", "feature_drift"]
    assert all(len(g.findall("{http://www.w3.org/2000/svg}circle")) == 4 for g in series)


def test_attribute_latents_finds_planted_sentiment_and_topic_latents():
    """A stand-in GPT whose hidden state at a position is a code of the next token, with latent 3
    planted on positive words, 5 on negative ones and 8 + i on topic i's nouns, read through an
    identity SAE: those are the latents found, above every noise latent."""
    enc = data.load_tokenizer()

    def token(word):
        (token_id,) = data.encode(enc, " " + word)
        return token_id

    n_topics = len(data.TOPICS)
    width = 8 + n_topics + 4
    generator = torch.Generator().manual_seed(0)
    table = 0.1 * torch.rand(enc.n_vocab, width, generator=generator)  # every token: some noise
    for word in data.POSITIVE_ADJECTIVES + data.POSITIVE_VERBS:
        table[token(word), 3] += 1.0
    for word in data.NEGATIVE_ADJECTIVES + data.NEGATIVE_VERBS:
        table[token(word), 5] += 1.0
    for i, nouns in enumerate(data.TOPICS.values()):
        for noun in nouns:
            table[token(noun), 8 + i] += 1.0

    class NextTokenCode(torch.nn.Module):
        def forward(self, ids, hidden_layer):
            hidden = torch.zeros(*ids.shape, width)
            hidden[:, :-1] = table[ids[:, 1:]]  # position t holds the code of token t + 1
            return None, hidden

    class Identity(torch.nn.Module):
        def encode(self, x):
            return x

    words = [w for nouns in data.TOPICS.values() for w in nouns] + data.POSITIVE_ADJECTIVES + data.NEGATIVE_ADJECTIVES + ["the", "."]
    ids = torch.tensor([[token(words[i]) for i in torch.randint(0, len(words), (12,), generator=generator).tolist()] for _ in range(64)])
    mask = torch.ones_like(ids)
    mask[:, 0] = 0  # the first token is the prompt
    found = evaluate.attribute_latents(NextTokenCode(), Identity(), -1, [(ids, mask)], enc, n=2)
    assert found["sentiment"] == [3, 5]
    assert set(found["topic"]) <= set(range(8, 8 + n_topics)) and len(found["topic"]) == 2


def test_bound_pieces_by_hand_and_the_softmax_step_on_random_models():
    # M by hand: ||W_U|| = 2, max |gamma| = 3, sigma = 0.5, ||W_dec|| / s = 1: (2 * 3 / 0.5 * 1)^2 / 4 = 36.
    reference = GPT(GPTConfig(vocab_size=4, block_size=8, n_layer=1, n_head=1, n_embd=4))
    with torch.no_grad():
        reference.lm_head.weight.copy_(2 * torch.eye(4))
        reference.ln_f.weight.fill_(3.0)
    sae = SparseAutoencoder(d_model=4, d_sae=4, k=2)
    with torch.no_grad():
        sae.W_dec.copy_(torch.eye(4))
    assert math.isclose(evaluate.bound_constant(reference, sae, sigma=0.5), 36.0, rel_tol=1e-6)
    # KL between softmaxes is at most a quarter of the logits' squared distance, at every position.
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=16)
    reference, policy = GPT(config), GPT(config)
    sae = SparseAutoencoder(d_model=16, d_sae=32, k=4)
    torch.nn.init.normal_(sae.W_enc)
    torch.nn.init.normal_(sae.W_dec)
    input_ids = torch.randint(0, 50, (6, 16))
    mask = torch.zeros(6, 16, dtype=torch.long)
    mask[:, 5:] = 1
    terms = evaluate.bound_terms(policy, reference, sae, -1, input_ids, mask, fpo_k=4)
    assert terms["kl"].shape == terms["code_gap"].shape == terms["sigma"].shape == (6 * 11,)  # tokens 5..15 are generated
    assert (terms["kl"] > 0).all() and (terms["kl"] <= terms["logit_gap"] / 4).all()
    # Per response: SeqKL is the sum of its positions' KL.
    torch.testing.assert_close(terms["sequence_kl"], terms["kl"].view(6, 11).sum(-1))
    assert terms["feature_drift"].shape == (6,)


def test_spearman_and_its_bootstrap_on_hand_made_examples():
    x = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert evaluate.spearman(x, 10 * x) == pytest.approx(1.0)
    assert evaluate.spearman(x, -x) == pytest.approx(-1.0)
    assert evaluate.spearman(x, torch.tensor([1.0, 3.0, 2.0, 4.0])) == pytest.approx(0.8)  # 1 - 6 * 2 / (4 * 15)
    mean, low, high = evaluate.bootstrap_spearman([x, x + 10], [x.exp(), (x + 10).exp()], n_resamples=50)
    assert mean == pytest.approx(1.0) and low == pytest.approx(1.0) and high == pytest.approx(1.0)
