"""Multi-process PPO with Lightning's strategies, 2 CPU processes (gloo), launched by the CLI as a user does.

DDP is the reference. FSDP2 (ModelParallelStrategy) and DeepSpeed ZeRO-2 must reproduce it metric by metric,
including across a checkpoint and resume, and their checkpoints must hold the trained weights only.
"""

import json
import os

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from lit_rlhf.ppo import masked_mean
from test_cli import QUICKSTART, run_cli

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
METRICS = ["objective/scores", "objective/kl", "objective/entropy", "loss/policy_avg", "loss/value_avg",
           "policy/approxkl_avg", "policy/clipfrac_avg", "kl_coef"]
# two epochs of 2 PPO iterations, every rank 8 prompts; gradient clipping binds (max_grad_norm 0.05)
RUN = [*QUICKSTART, "--trainer.devices=2", "--trainer.limit_train_batches=2", "--data.batch_size=8",
       "--model.ppo.adaptive_kl=true", "--model.ppo.max_grad_norm=0.05", "--model.ppo.target_kl=1000",
       "--model.optimizer.scheduler=constant"]  # a linear decay would depend on each run's max_epochs
FSDP2 = '{"class_path": "lightning.pytorch.strategies.ModelParallelStrategy", "init_args": {"save_distributed_checkpoint": false}}'
DEEPSPEED = '{"class_path": "cpu_deepspeed.CPUDeepSpeedStrategy", "init_args": {"stage": 2, "process_group_backend": "gloo"}}'


def launch(cwd, *args):
    """``lit-rlhf fit`` in ``cwd``, with this folder importable (probe callback, CPU DeepSpeed)."""
    env_path = TESTS_DIR + os.pathsep + os.environ.get("PYTHONPATH", "")
    os.makedirs(cwd, exist_ok=True)
    result = run_cli("fit", *RUN, *args, cwd=cwd, timeout=600, env={"PYTHONPATH": env_path, "DS_ACCELERATOR": "cpu"})
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def metrics(run_dir):
    frame = pd.read_csv(run_dir / "metrics.csv")
    return frame[frame["objective/scores"].notna()][METRICS].reset_index(drop=True)


def run_dirs(cwd):
    return sorted((cwd / "outputs" / "quickstart").glob("version_*"))


@pytest.fixture(scope="module")
def ddp(tmp_path_factory):
    """The reference: DDP, 2 epochs, gradient accumulation over 2 micro-batches, with a probe on each rank."""
    cwd = tmp_path_factory.mktemp("ddp")
    launch(cwd, "--trainer.strategy=ddp", "--trainer.max_epochs=2", "--model.ppo.gradient_accumulation_steps=2",
           "--trainer.callbacks+=ddp_probe.DDPProbe", f"--trainer.callbacks.out_dir={cwd}/probe")
    return cwd


def test_ddp_two_processes_share_statistics_and_weights(ddp):
    ranks = [torch.load(ddp / "probe" / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    assert ranks[0]["world_size"] == 2
    # each of the 2 processes takes its share of the cores (unless OMP_NUM_THREADS says otherwise)
    threads = int(os.environ.get("OMP_NUM_THREADS") or max(len(os.sched_getaffinity(0)) // 2, 1))
    assert ranks[0]["records"][0]["threads"] == ranks[1]["records"][0]["threads"] == threads

    # identical trainable weights on both ranks after every step (checked at the end), and training moved them
    for name, value in ranks[0]["weights"].items():
        torch.testing.assert_close(ranks[1]["weights"][name], value, rtol=0, atol=0)
    assert ranks[0]["weights"]["policy.value_head.weight"].abs().sum() > 0

    for step in range(4):
        r0, r1 = ranks[0]["records"][step], ranks[1]["records"][step]
        assert not set(r0["prompts"]) & set(r1["prompts"])  # each rank rolls out its own shard
        # advantages are whitened with the statistics of both ranks together
        adv = torch.cat([r0["advantages"], r1["advantages"]])
        mask = torch.cat([r0["mask"], r1["mask"]])
        assert masked_mean(adv, mask).item() == pytest.approx(0.0, abs=1e-5)
        var = masked_mean(adv**2, mask) * mask.sum() / (mask.sum() - 1)
        assert var.item() == pytest.approx(1.0, rel=1e-4)
        # logged metrics are the mean over ranks; the KL coefficient stays identical
        expected = (r0["local_score"] + r1["local_score"]) / 2
        assert r0["logged_score"] == pytest.approx(expected, abs=1e-6)
        assert r1["logged_score"] == pytest.approx(expected, abs=1e-6)
        assert r0["kl_coef"] == r1["kl_coef"]
        # the logged KL is the mean of the ranks' KL (it was world_size x that when a reduction wrote into it)
        assert r0["logged_kl"] == pytest.approx((r0["local_kl"] + r1["local_kl"]) / 2, rel=1e-5)
        assert r0["logged_kl"] == pytest.approx(-r0["logged_non_score_reward"] / r0["kl_coef_in_rollout"], rel=1e-5)
    # the rank means differ (the statistics really were global, not per rank)
    assert any(abs(masked_mean(r["records"][0]["advantages"], r["records"][0]["mask"]).item()) > 1e-4 for r in ranks)


def assert_checkpoint_holds_trained_weights_only(state_dict, reference_weights):
    assert set(state_dict) == set(reference_weights)  # LoRA + value head, nothing of the frozen base
    assert all("lora_" in name or "value_head" in name for name in state_dict)
    for name, value in state_dict.items():
        assert value.shape == reference_weights[name].shape, name  # whole tensors, not shards


def test_fsdp2_trains_checkpoints_resumes_and_exports_like_ddp(ddp, tmp_path):
    """Sharded rollout and PPO update, a checkpoint after epoch 1, a resume for epoch 2, then export."""
    reference_weights = torch.load(ddp / "probe" / "rank0.pt", weights_only=False)["weights"]
    args = ["--model.ppo.gradient_accumulation_steps=2", f"--trainer.strategy={FSDP2}"]
    launch(tmp_path, *args, "--trainer.max_epochs=1")
    checkpoint = torch.load(tmp_path / "outputs" / "quickstart" / "version_0" / "checkpoints" / "last.ckpt", weights_only=True)
    assert_checkpoint_holds_trained_weights_only(checkpoint["state_dict"], reference_weights)
    launch(tmp_path, *args, "--trainer.max_epochs=2", "--ckpt_path", "last")

    (run_dir,) = run_dirs(tmp_path)  # the resume continued the run's folder and its metrics.csv
    pd.testing.assert_frame_equal(metrics(run_dir), metrics(run_dirs(ddp)[0]), rtol=1e-4, atol=1e-6)
    adapter, ddp_adapter = (load_file(d / "policy" / "adapter_model.safetensors")
                            for d in (run_dirs(tmp_path)[-1], run_dirs(ddp)[0]))
    assert set(adapter) == set(ddp_adapter)
    for name, value in adapter.items():
        torch.testing.assert_close(value, ddp_adapter[name], rtol=1e-4, atol=1e-6)

    merged = tmp_path / "merged"
    result = run_cli("export", "--adapter_dir", str(run_dirs(tmp_path)[-1] / "policy"), "--output_dir", str(merged))
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads((merged / "config.json").read_text())["model_type"] == "llama"


def test_fsdp2_on_one_process_reproduces_a_plain_run(tmp_path):
    """Sharding over a mesh of one changes nothing: same metrics as the same run without a strategy."""
    one = ["--trainer.devices=1", "--trainer.max_epochs=1"]
    launch(tmp_path / "plain", *one)
    launch(tmp_path / "fsdp2", *one, f"--trainer.strategy={FSDP2}")
    pd.testing.assert_frame_equal(metrics(run_dirs(tmp_path / "fsdp2")[0]), metrics(run_dirs(tmp_path / "plain")[0]),
                                  rtol=1e-5, atol=1e-7)


def test_deepspeed_zero2_checkpoints_trained_weights_only_and_resumes_like_ddp(ddp, tmp_path):
    """ZeRO-2 (DeepSpeed refuses accumulation here, so the DDP reference runs without it)."""
    launch(tmp_path / "ddp", "--trainer.strategy=ddp", "--trainer.max_epochs=2")
    launch(tmp_path / "ds", f"--trainer.strategy={DEEPSPEED}", "--trainer.max_epochs=1")
    state = tmp_path / "ds" / "outputs" / "quickstart" / "version_0" / "checkpoints" / "last.ckpt" / "checkpoint"
    module_states = torch.load(state / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    reference_weights = torch.load(ddp / "probe" / "rank0.pt", weights_only=False)["weights"]
    assert_checkpoint_holds_trained_weights_only(module_states, reference_weights)
    launch(tmp_path / "ds", f"--trainer.strategy={DEEPSPEED}", "--trainer.max_epochs=2", "--ckpt_path", "last")

    (run_dir,) = run_dirs(tmp_path / "ds")
    pd.testing.assert_frame_equal(metrics(run_dir), metrics(run_dirs(tmp_path / "ddp")[0]), rtol=1e-4, atol=1e-6)


def test_two_ranks_with_accumulation_step_with_the_gradient_of_their_joint_minibatch(tmp_path):
    """Responses of different lengths on 2 ranks, each minibatch in 2 micro-batches: the all-reduced gradient of the
    first step equals the gradient of one process computing the loss over both ranks' rows at once."""
    from lit_rlhf import PolicyConfig, PPOModule, SamplingConfig
    from lit_rlhf.module import EvaluationConfig, OptimizerConfig, PPOConfig, ReferenceConfig, RewardConfig, Rollout

    launch(tmp_path, "--trainer.strategy=ddp", "--trainer.max_epochs=1", "--trainer.limit_train_batches=1",
           "--model.ppo.num_minibatches=1", "--model.ppo.gradient_accumulation_steps=2",
           "--model.generation.stop_tokens=[the,a,was,is,and,it]",
           "--trainer.callbacks+=ddp_probe.FirstStepProbe", f"--trainer.callbacks.out_dir={tmp_path}/probe")
    ranks = [torch.load(tmp_path / "probe" / f"first_step_rank{r}.pt", weights_only=False) for r in (0, 1)]
    for name, value in ranks[0]["gradients"].items():
        torch.testing.assert_close(ranks[1]["gradients"][name], value, rtol=0, atol=0)  # all-reduced

    hp = ranks[0]["hparams"]
    module = PPOModule(policy=PolicyConfig(**hp["policy"]), reward=RewardConfig(**hp["reward"]),
                       reference=ReferenceConfig(**hp["reference"]), generation=SamplingConfig(**hp["generation"]),
                       ppo=PPOConfig(**hp["ppo"]), optimizer=OptimizerConfig(**hp["optimizer"]),
                       evaluation=EvaluationConfig(**hp["evaluation"]))
    module.configure_model()
    module.load_state_dict(ranks[0]["weights"], strict=False)
    parts = [r["rollout"] for r in ranks]
    lengths = torch.cat([p["mask"].sum(1) for p in parts])
    assert lengths.min() < lengths.max()
    joint = Rollout(**_joint_rollout(parts, module.tokenizer.pad_token_id), stats={})
    module.policy.train()
    loss, _ = module.update.loss(joint, torch.arange(joint.mask.shape[0]))
    loss.backward()
    for name, parameter in module.named_parameters():
        if parameter.grad is not None:
            torch.testing.assert_close(ranks[0]["gradients"][name], parameter.grad, rtol=1e-4, atol=1e-7)


def _joint_rollout(parts, pad_token_id):
    """Two ranks' rollouts as one: prompts left-padded, responses right-padded to common widths."""
    context = max(p["context_length"] for p in parts)
    width = max(p["query_responses"].shape[1] - p["context_length"] for p in parts)

    def pad(tensor, left, right, value):
        return torch.nn.functional.pad(tensor, (left, right), value=value)

    joint = {}
    for key in parts[0]:
        values = [p[key] for p in parts]
        if key in ("query_responses", "attention_mask"):
            value = pad_token_id if key == "query_responses" else 0
            joint[key] = torch.cat([pad(v, context - p["context_length"], width - (v.shape[1] - p["context_length"]), value)
                                    for v, p in zip(values, parts)])
        elif isinstance(values[0], torch.Tensor) and values[0].dim() == 2:
            joint[key] = torch.cat([pad(v, 0, width - v.shape[1], 0.0) for v in values])
        elif isinstance(values[0], torch.Tensor):
            joint[key] = torch.cat(values)
        elif isinstance(values[0], list):
            joint[key] = values[0] + values[1]
        else:
            joint[key] = values[0] if values[0] is None else context
    return joint


GRPO_RUN = ["--config", os.path.join(os.path.dirname(TESTS_DIR), "recipes", "grpo-quickstart.yaml"),
            f"--data.path={os.path.join(os.path.dirname(TESTS_DIR), 'recipes', 'data', 'word_categories.jsonl')}",
            f"--data.val_path={os.path.join(os.path.dirname(TESTS_DIR), 'recipes', 'data', 'word_categories_val.jsonl')}",
            "--trainer.limit_val_batches=1", "--trainer.devices=2", "--trainer.max_epochs=1", "--trainer.limit_train_batches=2",
            "--data.batch_size=4"]


def test_dynamic_sampling_retries_together_on_sharded_ranks(tmp_path):
    """FSDP2, 2 ranks; only rank 0's groups are all equal, so only rank 0 wants new groups. Retrying alone, its
    generate would all-gather weights that rank 1 never asks for (a hang); the ranks now retry together."""
    result = run_cli("fit", *GRPO_RUN, f"--trainer.strategy={FSDP2}", "--model.ppo.dynamic_sampling=true",
                     "--model.ppo.dynamic_sampling_max_retries=2",
                     "--model.reward.function=reward_fns:characters_but_rank_zero_all_equal",
                     cwd=tmp_path, timeout=180, env={"PYTHONPATH": TESTS_DIR + os.pathsep + os.environ.get("PYTHONPATH", "")})
    assert result.returncode == 0, result.stderr[-4000:]
    frame = pd.read_csv(next((tmp_path / "outputs" / "grpo-quickstart").glob("version_*")) / "metrics.csv")
    # both ranks ran every retry: the logged mean over ranks is rank 0's count, 2 (rank 1 needed none)
    assert frame["dynamic_sampling/retries"].dropna().tolist() == [2.0, 2.0]
    assert frame["dynamic_sampling/dropped_groups"].dropna().tolist() == [2.0, 2.0]  # rank 0's 4, rank 1's 0
