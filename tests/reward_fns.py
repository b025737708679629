"""Reward functions for the tests, imported by ``module:function`` like a user's own."""


def wrong_count(prompts, completions):
    return [1.0]


def not_a_number(prompts, completions):
    return [float("nan")] * len(completions)


def words(prompts, completions):
    return [float(len(c.split())) for c in completions]


def characters(prompts, completions):
    return [float(len(c)) for c in completions]


_calls = {"n": 0}


def fails_at_third_call(prompts, completions):
    _calls["n"] += 1
    if _calls["n"] == 3:
        raise RuntimeError("reward function failed (on purpose, in a test)")
    return [0.0] * len(completions)


def strings(prompts, completions):
    return ["good"] * len(completions)


def food_prompts_only(prompts, completions, answer):
    """A first-word match that only food prompts can win: all other groups score all zeros."""
    from lit_rlhf.rewards import first_word_match

    scores = first_word_match(prompts, completions, answer)
    return [s if "bread" in a else 0.0 for s, a in zip(scores, answer)]
