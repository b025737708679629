"""What a healthy run of a shipped recipe looks like, read from its run folder as a user would (the README's
health table): the score rises, the completions stay varied, no single completion takes over."""

import collections
import json

import pandas as pd


def run_health(run_dir, tail: float = 0.1, sample_tail: float = 0.2) -> dict:
    """First and last ``tail`` of the iterations' scores and distinct-2, and the share of the most frequent
    completion among the samples of the last ``sample_tail`` of the sample tables."""
    frame = pd.read_csv(run_dir / "metrics.csv").dropna(subset=["objective/scores"])
    n = max(int(len(frame) * tail), 1)
    rows = [json.loads(line) for line in open(run_dir / "samples.jsonl")]
    iterations = sorted({row["iteration"] for row in rows})
    last = set(iterations[-max(int(len(iterations) * sample_tail), 1):])
    completions = [row["completion"] for row in rows if row["iteration"] in last]
    top, count = collections.Counter(completions).most_common(1)[0]
    return {
        "score_first": frame["objective/scores"][:n].mean(), "score_last": frame["objective/scores"][-n:].mean(),
        "distinct_2_last": frame["val/distinct_2"][-n:].mean(), "top_completion": top,
        "top_share": count / len(completions), "samples": len(completions),
    }


def assert_healthy(run_dir, score_gain: float, min_distinct_2: float, max_top_share: float = 0.25) -> dict:
    health = run_health(run_dir)
    assert health["score_last"] > health["score_first"] + score_gain, health
    assert health["distinct_2_last"] >= min_distinct_2, health
    assert health["samples"] >= 16 and health["top_share"] <= max_top_share, health
    return health
