"""What a run does with signals, a busy or used out_dir, damaged checkpoints and a reward that fails
everywhere: a checkpoint and a clear message, never lost work (1 rank, the transformers sampler)."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


WORLD = {}  # conftest.tiny_world


@pytest.fixture(scope="module", autouse=True)
def world(tiny_world):
    WORLD["model"], WORLD["data"] = tiny_world


def cmd(tmp_path, out, *extra):
    return [sys.executable, os.path.join(ROOT, "train.py"), f"--model_path={WORLD['model']}",
            f"--train_data={WORLD['data']}/train.parquet",
            f"--out_dir={out}", "--rollout_batch_size=8", "--global_batch_size=4",
            "--num_generations=4", "--micro_batch_size=8", "--max_response_length=8", "--sampler=hf",
            "--val_data=", "--save_hf=false", "--reward=random", *extra]


def run(tmp_path, out, *extra):
    return subprocess.run(cmd(tmp_path, out, *extra), capture_output=True, text=True, timeout=600,
                          cwd=str(tmp_path), env=ENV)


def steps(out):
    return [json.loads(line)["step"] for line in open(out / "metrics.jsonl")]


def test_sigterm_checkpoints_and_resume_skips_damage_and_rewinds(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.Popen(cmd(tmp_path, out, "--max_steps=100", "--save_freq=1", "--save_limit=0"),
                            cwd=str(tmp_path), env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 400
    while not (out / "checkpoints" / "step_2").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    busy = run(tmp_path, out, "--max_steps=1")  # a second run into the same out_dir, meanwhile
    assert busy.returncode != 0 and f"is in use by the run with pid {proc.pid}" in busy.stderr, busy.stderr[-2000:]
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    last = max(steps(out))  # the step that was running finished, was logged and saved
    assert proc.returncode != 0 and f"stopped after step {last}: SIGTERM" in err, err[-2000:]
    assert sorted(os.listdir(out / "checkpoints")) == sorted(f"step_{n}" for n in range(1, last + 1))
    assert not (out / "run.lock").exists()

    fresh = run(tmp_path, out, "--max_steps=1")  # no --resume into an out_dir with checkpoints
    assert fresh.returncode != 0 and "--resume=auto continues" in fresh.stderr
    (out / "checkpoints" / f"step_{last + 1}").mkdir()  # a save that died before writing anything
    resumed = run(tmp_path, out, "--resume=auto", f"--max_steps={last + 1}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"--resume=auto: skipping {out}/checkpoints/step_{last + 1}" in resumed.stdout
    assert f"resumed from {out}/checkpoints/step_{last}" in resumed.stdout
    assert steps(out) == list(range(1, last + 2))

    back = run(tmp_path, out, f"--resume={out}/checkpoints/step_1", "--max_steps=2", "--lr=0.5")
    assert back.returncode == 0, back.stderr[-3000:]
    assert "this run's --lr=0.5" in back.stdout and f"deleting {out}/checkpoints/step_{last}" in back.stdout
    assert steps(out) == [1, 2] and os.listdir(out / "checkpoints") == ["step_1"]  # the rest were after it


def test_a_reward_that_fails_on_every_sample_stops_the_run_with_a_checkpoint(tmp_path):
    reward_file = tmp_path / "nan_reward.py"
    reward_file.write_text("def score(inputs):\n    return [{'overall': float('nan')} for _ in inputs]\n")
    out = tmp_path / "out"
    res = run(tmp_path, out, "--max_steps=5", f"--reward={reward_file}:score")
    assert res.returncode != 0 and "stopped after step 1: the reward failed" in res.stderr, res.stderr[-3000:]
    record = json.loads(open(out / "metrics.jsonl").readline())
    assert record["reward/failed"] == record["reward/scored"] == 8 * 4
    assert os.listdir(out / "checkpoints") == ["step_1"]
