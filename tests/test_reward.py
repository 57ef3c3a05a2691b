"""reward.py: exact grades on a table of answers, and score_batch's safety net on rewards that
raise, die or hang. A custom reward file is written to tmp_path by the tests that need one."""
import logging
import math
import os
import re
import threading
import time

import pytest

import reward
import reward_pool

THINK = "<think>Angle sum in a triangle is 180.</think> "

# (response, ground_truth, (overall, format, accuracy)) for math_score, format_weight 0.1
MATH_CASES = [
    (THINK + "\\boxed{3}", "3", (1.0, 1.0, 1.0)),
    (THINK + "\\boxed{4}", "3", (0.1, 1.0, 0.0)),
    (THINK + "\\boxed{0.5}", "\\frac{1}{2}", (1.0, 1.0, 1.0)),
    (THINK + "\\boxed{1/2}", "\\frac{1}{2}", (1.0, 1.0, 1.0)),
    (THINK + "\\boxed{\\dfrac{1}{2}}", "0.5", (1.0, 1.0, 1.0)),
    (THINK + "\\boxed{\\frac12}", "\\frac{1}{2}", (1.0, 1.0, 1.0)),
    (THINK + "\\boxed{\\frac{1}{3}}", "\\frac{1}{2}", (0.1, 1.0, 0.0)),
    (THINK + "\\boxed{\\sqrt{12}}", "2\\sqrt{3}", (1.0, 1.0, 1.0)),
    (THINK + "\\boxed{2 \\sqrt 3}", "2\\sqrt{3}", (1.0, 1.0, 1.0)),
    (THINK + "\\boxed{3.4641}", "2\\sqrt{3}", (0.1, 1.0, 0.0)),  # math-verify rounds to 6 digits
    (THINK + "\\boxed{2\\sqrt{2}}", "2\\sqrt{3}", (0.1, 1.0, 0.0)),
    (THINK + "\\boxed{60^\\circ}", "60", (1.0, 1.0, 1.0)),
    (THINK + "\\boxed{60}", "60^\\circ", (1.0, 1.0, 1.0)),
    (THINK + "\\boxed{60°}", "60", (1.0, 1.0, 1.0)),
    (THINK + "\\boxed{5 \\text{ cm}}", "5", (1.0, 1.0, 1.0)),
    (THINK + "\\boxed{5}", "5 cm", (1.0, 1.0, 1.0)),
    # nested braces
    (THINK + "\\boxed{\\frac{\\sqrt{3}}{2}}", "\\frac{\\sqrt{3}}{2}", (1.0, 1.0, 1.0)),
    (THINK + "\\boxed{3", "3", (0.0, 0.0, 0.0)),  # unclosed: no answer, and no format
    (THINK + "\\boxed{3} so \\boxed{4", "3", (0.1, 1.0, 0.0)),  # the last box is unclosed
    (THINK + "\\boxed{2} no, \\boxed{3}", "3", (1.0, 1.0, 1.0)),  # the last box wins
    (THINK + "\\boxed{3} no, \\boxed{2}", "3", (0.1, 1.0, 0.0)),
    ("\\boxed{3}", "3", (0.9, 0.0, 1.0)),  # no think block
    ("So <think>x</think> \\boxed{3}", "3", (0.9, 0.0, 1.0)),  # the think block must come first
    ("<think>x</think> 3", "3", (0.0, 0.0, 0.0)),  # no box: no answer
    ("< think > x </ think > \\boxed{3}", "3", (1.0, 1.0, 1.0)),  # spaces inside tags
    ("", "3", (0.0, 0.0, 0.0)),
    (THINK + "\\boxed{3}", "", (0.1, 1.0, 0.0)),
    ("<think>" + "a" * 100_000 + "</think>\\boxed{7}", "7", (1.0, 1.0, 1.0)),
    (THINK + "\\boxed{４８}", "48", (1.0, 1.0, 1.0)),  # full-width digits (CJK input methods)
    (THINK + "\\boxed{48}", "４８", (1.0, 1.0, 1.0)),
    (THINK + "\\boxed{－３.５}", "-3.5", (1.0, 1.0, 1.0)),
    (THINK + "\\boxed{３²}", "32", (0.1, 1.0, 0.0)),  # a superscript stays one (NFKC: "32")
]


@pytest.mark.parametrize("response,ground_truth,expected", MATH_CASES)
def test_math_score_grades_table(response, ground_truth, expected):
    (s,) = reward.math_score([{"response": response, "ground_truth": ground_truth, "other": 1}])
    assert (s["overall"], s["format"], s["accuracy"]) == pytest.approx(expected, abs=1e-12)


def test_format_check_equals_easyr1_regex_and_is_linear():
    pattern = re.compile(r"<think>.*</think>.*\\boxed\{.*\}.*", re.DOTALL)
    pieces = ["<think>", "</think>", "\\boxed{", "}", "x", "\n", "{"]
    texts = [r for r, _, _ in MATH_CASES[:-1]]
    texts += [a + b + c + d for a in pieces for b in pieces for c in pieces for d in pieces]
    for text in texts:
        assert reward.has_boxed_format(text) == bool(pattern.fullmatch(text)), text
    adversarial = "<think>" + "</think>\\boxed{" * 6000  # the regex takes minutes on this
    t = time.perf_counter()
    assert not reward.has_boxed_format(adversarial)
    assert time.perf_counter() - t < 0.5


def test_extract_boxed_matches_braces():
    assert reward.extract_boxed("\\boxed{\\frac{1}{2}} and \\boxed{a{b}c}") == "a{b}c"
    assert reward.extract_boxed("\\boxed{}") == ""
    assert reward.extract_boxed("\\boxed{1") is None
    assert reward.extract_boxed("no box") is None


R1V_CASES = [
    ("<think>x</think> <answer>3</answer>", "3", (1.0, 1.0, 1.0)),
    ("<think>x</think><answer>The answer is $\\frac{1}{2}$.</answer>", "0.5", (1.0, 1.0, 1.0)),
    ("<think>x</think><answer>4</answer>", "3", (0.5, 1.0, 0.0)),
    ("<answer>3</answer>", "3", (0.5, 0.0, 1.0)),  # no think block
    ("<think>x</think><answer>3</answer> more", "3", (0.5, 0.0, 1.0)),  # text after the answer
    # R1-V's gold
    ("<think>x</think>\n\n<answer>\n3\n</answer>", "<answer> 3 </answer>", (1.0, 1.0, 1.0)),
    ("<think>x</think> 3", "3", (0.0, 0.0, 0.0)),  # no answer block
    ("<think>x</think> \\boxed{3}", "3", (0.0, 0.0, 0.0)),
]


@pytest.mark.parametrize("response,ground_truth,expected", R1V_CASES)
def test_r1v_score_grades_table(response, ground_truth, expected):
    (s,) = reward.r1v_score([{"response": response, "ground_truth": ground_truth}])
    assert (s["overall"], s["format"], s["accuracy"]) == pytest.approx(expected, abs=1e-12)


CHOICES = ["3", "6", "9", "12"]
CHOICE_CASES = [  # (boxed answer, ground truth, choices, accuracy)
    ("B", "B", CHOICES, 1.0),
    ("(B)", "B", CHOICES, 1.0),
    ("\\text{B}", "B", CHOICES, 1.0),
    ("\\textbf{(B)}", "B", CHOICES, 1.0),
    ("B.", "B", CHOICES, 1.0),
    ("6", "B", CHOICES, 1.0),  # the value of the right option
    ("6.0", "B", CHOICES, 1.0),
    ("A", "B", CHOICES, 0.0),
    ("3", "B", CHOICES, 0.0),
    ("b", "B", CHOICES, 0.0),  # lower case is not read as a letter
    ("B", "6", CHOICES, 1.0),  # gold is a value: its letter counts
    ("6", "6", CHOICES, 1.0),
    ("A", "6", CHOICES, 0.0),
    ("B", "B", None, 1.0),  # no choices: letters only
    ("6", "B", None, 0.0),
    ("B", "6", None, 0.0),
    ("E", "B", CHOICES, 0.0),
]


@pytest.mark.parametrize("answer,ground_truth,choices,accuracy", CHOICE_CASES)
def test_choice_score_grades_table(answer, ground_truth, choices, accuracy):
    response = THINK + "\\boxed{" + answer + "}"
    (s,) = reward.choice_score([{"response": response, "ground_truth": ground_truth,
                                 "choices": choices}])
    want = (0.9 * accuracy + 0.1, 1.0, accuracy)
    assert (s["overall"], s["format"], s["accuracy"]) == pytest.approx(want)


def test_random_score_is_deterministic_fair_coin():
    inputs = [{"response": THINK + f"\\boxed{{{i}}}" if i % 3 else f"{i}", "ground_truth": "1"}
              for i in range(64)]
    a, b = reward.random_score(inputs), reward.random_score(inputs)
    c = reward.random_score(inputs, seed=3)
    assert a == b and a != c
    assert {s["overall"] for s in a} == {0.0, 1.0} and all(s["overall"] == s["accuracy"] for s in a)
    assert [s["format"] for s in a] == [float(i % 3 != 0) for i in range(64)]
    assert reward.random_score(inputs[::-1]) == a[::-1]  # a coin does not depend on its position


def test_grading_off_the_main_thread_matches_main_thread():
    # math-verify's default signal.alarm timeouts raise outside the main thread (Math-Verify #50)
    inputs = [{"response": r, "ground_truth": g} for r, g, _ in MATH_CASES[:20]]
    expected = [e[2] for _, _, e in MATH_CASES[:20]]  # 14 of them 1.0
    box = []

    def grade():
        box.append([s["accuracy"] for s in reward.math_score(inputs)])

    thread = threading.Thread(target=grade)
    thread.start()
    thread.join()
    assert box == [expected] and [s["accuracy"] for s in reward.math_score(inputs)] == expected


REWARD_FILE = '''
import os, time

def score(inputs):
    out = []
    for x in inputs:
        if x["response"] == "raise":
            raise ZeroDivisionError("bad sample")
        if x["response"] == "die":
            os._exit(3)
        if x["response"] in ("nan", "inf", "-inf"):
            out.append({"overall": float(x["response"]), "length": 9, "tag": "t"})
            continue
        if x["response"] == "hang":
            with open(x["pid_file"], "w") as f:
                f.write(str(os.getpid()))
            time.sleep(60)
        right = float(x["response"] == x["ground_truth"])
        out.append({"overall": right, "length": len(x["response"]), "tag": "t"})
    return out

def one_short(inputs):
    return [{"overall": 1.0} for _ in inputs[1:]]

def no_overall(inputs):
    return [{"accuracy": 1.0} for _ in inputs]

not_a_function = 3
'''


@pytest.fixture
def reward_file(tmp_path):
    path = tmp_path / "my_reward.py"
    path.write_text(REWARD_FILE)
    return path


def test_load_reward_names_and_errors(reward_file, tmp_path):
    assert reward.load_reward() is reward.math_score
    assert [reward.load_reward(s) for s in ("r1v", "choice", "random")] == [
        reward.r1v_score, reward.choice_score, reward.random_score]
    fn = reward.load_reward(f"{reward_file}:score")
    assert fn([{"response": "a", "ground_truth": "a"}]) == [
        {"overall": 1.0, "length": 1, "tag": "t"}]
    with pytest.raises(FileNotFoundError, match="missing.py"):
        reward.load_reward(f"{tmp_path}/missing.py:score")
    with pytest.raises(AttributeError, match="my_reward.py has no function 'nope'"):
        reward.load_reward(f"{reward_file}:nope")
    with pytest.raises(TypeError, match="my_reward.py:not_a_function is a int"):
        reward.load_reward(f"{reward_file}:not_a_function")
    with pytest.raises(ValueError, match="mathh"):
        reward.load_reward("mathh")


def test_score_batch_runs_a_file_reward_and_keeps_its_extra_keys(reward_file):
    inputs = [{"response": r, "ground_truth": "ab"} for r in ("ab", "abc", "x", "ab")]
    fn = reward.load_reward(f"{reward_file}:score")
    scores, stats = reward.score_batch(fn, inputs, num_workers=2)
    want = [(1.0, 2), (0.0, 3), (0.0, 1), (1.0, 2)]
    assert scores == [{"overall": o, "length": n, "tag": "t"} for o, n in want]
    assert stats == {"reward/failed": 0.0, "reward/timed_out": 0.0}


def test_score_batch_math_matches_in_process():
    inputs = [{"response": r, "ground_truth": g} for r, g, _ in MATH_CASES]
    scores, stats = reward.score_batch(reward.math_score, inputs, num_workers=2)
    assert scores == reward.math_score(inputs)
    assert stats == {"reward/failed": 0.0, "reward/timed_out": 0.0}


def test_score_batch_zeroes_samples_that_raise_or_die(reward_file, caplog):
    # 1 worker: chunks of 2, each bad one re-run alone
    responses = ["a", "raise", "a", "die", "b", "raise", "a", "a"]
    inputs = [{"response": r, "ground_truth": "a"} for r in responses]
    with caplog.at_level(logging.WARNING, logger="reward"):
        fn = reward.load_reward(f"{reward_file}:score")
        scores, stats = reward.score_batch(fn, inputs, num_workers=1)
    zero = {"overall": 0.0, "length": 0.0, "tag": 0.0}
    one = {"overall": 1.0, "length": 1, "tag": "t"}
    wrong = {"overall": 0.0, "length": 1, "tag": "t"}
    assert scores == [one, zero, one, zero, wrong, zero, one, one]
    assert stats == {"reward/failed": 3.0, "reward/timed_out": 0.0}
    messages = [r.getMessage() for r in caplog.records]
    # once per error
    assert sum("ZeroDivisionError: bad sample" in m and "2 of 8" in m for m in messages) == 1
    assert sum("exited with code 3" in m for m in messages) == 1


def test_score_batch_fails_nonfinite_overall_as_nan(reward_file, caplog):
    responses = ["a", "nan", "b", "inf", "raise", "-inf", "a", "a"]
    inputs = [{"response": r, "ground_truth": "a"} for r in responses]
    with caplog.at_level(logging.WARNING, logger="reward"):
        scores, stats = reward.score_batch(reward.load_reward(f"{reward_file}:score"), inputs,
                                           num_workers=2)
    one = {"overall": 1.0, "length": 1, "tag": "t"}
    zero = {"overall": 0.0, "length": 0.0, "tag": 0.0}
    nan = [1, 3, 5]
    assert [scores[i] for i in (0, 2, 4, 6, 7)] == [one, {**one, "overall": 0.0}, zero, one, one]
    for i in nan:  # NaN, not 0, in "overall": the advantages leave it out; 0 in the metrics
        assert math.isnan(scores[i]["overall"]) and {**scores[i], "overall": 0.0} == zero
    assert stats == {"reward/failed": 4.0, "reward/timed_out": 0.0}
    messages = [r.getMessage() for r in caplog.records]
    assert sum("NaN or inf overall on 3 of 8 samples" in m for m in messages) == 1


def test_score_batch_kills_a_hanging_sample(reward_file, tmp_path):
    pid_file = tmp_path / "pid"
    responses = ["a", "b", "a", "hang", "a", "a", "b", "a"]
    inputs = [{"response": r, "ground_truth": "a", "pid_file": str(pid_file)} for r in responses]
    t = time.monotonic()
    fn = reward.load_reward(f"{reward_file}:score")
    scores, stats = reward.score_batch(fn, inputs, timeout_s=1.0, num_workers=1)
    # 2 x timeout_s (its chunk of 2, then itself alone) plus worker starts
    assert time.monotonic() - t < 8
    assert [s["overall"] for s in scores] == [1.0, 0.0, 1.0, 0.0, 1.0, 1.0, 0.0, 1.0]
    assert scores[3] == {"overall": 0.0, "length": 0.0, "tag": 0.0}
    assert stats == {"reward/failed": 0.0, "reward/timed_out": 1.0}
    with pytest.raises(ProcessLookupError):  # the hung worker is gone, not left sleeping
        os.kill(int(pid_file.read_text()), 0)


def test_score_batch_gives_up_on_a_reward_that_hangs_on_everything(reward_file, tmp_path, caplog):
    # 8 probes on 2 workers: inputs 0, 2, ..., 14 are tried alone first; all hang, so the odd
    # ones never start
    inputs = [{"response": "hang", "ground_truth": "a", "pid_file": str(tmp_path / f"pid{i}")}
              for i in range(16)]
    t = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="reward"):
        scores, stats = reward.score_batch(reward.load_reward(f"{reward_file}:score"), inputs,
                                           timeout_s=1.0, num_workers=2)
    # 4 timeouts plus worker starts; trying all 16 took 12 timeouts on 2 workers
    assert time.monotonic() - t < 11
    assert scores == [{"overall": 0.0}] * 16
    assert stats == {"reward/failed": 8.0, "reward/timed_out": 8.0}
    assert sorted(int(p.name[3:]) for p in tmp_path.glob("pid*")) == list(range(0, 16, 2))
    for pid_file in tmp_path.glob("pid*"):
        with pytest.raises(ProcessLookupError):
            os.kill(int(pid_file.read_text()), 0)
    messages = [r.getMessage() for r in caplog.records]
    assert sum("on each of the 8 samples tried alone first" in m and "other 8 of 16 samples were "
               "not tried, counted as failed" in m for m in messages) == 1


def test_score_batch_scores_the_rest_when_one_first_sample_hangs(reward_file, tmp_path):
    # input 0 (tried first, alone) and input 5 (in a chunk) hang; input 2, tried first, does not
    responses = ["hang", "a", "b", "a", "a", "hang", "a", "b", "a", "a", "b", "a", "a", "a", "b",
                 "a"]
    inputs = [{"response": r, "ground_truth": "a", "pid_file": str(tmp_path / f"pid{i}")}
              for i, r in enumerate(responses)]
    scores, stats = reward.score_batch(reward.load_reward(f"{reward_file}:score"), inputs,
                                       timeout_s=1.0, num_workers=2)
    assert [s["overall"] for s in scores] == [float(r == "a") for r in responses]
    assert [s["length"] for s in scores] == [0.0 if r == "hang" else 1 for r in responses]
    assert stats == {"reward/failed": 0.0, "reward/timed_out": 2.0}


def test_score_batch_starts_a_new_workers_clock_after_its_imports(tmp_path):
    # reward.py (math-verify: ~0.5-1 s) and this file (1.5 s) load before the 1 s clock starts
    path = tmp_path / "slow_import.py"
    path.write_text("import time\ntime.sleep(1.5)\n\n\ndef score(inputs):\n"
                    "    return [{'overall': 1.0} for _ in inputs]\n")
    fn = reward.load_reward(f"{path}:score")
    while reward_pool._IDLE:  # no warm worker: each one is new
        reward_pool._stop(reward_pool._IDLE.pop())
    scores, stats = reward.score_batch(fn, [{"response": "a", "ground_truth": "a"}] * 4,
                                       timeout_s=1.0, num_workers=2)
    assert scores == [{"overall": 1.0}] * 4
    assert stats == {"reward/failed": 0.0, "reward/timed_out": 0.0}


MALFORMED = [("one_short", "returned 0 scores for 1 inputs"),
             ("no_overall", "returned .* without a numeric 'overall'")]


@pytest.mark.parametrize("name,message", MALFORMED)
def test_score_batch_rejects_malformed_scores(reward_file, name, message):
    fn = reward.load_reward(f"{reward_file}:{name}")
    with pytest.raises(ValueError, match=f"my_reward.py:{name} {message}"):
        # the first input is tried alone
        reward.score_batch(fn, [{"response": "a", "ground_truth": "a"}] * 8, num_workers=1)


def test_score_batch_bounds_a_math_verify_hang():
    # With its timeouts off, math-verify never returns on this answer: only a kill stops it.
    inputs = [{"response": THINK + "\\boxed{3}", "ground_truth": "3"},
              {"response": THINK + "\\boxed{9^{9^{9^{9}}}}", "ground_truth": "3"}]
    t = time.monotonic()
    scores, stats = reward.score_batch(reward.math_score, inputs, timeout_s=1.0, num_workers=2)
    assert time.monotonic() - t < 6
    assert scores == [{"overall": 1.0, "format": 1.0, "accuracy": 1.0},
                      {"overall": 0.0, "format": 0.0, "accuracy": 0.0}]
    assert stats["reward/timed_out"] == 1.0
