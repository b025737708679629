"""Real PPO iterations on tiny models through the Lightning Trainer."""

import lightning as L
import pytest
import torch

from lit_rlhf import PolicyConfig, PPOModule, PromptDataModule, SamplingConfig
from lit_rlhf.module import OptimizerConfig, PPOConfig, ReferenceConfig, RewardConfig
from conftest import QUICKSTART_PROMPTS

SENTIMENT = "lit_rlhf.rewards:sentiment_lexicon"


def make_module(model_path, reward_function=SENTIMENT, reward_model=None, ppo=None, max_new_tokens=8, lr=1e-3,
                lora_r=8, **kw):
    return PPOModule(
        policy=PolicyConfig(model_path, lora_r=lora_r, lora_alpha=2 * lora_r),
        reward=RewardConfig(model_name_or_path=reward_model, function=None if reward_model else reward_function),
        generation=SamplingConfig(max_new_tokens=max_new_tokens, temperature=1.0),
        ppo=ppo or PPOConfig(ppo_epochs=2, num_minibatches=2),
        optimizer=OptimizerConfig(lr=lr, scheduler="constant"),
        **kw,
    )


def make_data(model_path, batch_size=8, path=QUICKSTART_PROMPTS):
    return PromptDataModule(path, tokenizer=model_path, batch_size=batch_size, max_prompt_length=16)


def fit(module, data, tmp_path, max_epochs=1, limit_train_batches=2, callbacks=(), ckpt_path=None, **kw):
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_epochs=max_epochs, limit_train_batches=limit_train_batches, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=str(tmp_path), callbacks=list(callbacks), **kw,
    )
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    return trainer


class Recorder(L.Callback):
    """Keeps every logged value of each metric, one per PPO iteration."""

    def __init__(self):
        self.history = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        for name, value in trainer.callback_metrics.items():
            self.history.setdefault(name, []).append(float(value))
        self.history.setdefault("epoch", []).append(trainer.current_epoch)


def test_first_minibatch_reproduces_rollout_logprobs(tiny_llama):
    """Before any update, the loss forward must see ratio 1 and approx KL 0 (no silent bias)."""
    L.seed_everything(0)
    module = make_module(tiny_llama)
    module.configure_model()
    data = make_data(tiny_llama, batch_size=8)
    data.setup("fit")
    rollout = module.producer(next(iter(data.train_dataloader())))
    module.policy.train()  # as in ppo_update: training mode (dropout probabilities are 0)
    for index in (torch.arange(8), torch.tensor([3, 5]), torch.tensor([0])):
        _, stats = module.update.loss(rollout, index)
        assert stats["val/ratio"].item() == pytest.approx(1.0, abs=1e-5)
        assert stats["policy/approxkl_avg"].item() == pytest.approx(0.0, abs=1e-8)


def test_ppo_trains_lora_and_value_head_only(tiny_llama, tmp_path):
    L.seed_everything(0)
    module = make_module(tiny_llama)
    module.configure_model()
    before = {name: p.detach().clone() for name, p in module.named_parameters()}
    recorder = Recorder()
    fit(module, make_data(tiny_llama), tmp_path, callbacks=[recorder])
    changed = {name for name, p in module.named_parameters() if not torch.equal(p, before[name])}
    trainable = {name for name, p in module.named_parameters() if p.requires_grad}
    assert changed and changed <= trainable
    assert any("lora_A" in n for n in changed) and any("lora_B" in n for n in changed)
    assert {"policy.value_head.weight", "policy.value_head.bias"} <= changed
    for name in ("objective/kl", "loss/policy_avg", "loss/value_avg", "val/ratio", "policy/clipfrac_avg", "lr"):
        assert all(map(lambda v: v == v and abs(v) != float("inf"), recorder.history[name])), name
    assert (tmp_path / "policy" / "adapter_model.safetensors").exists()
    assert (tmp_path / "policy" / "value_head.safetensors").exists()


def test_mean_reward_rises_on_a_learnable_reward(tiny_llama, tmp_path):
    """The quickstart's settings: the score rises while the KL levels off and the completions stay varied."""
    L.seed_everything(0)
    module = PPOModule(
        policy=PolicyConfig(tiny_llama, lora_r=16, lora_alpha=32), reward=RewardConfig(function=SENTIMENT),
        generation=SamplingConfig(max_new_tokens=12, temperature=1.0, stop_tokens=[]),
        ppo=PPOConfig(ppo_epochs=4, num_minibatches=2, kl_coef=0.025, target_kl=0.05),
        optimizer=OptimizerConfig(lr=3e-3, scheduler="linear"),
    )
    recorder = Recorder()
    fit(module, make_data(tiny_llama, batch_size=64), tmp_path, max_epochs=24, limit_train_batches=None,
        callbacks=[recorder])
    history = recorder.history
    assert len(history["objective/scores"]) == 96

    def mean(name, part):
        values = history[name][:10] if part == "first" else history[name][-10:]
        return sum(values) / len(values)

    # seeds 0-5 go from ~0.02 to 0.24-0.35 (noise of a 10-iteration mean: ~0.02)
    assert mean("objective/scores", "last") > mean("objective/scores", "first") + 0.15
    assert mean("val/distinct_2", "last") > 0.75  # no collapse onto one completion
    assert 10 < mean("objective/kl", "last") < 30
    kl = history["objective/kl"]
    assert sum(kl[-10:]) / 10 - sum(kl[-30:-20]) / 10 < 0.25 * sum(kl[-10:]) / 10  # the KL levels off


def test_reward_model_and_separate_reference(tiny_llama, tiny_classifier, tmp_path):
    L.seed_everything(0)
    module = make_module(tiny_llama, reward_model=tiny_classifier, reference=ReferenceConfig(tiny_llama))
    recorder = Recorder()
    fit(module, make_data(tiny_llama), tmp_path, callbacks=[recorder])
    assert module.reference is not None and module.reward_model is not None
    assert len(recorder.history["objective/scores"]) == 2
    assert recorder.history["objective/kl"][0] == pytest.approx(0.0, abs=1e-6)  # reference == initial policy
    assert recorder.history["objective/kl"][1] != 0.0


def rollout_of(module, tiny_llama):
    module.configure_model()
    data = make_data(tiny_llama)
    data.setup("fit")
    return module.producer(next(iter(data.train_dataloader())))


def test_whiten_rewards_gives_unit_variance_without_shifting_the_mean(tiny_llama):
    from lit_rlhf.ppo import masked_mean, masked_var

    rewards = {}
    for whiten in (False, True):
        L.seed_everything(0)
        rollout = rollout_of(make_module(tiny_llama, ppo=PPOConfig(whiten_rewards=whiten, kl_coef=0.5)), tiny_llama)
        rewards[whiten] = rollout.rewards, rollout.mask
    raw, mask = rewards[False]
    whitened, same_mask = rewards[True]
    assert torch.equal(mask, same_mask)  # the same rollout
    assert masked_var(raw, mask).item() < 0.5
    assert masked_var(whitened, mask).item() == pytest.approx(1.0, rel=1e-4)
    assert masked_mean(whitened, mask).item() == pytest.approx(masked_mean(raw, mask).item(), abs=1e-5)


def test_entropy_bonus_is_subtracted_from_the_loss_with_its_gradient(tiny_llama):
    L.seed_everything(0)
    module = make_module(tiny_llama, ppo=PPOConfig(ent_coef=0.0))
    rollout = rollout_of(module, tiny_llama)
    index = torch.arange(8)
    plain, stats = module.update.loss(rollout, index)
    module.ppo_config = PPOConfig(ent_coef=0.1)
    with_bonus, _ = module.update.loss(rollout, index)
    assert with_bonus.item() == pytest.approx(plain.item() - 0.1 * stats["policy/entropy_avg"].item(), rel=1e-5)
    grads = []
    for loss in (plain, with_bonus):
        module.zero_grad()
        loss.backward()
        grads.append(next(p.grad.clone() for n, p in module.named_parameters() if "lora_B" in n))
    assert not torch.allclose(grads[0], grads[1])  # the bonus pushes the weights too, not just the number


class CountSteps(L.Callback):
    def __init__(self):
        self.steps, self.backwards = 0, 0

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.steps += 1

    def on_before_backward(self, trainer, pl_module, loss):
        self.backwards += 1


def test_target_kl_stops_the_ppo_epochs_early(tiny_llama, tmp_path):
    counts = {}
    for target_kl in (None, 1e-12):
        L.seed_everything(0)
        counter = CountSteps()
        module = make_module(tiny_llama, ppo=PPOConfig(ppo_epochs=4, num_minibatches=2, target_kl=target_kl))
        fit(module, make_data(tiny_llama), tmp_path, limit_train_batches=2, callbacks=[counter])
        counts[target_kl] = counter.steps
    assert counts[None] == 2 * 4 * 2  # iterations x epochs x minibatches
    assert counts[1e-12] == 2 * 1 * 2  # the first epoch's KL exceeds the target: one epoch per iteration


def test_gradient_accumulation_splits_minibatches_into_micro_batches(tiny_llama, tmp_path):
    L.seed_everything(0)
    counter = CountSteps()
    module = make_module(tiny_llama, ppo=PPOConfig(ppo_epochs=2, num_minibatches=2, gradient_accumulation_steps=2))
    sizes = []
    real_loss = module.update.loss
    module.update.loss = lambda rollout, index, *rest: (sizes.append(len(index)), real_loss(rollout, index, *rest))[1]
    fit(module, make_data(tiny_llama), tmp_path, limit_train_batches=1, callbacks=[counter])
    assert counter.steps == 2 * 2 and counter.backwards == 2 * 2 * 2
    assert sizes == [2] * 8  # batch 8 -> minibatches of 4 -> micro-batches of 2


def test_adaptive_kl_controller_moves_the_coefficient(tiny_llama, tmp_path):
    L.seed_everything(0)
    recorder = Recorder()
    module = make_module(tiny_llama, ppo=PPOConfig(ppo_epochs=2, adaptive_kl=True, kl_target=1e-3, kl_horizon=100))
    fit(module, make_data(tiny_llama), tmp_path, limit_train_batches=3, callbacks=[recorder])
    coefficients = recorder.history["kl_coef"]
    # KL 0 on the first rollout (error -1, clipped to -0.2): the coefficient shrinks, then grows above the target
    assert coefficients[0] == pytest.approx(0.05 * (1 - 0.2 * 8 / 100))
    assert coefficients[2] > coefficients[1]


def test_checkpoint_holds_trained_weights_and_restores_them(tiny_llama, tmp_path):
    L.seed_everything(0)
    module = make_module(tiny_llama, ppo=PPOConfig(ppo_epochs=1, adaptive_kl=True))
    trainer = fit(module, make_data(tiny_llama), tmp_path)
    path = tmp_path / "state.ckpt"
    trainer.save_checkpoint(path)
    checkpoint = torch.load(path, weights_only=False)
    assert set(checkpoint["state_dict"]) == set(module.state_dict())
    assert checkpoint["kl_controller"]["value"] == module.kl_controller.value

    restored = make_module(tiny_llama, ppo=PPOConfig(ppo_epochs=1, adaptive_kl=True))
    restored.configure_model()
    restored.load_state_dict(checkpoint["state_dict"], strict=False)
    restored.on_load_checkpoint(checkpoint)
    for name, value in module.state_dict().items():
        torch.testing.assert_close(restored.state_dict()[name], value, rtol=0, atol=0)
    assert restored.kl_controller.value == module.kl_controller.value


@pytest.mark.parametrize("function, message", [
    ("reward_fns:wrong_count", "returned 1 scores for 4 completions"),
    ("reward_fns:not_a_number", "non-finite scores"),
    ("reward_fns:strings", r"must return a list of numbers, one per completion; got list of str \('good', 'good', 'good', \.\.\.\)"),
])
def test_bad_reward_function_output(tiny_llama, tmp_path, function, message):
    module = make_module(tiny_llama, reward_function=function, ppo=PPOConfig(ppo_epochs=1))
    with pytest.raises(ValueError, match=message):
        fit(module, make_data(tiny_llama, batch_size=4), tmp_path)


def test_minibatches_must_divide_batch(tiny_llama, tmp_path):
    module = make_module(tiny_llama, ppo=PPOConfig(num_minibatches=3))
    with pytest.raises(ValueError, match="data.batch_size=8 is not divisible by ppo.num_minibatches=3"):
        fit(module, make_data(tiny_llama), tmp_path)


def test_prompt_plus_response_longer_than_context(tiny_llama, tmp_path):
    module = make_module(tiny_llama, max_new_tokens=300)
    with pytest.raises(ValueError, match=r"max_new_tokens=300 = 316 exceeds the context of policy.model_name_or_path \(256 tokens\)"):
        fit(module, make_data(tiny_llama), tmp_path)


def test_config_errors_name_the_field(tiny_llama):
    with pytest.raises(ValueError, match="exactly one of reward.model_name_or_path, reward.function, reward.url"):
        PPOModule(policy=PolicyConfig(tiny_llama), reward=RewardConfig())
    with pytest.raises(ValueError, match="generation.temperature"):
        make_module(tiny_llama).__class__(
            policy=PolicyConfig(tiny_llama), reward=RewardConfig(function=SENTIMENT),
            generation=SamplingConfig(temperature=0.0),
        )
    module = PPOModule(policy=PolicyConfig(tiny_llama), reward=RewardConfig(function=SENTIMENT),
                       generation=SamplingConfig(stop_tokens=["not-a-word"]))
    with pytest.raises(ValueError, match="generation.stop_tokens: 'not-a-word' is not a token"):
        module.configure_model()


def test_fp16_gradients_are_clipped_after_unscaling(tiny_llama, tmp_path):
    """Under 16-mixed the loss is scaled by 65536: clipping before Lightning unscales would hand AdamW a
    gradient 65536x smaller than ppo.max_grad_norm allows. The norm AdamW sees must be the clip value."""
    from lightning.pytorch.plugins.precision import MixedPrecision

    L.seed_everything(0)
    module = make_module(tiny_llama, ppo=PPOConfig(ppo_epochs=1, num_minibatches=2, max_grad_norm=1e-3))
    norms = []

    class RecordNorms(L.Callback):
        def on_train_start(self, trainer, pl_module):
            optimizer = pl_module.optimizers().optimizer
            step = optimizer.step

            def recorded(*args, **kwargs):
                grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
                norms.append(float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))))
                return step(*args, **kwargs)

            optimizer.step = recorded

    # Lightning refuses precision="16-mixed" on CPU; the same plugin with a CPU gradient scaler runs here
    precision = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=2.0**16))
    fit(module, make_data(tiny_llama), tmp_path, callbacks=[RecordNorms()], plugins=[precision])
    assert len(norms) >= 2
    assert norms == pytest.approx([1e-3] * len(norms), rel=1e-3)


def test_checkpoint_selects_trained_weights_by_tensor_not_by_parameter_name(tiny_llama):
    """Wrappers that rename parameters (FSDP1's ``_fsdp_wrapped_module.``, activation checkpointing's
    ``_checkpoint_wrapped_module.``) but not state-dict keys must not drop LoRA weights from checkpoints."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    module = make_module(tiny_llama)
    module.configure_model()
    layers = module.policy.model.get_base_model().model.layers
    for index, layer in enumerate(layers):
        layers[index] = checkpoint_wrapper(layer)
    trained = [p for p in module.parameters() if p.requires_grad]
    names = {name for name, p in module.named_parameters() if p.requires_grad}
    assert any("_checkpoint_wrapped_module" in name for name in names)  # parameter names carry the wrapper
    state = module.state_dict()
    assert len(state) == len(trained) and sum("lora_" in name for name in state) == len(trained) - 2
    assert not any("_checkpoint_wrapped_module" in name for name in state)
    assert len(set(state) & names) == 2  # matching by name would have kept only the value head


def test_resume_refuses_a_checkpoint_without_all_trained_weights(tiny_llama, tmp_path):
    L.seed_everything(0)
    module = make_module(tiny_llama, ppo=PPOConfig(ppo_epochs=1))
    trainer = fit(module, make_data(tiny_llama), tmp_path, limit_train_batches=1)
    trainer.save_checkpoint(tmp_path / "state.ckpt")
    checkpoint = torch.load(tmp_path / "state.ckpt", weights_only=True)
    assert set(checkpoint["trained_weights"]) == set(checkpoint["state_dict"]) == set(module.state_dict())
    fresh = make_module(tiny_llama, ppo=PPOConfig(ppo_epochs=1))
    fresh.configure_model()
    fresh.on_load_checkpoint(checkpoint)  # complete: fine

    lora_name = next(name for name in checkpoint["state_dict"] if "lora_A" in name)
    del checkpoint["state_dict"][lora_name]
    with pytest.raises(ValueError, match=r"does not hold this run's trained weights: 1 missing"):
        fresh.on_load_checkpoint(checkpoint)
    # strategies that load weights themselves (FSDP2, DeepSpeed) leave only the names to check
    del checkpoint["state_dict"]
    other_rank = make_module(tiny_llama, lora_r=4)
    other_rank.policy_config.lora_target_modules = ["q_proj"]
    other_rank.configure_model()
    with pytest.raises(ValueError, match="Resume with the recipe that wrote it"):
        other_rank.on_load_checkpoint(checkpoint)
    fewer_targets = make_module(tiny_llama, ppo=PPOConfig(ppo_epochs=1))
    fewer_targets.policy_config.lora_target_modules = ["q_proj", "v_proj"]
    with pytest.raises(ValueError, match="does not hold this run's trained weights"):  # through Lightning's resume
        fit(fewer_targets, make_data(tiny_llama), tmp_path / "x", ckpt_path=str(tmp_path / "state.ckpt"))


class FirstGradients(L.Callback):
    """The gradients of the first optimizer step, before clipping (callbacks see them before the module)."""

    def __init__(self):
        self.gradients = None

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if self.gradients is None:
            self.gradients = {n: p.grad.clone() for n, p in pl_module.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("aggregation", ["token_mean", "seq_mean_token_mean"])
def test_gradient_accumulation_gives_the_gradient_of_the_whole_minibatch(aggregation, tiny_llama, tmp_path):
    """Responses of different lengths (frequent stop tokens): one minibatch in 1 or in 4 micro-batches has the
    same gradient (token_mean used to divide each micro-batch by its own tokens, then by the accumulation)."""
    gradients = {}
    for steps in (1, 4):
        L.seed_everything(0)
        module = make_module(tiny_llama, ppo=PPOConfig(ppo_epochs=1, gradient_accumulation_steps=steps,
                                                       loss_aggregation=aggregation))
        module.sampling.stop_tokens = ["the", "a", "was", "is", "and", "it", "<eos>"]
        probe = FirstGradients()
        fit(module, make_data(tiny_llama), tmp_path / str(steps), limit_train_batches=1, callbacks=[probe])
        lengths = module.latest_rollout.mask.sum(1)
        gradients[steps] = probe.gradients
    assert lengths.min() < lengths.max()  # the micro-batches hold different numbers of tokens
    assert gradients[1].keys() == gradients[4].keys() and gradients[1]
    for name, value in gradients[1].items():
        torch.testing.assert_close(gradients[4][name], value, rtol=1e-4, atol=1e-7)
