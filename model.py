"""A small GPT, written from scratch, that can return the residual stream of any block.

The model is a standard pre-norm decoder-only transformer:

    h_0 = wte[idx] + wpe[pos]
    h_l = h_{l-1} + attn(ln(h_{l-1}));  h_l = h_l + mlp(ln(h_l))     for l = 1..n_layer
    logits = lm_head(ln_f(h_L))

FPO reads the residual stream h_L after the last block, before the final norm, as the paper does;
`forward(..., hidden_layer=...)` returns it, and `hidden_patch` replaces it (to splice in an SAE
reconstruction when measuring the SAE). No hooks: the stream is passed around explicitly.
`generate` samples with a KV cache: each new token attends to the keys and values kept so far.
"""

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class GPTConfig:
    vocab_size: int = 1024  # set from the tokenizer
    block_size: int = 64  # context length in tokens
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0  # 0 keeps training a deterministic function of the data order


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        assert config.n_embd % config.n_head == 0, "n_embd must be divisible by n_head"
        self.n_head = config.n_head
        self.qkv = nn.Linear(config.n_embd, 3 * config.n_embd)
        self.proj = nn.Linear(config.n_embd, config.n_embd)
        self.dropout = config.dropout

    def forward(self, x, kv_cache: list | None = None):
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)  # each (B, T, C)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        if kv_cache is not None:  # sampling: earlier tokens' keys and values, kept across calls
            if kv_cache:
                k, v = torch.cat([kv_cache[0], k], dim=2), torch.cat([kv_cache[1], v], dim=2)
            kv_cache[:] = [k, v]  # (B, nh, T_so_far, hs) each
        dropout_p = self.dropout if self.training else 0.0
        # A cached step's one query may see every earlier token: the mask is needed only for T > 1
        y = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1, dropout_p=dropout_p)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, nh, T, hs) -> (B, T, C)
        return self.proj(y)


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.proj = nn.Linear(4 * config.n_embd, config.n_embd)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.proj(F.gelu(self.fc(x))))


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd)
        self.mlp = MLP(config)

    def forward(self, x, kv_cache: list | None = None):
        x = x + self.attn(self.ln_1(x), kv_cache)
        x = x + self.mlp(self.ln_2(x))
        return x


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.blocks = nn.ModuleList([Block(config) for _ in range(config.n_layer)])
        self.ln_f = nn.LayerNorm(config.n_embd)
        # Untied head: with tied weights the last residual stream must serve as both an input
        # embedding and an output query; untied keeps that stream (which the SAE reads) free.
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.apply(self._init_weights)
        # GPT-2's scaled init of the projections that write into the residual stream.
        for name, p in self.named_parameters():
            if name.endswith("proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(
        self,
        idx: torch.Tensor,
        hidden_layer: int | None = None,
        hidden_patch: Callable[[torch.Tensor], torch.Tensor] | None = None,
        kv_cache: list[list] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Run the model.

        Args:
            idx: token ids. Shape: (B, T), T <= block_size.
            hidden_layer: block index (0..n_layer-1, or -1 for the last) whose output residual
                stream is returned; None returns no hidden state.
            hidden_patch: if given (needs hidden_layer), the residual stream after that block is
                replaced by hidden_patch(h) before the remaining blocks run.
            kv_cache: for sampling, one list per block ([] at first) that keeps the keys and
                values of the tokens seen so far; idx then holds only the tokens after those
                (the prompt at first, then one token per call).

        Returns:
            logits: float32. Shape: (B, T, vocab_size).
            hidden: the unpatched residual stream after block `hidden_layer`, or None.
                Shape: (B, T, n_embd).
        """
        B, T = idx.shape
        seen = kv_cache[0][0].shape[2] if kv_cache and kv_cache[0] else 0  # tokens already cached
        if seen + T > self.config.block_size:
            raise ValueError(
                f"sequence of {seen + T} tokens exceeds block_size {self.config.block_size}"
            )
        if hidden_patch is not None and hidden_layer is None:
            raise ValueError("hidden_patch needs hidden_layer")
        n_layer = self.config.n_layer
        if hidden_layer is not None and not -n_layer <= hidden_layer < n_layer:
            raise ValueError(
                f"hidden_layer {hidden_layer} is not a block of this {n_layer}-block GPT"
            )
        layer = None if hidden_layer is None else hidden_layer % n_layer  # -1: the last block
        pos = torch.arange(seen, seen + T, device=idx.device)
        x = self.wte(idx) + self.wpe(pos)  # (B, T, C)
        hidden = None
        for i, block in enumerate(self.blocks):
            x = block(x, None if kv_cache is None else kv_cache[i])  # (B, T, C)
            if i == layer:
                hidden = x
                if hidden_patch is not None:
                    x = hidden_patch(x)
        logits = self.lm_head(self.ln_f(x)).float()  # (B, T, V)
        return logits, hidden

    @torch.no_grad()
    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        eos_id: int | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Sample continuations of a batch of equal-length prompts.

        Each step runs only the newest token, attending to the cached keys and values of the
        earlier ones (the prompt's are computed once), so sampling costs O(T) per token, not O(T^2).

        Args:
            idx: prompt token ids. Shape: (B, T0).
            max_new_tokens: tokens to add (fewer if every row has emitted eos_id); the model
                reads all but the last, so T0 + max_new_tokens - 1 must fit in block_size.
            temperature: softmax temperature; 0 means greedy.
            top_k: sample only among the top_k most likely tokens.
            eos_id: rows that emitted it keep emitting it, and generation stops once all have.
            generator: the random stream, so sampling is reproducible.

        Returns:
            prompt followed by the new tokens. Shape: (B, T0 + n_new).
        """
        done = torch.zeros(idx.shape[0], dtype=torch.bool, device=idx.device)
        kv_cache = [[] for _ in self.blocks]
        new_tokens = idx  # what the next call has not seen: the prompt, then the last token
        for _ in range(max_new_tokens):
            logits, _ = self(new_tokens, kv_cache=kv_cache)
            logits = logits[:, -1, :]  # (B, V)
            if temperature == 0:
                next_id = logits.argmax(dim=-1, keepdim=True)  # (B, 1)
            else:
                logits = logits / temperature
                if top_k is not None:
                    kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                probs = F.softmax(logits, dim=-1)
                next_id = torch.multinomial(probs, num_samples=1, generator=generator)  # (B, 1)
            if eos_id is not None:
                next_id = next_id.masked_fill(done[:, None], eos_id)
                done |= next_id[:, 0] == eos_id
            idx = torch.cat([idx, next_id], dim=1)
            new_tokens = next_id
            if eos_id is not None and bool(done.all()):
                break
        return idx
