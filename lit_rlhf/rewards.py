"""Built-in Python reward functions: ``(prompts, completions) -> scores``, one float per completion."""

from __future__ import annotations

from collections.abc import Sequence

POSITIVE_WORDS = (
    "good great excellent wonderful amazing lovely happy delightful brilliant superb fantastic "
    "pleasant charming beautiful joyful perfect enjoyable awesome fine nice love best warm "
    "fun bright glad kind sweet calm cheerful"
).split()
NEGATIVE_WORDS = (
    "bad terrible awful horrible poor sad boring ugly dreadful annoying dull worst hate nasty "
    "painful bitter angry disappointing mediocre weak cold gloomy rude broken messy sour "
    "tedious lousy grim noisy"
).split()

_POSITIVE, _NEGATIVE = frozenset(POSITIVE_WORDS), frozenset(NEGATIVE_WORDS)


def sentiment_lexicon(prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
    """Share of positive minus share of negative words in each completion, in [-1, 1].

    A meaningful, deterministic stand-in for a sentiment classifier: the quickstart policy has to learn
    to write positive words instead of neutral or negative ones. Empty completions score 0.
    """
    scores = []
    for completion in completions:
        words = completion.lower().split()
        positive = sum(word in _POSITIVE for word in words)
        negative = sum(word in _NEGATIVE for word in words)
        scores.append((positive - negative) / max(len(words), 1))
    return scores
