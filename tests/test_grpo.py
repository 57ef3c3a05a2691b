"""Tests for grpo.py (and MPO's losses, train_offline.py): hand-computed values on tiny tensors,
naive-loop references, gradients."""
import math
import os
import sys

import pytest
import torch

# the modules sit at the repo root, not in a package: make `pytest tests/` work from anywhere
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import grpo  # noqa: E402
import train_offline  # noqa: E402

LN2, LN4 = math.log(2.0), math.log(4.0)
F64 = torch.float64


def t(x, dtype=F64):
    return torch.tensor(x, dtype=dtype)


def close(a, b, tol=1e-12):
    torch.testing.assert_close(torch.as_tensor(a, dtype=F64), torch.as_tensor(b, dtype=F64),
                               rtol=tol, atol=tol)


def rand(*shape, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=F64) * scale


def rand_mask(B, T, seed=0):
    # Right-padded masks of random lengths 1..T, as a batch of responses looks.
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    return torch.arange(T)[None, :] < lengths[:, None]


# ----------------------------------------------------------------------------- advantages

def test_group_advantages_hand_values():
    # group 1 [1, 0, 0, 0]: mean 0.25, deviations [.75, -.25, -.25, -.25],
    #   Bessel var (.5625 + 3 * .0625) / 3 = .25, std .5 -> [1.5, -.5, -.5, -.5]
    # group 2 [1, 1, 3, 3]: mean 2, deviations [-1, -1, 1, 1], var 4 / 3, std 2 / sqrt(3)
    #   -> +-sqrt(3) / 2
    r = t([1.0, 0, 0, 0, 1, 1, 3, 3])
    h = math.sqrt(3) / 2
    close(grpo.group_advantages(r, 4, eps=0.0), [1.5, -.5, -.5, -.5, -h, -h, h, h])
    # the default eps 1e-6 sits in the denominator: .75 / (.5 + 1e-6)
    close(grpo.group_advantages(r, 4)[0], 0.75 / 0.500001)
    # Dr.GRPO: deviations only
    close(grpo.group_advantages(r, 4, std_norm=False), [.75, -.25, -.25, -.25, -1, -1, 1, 1])


def test_group_advantages_match_naive_loop():
    for G in (2, 3, 5):
        r = rand(4 * G, seed=G)
        for std_norm in (True, False):
            want = []
            for g in range(4):
                xs = [float(v) for v in r[g * G:(g + 1) * G]]
                mean = sum(xs) / G
                std = math.sqrt(sum((x - mean) ** 2 for x in xs) / (G - 1))
                want += [(x - mean) / (std + 1e-6) if std_norm else x - mean for x in xs]
            close(grpo.group_advantages(r, G, std_norm=std_norm), want)


def test_equal_rewards_give_exactly_zero_advantage_in_float32():
    # The math reward gives 0.1 to an all-wrong, well-formatted answer. In float32 the naive
    # (R - mean) / (std + eps) of 8 such rewards is a same-sign nonzero number (rounding in the
    # mean), which would push the whole group down; the group must get exactly 0.
    r = torch.full((8,), 0.1, dtype=torch.float32)
    naive = (r - r.mean()) / (r.std() + 1e-6)
    assert (naive != 0).all()  # the trap is real on this input
    r = torch.cat([r, torch.tensor([1.0, 0, 0, 0, 0, 0, 0, 0])])  # plus one informative group
    for std_norm in (True, False):
        adv = grpo.group_advantages(r, 8, std_norm=std_norm)
        assert torch.equal(adv[:8], torch.zeros(8))
        assert adv[8] > 0 and not torch.isnan(adv).any()
    assert torch.equal(grpo.rloo_advantages(r, 8)[:8], torch.zeros(8))


@pytest.mark.parametrize("fn", [grpo.group_advantages, grpo.rloo_advantages])
def test_advantages_reject_bad_group_sizes(fn):
    with pytest.raises(AssertionError):
        fn(t([1.0, 0.0]), 1)
    with pytest.raises(AssertionError):
        fn(t([1.0, 0.0]), 0)
    with pytest.raises(AssertionError):
        fn(t([1.0, 0.0, 1.0, 0.0, 1.0]), 2)  # 5 rewards are not groups of 2


def test_rloo_hand_values_and_naive_loop():
    # [1, 0, 0, 0]: 1 - 0 = 1; 0 - (1 + 0 + 0) / 3 = -1/3
    # [1, 1, 3, 3]: 1 - (1 + 3 + 3) / 3 = -4/3; 3 - (1 + 1 + 3) / 3 = 4/3
    r = t([1.0, 0, 0, 0, 1, 1, 3, 3])
    close(grpo.rloo_advantages(r, 4), [1, -1 / 3, -1 / 3, -1 / 3, -4 / 3, -4 / 3, 4 / 3, 4 / 3])
    r = rand(15, seed=3)
    want = []
    for g in range(5):
        xs = [float(v) for v in r[g * 3:(g + 1) * 3]]
        want += [x - (sum(xs) - x) / 2 for x in xs]
    close(grpo.rloo_advantages(r, 3), want)


NAN, INF = math.nan, math.inf


def test_nonfinite_rewards_are_left_out_of_their_group_hand_values():
    # group 1 [1, nan, 0, 0]: valid [1, 0, 0], mean 1/3, deviations [2/3, -1/3, -1/3],
    #   Bessel var (4/9 + 1/9 + 1/9) / 2 = 1/3, std s = 1/sqrt(3) -> [2s, 0, -s, -s]
    # group 2 [2, inf, -inf, 2]: valid rewards equal -> 0; group 3 all nan -> 0;
    # group 4 [5, nan, nan, nan]: one valid reward has no baseline -> 0
    r = t([1.0, NAN, 0, 0, 2, INF, -INF, 2, NAN, NAN, NAN, NAN, 5, NAN, NAN, NAN])
    s = 1 / math.sqrt(3)
    close(grpo.group_advantages(r, 4, eps=0.0), [2 * s, 0, -s, -s] + [0] * 12)
    close(grpo.group_advantages(r, 4, std_norm=False), [2 / 3, 0, -1 / 3, -1 / 3] + [0] * 12)
    # RLOO: 1 - (0 + 0) / 2 = 1; 0 - (1 + 0) / 2 = -1/2
    close(grpo.rloo_advantages(r, 4), [1, 0, -.5, -.5] + [0] * 12)


@pytest.mark.parametrize("std_norm", [True, False])
def test_nonfinite_rewards_give_the_advantages_of_the_valid_rewards_alone(std_norm):
    # A group with k invalid rewards must get, on its valid samples, exactly what a group of the
    # G - k valid rewards gets, and 0 on the others.
    G = 6
    r = rand(4 * G, seed=7)
    bad = [[1], [0, 5], [2, 3, 4], []]  # invalid positions per group
    for g, idx in enumerate(bad):
        for k, i in enumerate(idx):
            r[g * G + i] = (NAN, INF, -INF)[k % 3]
    adv = grpo.group_advantages(r, G, std_norm=std_norm)
    rloo = grpo.rloo_advantages(r, G)
    for g, idx in enumerate(bad):
        keep = [g * G + i for i in range(G) if i not in idx]
        close(adv[keep], grpo.group_advantages(r[keep], len(keep), std_norm=std_norm))
        close(rloo[keep], grpo.rloo_advantages(r[keep], len(keep)))
        close(adv[[g * G + i for i in idx]], [0.0] * len(idx))
        close(rloo[[g * G + i for i in idx]], [0.0] * len(idx))


# ----------------------------------------------------------------------------- policy loss

def test_policy_loss_token_hand_values_gradients_and_metrics():
    # old_logp = 0 so r = exp(logp); eps_low .2, eps_high .3 -> clip range [.8, 1.3]; c = 3.
    #   A    r    -A r   -A clip(r)  dual cap -A c   loss  region      dloss/dlogp
    #   1   1.1   -1.1   -1.1          -            -1.1  inside      -A r = -1.1
    #   1   1.5   -1.5   -1.3          -            -1.3  clip high    0
    #   1   0.5   -0.5   -0.8          -            -0.5  (no clip)   -A r = -0.5
    #  -1   0.5    0.5    0.8          3             0.8  clip low     0
    #  -1   1.5    1.5    1.3          3             1.5  (no clip)   -A r = 1.5
    #  -1   4.0    4.0    1.3          3             3.0  dual clip    0
    #  -2   0.9    1.8    1.8          6             1.8  inside      -A r = 1.8
    #   5   nan  (masked: loss 0, gradient 0)
    r = [1.1, 1.5, 0.5, 0.5, 1.5, 4.0, 0.9]
    logp = t([[math.log(x) for x in r] + [float("nan")]]).requires_grad_()
    adv = t([[1.0, 1, 1, -1, -1, -1, -2, 5]])
    mask = t([[1.0] * 7 + [0.0]])
    loss, m = grpo.policy_loss(logp, torch.zeros_like(logp), adv, mask)
    close(loss, [[-1.1, -1.3, -0.5, 0.8, 1.5, 3.0, 1.8, 0.0]])
    loss.sum().backward()
    close(logp.grad, [[-1.1, 0, -0.5, 0, 1.5, 0, 1.8, 0]])
    # 7 valid tokens: clipped {1.5 high, 0.5 low}, dual {4.0}
    close(m["clip_frac"], 2 / 7), close(m["dual_clip_frac"], 1 / 7), close(m["ratio_max"], 4.0)
    assert all(v.dim() == 0 and not v.requires_grad for v in m.values())

    # without dual clip the A = -1, r = 4 token keeps loss 4 and gradient -A r = 4
    logp.grad = None
    loss, m = grpo.policy_loss(logp, torch.zeros_like(logp), adv, mask, dual_clip=None)
    close(loss[0, 5], 4.0)
    loss.sum().backward()
    close(logp.grad[0, 5], 4.0)
    close(m["dual_clip_frac"], 0.0)


def naive_policy_loss(logp, old, adv, mask, level, el=0.2, eh=0.3, c=3.0):
    """Per-token loss and d(sum of loss)/d(logp), token by token in plain floats."""
    B, T = logp.shape
    loss = [[0.0] * T for _ in range(B)]
    grad = [[0.0] * T for _ in range(B)]
    stats = dict(clip=0, dual=0, n=0)
    for i in range(B):
        valid = [j for j in range(T) if mask[i][j]]
        mean = sum(float(logp[i][j] - old[i][j]) for j in valid) / len(valid)
        g_seq = 0.0  # sum over tokens of dloss/dlog s_i, for "sequence"
        for j in valid:
            lr = float(logp[i][j] - old[i][j]) if level == "token" else mean
            r, A = math.exp(lr), float(adv[i][j])
            unclipped, clipped = -A * r, -A * min(max(r, 1 - el), 1 + eh)
            L, g = (clipped, 0.0) if clipped > unclipped else (unclipped, -A * r)
            stats["clip"] += clipped > unclipped
            if c is not None and A < 0 and L > -A * c:
                L, g = -A * c, 0.0
                stats["dual"] += 1
            stats["n"] += 1
            loss[i][j] = L
            grad[i][j] = g
            g_seq += g
        if level == "sequence":  # d log s_i / d logp_j = 1 / n_i for every valid j
            for j in valid:
                grad[i][j] = g_seq / len(valid)
    return t(loss), t(grad), stats


@pytest.mark.parametrize("level", ["token", "sequence", "sequence_token"])
def test_policy_loss_matches_naive_loop(level):
    B, T = 6, 7
    mask = rand_mask(B, T, seed=1)
    old = rand(B, T, seed=2) - 2.0
    # per-token log-ratios of scale .6 plus a per-row offset, so that token ratios and the
    # sequences' mean ratios both land inside, below, above and far above the clip range
    shift = t([[-0.5], [0.0], [0.6], [1.5], [-0.1], [0.25]])
    logp = (old + rand(B, T, seed=3, scale=0.6) + shift).requires_grad_()
    adv = rand(B, T, seed=4)
    loss, m = grpo.policy_loss(logp, old, adv, mask, ratio_level=level)
    loss.sum().backward()
    want_loss, want_grad, s = naive_policy_loss(logp.detach(), old, adv, mask, level)
    close(loss, want_loss)
    close(logp.grad, want_grad)
    assert s["clip"] > 0 and s["dual"] > 0 and s["clip"] < s["n"]  # the data hits every region
    close(m["clip_frac"], s["clip"] / s["n"]), close(m["dual_clip_frac"], s["dual"] / s["n"])


def test_policy_loss_per_sequence_adv_equals_broadcast_adv():
    B, T = 4, 5
    mask, old, logp = rand_mask(B, T, seed=5), rand(B, T, seed=6), rand(B, T, seed=7)
    adv = rand(B, seed=8)
    for level in ("token", "sequence", "sequence_token"):
        a, _ = grpo.policy_loss(logp, old, adv, mask, ratio_level=level)
        b, _ = grpo.policy_loss(logp, old, adv[:, None].expand(B, T), mask, ratio_level=level)
        assert torch.equal(a, b)


def test_sequence_and_sequence_token_same_loss_different_gradients():
    # log-ratios [ln1.2 + .5, ln1.2 - .5, ln1.2] have mean ln1.2, so s = 1.2 for every token
    # (inside [.8, 1.3]); the 4th token is masked garbage and must not move s.
    # A = [1, 2, -.5] -> loss -A s = [-1.2, -2.4, .6] for both.
    # sequence:       every token gets (1/3) * sum_t(-A_t s) = -(2.5 / 3) * 1.2 = -1.0
    # sequence_token: token t gets -A_t s = [-1.2, -2.4, .6]
    l12 = math.log(1.2)
    base = [[l12 + 0.5, l12 - 0.5, l12, 7.0]]
    adv, mask = t([[1.0, 2.0, -0.5, 3.0]]), t([[1.0, 1, 1, 0]])
    grads = {}
    for level in ("sequence", "sequence_token"):
        logp = t(base).requires_grad_()
        loss, m = grpo.policy_loss(logp, torch.zeros_like(logp), adv, mask, ratio_level=level)
        close(loss, [[-1.2, -2.4, 0.6, 0.0]])
        close(m["ratio_max"], 1.2)
        loss.sum().backward()
        grads[level] = logp.grad
    close(grads["sequence"], [[-1.0, -1.0, -1.0, 0.0]])
    close(grads["sequence_token"], [[-1.2, -2.4, 0.6, 0.0]])

    # s = 1.5 is outside the clip range: A = +1 is clipped (no gradient), A = -1 is not.
    # sequence: each token gets (0 + 1.5) / 2 = .75; sequence_token: [0, 1.5]
    for level, want in (("sequence", [[0.75, 0.75]]), ("sequence_token", [[0.0, 1.5]])):
        logp = t([[math.log(1.5) + 0.2, math.log(1.5) - 0.2]]).requires_grad_()
        loss, _ = grpo.policy_loss(logp, torch.zeros_like(logp), t([[1.0, -1.0]]),
                                   torch.ones(1, 2), ratio_level=level)
        close(loss, [[-1.3, 1.5]])
        loss.sum().backward()
        close(logp.grad, want)


@pytest.mark.parametrize("level", ["token", "sequence", "sequence_token"])
def test_policy_loss_ignores_garbage_under_mask(level):
    B, T = 3, 6
    mask = rand_mask(B, T, seed=9).to(F64)  # a float mask works like a bool one
    old, adv = rand(B, T, seed=10), rand(B, T, seed=11)
    clean = rand(B, T, seed=12)
    results = []
    for fill in (0.0, None):
        logp, o, a = clean.clone(), old.clone(), adv.clone()
        if fill is None:  # inf, -inf, nan and huge values where mask == 0
            n_pad = int((mask == 0).sum())
            junk = t([float("inf"), float("-inf"), float("nan"), 1e30] * 5)[:n_pad]
            logp[mask == 0], o[mask == 0], a[mask == 0] = junk, junk.flip(0), junk
        logp.requires_grad_()
        loss, m = grpo.policy_loss(logp, o, a, mask, ratio_level=level)
        loss.sum().backward()
        results.append((loss.detach(), logp.grad, m))
    (l0, g0, m0), (l1, g1, m1) = results
    assert torch.equal(l0, l1) and torch.equal(g0, g1)
    assert all(torch.equal(m0[k], m1[k]) for k in m0)
    assert torch.equal(g1[mask == 0], torch.zeros(int((mask == 0).sum()), dtype=F64))
    assert torch.isfinite(g1).all()


def test_policy_loss_rejects_bad_arguments():
    x = torch.zeros(1, 2)
    with pytest.raises(ValueError):
        grpo.policy_loss(x, x, x, x, dual_clip=1.0)
    with pytest.raises(ValueError):
        grpo.policy_loss(x, x, x, x, ratio_level="seq")


def test_log_ratio_is_clamped_so_exp_cannot_overflow():
    # log-ratio 1000 would overflow exp; clamped at 20 the ratio is e^20 (here dual-clipped:
    # A = -1 gives loss min(e^20, 3) = 3) and the metrics stay finite.
    logp = t([[1000.0, -1000.0]])
    loss, m = grpo.policy_loss(logp, torch.zeros_like(logp), t([[-1.0, 1.0]]), torch.ones(1, 2))
    close(loss, [[3.0, -math.exp(-20.0)]])  # second: r = e^-20, A = 1: max(-e^-20, -.8)
    close(m["ratio_max"], math.exp(20.0), tol=1e-9)


# ----------------------------------------------------------------------------- KL

def test_kl_estimators_hand_values():
    # d = logp - ref = [0, ln2, -ln2, 1]
    # k3 = exp(-d) + d - 1: [0, .5 + ln2 - 1, 2 - ln2 - 1, e^-1 + 1 - 1]
    logp, ref = t([[0.0, LN2, -LN2, 1.0]]), torch.zeros(1, 4, dtype=F64)
    close(grpo.kl_penalty(logp, ref, "k1"), [[0.0, LN2, -LN2, 1.0]])
    close(grpo.kl_penalty(logp, ref, "k2"), [[0.0, LN2 ** 2 / 2, LN2 ** 2 / 2, 0.5]])
    close(grpo.kl_penalty(logp, ref, "k3"), [[0.0, LN2 - 0.5, 1 - LN2, math.exp(-1)]])
    close(grpo.kl_penalty(logp, ref, "abs"), [[0.0, LN2, LN2, 1.0]])
    close(grpo.kl_penalty(logp, ref), grpo.kl_penalty(logp, ref, "k3"))  # k3 is the default
    with pytest.raises(ValueError):
        grpo.kl_penalty(logp, ref, "low_var_kl")


def test_k3_nonnegative_clamped_and_matches_naive_loop():
    d = torch.linspace(-30, 30, 121, dtype=F64)[None, :]
    k3 = grpo.kl_penalty(d, torch.zeros_like(d), "k3")
    assert (k3 >= 0).all()
    # beyond |d| = 20 only the exp argument is clamped: exp(20) - 30 - 1 and exp(-20) + 30 - 1
    close(k3[0, 0], math.exp(20) - 31, tol=1e-9), close(k3[0, -1], math.exp(-20) + 29)
    want = [[math.exp(-min(max(x, -20), 20)) + x - 1 for x in d[0].tolist()]]
    close(k3, want, tol=1e-9)


def test_k3_gradient_is_one_minus_exp_minus_d_even_far_from_ref():
    # d k3 / d logp = 1 - exp(-d). At d = -3 this is 1 - e^3 ~ -19.1; an output clamp at 10
    # (EasyR1/verl; k3(-3) = e^3 - 4 ~ 16.1) would make it 0.
    logp = t([[LN2, -3.0]]).requires_grad_()
    grpo.kl_penalty(logp, torch.zeros_like(logp), "k3").sum().backward()
    close(logp.grad, [[0.5, 1 - math.exp(3)]])


# ----------------------------------------------------------------------------- aggregate

X = [[1.0, 2.0, 3.0, float("nan")], [4.0, float("inf"), 99.0, -1e30], [5.0] * 4]
M = [[1.0, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]]  # 4 valid tokens, the 3rd row empty


def test_aggregate_hand_values():
    # valid: row 0 [1, 2, 3] (sum 6, mean 2), row 1 [4] (sum 4, mean 4), row 2 nothing; B=3, T=4
    x, m = t(X), t(M)
    close(grpo.aggregate(x, m), 10 / 4)
    close(grpo.aggregate(x, m, "token_mean", num_tokens=8), 10 / 8)
    close(grpo.aggregate(x, m, "seq_mean_token_mean"), (2 + 4 + 0) / 3)
    close(grpo.aggregate(x, m, "seq_mean_token_mean", num_seqs=4), 6 / 4)
    close(grpo.aggregate(x, m, "seq_mean_token_sum"), 10 / 3)
    close(grpo.aggregate(x, m, "seq_mean_token_sum", num_seqs=5), 10 / 5)
    close(grpo.aggregate(x, m, "seq_mean_token_sum_norm"), 10 / (3 * 4))
    close(grpo.aggregate(x, m, "seq_mean_token_sum_norm", num_seqs=2, max_len=10), 10 / 20)
    with pytest.raises(ValueError):
        grpo.aggregate(x, m, "token-mean")


def test_aggregate_gradient_ignores_garbage_under_mask():
    x, m = t(X).requires_grad_(), t(M).bool()
    grpo.aggregate(x, m, "seq_mean_token_mean").backward()
    # d/dx of (sum_i mean_i) / 3: row 0 tokens 1/(3*3), row 1 token 1/(1*3), the rest 0
    close(x.grad, [[1 / 9, 1 / 9, 1 / 9, 0], [1 / 3, 0, 0, 0], [0, 0, 0, 0]])


def naive_aggregate(x, mask, mode, max_len):
    B, T = len(x), len(x[0])
    rows = [[x[i][j] for j in range(T) if mask[i][j]] for i in range(B)]
    total = sum(sum(r) for r in rows)
    if mode == "token_mean":
        return total / sum(len(r) for r in rows)
    if mode == "seq_mean_token_mean":
        return sum(sum(r) / len(r) if r else 0.0 for r in rows) / B
    if mode == "seq_mean_token_sum":
        return total / B
    return total / (B * max_len)


MODES = ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "seq_mean_token_sum_norm"]


@pytest.mark.parametrize("mode", MODES)
def test_aggregate_matches_naive_loop(mode):
    x, mask = rand(5, 6, seed=13), rand_mask(5, 6, seed=14)
    want = naive_aggregate(x.tolist(), mask.tolist(), mode, max_len=6)
    close(grpo.aggregate(x, mask, mode), want)


def accumulated_grad(mode, global_counts):
    """Gradient of the policy loss over 3 micro-batches of 2 rows, each padded to its own length."""
    lengths = [7, 1, 2, 1, 7, 6]  # uneven on purpose: micro-batch token counts 8, 3, 13
    B, T = len(lengths), max(lengths)
    mask = torch.arange(T)[None, :] < t(lengths, torch.long)[:, None]
    logp = (rand(B, T, seed=15, scale=0.1) - 1).requires_grad_()
    old, adv = torch.full((B, T), -1.0, dtype=F64), rand(B, seed=16)

    def loss_of(rows):
        Tm = int(mask[rows].sum(-1).max())  # trim padding like a per-micro-batch collator would
        x, _ = grpo.policy_loss(logp[rows, :Tm], old[rows, :Tm], adv[rows], mask[rows, :Tm])
        counts = dict(num_tokens=mask.sum(), num_seqs=B, max_len=T) if global_counts else {}
        return grpo.aggregate(x, mask[rows, :Tm], mode, **counts)

    loss_of(slice(0, B)).backward()
    full = logp.grad.clone()
    logp.grad = None
    micro = [loss_of(slice(k, k + 2)) for k in range(0, B, 2)]
    # with global counts the micro losses add up; without, the usual "mean of micro losses"
    (sum(micro) if global_counts else sum(micro) / len(micro)).backward()
    return full, logp.grad


@pytest.mark.parametrize("mode", MODES)
def test_micro_batches_with_global_counts_give_the_full_batch_gradient(mode):
    full, accumulated = accumulated_grad(mode, global_counts=True)
    assert full.abs().sum() > 0
    close(accumulated, full)


def test_token_mean_micro_batches_without_global_counts_give_a_different_gradient():
    full, accumulated = accumulated_grad("token_mean", global_counts=False)
    # 24 tokens in all, 8 / 3 / 13 per micro-batch: the mean of the micro-batch token means
    # weighs a token 1/24, 1/9 or 1/39 by where it landed, instead of 1/24 everywhere
    assert (accumulated - full).abs().max() > 1e-3


# ----------------------------------------------------------------------------- filtering

def test_filter_groups_boundaries_and_values():
    # means with (low, high) = (.25, .75): .25 dropped, .5 kept, .75 dropped, 0 and 1 dropped
    s = t([1.0, 0, 0, 0, 1, 1, 0, 0, 1, 1, 1, 0, 0, 0, 0, 0, 1, 1, 1, 1])
    keep = grpo.filter_groups(s, 4, low=0.25, high=0.75)
    assert keep.tolist() == [False, True, False, False, False]
    # defaults (.01, .99): groups of 2 whose means are exactly .01 / .99 are dropped
    s = t([0.01, 0.01, 0.99, 0.99, 0.011, 0.011, 0.989, 0.989, 1.0, 0.0])
    assert grpo.filter_groups(s, 2).tolist() == [False, False, True, True, True]


def test_filter_on_overall_keeps_all_wrong_well_formatted_groups():
    # Why the docstring says "filter on accuracy": overall = .9 acc + .1 format has mean .1 for
    # an all-wrong, all-formatted group, so it passes while its accuracy (mean 0) does not.
    acc, fmt = t([0.0, 0, 0, 0, 1, 0, 1, 0]), t([1.0] * 8)
    overall = 0.9 * acc + 0.1 * fmt
    assert grpo.filter_groups(overall, 4).tolist() == [True, True]
    assert grpo.filter_groups(acc, 4).tolist() == [False, True]


def test_filter_groups_matches_naive_loop():
    s = (rand(60, seed=17) > 0.3).to(F64)  # 0/1 accuracies, groups of 5
    want = [0.01 < sum(s[g * 5:(g + 1) * 5].tolist()) / 5 < 0.99 for g in range(12)]
    assert grpo.filter_groups(s, 5).tolist() == want
    assert any(want) and not all(want)


# ----------------------------------------------------------------------------- mismatch IS

def test_mismatch_weights_hand_values():
    # d = old - sampler. Row 0: [ln2, ln4, -ln2] valid, 4th masked nan. Row 1: [ln1.5, ln.25].
    # token rho: [2, 4, .5] and [1.5, .25]; sequence rho: e^(ln2 + ln4 - ln2) = 4 and
    # 1.5 * .25 = .375. cap 3; rho = .25 < 1/cap is kept: the cap is one-sided.
    old = t([[LN2, LN4, -LN2, float("nan")], [math.log(1.5), math.log(0.25), 5.0, 5.0]])
    mask = t([[1.0, 1, 1, 0], [1, 1, 0, 0]])
    sampler = torch.zeros_like(old)
    cases = {  # level: (weights, mean over the 5 valid tokens, max, clipped share)
        "token": ([[2, 3, .5, 0], [1.5, .25, 0, 0]], 7.25 / 5, 3, 1 / 5),
        "sequence": ([[3, 3, 3, 0], [.375, .375, 0, 0]], 9.75 / 5, 3, 3 / 5),
    }
    for level, (w_want, mean, mx, frac) in cases.items():
        w, m = grpo.mismatch_weights(old, sampler, mask, level=level)
        close(w, w_want)
        close(m["is_weight_mean"], mean), close(m["is_weight_max"], mx)
        close(m["is_clipped_frac"], frac)
    assert grpo.mismatch_weights(old, sampler, mask)[0].equal(
        grpo.mismatch_weights(old, sampler, mask, level="token")[0])
    with pytest.raises(ValueError):
        grpo.mismatch_weights(old, sampler, mask, level="seq")


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_mismatch_weights_match_naive_loop_and_are_detached(level):
    B, T = 5, 6
    mask = rand_mask(B, T, seed=18)
    old = rand(B, T, seed=19).requires_grad_()
    sampler = old.detach() + rand(B, T, seed=20, scale=0.7)
    o = old.detach()
    w, _ = grpo.mismatch_weights(old, sampler, mask, level=level, cap=2.0)
    assert not w.requires_grad
    want = [[0.0] * T for _ in range(B)]
    for i in range(B):
        valid = [j for j in range(T) if mask[i, j]]
        seq = sum(float(o[i, j] - sampler[i, j]) for j in valid)
        for j in valid:
            rho = math.exp(seq if level == "sequence" else float(o[i, j] - sampler[i, j]))
            want[i][j] = min(rho, 2.0)
    close(w, want)
    assert (w == 2.0).any()  # the data reaches the cap


# ----------------------------------------------------------------------------- CHORD

def test_chord_mu_schedule_hand_values():
    # warm-up 4 steps to .5, then half-cosine to .1 over 8 steps:
    #   step 2: 2/4 * .5 = .25; step 4: peak .5; step 6: .1 + .4 * (1 + cos(pi/4)) / 2
    #   step 8: .1 + .4 * (1 + cos(pi/2)) / 2 = .3; step 12 and later: .1
    mu = lambda s: grpo.chord_mu(s, mu_peak=0.5, mu_valley=0.1, warmup_steps=4, decay_steps=8)
    want = {0: 0.0, 2: 0.25, 4: 0.5, 6: 0.1 + 0.2 * (1 + math.sqrt(0.5)), 8: 0.3, 12: 0.1, 100: 0.1}
    for step, value in want.items():
        assert mu(step) == pytest.approx(value, abs=1e-12), step
    # no warm-up starts at the peak; no decay drops straight to the valley
    assert grpo.chord_mu(0, mu_peak=0.5, mu_valley=0.1, warmup_steps=0, decay_steps=8) == 0.5
    assert grpo.chord_mu(3, mu_peak=0.5, mu_valley=0.1, warmup_steps=3, decay_steps=0) == 0.1


def test_sft_loss_values_and_gradients():
    # logp = [ln .5, ln .25, masked nan]. plain: -logp = [ln2, ln4, 0], gradient -1 per token.
    # phi = p (1 - p): .25 and .1875 -> [.25 ln2, .1875 ln4, 0], gradient -phi (phi detached)
    mask = t([[1.0, 1, 0]])
    logp = t([[math.log(0.5), math.log(0.25), float("nan")]]).requires_grad_()
    loss = grpo.sft_loss(logp, mask)
    close(loss, [[LN2, LN4, 0]])
    loss.sum().backward()
    close(logp.grad, [[-1.0, -1.0, 0.0]])
    logp.grad = None
    loss = grpo.sft_loss(logp, mask, phi=True)
    close(loss, [[0.25 * LN2, 0.1875 * LN4, 0]])
    loss.sum().backward()
    close(logp.grad, [[-0.25, -0.1875, 0.0]])


# ----------------------------------------------------------------------------- entropy

def test_token_entropy_hand_values_and_stability():
    # uniform over 4: ln4. p = [.25, .75] (logits ln1, ln3): -(.25 ln.25 + .75 ln.75).
    # logits [1000, 1000] (exp overflows a naive softmax): ln2. [0, -inf, -inf]: 0, not nan.
    inf = float("inf")
    logits = t([[[0.0, 0, 0, 0], [0, math.log(3), -inf, -inf],
                 [1000, 1000, -inf, -inf], [0, -inf, -inf, -inf]]]).requires_grad_()
    h = grpo.token_entropy(logits)
    close(h, [[LN4, -(0.25 * math.log(0.25) + 0.75 * math.log(0.75)), LN2, 0.0]])
    h.sum().backward()
    assert torch.isfinite(logits.grad).all()


def test_token_entropy_matches_naive_loop():
    logits = rand(2, 3, 7, seed=21, scale=3.0)
    want = []
    for row in logits.tolist():
        want.append([])
        for z in row:
            zmax = max(z)
            e = [math.exp(v - zmax) for v in z]
            p = [v / sum(e) for v in e]
            want[-1].append(-sum(q * math.log(q) for q in p))
    close(grpo.token_entropy(logits), want)
    assert grpo.token_entropy(logits.to(torch.bfloat16)).dtype == torch.float32


# ----------------------------------------------------------------------------- MPO

def softplus(x):  # -log sigmoid(-x) = log(1 + e^x), written out for the hand values below
    return math.log(1.0 + math.exp(x))


def test_dpo_loss_hand_values_metrics_and_gradients():
    # beta .5, c - r = [2, 0, -2] -> margins m = [1, 0, -1]; loss -log sigmoid(m) = log(1 + e^-m).
    # d loss / d c = -beta sigmoid(-m) = -.5 / (1 + e^m), and + that for r.
    c, r = t([2.0, 0.0, -1.0]).requires_grad_(), t([0.0, 0.0, 1.0]).requires_grad_()
    loss, metrics = train_offline.dpo_loss(c, r, beta=0.5)
    close(loss, [softplus(-1.0), LN2, softplus(1.0)])  # equal log-ratios: log 2
    close(metrics["reward_accuracy"], 1 / 3)  # the tie (m = 0) is not counted as right
    close(metrics["reward_margin"], 0.0)
    loss.sum().backward()
    want = [-0.5 / (1 + math.e), -0.25, -0.5 / (1 + math.exp(-1.0))]
    close(c.grad, want)
    close(r.grad, [-g for g in want])
    assert (c.grad < 0).all()  # raising the chosen log-ratio always lowers the loss


def test_dpo_loss_limits_and_shift_invariance():
    c, r = t([1000.0, -1000.0, 3.0, 13.0]), t([-1000.0, 1000.0, 1.0, 11.0])
    loss, _ = train_offline.dpo_loss(c, r, beta=0.5)
    close(loss[:2], [0.0, 1000.0])  # a huge margin: 0 or |m|, never inf or nan
    close(loss[2], loss[3])  # only the difference c - r counts


def test_bco_pair_loss_hand_values_gradients_and_shift():
    # beta .5, delta .25, c = [1, 0], r = [-1, 0] -> r_c = [.5, 0], r_r = [-.5, 0]
    # loss = -log sig(r_c - delta) - log sig(-(r_r - delta))
    #      = softplus(delta - r_c) + softplus(r_r - delta)
    c, r = t([1.0, 0.0]).requires_grad_(), t([-1.0, 0.0]).requires_grad_()
    loss, metrics = train_offline.bco_pair_loss(c, r, beta=0.5, delta=0.25)
    close(loss, [softplus(-0.25) + softplus(-0.75), softplus(0.25) + softplus(-0.25)])
    close(metrics["reward_chosen"], 0.25)
    close(metrics["reward_rejected"], -0.25)
    loss.sum().backward()
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    # d/dc = -beta sig(delta - r_c) (raising a chosen reward lowers the loss),
    # d/dr = beta sig(r_r - delta)
    close(c.grad, [-0.5 * sig(-0.25), -0.5 * sig(0.25)])
    close(r.grad, [0.5 * sig(-0.75), 0.5 * sig(-0.25)])
    # a 0-d tensor delta (on any device) too
    close(train_offline.bco_pair_loss(c, r, beta=0.5, delta=t(0.25))[0], loss)
    # delta 0 and both log-ratios 0: 2 log 2. Unlike DPO, moving both log-ratios moves the loss.
    close(train_offline.bco_pair_loss(t([0.0]), t([0.0]), beta=0.5)[0], [2 * LN2])
    close(train_offline.bco_pair_loss(t([2.0]), t([2.0]), beta=0.5)[0], [softplus(-1.0) + softplus(1.0)])


def test_bco_delta_is_the_running_mean_of_batch_means():
    # batch means 2, 7, -3: delta 2, then 2 + (7 - 2) / 2 = 4.5, then 4.5 + (-3 - 4.5) / 3 = 2.
    # Each batch weighs the same, whatever its size: after two batches 4.5, not the mean of the
    # six rewards (32 / 6).
    batches = [t([1.0, 3.0]), t([4.0, 6.0, 8.0, 10.0]).requires_grad_(), t([-3.0])]
    delta, seen = 0.0, []
    for n, rewards in enumerate(batches):
        delta = train_offline.bco_delta(delta, n, rewards)
        seen.append(delta)
    assert seen == [2.0, 4.5, 2.0]  # floats: a checkpoint stores them as they are
    g = torch.Generator().manual_seed(0)  # and against a naive mean of the batch means
    sizes = torch.randint(1, 9, (20,), generator=g)
    batches = [torch.randn(int(n), generator=g, dtype=F64) for n in sizes]
    delta = 0.0
    for n, rewards in enumerate(batches):
        delta = train_offline.bco_delta(delta, n, rewards)
    close(delta, sum(float(b.mean()) for b in batches) / len(batches))


def mpo_inputs():
    # pairs: c - r = [2, -2]; chosen tokens p = [.5, .25] and [.8] (nan and garbage under the mask)
    c, r = t([1.0, -2.0]).requires_grad_(), t([-1.0, 0.0]).requires_grad_()
    logp = t([[math.log(0.5), math.log(0.25), float("nan")], [math.log(0.8), 7.0, float("nan")]])
    logp.requires_grad_()
    return c, r, logp, t([[1.0, 1, 0], [1, 0, 0]])


def test_mpo_loss_hand_value_and_weights():
    # beta .1, delta .05: DPO margins [.2, -.2] -> [softplus(-.2), softplus(.2)];
    # BCO r_c = [.1, -.2], r_r = [-.1, 0] -> softplus(delta - r_c) + softplus(r_r - delta);
    # SFT token mean (ln 2 + ln 4 + ln 1.25) / 3. MPO = .8 mean(DPO) + .2 mean(BCO) + 1.0 SFT.
    c, r, logp, mask = mpo_inputs()
    dpo = (softplus(-0.2) + softplus(0.2)) / 2
    bco = (softplus(-0.05) + softplus(-0.15) + softplus(0.25) + softplus(-0.05)) / 2
    sft = (LN2 + LN4 + math.log(1.25)) / 3
    loss, metrics = train_offline.mpo_loss(c, r, logp, mask, beta=0.1, delta=0.05)
    close(loss, 0.8 * dpo + 0.2 * bco + 1.0 * sft)
    parts = torch.stack([metrics["loss_dpo"], metrics["loss_bco"], metrics["loss_sft"]])
    close(parts, [dpo, bco, sft])
    close(metrics["reward_accuracy"], 0.5)
    cases = [((1, 0, 0), dpo), ((0, 1, 0), bco), ((0, 0, 1), sft),
             ((2, 3, 5), 2 * dpo + 3 * bco + 5 * sft)]
    for weights, want in cases:
        close(train_offline.mpo_loss(c, r, logp, mask, beta=0.1, delta=0.05, weights=weights)[0], want)
    loss.backward()
    assert c.grad[0] < 0 and c.grad[1] < 0 and r.grad[0] > 0 and r.grad[1] > 0
    # SFT gradient -1/3 per valid chosen token (token mean over 3), 0 under the mask
    close(logp.grad, [[-1 / 3, -1 / 3, 0], [-1 / 3, 0, 0]])


def test_mpo_micro_batches_with_global_counts_give_the_full_batch_loss_and_gradient():
    c, r, logp, mask = mpo_inputs()
    full = train_offline.mpo_loss(c, r, logp, mask, delta=0.05)[0]
    full_grads = torch.autograd.grad(full, (c, r, logp))
    parts = sum(train_offline.mpo_loss(c[i:i + 1], r[i:i + 1], logp[i:i + 1], mask[i:i + 1], delta=0.05,
                              num_pairs=2, num_tokens=mask.sum())[0] for i in range(2))
    close(parts, full)
    for a, b in zip(torch.autograd.grad(parts, (c, r, logp)), full_grads):
        close(a, b)
