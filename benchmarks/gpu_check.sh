#!/usr/bin/env bash
# One device session: the whole test suite on CUDA (every `device` test runs on cpu and cuda), then the
# GPU benchmarks. Run from the repo root on a machine with a GPU; logs go to $OUT (or benchmarks/results).
set -u
OUT=${OUT:-benchmarks/results}
export PYTHONUNBUFFERED=1 PYTHONPATH=. CI=true
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu_env.log"
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$OUT/gpu_env.log"
timeout 330 python -m pytest -q -x -p no:cacheprovider tests -k "not distributed and not pretrain_torchrun" 2>&1 | tee "$OUT/gpu_tests.log"
for b in bench_sinkhorn bench_loss bench_memory_bank bench_step; do
  [ -f "benchmarks/$b.py" ] && timeout 120 python "benchmarks/$b.py" --device cuda 2>&1 | tee "$OUT/gpu_$b.log"
done
