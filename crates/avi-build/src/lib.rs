//! # avi-build
//!
//! A build-script helper for packages that use `avi-models` / `avi-inference`
//! (or `tch`) and produce executables: it bakes the libtorch library folder
//! into the executables' run path, so they start without `LD_LIBRARY_PATH`.
//!
//! ```toml
//! [build-dependencies]
//! avi-build = { path = "…/crates/avi-build" }
//! ```
//!
//! ```ignore
//! // build.rs
//! fn main() {
//!     avi_build::link_libtorch();
//! }
//! ```
//!
//! Why a helper: cargo applies `cargo:rustc-link-arg` only to the package
//! whose build script prints it, so torch-sys (or avi) cannot set the run
//! path of *your* binary; your own build script must.
//!
//! Where the folder comes from, first match wins:
//!
//! 1. `DEP_TCH_LIBTORCH_LIB`: the folder torch-sys linked against, exported
//!    by torch-sys (`links = "tch"`) to the build scripts of packages that
//!    depend on `torch-sys` *directly* (the avi workspace's own packages do).
//!    Exact, but invisible to everyone else.
//! 2. Otherwise the search of torch-sys 0.24's build script, redone: with
//!    `LIBTORCH_USE_PYTORCH` set, ask `python` (when `VIRTUAL_ENV` is set,
//!    else `python3`) in `PATH` for torch's library folder
//!    (`torch.utils.cpp_extension.library_paths()`, the last entry, as
//!    torch-sys does); else `$LIBTORCH_LIB/lib` or `$LIBTORCH/lib`. Both
//!    build scripts run in the same cargo invocation's environment, so they
//!    find the same folder. (A libtorch in `/usr/lib` needs no run path; one
//!    that torch-sys downloaded into its own build folder is not found: set
//!    `LIBTORCH` instead.)
//!
//! When nothing is found the helper prints a cargo warning and adds nothing:
//! the build still succeeds, and the binary then needs `LD_LIBRARY_PATH`.
//!
//! On Linux it also links `libtorch_cuda.so` with `--no-as-needed` when that
//! library is present: nothing references a CUDA symbol directly, so with the
//! default `--as-needed` the linker drops it and CUDA is silently unavailable
//! at run time (tch-rs issue #907). On macOS the run path is added the same
//! way (`-Wl,-rpath,` is understood by Apple's linker); other systems get
//! nothing.
//!
//! std only: no dependency is compiled for the build script.

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The environment variables that decide the folder (each is printed as
/// `cargo:rerun-if-env-changed`).
const ENV_VARS: &[&str] = &[
    "DEP_TCH_LIBTORCH_LIB",
    "LIBTORCH_USE_PYTORCH",
    "LIBTORCH",
    "LIBTORCH_LIB",
    "VIRTUAL_ENV",
];

/// torch-sys's question to python, reduced to the library folders.
const PYTHON_LIB_PATHS: &str = "from torch.utils import cpp_extension\n\
for p in cpp_extension.library_paths():\n    print('LIBTORCH_LIB:', p)\n";

/// Call from `build.rs`: add the libtorch library folder to the run path of
/// this package's executables (binaries, tests, examples, benchmarks) and,
/// on Linux, keep `libtorch_cuda.so` linked when present. Returns the folder,
/// or `None` (after a cargo warning) when it was not found.
pub fn link_libtorch() -> Option<PathBuf> {
    for var in ENV_VARS {
        println!("cargo:rerun-if-env-changed={var}");
    }
    let os = env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    if os != "linux" && os != "macos" {
        return None;
    }
    let Some(lib) = libtorch_lib_dir() else {
        println!(
            "cargo:warning=avi-build: libtorch's library folder was not found (set LIBTORCH, \
             or LIBTORCH_USE_PYTORCH=1 with torch's python in PATH); executables will need \
             LD_LIBRARY_PATH"
        );
        return None;
    };
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
    if os == "linux" && lib.join("libtorch_cuda.so").exists() {
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
        println!("cargo:rustc-link-arg=-L{}", lib.display());
        println!("cargo:rustc-link-arg=-ltorch_cuda");
        println!("cargo:rustc-link-arg=-Wl,--as-needed");
    }
    Some(lib)
}

/// The libtorch library folder, found as described in the crate docs,
/// without printing anything.
pub fn libtorch_lib_dir() -> Option<PathBuf> {
    if let Some(lib) = env::var_os("DEP_TCH_LIBTORCH_LIB") {
        return Some(PathBuf::from(lib));
    }
    if env::var_os("LIBTORCH_USE_PYTORCH").is_some() {
        return python_lib_dir();
    }
    let root = env::var_os("LIBTORCH_LIB").or_else(|| env::var_os("LIBTORCH"))?;
    let lib = Path::new(&root).join("lib");
    lib.is_dir().then_some(lib)
}

/// torch's library folder as the python torch-sys runs reports it.
fn python_lib_dir() -> Option<PathBuf> {
    let python = if env::var_os("VIRTUAL_ENV").is_some() {
        "python"
    } else {
        "python3"
    };
    let out = Command::new(python)
        .arg("-c")
        .arg(PYTHON_LIB_PATHS)
        .output()
        .ok()?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.strip_prefix("LIBTORCH_LIB: "))
        .next_back()
        .map(PathBuf::from)
}
