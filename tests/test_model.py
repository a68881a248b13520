"""The GPT: causality, hidden-state capture and patching, generation."""

import pytest
import torch

from model import GPT, GPTConfig


def tiny_gpt(seed=0, **overrides):
    torch.manual_seed(seed)
    sizes = {"vocab_size": 50, "block_size": 16, "n_layer": 3, "n_head": 2, "n_embd": 16}
    config = GPTConfig(**{**sizes, **overrides})
    return GPT(config).eval()


def test_changing_a_later_token_never_changes_earlier_logits():
    model = tiny_gpt()
    idx = torch.randint(0, 50, (2, 12), generator=torch.Generator().manual_seed(0))
    changed = idx.clone()
    changed[:, 7] = (changed[:, 7] + 1) % 50
    logits, hidden = model(idx, hidden_layer=1)
    changed_logits, changed_hidden = model(changed, hidden_layer=1)
    torch.testing.assert_close(changed_logits[:, :7], logits[:, :7])
    torch.testing.assert_close(changed_hidden[:, :7], hidden[:, :7])
    assert not torch.allclose(changed_logits[:, 7:], logits[:, 7:])


def test_hidden_state_is_the_residual_stream_after_the_chosen_block():
    model = tiny_gpt()
    idx = torch.randint(0, 50, (2, 10), generator=torch.Generator().manual_seed(1))
    x = model.wte(idx) + model.wpe(torch.arange(10))
    streams = []
    for block in model.blocks:
        x = block(x)
        streams.append(x)
    for layer in range(3):
        _, hidden = model(idx, hidden_layer=layer)
        torch.testing.assert_close(hidden, streams[layer])
    _, last = model(idx, hidden_layer=-1)
    torch.testing.assert_close(last, streams[-1])
    logits, _ = model(idx, hidden_layer=-1)
    torch.testing.assert_close(logits, model.lm_head(model.ln_f(streams[-1])))
    assert model(idx)[1] is None


def test_hidden_patch_replaces_the_stream_downstream_only():
    model = tiny_gpt()
    idx = torch.randint(0, 50, (2, 10), generator=torch.Generator().manual_seed(2))
    logits, hidden = model(idx, hidden_layer=0)
    same_logits, same_hidden = model(idx, hidden_layer=0, hidden_patch=lambda h: h.clone())
    torch.testing.assert_close(same_logits, logits)
    zeroed_logits, zeroed_hidden = model(idx, hidden_layer=0, hidden_patch=torch.zeros_like)
    torch.testing.assert_close(zeroed_hidden, hidden)  # the returned stream is the unpatched one
    assert not torch.allclose(zeroed_logits, logits)


def test_generate_is_reproducible_and_stops_at_eos():
    model = tiny_gpt()
    prompt = torch.randint(0, 50, (3, 4), generator=torch.Generator().manual_seed(3))
    a, b = (
        model.generate(
            prompt,
            max_new_tokens=8,
            temperature=1.0,
            top_k=5,
            generator=torch.Generator().manual_seed(7),
        )
        for _ in range(2)
    )
    assert torch.equal(a, b) and a.shape == (3, 12) and torch.equal(a[:, :4], prompt)
    greedy = model.generate(prompt, max_new_tokens=8, temperature=0.0)
    eos = int(greedy[0, 4])  # whatever row 0 emits first becomes "eos"
    stopped = model.generate(prompt, max_new_tokens=8, temperature=0.0, eos_id=eos)
    assert torch.all(stopped[0, 4:] == eos)


def test_generate_with_top_k_one_is_greedy():
    model = tiny_gpt()
    prompt = torch.randint(0, 50, (2, 3), generator=torch.Generator().manual_seed(4))
    sampled = model.generate(
        prompt,
        max_new_tokens=6,
        temperature=1.0,
        top_k=1,
        generator=torch.Generator().manual_seed(0),
    )
    assert torch.equal(sampled, model.generate(prompt, max_new_tokens=6, temperature=0.0))


def uncached_generate(model, idx, max_new_tokens, temperature, top_k, generator):
    """The plain way to sample: rerun the whole sequence for every new token."""
    for _ in range(max_new_tokens):
        logits = model(idx)[0][:, -1, :] / temperature
        kth = torch.topk(logits, top_k).values[:, -1:]
        probs = torch.softmax(logits.masked_fill(logits < kth, float("-inf")), dim=-1)
        idx = torch.cat([idx, torch.multinomial(probs, 1, generator=generator)], dim=1)
    return idx


def test_the_kv_cache_gives_the_full_forwards_logits_and_tokens():
    model = tiny_gpt()
    idx = torch.randint(0, 50, (3, 12), generator=torch.Generator().manual_seed(5))
    kv_cache = [[] for _ in model.blocks]
    prompt_logits, _ = model(idx[:, :4], kv_cache=kv_cache)  # the prompt at once
    step_logits = [model(idx[:, t : t + 1], kv_cache=kv_cache)[0] for t in range(4, 12)]
    cached = torch.cat([prompt_logits, *step_logits], dim=1)
    torch.testing.assert_close(cached, model(idx)[0], rtol=1e-5, atol=1e-5)
    assert kv_cache[0][0].shape == (3, 2, 12, 8)  # (B, n_head, tokens seen, head size)
    prompt = idx[:, :4]
    for seed in range(5):
        sampled = model.generate(prompt, 12, 1.0, 5, generator=torch.Generator().manual_seed(seed))
        plain = uncached_generate(model, prompt, 12, 1.0, 5, torch.Generator().manual_seed(seed))
        assert torch.equal(sampled, plain)


def test_generate_refuses_to_run_past_the_context():
    model = tiny_gpt()  # block_size 16
    with pytest.raises(ValueError, match="sequence of 17 tokens exceeds block_size 16"):
        model.generate(torch.zeros(1, 4, dtype=torch.long), max_new_tokens=14)
    # the last token sampled is never read: 4 + 13 tokens, of which the model reads 16
    assert model.generate(torch.zeros(1, 4, dtype=torch.long), max_new_tokens=13).shape == (1, 17)


def test_hidden_layer_out_of_range_is_refused_not_wrapped():
    model = GPT(GPTConfig(vocab_size=10, block_size=8, n_layer=2, n_head=2, n_embd=8))
    idx = torch.zeros(1, 4, dtype=torch.long)
    assert torch.equal(model(idx, hidden_layer=-2)[1], model(idx, hidden_layer=0)[1])
    for layer in (2, -3):
        message = f"hidden_layer {layer} is not a block of this 2-block GPT"
        with pytest.raises(ValueError, match=message):
            model(idx, hidden_layer=layer)
