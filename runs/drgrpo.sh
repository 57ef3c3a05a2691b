#!/usr/bin/env bash
# Dr.GRPO (arXiv 2503.20783): no std normalisation of advantages, sum over tokens divided by a
# constant (max_response_length), no KL.
exec torchrun --nproc_per_node "${NPROC:-1}" train.py --adv_std_norm=false --loss_agg=seq_mean_token_sum_norm --kl_coef=0 "$@"
