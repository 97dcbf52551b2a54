#!/usr/bin/env bash
# What machine this is, for the log and BENCHMARKS.md.
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv,noheader || exit 1
python3 - <<'PY'
import torch, triton
p = torch.cuda.get_device_properties(0)
print(f"@@ {p.name}, sm_{p.major}{p.minor}, {p.multi_processor_count} SMs; torch {torch.__version__}, triton {triton.__version__}")
PY
# the commit as given by the caller: a copy of the working tree sent to this machine may carry a stale .git, so
# `git rev-parse` here can name an older commit than the files are (seen 2026-11-26)
echo "@@ commit ${COMMIT:-unknown (pass COMMIT=<hash>, computed where the repository lives)}"
