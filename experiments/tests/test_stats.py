"""experiments/stats.py against values worked out by hand: the bootstrap over references and
prompts, Spearman's correlation, the bound's pieces, the latents of an attribute."""

import math

import pytest
import torch

import data
from experiments import stats
from model import GPT, GPTConfig
from sae import SparseAutoencoder


def test_paired_difference_on_hand_made_examples():
    # Two prompts whose differences are 1 and 0: a bootstrap mean is 0, 0.5 or 1 (odds 1:2:1), so
    # the 95% interval is [0, 1] around the mean 0.5.
    assert stats.paired_difference([[1.0, 0.0]], [[0.0, 0.0]]) == (0.5, 0.0, 1.0)
    # The same difference everywhere: no spread at all.
    same = stats.paired_difference([[0.5, 1.0], [1.0, 0.5]], [[0.0, 0.5], [0.5, 0.0]])
    assert same == (0.5, 0.5, 0.5)
    # References that disagree, each with no spread over its prompts: the interval comes from
    # resampling references alone, whose mean is 0, 0.5 or 1 (odds 1:2:1).
    disagree = stats.paired_difference([[1.0, 1.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, 0.0]])
    assert disagree == (0.5, 0.0, 1.0)
    # Each reference's prompts are resampled on their own (they are other prompts): two references
    # of prompt differences 1, 0 and 0, 1 give means from 0 to 1, not the collapsed 0.5 of one
    # draw shared by both.
    mean, low, high = stats.paired_difference([[1.0, 0.0], [0.0, 1.0]], [[0.0, 0.0], [0.0, 0.0]])
    assert (mean, low, high) == (0.5, 0.0, 1.0)


def test_spearman_and_its_bootstrap_on_hand_made_examples():
    x = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert stats.spearman(x, 10 * x) == pytest.approx(1.0)
    assert stats.spearman(x, -x) == pytest.approx(-1.0)
    # 1 - 6 * 2 / (4 * 15)
    assert stats.spearman(x, torch.tensor([1.0, 3.0, 2.0, 4.0])) == pytest.approx(0.8)
    mean, low, high = stats.bootstrap_spearman(
        [x, x + 10], [x.exp(), (x + 10).exp()], n_resamples=50
    )
    assert mean == pytest.approx(1.0) and low == pytest.approx(1.0) and high == pytest.approx(1.0)


def test_bound_pieces_by_hand_and_the_softmax_step_on_random_models():
    # M by hand: ||W_U|| = 2, max |gamma| = 3, sigma = 0.5, ||W_dec|| / s = 1:
    # (2 * 3 / 0.5 * 1)^2 / 4 = 36.
    reference = GPT(GPTConfig(vocab_size=4, block_size=8, n_layer=1, n_head=1, n_embd=4))
    with torch.no_grad():
        reference.lm_head.weight.copy_(2 * torch.eye(4))
        reference.ln_f.weight.fill_(3.0)
    sae = SparseAutoencoder(d_model=4, d_sae=4, k=2)
    with torch.no_grad():
        sae.W_dec.copy_(torch.eye(4))
    assert math.isclose(stats.bound_constant(reference, sae, sigma=0.5), 36.0, rel_tol=1e-6)
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
    terms = stats.bound_terms(policy, reference, sae, -1, input_ids, mask, fpo_k=4)
    # tokens 5..15 are generated
    assert terms["kl"].shape == terms["code_gap"].shape == terms["sigma"].shape == (6 * 11,)
    assert (terms["kl"] > 0).all() and (terms["kl"] <= terms["logit_gap"] / 4).all()
    # Per response: SeqKL is the sum of its positions' KL.
    torch.testing.assert_close(terms["sequence_kl"], terms["kl"].view(6, 11).sum(-1))
    assert terms["feature_mse"].shape == (6,)
    # Each latent's part of D(y), averaged over the responses, adds up to the mean D(y).
    parts = stats.feature_mse_terms(policy, reference, sae, -1, [(input_ids, mask)], k=4)
    assert parts.shape == (32,) and (parts >= 0).all() and (parts == 0).any()
    torch.testing.assert_close(parts.sum(), terms["feature_mse"].mean())


def test_attribute_latents_finds_planted_sentiment_and_topic_latents():
    """A stand-in GPT whose hidden state at a position is a code of the next token, with latents 3
    and 4 planted on positive words, 5 and 6 on negative ones and 8 + i on topic i's nouns, read
    through an identity SAE: those are the latents found, above every noise latent."""
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
        table[token(word), 4] += 0.8
    for word in data.NEGATIVE_ADJECTIVES + data.NEGATIVE_VERBS:
        table[token(word), 5] += 1.0
        table[token(word), 6] += 0.8
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

    words = [w for nouns in data.TOPICS.values() for w in nouns]
    words += data.POSITIVE_ADJECTIVES + data.NEGATIVE_ADJECTIVES + ["the", "."]
    drawn = torch.randint(0, len(words), (64, 12), generator=generator).tolist()
    ids = torch.tensor([[token(words[i]) for i in row] for row in drawn])
    mask = torch.ones_like(ids)
    mask[:, 0] = 0  # the first token is the prompt
    found = stats.attribute_latents(NextTokenCode(), Identity(), -1, [(ids, mask)], enc, n=2)
    assert found["positive"] == [3, 4] and found["negative"] == [5, 6]
    assert set(found["topic"]) <= set(range(8, 8 + n_topics)) and len(found["topic"]) == 2


def test_paired_difference_pairs_each_prompt_with_itself():
    """b varies a lot from prompt to prompt and a = b + 0.25 everywhere: paired, every resample
    of the differences is 0.25, so the interval is that point; unpaired (a and b resampled on
    their own, or matched to other prompts) it would spread as widely as b does."""
    b = [[0.0, 1.0, 0.2, 0.9, 0.5, 0.1], [1.0, 0.0, 0.7, 0.3, 0.8, 0.4]]
    a = [[value + 0.25 for value in prompts] for prompts in b]
    assert stats.paired_difference(a, b) == pytest.approx((0.25, 0.25, 0.25))


def test_the_bootstrap_draws_each_reference_s_prompts_on_its_own():
    """Ten references with the same per-prompt values: resampling references changes nothing, so
    the interval is that of drawing 10 x 40 prompts at independent indices (half-width about
    1.96 x 0.5 / sqrt(400) = 0.049), not that of one draw of 40 indices shared by every
    reference (about 0.155)."""
    values = [[0.0, 1.0] * 20] * 10
    mean, low, high = stats.bootstrap_mean(values)
    assert mean == 0.5
    assert 0.07 < high - low < 0.13
