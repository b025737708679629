"""Loading, LoRA/value-head wiring, log-prob correctness, reference and reward scoring."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from lit_rlhf.models import (
    PolicyConfig, SequenceClassifierReward, load_policy, load_tokenizer, position_ids_from,
)
from lit_rlhf.rewards import import_reward_function
from lit_rlhf.rollout import response_mask, trim_padding
from lit_rlhf.tiny import save_tiny_checkpoint


def _batch(tokenizer, texts):
    return tokenizer(texts, return_tensors="pt", padding=True)


def test_only_lora_and_value_head_train(tiny_llama):
    policy = load_policy(PolicyConfig(tiny_llama, lora_r=4, lora_alpha=8))
    trainable = [name for name, p in policy.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name or name.startswith("value_head") for name in trainable)
    assert any(name.startswith("value_head") for name in trainable)
    assert torch.all(policy.value_head.weight == 0)


def test_response_logprobs_and_values_match_full_forward(tiny_llama):
    tokenizer = load_tokenizer(tiny_llama)
    policy = load_policy(PolicyConfig(tiny_llama, lora_r=4, value_head_init_std=0.1))
    for name, p in policy.named_parameters():  # make the adapter non-trivial
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    enc = _batch(tokenizer, ["the movie was good", "it was"])
    context = enc["input_ids"].shape[1]
    responses = torch.tensor([[5, 6, 1], [7, 1, 0]])
    ids = torch.cat([enc["input_ids"], responses], 1)
    mask = torch.cat([enc["attention_mask"], response_mask(responses, 1).long()], 1)
    out = policy(ids, mask, context, temperature=0.7, with_entropy=True)
    full = policy.model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from(mask), output_hidden_states=True)
    logp = torch.log_softmax(full.logits[:, context - 1 : -1] / 0.7, -1).gather(-1, responses.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(out.logprobs, logp, rtol=1e-4, atol=1e-5)
    values = policy.value_head(full.hidden_states[-1][:, context - 1 : -1]).squeeze(-1)
    torch.testing.assert_close(out.values, values, rtol=1e-4, atol=1e-5)
    assert out.entropy.shape == responses.shape and torch.all(out.entropy > 0)


def test_reference_is_base_model_without_a_second_copy(tiny_llama):
    tokenizer = load_tokenizer(tiny_llama)
    policy = load_policy(PolicyConfig(tiny_llama, lora_r=4))
    for name, p in policy.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)
    enc = _batch(tokenizer, ["the movie was", "my day felt very"])
    ids, mask = enc["input_ids"], enc["attention_mask"]
    with policy.adapter_disabled():
        ref = policy(ids, mask, 2, temperature=1.0).logprobs
    adapted = policy(ids, mask, 2, temperature=1.0).logprobs
    base = AutoModelForCausalLM.from_pretrained(tiny_llama)
    logits = base(input_ids=ids, attention_mask=mask, position_ids=position_ids_from(mask)).logits
    expected = torch.log_softmax(logits[:, 1:-1], -1).gather(-1, ids[:, 2:].unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(ref, expected, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(adapted, expected, atol=1e-3)


def test_tokenizer_without_pad_falls_back_to_eos_with_warning(tmp_path):
    path = save_tiny_checkpoint(tmp_path / "nopad", pad_token=None)
    with pytest.warns(UserWarning, match="no pad token"):
        tokenizer = load_tokenizer(str(path))
    assert tokenizer.pad_token == tokenizer.eos_token and tokenizer.padding_side == "left"


def test_unknown_model_path_names_the_field(tmp_path):
    with pytest.raises(ValueError, match="policy.model_name_or_path=.*does-not-exist"):
        load_policy(PolicyConfig(str(tmp_path / "does-not-exist")))
    with pytest.raises(ValueError, match="Unknown built-in model"):
        load_policy(PolicyConfig("builtin:huge-llama"))


@pytest.mark.parametrize("spec, message", [
    ("no_colon", "must look like"),
    ("surely_missing_module:fn", "cannot import module"),
    ("lit_rlhf.rewards:missing_fn", "no callable"),
])
def test_reward_function_import_errors(spec, message):
    with pytest.raises(ValueError, match=message):
        import_reward_function(spec)


def test_classifier_reward_scores_last_real_token(tiny_llama, tiny_classifier):
    tokenizer = load_tokenizer(tiny_llama)
    reward = SequenceClassifierReward(tiny_classifier, tokenizer)
    assert reward.shares_tokenizer
    texts = ["the movie was good <eos>", "it was bad"]
    # right-padded, ending with EOS (== a real token that the pooling must not skip)
    ids = [tokenizer(t)["input_ids"] for t in texts]
    width = max(map(len, ids))
    input_ids = torch.tensor([i + [tokenizer.pad_token_id] * (width - len(i)) for i in ids])
    mask = torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i in ids])
    scores = reward(["unused"] * 2, ["unused"] * 2, input_ids, mask)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_classifier).eval()
    for row, tokens in enumerate(ids):
        hidden = model.base_model(input_ids=torch.tensor([tokens])).last_hidden_state
        assert scores[row].item() == pytest.approx(model.score(hidden[0, -1]).item(), abs=1e-5)


def test_classifier_reward_with_another_tokenizer_retokenizes_text(tmp_path, tiny_classifier):
    from lit_rlhf.tiny import build_word_tokenizer

    other = build_word_tokenizer()
    other.add_tokens(["extra_token"])  # a different vocabulary
    reward = SequenceClassifierReward(tiny_classifier, other)
    assert not reward.shares_tokenizer
    junk = torch.full((1, 3), 7)  # policy ids are ignored when tokenizers differ
    score = reward(["it was"], ["good"], junk, torch.ones_like(junk))
    model = AutoModelForSequenceClassification.from_pretrained(tiny_classifier).eval()
    # the reward tokenizer has a chat template: prompt and completion are formatted with it
    text = reward.tokenizer.apply_chat_template(
        [{"role": "user", "content": "it was"}, {"role": "assistant", "content": "good"}], tokenize=False
    )
    assert text.split() == ["it", "was", "good"]
    tokens = load_tokenizer(tiny_classifier)(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    hidden = model.base_model(input_ids=tokens).last_hidden_state
    assert score.item() == pytest.approx(model.score(hidden[0, -1]).item(), abs=1e-5)


def test_classifier_with_several_labels_needs_label_index(tmp_path, tiny_llama):
    path = save_tiny_checkpoint(tmp_path / "cls2", classifier=True, num_labels=2)
    tokenizer = load_tokenizer(tiny_llama)
    with pytest.raises(ValueError, match="reward.label_index"):
        SequenceClassifierReward(str(path), tokenizer)
    assert SequenceClassifierReward(str(path), tokenizer, label_index=1).label_index == 1


def test_response_mask_keeps_eos_when_pad_equals_eos():
    eos = 1
    responses = torch.tensor([[5, 6, eos, eos, eos], [5, eos, 7, eos, 9], [5, 6, 7, 8, 9]])
    assert response_mask(responses, eos).tolist() == [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1]]


def test_trim_padding_drops_all_pad_columns():
    ids = torch.arange(14).view(2, 7)
    mask = torch.tensor([[0, 0, 1, 1, 1, 0, 0], [0, 1, 1, 1, 1, 1, 0]])
    trimmed_ids, trimmed_mask, context = trim_padding(ids, mask, context_length=3)
    assert context == 2
    assert trimmed_mask.tolist() == [[0, 1, 1, 1, 0], [1, 1, 1, 1, 1]]
    assert trimmed_ids.tolist() == [[1, 2, 3, 4, 5], [8, 9, 10, 11, 12]]


def test_tiny_checkpoint_is_complete_when_built_on_a_non_zero_rank(tmp_path, monkeypatch):
    """DDP ranks build built-in models concurrently; transformers' save_pretrained writes nothing on rank 1."""
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda *args, **kwargs: 1)
    path = save_tiny_checkpoint(tmp_path / "tiny", arch="llama")
    monkeypatch.undo()
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in path.iterdir()}
    assert AutoModelForCausalLM.from_pretrained(path).config.model_type == "llama"


def test_building_a_builtin_checkpoint_leaves_the_global_rng_alone(tmp_path):
    """A run that builds ``builtin:tiny-*`` on first use must sample exactly like one that finds it cached."""
    torch.manual_seed(3)
    before = torch.get_rng_state()
    save_tiny_checkpoint(tmp_path / "model")
    assert torch.equal(torch.get_rng_state(), before)
