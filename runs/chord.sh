#!/usr/bin/env bash
# CHORD (arXiv 2508.11408, as in ms-swift): (1 - mu) * GRPO + mu * SFT on expert responses, mu from
# 0.9 decaying to 0.05, SFT tokens weighted by p (1 - p). --sft_data needs rows with a `response`
# field; synthetic/sft.parquet is the tiny default's.
exec torchrun --nproc_per_node "${NPROC:-1}" train.py --sft_data=synthetic/sft.parquet --chord_mu_peak=0.9 --chord_mu_valley=0.05 --chord_decay_steps=100 --chord_phi=true "$@"
