"""The FPO trainer for TRL, tested offline on the CPU with the tiny demo (conftest.demo)."""

import gc
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, Gemma2Config, Gemma2ForCausalLM, PreTrainedModel
from trl import DPOConfig, DPOTrainer

import fpo
import make_demo
import train_fpo
from conftest import HERE, run_readme_command
from data import DataError
from dp_steps import StepRecorder
from fpo_trainer import REFERENCE_COLUMNS, FPOConfig, FPOTrainer, decoder_block, residual_stream
from runtime import UsageError, save_checkpoint
from sae import initialize_sae


TRL_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
               "logps/chosen", "logps/rejected", "feature_mse/chosen", "feature_mse/rejected")


def tiny_config(tmp_path, **overrides) -> FPOConfig:
    """Settings every in-process trainer here shares: CPU, float32, nothing saved or reported."""
    settings = dict(output_dir=str(tmp_path / "run"), use_cpu=True, bf16=False, report_to="none",
                    save_strategy="no", disable_tqdm=True, dataloader_pin_memory=False,
                    max_length=64, beta=2.0, fpo_alpha=0.5, fpo_top_k=8, learning_rate=1e-3,
                    per_device_train_batch_size=8, logging_steps=1)
    return FPOConfig(**(settings | overrides))


def load_demo(demo, n_pairs: int):
    """The demo's model, tokenizer, last-block SAE and first n_pairs training pairs."""
    model, tokenizer = train_fpo.load_model(str(demo / "model"))
    sae = train_fpo.load_sae_file(str(demo / "sae.pt"), layer=-1, n_layers=2)
    pairs = train_fpo.load_pairs(str(demo / "pairs.jsonl")).select(range(n_pairs))
    return model, tokenizer, sae, pairs


def live_models() -> set[int]:
    """ids of every Hugging Face model object alive in this process (a GPT-2 counts twice: the
    LM and the GPT2Model inside it)."""
    gc.collect()
    return {id(obj) for obj in gc.get_objects() if isinstance(obj, PreTrainedModel)}


@pytest.fixture(scope="module")
def block0_saes(demo, tmp_path_factory) -> dict:
    """Block 0's SAEs as files: a TopK sae.pt (initialised from block 0's activations) and a
    random JumpReLU params.npz in Gemma Scope's layout."""
    folder = tmp_path_factory.mktemp("saes")
    model, tokenizer = train_fpo.load_model(str(demo / "model"))
    texts = [row["prompt"] + row["chosen"] for row in map(json.loads, open(demo / "pairs.jsonl"))]
    activations = make_demo.harvest(model, 0, make_demo.token_stream(texts, tokenizer))  # (M, 64)
    topk = initialize_sae(activations, d_sae=64, k=8, seed=0)
    save_checkpoint(folder / "sae.pt", "sae", {}, {"layer": 0}, **topk.checkpoint())
    generator = torch.Generator().manual_seed(0)
    W_enc = (torch.randn(64, 64, generator=generator) / 8).numpy()
    np.savez(folder / "params.npz", W_enc=W_enc, W_dec=W_enc.T, b_enc=np.zeros(64, np.float32),
             b_dec=np.zeros(64, np.float32), threshold=np.full(64, 0.2, np.float32))
    return {"topk": folder / "sae.pt", "jumprelu": folder / "params.npz"}


def hand_loss(policy, reference, sae, input_ids, response_mask, layer: int, config: FPOConfig,
              alpha: float):
    """FPO's mean loss and D(y) straight from fpo.py, sharing nothing with the trainer: block
    `layer`'s output is hidden_states[layer + 1] (true for every block but the last), codes are
    pooled densely, and the reference terms come from a reference model, not from the cache."""
    n_pairs = len(input_ids) // 2

    def avg_logps_and_pooled(model):
        out = model(input_ids=input_ids, output_hidden_states=True)
        sum_logps, n_tokens = fpo.sequence_logps(out.logits, input_ids, response_mask)
        codes = sae.encode(out.hidden_states[layer + 1])  # (2B, T, d_sae)
        return sum_logps / n_tokens, fpo.pooled_features(codes, response_mask)

    avg_logps, pooled = avg_logps_and_pooled(policy)
    with torch.no_grad():
        reference_avg_logps, reference_pooled = avg_logps_and_pooled(reference)
    feature_mse = fpo.feature_mse(pooled, reference_pooled, config.fpo_top_k)
    losses, _, _ = fpo.fpo_loss(
        avg_logps[:n_pairs], avg_logps[n_pairs:],
        reference_avg_logps[:n_pairs], reference_avg_logps[n_pairs:],
        feature_mse[:n_pairs], feature_mse[n_pairs:],
        beta=config.beta, alpha=alpha,
    )
    return losses.mean(), feature_mse.detach()


@pytest.mark.parametrize("sae_kind, checkpointing",
                         [("topk", False), ("topk", True), ("jumprelu", False)])
def test_one_step_equals_fpo_loss_by_hand(demo, block0_saes, tmp_path, sae_kind, checkpointing):
    """A trainer step's loss and gradient equal fpo.fpo_loss by hand on the same batch and
    weights. The policy is moved off the reference after the cache is built, so D(y) and its
    gradient are not zero and the constraint is part of what is compared."""
    model, tokenizer, _, pairs = load_demo(demo, n_pairs=8)
    sae = train_fpo.load_sae_file(str(block0_saes[sae_kind]), layer=0, n_layers=2)
    config = tiny_config(tmp_path, fpo_layer=0, max_steps=1, max_grad_norm=0.0,
                         gradient_checkpointing=checkpointing)
    recorder = StepRecorder()
    trainer = FPOTrainer(model, sae, config, train_dataset=pairs, processing_class=tokenizer,
                         callbacks=[recorder])
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    policy = train_fpo.load_model(str(demo / "model"))[0].eval()  # a second copy, off the trainer
    policy.load_state_dict(model.state_dict())
    reference = train_fpo.load_model(str(demo / "model"))[0].eval()  # the cache's weights
    trainer.train()  # one step over all 8 pairs

    batch = trainer.data_collator.preference_collator([trainer.train_dataset[i] for i in range(8)])
    inputs = (policy, reference, sae, batch["input_ids"], batch["completion_mask"], 0, config)
    loss, feature_mse = hand_loss(*inputs, alpha=config.fpo_alpha)
    loss.backward()
    grad = torch.cat([parameter.grad.flatten() for parameter in policy.parameters()])
    assert trainer.state.log_history[0]["loss"] == pytest.approx(loss.item(), rel=1e-5)
    assert (recorder.grads[0] - grad).norm() <= 1e-5 * grad.norm()
    assert (feature_mse > 0).all()
    without_constraint, _ = hand_loss(*inputs, alpha=0.0)
    assert abs(without_constraint.item() - loss.item()) > 1e-3  # the constraint is in the loss


def test_hook_reads_the_residual_stream_before_the_final_norm(demo):
    """Block -1's hooked output is the stream before the final norm (Gemma Scope's resid_post):
    the final norm of it is Hugging Face's hidden_states[-1], and it differs from that; block 0's
    hooked output is hidden_states[1]. For GPT-2 and for a tiny Gemma-2 built from a config."""
    gpt2 = AutoModelForCausalLM.from_pretrained(demo / "model")
    gemma = Gemma2ForCausalLM(Gemma2Config(vocab_size=64, hidden_size=32, intermediate_size=64,
                                           num_hidden_layers=2, num_attention_heads=2,
                                           num_key_value_heads=1, head_dim=16))
    input_ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(0))
    for model, final_norm in ((gpt2, gpt2.transformer.ln_f), (gemma, gemma.model.norm)):
        model.eval()
        with residual_stream(decoder_block(model, -1)) as last, \
                residual_stream(decoder_block(model, 0)) as first:
            hidden_states = model(input_ids=input_ids, output_hidden_states=True).hidden_states
        assert torch.allclose(final_norm(last["hidden"]), hidden_states[-1], atol=1e-5)
        assert not torch.allclose(last["hidden"], hidden_states[-1], atol=1e-2)
        assert torch.equal(first["hidden"], hidden_states[1])
    with pytest.raises(ValueError, match="out of range"):
        decoder_block(gpt2, 2)


def test_no_reference_model_is_held(demo, tmp_path):
    """Building the trainer (and so the cache) creates no second model, and none is kept. The
    control: TRL's own DPOTrainer without precompute loads one, and the same check sees it."""
    model, tokenizer, sae, pairs = load_demo(demo, n_pairs=8)
    before = live_models()
    trainer = FPOTrainer(model, sae, tiny_config(tmp_path), train_dataset=pairs,
                         processing_class=tokenizer)
    assert trainer.ref_model is None
    assert live_models() - before == set()
    assert set(REFERENCE_COLUMNS) <= set(trainer.train_dataset.column_names)

    dpo_model = train_fpo.load_model(str(demo / "model"))[0]
    before = live_models()
    dpo_config = DPOConfig(output_dir=str(tmp_path / "dpo"), use_cpu=True, bf16=False,
                           report_to="none", max_length=64, dataloader_pin_memory=False)
    dpo = DPOTrainer(dpo_model, args=dpo_config, train_dataset=pairs, processing_class=tokenizer)
    assert id(dpo.ref_model) in live_models() - before


def test_readme_tiny_run_raises_reward_accuracy(demo):
    """The README's tiny command, as written: before training the policy is its own cached
    reference (every reward 0); after it, most training pairs are ranked right, and the model
    saved in --output_dir loads, next to the log of every metric."""
    run_readme_command(1, demo)
    run = json.loads((demo / "fpo" / "fpo_run.json").read_text())
    before, after = run["before"], run["after"]
    assert abs(before["eval_rewards/chosen"]) < 1e-6
    assert abs(before["eval_rewards/margins"]) < 1e-6
    assert after["eval_rewards/accuracies"] >= 0.85
    assert after["eval_rewards/accuracies"] > before["eval_rewards/accuracies"] + 0.3
    assert after["eval_rewards/margins"] > 0.5
    assert after["eval_feature_mse/rejected"] > 0
    assert AutoModelForCausalLM.from_pretrained(demo / "fpo").config.n_layer == 2
    history = json.loads((demo / "fpo" / "trainer_state.json").read_text())["log_history"]
    logged = [entry for entry in history if "loss" in entry]  # every --log_every (10) steps
    assert len(logged) == 4
    assert all(set(TRL_METRICS) <= set(entry) for entry in logged)


def test_save_and_reload_round_trip(demo, tmp_path):
    """trainer.save_model writes the trained weights and tokenizer; train_fpo.load_model reads
    back the same tensors and the same predictions."""
    model, tokenizer, sae, pairs = load_demo(demo, n_pairs=16)
    start = {name: value.clone() for name, value in model.state_dict().items()}
    trainer = FPOTrainer(model, sae, tiny_config(tmp_path, max_steps=3), train_dataset=pairs,
                         processing_class=tokenizer)
    trainer.train()
    trainer.save_model(str(tmp_path / "saved"))
    reloaded, reloaded_tokenizer = train_fpo.load_model(str(tmp_path / "saved"))
    trained = model.state_dict()
    assert any(not torch.equal(start[name], trained[name]) for name in start)
    assert reloaded.state_dict().keys() == trained.keys()
    assert all(torch.equal(value, trained[name]) for name, value in reloaded.state_dict().items())
    assert reloaded_tokenizer.get_vocab() == tokenizer.get_vocab()
    input_ids = tokenizer(pairs[0]["prompt"] + pairs[0]["chosen"], return_tensors="pt").input_ids
    model.eval()
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=input_ids).logits, model(input_ids=input_ids).logits)


def test_data_parallel_matches_one_process(demo, tmp_path):
    """Two DDP processes (torchrun, gloo on the CPU) with 4 pairs each give the loss and the
    gradient of one process with all 8, at the first step (which also checks the cache each
    process built half of) and at the second, where the feature term is live."""
    pairs_file = tmp_path / "pairs8.jsonl"
    pairs_file.write_text("".join(open(demo / "pairs.jsonl").readlines()[:8]))
    flags = ["--model", str(demo / "model"), "--sae", str(demo / "sae.pt"),
             "--data", str(pairs_file), "--beta", "2", "--fpo_top_k", "8", "--lr", "1e-3",
             "--steps", "2", "--max_length", "64", "--max_grad_norm", "0", "--log_every", "1",
             "--cpu"]
    script = str(HERE / "tests" / "dp_steps.py")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    runs = {
        "one": [sys.executable, script, str(tmp_path / "one.pt"), *flags, "--batch_size", "8",
                "--output_dir", str(tmp_path / "one")],
        "two": [*torchrun, script, str(tmp_path / "two.pt"), *flags, "--batch_size", "4",
                "--output_dir", str(tmp_path / "two")],
    }
    processes = {name: subprocess.Popen(argv, cwd=HERE, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, text=True)
                 for name, argv in runs.items()}
    for name, process in processes.items():
        output, _ = process.communicate(timeout=300)
        assert process.returncode == 0, f"{name}:\n{output[-4000:]}"
    one, two = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    assert (one["processes"], two["processes"]) == (1, 2)
    assert len(one["losses"]) == len(two["losses"]) == 2
    for step in range(2):
        assert two["losses"][step] == pytest.approx(one["losses"][step], rel=1e-5)
        assert (two["grads"][step] - one["grads"][step]).norm() <= 1e-5 * one["grads"][step].norm()
    assert one["feature_mse"][1] > 0


def test_bad_input_stops_with_one_error_line(demo, tmp_path):
    """The script's own process: a missing --data file is one 'error:' line and exit code 2."""
    missing = tmp_path / "missing.jsonl"
    result = subprocess.run(
        [sys.executable, "train_fpo.py", "--model", str(demo / "model"), "--sae",
         str(demo / "sae.pt"), "--data", str(missing), "--output_dir", str(tmp_path / "out")],
        cwd=HERE, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == \
        f"error: {missing}: cannot read file (No such file or directory)"
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("change, error, message", [
    ({"--data": "bad_json"}, DataError, "line 2: invalid JSON"),
    ({"--data": "no_rejected"}, DataError, "line 1: 'rejected' is missing"),
    ({"--model": "{tmp}/no_model"}, UsageError, "--model .*: cannot load it"),
    ({"--sae": "{tmp}/no_sae.pt"}, UsageError, "no_sae.pt not found"),
    ({"--sae": "not_npz"}, UsageError, "--sae .*not_npz.npz"),
    ({"--sae": "narrow_npz"}, UsageError, "reads 32-wide vectors; the model's are 64"),
    ({"--layer": "0"}, UsageError, "trained on block 1, not --layer 0"),
    ({"--layer": "2"}, UsageError, "--layer 2 is out of range"),
    ({"--fpo_top_k": "0"}, UsageError, "fpo_top_k must be at least 1"),
    ({"--steps": "0"}, UsageError, "--steps must be at least 1, got 0"),
    ({"--lr": "nan"}, UsageError, "--lr must be a finite number > 0, got nan"),
    ({"--lr": "0"}, UsageError, "--lr must be a finite number > 0, got 0.0"),
    ({"--beta": "inf"}, UsageError, "--beta must be a finite number > 0, got inf"),
    ({"--alpha": "inf"}, UsageError, "--alpha must be a finite number, got inf"),
    ({"--max_length": "1"}, UsageError,
     "the train dataset has no pair left once tokenized: each prompt fills --max_length 1"),
    ({"--model": "wide_model"}, UsageError, "--model .*: its weights do not fit its config.json"),
])
def test_bad_input_errors(demo, tmp_path, change, error, message):
    """Each bad input is refused, before any training, with an error naming what is wrong."""
    files = {"bad_json": tmp_path / "bad.jsonl", "no_rejected": tmp_path / "no_rejected.jsonl",
             "not_npz": tmp_path / "not_npz.npz", "narrow_npz": tmp_path / "narrow.npz",
             "wide_model": tmp_path / "wide_model"}
    # the demo's weights under a config.json that says the model is twice as wide
    shutil.copytree(demo / "model", files["wide_model"])
    config = json.loads((demo / "model" / "config.json").read_text())
    config["n_embd"] *= 2
    (files["wide_model"] / "config.json").write_text(json.dumps(config))
    files["bad_json"].write_text(open(demo / "pairs.jsonl").readline() + "{not json\n")
    files["no_rejected"].write_text('{"prompt": "a", "chosen": " b"}\n')
    files["not_npz"].write_text("not a zip file")
    narrow = {"W_enc": np.zeros((32, 16)), "W_dec": np.zeros((16, 32)), "b_enc": np.zeros(16),
              "b_dec": np.zeros(32), "threshold": np.zeros(16)}
    np.savez(files["narrow_npz"], **narrow)
    flags = {"--model": str(demo / "model"), "--sae": str(demo / "sae.pt"),
             "--data": str(demo / "pairs.jsonl"), "--output_dir": str(tmp_path / "out")}
    for flag, value in change.items():
        flags[flag] = str(files[value]) if value in files else value.format(tmp=tmp_path)
    argv = [word for flag_and_value in flags.items() for word in flag_and_value]
    with pytest.raises(error, match=message):
        train_fpo.build_trainer(train_fpo.build_parser().parse_args(argv))


def test_a_missing_package_is_one_error_line_naming_the_requirements():
    """Without the integration's own packages (here: trl made unimportable), the script says what
    to install, not a ModuleNotFoundError traceback."""
    script = ("import runpy, sys\n"
              "sys.modules['trl'] = None\n"
              "sys.argv = ['train_fpo.py', '--help']\n"
              "runpy.run_path('train_fpo.py', run_name='__main__')\n")
    result = subprocess.run([sys.executable, "-c", script], cwd=HERE, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.splitlines() == [
        f"error: the package 'trl' is not installed: pip install -r {HERE / 'requirements.txt'}"
    ]


def test_a_non_finite_loss_stops_training_and_saves_nothing(demo, tmp_path):
    """As train.py: a learning rate far too high stops at the first NaN loss, before its update,
    with one line, and no model is written."""
    out = tmp_path / "out"
    argv = ["--model", str(demo / "model"), "--sae", str(demo / "sae.pt"), "--data",
            str(demo / "pairs.jsonl"), "--lr", "1e4", "--batch_size", "16", "--steps", "8",
            "--cpu", "--output_dir", str(out)]
    with pytest.raises(UsageError, match=r"the loss is nan at step \d+; training stopped; "
                                         r"likely cause: --lr or --beta too high; nothing was"):
        train_fpo.main(argv)
    assert not list(out.glob("*.safetensors")) and not (out / "fpo_run.json").exists()
