"""The console of a default run, as a user sees it: a few lines, none that reads like a failure.

train.py on the tiny model (its defaults, conftest's 3-step warm start) for 2 steps, validating on
32 prompts at each, on one rank and on two (torchrun), about a minute each. Every line it prints,
stdout and stderr together, is counted and read. Lines are what a terminal shows: split at "\\n"
(a tqdm bar redraws in place with "\\r", so it counts as one). The noises checked are those vLLM
0.32.0 repeats at every step unless rollout.make_engine quiets it: the CPU worker's
set_num_threads skip, the rotary layers' "Failed to load weights", the INFO lines of each weight
sync and the engine-config dump; and any traceback.
"""
import os
import socket
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX_LINES = 60  # start-up summary, the bar, one line per validation, the final summary
NOISE = ("set_num_threads", "Failed to load weights", "Traceback", "Reloading weights",
         "reset prefix cache", "Initializing a V1 LLM engine")


def run_default(tiny_world, out, nproc):
    """train.py's default run on conftest's tiny world: the model folder (a tiny vocabulary, so the
    tiny defaults apply) and the synthetic data, found as "synthetic@..." in its cache_dir."""
    model_dir, data_dir = tiny_world
    flags = [f"--model_path={model_dir}", f"--cache_dir={os.path.dirname(data_dir)}",
             f"--out_dir={out}", "--max_steps=2", "--val_freq=1", "--val_max_prompts=32"]
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), *flags]
    if nproc > 1:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_port", str(port), *cmd[1:]]
    # One thread per rank, as the other tests (and so no torchrun warning about OMP_NUM_THREADS).
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=str(out.parent),
                         env=env)
    return res.returncode, (res.stdout + res.stderr).rstrip("\n").split("\n")


@pytest.mark.parametrize("nproc", [1, 2])
def test_default_run_prints_a_short_clean_console(tiny_world, tmp_path, nproc):
    rc, lines = run_default(tiny_world, tmp_path / "out", nproc)
    shown = "\n".join(lines[-80:])
    assert rc == 0, shown
    noisy = [line for line in lines if any(n in line for n in NOISE)]
    assert not noisy, f"{len(noisy)} noisy lines, e.g. {noisy[:3]}"
    assert len(lines) <= MAX_LINES, f"{len(lines)} lines:\n{shown}"
