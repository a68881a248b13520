"""Everything a stage reads, loaded in one place: the corpus and pairs this run's flags name, and
each checkpoint, refused unless made from what this run asks for (the format is runtime.py's)."""

from dataclasses import asdict
from pathlib import Path

import torch

import data
from config import Config
from model import GPT, GPTConfig
from runtime import (
    UsageError, check_made_from, fingerprint, load_checkpoint, restore, save_checkpoint,
)
from sae import load_sae


def check_inputs_and_outputs(cfg: Config) -> None:
    """Read the corpus and the pairs (the toy world's or the user's files) and try --out_dir once
    at start-up, so bad data, a data-dependent limit or an unwritable directory stops the run
    before any training."""
    enc = data.load_tokenizer()
    block_size = cfg.pretrain.block_size
    n_tokens = len(data.corpus_token_stream(load_texts(cfg), enc))
    if n_tokens < 5 * block_size:  # pretraining windows, and the SAE's held-out fifth
        corpus = cfg.run.corpus_file or f"the toy corpus (--n_docs {cfg.pretrain.n_docs})"
        raise data.DataError(
            corpus,
            line=None,
            problem=f"too short: {n_tokens} tokens, at least {5 * block_size} "
            f"(5 x --block_size {block_size}) are needed",
        )
    train_pairs, test_pairs = load_pairs(cfg)
    tokenize(train_pairs, enc, block_size, "training")
    tokenize(test_pairs, enc, block_size, "held-out")
    probe = Path(cfg.run.out_dir) / ".write_test"
    try:
        probe.parent.mkdir(parents=True, exist_ok=True)
        probe.write_text("")
        probe.unlink()
    except OSError as error:
        raise UsageError(
            f"--out_dir {cfg.run.out_dir!r} cannot be written to ({error.strerror})"
        ) from None


def load_texts(cfg: Config) -> list[str]:
    if cfg.run.corpus_file:
        return data.load_corpus(cfg.run.corpus_file)
    return data.make_corpus(cfg.pretrain.n_docs, seed=cfg.run.seed)


def load_pairs(cfg: Config):
    """(train pairs, held-out pairs): the toy world's, or the user's file split."""
    if cfg.run.preference_file:
        return data.split_preference_file(
            cfg.run.preference_file, cfg.run.skip_bad_rows, cfg.prefer.n_test_pairs
        )
    train_pairs = data.make_preference_pairs(cfg.prefer.n_pairs, seed=cfg.run.seed, split="train")
    test_pairs = data.make_preference_pairs(
        cfg.prefer.n_test_pairs, seed=cfg.run.seed, split="test"
    )
    return train_pairs, test_pairs


def tokenize(pairs, enc, block_size: int, what: str):
    tokenized, dropped = data.tokenize_pairs(pairs, enc, block_size)
    if dropped["no room"]:
        print(
            f"data: dropped {dropped['no room']} {what} pairs whose response would not fit "
            f"the {block_size}-token context"
        )
    if dropped["identical"]:
        print(
            f"data: dropped {dropped['identical']} {what} pairs whose chosen and rejected "
            f"responses are the same tokens once cut to the {block_size}-token context"
        )
    if not tokenized:
        raise UsageError(f"no {what} pairs left after truncation to {block_size} tokens")
    return tokenized


def load_gpt(cfg: Config, device) -> tuple[GPT, str]:
    """The pretrained GPT, checked against this run's model settings, and its fingerprint."""
    path = Path(cfg.run.out_dir) / "gpt.pt"
    ckpt = load_checkpoint(path, "gpt", "run `python train.py --stage pretrain` first")
    # A new tokenizer changes the vocabulary.
    asked_config = asdict(cfg.pretrain) | {"vocab_size": data.load_tokenizer().n_vocab}
    for name in ("vocab_size", "n_layer", "n_head", "n_embd", "block_size"):
        saved = ckpt["model_config"][name]
        asked = asked_config[name]
        if saved != asked:
            raise UsageError(
                f"{path} was trained with {name}={saved}, but this run asks for {name}={asked}: "
                "rerun `--stage pretrain` with these settings, or drop the override"
            )
    model = restore(path, "rerun `--stage pretrain`", lambda: gpt_from(ckpt))
    # The fingerprint is of the weights themselves, so no edit escapes it.
    return model.to(device), fingerprint(ckpt["state_dict"])


def gpt_from(ckpt: dict) -> GPT:
    model = GPT(GPTConfig(**ckpt["model_config"]))
    model.load_state_dict(ckpt["state_dict"])
    return model


def load_trained_sae(cfg: Config, gpt_fingerprint: str, device) -> tuple[torch.nn.Module, str]:
    """The frozen SAE, refused unless it was trained on this GPT's residual stream at this layer."""
    path = Path(cfg.run.out_dir) / "sae.pt"
    ckpt = load_checkpoint(path, "sae", "run `python train.py --stage sae` first")
    expected = {"GPT": gpt_fingerprint, "layer": cfg.sae.sae_layer % cfg.pretrain.n_layer}
    check_made_from(path, ckpt, expected, "rerun `--stage sae`")
    sae = restore(path, "rerun `--stage sae`", lambda: load_sae(ckpt))
    return sae.to(device).eval().requires_grad_(False), fingerprint(ckpt["state_dict"])


def save_policy(path: Path, settings: dict, made_from: dict, policy: GPT) -> None:
    """A policy checkpoint: its settings, what it was trained from, its weights."""
    save_checkpoint(path, "policy", settings, made_from, model_config=asdict(policy.config),
                    state_dict=policy.state_dict())


def load_policy(cfg: Config, tag: str, reference: GPT, made_from: dict, device) -> tuple[GPT, dict]:
    """The trained policy out_dir/<tag>.pt, frozen, refused unless it was trained from this
    reference and SAE; and the settings it was trained with."""
    path = Path(cfg.run.out_dir) / f"{tag}.pt"
    ckpt = load_checkpoint(path, "policy", "run `python train.py --stage prefer` first")
    if ckpt["model_config"] != asdict(reference.config):
        raise UsageError(
            f"{path} was trained from another GPT than {cfg.run.out_dir}/gpt.pt: "
            "rerun `--stage prefer`"
        )
    check_made_from(path, ckpt, made_from, "rerun `--stage prefer`")
    policy = restore(path, "rerun `--stage prefer`", lambda: gpt_from(ckpt)).to(device)
    return policy.eval().requires_grad_(False), ckpt["config"]
