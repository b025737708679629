"""The SFT, reward-model and DPO stages: data handling, losses, the offline chain SFT -> RM -> PPO, GPU recipes,
exact resume."""

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
from health import assert_healthy
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


def chatml_checkpoint(path):
    """A tiny checkpoint whose word tokenizer has a ChatML-style template: a turn ends with ``<|im_end|>`` (its
    EOS, as SmolLM2's and Qwen2.5's) followed by a newline stand-in ``<nl>``, so the template's last token is not
    the stop token."""
    from lit_rlhf.tiny import save_tiny_checkpoint, vocabulary

    save_tiny_checkpoint(path)
    tokenizer = build_word_tokenizer(words=vocabulary() + ["<|im_start|>", "<|im_end|>", "<nl>", "user", "assistant"])
    tokenizer.eos_token = "<|im_end|>"
    tokenizer.chat_template = (
        "{% for m in messages %}<|im_start|> {{ m['role'] }} <nl> {{ m['content'] }} <|im_end|> <nl> {% endfor %}"
        "{% if add_generation_prompt %}<|im_start|> assistant <nl> {% endif %}"
    )
    tokenizer.save_pretrained(path)
    import json as _json

    config = _json.loads((path / "config.json").read_text())
    config["vocab_size"] = len(tokenizer)
    (path / "config.json").write_text(_json.dumps(config))
    return str(path)


@pytest.mark.parametrize("template", ["plain", "chatml"])
def test_sft_learns_the_last_assistant_turn_of_chat_messages(template, tmp_path):
    """The completion ends at its turn's end, PPO's stop token (the tokenizer's EOS): after "very good" the
    plain template has no end-of-turn token, so EOS is added; ChatML's "<|im_end|> <nl>" is cut after
    <|im_end|> (no stray "<nl> <|im_end|>" to learn, nothing PPO would never produce)."""
    model = "builtin:tiny-llama" if template == "plain" else chatml_checkpoint(tmp_path / "chatml")
    conversation = [{"role": "user", "content": "the soup tasted"}, {"role": "assistant", "content": "very good"}]
    data = SFTDataModule(write(tmp_path, "chat.jsonl", [{"messages": conversation}] * 2), tokenizer=model,
                         batch_size=2)
    data.setup("fit")
    pair = data.train_pairs[0]
    tokenizer = build_word_tokenizer() if template == "plain" else data_tokenizer(model)
    expected = ["very", "good", "<eos>"] if template == "plain" else ["very", "good", "<|im_end|>"]
    assert tokenizer.convert_ids_to_tokens(pair.completion_ids) == expected
    assert pair.completion_ids[-1] == tokenizer.eos_token_id and pair.completion_ids.count(tokenizer.eos_token_id) == 1
    with pytest.raises(ValueError, match="the last message must be the assistant's answer"):
        SFTDataModule(write(tmp_path, "chat2.jsonl", [{"messages": conversation[:1]}] * 2),
                      tokenizer=model, batch_size=1).setup("fit")


def data_tokenizer(model):
    from lit_rlhf.models import load_tokenizer

    return load_tokenizer(model)


def test_reward_model_pairs_end_where_ppo_responses_end(tmp_path):
    """Chosen and rejected end at <|im_end|>, the position a PPO response of the same text ends at (ChatML)."""
    model = chatml_checkpoint(tmp_path / "chatml")
    turn = lambda role, content: {"role": role, "content": content}  # noqa: E731
    rows = [{"chosen": [turn("user", "my day"), turn("assistant", "very good")],
             "rejected": [turn("user", "my day"), turn("assistant", "very bad")]}] * 2
    data = PreferenceDataModule(write(tmp_path, "pairs.jsonl", rows), tokenizer=model, batch_size=2)
    data.setup("fit")
    tokenizer = data_tokenizer(model)
    chosen, rejected, _ = data.train_pairs[0]
    assert tokenizer.convert_ids_to_tokens(chosen.completion_ids) == ["very", "good", "<|im_end|>"]
    assert tokenizer.convert_ids_to_tokens(rejected.completion_ids) == ["very", "bad", "<|im_end|>"]


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
    # PPO raises the reward model's score and stays varied (it collapsed onto "superb" before kl_coef 0.5 and
    # the entropy bonus)
    assert_healthy(tmp_path / "outputs" / "chain-ppo" / "version_0", score_gain=0.7, min_distinct_2=0.6)

    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    AutoModelForCausalLM.from_pretrained(tmp_path / "outputs" / "chain" / "sft-model")
    reward_dir = tmp_path / "outputs" / "chain" / "reward-model"
    tokenizer = AutoTokenizer.from_pretrained(reward_dir)
    reward = AutoModelForSequenceClassification.from_pretrained(reward_dir)
    batch = tokenizer(["the soup tasted very good <eos>", "the soup tasted very bad <eos>"], return_tensors="pt")
    with torch.no_grad():
        good, bad = reward(**batch).logits[:, 0].tolist()
    assert good > bad


STAGE_GPU_RECIPES = ["qwen2.5-0.5b-sft.yaml", "qwen2.5-0.5b-reward-model.yaml", "qwen2.5-0.5b-dpo.yaml"]


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
        field = "backbone" if "reward" in recipe else "policy"
        model = [f"--model.init_args.{field}.model_name_or_path=builtin:tiny-qwen2"]
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
    if "dpo" in recipe:
        assert b"rewards/accuracies" in log and b"val/rewards/margins" in log
    exported = tmp_path / "outputs" / name / ("reward_model" if "reward" in recipe else "model")
    assert (exported / "config.json").exists() and (exported / "tokenizer_config.json").exists()


def stage_run(tmp_path, recipe, *args, expect=0):
    """``lit-rlhf fit`` of a stage recipe for 2 epochs on the tiny model, one metrics row per step."""
    result = run_cli(
        "fit", "--config", os.path.join(REPO_ROOT, "recipes", f"{recipe}.yaml"), "--trainer.max_epochs=2",
        "--trainer.log_every_n_steps=1", "--model.init_args.optimizer.scheduler=constant",
        f"--data.init_args.path={os.path.join(REPO_ROOT, 'recipes', 'data', STAGE_DATA[recipe][0])}",
        f"--data.init_args.val_path={os.path.join(REPO_ROOT, 'recipes', 'data', STAGE_DATA[recipe][1])}",
        *STAGE_DATA[recipe][2:], *args, cwd=tmp_path,
        env={"PYTHONPATH": os.path.dirname(__file__) + os.pathsep + os.environ.get("PYTHONPATH", "")},
    )
    assert result.returncode == expect, result.stderr[-3000:]
    return result


STAGE_DATA = {
    "sft": ("chain_sft.jsonl", "chain_sft_val.jsonl"),
    "reward-model": ("chain_preferences.jsonl", "chain_preferences_val.jsonl",
                     "--model.init_args.backbone.model_name_or_path=builtin:tiny-llama"),
    "dpo": ("chain_preferences.jsonl", "chain_preferences_val.jsonl",
            "--model.init_args.policy.model_name_or_path=builtin:tiny-llama"),
}
STAGE_METRICS = {"sft": ["train/loss", "val/loss", "val/perplexity"],
                 "reward-model": ["train/loss", "train/accuracy", "val/loss", "val/accuracy", "val/margin"],
                 "dpo": ["train/loss", "rewards/accuracies", "rewards/margins", "logps/chosen", "val/loss",
                         "val/rewards/accuracies"]}
PERIODIC = ('[{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": {"save_last": true, '
            '"every_n_train_steps": 10}}, {"class_path": "lit_rlhf.callbacks.PreemptionCheckpoint"}]')


def stage_metrics(tmp_path, recipe):
    (run_dir,) = (tmp_path / "outputs" / recipe).glob("version_*")
    frame = pd.read_csv(run_dir / "metrics.csv")
    return frame[["step", *STAGE_METRICS[recipe]]].groupby("step").first().reset_index()


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """Each stage's recipe run without a stop: the reference of the resume tests."""
    runs = {}
    for recipe in STAGE_DATA:
        runs[recipe] = tmp_path_factory.mktemp(recipe)
        stage_run(runs[recipe], recipe)
    return {recipe: stage_metrics(path, recipe) for recipe, path in runs.items()}


@pytest.mark.parametrize("recipe, stop, resume", [
    ("sft", ["--trainer.max_steps=30"], ["--trainer.max_steps=-1"]),
    ("sft", ["--trainer.callbacks+=run_probes.SignalAt", "--trainer.callbacks.batch=31"], []),
    ("sft", [f"--trainer.callbacks={PERIODIC}", "--trainer.callbacks+=run_probes.SignalAt",
             "--trainer.callbacks.batch=35", "--trainer.callbacks.signal_name=KILL"], [f"--trainer.callbacks={PERIODIC}"]),
    ("reward-model", ["--trainer.callbacks+=run_probes.SignalAt", "--trainer.callbacks.batch=31"], []),
    ("dpo", ["--trainer.callbacks+=run_probes.SignalAt", "--trainer.callbacks.batch=31"], []),
], ids=["sft-max_steps", "sft-sigterm", "sft-sigkill-after-periodic-checkpoint", "reward-model-sigterm", "dpo-sigterm"])
def test_stage_resumes_exactly_like_the_uninterrupted_run(recipe, stop, resume, uninterrupted, tmp_path):
    """Stopped (max_steps, SIGTERM mid-epoch, or killed 5 steps after a periodic checkpoint) and resumed with
    --ckpt_path last: every metric of every step equals the uninterrupted run's, each step logged once."""
    killed = "signal_name=KILL" in " ".join(stop)
    stage_run(tmp_path, recipe, *stop, expect=-9 if killed else (143 if "SignalAt" in " ".join(stop) else 0))
    stage_run(tmp_path, recipe, *resume, "--ckpt_path", "last")
    resumed = stage_metrics(tmp_path, recipe)
    pd.testing.assert_frame_equal(resumed, uninterrupted[recipe], rtol=1e-5, atol=1e-6)
    (run_dir,) = (tmp_path / "outputs" / recipe).glob("version_*")
    steps = pd.read_csv(run_dir / "metrics.csv")["step"]
    assert steps.is_monotonic_increasing  # no row of the lost steps left behind
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)  # plain data, no pickled classes
    assert all("lora_" in name or "score" in name for name in checkpoint["state_dict"])  # the trained weights only


def test_each_epoch_batches_pairs_in_its_own_order(tmp_path):
    """Lightning sets the epoch where it looks for it (``batch_sampler.sampler``): without that, every epoch of an
    SFT or reward-model run saw the same batches in the same order."""
    from lightning.fabric.utilities.data import _set_sampler_epoch

    data = SFTDataModule(os.path.join(REPO_ROOT, "recipes", "data", "chain_sft.jsonl"), tokenizer="builtin:tiny-llama",
                         batch_size=16)
    data.setup("fit")
    loader = data.train_dataloader()
    first = list(loader.batch_sampler)
    _set_sampler_epoch(loader, 1)  # what Lightning calls at the start of epoch 1
    second = list(loader.batch_sampler)
    assert first != second and sorted(sum(first, [])) == sorted(sum(second, []))
