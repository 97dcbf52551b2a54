#!/usr/bin/env bash
# In-run baselines: copy bandwidth (-> HBM floor) and Hugging Face Mamba-130M decode.
python3 -m memmamba_deploy.bench_baselines
