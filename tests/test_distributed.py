"""Data-parallel PPO with Lightning's DDP strategy: 2 CPU processes (gloo), launched by the CLI."""

import os

import pytest
import torch

from lit_rlhf.ppo import masked_mean
from test_cli import QUICKSTART, run_cli


def test_ddp_two_processes_share_statistics_and_weights(tmp_path, monkeypatch):
    tests_dir = os.path.dirname(os.path.abspath(__file__))  # so the launched ranks can import ddp_probe
    monkeypatch.setenv("PYTHONPATH", tests_dir + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = run_cli(
        "fit", *QUICKSTART, "--trainer.strategy=ddp", "--trainer.devices=2", "--trainer.max_epochs=1",
        "--trainer.limit_train_batches=2", "--data.batch_size=8", "--model.ppo.adaptive_kl=true",
        "--model.ppo.gradient_accumulation_steps=2", "--model.ppo.target_kl=1000",
        "--trainer.callbacks+=ddp_probe.DDPProbe", f"--trainer.callbacks.out_dir={tmp_path}/probe", cwd=tmp_path,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    ranks = [torch.load(tmp_path / "probe" / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    assert ranks[0]["world_size"] == 2

    # identical trainable weights on both ranks after every step (checked at the end), and training moved them
    for name, value in ranks[0]["weights"].items():
        torch.testing.assert_close(ranks[1]["weights"][name], value, rtol=0, atol=0)
    assert ranks[0]["weights"]["policy.value_head.weight"].abs().sum() > 0

    for step in range(2):
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
    # the rank means differ (the statistics really were global, not per rank)
    assert any(abs(masked_mean(r["records"][0]["advantages"], r["records"][0]["mask"]).item()) > 1e-4 for r in ranks)
