#!/usr/bin/env bash
# `just bench-amortization`: encoding 10^5 new saw observations with a fitted
# A-VI encoder (window [1, 0], the saw experiment's N = 1,000 and 30,000
# steps) against fitting F-VI to them. Usage:
#   benches/amortization/run.sh AVI AVI_AMORTIZATION OUT_DIR [--device cpu|cuda] [--threads T] [more avi-amortization args]
# Writes OUT_DIR/{fit.json, encoder/, encode-cli.json, result.json, cli.json}.
set -euo pipefail
avi=${1:?path of avi}; bench=${2:?path of avi-amortization}; out=${3:?output folder}; shift 3
device=cpu; threads=1; rest=()
while [ $# -gt 0 ]; do
    case "$1" in
        --device) device=$2; shift 2 ;;
        --threads) threads=$2; shift 2 ;;
        *) rest+=("$1"); shift ;;
    esac
done
here=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$out"
rm -rf "$out/encoder"
now() { date +%s.%N; }
# 1. Fit and save the encoder (the CLI, as a user would).
t0=$(now)
"$avi" --threads "$threads" fit --config "$here/saw-avi.json" --save "$out/encoder" \
    --out "$out/fit.json" --device "$device" --quiet
t1=$(now)
# 2. Encode the 10^5 new observations with the CLI: process start, loading,
#    simulating the data, the forward pass and the held-out ELBO (1,000 draws).
"$avi" --threads "$threads" encode --fitted "$out/encoder" --data "$here/new-data.json" \
    --out "$out/encode-cli.json" --device "$device"
t2=$(now)
python3 - "$out/cli.json" "$t0" "$t1" "$t2" <<'PY'
import json, os, sys
path, t0, t1, t2 = sys.argv[1], *map(float, sys.argv[2:])
tmp = path + ".tmp"
with open(tmp, "w") as f:
    json.dump({"avi_fit_save_wall_seconds": t1 - t0, "avi_encode_wall_seconds": t2 - t1}, f, indent=2)
    f.write("\n")
    f.flush()
    os.fsync(f.fileno())
os.replace(tmp, path)
PY
# 3. The library calls, timed inside one process, and F-VI on the same data.
"$bench" --fitted "$out/encoder" --device "$device" --threads "$threads" \
    --out "$out/result.json" "${rest[@]}" > /dev/null
python3 - "$out" <<'PY'
import json, sys
d = sys.argv[1]
r = json.load(open(f"{d}/result.json")); c = json.load(open(f"{d}/cli.json"))
fit = json.load(open(f"{d}/fit.json"))
f, e, v = r["forward"], r["encode"], r["fvi"]
print(f"device {r['device']}, {r['threads']} thread(s), N' = {r['n_new']}")
print(f"encoder training (avi fit --save, N = 1,000, 30,000 steps): {fit['seconds']:.1f} s fitting, {c['avi_fit_save_wall_seconds']:.1f} s wall")
print(f"forward pass: {1e3 * f['seconds_median']:.2f} ms (median of {f['repeats']}), {f['observations_per_second']:.3g} observations/s, {f['elements_per_second']:.3g} elements/s ({f['elements_are']}); copying the output: {f['output_copy_elements_per_second']:.3g} elements/s")
print(f"encode (library, with the 1,000-draw held-out ELBO): {e['seconds']:.2f} s; avi encode (CLI, process and all): {c['avi_encode_wall_seconds']:.2f} s")
print(f"F-VI: {v['seconds']:.1f} s for {v['steps']} steps; within 1% of the optimum at step {v['iterations_to_1pct']} ({v['seconds_to_1pct']} s)")
print(f"full ELBO on the new data: exact optimum {r['exact_optimum_elbo']:.1f}; encoder {e['full_elbo']:.1f} ± {e['full_elbo_se']:.1f} (gap {e['gap_to_optimum']:.1f}); F-VI {v['full_elbo']:.1f} ± {v['full_elbo_se']:.1f} (gap {v['gap_to_optimum']:.1f})")
ratio = r["ratio"]
print(f"F-VI time / forward pass: {ratio['fvi_seconds_over_forward']:.3g}; to 1%: {ratio['fvi_seconds_to_1pct_over_forward']}; F-VI / encode: {ratio['fvi_seconds_over_encode']:.3g}")
PY
