"""Strategy set-up: the recipes build what they promise, and what a strategy cannot do is refused clearly.

The strategies themselves run end to end in ``test_distributed.py`` (2 CPU processes: DDP, FSDP2 and
DeepSpeed ZeRO-2). Here, without launching processes: the recipes' strategy sections instantiate as the CLI
does, DeepSpeed accepts the resulting configuration, frozen models stay outside what a strategy wraps, and
the module's strategy-specific decisions (synced generation, DeepSpeed limits, FSDP1 refusal).
"""

import os
from types import SimpleNamespace
from typing import Optional, Union

import pytest
import yaml
from jsonargparse import ArgumentParser
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy, Strategy

from conftest import REPO_ROOT
from lit_rlhf.module import PPOConfig, ReferenceConfig
from test_module import make_module


def recipe_strategy(name: str) -> Strategy:
    """Instantiate the ``trainer.strategy`` section of a recipe the way LightningCLI does."""
    with open(os.path.join(REPO_ROOT, "recipes", name)) as file:
        recipe = yaml.safe_load(file)
    parser = ArgumentParser()
    parser.add_argument("--strategy", type=Optional[Union[str, Strategy]])
    config = parser.parse_object({"strategy": recipe["trainer"]["strategy"]})
    return parser.instantiate_classes(config).strategy


def with_strategy(module, strategy: Strategy):
    """Attach a stand-in trainer holding ``strategy`` (for decisions that need no running processes)."""
    module._trainer = SimpleNamespace(strategy=strategy, world_size=1, accelerator=None)
    return module


def test_fsdp2_recipe_uses_model_parallel_strategy_with_single_file_checkpoints():
    strategy = recipe_strategy("llama3.1-8b-fsdp2.yaml")
    assert isinstance(strategy, ModelParallelStrategy)
    assert strategy._save_distributed_checkpoint is False
    with open(os.path.join(REPO_ROOT, "recipes", "llama3.1-8b-fsdp2.yaml")) as file:
        assert yaml.safe_load(file)["model"]["policy"]["gradient_checkpointing"] is True


def test_fsdp1_strategy_is_refused_with_the_way_out(tiny_llama):
    """Lightning's FSDPStrategy runs training_step inside the root module's forward: manual backward fails."""
    module = with_strategy(make_module(tiny_llama), FSDPStrategy())
    with pytest.raises(ValueError, match="FSDPStrategy.*ModelParallelStrategy.*llama3.1-8b-fsdp2.yaml"):
        module.setup("fit")


def test_deepspeed_recipe_is_zero2_and_deepspeed_accepts_its_config():
    from deepspeed.runtime.config import DeepSpeedConfig

    strategy = recipe_strategy("llama3.1-8b-deepspeed-zero2.yaml")
    assert isinstance(strategy, DeepSpeedStrategy)
    assert strategy.config["zero_optimization"]["stage"] == 2 and not strategy.zero_stage_3
    assert strategy.exclude_frozen_parameters is True
    # what Lightning adds at set-up under bf16-mixed and manual optimization, plus our gradient clipping
    config = dict(strategy.config, train_micro_batch_size_per_gpu=1, gradient_accumulation_steps=1,
                  gradient_clipping=1.0, bf16={"enabled": True})
    parsed = DeepSpeedConfig(config)
    assert parsed.zero_optimization_stage == 2 and parsed.bfloat16_config.enabled and parsed.gradient_clipping == 1.0


def test_frozen_models_stay_outside_the_module_tree(tiny_llama, tiny_classifier):
    """Strategies wrap, shard and broadcast registered modules only: the frozen reference and reward are not."""
    module = make_module(tiny_llama, reward_model=tiny_classifier, reference=ReferenceConfig(tiny_llama))
    module.configure_model()
    registered = {id(p) for p in module.parameters()}
    assert module.reference is not None and module.reward_model is not None
    assert not any(id(p) in registered for p in module.reference.parameters())
    assert not any(id(p) in registered for p in module.reward_model.parameters())
    with_strategy(module, DDPStrategy()).trainer.max_steps = 10
    optimizer = module.configure_optimizers()["optimizer"]
    optimized = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert optimized == {id(p) for p in module.policy.parameters() if p.requires_grad}  # LoRA + value head only


def test_generation_is_synced_only_when_weights_are_sharded(tiny_llama):
    module = make_module(tiny_llama)
    assert not module.parameters_are_sharded()  # no trainer
    assert not with_strategy(module, DDPStrategy()).parameters_are_sharded()
    assert with_strategy(module, ModelParallelStrategy()).parameters_are_sharded()
    assert not with_strategy(module, DeepSpeedStrategy(stage=2)).parameters_are_sharded()
    assert with_strategy(module, DeepSpeedStrategy(stage=3)).parameters_are_sharded()


def test_deepspeed_setup_hands_clipping_to_the_engine_and_refuses_what_it_cannot_do(tiny_llama):
    module = with_strategy(make_module(tiny_llama, ppo=PPOConfig(max_grad_norm=0.7)), DeepSpeedStrategy(stage=2))
    module.setup("fit")
    assert module.trainer.strategy.config["gradient_clipping"] == 0.7
    assert module.trainer.strategy.exclude_frozen_parameters is True

    module = with_strategy(make_module(tiny_llama, ppo=PPOConfig(gradient_accumulation_steps=2)),
                           DeepSpeedStrategy(stage=2))
    with pytest.raises(ValueError, match="gradient_accumulation_steps"):
        module.setup("fit")
    module = with_strategy(make_module(tiny_llama), DeepSpeedStrategy(stage=3))
    with pytest.raises(ValueError, match="ZeRO stage 3"):
        module.setup("fit")


def test_quantized_policy_cannot_be_sharded(tiny_llama):
    module = make_module(tiny_llama)
    module.policy_config.quantization = "4bit"
    module._device_mesh = object()  # what ModelParallelStrategy hands configure_model
    with pytest.raises(ValueError, match="policy.quantization cannot be combined with sharding"):
        module.configure_model()


def test_multi_gpu_recipes_parse_on_the_cli():
    from test_cli import run_cli

    for name in ("llama3.1-8b-fsdp2.yaml", "llama3.1-8b-deepspeed-zero2.yaml"):
        result = run_cli("fit", "--config", os.path.join(REPO_ROOT, "recipes", name), "--print_config")
        assert result.returncode == 0, result.stderr[-2000:]
        assert "class_path: lightning.pytorch.strategies." in result.stdout
