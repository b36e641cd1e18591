//! Shared build script of every avi package that produces executables (the
//! `avi` binary, unit-test and integration-test executables, benchmarks).
//!
//! 1. Bakes the libtorch library folder into the executables' run path, so
//!    that `target/release/avi` and `cargo test` run without
//!    `LD_LIBRARY_PATH`.
//! 2. Links `libtorch_cuda.so` with `--no-as-needed` when the libtorch has it.
//!    Nothing in avi references a CUDA symbol directly, so with the default
//!    `--as-needed` the linker drops the library and CUDA is silently absent
//!    at run time (tch-rs issue #907).
//!
//! The folder comes from torch-sys (`links = "tch"`), which exports it as
//! `DEP_TCH_LIBTORCH_LIB` to the build scripts of its direct dependents.

use std::env;
use std::path::Path;

pub fn main() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    let Ok(lib) = env::var("DEP_TCH_LIBTORCH_LIB") else {
        // doc-only builds and exotic setups: nothing to add.
        return;
    };
    let os = env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    if os != "linux" && os != "macos" {
        return;
    }
    println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
    if os == "linux" && Path::new(&lib).join("libtorch_cuda.so").exists() {
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
        println!("cargo:rustc-link-arg=-L{lib}");
        println!("cargo:rustc-link-arg=-ltorch_cuda");
        println!("cargo:rustc-link-arg=-Wl,--as-needed");
    }
}
