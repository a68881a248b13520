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


def test_hidden_layer_out_of_range_is_refused_not_wrapped():
    model = GPT(GPTConfig(vocab_size=10, block_size=8, n_layer=2, n_head=2, n_embd=8))
    idx = torch.zeros(1, 4, dtype=torch.long)
    assert torch.equal(model(idx, hidden_layer=-2)[1], model(idx, hidden_layer=0)[1])
    for layer in (2, -3):
        message = f"hidden_layer {layer} is not a block of this 2-block GPT"
        with pytest.raises(ValueError, match=message):
            model(idx, hidden_layer=layer)
