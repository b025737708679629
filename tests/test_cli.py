"""``lit-rlhf`` run as a user runs it: a subprocess on the shipped recipes."""

import glob
import os
import re
import subprocess
import sys
import time

import pytest
import torch
import yaml

from conftest import REPO_ROOT

RECIPES = sorted(glob.glob(os.path.join(REPO_ROOT, "recipes", "*.yaml")))
QUICKSTART = [
    "--config", os.path.join(REPO_ROOT, "recipes", "quickstart.yaml"),
    "--data.path", os.path.join(REPO_ROOT, "recipes", "data", "sentiment_prompts.jsonl"),
]


def run_cli(*args, cwd=REPO_ROOT, timeout=300, env=None):
    """``lit-rlhf`` as a user runs it; ``env`` adds variables to this process's (a value None removes one)."""
    env = {key: value for key, value in dict(os.environ, PYTHONUNBUFFERED="1", **(env or {})).items()
           if value is not None}
    return subprocess.run(
        [sys.executable, "-m", "lit_rlhf.cli", *args], cwd=cwd, env=env, capture_output=True, text=True,
        timeout=timeout,
    )


def test_console_script_help_version_and_export_usage():
    started = time.perf_counter()
    result = subprocess.run(["lit-rlhf", "--help"], capture_output=True, text=True, timeout=120)
    assert time.perf_counter() - started < 3  # no torch/Lightning import for the command list
    assert result.returncode == 0 and "fit" in result.stdout and "export" in result.stdout
    version = subprocess.run(["lit-rlhf", "--version"], capture_output=True, text=True, timeout=120)
    assert version.returncode == 0 and version.stdout.strip() == "lit-rlhf 0.1.0"
    export = run_cli("export", "--help")
    assert export.returncode == 0 and export.stdout.startswith("usage: lit-rlhf export")
    assert "--checkpoint" in export.stdout and "--adapter_dir" in export.stdout


def test_fit_help_documents_every_recipe_field():
    result = run_cli("fit", "--help")
    assert result.returncode == 0, result.stderr[-2000:]
    for text in ("LoRA rank", "Clip range of the importance ratio", "Tokens that end a response",
                 "Prompts per PPO iteration"):
        assert text in " ".join(result.stdout.split()), text
    comments = run_cli("fit", "--config", "recipes/quickstart.yaml", "--print_config=comments")
    assert comments.returncode == 0, comments.stderr[-2000:]
    assert "# LoRA rank" in comments.stdout


@pytest.mark.parametrize("recipe", RECIPES, ids=os.path.basename)
def test_every_recipe_parses(recipe, capsys):
    """Every shipped recipe against the code's signatures (in-process: --print_config exits before any run)."""
    from lit_rlhf.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", recipe, "--print_config"])
    printed = capsys.readouterr()
    assert exit_info.value.code in (0, None), printed.err
    config = yaml.safe_load(printed.out)
    model, data = config["model"], config["data"]
    if "class_path" in model:  # a stage of its own (SFT, reward model)
        model, data = model["init_args"], data["init_args"]
    assert (model.get("policy") or model.get("backbone"))["model_name_or_path"]
    assert "tokenizer" not in data  # linked to the trained model's model_name_or_path, not set by hand


def test_overrides_show_in_print_config():
    result = run_cli("fit", "--config", "recipes/quickstart.yaml", "--model.ppo.clip_range=0.1",
                     "--data.batch_size=8", "--print_config")
    assert result.returncode == 0, result.stderr
    config = yaml.safe_load(result.stdout)
    assert config["model"]["ppo"]["clip_range"] == 0.1 and config["data"]["batch_size"] == 8


def test_unknown_key_is_a_clear_error(tmp_path):
    """A misspelled field on the command line, in a recipe file, or in a stage's class: one line naming it and
    the field meant (no page of usage); a mistyped value names its field."""
    message = one_line_error(run_cli("fit", "--config", "recipes/quickstart.yaml", "--model.ppo.clip_rnage=0.1"))
    assert "unknown recipe field 'model.ppo.clip_rnage'; did you mean 'model.ppo.clip_range'?" in message
    (tmp_path / "typo.yaml").write_text("model:\n  ppo:\n    kl_coeff: 0.1\n")
    message = one_line_error(run_cli("fit", "--config", "recipes/quickstart.yaml", "--config", str(tmp_path / "typo.yaml")))
    assert "unknown recipe field 'model.ppo.kl_coeff'; did you mean 'model.ppo.kl_coef'?" in message
    message = one_line_error(run_cli("fit", "--config", "recipes/sft.yaml", "--model.init_args.optimizer.lrr=3"))
    assert "did you mean 'model.init_args.optimizer.lr'?" in message
    message = one_line_error(run_cli("fit", "--config", "recipes/quickstart.yaml", "--model.ppo.kl_coef=abc"))
    assert "model.ppo.kl_coef" in message and "abc" in message
    assert "usage:" not in run_cli("fit", "--config", "recipes/quickstart.yaml", "--trainer.max_epocs=2").stderr


def test_quickstart_recipe_trains_and_writes_outputs(tmp_path):
    result = run_cli("fit", *QUICKSTART, "--trainer.max_epochs=1", "--trainer.limit_train_batches=3", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = tmp_path / "outputs" / "quickstart" / "version_0"
    import pandas as pd

    metrics = pd.read_csv(run_dir / "metrics.csv")
    assert len(metrics["objective/scores"].dropna()) == 3
    assert metrics["loss/policy_avg"].notna().all()
    assert metrics["val/distinct_2"].between(0, 1).all()
    # everything of the run in its own folder
    assert (run_dir / "config.yaml").exists() and (run_dir / "samples.jsonl").exists()
    assert (run_dir / "checkpoints" / "last.ckpt").exists()
    assert yaml.safe_load((run_dir / "hparams.yaml").read_text())["optimizer"]["betas"] == [0.9, 0.999]
    # stdout is a pipe here, as under SLURM or docker logs: a progress line after the first iteration
    assert "iteration 1 (epoch 0): score" in result.stdout

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from lit_rlhf.tiny import resolve_model_path

    base = AutoModelForCausalLM.from_pretrained(resolve_model_path("builtin:tiny-llama"))
    model = PeftModel.from_pretrained(base, str(run_dir / "policy"))
    assert any("lora_A" in name for name, _ in model.named_parameters())
    assert (run_dir / "policy" / "value_head.safetensors").exists()


def one_line_error(result) -> str:
    """The message of a failed run: one ``lit-rlhf: error:`` line, no traceback."""
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("lit-rlhf: error: ")]
    assert len(lines) == 1, result.stderr[-3000:]
    return lines[0]


def test_recipe_errors_are_one_line_and_come_before_any_weight_loads(tmp_path):
    result = run_cli("fit", *QUICKSTART, "--model.generation.max_new_tokens=251", cwd=tmp_path)
    message = one_line_error(result)
    assert "data.max_prompt_length=16 + generation.max_new_tokens=251 = 267 exceeds the context" in message
    assert "Loading weights" not in result.stderr  # found from the config, before the model loads
    assert not (tmp_path / "outputs" / "quickstart" / "version_0" / "metrics.csv").exists()

    message = one_line_error(run_cli("fit", *QUICKSTART, "--model.evaluation.max_new_tokens=245", cwd=tmp_path))
    assert "data.max_prompt_length=16 + evaluation.max_new_tokens=245 = 261 exceeds the context" in message
    message = one_line_error(run_cli("fit", *QUICKSTART, "--model.ppo.num_minibatches=5", cwd=tmp_path))
    assert "data.batch_size=64 is not divisible by ppo.num_minibatches=5" in message
    message = one_line_error(run_cli("fit", *QUICKSTART, "--model.optimizer.lr=-0.001", cwd=tmp_path))
    assert "model.optimizer.lr=-0.001 must be positive" in message
    message = one_line_error(run_cli("fit", *QUICKSTART, "--model.policy.model_name_or_path=./models/mine", cwd=tmp_path))
    assert "./models/mine': no such local folder" in message and "Repo id" not in message
    message = one_line_error(run_cli("fit", *QUICKSTART, "--trainer.logger.init_args.save_dir=/proc/runs", cwd=tmp_path))
    assert "trainer.logger.init_args.save_dir='/proc/runs': the run's files cannot be written there" in message
    if not torch.cuda.is_available():
        message = one_line_error(run_cli("fit", "--config", os.path.join(REPO_ROOT, "recipes", "qwen2.5-0.5b-lora.yaml"),
                                         cwd=tmp_path))
        assert "trainer.accelerator=gpu but this machine has no CUDA GPU" in message
        assert "--trainer.accelerator=cpu" in message
    message = one_line_error(run_cli("fit", *QUICKSTART, "--model.reward.function=no_such.module:fn", cwd=tmp_path))
    assert "reward.function='no_such.module:fn': cannot import module" in message
    debug = run_cli("fit", *QUICKSTART, "--model.ppo.num_minibatches=5", "--debug", cwd=tmp_path)
    assert debug.returncode != 0 and "Traceback" in debug.stderr


def test_bad_prompt_rows_are_refused_with_their_row(tmp_path):
    data = tmp_path / "prompts.jsonl"
    data.write_text('{"prompt": "the movie was"}\n{"prompt": null}\n')
    message = one_line_error(run_cli("fit", *QUICKSTART, f"--data.path={data}", "--data.batch_size=1",
                                     cwd=tmp_path))
    assert f"data.path='{data}', row 2: data.prompt_field='prompt' has no value" in message
    data.write_text('{"prompt": "the movie was"}\n{"prompt": "it was"\n')
    message = one_line_error(run_cli("fit", *QUICKSTART, f"--data.path={data}", "--data.batch_size=1",
                                     cwd=tmp_path))
    assert f"data.path='{data}', line 2: not valid JSON" in message


def test_tensorboard_logger_writes_the_run_folder(tmp_path):
    result = run_cli("fit", *QUICKSTART, "--trainer.max_epochs=1", "--trainer.limit_train_batches=1",
                     "--trainer.logger=TensorBoardLogger", "--trainer.logger.save_dir=outputs", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = tmp_path / "outputs" / "quickstart" / "version_0"  # the recipe's name carries over
    assert list(run_dir.glob("events.out.tfevents.*")) and (run_dir / "checkpoints" / "last.ckpt").exists()
    assert (run_dir / "config.yaml").exists() and (run_dir / "policy" / "adapter_model.safetensors").exists()


def test_damaged_checkpoints_are_refused_in_one_line(tmp_path):
    (tmp_path / "empty.ckpt").write_bytes(b"")
    message = one_line_error(run_cli("fit", *QUICKSTART, "--ckpt_path", "empty.ckpt", cwd=tmp_path))
    assert "--ckpt_path 'empty.ckpt' is empty (0 bytes)" in message
    assert run_cli("fit", *QUICKSTART, "--trainer.max_epochs=1", "--trainer.limit_train_batches=1",
                   cwd=tmp_path).returncode == 0
    last = tmp_path / "outputs" / "quickstart" / "version_0" / "checkpoints" / "last.ckpt"
    (tmp_path / "cut.ckpt").write_bytes(last.read_bytes()[:2000])
    message = one_line_error(run_cli("fit", *QUICKSTART, "--ckpt_path", "cut.ckpt", cwd=tmp_path))
    assert "--ckpt_path 'cut.ckpt' is truncated or not a checkpoint" in message


def test_a_run_that_fails_before_training_leaves_no_folder(tmp_path):
    """The next good run is version_0, so the README's commands (export of version_0) keep working."""
    message = one_line_error(run_cli("fit", *QUICKSTART, "--model.generation.stop_tokens=[no-such-token]", cwd=tmp_path))
    assert "generation.stop_tokens" in message
    assert not list((tmp_path / "outputs" / "quickstart").glob("version_*"))
    assert run_cli("fit", *QUICKSTART, "--trainer.max_epochs=1", "--trainer.limit_train_batches=1",
                   cwd=tmp_path).returncode == 0
    assert [p.name for p in (tmp_path / "outputs" / "quickstart").iterdir()] == ["version_0"]


def test_default_root_dir_moves_the_run_folder_and_threads_are_announced(tmp_path):
    result = run_cli("fit", *QUICKSTART, "--trainer.max_epochs=1", "--trainer.limit_train_batches=1",
                     "--trainer.default_root_dir=elsewhere", cwd=tmp_path, env={"OMP_NUM_THREADS": None})
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "elsewhere" / "quickstart" / "version_0" / "metrics.csv").exists()
    assert not (tmp_path / "outputs").exists()
    cores = len(os.sched_getaffinity(0))
    assert f"CPU threads per process: {cores} ({cores} cores / 1 process on this machine" in result.stdout + result.stderr
    result = run_cli("fit", *QUICKSTART, "--trainer.max_epochs=1", "--trainer.limit_train_batches=1", "--cpu_threads=1",
                     cwd=tmp_path)
    assert "CPU threads per process: 1 (cpu_threads" in result.stdout + result.stderr


def test_recipes_named_in_messages_exist():
    """Errors and docs point users to recipes: each one named in the package must be shipped."""
    named = set()
    for path in glob.glob(os.path.join(REPO_ROOT, "lit_rlhf", "*.py")):
        named |= set(re.findall(r"recipes/[\w.\-]+\.yaml", open(path).read()))
    assert named and all(os.path.exists(os.path.join(REPO_ROOT, name)) for name in named), named


def test_exported_adapter_names_its_base_as_the_recipe_does(tmp_path):
    """policy/ records builtin:tiny-llama (not a cache folder of this machine), and export merges it from there."""
    import json

    assert run_cli("fit", *QUICKSTART, "--trainer.max_epochs=1", "--trainer.limit_train_batches=1",
                   cwd=tmp_path).returncode == 0
    policy = tmp_path / "outputs" / "quickstart" / "version_0" / "policy"
    assert json.loads((policy / "adapter_config.json").read_text())["base_model_name_or_path"] == "builtin:tiny-llama"
    exported = run_cli("export", "--adapter_dir", str(policy), "--output_dir", str(tmp_path / "merged"),
                       env={"LIT_RLHF_CACHE": str(tmp_path / "another-cache")})  # as on another machine
    assert exported.returncode == 0, exported.stderr[-2000:]


def test_quickstart_as_shipped_is_healthy(tmp_path):
    """The README's first command: the score rises, the KL levels off, the completions stay varied."""
    from health import assert_healthy

    result = run_cli("fit", *QUICKSTART, cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_healthy(tmp_path / "outputs" / "quickstart" / "version_0", score_gain=0.15, min_distinct_2=0.7)
