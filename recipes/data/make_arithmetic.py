"""Writes the arithmetic data of the SmolLM2 recipes: sums of two numbers, the answer in the ``answer`` column.

Training rows (``arithmetic.jsonl``) use numbers from 10 to 59 and three phrasings; held-out rows
(``arithmetic_val.jsonl``) use numbers from 60 to 99 and three other phrasings, so the evaluation measures
what transfers, not what was memorized. The DPO recipe's preference pairs (``arithmetic_preferences.jsonl``
and ``_val``, from the same rows) prefer the equation with the right sum ("34 + 58 = 92") to, in turn, the
same equation with a wrong sum and the opening the model writes before training ("To solve this problem, we
need to find the sum of 34 and 58."). The calculator recipe's rows (``calculator.jsonl``, ``_val``) ask for
products of two numbers, 12-59 and held out 60-99, telling the model to use its calculator; its warm-up SFT rows
(``calculator_sft.jsonl``, other products) show the first turn only: the question answered with a calculator
call, under the recipe's system prompt. Deterministic: ``python recipes/data/make_arithmetic.py``.
"""

import json
import random
from pathlib import Path

TRAIN_PHRASINGS = [
    "What is {a} + {b}? Answer with a number.",
    "Compute {a} plus {b}. Give only the result.",
    "Add {a} and {b}. Reply with the number.",
]
HELD_OUT_PHRASINGS = [
    "How much is {a} + {b}? Answer with a number.",
    "What do you get when you add {a} to {b}? Give only the result.",
    "Find the sum of {a} and {b}. Reply with the number.",
]


PRODUCT_PHRASINGS = [
    "Compute {a} times {b} with the calculator tool.",
    "What is {a} * {b}? Use the calculator.",
    "Use the calculator to multiply {a} by {b}.",
]
HELD_OUT_PRODUCT_PHRASINGS = [
    "Multiply {a} and {b} with the calculator tool.",
    "How much is {a} * {b}? Use the calculator.",
    "Use the calculator: what is {a} times {b}?",
]


def products(count: int, low: int, high: int, phrasings: list[str], seed: int) -> list[dict]:
    """Products of two numbers (the calculator recipe: too hard for the model without its tool)."""
    generator = random.Random(seed)
    out = []
    for index in range(count):
        a, b = generator.randint(low, high), generator.randint(low, high)
        out.append({"prompt": phrasings[index % len(phrasings)].format(a=a, b=b), "answer": str(a * b)})
    return out


CALCULATOR_SYSTEM_PROMPT = (
    "You have a calculator. To use it, reply with exactly one line like this example:\n"
    '<tool_call>{"name": "calculator", "arguments": {"expression": "3 * 4"}}</tool_call>\n'
    "You will get the result back; then reply with the number."
)


def tool_call_demonstrations(data: list[dict]) -> list[dict]:
    """SFT rows that show the first turn only: the question answered with a calculator call (the answer after
    the tool's result is left to RL)."""
    out = []
    for row in data:
        a, b = (int(n) for n in row["prompt"].replace("?", " ").replace(".", " ").split() if n.isdigit())
        call = json.dumps({"name": "calculator", "arguments": {"expression": f"{a} * {b}"}})
        out.append({"messages": [{"role": "system", "content": CALCULATOR_SYSTEM_PROMPT},
                                 {"role": "user", "content": row["prompt"]},
                                 {"role": "assistant", "content": f"<tool_call>{call}</tool_call>"}]})
    return out


def rows(count: int, low: int, high: int, phrasings: list[str], seed: int) -> list[dict]:
    generator = random.Random(seed)
    out = []
    for index in range(count):
        a, b = generator.randint(low, high), generator.randint(low, high)
        out.append({"prompt": phrasings[index % len(phrasings)].format(a=a, b=b), "answer": str(a + b)})
    return out


def preference_pairs(data: list[dict], seed: int) -> list[dict]:
    """A chosen equation with the right sum against a wrong sum (even rows) or a wordy non-answer (odd rows)."""
    generator = random.Random(seed)
    pairs = []
    for index, row in enumerate(data):
        a, b = (int(n) for n in row["prompt"].replace("?", " ").replace(".", " ").split() if n.isdigit())
        total = int(row["answer"])
        if index % 2 == 0:
            wrong = total + generator.choice([-1, 1]) * generator.randint(1, 10)
            rejected = f"{a} + {b} = {wrong}"
        else:
            rejected = f"To solve this problem, we need to find the sum of {a} and {b}."
        pairs.append({"prompt": row["prompt"], "chosen": f"{a} + {b} = {total}", "rejected": rejected})
    return pairs


def main() -> None:
    folder = Path(__file__).parent
    train, held_out = rows(288, 10, 59, TRAIN_PHRASINGS, seed=0), rows(48, 60, 99, HELD_OUT_PHRASINGS, seed=1)
    for name, data in (("arithmetic.jsonl", train), ("arithmetic_val.jsonl", held_out),
                       ("arithmetic_preferences.jsonl", preference_pairs(train, seed=2)),
                       ("arithmetic_preferences_val.jsonl", preference_pairs(held_out, seed=3)),
                       ("calculator.jsonl", products(288, 12, 59, PRODUCT_PHRASINGS, seed=4)),
                       ("calculator_val.jsonl", products(48, 60, 99, HELD_OUT_PRODUCT_PHRASINGS, seed=5)),
                       ("calculator_sft.jsonl", tool_call_demonstrations(products(48, 12, 59, PRODUCT_PHRASINGS, seed=6)))):
        (folder / name).write_text("".join(json.dumps(row) + "\n" for row in data))


if __name__ == "__main__":
    main()
