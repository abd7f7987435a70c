#!/usr/bin/env bash
# One device session: the Sinkhorn GPU benchmark, every CUDA-parametrised test (`-k cuda`; the CPU
# variants run in CI), then the other GPU benchmarks. Run from the repo root on a machine with a
# GPU; logs go to $OUT (default benchmarks/results). Each step has its own time limit.
set -u
OUT=${OUT:-benchmarks/results}
export PYTHONUNBUFFERED=1 PYTHONPATH=. CI=true
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python -c "import torch, sys; print(sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda)"
} 2>&1 | tee "$OUT/gpu_env.log"
timeout 150 python benchmarks/bench_sinkhorn.py --device cuda --min-run-time 1 --profile 2>&1 | tee "$OUT/gpu_bench_sinkhorn.log"
timeout 200 python -m pytest -q -p no:cacheprovider -rs -k cuda tests 2>&1 | tee "$OUT/gpu_tests.log"
timeout 60 python benchmarks/bench_loss.py --device cuda --min-run-time 1 2>&1 | tee "$OUT/gpu_bench_loss.log"
timeout 30 python benchmarks/bench_memory_bank.py --device cuda 2>&1 | tee "$OUT/gpu_bench_memory_bank.log"
timeout 60 python benchmarks/bench_step.py --device cuda --min-run-time 0.5 2>&1 | tee "$OUT/gpu_bench_step.log"
