"""``lit-rlhf`` run as a user runs it: a subprocess on the shipped recipes."""

import glob
import os
import subprocess
import sys

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


def test_console_script_is_installed():
    result = subprocess.run(["lit-rlhf", "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "fit" in result.stdout


@pytest.mark.parametrize("recipe", RECIPES, ids=os.path.basename)
def test_every_recipe_parses(recipe):
    result = run_cli("fit", "--config", recipe, "--print_config")
    assert result.returncode == 0, result.stderr
    config = yaml.safe_load(result.stdout)
    assert config["model"]["policy"]["model_name_or_path"]
    assert "tokenizer" not in config["data"]  # linked to the policy's model_name_or_path, not set by hand


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
    assert (run_dir / "config.yaml").exists() and (run_dir / "samples.jsonl").exists()
    assert (tmp_path / "outputs" / "quickstart" / "checkpoints" / "last.ckpt").exists()

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from lit_rlhf.tiny import resolve_model_path

    base = AutoModelForCausalLM.from_pretrained(resolve_model_path("builtin:tiny-llama"))
    model = PeftModel.from_pretrained(base, str(run_dir / "policy"))
    assert any("lora_A" in name for name, _ in model.named_parameters())
    assert (run_dir / "policy" / "value_head.safetensors").exists()
