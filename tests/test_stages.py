"""The SFT and reward-model stages: data handling, losses, the offline chain SFT -> RM -> PPO, GPU recipes."""

import json
import os

import pandas as pd
import pytest
import torch

from conftest import REPO_ROOT
from lit_rlhf.pairs import encode
from lit_rlhf.reward_modeling import PreferenceDataModule, RewardModelModule
from lit_rlhf.sft import SFTDataModule
from lit_rlhf.tiny import build_word_tokenizer
from test_cli import run_cli


def write(tmp_path, name, rows):
    path = tmp_path / name
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def test_completion_tokens_follow_the_prompt_and_end_with_eos():
    tokenizer = build_word_tokenizer()
    pair = encode(tokenizer, "the soup tasted", "very good", chat=False)
    assert tokenizer.convert_ids_to_tokens(pair.prompt_ids) == ["the", "soup", "tasted"]
    assert tokenizer.convert_ids_to_tokens(pair.completion_ids) == ["very", "good", "<eos>"]


def test_sft_data_masks_completions_and_counts_drops(tmp_path):
    rows = [{"prompt": "the soup tasted", "completion": "very good"}, {"prompt": "my day", "completion": " "},
            {"prompt": "the movie was", "completion": "good " * 40}, {"prompt": "it was", "completion": "fine"}]
    data = SFTDataModule(write(tmp_path, "sft.jsonl", rows), tokenizer="builtin:tiny-llama", batch_size=2,
                         max_length=8)
    with pytest.warns(UserWarning, match="1 pairs with an empty completion dropped; 1 pairs longer than "
                                         "data.max_length=8 tokens dropped"):
        data.setup("fit")
    assert len(data.train_pairs) == 2
    batch = data.collate(data.train_pairs)
    assert batch["completion_mask"][0].tolist() == [0, 0, 0, 1, 1, 1]  # "very good <eos>" after the prompt
    assert batch["attention_mask"][1].tolist() == [1, 1, 1, 1, 0, 0]  # right padding
    truncating = SFTDataModule(write(tmp_path, "sft2.jsonl", rows), tokenizer="builtin:tiny-llama", batch_size=2,
                               max_length=8, overlong="truncate")
    with pytest.warns(UserWarning, match="truncated"):
        truncating.setup("fit")
    assert max(len(p) for p in truncating.train_pairs) == 8
    with pytest.raises(ValueError, match=r"'completion' is not a column of data.path=.*'answer', 'prompt'"):
        SFTDataModule(write(tmp_path, "bad.jsonl", [{"prompt": "a", "answer": "b"}]), tokenizer="builtin:tiny-llama",
                      batch_size=1).setup("fit")


def test_sft_learns_the_last_assistant_turn_of_chat_messages(tmp_path):
    conversation = [{"role": "user", "content": "the soup tasted"}, {"role": "assistant", "content": "very good"}]
    data = SFTDataModule(write(tmp_path, "chat.jsonl", [{"messages": conversation}] * 2),
                         tokenizer="builtin:tiny-llama", batch_size=2)
    data.setup("fit")
    pair = data.train_pairs[0]
    tokenizer = build_word_tokenizer()
    assert tokenizer.decode(pair.completion_ids).split() == ["very", "good", "<eos>"]
    with pytest.raises(ValueError, match="the last message must be the assistant's answer"):
        SFTDataModule(write(tmp_path, "chat2.jsonl", [{"messages": conversation[:1]}] * 2),
                      tokenizer="builtin:tiny-llama", batch_size=1).setup("fit")


def test_preference_data_drops_ties_and_empty_answers_and_checks_margins(tmp_path):
    rows = [{"prompt": "the soup tasted", "chosen": "good", "rejected": "bad", "margin": 1.0},
            {"prompt": "my day", "chosen": "fine", "rejected": "fine", "margin": 0.0},
            {"prompt": "it was", "chosen": "", "rejected": "bad", "margin": 0.0},
            {"prompt": "the movie was", "chosen": "great", "rejected": "awful", "margin": 0.5}]
    data = PreferenceDataModule(write(tmp_path, "pref.jsonl", rows), margin_field="margin",
                                tokenizer="builtin:tiny-llama", batch_size=2)
    with pytest.warns(UserWarning, match="dropped 1 pairs whose chosen and rejected completions are the same and 1 "
                                         "with an empty completion"):
        data.setup("fit")
    batch = data.collate(data.train_pairs)
    assert batch["input_ids"].shape[0] == 4 and batch["margin"].tolist() == [1.0, 0.5]
    rows[0]["margin"] = "big"
    with pytest.raises(ValueError, match=r"row 1: margin column 'margin' holds 'big', not a number"):
        PreferenceDataModule(write(tmp_path, "pref2.jsonl", rows), margin_field="margin",
                             tokenizer="builtin:tiny-llama", batch_size=1).setup("fit")


def test_bradley_terry_loss_accuracy_and_centering(tmp_path):
    module = RewardModelModule(center_coef=0.5)
    logged = {}
    module.log = lambda name, value, **kw: logged.__setitem__(name, float(value))
    module.pair_scores = lambda batch: (torch.tensor([2.0, 0.0]), torch.tensor([1.0, 1.0]))
    loss = module._step({"margin": torch.tensor([0.0, 0.5])}, "train")
    expected = -(torch.nn.functional.logsigmoid(torch.tensor([1.0, -1.5]))).mean() + 0.5 * (9 + 1) / 2
    assert loss.item() == pytest.approx(expected.item())
    assert logged["train/accuracy"] == 0.5 and logged["train/margin"] == 0.0


def test_chain_sft_then_reward_model_then_ppo_offline(tmp_path):
    """The README's three commands: SFT loss falls, the reward model is accurate on held-out pairs, and PPO
    raises that reward model's score; both exported models load with plain transformers."""
    os.symlink(os.path.join(REPO_ROOT, "recipes"), tmp_path / "recipes")
    for recipe in ("sft", "reward-model", "chain-ppo"):
        result = run_cli("fit", "--config", f"recipes/{recipe}.yaml", cwd=tmp_path, timeout=600)
        assert result.returncode == 0, (recipe, result.stderr[-3000:])

    sft = pd.read_csv(tmp_path / "outputs" / "sft" / "version_0" / "metrics.csv")
    train_loss = sft["train/loss"].dropna().tolist()
    assert train_loss[-1] < train_loss[0] - 1.5
    assert sft["val/loss"].dropna().iloc[-1] < sft["val/loss"].dropna().iloc[0]
    rm = pd.read_csv(tmp_path / "outputs" / "reward-model" / "version_0" / "metrics.csv")
    assert rm["val/accuracy"].dropna().iloc[-1] >= 0.85  # measured 0.913 (README)
    ppo = pd.read_csv(tmp_path / "outputs" / "chain-ppo" / "version_0" / "metrics.csv")
    scores = ppo["objective/scores"].dropna().tolist()
    assert sum(scores[-10:]) / 10 > sum(scores[:10]) / 10 + 1.0

    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    AutoModelForCausalLM.from_pretrained(tmp_path / "outputs" / "chain" / "sft-model")
    reward_dir = tmp_path / "outputs" / "chain" / "reward-model"
    tokenizer = AutoTokenizer.from_pretrained(reward_dir)
    reward = AutoModelForSequenceClassification.from_pretrained(reward_dir)
    batch = tokenizer(["the soup tasted very good <eos>", "the soup tasted very bad <eos>"], return_tensors="pt")
    with torch.no_grad():
        good, bad = reward(**batch).logits[:, 0].tolist()
    assert good > bad


STAGE_GPU_RECIPES = ["qwen2.5-0.5b-sft.yaml", "qwen2.5-0.5b-reward-model.yaml"]


@pytest.mark.parametrize("recipe", STAGE_GPU_RECIPES)
def test_stage_gpu_recipe_dry_run_with_tiny_substitutes(recipe, tmp_path):
    """The recipe as shipped (chat-message data, bf16 autocast, LoRA settings, export), on tiny local stand-ins."""
    with open(os.path.join(REPO_ROOT, "recipes", "data", "chain_preferences.jsonl")) as file:
        pairs = [json.loads(line) for line in file][:32]
    turn = lambda role, content: {"role": role, "content": content}  # noqa: E731
    if "sft" in recipe:
        rows = [{"messages": [turn("user", p["prompt"]), turn("assistant", p["chosen"])]} for p in pairs]
        model = ["--model.init_args.policy.model_name_or_path=builtin:tiny-qwen2"]
    else:
        rows = [{"prompt": p["prompt"], "chosen": [turn("user", p["prompt"]), turn("assistant", p["chosen"])],
                 "rejected": [turn("user", p["prompt"]), turn("assistant", p["rejected"])]} for p in pairs]
        model = ["--model.init_args.backbone.model_name_or_path=builtin:tiny-qwen2"]
    data = write(tmp_path, "data.jsonl", rows)
    result = run_cli(
        "fit", "--config", os.path.join(REPO_ROOT, "recipes", recipe), "--trainer.accelerator=cpu", *model,
        f"--data.init_args.path={data}", f"--data.init_args.val_path={data}", "--data.init_args.max_length=32",
        "--trainer.max_steps=2", "--trainer.val_check_interval=2", "--trainer.limit_val_batches=1",
        "--trainer.log_every_n_steps=1", cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    name = recipe.removesuffix(".yaml")
    log = next((tmp_path / "outputs" / name / "wandb").glob("offline-run-*/*.wandb")).read_bytes()
    assert b"train/loss" in log and b"val/" in log
    exported = tmp_path / "outputs" / name / ("model" if "sft" in recipe else "reward_model")
    assert (exported / "config.json").exists() and (exported / "tokenizer_config.json").exists()
