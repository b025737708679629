"""A small run of benchmarks/ppo_benchmark.py: every system reports, and the ratios come out."""

import json
import os
import subprocess
import sys

from conftest import REPO_ROOT, RUN_VLLM

SCRIPT = os.path.join(REPO_ROOT, "benchmarks", "ppo_benchmark.py")


def test_benchmark_script_reports_every_system_and_the_ratios(tmp_path):
    command = [
        sys.executable, SCRIPT, "--hidden-size", "64", "--num-layers", "1", "--num-heads", "2",
        "--intermediate-size", "128", "--vocab-size", "300", "--batch-size", "4", "--prompt-tokens", "4",
        "--response-tokens", "6", "--warmup", "1", "--iterations", "2", "--workdir", str(tmp_path / "workload"),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    workload = lines[0]["workload"]
    assert workload["batch_size"] == 4 and workload["response_tokens"] == 6
    systems = {line["system"]: line for line in lines if "system" in line}
    expected = {"lit-rlhf", "trl", "generate"} | ({"lit-rlhf-vllm", "vllm"} if RUN_VLLM else set())
    assert set(systems) == expected
    for name, line in systems.items():
        assert line["iterations_timed"] == 2, name
        assert line["s_per_iteration"] > 0 and line["rollout_s"] > 0 and line["response_tokens_per_s"] > 0, name
        assert line["peak_memory_mb"] > 100, name  # a Python process with torch loaded
    for name in expected - {"trl"}:  # the sampling alone is timed too (TRL does not expose it)
        line = systems[name]
        assert 0 < line["generation_s"] <= line["rollout_s"] and line["generation_tokens_per_s"] > 0, name
    for name in expected - {"generate", "vllm"}:  # PPO systems also optimize; their iteration covers both phases
        line = systems[name]
        assert line["optimization_s"] > 0
        assert line["rollout_s"] + line["optimization_s"] <= line["s_per_iteration"] * 1.05
    ratios = lines[-1]["ratios"]
    assert ratios["time_lit_rlhf_over_trl"] == round(
        systems["lit-rlhf"]["s_per_iteration"] / systems["trl"]["s_per_iteration"], 3)
    assert ratios["memory_lit_rlhf_over_trl"] > 0 and ratios["rollout_tokens_per_s_lit_rlhf_over_generate"] > 0
    assert ratios["generation_tokens_per_s_lit_rlhf_over_generate"] == round(
        systems["lit-rlhf"]["generation_tokens_per_s"] / systems["generate"]["generation_tokens_per_s"], 3)
    if RUN_VLLM:
        assert ratios["time_lit_rlhf_vllm_over_trl"] == round(
            systems["lit-rlhf-vllm"]["s_per_iteration"] / systems["trl"]["s_per_iteration"], 3)
        assert ratios["rollout_tokens_per_s_lit_rlhf_vllm_over_vllm"] == round(
            systems["lit-rlhf-vllm"]["response_tokens_per_s"] / systems["vllm"]["response_tokens_per_s"], 3)
