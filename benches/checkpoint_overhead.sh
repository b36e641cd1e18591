#!/usr/bin/env bash
# The cost of checkpoints (`"checkpoint": {"every": 1000}`) at the paper's
# sizes: the same fit with and without checkpoints, alternating, REPS times
# each, on one machine in one run. A checkpoint is written on the training
# thread but off the trace's clock (the report's `seconds`), so the time a
# process spends outside the optimisation, `outside = wall − seconds`
# (start-up, data, final evaluation, and with checkpoints their writing),
# isolates the writes from the (on a shared machine, noisy) steps:
#
#   per checkpoint = (median outside with − median outside without) / checkpoints
#   ratio          = per checkpoint / (median time of 1,000 steps)
#
# The plain difference of wall times is printed too. Usage:
#
#   benches/checkpoint_overhead.sh [AVI_BINARY] [REPS]
#
# (default: target/debug/avi of $CARGO_TARGET_DIR, which this workspace
# builds optimised; 3 repetitions). Prints one line per problem.
set -euo pipefail
avi=${1:-${CARGO_TARGET_DIR:-target}/debug/avi}
reps=${2:-3}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# name, engine, model, data, method, steps, lr
problems=(
  'saw-avi-i2k10|torch|{"kind": "saw", "alpha": 0.75, "x0": 0}|{"simulate": {"n": 1000, "seed": 2012, "theta": [3.4159]}}|{"kind": "avi", "fn": {"kind": "mlp", "width": 10}, "window": [1, 0]}|5000|0.001'
  'saw-avi-i2k10-fused|fused|{"kind": "saw", "alpha": 0.75, "x0": 0}|{"simulate": {"n": 1000, "seed": 2012, "theta": [3.4159]}}|{"kind": "avi", "fn": {"kind": "mlp", "width": 10}, "window": [1, 0]}|5000|0.001'
  'nonlinear-fvi-fused|fused|{"kind": "nonlinear"}|{"simulate": {"n": 10000, "seed": 1789}}|{"kind": "fvi"}|2000|0.01'
)

for p in "${problems[@]}"; do
  IFS='|' read -r name engine model data method steps lr <<<"$p"
  for variant in plain ckpt; do
    extra=''
    [[ $variant == ckpt ]] && extra=', "checkpoint": {"every": 1000}'
    cat >"$work/$name-$variant.json" <<EOF
{"model": $model, "data": $data, "method": $method, "steps": $steps, "lr": $lr,
 "draws": 100, "eval_draws": 1000, "dtype": "f32", "seed": 2013,
 "engine": "$engine", "report_q_z": false$extra}
EOF
  done
  walls_plain=(); walls_ckpt=(); secs_plain=(); secs_ckpt=()
  for ((r = 0; r < reps; r++)); do
    for variant in plain ckpt; do
      rm -rf "$work/save"
      save=()
      [[ $variant == ckpt ]] && save=(--save "$work/save")
      t0=$(date +%s.%N)
      "$avi" --threads 1 fit --config "$work/$name-$variant.json" --out "$work/r.json" \
        --device cpu --quiet "${save[@]}" >/dev/null
      t1=$(date +%s.%N)
      wall=$(python3 -c "print($t1 - $t0)")
      secs=$(python3 -c "import json; print(json.load(open('$work/r.json'))['seconds'])")
      if [[ $variant == plain ]]; then
        walls_plain+=("$wall"); secs_plain+=("$secs")
      else
        walls_ckpt+=("$wall"); secs_ckpt+=("$secs")
      fi
    done
  done
  python3 - "$name" "$steps" "${walls_plain[*]}" "${walls_ckpt[*]}" "${secs_plain[*]}" "${secs_ckpt[*]}" <<'EOF'
import statistics as st, sys
name, steps = sys.argv[1], int(sys.argv[2])
wp, wc, sp, sc = ([float(v) for v in a.split()] for a in sys.argv[3:7])
n = steps // 1000
k_steps = st.median(sp + sc) / steps * 1000
outside_p = [w - s for w, s in zip(wp, sp)]
outside_c = [w - s for w, s in zip(wc, sc)]
per = (st.median(outside_c) - st.median(outside_p)) / n
per_wall = (st.median(wc) - st.median(wp)) / n
print(f"{name}: 1,000 steps {k_steps:.3f} s; outside the optimisation {st.median(outside_p):.3f} s without, "
      f"{st.median(outside_c):.3f} s with {n} checkpoints: {per * 1000:.1f} ms per checkpoint = "
      f"{100 * per / k_steps:.2f} % of 1,000 steps (wall medians {st.median(wp):.2f} / {st.median(wc):.2f} s: "
      f"{100 * per_wall / k_steps:+.1f} %)")
EOF
done
