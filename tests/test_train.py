"""train.py: the flag parser, the README's flags table, and short real runs (1 and 2 ranks)."""
import dataclasses
import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import time

import pytest
import torch

import tiny
import train
import train_offline

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_flags_parse_both_forms_and_reject_mistakes():
    cfg = train.parse_flags(["--model_path=Qwen/Qwen2.5-VL-7B-Instruct", "--lr", "3e-6", "--vllm_enforce_eager=true",
                             "--train_data=hiyouga/geometry3k@train"])
    assert (cfg.lr, cfg.vllm_enforce_eager, cfg.num_generations) == (3e-6, True, 5)
    assert cfg.rollout_batch_size == train.Config.rollout_batch_size  # a real model keeps the seed recipe
    for bad in (["--lr=fast"], ["--learning_rate=1"], ["--vllm_enforce_eager=yes"], ["lr=1"], ["--lr"]):
        with pytest.raises(SystemExit):
            train.parse_flags(bad)


@pytest.mark.parametrize("flags, named", [
    (["--val_freq=-1"], "--val_freq"), (["--sampler=sglang"], "--sampler"), (["--micro_batch_size=0"], "--micro_batch_size"),
    (["--num_generations=1"], "--num_generations"), (["--temperature=0"], "--temperature"), (["--top_p=1.5"], "--top_p"),
    (["--rollout_batch_size=10", "--global_batch_size=4"], "--global_batch_size"), (["--max_pixels=10"], "--max_pixels"),
    (["--freeze=vision,eyes"], "--freeze"), (["--master_dtype=float16"], "--master_dtype"), (["--loss_agg=sum"], "--loss_agg"),
    (["--val_temperature=-1"], "--val_temperature must"), (["--lora_dropout=1"], "--lora_dropout must"),
    # the files flags name are read at parse time too, not after a model has loaded
    (["--reward=mathh"], "--reward=mathh"), (["--reward=/nonexistent/r.py:score"], "--reward=/nonexistent"),
    (["--format_prompt=/nonexistent.jinja"], "--format_prompt")])
def test_bad_flag_values_are_refused_at_parse_time_by_name(flags, named):
    with pytest.raises(SystemExit) as e:
        train.parse_flags(flags)
    assert named in str(e.value)


def test_an_out_dir_that_cannot_be_made_is_a_stop_naming_the_flag(tmp_path):
    (tmp_path / "a_file").write_text("")
    cfg = train.parse_flags([f"--out_dir={tmp_path / 'a_file' / 'run'}"])
    with pytest.raises(SystemExit, match="--out_dir=.*a_file/run cannot be made: Not a directory"):
        train.prepare_out_dir(cfg, rank=0, world_size=1)


def test_a_format_prompt_without_its_content_is_refused_at_parse_time(tmp_path):
    path = tmp_path / "no_content.jinja"
    path.write_text("Think step by step.")
    with pytest.raises(SystemExit, match="--format_prompt: format prompt .*no_content.jinja has no"):
        train.parse_flags([f"--format_prompt={path}"])


def test_offline_flags_are_train_flags_and_their_own():
    cfg = train.parse_flags(["--algo=mpo", "--mpo_beta=0.2"], train_offline.OfflineConfig)
    assert (cfg.algo, cfg.mpo_beta, cfg.lr) == ("mpo", 0.2, tiny.TINY["lr"])
    with pytest.raises(SystemExit, match="--algo"):
        train.parse_flags(["--algo=ppo"], train_offline.OfflineConfig)
    with pytest.raises(SystemExit, match="unknown flag --algo"):  # GRPO only in train.py
        train.parse_flags(["--algo=sft"])


def test_tiny_default_overrides_only_unset_flags():
    cfg = train.parse_flags(["--lr=0.5"])
    assert cfg.model_path == "tiny" and cfg.lr == 0.5
    assert cfg.rollout_batch_size == tiny.TINY["rollout_batch_size"] != train.Config.rollout_batch_size
    # A real model on the default (synthetic) data keeps the seed recipe: the tiny sizes are the tiny model's.
    real = train.parse_flags(["--model_path=Qwen/Qwen2.5-VL-7B-Instruct"])
    assert real.train_data.startswith("synthetic") and real == train.Config(model_path=real.model_path)


def test_readme_flags_table_matches_config():
    readme = open(os.path.join(ROOT, "README.md")).read()
    rows = re.findall(r"^\| `--(\w+)` \| `([^`]*)` \|", readme, flags=re.M)
    documented = dict(rows)
    fields = {f.name: f.default for f in dataclasses.fields(train.Config)}
    assert set(documented) == set(fields), set(documented) ^ set(fields)
    for name, default in fields.items():
        assert documented[name] == str(default), (name, documented[name], default)


WORLD = {}  # the tiny model (3 warm-start steps) and its data, built once: conftest.tiny_world


@pytest.fixture(scope="module", autouse=True)
def world(tiny_world):
    WORLD["model"], WORLD["data"] = tiny_world


def train_cmd(tmp_path, nproc, out, *extra):
    flags = [f"--model_path={WORLD['model']}", f"--train_data={WORLD['data']}/train.parquet",
             f"--val_data={WORLD['data']}/test.parquet", f"--cache_dir={tmp_path / 'cache'}",
             f"--out_dir={out}", "--max_steps=2", "--rollout_batch_size=8", "--global_batch_size=4",
             "--num_generations=4", "--micro_batch_size=6", "--val_max_prompts=8",
             "--max_response_length=16", *extra]
    script = os.path.join(ROOT, "train_offline.py" if any(f.startswith("--algo=") for f in extra)
                          else "train.py")
    if nproc == 1:
        return [sys.executable, script, *flags]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
            str(port), script, *flags]


ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def read_metrics(out):
    lines = [json.loads(line) for line in open(out / "metrics.jsonl")]
    return [r for r in lines if "reward/overall" in r], [r for r in lines if "val/accuracy" in r]


def run_train(tmp_path, nproc, name, *extra, env=ENV):
    out = tmp_path / name
    res = subprocess.run(train_cmd(tmp_path, nproc, out, *extra), capture_output=True, text=True, timeout=600,
                         cwd=str(tmp_path), env=env)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    return (out, *read_metrics(out), res.stdout + res.stderr)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("runs")
    wandb = ("--wandb_project=grpo-test", "--wandb_name=one")
    return (run_train(tmp, 1, "one", *wandb, env={**ENV, "WANDB_MODE": "offline"}),
            run_train(tmp, 2, "two"))


PHASES = ("time/rollout", "time/reward", "time/logprobs", "time/update", "time/sync", "time/step")


def test_short_run_keeps_sampler_and_trainer_in_sync(runs):
    for out, steps, vals, stdout in runs:
        assert [r["step"] for r in steps] == [1, 2]
        for r in steps:
            # |vLLM log-prob - trainer log-prob| before the update: the weight sync is exact.
            assert r["rollout/logp_diff_max"] < 1e-4, r
            assert all(r[k] > 0 for k in PHASES), r
            assert r["time/step"] >= sum(r[k] for k in PHASES[:-1])
            assert 0 <= r["reward/accuracy"] <= 1 and 0 <= r["reward/format"] <= 1 and r["grad_norm"] > 0
        assert [v["step"] for v in vals] == [0, 2] and all(v["val/n"] == 8 for v in vals)
        assert "val/accuracy" in stdout.splitlines()[-1] or "done:" in stdout


def wandb_history(out):
    """The history rows of the offline wandb run in out. wandb 0.31 writes protobuf records in a
    LevelDB-style log: a 7-byte header, then 32 KiB blocks of chunks, each crc (4 bytes), length
    (2), type (1: full, 2: first, 3: middle, 4: last) and data; a block's tail under 7 bytes is
    padding."""
    from wandb.proto import wandb_internal_pb2

    (path,) = (out / "wandb").glob("offline-run-*/run-*.wandb")
    buf, pos, part, rows = path.read_bytes(), 7, b"", []
    while pos + 7 <= len(buf):
        if 32768 - pos % 32768 < 7:
            pos += 32768 - pos % 32768
            continue
        _, n, kind = struct.unpack("<IHB", buf[pos:pos + 7])
        part, pos = part + buf[pos + 7:pos + 7 + n], pos + 7 + n
        if kind in (1, 4):
            record, part = wandb_internal_pb2.Record.FromString(part), b""
            if record.WhichOneof("record_type") == "history":
                rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json)
                             for i in record.history.item})
    return rows


def test_the_run_leaves_curves_samples_and_a_wandb_copy_and_prints_little(runs):
    """What a user sees: curves.png, every validation generation in samples/, the same metrics
    in the offline wandb run as in metrics.jsonl, and a short console (no library noise)."""
    from PIL import Image

    import plot

    (out, steps, vals, console), (_, _, _, console2) = runs
    assert Image.open(out / "curves.png").size[0] > 300
    assert "reward" in plot.draw_curves(out / "metrics.jsonl", out / "again.png")
    for step in (0, 2):
        rows = [json.loads(line) for line in open(out / "samples" / f"step_{step}.jsonl")]
        assert len(rows) == 8 and {"prompt", "response", "ground_truth", "overall"} <= rows[0].keys()
        assert sum(r["overall"] for r in rows) / 8 == pytest.approx(vals[step // 2]["val/overall"])
    logged = {r["_step"]: r for r in wandb_history(out)}
    for r in steps:
        assert all(logged[r["step"]][k] == pytest.approx(v) for k, v in r.items() if k != "step")
    assert logged[2]["val/accuracy"] == vals[1]["val/accuracy"]
    for text in (console, console2):  # 2 steps, 2 validations (2 samples shown each), a summary
        lines = [line for line in text.split("\n") if line.strip()]  # a bar's \r: one line
        assert len(lines) <= 40, text[-3000:]
        for noise in ("set_num_threads", "Failed to load weights", "Traceback", "Reloading"):
            assert noise not in text, noise


def test_two_ranks_sample_their_shares_of_the_same_batch(runs):
    (_, one, _, _), (_, two, _, _) = runs
    # Seeds follow the global prompt index, so two ranks drawing half the prompts each sample
    # exactly what one rank draws alone: the first step's rewards and lengths agree.
    for key in ("reward/overall", "reward/format", "response/length"):
        assert one[0][key] == pytest.approx(two[0][key], abs=1e-6), key
    assert one[0]["loss/policy"] == pytest.approx(two[0]["loss/policy"], abs=1e-5)


def test_final_model_loads_and_matches_the_trainer(runs):
    (out, _, _, _), _ = runs
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(out / "hf")
    AutoProcessor.from_pretrained(out / "hf")
    start = AutoModelForImageTextToText.from_pretrained(WORLD["model"])
    changed = [n for n, p in model.state_dict().items() if not p.equal(start.state_dict()[n])]
    assert len(changed) > 0.9 * len(start.state_dict())  # the saved model is the trained one
    # vLLM loads the folder with its own loader (not sync_weights) and samples what transformers scores.
    data_dir = WORLD["data"]
    res = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "vllm_export_worker.py"), str(out / "hf"),
                          str(data_dir)], capture_output=True, text=True, timeout=300, env=ENV)
    assert res.returncode == 0, res.stderr[-3000:]
    assert float(res.stdout.split("max_logp_diff")[-1]) < 1e-4, res.stdout[-500:]


@pytest.mark.parametrize("sampler", ["vllm", "hf"])
def test_resume_after_sigkill_repeats_the_same_steps(tmp_path, sampler):
    """2 ranks, checkpoints every 2 steps: a run SIGKILLed after its step-2 checkpoint and resumed
    with --resume=auto logs steps 3-4 exactly as the uninterrupted run does, with either sampler
    (hf: the FSDP model itself decodes, both ranks stepping together). The random reward gives
    nonzero advantages, so the steps really update the weights and Adam's state."""
    extra = ("--reward=random", "--save_freq=2", "--max_steps=4", "--save_hf=false", f"--sampler={sampler}")
    _, whole, _, _ = run_train(tmp_path, 2, "whole", *extra)
    out = tmp_path / "killed"
    # The two ranks launched by hand (torchrun puts its workers in sessions of their own, out of
    # reach of one killpg), both in one process group: SIGKILL takes the whole job at once.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in (0, 1):
        env = {**ENV, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        group = {"process_group": 0 if rank == 0 else procs[0].pid}  # rank 0 leads a new group
        procs.append(subprocess.Popen(train_cmd(tmp_path, 1, out, *extra), cwd=str(tmp_path), env=env,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **group))
    deadline = time.monotonic() + 300
    while not (out / "checkpoints" / "step_2").exists() and procs[0].poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(procs[0].pid, signal.SIGKILL)
    for p in procs:
        p.wait()
    assert (out / "checkpoints" / "step_2").exists() and not (out / "checkpoints" / "step_4").exists()
    _, resumed, _, stdout = run_train(tmp_path, 2, "killed", *extra, "--resume=auto")
    assert "resumed from" in stdout and f"{out}/checkpoints/step_2" in stdout
    last = {r["step"]: r for r in resumed}  # a step logged before the kill is logged again: take the last
    for step in (3, 4):
        a, b = whole[step - 1], last[step]
        assert a["grad_norm"] > 0 and a["rollout/logp_diff_max"] < 1e-4
        for key in a:
            if not key.startswith(("time/", "memory/")):
                assert b[key] == pytest.approx(a[key], rel=1e-6, abs=1e-7), (step, key)


def test_two_nodes_of_one_rank_each(tmp_path, runs):
    """torchrun --nnodes 2 as two launchers on localhost: ranks come from the node rank, not the
    local rank (both are local rank 0), and the run is the same as one launcher with 2 ranks."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "nodes"
    flags = train_cmd(tmp_path, 1, out)[2:]  # train.py's flags
    launchers = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank",
                                   str(node), "--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port",
                                   str(port), os.path.join(ROOT, "train.py"), *flags], cwd=str(tmp_path), env=ENV,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for node in (0, 1)]
    results = [p.communicate(timeout=600) for p in launchers]
    assert all(p.returncode == 0 for p in launchers), results[0][1][-3000:] + results[1][1][-3000:]
    assert "world 2 on cpu" in results[0][0]
    steps, vals = read_metrics(out)
    assert [r["step"] for r in steps] == [1, 2] and all(r["rollout/logp_diff_max"] < 1e-4 for r in steps)
    assert [v["val/n"] for v in vals] == [8, 8]
    (_, one_launcher, _, _) = runs[1]
    for key in ("reward/overall", "response/length", "loss/policy"):  # both nodes sampled their own share
        assert steps[0][key] == pytest.approx(one_launcher[0][key], abs=1e-5), key


def test_tensor_parallel_pair_samples_like_one_rank(tmp_path):
    """--vllm_tp=2 on 2 ranks: one engine split over both ranks, fed the same prompts and seeds, each
    rank training on half of the groups. Seeds follow the global prompt index, so this run samples
    and trains as the 1-rank run does, up to float32 summation order. The random reward keeps the
    advantages nonzero: with all-zero advantages the gradient is pure rounding noise, which Adam
    scales up to full-size steps, and the runs would part for that reason alone."""
    _, one, _, _ = run_train(tmp_path, 1, "one", "--reward=random")
    _, steps, vals, _ = run_train(tmp_path, 2, "tp2", "--reward=random", "--vllm_tp=2")
    assert [v["val/n"] for v in vals] == [8, 8]  # each answer scored once, not once per TP rank
    assert [r["step"] for r in steps] == [1, 2]
    for a, b in zip(one, steps):
        assert b["rollout/logp_diff_max"] < 1e-4 and a["grad_norm"] > 0
        for key in ("reward/overall", "response/length", "loss/policy", "loss/kl", "grad_norm", "clip_frac"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), (a["step"], key)


def test_sft_then_grpo_and_mpo_share_the_sft_term(tmp_path):
    """The seed-2 pipeline on the tiny default: --algo=sft on the synthetic query/response jsonl, then
    GRPO from its exported model. And --algo=mpo on 2 ranks over the same rows as preference pairs
    (chosen = the SFT response): at its first step the policy is the reference, so the DPO term is
    exactly log 2, BCO's 2 log 2 (delta 0), and its SFT term must equal the SFT run's first loss,
    computed by another code path on another world size."""
    import math

    offline = ("--rollout_batch_size=8", "--global_batch_size=8")
    sft_out, _, _, _ = run_train(tmp_path, 1, "sft", "--algo=sft", f"--train_data={WORLD['data']}/sft.jsonl", *offline)
    assert sft_out.joinpath("hf", "config.json").exists()
    sft_steps = [json.loads(line) for line in open(sft_out / "metrics.jsonl") if "loss/sft" in line]
    assert [r["step"] for r in sft_steps] == [1, 2] and all(r["grad_norm"] > 0 for r in sft_steps)
    assert train.parse_flags([f"--model_path={sft_out / 'hf'}"]).lr == tiny.TINY["lr"]  # trained from the tiny
    _, grpo_steps, _, stdout = run_train(tmp_path, 1, "grpo", f"--model_path={sft_out / 'hf'}", "--max_steps=1")
    assert "model " + str(sft_out / "hf") in stdout and grpo_steps[0]["rollout/logp_diff_max"] < 1e-4
    mpo_out, _, _, _ = run_train(tmp_path, 2, "mpo", "--algo=mpo", f"--train_data={WORLD['data']}/pref.jsonl", *offline)
    mpo = [json.loads(line) for line in open(mpo_out / "metrics.jsonl") if "mpo/loss_dpo" in line]
    assert mpo[0]["mpo/loss_dpo"] == pytest.approx(math.log(2), abs=1e-6)
    assert mpo[0]["mpo/loss_bco"] == pytest.approx(2 * math.log(2), abs=1e-6)
    assert mpo[0]["mpo/loss_sft"] == pytest.approx(sft_steps[0]["loss/sft"], rel=1e-5)
    assert mpo[1]["mpo/delta"] != 0 and mpo[1]["mpo/loss_dpo"] != pytest.approx(math.log(2), abs=1e-4)


def test_lora_run_syncs_merged_weights_and_trains_only_the_adapted_linears(tmp_path):
    """--lora_rank on 2 ranks: vLLM samples from base + scale * B @ A (the sampler matches the trainer
    at every step), and the exported model differs from the start only in the adapted projections."""
    from safetensors.torch import load_file
    from transformers import AutoModelForImageTextToText

    out, steps, _, _ = run_train(tmp_path, 2, "lora", "--lora_rank=4", "--reward=random", "--lr=1e-2")
    assert [r["step"] for r in steps] == [1, 2]
    assert all(r["rollout/logp_diff_max"] < 1e-4 and r["grad_norm"] > 0 for r in steps)
    trained = AutoModelForImageTextToText.from_pretrained(out / "hf").state_dict()
    start = AutoModelForImageTextToText.from_pretrained(WORLD["model"]).state_dict()
    adapted = {n for n in trained if ".language_model.layers." in n and n.endswith(
        tuple(f"{t}.weight" for t in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")))}
    assert len(adapted) == 14  # 7 linears x 2 layers
    for name, w in trained.items():
        assert torch.equal(w, start[name]) != (name in adapted), name
    adapter = load_file(out / "adapter" / "adapter_model.safetensors")
    assert len(adapter) == 28 and all(k.startswith("base_model.model.") for k in adapter)


def test_rows_with_two_images_sample_with_vllm_and_sft_finds_its_own_rows(tmp_path):
    """The engine takes as many images per prompt as the data has (it was made for one: vLLM refused
    the first two-image prompt). And --algo=sft on the default data trains on the synthetic SFT rows."""
    from PIL import Image

    rows = []
    for i in range(8):
        paths = [tmp_path / f"{i}_{k}.png" for k in range(2)]
        for k, path in enumerate(paths):
            Image.new("RGB", (56, 56), (40 * i, 90 * k, 200)).save(path)
        rows.append({"problem": "<image><image>Which is bluer?", "answer": "1", "images": [str(p) for p in paths]})
    data_file = tmp_path / "two.jsonl"
    data_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    _, steps, _, _ = run_train(tmp_path, 1, "two", f"--train_data={data_file}", "--val_data=", "--max_steps=1")
    assert steps[0]["tokens/image"] == 8 * 4 * 2 * 4  # 8 prompts x 4 samples x 2 images x 4 tokens each
    assert steps[0]["rollout/logp_diff_max"] < 1e-4
    out, _, _, stdout = run_train(tmp_path, 1, "sft", "--algo=sft", "--max_steps=1", "--val_data=",
                                  "--rollout_batch_size=8", "--global_batch_size=8", "--train_data=")
    assert "sft.jsonl" in stdout and json.loads(open(out / "metrics.jsonl").readline())["loss/sft"] > 0
