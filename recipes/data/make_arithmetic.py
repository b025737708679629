"""Writes the arithmetic data of the SmolLM2 recipes: sums of two numbers, the answer in the ``answer`` column.

Training rows (``arithmetic.jsonl``) use numbers from 10 to 59 and three phrasings; held-out rows
(``arithmetic_val.jsonl``) use numbers from 60 to 99 and three other phrasings, so the evaluation measures
what transfers, not what was memorized. The DPO recipe's preference pairs (``arithmetic_preferences.jsonl``
and ``_val``, from the same rows) prefer the equation with the right sum ("34 + 58 = 92") to, in turn, the
same equation with a wrong sum and the opening the model writes before training ("To solve this problem, we
need to find the sum of 34 and 58."). Deterministic: ``python recipes/data/make_arithmetic.py``.
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
                       ("arithmetic_preferences_val.jsonl", preference_pairs(held_out, seed=3))):
        (folder / name).write_text("".join(json.dumps(row) + "\n" for row in data))


if __name__ == "__main__":
    main()
