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
//! Both are done by `avi-build`, the helper that outside users call from
//! their own build script. Its source is included here as a module rather
//! than named as a build-dependency of every package: the same code, with no
//! manifest to change. These packages depend on `torch-sys` directly, so the
//! helper reads the folder torch-sys linked against, `DEP_TCH_LIBTORCH_LIB`,
//! and never asks python.

#[path = "../crates/avi-build/src/lib.rs"]
mod avi_build;

/// Emit the link arguments (see the module documentation).
pub fn main() {
    avi_build::link_libtorch();
}
