"""The performance paths compute exactly what the plain formulas compute.

Sampling by inverse CDF inside a greedy ``generate``, the chunked LM-head log-prob function with its
recomputing backward, and the host-memory setting are checked against reference implementations.
"""

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

import lit_rlhf.models as models
from lit_rlhf.host_memory import mmap_large_allocations
from lit_rlhf.ppo import entropy_from_logits
from lit_rlhf.rollout import SamplingConfig, sample_categorical, sample_responses, sampling_distribution


@pytest.mark.parametrize("temperature, top_k, top_p", [(1.0, 0, 1.0), (0.7, 0, 1.0), (1.3, 5, 1.0), (0.9, 0, 0.8),
                                                       (1.0, 4, 0.5)])
def test_sampling_distribution_matches_hugging_face_warpers(temperature, top_k, top_p):
    torch.manual_seed(0)
    logits = torch.randn(3, 11) * 2
    expected = logits.clone()
    for warper in (TemperatureLogitsWarper(temperature), TopKLogitsWarper(top_k) if top_k else None,
                   TopPLogitsWarper(top_p) if top_p < 1 else None):
        if warper is not None:
            expected = warper(None, expected)
    torch.testing.assert_close(sampling_distribution(logits, temperature, top_k, top_p), expected.softmax(-1))


def test_inverse_cdf_draws_follow_the_distribution():
    torch.manual_seed(0)
    probs = torch.softmax(torch.randn(8, 12) * 2, -1)
    probs[:, 3] = 0.0  # a filtered-out token is never drawn
    probs = probs / probs.sum(-1, keepdim=True)
    draws = torch.stack([sample_categorical(probs).squeeze(1) for _ in range(20000)])
    frequencies = torch.zeros_like(probs).scatter_add_(1, draws.T, torch.ones(8, 20000)) / 20000
    assert frequencies[:, 3].sum() == 0
    # binomial standard error is at most 0.0036 here; 5 of them
    assert (frequencies - probs).abs().max() < 0.018


def test_generate_samples_with_the_configured_distribution(tiny_llama):
    """The first response token of many identical prompts is distributed as the model's next-token law."""
    model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    prompt = torch.tensor([[5, 6, 7, 8]])
    config = SamplingConfig(max_new_tokens=1, temperature=0.8, top_k=20)
    with torch.no_grad():
        expected = sampling_distribution(model(prompt).logits[:, -1], 0.8, top_k=20)[0]
        torch.manual_seed(0)
        responses = sample_responses(model, prompt.repeat(6000, 1), torch.ones(6000, 4, dtype=torch.long), config,
                                     stop_token_ids=[1], pad_token_id=0)
    frequencies = torch.bincount(responses[:, 0], minlength=expected.numel()).float() / 6000
    assert frequencies[expected == 0].sum() == 0  # nothing outside the top 20
    assert (frequencies - expected).abs().max() < 0.025


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_chunked_head_logprobs_equal_the_materialized_ones(monkeypatch, temperature):
    monkeypatch.setattr(models, "_CHUNK_ELEMENTS", 40)  # several chunks of rows
    torch.manual_seed(0)
    hidden = torch.randn(5, 3, 4, requires_grad=True)
    head = torch.nn.Linear(4, 9)
    tokens = torch.randint(0, 9, (5, 3))
    logprobs, entropy = models.head_logprobs(hidden, head, tokens, temperature, with_entropy=True)
    logits = head(hidden) / temperature
    expected = logits.log_softmax(-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(logprobs, expected)
    torch.testing.assert_close(entropy, entropy_from_logits(logits))
    weights = torch.randn(5, 3)
    ours = torch.autograd.grad((logprobs * weights).sum(), (hidden, head.weight, head.bias))
    reference = torch.autograd.grad((expected * weights).sum(), (hidden, head.weight, head.bias))
    for a, b in zip(ours, reference):
        torch.testing.assert_close(a, b)


TRANSFORMS = [models.IDENTITY, models.LogitTransform(softcap=1.5), models.LogitTransform(scale=0.25, softcap=2.0)]


@pytest.mark.parametrize("transform", TRANSFORMS, ids=["identity", "softcap", "scale+softcap"])
def test_chunked_head_logprobs_gradcheck(monkeypatch, transform):
    monkeypatch.setattr(models, "_CHUNK_ELEMENTS", 30)
    torch.manual_seed(0)
    hidden = torch.randn(4, 3, 5, dtype=torch.float64, requires_grad=True)
    head = torch.nn.Linear(5, 7).double()
    tokens = torch.randint(0, 7, (4, 3))

    def logprobs(h, w, b):
        return models._HeadTokenLogprobs.apply(h, w, b, tokens, 0.9, False, transform)[0]

    assert torch.autograd.gradcheck(logprobs, (hidden, head.weight, head.bias))


@pytest.mark.parametrize("transform", TRANSFORMS[1:], ids=["softcap", "scale+softcap"])
def test_logit_transform_is_applied_like_the_model_does(transform):
    """Soft-capping as Gemma 2 writes it: ``tanh(logits / cap) * cap`` after scaling."""
    torch.manual_seed(0)
    hidden, head = torch.randn(2, 3, 4) * 3, torch.nn.Linear(4, 6)
    tokens = torch.randint(0, 6, (2, 3))
    logits = head(hidden) * transform.scale
    logits = torch.tanh(logits / transform.softcap) * transform.softcap / 0.7
    expected = logits.log_softmax(-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    logprobs, _ = models.head_logprobs(hidden, head, tokens, 0.7, transform=transform)
    torch.testing.assert_close(logprobs, expected)


def test_token_logprobs_backward_matches_autograd():
    torch.manual_seed(0)
    logits = torch.randn(3, 4, 6, dtype=torch.float64, requires_grad=True)
    tokens = torch.randint(0, 6, (3, 4))
    assert torch.autograd.gradcheck(lambda x: models.token_logprobs(x, tokens), (logits,))


def test_entropy_bonus_keeps_its_gradient():
    hidden = torch.randn(2, 3, 4, requires_grad=True)
    head = torch.nn.Linear(4, 5)
    tokens = torch.randint(0, 5, (2, 3))
    _, entropy = models.head_logprobs(hidden, head, tokens, 1.0, with_entropy=True, entropy_grad=True)
    assert entropy.requires_grad
    _, statistic = models.head_logprobs(hidden, head, tokens, 1.0, with_entropy=True)
    assert not statistic.requires_grad


def test_host_memory_setting_takes_effect_on_glibc():
    assert mmap_large_allocations(4 * 2**20) is True



def test_one_update_takes_its_old_logprobs_from_its_own_pass(tmp_path, monkeypatch):
    """GRPO with one PPO epoch of one minibatch: the rollout's log-prob pass is skipped and the update's pass gives
    the old log-probs (ratio 1, the gradient of the log-probs): the same weights and statistics as with the pass."""
    import lightning as L

    from lit_rlhf import PolicyConfig, PPOModule, PromptDataModule, SamplingConfig
    from lit_rlhf.experience import RolloutProducer
    from lit_rlhf.module import OptimizerConfig, PPOConfig, RewardConfig
    from conftest import REPO_ROOT

    results = []
    for separate_pass in (False, True):
        L.seed_everything(0)
        module = PPOModule(
            policy=PolicyConfig("builtin:tiny-llama", lora_r=8), reward=RewardConfig(function="reward_fns:characters"),
            generation=SamplingConfig(max_new_tokens=6, temperature=1.0, num_generations=4,
                                      stop_tokens=["the", "a", "is", "<eos>"]),
            ppo=PPOConfig(advantage_estimator="grpo", ppo_epochs=1, num_minibatches=1, kl_coef=0.0, kl_in_loss=True,
                          kl_loss_coef=0.1, gradient_accumulation_steps=2),
            optimizer=OptimizerConfig(lr=1e-2, scheduler="constant"),
        )
        if separate_pass:
            monkeypatch.setattr(RolloutProducer, "logprobs_from_update", lambda self, samples: False)
        data = PromptDataModule(f"{REPO_ROOT}/recipes/data/word_categories.jsonl", tokenizer="builtin:tiny-llama",
                                batch_size=4, max_prompt_length=16)
        logged = {}

        class Keep(L.Callback):
            def on_train_batch_end(self, trainer, pl_module, *args):
                logged.update({k: float(v) for k, v in trainer.callback_metrics.items()})

        L.Trainer(accelerator="cpu", max_epochs=1, limit_train_batches=2, logger=False, enable_checkpointing=False,
                  enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path),
                  callbacks=[Keep()]).fit(module, data)
        results.append((module.latest_rollout.logprobs_from_update, dict(module.state_dict()), logged))
    (fused, fused_weights, fused_logged), (plain, plain_weights, plain_logged) = results
    assert fused and not plain
    for name, value in plain_weights.items():
        torch.testing.assert_close(fused_weights[name], value, rtol=1e-4, atol=1e-6)
    for name in ("objective/kl", "objective/entropy", "loss/policy_avg", "loss/kl_avg", "val/ratio", "objective/scores"):
        assert fused_logged[name] == pytest.approx(plain_logged[name], rel=1e-4, abs=1e-6), name
