"""GRPO math: advantages, ratios, clipped surrogate, KL, aggregation, SFT mixing. Pure torch.

Each prompt gets a group of G sampled responses (G consecutive rows). A response's advantage is
its reward minus the group mean, over the group std (GRPO, DeepSeekMath arXiv 2402.03300) or not
(Dr.GRPO, arXiv 2503.20783). Each of its tokens gets the PPO clipped surrogate: the ratio r of the
current to the sampling-time policy is clipped to [1 - eps_low, 1 + eps_high], the upper bound
wider (DAPO's clip-higher, arXiv 2503.14476), and for A < 0 the loss is capped at |A| c (dual
clip). GSPO (arXiv 2507.18071) uses the sequence's geometric-mean ratio instead. A k3 estimate of
KL(pi || pi_ref) is added, and all per-token terms are averaged over the batch's valid tokens.
CHORD (arXiv 2508.11408) can mix in an SFT loss on expert data: (1 - mu) L_rl + mu L_sft. MPO's
offline pair losses are train_offline.py's.

Defaults are EasyR1's Geometry3K recipe: eps_low 0.2, eps_high 0.3, dual clip c = 3, token-mean
aggregation, k3 KL in the loss with coefficient 1e-2 (the coefficient is the caller's).

Conventions: rewards are (B,) with groups contiguous; per-token tensors are (B, T) with `mask`
(bool or 0/1 float, 1 = valid response token). Values under mask == 0, even inf or nan, reach
neither a result nor a gradient: we mask with torch.where, because 0 * nan is nan.

Simplifications: one scalar advantage per response, broadcast to its tokens; no value model, GAE,
REINFORCE++ or ReMax (a group baseline is all GRPO needs); no CISPO/SAPO/GMPO losses; no entropy
bonus (token_entropy is for logging). KL in the reward is train.py's job: it takes
kl_coef * sum_t k(old, ref) off each reward first. No collectives: aggregate() takes global counts.
"""
import math

import torch

LOG_RATIO_MAX = 20.0  # exp(20) ~ 5e8: a ratio that large is already "infinitely off-policy"


def _groups(rewards, group_size):
    """(B,) -> (B / G, G) rewards, their finite mask, (B / G, 1) count."""
    assert group_size >= 2, f"a group baseline needs group_size >= 2, got {group_size}"
    assert rewards.dim() == 1 and rewards.numel() % group_size == 0, (
        f"rewards must be (B,) with B divisible by {group_size}, got {tuple(rewards.shape)}")
    r = (rewards if rewards.is_floating_point() else rewards.float()).view(-1, group_size)
    return r, torch.isfinite(r), torch.isfinite(r).sum(dim=1, keepdim=True)


def _keep_signal(adv, r, valid):
    # 0 for a sample without a reward and for a group whose valid rewards are all equal (or < 2):
    # in float32 the mean of 8 copies of 0.1 is not 0.1, and the group would get about -0.007.
    lo = torch.where(valid, r, math.inf).amin(dim=1, keepdim=True)  # (B/G, 1)
    hi = torch.where(valid, r, -math.inf).amax(dim=1, keepdim=True)
    return torch.where(valid & (lo < hi), adv, 0.0)


def group_advantages(rewards, group_size, *, std_norm=True, eps=1e-6):
    """GRPO advantage (R - group mean) / (group std + eps); std_norm=False is Dr.GRPO. (B,) -> (B,).

    The std is Bessel-corrected (torch.std's default), as in EasyR1, verl and TRL. A group whose
    rewards are all equal gets exactly 0: it carries no signal, and must not get a tiny fake one. A
    NaN or inf reward (the reward failed on that sample) is left out of its group's mean and std and
    gets 0, as TRL does with None."""
    r, valid, n = _groups(rewards, group_size)  # (B/G, G), n valid rewards per group
    adv = r - torch.where(valid, r, 0.0).sum(dim=1, keepdim=True) / n.clamp(min=1)
    if std_norm:
        var = torch.where(valid, adv, 0.0).square().sum(dim=1, keepdim=True) / (n - 1).clamp(min=1)
        adv = adv / (var.sqrt() + eps)
    return _keep_signal(adv, r, valid).reshape(-1)


def rloo_advantages(rewards, group_size):
    """RLOO: R_i minus the mean of the other valid rewards of its group. (B,) -> (B,)."""
    r, valid, n = _groups(rewards, group_size)  # (B/G, G)
    baseline = (torch.where(valid, r, 0.0).sum(dim=1, keepdim=True) - r) / (n - 1).clamp(min=1)
    return _keep_signal(r - baseline, r, valid).reshape(-1)


def _masked_mean(x, valid):
    return torch.where(valid, x, 0.0).sum() / valid.sum().clamp(min=1)


def policy_loss(logp, old_logp, adv, mask, *, ratio_level="token", clip_eps_low=0.2,
                clip_eps_high=0.3, dual_clip=3.0):
    """Clipped surrogate per token, to minimise. Returns (loss (B, T), metrics), loss 0 under mask.

    logp, old_logp: (B, T) log-probs of the sampled tokens under the current and the rollout-time
    policy; adv: (B,) or (B, T). ratio_level picks the importance ratio:
      "token"          r_t = exp(logp_t - old_logp_t)                       (PPO / GRPO)
      "sequence"       s_i = exp(mean_t (logp_t - old_logp_t)) on every token of sequence i,
                       the gradient flowing through the mean                (GSPO)
      "sequence_token" value s_i, gradient s_i * grad logp_t                (GSPO-token)
    loss = max(-A r, -A clip(r, 1 - eps_low, 1 + eps_high)), and where A < 0 it is further capped
    at -A c (dual clip, c = dual_clip > 1; None turns it off) so that a huge ratio on a bad token
    cannot produce an unbounded loss."""
    if dual_clip is not None and dual_clip <= 1.0:
        raise ValueError(f"dual_clip must be > 1 (or None), got {dual_clip}")
    valid = mask.bool()
    zero = torch.zeros_like(logp)
    logp = torch.where(valid, logp, zero)  # garbage under the mask stops here, values and grads
    old_logp = torch.where(valid, old_logp.detach(), zero)
    adv = adv.detach().to(logp.dtype)
    adv = torch.where(valid, adv[:, None] if adv.dim() == 1 else adv, zero)  # (B, T)

    log_ratio = logp - old_logp  # (B, T), 0 under the mask
    if ratio_level in ("sequence", "sequence_token"):  # log s_i, (B, 1)
        n_valid = valid.sum(dim=-1, keepdim=True).clamp(min=1)
        log_ratio = log_ratio.sum(dim=-1, keepdim=True) / n_valid
    elif ratio_level != "token":
        raise ValueError(f"unknown ratio_level {ratio_level!r}")
    log_ratio = log_ratio.clamp(-LOG_RATIO_MAX, LOG_RATIO_MAX)
    if ratio_level == "sequence_token":  # the value of log s_i, token t's gradient that of logp_t
        log_ratio = log_ratio.detach() + logp - logp.detach()
    ratio = torch.exp(log_ratio.expand_as(logp))  # (B, T); "sequence": each token has d(log s_i)

    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1.0 - clip_eps_low, 1.0 + clip_eps_high)
    # max(unclipped, clipped) written as a where(), so that one mask picks the loss branch and
    # counts clip_frac: the metric is exactly the set of tokens whose gradient the clip cut.
    is_clipped = valid & (clipped > unclipped)  # the clipped branch wins: its gradient is 0
    loss = torch.where(is_clipped, clipped, unclipped)
    is_dual = torch.zeros_like(valid)
    if dual_clip is not None:
        cap = -adv * dual_clip  # a constant: no gradient once the cap is active
        is_dual = valid & (adv < 0) & (loss > cap)
        loss = torch.where(is_dual, cap, loss)
    loss = torch.where(valid, loss, zero)

    r = ratio.detach()
    metrics = {"clip_frac": _masked_mean(is_clipped.to(r.dtype), valid),
               "dual_clip_frac": _masked_mean(is_dual.to(r.dtype), valid),
               "ratio_max": torch.where(valid, r, -math.inf).amax()}  # -inf if no token is valid
    return loss, metrics


def kl_penalty(logp, ref_logp, kind="k3"):
    """Per-token estimate of KL(pi || pi_ref) from sampled tokens (Schulman's k1/k2/k3). (B, T).

    With d = logp - ref_logp: k1 = d, k2 = d^2 / 2, k3 = exp(-d) + d - 1 (unbiased, >= 0, of lower
    variance than k1), abs = |d|. k3 clamps d inside the exp to +-20 as EasyR1/verl do, but not k3
    itself to [-10, 10]: that would zero its gradient where the policy has drifted farthest below
    the reference (d < -2.6). The mask is the caller's (aggregate): pass finite values under it."""
    d = logp - ref_logp
    if kind == "k1":
        return d
    if kind == "k2":
        return 0.5 * d * d
    if kind == "k3":
        return torch.exp(-d.clamp(-LOG_RATIO_MAX, LOG_RATIO_MAX)) + d - 1.0
    if kind == "abs":
        return d.abs()
    raise ValueError(f"unknown kl kind {kind!r}, expected k1, k2, k3 or abs")


def aggregate(x, mask, mode="token_mean", *, num_tokens=None, num_seqs=None, max_len=None):
    """Per-token (B, T) -> scalar, counting only valid tokens.

      "token_mean"              sum(x m) / num_tokens                   (EasyR1/verl default, DAPO)
      "seq_mean_token_mean"     sum_i (token mean of sequence i) / num_seqs     (original GRPO)
      "seq_mean_token_sum"      sum(x m) / num_seqs
      "seq_mean_token_sum_norm" sum(x m) / (num_seqs * max_len)         (Dr.GRPO: no length bias)
    num_tokens, num_seqs and max_len default to this batch's own (sum m, B, T). With gradient
    accumulation over micro-batches and ranks, pass the counts of the WHOLE batch and sum the
    results: the gradient is then exactly the one-big-batch gradient (with local counts a short
    micro-batch's tokens would weigh more than a long one's). Empty sequences contribute 0."""
    valid = mask.bool()
    x = torch.where(valid, x, torch.zeros_like(x))  # (B, T)
    B, T = x.shape
    n_seqs = B if num_seqs is None else num_seqs
    if mode == "token_mean":
        return x.sum() / (valid.sum().clamp(min=1) if num_tokens is None else num_tokens)
    if mode == "seq_mean_token_mean":  # the (B,) per-sequence token means, summed
        return (x.sum(dim=-1) / valid.sum(dim=-1).clamp(min=1)).sum() / n_seqs
    if mode == "seq_mean_token_sum":
        return x.sum() / n_seqs
    if mode == "seq_mean_token_sum_norm":
        return x.sum() / (n_seqs * (T if max_len is None else max_len))
    raise ValueError(f"unknown aggregation mode {mode!r}")


def filter_groups(scores, group_size, low=0.01, high=0.99):
    """DAPO dynamic sampling: (B / G,) bool, True where the group's mean score is in (low, high).

    Groups all right or all wrong have zero advantage and only dilute the batch. Filter on accuracy,
    never on a score with the format bonus: EasyR1 filters on "overall", so an all-wrong but
    well-formatted group (mean 0.1) passes although it carries no signal."""
    mean = _groups(scores, group_size)[0].mean(dim=1)  # (B/G,)
    return (mean > low) & (mean < high)


def mismatch_weights(old_logp, sampler_logp, mask, *, level="token", cap=3.0):
    """Truncated importance weights for the sampler/trainer mismatch -> (weights (B, T), metrics).

    vLLM's log-probs differ from the trainer's even with identical weights (kernels, precision), so
    the rollout is slightly off-policy, and TRL corrects by default. rho = pi_old / pi_sampler per
    token ("token") or its product over the sequence, broadcast ("sequence"); weight min(rho, cap),
    0 under the mask. As in TRL only the top is capped: rho < 1 cannot blow up the variance."""
    valid = mask.bool()
    d = torch.where(valid, (old_logp - sampler_logp).detach(), 0.0)  # (B, T)
    if level == "sequence":
        d = d.sum(dim=-1, keepdim=True).expand_as(d)
    elif level != "token":
        raise ValueError(f"unknown level {level!r}, expected token or sequence")
    rho = torch.exp(d.clamp(-LOG_RATIO_MAX, LOG_RATIO_MAX))
    w = torch.where(valid, rho.clamp(max=cap), 0.0)
    metrics = {"is_weight_mean": _masked_mean(w, valid),
               "is_weight_max": torch.where(valid, w, -math.inf).amax(),
               "is_clipped_frac": _masked_mean((rho > cap).to(w.dtype), valid)}
    return w, metrics


def chord_mu(step, *, mu_peak, mu_valley, warmup_steps, decay_steps):
    """CHORD's SFT weight mu at a step: linear 0 -> mu_peak over warmup_steps, then a half-cosine
    down to mu_valley over decay_steps, then mu_valley for good (mu_peak == mu_valley with no
    warm-up: a constant). ms-swift's mu_schedule_function, the paper's CHORD-mu: imitation of the
    expert data dominates early, then RL takes over."""
    if step < warmup_steps:
        return step / warmup_steps * mu_peak
    if step >= warmup_steps + decay_steps:
        return mu_valley
    cosine = 0.5 * (1.0 + math.cos(math.pi * (step - warmup_steps) / decay_steps))
    return mu_valley + (mu_peak - mu_valley) * cosine


def sft_loss(logp, mask, *, phi=False):
    """Per-token SFT loss -logp on expert tokens, 0 under the mask. (B, T).

    phi=True is CHORD-phi: weight each token by p (1 - p), p = exp(logp), so tokens the model knows
    (p ~ 1) or finds implausible (p ~ 0) weigh little: expert data nudges rather than overwrites the
    policy. phi is a weight here (detached); ms-swift's code lets the gradient flow through it."""
    logp = torch.where(mask.bool(), logp, torch.zeros_like(logp))  # so the loss is 0 there too
    loss = -logp
    if phi:
        p = logp.detach().exp()
        loss = loss * p * (1.0 - p)
    return loss


def token_entropy(logits):
    """Entropy of softmax(logits) over the vocabulary: (B, T, V) -> (B, T), in nats.

    log_softmax, not log(softmax), so large logits cannot overflow and tiny probabilities keep
    their logs. A -inf logit (a banned token) has p = 0 and contributes 0, not 0 * -inf = nan.
    bf16 logits are upcast: entropy sums V terms and bf16 has 8 bits of mantissa."""
    logp = torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
    p = logp.exp()
    logp = torch.where(p > 0, logp, torch.zeros_like(logp))
    return -(p * logp).sum(dim=-1)
