"""Reward sources: built-in functions, weighted sets with per-source scores, data columns, an HTTP scorer."""

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from lit_rlhf import rewards
from lit_rlhf.errors import TrainingError
from lit_rlhf.module import RewardConfig
from lit_rlhf.rewards import FunctionReward, HTTPReward, RewardSet, RewardTerm

IDS = torch.zeros(3, 2, dtype=torch.long)


def test_first_word_match_accepts_any_listed_answer():
    scores = rewards.first_word_match(["p"] * 4, ["Pizza was good", "the pizza", "", "car"],
                                      ["bread|pizza", "pizza", ["cake", "car"], ["cake", "car"]])
    assert scores == [1.0, 0.0, 0.0, 1.0]


def test_math_answer_compares_values_not_strings():
    completions = ["The answer is \\boxed{\\frac{1}{2}}", "so it is 0.5", "I think 7", "no idea"]
    assert rewards.math_answer(["q"] * 4, completions, ["0.5", "1/2", "8", "3"]) == [1.0, 1.0, 0.0, 0.0]


def test_last_number_match_reads_the_completions_last_number():
    completions = ["7 + 5 = 12.", "The sum is 1,234", "12 apples and 3 pears", "Let me think", "-4", "12.5", "x = 12,"]
    answers = [12, "1234", 12, 0, -4, 12, 12]
    assert rewards.last_number_match(["p"] * 7, completions, answers) == [1.0, 1.0, 0.0, 0.0, 1.0, 0.0, 1.0]


def test_format_match_checks_the_whole_completion():
    pattern = r"<think>.*</think>\s*\S+"
    assert rewards.format_match(["p"] * 3, ["<think>a b</think> 42", "42", "<think>x</think>"], pattern) == [1.0, 0.0, 0.0]


def test_weighted_sources_with_their_own_scores_and_data_columns():
    config = RewardConfig(functions=[
        {"function": "lit_rlhf.rewards:first_word_match", "weight": 2.0},
        {"function": "lit_rlhf.rewards:format_match", "weight": 0.5, "name": "short", "kwargs": {"pattern": r"\w+"}},
    ])
    terms = config.terms()
    assert [term.label() for term in terms] == ["first_word_match", "short"]
    reward_set = RewardSet([(t.label(), t.weight, FunctionReward(t.function, t.kwargs)) for t in terms])
    total, each = reward_set(["p"] * 3, ["pizza", "car now", "rice"], {"answer": ["pizza", "car", "bread"]}, IDS, IDS)
    assert each["first_word_match"].tolist() == [1.0, 1.0, 0.0]
    assert each["short"].tolist() == [1.0, 0.0, 1.0]
    assert total.tolist() == [2.5, 2.0, 0.5]
    with pytest.raises(ValueError, match=r"needs the data columns \['answer'\]; the data has \[\]"):
        reward_set(["p"], ["x"], {}, IDS[:1], IDS[:1])


def test_reward_config_names_the_sources_and_refuses_ambiguity():
    with pytest.raises(ValueError, match="exactly one of reward.model_name_or_path, reward.function, reward.url"):
        RewardConfig(function="a:b", url="http://x").terms()
    with pytest.raises(ValueError, match="exactly one of function, model_name_or_path and url"):
        RewardConfig(functions=[RewardTerm(function="a:b", url="http://x")]).terms()
    with pytest.raises(ValueError, match="give each source its own name"):
        RewardConfig(functions=[RewardTerm(function="a:b"), RewardTerm(function="c:b")]).terms()


class _Scorer(BaseHTTPRequestHandler):
    """A real local reward server: one point per word of each completion, in order. ``failures`` lists how the
    next calls fail: ``slow`` (misses the client's timeout), ``partial`` (closes the connection mid-body),
    ``latin1`` (an answer that is not UTF-8), ``status`` (HTTP 500)."""

    calls = 0
    bodies: list = []
    failures: list = []

    def do_POST(self):
        type(self).calls += 1
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).bodies.append(body)
        failure = type(self).failures.pop(0) if type(self).failures else None
        if failure == "slow":
            time.sleep(1.5)
        scores = [float(len(c.split())) for c in body["completions"]]
        data = json.dumps({"scores": scores}).encode()
        if failure == "latin1":
            data = json.dumps({"scores": scores, "note": "café"}, ensure_ascii=False).encode("latin-1")
        self.send_response(500 if failure == "status" else 200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data) + (100 if failure == "partial" else 0)))
        self.end_headers()
        self.wfile.write(data[: len(data) // 2] if failure == "partial" else data)
        if failure == "partial":
            self.close_connection = True

    def log_message(self, *args):
        pass


@pytest.fixture
def scorer_url():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Scorer)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    _Scorer.calls, _Scorer.bodies, _Scorer.failures = 0, [], []
    yield f"http://127.0.0.1:{server.server_address[1]}/score"
    server.shutdown()


def test_http_scorer_sends_the_columns_and_keeps_the_order(scorer_url):
    reward = HTTPReward(scorer_url, timeout=5.0, retries=0)
    completions = ["a b c", "d", "e f", "g h i j"]
    assert reward(["p", "q", "r", "s"], completions, {"answer": ["w", "x", "y", "z"]}) == [3.0, 1.0, 2.0, 4.0]
    (body,) = _Scorer.bodies
    assert body == {"prompts": ["p", "q", "r", "s"], "completions": completions, "answer": ["w", "x", "y", "z"]}


@pytest.mark.parametrize("failure, said", [
    ("slow", r"no answer within reward.timeout=0.5 s"),
    ("partial", r"the connection closed in the middle of the answer \(\d+ bytes received\)"),
    ("latin1", r"the answer is not valid UTF-8"),
    ("status", r"the scorer answered HTTP 500"),
])
def test_http_scorer_retries_each_failure_then_names_it(failure, said, scorer_url):
    patient = HTTPReward(scorer_url, timeout=0.5, retries=1)
    _Scorer.failures = [failure]
    assert patient(["p", "q"], ["one two", "three"], {}) == [2.0, 1.0]  # the retry answered
    assert _Scorer.calls == 2
    _Scorer.failures = [failure, failure]
    with pytest.raises(TrainingError, match=rf"reward.url='{scorer_url}': no valid answer after 2 tries; the last "
                                            rf"one: {said}"):
        patient(["p"], ["x"], {})


def test_http_scorer_says_when_nobody_answers():
    dead = HTTPReward("http://127.0.0.1:9/score", timeout=0.5, retries=1)
    with pytest.raises(TrainingError, match=r"reward.url='http://127.0.0.1:9/score': no valid answer after 2 tries; "
                                            r"the last one: the connection was refused"):
        dead(["p"], ["x"], {})
    with pytest.raises(ValueError, match="must start with http:// or https://"):
        HTTPReward("127.0.0.1:9")
