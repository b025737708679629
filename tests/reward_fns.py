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


def sentiment_failing_on_request(prompts, completions):
    """The quickstart's reward, raising at the call ``$REWARD_FAILS_AT`` names (a crash, for resume tests)."""
    import os

    from lit_rlhf.rewards import sentiment_lexicon

    _calls["n"] += 1
    if str(_calls["n"]) == os.environ.get("REWARD_FAILS_AT"):
        raise RuntimeError("reward function failed (on purpose, in a test)")
    return sentiment_lexicon(prompts, completions)


def characters_but_rank_zero_all_equal(prompts, completions):
    """Completion lengths (different within every group) on rank 1; all zeros on rank 0 (no learning signal),
    so only rank 0's dynamic sampling asks for more groups."""
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_rank() == 0:
        return [0.0] * len(completions)
    return characters(prompts, completions)
