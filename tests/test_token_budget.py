"""Micro-batches by token budget (--max_tokens_per_micro_batch): data.token_budget_batches on
hand-made lengths and against a brute force, the token tallies, and the loss unchanged: two
partitions of the same rows take the step of one big micro-batch, on 1 rank and on 2 FSDP ranks
that run different numbers of micro-batches. Run as a script under torchrun, this file is that
2-rank worker."""
import os
import random
import socket
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import data  # noqa: E402
import model as modeling  # noqa: E402
import train  # noqa: E402

CPU = torch.device("cpu")
# Response lengths of the 8 rows (4 groups of 2, ~100-token prompts): rows 0-3 long, 4-7 short.
# Under BUDGET rank 0 (rows 0-3) runs 4 micro-batches of one row, rank 1 (rows 4-7) one of four.
LENGTHS = [150, 120, 130, 140, 2, 5, 4, 1]
BUDGET = 440


def cfg(budget=0, micro_batch_size=8):
    return train.Config(micro_batch_size=micro_batch_size, max_tokens_per_micro_batch=budget,
                        max_response_length=150, max_grad_norm=1e9)  # 1e9: no clipping


@pytest.fixture(scope="module", autouse=True)
def group():
    if dist.is_initialized():  # another test module's group serves as well
        yield
        return
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0,
                            world_size=1)
    yield
    dist.destroy_process_group()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------- the partition
def test_token_budget_batches_on_hand_made_lengths():
    # Responses 8, 5 | 3, 2, 1 with prompts of 2: 2 x (2 + 8) = 20 fits, 3 x 10 does not; then
    # 3 x (2 + 3) = 15. Indices ascend inside a micro-batch.
    assert data.token_budget_batches([(2, 3), (2, 8), (2, 1), (2, 5), (2, 2)], 20) == [
        [1, 3], [0, 2, 4]]
    # collate pads prompts and responses apart: (10, 1) with (1, 10) pads to 2 x (10 + 10) = 40,
    # not 2 x 11; a row over the budget goes alone.
    assert data.token_budget_batches([(10, 1), (1, 10)], 22) == [[1], [0]]
    assert data.token_budget_batches([(10, 1), (1, 10)], 40) == [[0, 1]]
    assert data.token_budget_batches([(3, 30), (3, 1)], 10) == [[0], [1]]
    assert data.token_budget_batches([(2, 2)] * 4, 8) == [[0, 1], [2, 3]]  # ties keep the order
    assert data.token_budget_batches([], 8) == []


def set_partitions(items):
    if not items:
        yield []
        return
    for rest in set_partitions(items[1:]):
        for k in range(len(rest)):
            yield rest[:k] + [[items[0]] + rest[k]] + rest[k + 1:]
        yield [[items[0]]] + rest


def cost(batch, lengths):
    return len(batch) * (max(lengths[i][0] for i in batch) + max(lengths[i][1] for i in batch))


def test_token_budget_batches_are_the_fewest_within_budget_by_brute_force():
    """Random lengths with equal prompts: every row once, every micro-batch of two or more rows
    within the budget, and as few micro-batches as the best of all set partitions."""
    rng = random.Random(0)
    for _ in range(200):
        lengths = [(5, rng.randint(1, 30)) for _ in range(rng.randint(1, 7))]
        budget = rng.randint(10, 120)
        ours = data.token_budget_batches(lengths, budget)
        assert sorted(i for b in ours for i in b) == list(range(len(lengths)))
        assert all(len(b) == 1 or cost(b, lengths) <= budget for b in ours)
        fewest = min(len(p) for p in set_partitions(list(range(len(lengths))))
                     if all(len(b) == 1 or cost(b, lengths) <= budget for b in p))
        assert len(ours) == fewest, (lengths, budget, ours)


def test_micro_batches_yield_indices_and_count_real_and_computed_tokens():
    """Rows A (prompt 3, response 4) and B (A's prompt, response 1) of one group, C (2, 2)."""
    prompt = torch.tensor([5, 6, 7])
    rows = [{"prompt_ids": prompt, "response_ids": [1] * 4},
            {"prompt_ids": prompt, "response_ids": [1]},
            {"prompt_ids": torch.tensor([5, 6]), "response_ids": [1] * 2}]

    def run(share, budget):
        c = train.Config(micro_batch_size=3, share_prompts=share, max_tokens_per_micro_batch=budget)
        tokens = {"real": 0, "computed": 0}
        idx = [i for i, _ in train.micro_batches(rows, c, 0, CPU, tokens=tokens)]
        return idx, tokens

    # Full rows padded to 3 + 4: 21 computed, 7 + 4 + 4 real.
    assert run(False, 0) == ([[0, 1, 2]], {"real": 15, "computed": 21})
    # A and B share their prompt: prompts (2, 3), 3 + 2 real; responses (3, 4), 4 + 1 + 2 real.
    assert run(True, 0) == ([[0, 1, 2]], {"real": 12, "computed": 18})
    # Budget 14: [A, C] (2 x (3 + 4)), then [B]: A's group split, its prompt runs twice.
    assert run(True, 14) == ([[0, 2], [1]], {"real": 15, "computed": 18})


# ----------------------------------------------------------------------------- the step
def make_rows(model_dir, data_dir):
    """fsdp_worker's 8 rows (4 prompts x 2) with LENGTHS' responses and its old/ref log-probs."""
    import fsdp_worker
    import tiny
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(model_dir)
    rows, g = fsdp_worker.make_samples(processor, data_dir, False)
    n_plain = len(processor.tokenizer) - len(tiny.SPECIAL_TOKENS)
    plain = modeling.load_model(model_dir)
    for s, n in zip(rows, LENGTHS):
        s["response_ids"] = torch.randint(0, n_plain, (n,), generator=g).tolist()
        with torch.no_grad():
            lp = modeling.token_logprobs(plain, data.collate([s], 0))[0]
        s["old_logp"] = lp + 0.3 * torch.randn(lp.shape, generator=g)
        s["ref_logp"] = lp + 0.2 * torch.randn(lp.shape, generator=g)
    return rows


@pytest.fixture(scope="module")
def rows(tiny_dir, tmp_path_factory):
    """(the rows, the file they are saved in for the 2-rank worker)."""
    path = str(tmp_path_factory.mktemp("budget") / "rows.pt")
    torch.save(make_rows(*tiny_dir), path)
    return torch.load(path, weights_only=False), path


def take_step(policy, rows, c, on_policy=False):
    """train.optimizer_step at lr 0 (the weights stay put): (stats, gradients, fresh)."""
    optimizer = torch.optim.SGD([p for p in policy.parameters() if p.requires_grad], lr=0.0)
    grads = {}
    optimizer.register_step_pre_hook(lambda *_: grads.update(
        {n: p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad.clone()
         for n, p in policy.named_parameters() if p.grad is not None}))
    adv = torch.tensor([s["adv"] for s in rows])
    stats, fresh = train.optimizer_step(policy, optimizer, rows, adv, c, on_policy=on_policy,
                                        use_kl=True, pad_id=0, device=CPU, banned_ids=[])
    return stats, grads, fresh


def assert_same_step(got, want):
    for key in ("loss/policy", "loss/kl", "kl", "clip_frac", "grad_norm"):
        assert got[0][key] == pytest.approx(want[0][key], rel=1e-5, abs=1e-7), key
    assert got[1].keys() == want[1].keys()
    for name, grad in want[1].items():
        assert torch.allclose(got[1][name], grad, rtol=1e-4, atol=1e-8), name


def test_two_token_budget_partitions_take_the_step_of_one_micro_batch(tiny_dir, rows):
    """Budgets of 440 and 1000 tokens split the rows 5 and 3 ways (a group's rows apart in both),
    losses summed with the global token count: the gradient of one micro-batch of all 8 rows,
    and on-policy the old log-probs come back in the rows' order."""
    rows = rows[0]
    lengths = [(len(s["prompt_ids"]), len(s["response_ids"])) for s in rows]
    assert data.token_budget_batches(lengths, 440) == [[0], [3], [2], [1], [4, 5, 6, 7]]
    assert data.token_budget_batches(lengths, 1000) == [[0, 2, 3], [1, 4, 5, 6], [7]]
    policy = modeling.load_model(tiny_dir[0])
    whole = take_step(policy, rows, cfg())
    assert whole[0]["grad_norm"] > 0 and whole[0]["clip_frac"] > 0
    for budget in (440, 1000):
        step = take_step(policy, rows, cfg(budget))
        assert_same_step(step, whole)
        assert step[0]["update/real_token_share"] > whole[0]["update/real_token_share"]
    old = train.logprobs(policy, rows, cfg(), pad_id=0, device=CPU, banned_ids=[],
                         temperature=1.0)
    got = train.logprobs(policy, rows, cfg(1000), pad_id=0, device=CPU, banned_ids=[],
                         temperature=1.0)
    fresh = take_step(policy, rows, cfg(440), on_policy=True)[2]
    for s, a, b, c in zip(rows, old, got, fresh[0]):
        assert a.shape == (len(s["response_ids"]),)
        assert torch.allclose(b, a, atol=1e-5, rtol=0) and torch.allclose(c, a, atol=1e-5, rtol=0)


def test_two_ranks_with_unequal_micro_batch_counts_take_the_one_rank_step(tiny_dir, rows,
                                                                         tmp_path):
    """Rank 0 holds the 4 long rows (4 micro-batches under BUDGET), rank 1 the 4 short ones (1):
    rank 1 runs 3 extra forwards and backwards with a zero gradient, and the 2-rank FSDP step
    equals one plain micro-batch of all 8 rows in this process; so do the log-probs."""
    rows, path = rows
    for rank, counts in ((0, 4), (1, 1)):
        mine = rows[4 * rank:4 * rank + 4]
        parts = data.token_budget_batches(
            [(len(s["prompt_ids"]), len(s["response_ids"])) for s in mine], BUDGET)
        assert len(parts) == counts
    out = str(tmp_path / "two.pt")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(free_port()), os.path.abspath(__file__), tiny_dir[0], path, out]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    two = torch.load(out, weights_only=False)
    policy = modeling.load_model(tiny_dir[0])
    assert_same_step(two["step"], take_step(policy, rows, cfg()))
    whole = train.logprobs(policy, rows, cfg(), pad_id=0, device=CPU, banned_ids=[],
                           temperature=1.0)
    for a, b in zip(whole, two["logp"]):
        assert torch.allclose(b, a, atol=1e-5, rtol=0)


def worker(model_dir, rows_path, out):
    """Under torchrun: rank r takes rows 4r..4r+3, log-probs then one step under BUDGET."""
    from torch.distributed.device_mesh import init_device_mesh

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mine = torch.load(rows_path, weights_only=False)[4 * rank:4 * rank + 4]
    policy = modeling.load_fsdp_model(model_dir, init_device_mesh("cpu", (world,)), rank=rank)
    c = cfg(BUDGET, micro_batch_size=1)
    # The step first: after a no-grad forward FSDP2 leaves the root gathered, and an optimizer
    # built then would hold the gathered copies.
    stats, grads, _ = take_step(policy, mine, c)
    stats = {k: v / world for k, v in train.all_reduce(stats).items()}  # what train.py logs
    logp = train.logprobs(policy, mine, c, pad_id=0, device=CPU, banned_ids=[], temperature=1.0)
    gathered = [None] * world
    dist.all_gather_object(gathered, logp)
    if rank == 0:
        torch.save({"step": (stats, grads), "logp": [lp for part in gathered for lp in part]}, out)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    worker(*sys.argv[1:4])
