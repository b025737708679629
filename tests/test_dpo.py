"""The DPO stage: each loss by hand, the sequence log-probs, the reference (adapter off, separate, precomputed, a
frozen copy for full fine-tuning), QLoRA and gradient checkpointing, the recipe checks, and the offline chain
SFT -> DPO as a user runs it."""

import json
import math
import os

import lightning as L
import pandas as pd
import pytest
import torch

from conftest import REPO_ROOT
from lit_rlhf.configs import OptimizerConfig
from lit_rlhf.dpo import DPOModule, preference_loss, sequence_logps
from lit_rlhf.errors import ConfigError
from lit_rlhf.models import ModelConfig
from lit_rlhf.reward_modeling import PreferenceDataModule
from test_cli import run_cli

PAIRS = os.path.join(REPO_ROOT, "recipes", "data", "chain_preferences.jsonl")
log_sigmoid = lambda x: -math.log1p(math.exp(-x))  # noqa: E731


def test_sigmoid_loss_and_rewards_by_hand():
    terms = preference_loss("sigmoid", 0.5, torch.tensor([-3.0, -6.0]), torch.tensor([-5.0, -4.0]),
                            torch.tensor([-4.0, -5.0]), torch.tensor([-4.0, -5.0]))
    # log-ratios: chosen (1, -1), rejected (-1, 1): z = 0.5 * (2, -2)
    assert terms.losses.tolist() == pytest.approx([-log_sigmoid(1.0), -log_sigmoid(-1.0)])
    assert terms.chosen_rewards.tolist() == [0.5, -0.5] and terms.rejected_rewards.tolist() == [-0.5, 0.5]


def test_conservative_dpo_label_smoothing_and_margin_by_hand():
    eps, z = 0.1, 0.5 * 2.0 - 0.4  # margin 0.4 subtracted from beta * (chosen ratio - rejected ratio)
    terms = preference_loss("sigmoid", 0.5, torch.tensor([-3.0]), torch.tensor([-5.0]), torch.tensor([-4.0]),
                            torch.tensor([-4.0]), label_smoothing=eps, margin=torch.tensor([0.4]))
    assert terms.losses.item() == pytest.approx(-(1 - eps) * log_sigmoid(z) - eps * log_sigmoid(-z))


def test_ipo_loss_uses_per_token_log_ratios_by_hand():
    beta = 0.25
    terms = preference_loss("ipo", beta, torch.tensor([-3.0]), torch.tensor([-5.0]), torch.tensor([-4.0]),
                            torch.tensor([-4.0]), chosen_lengths=torch.tensor([2.0]), rejected_lengths=torch.tensor([4.0]))
    h = 1.0 / 2 - (-1.0) / 4
    assert terms.losses.item() == pytest.approx((h - 1 / (2 * beta)) ** 2)
    assert terms.chosen_rewards.item() == pytest.approx(0.25)  # beta * log-ratio, as TRL logs it


def test_simpo_loss_is_length_normalized_and_reference_free_by_hand():
    beta, gamma, eps = 2.0, 0.5, 0.1
    terms = preference_loss("simpo", beta, torch.tensor([-3.0]), torch.tensor([-8.0]),
                            chosen_lengths=torch.tensor([3.0]), rejected_lengths=torch.tensor([4.0]), gamma=gamma,
                            label_smoothing=eps, margin=torch.tensor([0.25]))
    z = beta * (-3.0 / 3 - (-8.0 / 4)) - gamma - 0.25
    assert terms.losses.item() == pytest.approx(-(1 - eps) * log_sigmoid(z) - eps * log_sigmoid(-z))
    assert terms.chosen_rewards.item() == pytest.approx(-2.0) and terms.rejected_rewards.item() == pytest.approx(-4.0)


def test_sequence_logps_sum_the_completion_tokens_only():
    # rows of 5 tokens: the completion is tokens 2-3 (row 0) and 3-4 (row 1); token_logprobs[t - 1] is token t's
    logprobs = torch.tensor([[-1.0, -2.0, -3.0, -100.0], [-1.0, -2.0, -3.0, -4.0]])
    completion = torch.tensor([[0, 0, 1, 1, 0], [0, 0, 0, 1, 1]])  # row 0: token 4 is padding
    sums, lengths = sequence_logps(logprobs, completion)
    assert sums.tolist() == [-5.0, -7.0] and lengths.tolist() == [2.0, 2.0]


def tiny_data(batch_size=8, **kwargs):
    data = PreferenceDataModule(PAIRS, tokenizer="builtin:tiny-llama", batch_size=batch_size, max_length=32, **kwargs)
    data.setup("fit")
    return data


def tiny_module(**kwargs):
    policy = kwargs.pop("policy", ModelConfig(model_name_or_path="builtin:tiny-llama"))
    return DPOModule(policy=policy, optimizer=OptimizerConfig(lr=1e-2, scheduler="constant"), **kwargs)


def test_completion_logps_match_a_plain_log_softmax_over_the_completion():
    """Chunked log-probs, summed over the completion tokens (the stop token in, prompt and padding out)."""
    module, data = tiny_module(), tiny_data()
    module.configure_model()
    batch = data.collate(data.train_pairs[:4])
    logps, lengths = module.completion_logps(module.model, batch)
    with torch.no_grad():
        logits = module.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    for row in range(batch["input_ids"].shape[0]):
        pair = data.train_pairs[row % 4][row // 4]  # chosen rows first, then rejected
        positions = range(len(pair.prompt_ids), len(pair))
        expected = sum(torch.log_softmax(logits[row, t - 1], -1)[pair.ids[t]].item() for t in positions)
        assert logps[row].item() == pytest.approx(expected, abs=1e-4)
        assert lengths[row].item() == len(pair.completion_ids)


@pytest.mark.parametrize("disable", [True, False])
def test_disable_dropout_makes_the_log_probs_of_a_pair_repeatable(disable):
    """TRL's default: dropout off (LoRA's too), so the policy's log-probs of a pair are the same in every pass."""
    data = tiny_data()
    batch = data.collate(data.train_pairs[:4])
    module = tiny_module(policy=ModelConfig(model_name_or_path="builtin:tiny-llama", lora_dropout=0.5),
                         disable_dropout=disable)
    module.configure_model()
    module.model.train()
    for name, parameter in module.model.named_parameters():
        if "lora_B" in name:  # as after some training: the adapter's output (and its input's dropout) counts
            torch.nn.init.normal_(parameter, std=0.1)
    first, second = (module.completion_logps(module.model, batch)[0] for _ in range(2))
    assert torch.equal(first, second) == disable


def fit(module, data, steps=3):
    losses = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"]))

    module.on_train_end = lambda: None  # no export in these tests
    trainer = L.Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[Record()],
                        num_sanity_val_steps=0, limit_val_batches=0)
    trainer.fit(module, datamodule=data)
    return losses, trainer


def test_first_step_reference_is_the_policy_and_precomputing_changes_nothing():
    """The reference is the policy with its adapter off: at the first step every log-ratio is 0 and the loss
    log 2; precomputed reference log-probs give the same losses step by step."""
    torch.manual_seed(0)
    live, _ = fit(tiny_module(), tiny_data())
    torch.manual_seed(0)
    module = tiny_module(precompute_ref_logps=True)
    precomputed, _ = fit(module, tiny_data())
    assert live[0] == pytest.approx(math.log(2), abs=1e-6)
    assert precomputed == pytest.approx(live, abs=1e-6) and live[1] != live[0]
    sequences = {(len(seq.prompt_ids), *seq.ids) for pair in tiny_data().train_pairs for seq in pair[:2]}
    assert set(module._ref_logps) == sequences  # one entry per distinct training sequence


def test_separate_reference_checkpoint_is_used(tmp_path):
    """``reference.model_name_or_path``: the log-ratios are against that model, from the first step."""
    from lit_rlhf.configs import ReferenceConfig
    from lit_rlhf.tiny import save_tiny_checkpoint

    other = save_tiny_checkpoint(tmp_path / "other", seed=7)
    module, data = tiny_module(reference=ReferenceConfig(model_name_or_path=str(other))), tiny_data()
    module.configure_model()
    batch = data.collate(data.train_pairs[:4])
    reference = module._frozen["reference"]
    expected, _ = module.completion_logps(reference, batch)
    torch.testing.assert_close(module.reference_logps(batch), expected)
    with module.model.disable_adapter():
        policy, _ = module.completion_logps(module.model, batch)
    assert (policy - expected).abs().max() > 0.1  # the policy is another model


def test_full_finetune_keeps_a_frozen_copy_as_reference():
    module = tiny_module(full_finetune=True)
    torch.manual_seed(0)
    losses, _ = fit(module, tiny_data(), steps=2)
    reference = module._frozen["reference"]
    assert not any(p.requires_grad for p in reference.parameters())
    changed = [n for (n, p), q in zip(module.model.named_parameters(), reference.parameters()) if not torch.equal(p, q)]
    assert changed and losses[0] == pytest.approx(math.log(2), abs=1e-6)


def test_qlora_and_gradient_checkpointing_train_the_adapter_only():
    """4-bit base (QLoRA), activations recomputed in the backward pass: the adapter learns, the base does not."""
    pytest.importorskip("bitsandbytes")
    policy = ModelConfig(model_name_or_path="builtin:tiny-llama", quantization="4bit", gradient_checkpointing=True)
    module = tiny_module(policy=policy)
    torch.manual_seed(0)
    losses, _ = fit(module, tiny_data(), steps=3)
    trained = [n for n, p in module.model.named_parameters() if p.requires_grad]
    assert trained and all("lora_" in n for n in trained)
    assert module.model.base_model.model.model.layers[0].mlp.up_proj.base_layer.__class__.__name__ == "Linear4bit"
    assert losses[0] == pytest.approx(math.log(2), abs=1e-6)  # reference = policy before the first update
    assert any(p.abs().sum() > 0 for n, p in module.model.named_parameters() if "lora_B" in n)  # it learnt


def test_gradient_checkpointing_gives_the_same_gradients():
    data = tiny_data()
    batch = data.collate(data.train_pairs[:4])
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        module = tiny_module(policy=ModelConfig(model_name_or_path="builtin:tiny-llama",
                                                gradient_checkpointing=checkpointing))
        module.configure_model()
        module.model.train()
        module.log = lambda *args, **kwargs: None
        module._step(batch, "train").backward()
        grads.append(torch.cat([p.grad.flatten() for p in module.model.parameters() if p.requires_grad]))
    torch.testing.assert_close(grads[0], grads[1])
    assert grads[0].abs().sum() > 0


@pytest.mark.parametrize("kwargs, message", [
    ({"beta": 0.0}, "beta=0.0 must be positive"),
    ({"label_smoothing": 0.5}, r"label_smoothing=0.5 must be in \[0, 0.5\)"),
    ({"loss": "ipo", "label_smoothing": 0.1}, "no meaning for loss ipo"),
    ({"loss": "simpo", "precompute_ref_logps": True}, "no effect with loss simpo"),
    ({"loss": "simpo", "reference": {"model_name_or_path": "builtin:tiny-llama"}}, "loss simpo uses no reference"),
])
def test_bad_settings_are_refused_in_one_line(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        tiny_module(**kwargs)


def test_ipo_refuses_a_margin_column_before_loading(tmp_path):
    rows = [{"prompt": "my day", "chosen": "good", "rejected": "bad", "margin": 1.0}] * 4
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    data = PreferenceDataModule(str(path), margin_field="margin", tokenizer="builtin:tiny-llama", batch_size=2)
    module = tiny_module(loss="ipo")
    with pytest.raises(ConfigError, match="margin_field is set but loss ipo has no margin term"):
        fit(module, data)
    assert module.model is None  # refused before the weights loaded


@pytest.mark.parametrize("loss", ["ipo", "simpo"])
def test_each_loss_trains_from_a_recipe(loss, tmp_path):
    """``--model.init_args.loss`` swaps the loss; the implicit rewards separate on the held-out pairs."""
    os.symlink(os.path.join(REPO_ROOT, "recipes"), tmp_path / "recipes")
    result = run_cli(
        "fit", "--config", "recipes/dpo.yaml",
        "--model.init_args.policy.model_name_or_path=builtin:tiny-llama", f"--model.init_args.loss={loss}",
        *(["--model.init_args.beta=2.0", "--model.init_args.gamma=0.5"] if loss == "simpo" else []),
        "--trainer.max_epochs=1", "--trainer.log_every_n_steps=1",
        "--model.init_args.export_dir=exported", cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = pd.read_csv(tmp_path / "outputs" / "dpo" / "version_0" / "metrics.csv")
    margins = metrics["rewards/margins"].dropna()
    assert margins.tail(5).mean() > margins.head(5).mean()
    assert metrics["val/rewards/accuracies"].dropna().iloc[-1] > 0.6
    assert (tmp_path / "exported" / "config.json").exists()


def test_chain_sft_then_dpo_offline(tmp_path):
    """The README's two commands: the SFT model learns from the preference pairs directly; the held-out
    implicit-reward accuracy is high, TRL's metric names are logged, and the merged model loads with plain
    transformers and prefers the chosen completion more than the SFT model did."""
    os.symlink(os.path.join(REPO_ROOT, "recipes"), tmp_path / "recipes")
    for recipe in ("sft", "dpo"):
        result = run_cli("fit", "--config", f"recipes/{recipe}.yaml", cwd=tmp_path, timeout=600)
        assert result.returncode == 0, (recipe, result.stderr[-3000:])
    metrics = pd.read_csv(tmp_path / "outputs" / "dpo" / "version_0" / "metrics.csv")
    for name in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
                 "logps/rejected", "val/rewards/accuracies", "val/rewards/margins", "val/loss", "train/loss"):
        assert name in metrics, name
    assert metrics["val/rewards/accuracies"].dropna().iloc[-1] >= 0.85  # measured 0.925 (README)
    assert (tmp_path / "outputs" / "dpo" / "version_0" / "adapter" / "adapter_config.json").exists()

    from transformers import AutoModelForCausalLM

    from lit_rlhf.dpo import sequence_logps
    from lit_rlhf.models import next_token_logprobs

    data = PreferenceDataModule(os.path.join(REPO_ROOT, "recipes", "data", "chain_preferences_val.jsonl"),
                                tokenizer=str(tmp_path / "outputs" / "chain" / "sft-model"), batch_size=8)
    data.setup("fit")
    batch = data.collate(data.train_pairs)
    margins = []
    for folder in ("sft-model", "dpo-model"):
        model = AutoModelForCausalLM.from_pretrained(tmp_path / "outputs" / "chain" / folder)
        with torch.no_grad():
            logps, _ = sequence_logps(next_token_logprobs(model, batch["input_ids"], batch["attention_mask"]),
                                      batch["completion_mask"])
        chosen, rejected = logps.chunk(2)
        margins.append((chosen - rejected).mean().item())
    assert margins[1] > margins[0] + 1.0


def test_matches_trls_dpo_trainer_step_by_step():
    """benchmarks/dpo_comparison.py: the same pairs, batch order, initial adapter and settings give TRL 1.10's
    per-step loss (float32 rounding apart) and rewards/accuracies, for DPO and IPO."""
    pytest.importorskip("trl")
    import subprocess
    import sys

    command = [sys.executable, os.path.join(REPO_ROOT, "benchmarks", "dpo_comparison.py"), "--steps", "5"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=REPO_ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    comparisons = [json.loads(line) for line in result.stdout.splitlines() if '"max_abs_loss_difference"' in line]
    assert [c["loss"] for c in comparisons] == ["sigmoid", "ipo"]
    for comparison in comparisons:
        assert comparison["steps"] == 5 and comparison["steps_where_accuracies_differ"] == []
        assert comparison["max_relative_loss_difference"] < 1e-5, comparison
        assert comparison["time_ratio"] > 0 and comparison["memory_ratio"] > 0


def test_task_accuracy_scores_greedy_answers_cut_at_the_stop_token(tmp_path):
    """benchmarks/task_accuracy.py (the DPO recipes' before/after numbers): greedy, chat template, cut at EOS."""
    import sys

    sys.path.insert(0, os.path.join(REPO_ROOT, "benchmarks"))
    from task_accuracy import task_accuracy

    rows = [{"prompt": "the soup tasted"}, {"prompt": "my day was"}] * 3
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    accuracy, answers = task_accuracy("builtin:tiny-llama", str(data), reward="reward_fns:words", max_new_tokens=5,
                                      batch_size=4)
    assert len(answers) == 6 and accuracy == pytest.approx(sum(a["score"] for a in answers) / 6)
    assert answers[0]["completion"] == answers[2]["completion"]  # greedy: the same prompt, the same answer
    assert all("<eos>" not in a["completion"] and len(a["completion"].split()) <= 5 for a in answers)
    assert accuracy == pytest.approx(sum(len(a["completion"].split()) for a in answers) / 6)  # words() counts them


@pytest.mark.parametrize("loss", ["sigmoid", "simpo"])
def test_training_step_uses_the_data_margin_and_gamma(loss, tmp_path):
    """The module hands the batch's margins (``data.margin_field``) and ``gamma`` (SimPO) to the loss."""
    rows = [{"prompt": "the soup tasted", "chosen": "very good", "rejected": "very bad", "margin": 1.5},
            {"prompt": "my day was", "chosen": "great", "rejected": "awful", "margin": 0.5}]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    data = PreferenceDataModule(str(path), margin_field="margin", tokenizer="builtin:tiny-llama", batch_size=2)
    data.setup("fit")
    batch = data.collate(data.train_pairs)
    module = tiny_module(loss=loss, beta=2.0, gamma=0.3)
    module.configure_model()
    module.log = lambda *args, **kwargs: None
    logps, lengths = module.completion_logps(module.model, batch)
    chosen, rejected = logps.chunk(2)
    reference = module.reference_logps(batch).chunk(2) if loss == "sigmoid" else (None, None)
    expected = preference_loss(loss, 2.0, chosen, rejected, *reference, *lengths.chunk(2), gamma=0.3,
                               margin=torch.tensor([1.5, 0.5])).losses.mean()
    without = preference_loss(loss, 2.0, chosen, rejected, *reference, *lengths.chunk(2)).losses.mean()
    assert module._step(batch, "train").item() == pytest.approx(expected.item(), abs=1e-6)
    assert abs(expected.item() - without.item()) > 0.1
