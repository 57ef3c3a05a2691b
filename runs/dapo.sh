#!/usr/bin/env bash
# DAPO (arXiv 2503.14476): clip-higher (0.2/0.28), dynamic sampling on accuracy, no KL, token-mean.
exec torchrun --nproc_per_node "${NPROC:-1}" train.py --clip_eps_low=0.2 --clip_eps_high=0.28 --dynamic_sampling=true --kl_coef=0 --loss_agg=token_mean "$@"
