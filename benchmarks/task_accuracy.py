"""Held-out task accuracy of a causal LM: greedy answers to a prompt file, scored by a reward function.

    python benchmarks/task_accuracy.py --model builtin:smollm2-135m-instruct
    python benchmarks/task_accuracy.py --model outputs/smollm2-dpo-arithmetic/model --samples 3

The same evaluation as the GRPO/PPO recipes' ``eval/pass@1`` with ``evaluation.temperature: 0`` (what the README
reports for them): each prompt of ``--data`` as a chat user turn (the model's chat template), a greedy answer of
at most ``--max-new-tokens`` tokens cut at the first stop token (the tokenizer's EOS and the checkpoint's EOS
list), scored by ``--reward`` (default ``lit_rlhf.rewards:last_number_match`` against the ``answer`` column).
Prints one JSON line: the accuracy, how many prompts, and the first ``--samples`` answers. Used for the DPO
recipe's before/after numbers, where the stage itself never generates.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def task_accuracy(model_name_or_path: str, data: str, reward: str = "lit_rlhf.rewards:last_number_match",
                  max_new_tokens: int = 16, batch_size: int = 16) -> tuple[float, list[dict]]:
    """The mean score of greedy answers to ``data``'s prompts, and every prompt with its answer and score."""
    import torch

    from lit_rlhf.data import load_table
    from lit_rlhf.models import load_causal_lm, load_generation_config, load_tokenizer
    from lit_rlhf.rollout import stop_token_ids

    tokenizer = load_tokenizer(model_name_or_path)
    model = load_causal_lm(model_name_or_path).eval()
    stops = stop_token_ids(tokenizer, None, getattr(load_generation_config(model_name_or_path), "eos_token_id", None))
    table = load_table(data, "train")
    columns = {name: values for name, values in table.items() if name != "prompt"}
    module, _, function = reward.partition(":")
    score = getattr(importlib.import_module(module), function)
    answers = []
    for start in range(0, len(table["prompt"]), batch_size):
        prompts = table["prompt"][start : start + batch_size]
        texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                               add_generation_prompt=True) for p in prompts]
        batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            output = model.generate(**batch, do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=stops,
                                    pad_token_id=tokenizer.pad_token_id)
        for row in output[:, batch["input_ids"].shape[1]:].tolist():
            cut = next((i for i, token in enumerate(row) if token in stops), len(row))
            answers.append(tokenizer.decode(row[:cut], skip_special_tokens=True).strip())
    scores = score(table["prompt"], answers, **columns)
    rows = [{"prompt": p, "completion": a, "score": s} for p, a, s in zip(table["prompt"], answers, scores)]
    return sum(scores) / len(scores), rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", default=str(REPO / "recipes" / "data" / "arithmetic_val.jsonl"))
    parser.add_argument("--reward", default="lit_rlhf.rewards:last_number_match")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--samples", type=int, default=3)
    args = parser.parse_args(argv)
    accuracy, rows = task_accuracy(args.model, args.data, args.reward, args.max_new_tokens)
    print(json.dumps({"model": args.model, "accuracy": round(accuracy, 4), "prompts": len(rows),
                      "samples": rows[: args.samples]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
