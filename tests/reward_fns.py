"""Reward functions for the tests, imported by ``module:function`` like a user's own."""


def wrong_count(prompts, completions):
    return [1.0]


def not_a_number(prompts, completions):
    return [float("nan")] * len(completions)


def words(prompts, completions):
    return [float(len(c.split())) for c in completions]


def characters(prompts, completions):
    return [float(len(c)) for c in completions]
