"""The critic-free family (GRPO, RLOO, REINFORCE++), DAPO's knobs, the adapter critic, evaluation: real
iterations on tiny models, and each estimator from a recipe on the command line."""

import os

import lightning as L
import pandas as pd
import pytest
import torch

from conftest import REPO_ROOT
from lit_rlhf import PolicyConfig, PPOModule, PromptDataModule, SamplingConfig
from lit_rlhf.module import OptimizerConfig, PPOConfig, ReferenceConfig, RewardConfig
from test_cli import run_cli
from health import assert_healthy
from test_module import Recorder, fit

CATEGORIES = os.path.join(REPO_ROOT, "recipes", "data", "word_categories.jsonl")
GRPO_QUICKSTART = ["--config", os.path.join(REPO_ROOT, "recipes", "grpo-quickstart.yaml"),
                   f"--data.path={CATEGORIES}",
                   f"--data.val_path={os.path.join(REPO_ROOT, 'recipes', 'data', 'word_categories_val.jsonl')}"]


def grpo_module(ppo=None, generations=4, max_new_tokens=3, reward="lit_rlhf.rewards:first_word_match", **kw):
    return PPOModule(
        policy=PolicyConfig("builtin:tiny-llama", lora_r=8, lora_alpha=16), reward=RewardConfig(function=reward),
        generation=SamplingConfig(max_new_tokens=max_new_tokens, temperature=1.0, num_generations=generations),
        ppo=ppo or PPOConfig(advantage_estimator="grpo", ppo_epochs=1, num_minibatches=2, kl_coef=0.0,
                             kl_in_loss=True),
        optimizer=OptimizerConfig(lr=3e-3, scheduler="constant"), **kw,
    )


def category_data(batch_size=4):
    return PromptDataModule(CATEGORIES, tokenizer="builtin:tiny-llama", batch_size=batch_size, max_prompt_length=16)


def rollout(module, batch_size=4):
    module.configure_model()
    data = category_data(batch_size)
    data.setup("fit")
    module._trainer = None
    return module.producer(next(iter(data.train_dataloader())))


def test_grpo_has_no_value_function_and_trains_only_the_adapter(tmp_path):
    L.seed_everything(0)
    module = grpo_module()
    module.configure_model()
    assert module.policy.value_head is None
    assert all("lora_" in name for name, p in module.named_parameters() if p.requires_grad)
    recorder = Recorder()
    fit(module, category_data(), tmp_path, limit_train_batches=3, callbacks=[recorder])
    assert "loss/value_avg" not in recorder.history and "val/clipfrac_avg" not in recorder.history
    assert len(recorder.history["loss/kl_avg"]) == 3  # the k3 KL in the loss
    assert all(torch.isfinite(torch.tensor(recorder.history["loss/policy_avg"])))
    data = category_data()
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    rolled = module.producer(batch)
    assert rolled.query_responses.shape[0] == 16  # 4 prompts x 4 generations
    assert rolled.prompts[:4] == [batch["prompts"][0]] * 4  # a group: consecutive rows of one prompt
    per_response = rolled.advantages.sum(1) / rolled.mask.sum(1)
    groups = per_response.view(4, 4)
    torch.testing.assert_close(groups.mean(1), torch.zeros(4), atol=1e-5, rtol=0)  # group-centered


def test_no_reference_at_all_without_kl(tmp_path, monkeypatch):
    L.seed_everything(0)
    ppo = PPOConfig(advantage_estimator="rloo", ppo_epochs=1, num_minibatches=2, kl_coef=0.0)
    with pytest.warns(UserWarning, match="reference is not used and not loaded"):
        module = grpo_module(ppo=ppo, reference=ReferenceConfig("builtin:tiny-llama"))
        module.configure_model()
    assert module.reference is None and not module.uses_reference
    monkeypatch.setattr(module, "reference_logprobs", lambda *a: pytest.fail("the reference was computed"))
    fit(module, category_data(), tmp_path, limit_train_batches=2)


@pytest.mark.parametrize("estimator", ["reinforce_pp", "reinforce_pp_baseline"])
def test_reinforce_pp_whitens_returns_over_the_batch(estimator):
    """Advantages by hand from the rollout's scores and KL: returns of the KL-penalized token rewards (the
    group's mean score subtracted first for the baseline variant), whitened over the batch."""
    L.seed_everything(0)
    # completion length in characters: scores that differ within each group, whatever the policy writes
    module = grpo_module(ppo=PPOConfig(advantage_estimator=estimator, kl_coef=0.05, num_minibatches=2),
                         reward="reward_fns:characters")
    rolled = rollout(module)
    from lit_rlhf.ppo import discounted_returns, group_baseline, last_valid_index, masked_mean, masked_var, masked_whiten

    scores = group_baseline(rolled.scores, 4) if estimator == "reinforce_pp_baseline" else rolled.scores
    rewards = -0.05 * rolled.kl
    rewards[torch.arange(16), last_valid_index(rolled.mask)] += scores
    expected = masked_whiten(discounted_returns(rewards, rolled.mask, 1.0), rolled.mask)
    torch.testing.assert_close(rolled.advantages, expected, rtol=1e-5, atol=1e-6)
    assert masked_mean(rolled.advantages, rolled.mask).item() == pytest.approx(0.0, abs=1e-5)
    assert masked_var(rolled.advantages, rolled.mask).item() == pytest.approx(1.0, rel=1e-4)
    assert rolled.values is None
    assert rolled.scores.view(4, 4).mean(1).abs().min() > 1  # the group baseline has something to subtract


def test_dynamic_sampling_replaces_groups_without_signal(tmp_path):
    """Only food prompts can score: every other group is all zeros, dropped and replaced by new prompts."""
    L.seed_everything(0)
    ppo = PPOConfig(advantage_estimator="grpo", ppo_epochs=1, num_minibatches=2, kl_coef=0.0, dynamic_sampling=True,
                    dynamic_sampling_max_retries=2)
    module = grpo_module(ppo=ppo, reward="reward_fns:food_prompts_only")
    recorder = Recorder()
    fit(module, category_data(batch_size=4), tmp_path, limit_train_batches=2, callbacks=[recorder])
    assert max(recorder.history["dynamic_sampling/dropped_groups"]) > 0
    assert max(recorder.history["dynamic_sampling/retries"]) >= 1
    rolled = module.latest_rollout
    assert rolled.query_responses.shape[0] == 16  # the batch keeps its size
    informative = (rolled.scores.view(4, 4).std(1) > 0).sum().item()
    filled = recorder.history["dynamic_sampling/filled_with_dropped"][-1]
    assert informative == 4 - filled


def test_overlong_penalty_and_masked_truncation():
    """Each score is its raw score plus DAPO's penalty for its length (0 up to max_new_tokens - buffer, then
    linear to -penalty); truncated responses (no stop token) keep their scores but contribute no loss."""
    from lit_rlhf.tiny import NEUTRAL_WORDS

    L.seed_everything(0)
    module = grpo_module(max_new_tokens=4, reward="reward_fns:words")
    module.sampling.stop_tokens = NEUTRAL_WORDS[:60]  # frequent: responses of 1 to 4 tokens
    module.reward_config.overlong_penalty, module.reward_config.overlong_buffer = 0.5, 2
    module.reward_config.mask_truncated = True
    rolled = rollout(module)
    lengths = rolled.mask.sum(1)
    raw = torch.tensor([float(len(c.split())) for c in rolled.completions])
    penalty = -0.5 * ((lengths - 2) / 2).clamp(0, 1)  # 0 up to 4 - 2 = 2 tokens, -0.25 at 3, -0.5 at 4
    torch.testing.assert_close(rolled.scores, raw + penalty)
    assert set(penalty.tolist()) >= {0.0, -0.25, -0.5}
    responses = rolled.query_responses[:, rolled.context_length:]
    last = responses.gather(1, (lengths.long() - 1).unsqueeze(1)).squeeze(1)
    truncated = ~torch.isin(last, torch.tensor(module.stop_token_ids))  # no stop token within max_new_tokens
    assert truncated.any() and (~truncated).any()
    assert (rolled.loss_mask.sum(1)[truncated] == 0).all()  # no loss from cut-off responses
    assert torch.equal(rolled.loss_mask[~truncated], rolled.mask[~truncated])


def test_adapter_critic_is_a_second_adapter_on_the_same_base(tmp_path):
    L.seed_everything(0)
    module = PPOModule(
        policy=PolicyConfig("builtin:tiny-llama", lora_r=8, lora_alpha=16, critic="adapter", value_head_init_std=0.1),
        reward=RewardConfig(function="lit_rlhf.rewards:sentiment_lexicon"),
        generation=SamplingConfig(max_new_tokens=6, temperature=1.0), ppo=PPOConfig(ppo_epochs=1, num_minibatches=2),
        optimizer=OptimizerConfig(lr=1e-2, scheduler="constant"),
    )
    module.configure_model()
    names = [name for name, p in module.named_parameters() if p.requires_grad]
    assert any(".critic." in n for n in names) and any(".default." in n for n in names)
    base = {n: p.detach().clone() for n, p in module.named_parameters() if not p.requires_grad}
    before = {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}
    fit(module, PromptDataModule(os.path.join(REPO_ROOT, "recipes", "data", "sentiment_prompts.jsonl"),
                                 tokenizer="builtin:tiny-llama", batch_size=8, max_prompt_length=16), tmp_path)
    changed = {n for n, p in module.named_parameters() if n in before and not torch.equal(p, before[n])}
    assert any(".critic." in n and "lora_B" in n for n in changed)  # the critic adapter trained
    assert any(".default." in n and "lora_B" in n for n in changed)  # and the policy adapter
    assert all(torch.equal(p, base[n]) for n, p in module.named_parameters() if n in base)  # base frozen
    assert all(p.requires_grad == (".critic." in n or ".default." in n or "value_head" in n)
               for n, p in module.named_parameters())  # peft's set_adapter did not change what trains
    saved = (tmp_path / "policy" / "adapter_model.safetensors")
    from safetensors.torch import load_file

    assert not any("critic" in key for key in load_file(saved))  # the exported adapter is the policy's only


def test_group_estimators_need_groups():
    with pytest.raises(ValueError, match="set generation.num_generations to 2 or more"):
        grpo_module(generations=1).configure_model()
    module = grpo_module(generations=3)
    module.ppo_config.num_minibatches = 5
    with pytest.raises(ValueError, match=r"data.batch_size=4 x generation.num_generations=3 = 12 responses is not "
                                         r"divisible by ppo.num_minibatches=5 x ppo.gradient_accumulation_steps=1"):
        module.minibatch_sizes(4)


def test_grpo_quickstart_raises_the_held_out_pass_rate(tmp_path):
    """The recipe as shipped: training pass rate from near 0, held-out eval/pass@1 at least 0.5 at the end."""
    result = run_cli("fit", *GRPO_QUICKSTART, cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = pd.read_csv(tmp_path / "outputs" / "grpo-quickstart" / "version_0" / "metrics.csv")
    train = metrics["objective/scores"].dropna().tolist()
    evaluation = metrics.dropna(subset=["eval/pass@1"])
    assert sum(train[:10]) / 10 < 0.15
    assert evaluation["eval/pass@1"].iloc[0] < 0.2  # evaluation.before_training: where the policy started
    assert evaluation["eval/pass@1"].iloc[-1] >= 0.5
    assert (evaluation["eval/pass@4"].dropna() >= evaluation["eval/pass@1"][evaluation["eval/pass@4"].notna()]).all()
    # healthy: learns, and each prompt's completions stay varied (it collapsed to "table table table" once)
    assert_healthy(tmp_path / "outputs" / "grpo-quickstart" / "version_0", score_gain=0.5, min_distinct_2=0.6)
    assert (tmp_path / "outputs" / "grpo-quickstart" / "version_0" / "checkpoints" / "last.ckpt").exists()


ESTIMATOR_RUNS = {
    "grpo-dapo": ["--model.ppo.advantage_estimator=grpo", "--model.ppo.loss_aggregation=seq_mean_token_sum_norm",
                  "--model.ppo.clip_range_high=0.28", "--model.ppo.dynamic_sampling=true",
                  "--model.reward.overlong_penalty=0.5", "--model.reward.overlong_buffer=1"],
    "grpo-batch-scale-gspo": ["--model.ppo.scale_rewards=batch", "--model.ppo.importance_sampling_level=sequence",
                              "--model.ppo.clip_range=3e-4", "--model.ppo.clip_range_high=4e-4"],
    "rloo": ["--model.ppo.advantage_estimator=rloo", "--model.ppo.loss_aggregation=seq_mean_token_mean",
             "--model.ppo.kl_in_loss=false", "--model.ppo.kl_coef=0.01"],
    "reinforce_pp": ["--model.ppo.advantage_estimator=reinforce_pp", "--model.ppo.kl_coef=0.01",
                     "--model.ppo.kl_in_loss=false", "--model.ppo.loss_aggregation=seq_mean_token_sum"],
    "reinforce_pp_baseline": ["--model.ppo.advantage_estimator=reinforce_pp_baseline", "--model.reward.mask_truncated=true"],
}


@pytest.mark.parametrize("options", ESTIMATOR_RUNS.values(), ids=ESTIMATOR_RUNS.keys())
def test_each_estimator_and_loss_option_runs_from_a_recipe(options, tmp_path):
    result = run_cli("fit", *GRPO_QUICKSTART, "--trainer.max_epochs=1", "--trainer.limit_train_batches=2",
                     "--trainer.limit_val_batches=1", *options, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = pd.read_csv(tmp_path / "outputs" / "grpo-quickstart" / "version_0" / "metrics.csv")
    losses = metrics["loss/policy_avg"].dropna()
    assert len(losses) == 2 and losses.map(lambda v: v == v).all()
    assert "loss/value_avg" not in metrics  # critic-free
    assert metrics["eval/pass@1"].notna().any()


LOSS_OPTIONS = {
    "gspo": (dict(importance_sampling_level="sequence", clip_range=3e-4, clip_range_high=4e-4),
             dict(sequence_level=True, clip_range=3e-4, clip_range_high=4e-4, aggregation="seq_mean_token_mean")),
    "gspo-seq-mean": (dict(importance_sampling_level="sequence", loss_aggregation="seq_mean_token_mean"),
                      dict(sequence_level=True, aggregation="seq_mean_token_mean")),
    "dr-grpo": (dict(loss_aggregation="seq_mean_token_sum_norm"),
                dict(sequence_level=False, aggregation="seq_mean_token_sum_norm", max_new_tokens=3)),
    "clip-higher": (dict(clip_range_high=0.28), dict(clip_range=0.2, clip_range_high=0.28, aggregation="token_mean")),
}


@pytest.mark.parametrize("options, expected", LOSS_OPTIONS.values(), ids=LOSS_OPTIONS.keys())
def test_each_loss_option_reaches_the_policy_loss(options, expected, tmp_path, monkeypatch):
    """The recipe's loss options arrive in the loss computation of every micro-batch as the recipe says."""
    from lit_rlhf import ppo as ppo_math

    calls, real = [], ppo_math.policy_loss
    signature = ["logprobs", "old_logprobs", "advantages", "mask", "clip_range", "clip_range_high", "sequence_level",
                 "aggregation", "max_new_tokens", "token_weights", "normalizer"]

    def spy(*args, **kwargs):
        calls.append(dict(zip(signature, args)) | kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(ppo_math, "policy_loss", spy)
    L.seed_everything(0)
    module = grpo_module(ppo=PPOConfig(advantage_estimator="grpo", ppo_epochs=1, num_minibatches=2, kl_coef=0.0,
                                       **options))
    fit(module, category_data(), tmp_path, limit_train_batches=1)
    assert len(calls) == 2  # two minibatches
    for call in calls:
        assert {name: call[name] for name in expected} == expected


def test_gspo_refuses_aggregations_that_weigh_responses_by_length():
    with pytest.raises(ValueError, match=r"importance_sampling_level=sequence \(GSPO\) averages over responses: "
                                         r"ppo.loss_aggregation='seq_mean_token_sum' would weigh"):
        grpo_module(ppo=PPOConfig(advantage_estimator="grpo", importance_sampling_level="sequence",
                                  loss_aggregation="seq_mean_token_sum")).configure_model()


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_grpo_reward_scaling_by_hand(scale):
    L.seed_everything(0)
    module = grpo_module(ppo=PPOConfig(advantage_estimator="grpo", scale_rewards=scale, kl_coef=0.0, num_minibatches=2),
                         reward="reward_fns:characters")
    rolled = rollout(module)
    groups = rolled.scores.view(4, 4)
    centered = groups - groups.mean(1, keepdim=True)
    divisor = {"group": groups.std(1, keepdim=True) + 1e-6, "batch": rolled.scores.std() + 1e-6, "none": 1.0}[scale]
    first_token = rolled.advantages[:, 0]  # a response's advantage stands on each of its tokens
    torch.testing.assert_close(first_token, (centered / divisor).flatten(), rtol=1e-5, atol=1e-6)


def test_gspo_with_masked_truncation_trains(tmp_path):
    """GSPO's sequence ratio of a response without loss tokens (truncated, reward.mask_truncated) was 0/0: NaN
    in every update, all of them skipped. Now such a response adds nothing and the others train."""
    L.seed_everything(0)
    module = grpo_module(ppo=PPOConfig(advantage_estimator="grpo", importance_sampling_level="sequence", ppo_epochs=1,
                                       num_minibatches=2, kl_coef=0.0), reward="reward_fns:characters")
    module.reward_config.mask_truncated = True
    module.sampling.stop_tokens = ["the", "a", "was", "is", "and", "it", "<eos>"]  # some responses stop, most are cut
    recorder = Recorder()
    fit(module, category_data(), tmp_path, limit_train_batches=2, callbacks=[recorder])
    assert recorder.history["train/skipped_updates"] == [0.0, 0.0]
    assert all(v == v for v in recorder.history["loss/policy_avg"])  # finite
    assert module.latest_rollout.loss_mask.sum(1).eq(0).any()  # some responses were truncated and masked
