"""What a GPU run depends on, checked on the CPU. The process group: every collective the trainer
runs on host tensors (metrics, counts, barriers, object broadcasts, checkpoint metadata) must have a
backend (tests/gpu_group_worker.py stands gloo in for NCCL with NCCL's device map). vLLM's image
budget: sized by the run's pixel bounds."""
import json
import os
import socket
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def run_as_on_gpu(tmp_path, world, *flags):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           os.path.join(ROOT, "tests", "gpu_group_worker.py"), *flags, f"--model_path={world[0]}",
           f"--train_data={world[1]}/train.parquet", f"--val_data={world[1]}/test.parquet",
           f"--out_dir={out}", "--max_steps=2", "--rollout_batch_size=8",
           "--global_batch_size=4", "--num_generations=4", "--micro_batch_size=6", "--val_max_prompts=8",
           "--max_response_length=16", "--save_freq=1", "--save_limit=0", "--val_freq=0"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=str(tmp_path), env=ENV)
    return out, res


def test_the_gpu_process_group_serves_every_collective_of_a_run(tmp_path, tiny_world):
    """2 ranks through rollout (vLLM), reward, update, sync, validation, checkpoints and save_hf.
    --val_freq=0: validation before and after only; --save_limit=0: every checkpoint kept."""
    out, res = run_as_on_gpu(tmp_path, tiny_world)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    records = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [r["step"] for r in records if "reward/overall" in r] == [1, 2]
    assert [r["val/n"] for r in records if "val/n" in r] == [8, 8]
    assert sorted(os.listdir(out / "checkpoints")) == ["step_1", "step_2"] and (out / "hf" / "config.json").exists()


def test_a_cuda_only_group_refuses_the_trainers_host_collectives():
    """What the stand-in catches: over "cuda:gloo" (a bare "nccl" group's device map, what GPU runs
    used to ask for) train.all_reduce on metrics raises; over the group train.py asks for, it sums."""
    script = ("import sys, torch.distributed as dist; sys.path.insert(0, sys.argv[2]); import train\n"
              "dist.init_process_group(sys.argv[1], rank=0, world_size=1, init_method='tcp://127.0.0.1:' + sys.argv[3])\n"
              "print(train.all_reduce({'reward': 0.5, 'n': 3}))")
    results = {}
    for backend in ("cuda:gloo", train_backend_on_gpu()):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = str(s.getsockname()[1])
        results[backend] = subprocess.run([sys.executable, "-c", script, backend, ROOT, port], capture_output=True,
                                          text=True, timeout=120, env=ENV)
    bare, ours = results.values()
    assert bare.returncode != 0 and "No backend type associated with device type cpu" in bare.stderr
    assert ours.returncode == 0 and ours.stdout.strip() == "{'n': 3.0, 'reward': 0.5}", ours.stderr[-2000:]


def train_backend_on_gpu():
    sys.path.insert(0, ROOT)
    import train

    return train.process_group_backend("cuda").replace("nccl", "gloo")


def test_vllm_budgets_images_by_the_runs_pixel_bounds(tiny_dir):
    """vLLM sizes its encoder budget (and so what is left for the KV cache) for the largest image the
    processor allows: the run's --max_pixels, not the folder's default (12.8 M pixels on the 7B)."""
    from vllm import EngineArgs
    from vllm.multimodal import MULTIMODAL_REGISTRY

    import rollout

    def max_image_tokens(**bounds):
        args = rollout.engine_args(tiny_dir[0], world_size=1, max_model_len=512, kv_cache_bytes=1 << 26, **bounds)
        return MULTIMODAL_REGISTRY.get_processing_info(EngineArgs(**args).create_model_config()).get_max_image_tokens()

    assert max_image_tokens() == 112 * 112 // 28 ** 2  # the tiny processor's own max_pixels
    assert max_image_tokens(min_pixels=56 * 56, max_pixels=56 * 112) == 56 * 112 // 28 ** 2
