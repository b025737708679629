"""Every architecture of the LoRA target table: our log-probs are those ``generate`` samples from."""

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

from lit_rlhf import models
from lit_rlhf.models import DEFAULT_LORA_TARGETS, PolicyConfig, disable_dropout, load_policy, load_tokenizer
from lit_rlhf.rollout import SamplingConfig, response_mask, sample_responses
from lit_rlhf.tiny import resolve_model_path, save_tiny_checkpoint

ARCHITECTURES = sorted(DEFAULT_LORA_TARGETS)
PROMPTS = ["the movie was really", "my day", "we ate fish and it"]


def adapted_policy(path, seed=0):
    """A policy whose LoRA adapter is not the identity (lora_B starts at zero)."""
    policy = load_policy(PolicyConfig(path, lora_r=4)).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in policy.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.3, generator=generator)
    return policy


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_logprobs_equal_generates_own_scores(arch):
    """log softmax(generate's logits / T) of the sampled tokens == the trainer's log-probs, per architecture.

    Gemma 2/3 soft-cap and Granite scale their logits; their tiny builds make those transforms large.
    """
    path = resolve_model_path(f"builtin:tiny-{arch}")
    tokenizer, policy = load_tokenizer(path), adapted_policy(path)
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    torch.manual_seed(0)
    out = policy.model.generate(**batch, generation_config=GenerationConfig(
        do_sample=True, temperature=0.7, top_k=0, top_p=1.0, max_new_tokens=6, output_logits=True,
        return_dict_in_generate=True, eos_token_id=1, pad_token_id=0,
    ))
    context = batch["input_ids"].shape[1]
    responses = out.sequences[:, context:]
    mask = response_mask(responses, [1])
    generated = torch.stack(out.logits, 1).float().div(0.7).log_softmax(-1)
    generated = generated.gather(-1, responses.unsqueeze(-1)).squeeze(-1)
    attention_mask = torch.cat([batch["attention_mask"], mask.long()], 1)
    with torch.no_grad():
        ours = policy(out.sequences, attention_mask, context, temperature=0.7).logprobs
    assert mask.sum() >= 6
    assert ((ours - generated).abs() * mask).max() < 1e-4


@pytest.mark.parametrize("arch", ["gemma2", "granite"])
def test_an_unknown_logit_transform_is_refused_at_load_time(arch, monkeypatch):
    """Without the transform the log-probs are off by nats: loading must stop, not train on them."""
    monkeypatch.setattr(models.LogitTransform, "of", classmethod(lambda cls, config: models.IDENTITY))
    with pytest.raises(ValueError, match=f"architecture '{arch}'.*transforms its logits"):
        load_policy(PolicyConfig(f"builtin:tiny-{arch}"))


@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt", "falcon", "mixtral", "gpt_neox"])
def test_training_mode_without_dropout_reproduces_eval_mode(arch, tmp_path):
    """PPO passes run in training mode (for gradient checkpointing); with dropout, layer drop and router
    jitter zeroed they must compute exactly what the rollout computed in eval mode."""
    config = AutoConfig.from_pretrained(resolve_model_path(f"builtin:tiny-{arch}"))
    for name in list(vars(config)):
        if any(key in name for key in ("dropout", "pdrop", "layerdrop", "jitter")):
            setattr(config, name, 0.5)
    path = save_tiny_checkpoint(tmp_path / arch, arch=arch)
    config.save_pretrained(path)
    tokenizer = load_tokenizer(str(path))
    policy = load_policy(PolicyConfig(str(path), lora_r=4, lora_dropout=0.5, gradient_checkpointing=True))
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    policy.eval()
    with torch.no_grad():
        evaluated = policy(ids, mask, 2, temperature=1.0).logprobs
    policy.train()
    torch.manual_seed(0)
    with torch.no_grad():
        noisy = policy(ids, mask, 2, temperature=1.0).logprobs
    assert not torch.allclose(noisy, evaluated)  # the settings really were random before
    assert disable_dropout(policy) > 0
    trained = policy(ids, mask, 2, temperature=1.0)
    torch.testing.assert_close(trained.logprobs, evaluated, rtol=0, atol=1e-5)
    trained.values.sum().backward()  # through gradient checkpointing, in training mode


def test_checkpoint_generation_config_cannot_change_sampling(tmp_path, monkeypatch):
    """A checkpoint's generation_config (repetition penalty, n-gram blocking, minimum length, banned or
    suppressed tokens, stop strings) must not touch rollouts: same seed, same responses as without it."""
    import contextlib

    from lit_rlhf import rollout

    clean = save_tiny_checkpoint(tmp_path / "clean")
    polluted = save_tiny_checkpoint(tmp_path / "polluted")
    GenerationConfig(
        repetition_penalty=3.0, no_repeat_ngram_size=1, min_new_tokens=10, bad_words_ids=[[71], [166]],
        suppress_tokens=[174, 248], eos_token_id=1, pad_token_id=0,
    ).save_pretrained(polluted)
    tokenizer = load_tokenizer(str(clean))
    batch = tokenizer(PROMPTS * 4, return_tensors="pt", padding=True)
    config = SamplingConfig(max_new_tokens=10, temperature=1.0)

    def sample(path):
        model = AutoModelForCausalLM.from_pretrained(path).eval()
        torch.manual_seed(0)
        with torch.no_grad():
            responses = sample_responses(model, batch["input_ids"], batch["attention_mask"], config, [1], 0)
        assert model.generation_config.repetition_penalty == (3.0 if path == polluted else None)  # restored
        return responses

    torch.testing.assert_close(sample(polluted), sample(clean), rtol=0, atol=0)
    monkeypatch.setattr(rollout, "neutral_generation_defaults", lambda model: contextlib.nullcontext())
    assert not torch.equal(sample(polluted), sample(clean))  # without the guard, the checkpoint's settings act


def test_any_of_several_stop_tokens_ends_a_response():
    responses = torch.tensor([[4, 9, 5, 5], [4, 7, 9, 5], [4, 5, 5, 5]])
    mask = response_mask(responses, [7, 9])
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1]]


def test_default_stop_tokens_add_the_checkpoints_end_of_turn_tokens(tmp_path):
    """Like Llama 3 (<|eot_id|>, <|eom_id|>, <|end_of_text|>): the generation config's EOS list ends responses."""
    from lit_rlhf.module import PPOModule, RewardConfig
    from conftest import QUICKSTART_PROMPTS
    from test_module import make_data

    path = save_tiny_checkpoint(tmp_path / "model")
    GenerationConfig(eos_token_id=[1, 9, 10], pad_token_id=0).save_pretrained(path)
    module = PPOModule(policy=PolicyConfig(str(path)), reward=RewardConfig(function="lit_rlhf.rewards:sentiment_lexicon"),
                       generation=SamplingConfig(max_new_tokens=40, temperature=2.0))
    module.configure_model()
    assert module.stop_token_ids == [1, 9, 10]  # the tokenizer's <eos> first
    data = make_data(str(path), batch_size=16, path=QUICKSTART_PROMPTS)
    data.setup("fit")
    torch.manual_seed(0)
    rollout = module.producer(next(iter(data.train_dataloader())))
    responses = rollout.query_responses[:, rollout.context_length:]
    for row, mask in zip(responses.tolist(), rollout.mask.tolist()):
        stops = [i for i, token in enumerate(row) if token in (1, 9, 10)]
        assert sum(mask) == (stops[0] + 1 if stops else len(row))
    assert any(9 in row or 10 in row for row in responses.tolist())  # the extra stop tokens did end responses

    explicit = PPOModule(policy=PolicyConfig(str(path)), reward=RewardConfig(function="lit_rlhf.rewards:sentiment_lexicon"),
                         generation=SamplingConfig(stop_tokens=["movie", "<eos>"]))
    explicit.configure_model()
    assert explicit.stop_token_ids == [load_tokenizer(str(path)).convert_tokens_to_ids("movie"), 1]
