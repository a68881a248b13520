"""The tiny offline demo's inputs, built here with no download.

    python make_demo.py --out_dir out/demo

writes, in about 16 seconds on two CPU cores:
    out/demo/model/              a 2-block, 64-wide Hugging Face GPT-2 and a word-level tokenizer,
                                 both built in code, pretrained here on the toy world's reviews
    out/demo/sae.pt              a TopK SAE on the last block's output, saved as train.py saves one
    out/demo/pairs.jsonl         toy preference pairs (data.make_preference_pairs, train split)
    out/demo/heldout_pairs.jsonl pairs on the validation split's nouns, never trained on
"""

import argparse
import json
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

# fpo_trainer puts the repository root on sys.path: import it before data, runtime, sae.
from fpo_trainer import decoder_block, residual_stream
import data
from runtime import batch_indices, fingerprint, save_checkpoint
from sae import train_sae

EOS, UNK = "<|endoftext|>", "<unk>"


def word_tokenizer(texts: list[str]) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over the space-separated words of `texts`; EOS doubles as padding.

    Example: "review the soup :" -> ["review", "the", "soup", ":"]; an unseen word -> "<unk>".
    """
    words = sorted({word for text in texts for word in text.split()})
    vocab = {token: i for i, token in enumerate([EOS, UNK, *words])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS, pad_token=EOS,
                                   unk_token=UNK)


def token_stream(docs: list[str], tokenizer: PreTrainedTokenizerFast) -> torch.Tensor:
    """[EOS] doc1 [EOS] doc2 ... [EOS] as one LongTensor. Shape: (N,)."""
    ids = [tokenizer.eos_token_id]
    for doc in docs:
        ids += tokenizer(doc)["input_ids"] + [tokenizer.eos_token_id]
    return torch.tensor(ids)


def pretrain(model: GPT2LMHeadModel, tokens: torch.Tensor, steps: int, batch_size: int,
             lr: float, seed: int) -> None:
    """Next-token prediction on random windows of the token stream (N,), with AdamW."""
    block_size = model.config.n_positions
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    for step in range(steps):
        starts = batch_indices(len(tokens) - block_size, batch_size, seed, step)  # (B,)
        x, y = data.lm_windows(tokens, starts, block_size)  # (B, T) each
        logits = model(input_ids=x).logits  # (B, T, V)
        loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 100 == 0 or step == steps - 1:
            print(f"pretrain step {step}/{steps} | loss {loss.item():.3f}", flush=True)


@torch.no_grad()
def harvest(model: GPT2LMHeadModel, layer: int, tokens: torch.Tensor) -> torch.Tensor:
    """Block `layer`'s output at every position of the token stream (N,). Shape: (M, d_model)."""
    chunks = data.contiguous_chunks(tokens, model.config.n_positions, len(tokens))  # (R, T)
    model.eval()
    with residual_stream(decoder_block(model, layer)) as captured:
        model(input_ids=chunks)
    return captured["hidden"].flatten(0, 1)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out_dir", default="out/demo", help="where the demo's files go")
    parser.add_argument("--n_pairs", type=int, default=256, help="training pairs to export")
    parser.add_argument("--pretrain_steps", type=int, default=300, help="GPT-2 pretraining steps")
    parser.add_argument("--sae_steps", type=int, default=400, help="SAE training steps")
    parser.add_argument("--layer", type=int, default=-1, help="block the SAE reads; -1 = last")
    parser.add_argument("--seed", type=int, default=0, help="fixes the data and every weight")
    args = parser.parse_args(argv)
    out, started = Path(args.out_dir), time.time()
    torch.manual_seed(args.seed)
    # Matrices this small run fastest on one thread, and far faster than on two when other
    # processes share the cores (two threads then wait on each other at every operation).
    torch.set_num_threads(1)

    # the data: pretraining reviews, and pairs exported as JSONL
    docs = data.make_corpus(n_docs=4000, seed=args.seed)
    pairs = data.make_preference_pairs(args.n_pairs, seed=args.seed, split="train")
    heldout = data.make_preference_pairs(64, seed=args.seed, split="validation")
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in (("pairs.jsonl", pairs), ("heldout_pairs.jsonl", heldout)):
        (out / name).write_text("".join(json.dumps(asdict(pair)) + "\n" for pair in rows))

    # the model: a tokenizer and a GPT-2 built from a config, pretrained on the reviews
    texts = docs + [text for pair in pairs + heldout for text in asdict(pair).values()]
    tokenizer = word_tokenizer(texts)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=64, n_embd=64, n_layer=2,
                        n_head=4, bos_token_id=tokenizer.eos_token_id,
                        eos_token_id=tokenizer.eos_token_id)
    model = GPT2LMHeadModel(config)
    tokens = token_stream(docs, tokenizer)
    pretrain(model, tokens, args.pretrain_steps, batch_size=32, lr=3e-3, seed=args.seed)
    model.save_pretrained(out / "model")
    tokenizer.save_pretrained(out / "model")

    # the SAE: TopK, on the chosen block's output, saved in the project's sae.pt format
    activations = harvest(model, args.layer, tokens)  # (M, 64)
    sae = train_sae(activations, d_sae=256, k=8, steps=args.sae_steps, batch_size=256, lr=3e-3,
                    seed=args.seed, log_every=200)
    settings = {"d_sae": 256, "k": 8, "sae_steps": args.sae_steps, "seed": args.seed}
    made_from = {"model": fingerprint(model.state_dict()), "layer": args.layer % config.n_layer}
    save_checkpoint(out / "sae.pt", "sae", settings, made_from, **sae.checkpoint())
    print(f"demo: wrote {out}/model, sae.pt, pairs.jsonl ({len(pairs)} pairs), heldout_pairs.jsonl"
          f" ({len(heldout)} pairs) in {time.time() - started:.0f}s")


if __name__ == "__main__":
    main()
