"""Real-model paths on tiny local checkpoints: families, QLoRA, reference, reward options, export, recipes."""

import os
import sys

import lightning as L
import pytest
import torch
from transformers import AutoModelForCausalLM

from lit_rlhf import models
from lit_rlhf.models import PolicyConfig, load_policy, quantization_kwargs
from lit_rlhf.module import PPOConfig, ReferenceConfig, RewardConfig
from lit_rlhf.ppo import RunningMoments
from lit_rlhf.tiny import build_word_tokenizer, resolve_model_path, save_tiny_checkpoint
from conftest import QUICKSTART_PROMPTS, REPO_ROOT, RUN_VLLM
from test_cli import run_cli
from test_module import Recorder, fit, make_data, make_module

ARCHS = ["llama", "qwen2", "mistral", "gpt2"]


def storage_bytes(module):
    """Bytes of distinct parameter storages: shared weights count once."""
    storages = {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in module.parameters()}
    return sum(storages.values())


def changed_parameters(module, before):
    return {name for name, p in module.named_parameters() if name in before and not torch.equal(p, before[name])}


@pytest.mark.parametrize("arch", ARCHS)
def test_each_family_gets_default_lora_targets_and_trains(arch, tmp_path):
    path = f"builtin:tiny-{arch}"
    L.seed_everything(0)
    module = make_module(path, ppo=PPOConfig(ppo_epochs=1, num_minibatches=2))
    module.configure_model()
    adapted = {name.rsplit(".", 1)[-1] for name, m in module.policy.model.named_modules() if hasattr(m, "lora_A")}
    assert adapted == set(models.DEFAULT_LORA_TARGETS[arch])
    before = {name: p.detach().clone() for name, p in module.named_parameters()}
    fit(module, make_data(path), tmp_path, limit_train_batches=1)
    changed = changed_parameters(module, before)
    assert changed and all("lora_" in n or "value_head" in n for n in changed)


def test_unknown_architecture_lists_its_linear_modules(monkeypatch):
    monkeypatch.setattr(models, "DEFAULT_LORA_TARGETS", {})
    with pytest.raises(ValueError, match=r"No default LoRA targets for architecture 'llama': set policy.lora_target_modules .*'q_proj'"):
        load_policy(PolicyConfig("builtin:tiny-llama"))
    policy = load_policy(PolicyConfig("builtin:tiny-llama", lora_target_modules=["all-linear"]))
    assert any("lora_A" in n for n, _ in policy.named_parameters())


def test_bad_lora_target_names_the_field():
    with pytest.raises(ValueError, match="policy.lora_target_modules"):
        load_policy(PolicyConfig("builtin:tiny-llama", lora_target_modules=["no_such_proj"]))


@pytest.mark.parametrize("quantization, layer", [("4bit", "Linear4bit"), ("8bit", "Linear8bitLt")])
def test_qlora_ppo_step_trains_only_adapter_and_value_head(quantization, layer, tmp_path):
    L.seed_everything(0)
    module = make_module("builtin:tiny-llama", ppo=PPOConfig(ppo_epochs=1, num_minibatches=2))
    module.policy_config = PolicyConfig("builtin:tiny-llama", lora_r=8, quantization=quantization)
    module.configure_model()
    layers = {type(m).__name__ for m in module.policy.model.modules()}
    assert layer in layers
    # bitsandbytes keeps 4-bit weights in a CPU-friendly packing after an inference forward and unpacks them
    # when a state dict is taken: compare both snapshots in the unpacked layout
    module.policy.model.state_dict()
    before = {name: p.detach().clone() for name, p in module.named_parameters()}
    recorder = Recorder()
    fit(module, make_data("builtin:tiny-llama"), tmp_path, limit_train_batches=1, callbacks=[recorder])
    module.policy.model.state_dict()
    changed = changed_parameters(module, before)
    assert any("lora_B" in n for n in changed) and "policy.value_head.weight" in changed
    assert all("lora_" in n or "value_head" in n for n in changed)  # the quantized base is untouched
    assert torch.isfinite(torch.tensor(recorder.history["loss/policy_avg"])).all()


def test_quantized_layers_compute_the_same_in_rollouts_and_ppo_passes():
    """bitsandbytes picks its CPU matmul by mode (int8 activations in eval, float weights in training): the
    PPO passes (training mode) must reproduce the rollout's (eval mode) log-probs exactly."""
    L.seed_everything(0)
    module = make_module("builtin:tiny-llama", ppo=PPOConfig(ppo_epochs=1))
    module.policy_config = PolicyConfig("builtin:tiny-llama", lora_r=8, quantization="8bit")
    module.configure_model()
    data = make_data("builtin:tiny-llama")
    data.setup("fit")
    rollout = module.producer(next(iter(data.train_dataloader())))
    module.policy.train()
    _, stats = module.update.loss(rollout, torch.arange(8))
    assert stats["val/ratio"].item() == pytest.approx(1.0, abs=1e-6)
    assert stats["policy/approxkl_avg"].item() == pytest.approx(0.0, abs=1e-10)


def test_4bit_lora_gradients_are_exact_after_an_inference_pass():
    """bitsandbytes repacks 4-bit weights for a CPU inference kernel without a backward at the first eval-mode,
    no-grad forward (a rollout, a reference pass); afterwards the LoRA gradients must still be those of a model
    that never ran one (they were off by as much as their own size)."""
    pytest.importorskip("bitsandbytes")

    def lora_grads(inference_first: bool) -> dict:
        torch.manual_seed(0)
        config = PolicyConfig("builtin:tiny-llama", quantization="4bit")
        model, _ = models.add_lora(models.load_causal_lm(config.model_name_or_path, quantization="4bit"), config)
        for name, parameter in model.named_parameters():
            if "lora_B" in name:  # non-zero, so that gradients flow through every adapter
                torch.nn.init.normal_(parameter, std=0.1)
        ids = torch.randint(5, 200, (4, 8))
        if inference_first:
            model.eval()
            with torch.no_grad():
                model(input_ids=ids)
        model.train()
        model(input_ids=ids).logits.logsumexp(-1).sum().backward()
        return {name: p.grad for name, p in model.named_parameters() if p.requires_grad}

    fresh, after_inference = lora_grads(False), lora_grads(True)
    assert fresh.keys() == after_inference.keys()
    for name in fresh:
        torch.testing.assert_close(after_inference[name], fresh[name], msg=name)


def test_quantized_separate_reference_and_reward(tmp_path):
    L.seed_everything(0)
    module = make_module(
        "builtin:tiny-llama", reward_model="builtin:tiny-llama-classifier",
        reference=ReferenceConfig("builtin:tiny-llama", quantization="8bit"), ppo=PPOConfig(ppo_epochs=1),
    )
    module.reward_config = RewardConfig(model_name_or_path="builtin:tiny-llama-classifier", quantization="4bit", batch_size=3)
    recorder = Recorder()
    fit(module, make_data("builtin:tiny-llama"), tmp_path, limit_train_batches=1, callbacks=[recorder])
    assert "Linear8bitLt" in {type(m).__name__ for m in module.reference.modules()}
    assert "Linear4bit" in {type(m).__name__ for m in module.reward_model.modules()}
    assert len(recorder.history["objective/scores"]) == 1


def test_default_reference_holds_no_second_copy_of_the_weights():
    shared = make_module("builtin:tiny-llama")
    shared.configure_model()
    separate = make_module("builtin:tiny-llama", reference=ReferenceConfig("builtin:tiny-llama"))
    separate.configure_model()
    base_bytes = storage_bytes(AutoModelForCausalLM.from_pretrained(resolve_model_path("builtin:tiny-llama")))
    adapter_bytes = storage_bytes(shared.policy) - base_bytes
    assert 0 < adapter_bytes < 0.25 * base_bytes  # LoRA + value head only
    # the default reference is the policy's own base (adapter disabled): nothing else is held
    assert shared.reference is None and not shared._frozen_models
    assert storage_bytes(shared) == storage_bytes(shared.policy)
    # a separate reference is a second full copy, held beside the module
    assert storage_bytes(separate) == storage_bytes(shared)
    assert storage_bytes(separate.reference) == base_bytes


def test_value_head_initialized_from_reward_score_head():
    module = make_module("builtin:tiny-llama", reward_model="builtin:tiny-llama-classifier")
    module.policy_config = PolicyConfig("builtin:tiny-llama", value_head_from_reward=True)
    module.configure_model()
    torch.testing.assert_close(module.policy.value_head.weight, module.reward_model.model.score.weight)
    with pytest.raises(ValueError, match=r"needs a reward model \(reward.model_name_or_path\)"):
        bad = make_module("builtin:tiny-llama")
        bad.policy_config = PolicyConfig("builtin:tiny-llama", value_head_from_reward=True)
        bad.configure_model()


def test_running_moments_match_numpy():
    torch.manual_seed(0)
    moments, seen = RunningMoments(), []
    for size in (5, 1, 17):
        batch = torch.randn(size) * 3 + 2
        moments.update(batch)
        seen.append(batch)
    everything = torch.cat(seen).double()
    assert moments.mean == pytest.approx(everything.mean().item())
    assert moments.std == pytest.approx(everything.std(unbiased=False).item())
    restored = RunningMoments()
    restored.load_state_dict(moments.state_dict())
    assert restored.normalize(torch.tensor([2.0])).item() == pytest.approx(moments.normalize(torch.tensor([2.0])).item())


@pytest.mark.parametrize("normalize", ["fixed", "running"])
def test_score_normalization_and_clipping(normalize, tmp_path):
    """Each response's score is its raw score normalized (fixed shift/scale, or the running mean/std of every
    raw score so far, this batch included), then clipped: checked per response, so an identity normalizer
    (whose word counts the clip would bound anyway) fails."""
    from reward_fns import characters

    L.seed_everything(0)
    module = make_module("builtin:tiny-llama", reward_function="reward_fns:characters", ppo=PPOConfig(ppo_epochs=1))
    module.reward_config = RewardConfig(
        function="reward_fns:characters", normalize=normalize, shift=45.0, scale=10.0, clip=1.5
    )
    rollouts = []

    class KeepRollouts(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            rollouts.append(pl_module.latest_rollout)

    fit(module, make_data("builtin:tiny-llama"), tmp_path, limit_train_batches=3, callbacks=[KeepRollouts()])
    seen = []
    for rollout in rollouts:
        raw = torch.tensor(characters(rollout.prompts, rollout.completions), dtype=torch.float64)
        seen.append(raw)
        if normalize == "fixed":
            expected = (raw - 45.0) / 10.0
        else:
            everything = torch.cat(seen)
            expected = (raw - everything.mean()) / everything.std(unbiased=False)
        torch.testing.assert_close(rollout.scores.double(), expected.clamp(-1.5, 1.5), rtol=1e-5, atol=1e-6)
        assert raw.std() > 0 and (expected.abs() < 1.5).any()  # normalization has work to do; not all clipped
    if normalize == "running":
        assert module.score_moments.count == 24


def test_tokenizer_larger_than_model_vocabulary(tmp_path):
    path = save_tiny_checkpoint(tmp_path / "m")
    tokenizer = build_word_tokenizer()
    tokenizer.add_tokens([f"new{i}" for i in range(10)])
    tokenizer.save_pretrained(path)
    module = make_module(str(path))
    with pytest.raises(ValueError, match="has 260 tokens but the model's embedding has only 250 rows"):
        module.configure_model()


def test_quantization_on_unsupported_setup(monkeypatch):
    with pytest.raises(ValueError, match="policy.quantization='4bit' is not supported on mps"):
        quantization_kwargs("4bit", "float32", "policy.quantization", torch.device("mps"))
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    with pytest.raises(ValueError, match="reward.quantization='8bit' needs bitsandbytes"):
        quantization_kwargs("8bit", "float32", "reward.quantization")


def test_export_round_trip_matches_trained_policy(tmp_path):
    from peft import PeftModel
    from safetensors.torch import load_file

    L.seed_everything(0)
    module = make_module("builtin:tiny-qwen2", ppo=PPOConfig(ppo_epochs=1), lr=5e-2)
    fit(module, make_data("builtin:tiny-qwen2"), tmp_path, limit_train_batches=1)
    result = run_cli("export", "--adapter_dir", str(tmp_path / "policy"), "--output_dir", str(tmp_path / "merged"))
    assert result.returncode == 0, result.stderr[-2000:]

    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        trained = module.policy.model(input_ids=ids).logits
        base = AutoModelForCausalLM.from_pretrained(resolve_model_path("builtin:tiny-qwen2"))
        base_logits = base(input_ids=ids).logits
        adapter = PeftModel.from_pretrained(base, str(tmp_path / "policy"))(input_ids=ids).logits
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")(input_ids=ids).logits
    assert not torch.allclose(trained, base_logits, atol=1e-4)  # training moved the policy
    torch.testing.assert_close(adapter, trained, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(merged, trained, rtol=1e-4, atol=1e-4)
    head = load_file(tmp_path / "merged" / "value_head.safetensors")
    torch.testing.assert_close(head["weight"], module.policy.value_head.weight.detach())


GPU_RECIPES = {
    "qwen2.5-0.5b-lora.yaml": "builtin:tiny-qwen2",
    "llama3.1-8b-qlora.yaml": "builtin:tiny-llama",
    "qwen2.5-1.5b-grpo-math.yaml": "builtin:tiny-qwen2",
}


@pytest.mark.parametrize("recipe, policy", GPU_RECIPES.items())
def test_gpu_recipe_dry_run_with_tiny_substitutes(recipe, policy, tmp_path):
    """The recipe as shipped (precision, quantization, PPO settings), with tiny local models and data."""
    substitutes = [f"--model.policy.model_name_or_path={policy}", "--data.batch_size=8", "--data.max_prompt_length=32",
                   "--model.generation.max_new_tokens=6", "--trainer.limit_train_batches=1"]
    if "grpo" in recipe:  # prompts with answers; its own rewards (math-verify) score them
        categories = os.path.join(REPO_ROOT, "recipes", "data", "word_categories.jsonl")
        substitutes += [f"--data.path={categories}", f"--data.val_path={categories}", "--data.val_split=train",
                        "--data.prompt_field=prompt", "--model.evaluation.max_new_tokens=6",
                        "--trainer.limit_val_batches=1", "--trainer.val_check_interval=1",
                        "--model.reward.overlong_buffer=2"]
    else:
        substitutes += ["--model.reward.model_name_or_path=builtin:tiny-llama-classifier", f"--data.path={QUICKSTART_PROMPTS}"]
    if not RUN_VLLM:  # the recipe as shipped samples with vLLM when it can; without it, hf and no engine correction
        substitutes += ["--model.generation.engine=hf", "--model.ppo.rollout_correction=none"]
    result = run_cli(
        "fit", "--config", os.path.join(REPO_ROOT, "recipes", recipe), "--trainer.accelerator=cpu", *substitutes,
        cwd=tmp_path,
    )  # W&B runs offline in the tests (WANDB_MODE=offline)
    assert result.returncode == 0, result.stderr[-3000:]
    name = recipe.removesuffix(".yaml")
    log = next((tmp_path / "outputs" / name / "wandb").glob("offline-run-*/*.wandb")).read_bytes()
    assert b"objective/scores" in log and b"loss/policy_avg" in log
    if "grpo" in recipe:
        assert b"reward/correct" in log and b"reward/boxed" in log and b"eval/pass@4" in log
    (run_dir,) = (tmp_path / "outputs" / name / "lit-rlhf").iterdir()  # <save_dir>/<project>/<run id>
    assert (run_dir / "checkpoints" / "last.ckpt").exists() and (run_dir / "config.yaml").exists()
