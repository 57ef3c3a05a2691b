#!/usr/bin/env bash
# The seed's GRPO (EasyR1 Geometry3K config = train.py's defaults): n=5, lr 1e-6, k3 KL in the loss at
# 1e-2, clip 0.2/0.3 with dual clip 3, token-mean. Add model/data flags, e.g.
#   NPROC=4 bash runs/grpo.sh --model_path=Qwen/Qwen2.5-VL-7B-Instruct --train_data=hiyouga/geometry3k@train --val_data=hiyouga/geometry3k@test
exec torchrun --nproc_per_node "${NPROC:-1}" train.py "$@"
