"""Run state: exact resume, checkpoints on signals, atomic writes, the non-finite guard, W&B offline."""

import errno
import glob
import json
import os
import signal
import subprocess
import sys
import time

import lightning as L
import pandas as pd
import pytest
import torch
import yaml
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException

from lit_rlhf.callbacks import AtomicCheckpointIO, PreemptionCheckpoint
from lit_rlhf.module import PPOConfig
from test_cli import QUICKSTART, run_cli
from test_module import Recorder, make_data, make_module

PPO = PPOConfig(ppo_epochs=2, num_minibatches=2, adaptive_kl=True)


def trainer_for(tmp_path, callbacks, max_epochs=2, limit_train_batches=3):
    return L.Trainer(
        accelerator="cpu", devices=1, max_epochs=max_epochs, limit_train_batches=limit_train_batches, logger=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path),
        callbacks=[ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_last=True), *callbacks],
    )


class PreemptAfter(L.Callback):
    """Sends this process a real SIGTERM at the end of PPO iteration ``n``, like a cloud preemption."""

    def __init__(self, n: int):
        self.n = n

    def on_train_batch_end(self, trainer, pl_module, *args):
        if pl_module.iteration == self.n:
            os.kill(os.getpid(), signal.SIGTERM)


def trainable(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def test_resumed_run_matches_uninterrupted_run(tiny_llama, tmp_path):
    """6 iterations over 2 epochs, interrupted mid-epoch after 4, resume gives identical metrics and weights."""
    L.seed_everything(0)
    full, full_log = make_module(tiny_llama, ppo=PPO), Recorder()
    trainer_for(tmp_path / "full", [full_log]).fit(full, datamodule=make_data(tiny_llama))

    L.seed_everything(0)
    first = make_module(tiny_llama, ppo=PPO)
    with pytest.raises(SIGTERMException):
        trainer_for(tmp_path / "cut", [PreemptAfter(4), PreemptionCheckpoint()]).fit(first, datamodule=make_data(tiny_llama))
    assert first.iteration == 4
    checkpoint = tmp_path / "cut" / "ckpt" / "last.ckpt"
    assert checkpoint.exists()

    L.seed_everything(123)  # a different seed: everything that matters must come from the checkpoint
    resumed, resumed_log = make_module(tiny_llama, ppo=PPO), Recorder()
    trainer_for(tmp_path / "cut", [resumed_log]).fit(resumed, datamodule=make_data(tiny_llama), ckpt_path=str(checkpoint))
    assert resumed.iteration == 6
    for name in ("objective/scores", "objective/kl", "loss/policy_avg", "loss/value_avg", "kl_coef", "lr"):
        assert resumed_log.history[name] == pytest.approx(full_log.history[name][4:], rel=1e-5, abs=1e-7), name
    for name, value in trainable(full).items():
        torch.testing.assert_close(trainable(resumed)[name], value, rtol=1e-5, atol=1e-7)
    assert resumed.kl_controller.value == pytest.approx(full.kl_controller.value)


def test_resume_after_a_max_steps_stop_matches_uninterrupted_run(tiny_llama, tmp_path):
    """A run stopped by trainer.max_steps in the middle of an epoch (its checkpoint is written at that cut
    epoch's end) resumes inside that epoch: no iteration is lost, every metric matches."""
    L.seed_everything(0)
    full, full_log = make_module(tiny_llama, ppo=PPO), Recorder()
    trainer_for(tmp_path / "full", [full_log], limit_train_batches=4).fit(full, datamodule=make_data(tiny_llama))
    assert full.iteration == 8

    L.seed_everything(0)
    first = make_module(tiny_llama, ppo=PPO)
    steps_per_iteration = PPO.ppo_epochs * PPO.num_minibatches
    cut = trainer_for(tmp_path / "cut", [], limit_train_batches=4)
    cut.fit_loop.epoch_loop.max_steps = 3 * steps_per_iteration  # --trainer.max_steps: 3 of epoch 0's 4 iterations
    cut.fit(first, datamodule=make_data(tiny_llama))
    assert first.iteration == 3

    L.seed_everything(123)
    resumed, resumed_log = make_module(tiny_llama, ppo=PPO), Recorder()
    trainer = trainer_for(tmp_path / "cut", [resumed_log], limit_train_batches=4)
    trainer.fit(resumed, datamodule=make_data(tiny_llama), ckpt_path=str(tmp_path / "cut" / "ckpt" / "last.ckpt"))
    assert resumed.iteration == 8 and trainer.current_epoch == 2
    for name in ("objective/scores", "objective/kl", "loss/policy_avg", "loss/value_avg", "kl_coef", "epoch"):
        assert resumed_log.history[name] == pytest.approx(full_log.history[name][3:], rel=1e-5, abs=1e-7), name
    for name, value in trainable(full).items():
        torch.testing.assert_close(trainable(resumed)[name], value, rtol=1e-5, atol=1e-7)


def _wait_for(path, process, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline and process.poll() is None:
        if path.exists():
            return True
        time.sleep(0.2)
    return False


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_writes_checkpoint_and_run_resumes(signum, tmp_path):
    process = subprocess.Popen(
        [sys.executable, "-m", "lit_rlhf.cli", "fit", *QUICKSTART, "--trainer.max_epochs=50"], cwd=tmp_path,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        started = _wait_for(tmp_path / "outputs" / "quickstart" / "version_0" / "samples.jsonl", process)
        assert started, process.communicate()[0][-3000:]
        process.send_signal(signum)
        output, _ = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == (143 if signum == signal.SIGTERM else 130), output[-3000:]
    run_dir = tmp_path / "outputs" / "quickstart" / "version_0"
    last = run_dir / "checkpoints" / "last.ckpt"
    assert last.exists(), output[-3000:]
    checkpoint = torch.load(last, weights_only=False)
    iteration = checkpoint["ppo_progress"]["iteration"]
    per_epoch = 4  # 256 prompts, 64 per iteration
    assert 1 <= iteration < 50 * per_epoch
    assert checkpoint["PromptDataModule"]["batches_consumed"] == iteration % per_epoch
    assert "Saved" in output
    metrics = pd.read_csv(run_dir / "metrics.csv")
    assert len(metrics["objective/scores"].dropna()) == iteration  # the interrupted iteration's row is there

    # resume, in the same run folder, and finish the interrupted epoch plus one more
    epochs = iteration // per_epoch + 2
    resumed = run_cli("fit", *QUICKSTART, f"--trainer.max_epochs={epochs}", "--ckpt_path", "last", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Restoring states from the checkpoint path at outputs/quickstart/version_0/checkpoints/last.ckpt" in (
        resumed.stderr + resumed.stdout)
    assert sorted(os.listdir(last.parent))[-1] == "last.ckpt"  # overwritten, no last-v1.ckpt beside it
    assert os.listdir(run_dir.parent) == ["version_0"]
    final = torch.load(last, weights_only=True)  # resumable checkpoints load without unpickling code
    assert final["ppo_progress"]["iteration"] == epochs * per_epoch
    steps = pd.read_csv(run_dir / "metrics.csv").dropna(subset=["objective/scores"])["step"].tolist()
    assert steps == list(range(epochs * per_epoch))  # one table, every iteration once


def test_a_crash_leaves_a_checkpoint_that_exports_and_resumes(tmp_path):
    """A reward function that raises at its 3rd call: last.ckpt holds the state reached, and
    ``lit-rlhf export --checkpoint`` turns it into a model; a resume refuses another recipe's checkpoint."""
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    env = {"PYTHONPATH": tests_dir + os.pathsep + os.environ.get("PYTHONPATH", "")}
    result = run_cli("fit", *QUICKSTART, "--model.reward.function=reward_fns:fails_at_third_call", cwd=tmp_path,
                     env=env)
    assert result.returncode != 0 and "reward function failed" in result.stderr
    last = tmp_path / "outputs" / "quickstart" / "version_0" / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["ppo_progress"]["iteration"] == 2
    exported = run_cli("export", "--checkpoint", str(last), "--output_dir", str(tmp_path / "merged"))
    assert exported.returncode == 0, exported.stderr[-3000:]
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(tmp_path / "merged") is not None
    other = run_cli("fit", *QUICKSTART, "--data.batch_size=32", "--ckpt_path", "last", cwd=tmp_path, env=env)
    assert other.returncode == 2 and "written by a run of another recipe" in other.stderr
    assert "data.batch_size: 64 -> 32" in other.stderr


def test_atomic_checkpoint_survives_a_crash_mid_write(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"step": 1}, path)

    def crash(obj, file):
        file.write(b"partial bytes")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        io.save_checkpoint({"step": 2}, path)
    assert torch.load(path, weights_only=False) == {"step": 1}
    assert os.listdir(tmp_path) == ["last.ckpt"]  # no temporary file left behind

    def full(obj, file):  # a full disk: a one-line error naming the checkpoint and what to do
        file.write(b"partial bytes")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", full)
    from lit_rlhf.errors import TrainingError

    with pytest.raises(TrainingError, match=r"No space left on the device to write the checkpoint .*last.ckpt .*"
                                            r"the previous checkpoint there is intact"):
        io.save_checkpoint({"step": 3}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=False) == {"step": 1}
    assert os.listdir(tmp_path) == ["last.ckpt"]


def test_module_installs_atomic_checkpoint_io(tiny_llama, tmp_path):
    module = make_module(tiny_llama, ppo=PPOConfig(ppo_epochs=1))
    trainer = trainer_for(tmp_path, [], max_epochs=1, limit_train_batches=1)
    trainer.fit(module, datamodule=make_data(tiny_llama))
    assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)


def test_non_finite_updates_are_skipped_then_stop_the_run(tiny_llama, tmp_path):
    L.seed_everything(0)
    module = make_module(tiny_llama, ppo=PPOConfig(ppo_epochs=1, num_minibatches=2, max_consecutive_skips=3))
    real_loss, calls = module.update.loss, {"n": 0}

    def poisoned(rollout, index, normalizers=None):
        calls["n"] += 1
        loss, stats = real_loss(rollout, index, normalizers)
        return (loss * float("nan") if calls["n"] >= 3 else loss), stats  # minibatches 3, 4, 5 ... are NaN

    module.update.loss = poisoned
    snapshots = {}

    class Snapshot(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            snapshots[pl_module.iteration] = trainable(pl_module)

    recorder = Recorder()
    with pytest.warns(RuntimeWarning, match="Skipped an optimizer step"):
        with pytest.raises(RuntimeError, match=r"3 optimizer steps in a row .* last good state is saved in"):
            trainer_for(tmp_path, [recorder, Snapshot()], max_epochs=1, limit_train_batches=4).fit(
                module, datamodule=make_data(tiny_llama)
            )
    assert recorder.history["train/skipped_updates"] == [0.0, 2.0]  # iteration 2 skipped both of its steps
    torch.testing.assert_close(snapshots[2], snapshots[1])  # skipped steps changed nothing
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    for name, value in snapshots[1].items():
        torch.testing.assert_close(saved["state_dict"][name], value)


def test_sample_table_and_metrics_in_offline_wandb_run(tmp_path):
    """W&B (offline): metrics and sample tables in the run, the project defaults to lit-rlhf, and everything
    of the run (config, samples, policy, checkpoints) sits in the run's own folder; a resume continues it."""
    wandb_args = ["--trainer.logger=lightning.pytorch.loggers.WandbLogger", f"--trainer.logger.save_dir={tmp_path}",
                  "--trainer.logger.offline=true"]
    result = run_cli(
        "fit", *QUICKSTART, "--trainer.max_epochs=1", "--trainer.limit_train_batches=3", *wandb_args,
        "--trainer.callbacks=lit_rlhf.callbacks.SampleTable", "--trainer.callbacks.every_n_steps=2",
        "--trainer.callbacks+=ModelCheckpoint", "--trainer.callbacks.save_last=true", cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    runs = glob.glob(str(tmp_path / "wandb" / "offline-run-*"))
    assert len(runs) == 1
    log = open(glob.glob(os.path.join(runs[0], "*.wandb"))[0], "rb").read()
    for key in (b"objective/scores", b"objective/kl", b"loss/policy_avg", b"policy/approxkl_avg", b"lr", b"ppo_epochs"):
        assert key in log, key
    assert b"lit-rlhf" in log  # the default project
    tables = sorted(glob.glob(os.path.join(runs[0], "files", "media", "table", "samples_*.table.json")))
    assert len(tables) == 2  # iterations 1 and 3
    table = json.load(open(tables[0]))
    assert table["columns"] == ["prompt", "completion", "score", "kl", "reward"] and len(table["data"]) == 8
    (run_dir,) = (tmp_path / "lit-rlhf").iterdir()  # <save_dir>/<project>/<run id>
    rows = [json.loads(line) for line in open(run_dir / "samples.jsonl")]
    assert [r["iteration"] for r in rows] == [1] * 8 + [3] * 8
    for name in ("config.yaml", "policy/adapter_model.safetensors", "checkpoints/last.ckpt"):
        assert (run_dir / name).exists(), name

    resumed = run_cli("fit", *QUICKSTART, "--trainer.max_epochs=1", "--trainer.limit_train_batches=4", *wandb_args,
                      "--trainer.callbacks=lit_rlhf.callbacks.SampleTable", "--trainer.callbacks+=ModelCheckpoint",
                      "--trainer.callbacks.save_last=true", "--ckpt_path", "last", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [path.name for path in (tmp_path / "lit-rlhf").iterdir()] == [run_dir.name]  # the same run folder
    assert {path.name.rsplit("-", 1)[-1] for path in (tmp_path / "wandb").glob("offline-run-*")} == {run_dir.name}


TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
PROBES = {"PYTHONPATH": TESTS_DIR + os.pathsep + os.environ.get("PYTHONPATH", "")}
COMPARED = ["objective/scores", "objective/kl", "loss/policy_avg", "loss/value_avg", "kl_coef", "lr"]


def quickstart_metrics(cwd):
    frame = pd.read_csv(cwd / "outputs" / "quickstart" / "version_0" / "metrics.csv")
    return frame.dropna(subset=["objective/scores"]).reset_index(drop=True)


@pytest.fixture(scope="module")
def three_epochs(tmp_path_factory):
    """The quickstart for 3 epochs (12 iterations) without a stop: the reference of the crash tests."""
    cwd = tmp_path_factory.mktemp("three_epochs")
    assert run_cli("fit", *QUICKSTART, "--trainer.max_epochs=3", cwd=cwd).returncode == 0
    return quickstart_metrics(cwd)


@pytest.mark.parametrize("crash", [
    ["--trainer.callbacks+=run_probes.SignalAt", "--trainer.callbacks.batch=7", "--trainer.callbacks.signal_name=KILL"],
    ["--model.reward.function=reward_fns:sentiment_failing_on_request"],
], ids=["kill-9-after-the-epoch-checkpoint", "exception-in-the-reward"])
def test_a_crashed_run_resumes_with_each_iteration_once_and_exactly(crash, three_epochs, tmp_path):
    """kill -9 in iteration 7 (the last checkpoint is from iteration 4), or a reward that raises in iteration 7 (a
    checkpoint of the state reached): after --ckpt_path last, metrics.csv holds every iteration once, steps 0-11
    without a gap, and the values of the uninterrupted run."""
    reward = [arg for arg in crash if arg.startswith("--model.reward")]
    first = run_cli("fit", *QUICKSTART, "--trainer.max_epochs=3", *crash, cwd=tmp_path,
                    env={**PROBES, "REWARD_FAILS_AT": "7"})
    assert first.returncode != 0
    resumed = run_cli("fit", *QUICKSTART, "--trainer.max_epochs=3", *reward, "--ckpt_path", "last", cwd=tmp_path,
                      env=PROBES)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    frame = quickstart_metrics(tmp_path)
    assert frame["step"].tolist() == list(range(12))
    pd.testing.assert_frame_equal(frame[COMPARED], three_epochs[COMPARED], rtol=1e-5, atol=1e-7)


def test_resume_applies_the_settings_of_the_command_line(tmp_path):
    """--ckpt_path (last, or a file) with a new learning rate, KL coefficient and run length: what config.yaml
    records is what runs, from the resumed iteration on (the schedule is the new run's, the KL coefficient the new
    one); a checkpoint of another recipe is refused with the differences listed."""
    assert run_cli("fit", *QUICKSTART, "--trainer.max_epochs=1", cwd=tmp_path).returncode == 0
    run_dir = tmp_path / "outputs" / "quickstart" / "version_0"
    saved = tmp_path / "after-epoch-1.ckpt"
    saved.write_bytes((run_dir / "checkpoints" / "last.ckpt").read_bytes())
    changes = ["--trainer.max_epochs=2", "--model.optimizer.lr=1e-5", "--model.ppo.kl_coef=0.5"]
    for ckpt_path in ("last", str(saved)):
        resumed = run_cli("fit", *QUICKSTART, *changes, "--ckpt_path", ckpt_path, cwd=tmp_path)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert "Resuming with changed settings, applied from step 4 on" in resumed.stderr
        frame = quickstart_metrics(tmp_path)
        assert frame["step"].tolist() == list(range(8))
        before, after = frame[:4], frame[4:]
        assert (before["lr"] > 1e-4).all() and before["kl_coef"].tolist() == pytest.approx([0.025] * 4)
        assert after["kl_coef"].tolist() == pytest.approx([0.5] * 4)
        final = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
        total = 2 * 4 * 8  # 2 epochs of 4 iterations, at most 4 PPO epochs x 2 minibatches each
        assert after["lr"].iloc[-1] == pytest.approx(1e-5 * (1 - final["global_step"] / total), rel=1e-4)
        assert (after["lr"] <= 1e-5).all() and after["lr"].is_monotonic_decreasing
        config = yaml.safe_load((run_dir / "config.yaml").read_text())
        assert config["model"]["optimizer"]["lr"] == 1e-5 and config["model"]["ppo"]["kl_coef"] == 0.5
    other = run_cli("fit", *QUICKSTART, "--model.reward.function=reward_fns:words", "--ckpt_path", str(saved),
                    cwd=tmp_path, env=PROBES)
    assert other.returncode == 2, other.stderr[-3000:]
    assert ("written by a run of another recipe: model.reward.function: 'lit_rlhf.rewards:sentiment_lexicon' -> "
            "'reward_fns:words'") in other.stderr
