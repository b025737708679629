"""``lit-rlhf`` run as a user runs it: a subprocess on the shipped recipes."""

import glob
import os
import subprocess
import sys
import time

import pytest
import yaml

from conftest import REPO_ROOT

RECIPES = sorted(glob.glob(os.path.join(REPO_ROOT, "recipes", "*.yaml")))
QUICKSTART = [
    "--config", os.path.join(REPO_ROOT, "recipes", "quickstart.yaml"),
    "--data.path", os.path.join(REPO_ROOT, "recipes", "data", "sentiment_prompts.jsonl"),
]


def run_cli(*args, cwd=REPO_ROOT, timeout=300, env=None):
    env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
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


def test_unknown_key_is_a_clear_error():
    result = run_cli("fit", "--config", "recipes/quickstart.yaml", "--model.ppo.clip_rnage=0.1")
    assert result.returncode != 0
    assert "clip_rnage" in result.stderr


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

    message = one_line_error(run_cli("fit", *QUICKSTART, "--model.ppo.num_minibatches=5", cwd=tmp_path))
    assert "data.batch_size=64 is not divisible by ppo.num_minibatches=5" in message
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
