#!/usr/bin/env bash
# The GPU measurements of the performance issue in one device call:
#   bash benches/gpu/device-check.sh BIN_DIR OUT_DIR [SECTIONS]
# BIN_DIR holds avi, avi-step-time and the CUDA test executables built on a
# development machine (`just gpu-bundle`); OUT_DIR receives at most eight
# files. SECTIONS (comma-separated, default all, run in this order): tests
# (the CUDA tests), bandwidth (copy bandwidth and the F-VI floor), sweep
# (N sweep, every engine), sweep-fvi (N sweep of F-VI only), compare
# (bench-compare on CUDA), reproduce (quick saw with the torch and graph
# engines), moonshot (the first seed of each of the paper's four full-size
# experiments with the graph engine, MOONSHOT_JOBS runs at once, default 4:
# a tenth of the paper's grid, timed per experiment; not in the default list).
set -uo pipefail
BIN=$(cd "${1:?BIN_DIR}" && pwd)
OUT=$(mkdir -p "${2:?OUT_DIR}" && cd "$2" && pwd)
SECTIONS=",${3:-tests,bandwidth,sweep,compare,reproduce},"
WORK=$(mktemp -d)
TORCH_LIB=$(python3 -c 'import torch,os;print(os.path.dirname(torch.__file__))')/lib
export LD_LIBRARY_PATH=$TORCH_LIB:${LD_LIBRARY_PATH:-}
export PYTHONUNBUFFERED=1
log() { echo "[$(date +%T)] $*"; }
want() { [[ $SECTIONS == *",$1,"* ]]; }
{
log "gpu"; nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv
log "probe: does avi see CUDA?"
"$BIN/avi-step-time" --model saw --method fvi --device cuda --iters 5 --repeats 1 --warmup 2 || { log "no CUDA in avi"; exit 1; }
if want tests; then
  for t in graph_engine cuda_fused lr_schedule; do
    log "test $t (CUDA)"
    "$BIN/$t" --include-ignored 2>&1 | grep -E "^test |panicked|assert|result" | head -30
  done
fi
if want bandwidth; then
  log "bandwidth"
  python3 benches/gpu/bandwidth.py --out "$OUT/bandwidth.json"
fi
if want sweep || want sweep-fvi; then
  log "N sweep (cuda)"
  methods=fvi,avi; want sweep || methods=fvi
  python3 benches/sweep.py --device cuda --step-time "$BIN/avi-step-time" --out "$WORK/sweep" \
      --budget-s 0.1 --methods "$methods"
  cp "$WORK/sweep/results.json" "$OUT/sweep-results.json"; cp "$WORK/sweep/table.md" "$OUT/sweep-table.md"
fi
if want compare; then
  log "bench-compare (cuda)"
  python3 benches/compare/run.py --device cuda --peers torch,jax,numpyro --step-time "$BIN/avi-step-time" \
      --out "$WORK/compare" --check-estimates 20 2>&1 | grep -v '^  \$'
  cp "$WORK/compare/results.json" "$OUT/compare-results.json"; cp "$WORK/compare/table.md" "$OUT/compare-table.md"
fi
if want reproduce; then
  for engine in torch graph; do
    log "reproduce saw --quick --engine $engine (cuda)"
    t0=$(date +%s.%N)
    "$BIN/avi" reproduce saw --quick --device cuda --engine "$engine" \
        --quiet --out "$WORK/reproduce-$engine" 2>&1 | tail -3
    python3 -c "import sys,time; print(f\"wall {time.time() - float(sys.argv[1]):.1f} s\")" "$t0"
  done
  tar -C "$WORK" -czf "$OUT/reproduce.tar.gz" reproduce-torch reproduce-graph 2>/dev/null
fi
if want moonshot; then
  # The first of the ten seeds of each of the paper's four experiments at
  # full size: the paper's grid takes about ten times the total (the seeds
  # of an experiment are alike).
  mkdir -p "$WORK/moonshot"; : > "$WORK/moonshot/times.txt"
  for e in linear saw nonlinear bnn; do
    log "moonshot: $e, first seed, --engine graph --jobs ${MOONSHOT_JOBS:-4} (cuda)"
    t0=$(date +%s.%N)
    "$BIN/avi" reproduce "$e" --seeds 1 --device cuda --engine graph --jobs "${MOONSHOT_JOBS:-4}" \
        --quiet --out "$WORK/moonshot" 2>&1 | tail -3
    python3 -c "import sys,time; print(f'{sys.argv[2]} {time.time() - float(sys.argv[1]):.1f} s')" "$t0" "$e" \
        | tee -a "$WORK/moonshot/times.txt"
  done
  # Summaries and reports only: the run reports (traces) are large.
  (cd "$WORK" && tar -czf "$OUT/moonshot.tar.gz" --exclude='runs' moonshot) 2>/dev/null
fi
log "done"
} 2>&1 | tee "$OUT/log.txt"
