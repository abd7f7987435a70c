#!/usr/bin/env bash
# The four CPU benchmarks into one log (default benchmarks/results/cpu.log). Run from anywhere, on a
# quiet machine: every ratio is against a baseline timed in the same run, but a busy neighbour still
# adds noise. BASE=REV also runs bench_sinkhorn and bench_loss of commit REV first (a git worktree),
# for before/after ratios from one sitting.
set -u
cd "$(dirname "$0")/.."
LOG=${LOG:-benchmarks/results/cpu.log}
export PYTHONUNBUFFERED=1
quiet() { grep -v -e "Failed to initialize NumPy" -e "_conversion_method_template"; }
{
  if [ -n "${BASE:-}" ]; then
    tree=$(mktemp -d)/base && git worktree add -q --detach "$tree" "$BASE"
    for b in sinkhorn loss; do
      echo "### bench_$b at $BASE (before)"; (cd "$tree" && PYTHONPATH=. python benchmarks/bench_$b.py) 2>&1 | quiet; echo
    done
    git worktree remove --force "$tree"
  fi
  for b in sinkhorn loss memory_bank step; do
    echo "### bench_$b"; PYTHONPATH=. python benchmarks/bench_$b.py 2>&1 | quiet; echo
  done
} | tee "$LOG"
