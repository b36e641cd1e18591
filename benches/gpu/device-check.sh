#!/usr/bin/env bash
# The GPU measurements of the performance issue in one device call:
#   bash benches/gpu/device-check.sh BIN_DIR OUT_DIR
# BIN_DIR holds avi, avi-step-time and the graph_engine test executable built
# on a development machine (see `just gpu-bundle`); OUT_DIR receives at most
# eight files: the logs, the bandwidth floor, bench-compare and the N sweep
# on CUDA, and a tarball of the quick reproductions on CUDA.
set -uo pipefail
BIN=$(cd "${1:?BIN_DIR}" && pwd)
OUT=$(mkdir -p "${2:?OUT_DIR}" && cd "$2" && pwd)
WORK=$(mktemp -d)
TORCH_LIB=$(python3 -c 'import torch,os;print(os.path.dirname(torch.__file__))')/lib
export LD_LIBRARY_PATH=$TORCH_LIB:${LD_LIBRARY_PATH:-}
export PYTHONUNBUFFERED=1
log() { echo "[$(date +%T)] $*"; }
{
log "gpu"; nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv
log "probe: does avi see CUDA?"
"$BIN/avi-step-time" --model saw --method fvi --device cuda --iters 5 --repeats 1 --warmup 2 || { log "no CUDA in avi"; exit 1; }
log "graph test (CUDA)"
"$BIN/graph_engine" --ignored --nocapture 2>&1 | tail -15
log "bandwidth"
python3 benches/gpu/bandwidth.py --out "$OUT/bandwidth.json"
log "bench-compare (cuda)"
python3 benches/compare/run.py --device cuda --peers torch,jax,numpyro --step-time "$BIN/avi-step-time" \
    --out "$WORK/compare" --check-estimates 30 2>&1 | grep -v '^  \$'
cp "$WORK/compare/results.json" "$OUT/compare-results.json"; cp "$WORK/compare/table.md" "$OUT/compare-table.md"
log "N sweep (cuda)"
python3 benches/sweep.py --device cuda --step-time "$BIN/avi-step-time" --out "$WORK/sweep" --budget-s 0.1
cp "$WORK/sweep/results.json" "$OUT/sweep-results.json"; cp "$WORK/sweep/table.md" "$OUT/sweep-table.md"
for engine in torch graph; do
  for exp in saw; do
    log "reproduce $exp --quick --engine $engine (cuda)"
    t0=$(date +%s.%N)
    "$BIN/avi" reproduce "$exp" --quick --device cuda --engine "$engine" \
        --quiet --out "$WORK/reproduce-$engine" 2>&1 | tail -3
    python3 -c "import sys,time; print(f\"wall {time.time() - float(sys.argv[1]):.1f} s\")" "$t0"
  done
done
tar -C "$WORK" -czf "$OUT/reproduce.tar.gz" reproduce-torch reproduce-graph 2>/dev/null
log "done"
} 2>&1 | tee "$OUT/log.txt"
