"""FPO for Hugging Face causal LMs: a TRL trainer whose loss is fpo.py's, with the offline cache.

The loss is the repository's own (FPO paper Sec. 3; fpo.py, imported unchanged):

    loss = -log sigmoid( beta * [ (avg_logp_theta(y_w) - avg_logp_ref(y_w))
                                - (avg_logp_theta(y_l) - avg_logp_ref(y_l)) ]
                         - alpha * (beta * D(y_l) - stopgrad(beta * D(y_w))) )

    D(y) = (1/k) * sum over the top-k activated features of either side of
           (pooled_theta(y)_i - pooled_ref(y)_i)^2,  the feature MSE (fpo.cached_feature_mse);
           pooled = mean SAE code over the positions that generate y's tokens, read from the
           residual stream after block L.

The reference terms avg_logp_ref(y) and pooled_ref(y) are computed once, before training, by
fpo.build_reference_cache, with the untrained policy as the reference; they travel with each pair
as dataset columns, and no reference model exists at any time.

The residual stream is read by a forward hook on block L's output: that is the stream before any
final norm (Hugging Face's hidden_states[-1] is after the final norm, so it is not used).
"""

import contextlib
import itertools
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
import torch.nn as nn
from accelerate.utils import gather_object
from datasets import Dataset, IterableDataset
from transformers.modeling_outputs import CausalLMOutput
from trl import DPOConfig, DPOTrainer
from trl.trainer.dpo_trainer import DataCollatorForPreference

# The repository root (fpo.py, sae.py, runtime.py, data.py), last: installed packages win a clash.
sys.path.append(str(Path(__file__).resolve().parents[2]))

import fpo  # noqa: E402
from gemma_scope import JumpReLUSAE  # noqa: E402
from runtime import in_float32  # noqa: E402
from sae import SparseAutoencoder, eval_mode  # noqa: E402

# Each pair's cached reference terms, as dataset columns.
REFERENCE_COLUMNS = tuple(
    f"ref_{side}_{name}"
    for side in ("chosen", "rejected")
    for name in ("avg_logp", "feature_indices", "feature_values")
)


# ----------------------------------------------------------------------------------------------
# Reading the residual stream of a Hugging Face model


def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    """The transformer blocks: the one nn.ModuleList as long as the config's layer count.

    That is GPT-2's transformer.h and Llama's or Gemma's model.layers, found without a table of
    architectures.
    """
    n_layers = model.config.get_text_config().num_hidden_layers
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) == n_layers]
    if len(lists) != 1:
        raise ValueError(f"expected one nn.ModuleList of {n_layers} blocks, found {len(lists)}")
    return lists[0]


def decoder_block(model: nn.Module, layer: int) -> nn.Module:
    """Block `layer` of the model (-1 = the last), whose output the SAE reads."""
    blocks = decoder_blocks(model)
    if not -len(blocks) <= layer < len(blocks):
        raise ValueError(f"layer {layer} is out of range: the model has {len(blocks)} blocks")
    return blocks[layer]


@contextlib.contextmanager
def residual_stream(block: nn.Module):
    """Within the block, every forward of the model leaves block's output in captured["hidden"].

    That output is the residual stream after the block, before any final norm. The hook is
    removed on exit, so gradient checkpointing's recompute in backward never overwrites it.
    Yields captured, a dict whose "hidden" has Shape: (B, T, d_model).
    """
    captured = {}

    def keep_output(module, args, output):
        captured["hidden"] = output[0] if isinstance(output, tuple) else output

    handle = block.register_forward_hook(keep_output)
    try:
        yield captured
    finally:
        handle.remove()


def logits_and_residual(model: nn.Module, block: nn.Module, input_ids: torch.Tensor):
    """One forward: logits (B, T, V) and block's output (B, T, d_model).

    The attention mask is all ones, in the training forward and in the cache's alike: TRL's
    collator pads on the right, so under causal attention no real position ever sees a pad, and
    pads sit where response_mask is 0 and are never scored or pooled.
    """
    with residual_stream(block) as captured:
        logits = model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                       use_cache=False).logits
    return logits, captured["hidden"]


# ----------------------------------------------------------------------------------------------
# The feature term


def sparse_encoder(sae: nn.Module):
    """The SAE's sparse_encode for fpo.cached_feature_mse: rows (N, d_model) -> (values (N, m),
    indices (N, m)), the non-zero candidates of each row's code."""
    if isinstance(sae, SparseAutoencoder):
        return sae.encode_topk
    elif isinstance(sae, JumpReLUSAE):
        return sae.encode_sparse
    else:
        raise TypeError(f"expected a SparseAutoencoder or JumpReLUSAE, got {type(sae).__name__}")


# ----------------------------------------------------------------------------------------------
# The offline reference cache


@torch.no_grad()
def build_cache(
    model: nn.Module,
    block: nn.Module,
    sae: nn.Module,
    collator: DataCollatorForPreference,
    dataset: Dataset,
    batch_size: int,
) -> dict:
    """fpo.build_reference_cache over a tokenized dataset, padded by the training collator.

    Rows 0..n-1 of the cache are the n pairs' chosen responses, rows n..2n-1 their rejected ones.
    `model` is the reference: the policy before its first update. Returns the cache dict.
    """
    device = next(model.parameters()).device
    n_pairs = len(dataset)

    def batches():
        for start in range(0, n_pairs, batch_size):
            pairs = torch.arange(start, min(start + batch_size, n_pairs))
            batch = collator([dataset[i] for i in pairs.tolist()])  # rows: chosen, then rejected
            rows = torch.cat([pairs, n_pairs + pairs])
            yield rows, batch["input_ids"].to(device), batch["completion_mask"].to(device)

    with eval_mode(model):
        return fpo.build_reference_cache(
            lambda input_ids: logits_and_residual(model, block, input_ids),
            lambda hidden: in_float32(sae.encode, hidden),
            batches(),
            n_rows=2 * n_pairs,
            d_sae=sae.d_sae,
        )


def reference_columns(shards: list[tuple[list[int], dict]]) -> dict[str, pa.Array]:
    """The REFERENCE_COLUMNS of every pair, in dataset order, from each process's cache.

    shards: (pair indices, cache) per process; a cache's rows are its pairs' chosen responses,
    then their rejected ones, in the order of its pair indices (see build_cache). Feature lists
    are sliced out of each cache's compressed rows by Arrow, never as Python lists, since at
    Gemma Scope's width a response has thousands of active features.
    """
    order = np.argsort(np.concatenate([pairs for pairs, _ in shards]))  # shard order -> dataset
    columns = {}
    for side in ("chosen", "rejected"):
        avg_logps, indices, values = [], [], []
        for pairs, cache in shards:
            first = 0 if side == "chosen" else len(pairs)
            rows = slice(first, first + len(pairs))
            offsets = cache["feature_offsets"][first : first + len(pairs) + 1].numpy()
            avg_logps.append(cache["avg_logps"][rows].numpy())
            indices.append(pa.LargeListArray.from_arrays(offsets, cache["feature_indices"].numpy()))
            values.append(pa.LargeListArray.from_arrays(offsets, cache["feature_values"].numpy()))
        columns[f"ref_{side}_avg_logp"] = pa.array(np.concatenate(avg_logps)[order])
        columns[f"ref_{side}_feature_indices"] = pa.concat_arrays(indices).take(order)
        columns[f"ref_{side}_feature_values"] = pa.concat_arrays(values).take(order)
    return columns


@dataclass
class FPOCollator:
    """TRL's preference collator, plus each response's cached reference terms.

    Reference rows follow the batch's rows: the B chosen responses, then the B rejected ones.
    The pooled reference codes come as one compressed-row batch cache (offsets, indices,
    values), the format fpo.reference_pooled_features reads.
    """

    preference_collator: DataCollatorForPreference

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        batch = self.preference_collator(examples)
        rows = [(side, example) for side in ("chosen", "rejected") for example in examples]
        indices = [example[f"ref_{side}_feature_indices"] for side, example in rows]
        values = [example[f"ref_{side}_feature_values"] for side, example in rows]
        lengths = torch.tensor([0] + [len(row) for row in indices])  # (2B + 1,)
        batch["ref_avg_logps"] = torch.tensor([ex[f"ref_{side}_avg_logp"] for side, ex in rows])
        batch["ref_feature_offsets"] = lengths.cumsum(0)  # (2B + 1,)
        batch["ref_feature_indices"] = torch.tensor(list(itertools.chain(*indices)))  # (nnz,)
        batch["ref_feature_values"] = torch.tensor(list(itertools.chain(*values)))  # (nnz,)
        return batch


# ----------------------------------------------------------------------------------------------
# The trainer


@dataclass
class FPOConfig(DPOConfig):
    """DPOConfig plus FPO's settings; `beta` (DPOConfig's) scales the log-prob terms and D(y).

    DPO's own loss options (loss_type, label_smoothing, ld_alpha, f_divergence_type,
    use_weighting) do not apply to FPO and are refused, so no setting is silently ignored.
    """

    fpo_alpha: float = field(
        default=0.5,
        metadata={"help": "alpha: weight of the feature constraint; 0 is length-normalised DPO "
                          "with the offline margin"},
    )
    fpo_top_k: int = field(
        default=50,
        metadata={"help": "k of D(y): activated features each side contributes at most (not the "
                          "SAE's own TopK k)"},
    )
    fpo_layer: int = field(
        default=-1,
        metadata={"help": "block whose output (the residual stream before any final norm) the "
                          "SAE reads; -1 is the last"},
    )
    prediction_loss_only: bool = field(
        default=True,
        metadata={"help": "evaluation keeps losses and metrics, not every batch's (2B, T, V) "
                          "logits"},
    )
    precompute_ref_log_probs: bool = field(
        default=True,
        metadata={"help": "always True: FPO's reference terms are computed once, before training"},
    )

    def __post_init__(self):
        super().__post_init__()
        if not self.precompute_ref_log_probs:
            raise ValueError("FPO reads its reference terms from the offline cache: "
                             "precompute_ref_log_probs must stay True")
        if self.fpo_top_k < 1:
            raise ValueError(f"fpo_top_k must be at least 1, got {self.fpo_top_k}")
        if not self.fpo_alpha >= 0:
            raise ValueError(f"fpo_alpha must be >= 0, got {self.fpo_alpha}")
        if not self.beta > 0:
            raise ValueError(f"beta must be > 0, got {self.beta}")
        dpo_only = {"loss_type": (self.loss_type, ["sigmoid"]),
                    "label_smoothing": (self.label_smoothing, 0.0),
                    "ld_alpha": (self.ld_alpha, None),
                    "f_divergence_type": (self.f_divergence_type, "reverse_kl"),
                    "use_weighting": (self.use_weighting, False)}
        changed = [name for name, (value, default) in dpo_only.items() if value != default]
        if changed:
            raise ValueError(f"{', '.join(changed)}: DPO loss options, not used by FPO")


class NonFiniteLoss(FloatingPointError):
    """A training batch's loss is NaN or infinite: FPOTrainer stops there, as train.py does."""


class FPOTrainer(DPOTrainer):
    """TRL's DPOTrainer with FPO's loss and offline reference cache.

    Why DPOTrainer and not transformers' Trainer: DPOTrainer already turns prompt/chosen/rejected
    rows into tokens (EOS, chat templates), stacks a batch as [chosen rows; rejected rows] with a
    completion mask (the (2B, T) layout and response mask fpo.sequence_logps takes), logs TRL's
    reward metrics, and with precompute_ref_log_probs computes reference terms with the
    untrained policy before training and never creates a reference model. FPOTrainer keeps all
    of that and replaces four things: what is precomputed (`_precompute_ref_logps`: FPO's
    cache), the collator (adds the cached terms), the columns kept, and the loss.

    Tested with one process and with DDP (several processes). FSDP and DeepSpeed are refused:
    their sharded policy is not what this cache or the forward hook were tested with.

    Logged per step, as TRL names them: rewards/chosen, rewards/rejected, rewards/margins,
    rewards/accuracies, logps/chosen, logps/rejected (FPO's average log-probs, where TRL's DPO
    logs summed ones), and feature_mse/chosen, feature_mse/rejected (mean D(y)).
    """

    _tag_names = ["trl", "fpo"]
    _name = "FPO"
    # The ICML 2025 paper, arXiv 2411.07618 (v4); its earlier arXiv versions are titled "Direct
    # Preference Optimization Using Sparse Feature-Level Constraints".
    _paper = {
        "title": "Constrain Alignment with Sparse Autoencoders",
        "id": "2411.07618",
        "citation": "@inproceedings{yin2025constrain,\n"
                    "  title     = {Constrain Alignment with Sparse Autoencoders},\n"
                    "  author    = {Yin, Qingyu and others},\n"
                    "  booktitle = {International Conference on Machine Learning (ICML)},\n"
                    "  year      = {2025},\n"
                    "  note      = {arXiv:2411.07618}\n}",
    }

    def __init__(self, model, sae: nn.Module, args: FPOConfig, train_dataset, processing_class,
                 eval_dataset=None, callbacks=None):
        """model: a loaded PreTrainedModel, the policy and (before its first update) the reference.
        sae: SparseAutoencoder or JumpReLUSAE for block args.fpo_layer; it is frozen here."""
        if args.fsdp or args.deepspeed:
            raise ValueError("FPOTrainer is tested with one process or DDP; not FSDP or DeepSpeed")
        d_model = model.config.get_text_config().hidden_size
        if sae.d_model != d_model:
            raise ValueError(f"the SAE reads {sae.d_model}-wide vectors; the model's are {d_model}")
        # Both are needed by _precompute_ref_logps, which DPOTrainer.__init__ calls.
        self.block = decoder_block(model, args.fpo_layer)
        self.sae = sae.to(args.device).eval().requires_grad_(False)
        self.sparse_encode = sparse_encoder(self.sae)
        if processing_class.pad_token is None:  # as DPOTrainer does, before building its collator
            processing_class.pad_token = processing_class.eos_token
        preference_collator = DataCollatorForPreference(
            pad_token_id=processing_class.pad_token_id,
            max_length=args.max_length,
            truncation_mode=args.truncation_mode,
            pad_to_multiple_of=args.pad_to_multiple_of,
        )
        super().__init__(
            model=model,
            ref_model=None,
            args=args,
            data_collator=FPOCollator(preference_collator),
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            callbacks=callbacks,
        )

    def _set_signature_columns_if_needed(self):
        """Keep the cached reference columns when unused columns are removed."""
        super()._set_signature_columns_if_needed()
        self._signature_columns = [*self._signature_columns, *REFERENCE_COLUMNS]

    def _precompute_ref_logps(self, dataset: Dataset, name: str, batch_size: int) -> Dataset:
        """FPO's reference terms of every pair, added to `dataset` as REFERENCE_COLUMNS.

        Replaces DPOTrainer's precompute of summed log-probs. Runs in DPOTrainer.__init__, before
        any update, so self.model is the reference. Each process builds the cache of every
        num_processes-th pair, and every process receives all of them.
        """
        if isinstance(dataset, IterableDataset):
            raise ValueError(f"the {name} dataset is an IterableDataset; the cache needs a Dataset")
        if len(dataset) == 0:  # DPOTrainer drops the pairs whose prompt alone fills max_length
            raise ValueError(f"the {name} dataset has no pair left once tokenized: each prompt "
                             f"fills max_length {self.args.max_length}; raise it")
        rank, world = self.accelerator.process_index, self.accelerator.num_processes
        if len(dataset) < world:
            raise ValueError(f"the {name} dataset has {len(dataset)} pairs, fewer than the "
                             f"{world} processes")
        pairs = list(range(rank, len(dataset), world))
        collator = self.data_collator.preference_collator
        with self.accelerator.autocast():  # the precision the training forward runs in
            cache = build_cache(self.model, self.block, self.sae, collator,
                                dataset.select(pairs), batch_size)
        shards = gather_object([(pairs, cache)])  # one (pairs, cache) per process, rank order
        for column_name, column in reference_columns(shards).items():
            dataset = dataset.add_column(column_name, column)
        return dataset

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """FPO's loss of one batch (FPO paper Sec. 3): one forward of [chosen; rejected] rows.

        inputs: FPOCollator's batch: input_ids and completion_mask (2B, T), ref_avg_logps (2B,)
        and the batch cache of pooled reference codes. Returns the mean loss over the B pairs.
        """
        input_ids, response_mask = inputs["input_ids"], inputs["completion_mask"]  # (2B, T)
        n_pairs = len(input_ids) // 2
        logits, hidden = logits_and_residual(model, self.block, input_ids)  # (2B, T, V), (2B, T, C)
        sum_logps, n_tokens = fpo.sequence_logps(logits, input_ids, response_mask)  # (2B,), (2B,)
        avg_logps = sum_logps / n_tokens  # avg_logp_theta(y)
        batch_cache = {"feature_offsets": inputs["ref_feature_offsets"],
                       "feature_indices": inputs["ref_feature_indices"],
                       "feature_values": inputs["ref_feature_values"],
                       "d_sae": self.sae.d_sae}  # row r of it is row r of the batch
        feature_mse = fpo.cached_feature_mse(
            hidden,
            response_mask,
            self.sparse_encode,
            batch_cache,
            row_ids=torch.arange(2 * n_pairs, device=input_ids.device),
            k=self.args.fpo_top_k,
        )  # D(y), (2B,)
        reference_avg_logps = inputs["ref_avg_logps"]  # avg_logp_ref(y), (2B,)
        losses, chosen_rewards, rejected_rewards = fpo.fpo_loss(
            avg_logps[:n_pairs],
            avg_logps[n_pairs:],
            reference_avg_logps[:n_pairs],
            reference_avg_logps[n_pairs:],
            feature_mse[:n_pairs],
            feature_mse[n_pairs:],
            beta=self.beta,
            alpha=self.args.fpo_alpha,
        )
        mode = "train" if self.model.training else "eval"
        if mode == "train" and not torch.isfinite(losses).all():
            # before the update: the weights that gave it are not stepped on, nor recorded
            raise NonFiniteLoss(f"the loss is {losses.mean().item()} at step "
                                f"{self.state.global_step}")
        self.record_metrics(mode, chosen_rewards, rejected_rewards, avg_logps.detach(),
                            feature_mse.detach())
        loss = losses.mean()
        return (loss, CausalLMOutput(logits=logits)) if return_outputs else loss

    def record_metrics(self, mode: str, chosen_rewards: torch.Tensor,
                       rejected_rewards: torch.Tensor, avg_logps: torch.Tensor,
                       feature_mse: torch.Tensor) -> None:
        """Batch means over every process, in DPOTrainer's store that its `log` averages.

        chosen_rewards, rejected_rewards: Shape: (B,). avg_logps, feature_mse: Shape: (2B,).
        """
        n_pairs = len(chosen_rewards)
        values = {
            "rewards/chosen": chosen_rewards,
            "rewards/rejected": rejected_rewards,
            "rewards/margins": chosen_rewards - rejected_rewards,
            "rewards/accuracies": (chosen_rewards > rejected_rewards).float(),
            "logps/chosen": avg_logps[:n_pairs],
            "logps/rejected": avg_logps[n_pairs:],
            "feature_mse/chosen": feature_mse[:n_pairs],
            "feature_mse/rejected": feature_mse[n_pairs:],
        }
        for name, value in values.items():
            mean = self.accelerator.gather_for_metrics(value).mean()
            self._metrics[mode][name].append(mean.item())
