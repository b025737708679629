"""Writes the arithmetic data of the SmolLM2 recipes: sums of two numbers, the answer in the ``answer`` column.

Training rows (``arithmetic.jsonl``) use numbers from 10 to 59 and three phrasings; held-out rows
(``arithmetic_val.jsonl``) use numbers from 60 to 99 and three other phrasings, so the evaluation measures
what transfers, not what was memorized. Deterministic: ``python recipes/data/make_arithmetic.py``.
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


def main() -> None:
    folder = Path(__file__).parent
    for name, data in (("arithmetic.jsonl", rows(288, 10, 59, TRAIN_PHRASINGS, seed=0)),
                       ("arithmetic_val.jsonl", rows(48, 60, 99, HELD_OUT_PHRASINGS, seed=1))):
        (folder / name).write_text("".join(json.dumps(row) + "\n" for row in data))


if __name__ == "__main__":
    main()
