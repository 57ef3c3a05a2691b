"""reward.score_batch's pool: a function over a batch, in worker processes a timeout can kill.

Processes, not threads: math-verify is pure Python, so threads share one core under the GIL (256
Geometry3K-like responses on 2 CPUs: serial 0.90 s, 2 threads 0.97 s, 2 warm workers 0.48 s), and a
thread stuck in sympy (verifying \\boxed{9^{9^{9^9}}} never ends) can't be stopped. subprocess, not
multiprocessing: its spawn and forkserver children re-run the parent's __main__ script, train.py.
"""
import ctypes
import logging
import math
import os
import pickle
import select
import signal
import subprocess
import sys
import tempfile
import time

# Idle workers, kept warm between calls: a new one costs ~1 s of CPU (0.5 s of imports, then cold
# sympy/antlr caches), more than grading 256 responses on 2 CPUs. They exit at EOF on stdin, that
# is when the trainer exits.
_IDLE = []
PROBES = 8  # inputs tried alone first, to tell a fn that hangs on everything: see run


def run(fn, inputs, *, timeout_s, num_workers, check):
    """fn over `inputs` -> (outputs, errors, timed_out, untried).

    outputs[i] is fn's output for inputs[i], None where it failed. First, PROBES inputs (or one per
    worker, if more) alone, spread out (a group's G responses sit together and share a ground
    truth): if all run past timeout_s, fn is taken to hang on everything and the rest, listed in
    untried, are not tried: PROBES / num_workers timeouts, not n / num_workers of them. A fn that
    hangs on a share p of inputs is given up on with chance p ** PROBES (p = 0.1: 1e-8 a step;
    with one probe per worker on 2 CPUs it would be 1e-2, a run stopped in 100 steps). Else the
    rest go in chunks, about 4 per worker. A chunk whose call raises, dies or runs past timeout_s
    (timed from when its worker picks it up) is re-run one input at a time, a hung worker being
    killed; an input that still fails alone is listed in errors ({error text: [i, ...]}) or
    timed_out ([i, ...]). check(n, output) vets a chunk's output for its n inputs before it is
    used, and may raise (the workers still running are then killed)."""
    n = len(inputs)
    k = min(n, max(PROBES, num_workers))
    probes = [j * n // k for j in range(k)]
    rest = sorted(set(range(n)) - set(probes))
    size = max(1, math.ceil(n / (4 * num_workers)))
    todo, later = [[i] for i in probes], [rest[i:i + size] for i in range(0, len(rest), size)]
    outputs, errors, timed_out, untried, running = [None] * n, {}, [], [], []
    with tempfile.TemporaryDirectory(prefix="reward-") as tmp:
        try:
            while todo or running:
                while todo and len(running) < num_workers:
                    running.append(_start(fn, inputs, todo.pop(0), tmp, timeout_s))
                readable = select.select([job["proc"].stdout for job in running], [], [], 0.05)[0]
                for job in list(running):
                    outcome = _outcome(job, readable, timeout_s)
                    if outcome is None:
                        continue
                    running.remove(job)
                    if job["proc"].returncode is None:
                        _IDLE.append(job["proc"])  # it answered, so it is healthy: keep it warm
                    idx = job["idx"]
                    if outcome[0] == "ok":
                        check(len(idx), outcome[1])
                        for i, out in zip(idx, outcome[1]):
                            outputs[i] = out
                    elif len(idx) > 1:
                        todo.extend([i] for i in idx)  # find which input to blame
                    elif outcome[0] == "timeout":
                        timed_out.append(idx[0])
                    else:
                        errors.setdefault(outcome[1], []).append(idx[0])
                    # While `later` waits, only probes have run: one that ends in time decides.
                    if later and outcome[0] != "timeout":
                        todo, later = todo + later, []
                    elif later and len(timed_out) == len(probes):
                        untried, later = [i for chunk in later for i in chunk], []
        finally:
            for job in running:  # left only by an exception (a failed check, Ctrl-C)
                _stop(job["proc"])
    return outputs, errors, timed_out, untried


def _start(fn, inputs, idx, tmp, timeout_s):
    """Hand the chunk inputs[idx] to an idle worker, or a new one -> its job."""
    with open(os.path.join(tmp, f"{idx[0]}-{len(idx)}.pkl"), "wb") as f:
        pickle.dump((fn, [inputs[i] for i in idx]), f)
    proc = _IDLE.pop() if _IDLE else _spawn()
    proc = proc if proc.poll() is None else _spawn()  # it died idle (OOM killer, PDEATHSIG)
    proc.stdin.write(f.name.encode() + b"\n")
    proc.stdin.flush()
    # A new worker gets 60 s to start Python and import; the clock restarts at its "R".
    return {"idx": idx, "proc": proc, "out": b"", "deadline": time.monotonic() + 60 + timeout_s}


def _outcome(job, readable, timeout_s):
    """("ok", output), ("error", text) or ("timeout", exit code) once the job is over, else None."""
    proc = job["proc"]
    if proc.stdout in readable:
        data = os.read(proc.stdout.fileno(), 1 << 20)
        if data and not job["out"]:
            job["deadline"] = time.monotonic() + timeout_s
        out = job["out"] = job["out"] + data  # b"R", the result's length in 8 bytes, its pickle
        done = len(out) >= 9 and len(out) >= 9 + int.from_bytes(out[1:9], "little")
        if data and not done:
            return None
        if done:
            return pickle.loads(out[9:])
        return ("error", f"worker exited with code {_stop(proc)}")
    if time.monotonic() > job["deadline"]:
        return ("timeout", _stop(proc))
    return None


def _spawn():
    # the worker must import what we pickle: give it our sys.path
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p or os.getcwd() for p in sys.path))
    return subprocess.Popen([sys.executable, "-c", f"import {__name__}; {__name__}._serve()"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)


def _stop(proc):
    proc.kill()  # SIGKILL stops it even inside C code that holds the GIL
    return proc.wait()


def _serve():
    """Worker loop: for each line on stdin, the path of a pickled (fn, inputs), load it, write b"R"
    (fn starts), then the length and pickle of ("ok", fn(inputs)) or ("error", text) to stdout."""
    try:  # die with the trainer even if it is SIGKILLed: Linux prctl(PR_SET_PDEATHSIG = 1, SIGKILL)
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)
    except (OSError, AttributeError):
        pass
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # what fn prints goes to stderr; stdout carries the results
    # math-verify's warnings are about the timeouts reward.py turns off
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    for line in sys.stdin:
        started = False
        try:
            # Unpickling imports fn's module (reward.py: ~1 s for math-verify and sympy): in a new
            # worker, that is start-up time, so "R" comes after it, not before.
            with open(line.strip(), "rb") as f:
                fn, inputs = pickle.load(f)
            out.write(b"R")
            out.flush()
            started = True
            result = pickle.dumps(("ok", fn(inputs)))
        except BaseException as e:  # SystemExit from a reward is a failure to report too
            result = pickle.dumps(("error", f"{type(e).__name__}: {e}"))
        out.write(b"R" * (not started) + len(result).to_bytes(8, "little") + result)
        out.flush()
