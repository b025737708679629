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
    """A real local reward server: one point per word; "slow" completions make it miss the timeout once."""

    calls = 0

    def do_POST(self):
        type(self).calls += 1
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if "slow" in body["completions"] and type(self).calls == 1:
            time.sleep(1.5)
        answer = {"scores": [float(len(c.split())) for c in body["completions"]], "echo": body.get("answer")}
        data = json.dumps(answer).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def scorer_url():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Scorer)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    _Scorer.calls = 0
    yield f"http://127.0.0.1:{server.server_address[1]}/score"
    server.shutdown()


def test_http_scorer_answers_retries_after_a_timeout_and_fails_clearly(scorer_url):
    reward = HTTPReward(scorer_url, timeout=5.0, retries=0)
    assert reward(["p", "q"], ["a b c", "d"], {"answer": ["x", "y"]}) == [3.0, 1.0]
    patient = HTTPReward(scorer_url, timeout=0.5, retries=1)
    _Scorer.calls = 0
    assert patient(["p"], ["slow"], {}) == [1.0]  # the first call timed out, the retry answered
    assert _Scorer.calls == 2
    dead = HTTPReward("http://127.0.0.1:9/score", timeout=0.5, retries=1)
    with pytest.raises(TrainingError, match=r"reward.url='http://127.0.0.1:9/score': no valid answer after 2 tries"):
        dead(["p"], ["x"], {})
    with pytest.raises(ValueError, match="must start with http:// or https://"):
        HTTPReward("127.0.0.1:9")
