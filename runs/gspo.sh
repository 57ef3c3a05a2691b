#!/usr/bin/env bash
# GSPO (arXiv 2507.18071): sequence-level ratio (GSPO-token gradient), a tiny clip range, no KL,
# per-sequence token means.
exec torchrun --nproc_per_node "${NPROC:-1}" train.py --ratio_level=sequence_token --clip_eps_low=3e-4 --clip_eps_high=4e-4 --kl_coef=0 --loss_agg=seq_mean_token_mean "$@"
