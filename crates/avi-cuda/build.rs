//! Compiles `csrc/shim.cpp` against the libtorch that torch-sys found
//! (`DEP_TCH_LIBTORCH_LIB`). CUDA graphs are compiled in when that libtorch
//! has `libtorch_cuda.so` and the CUDA runtime headers are found (the
//! `nvidia/cu*/include` folder of a PyPI torch, `$CUDA_HOME/include` or
//! `/usr/local/cuda/include`, with the `crt/` headers that PyPI ships as
//! `nvidia-cuda-crt`); otherwise the graph functions report that
//! they are unavailable and everything else works.

use std::env;
use std::path::{Path, PathBuf};

fn cuda_include(lib: &Path) -> Option<PathBuf> {
    let mut candidates = Vec::new();
    // PyPI torch: site-packages/torch/lib → site-packages/nvidia/cu*/include
    if let Some(site) = lib.parent().and_then(Path::parent) {
        if let Ok(entries) = std::fs::read_dir(site.join("nvidia")) {
            let mut dirs: Vec<PathBuf> = entries
                .filter_map(|e| e.ok().map(|e| e.path().join("include")))
                .collect();
            dirs.sort();
            candidates.extend(dirs.into_iter().rev());
        }
        candidates.push(site.join("nvidia/cuda_runtime/include"));
    }
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Ok(home) = env::var(var) {
            candidates.push(PathBuf::from(home).join("include"));
        }
    }
    candidates.push(PathBuf::from("/usr/local/cuda/include"));
    candidates
        .into_iter()
        .find(|d| d.join("cuda_runtime.h").exists() && d.join("crt/host_config.h").exists())
}

fn main() {
    println!("cargo:rerun-if-changed=csrc/shim.cpp");
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    println!("cargo:rerun-if-env-changed=CUDA_HOME");
    println!("cargo:rerun-if-env-changed=AVI_CXX11_ABI");
    let lib = PathBuf::from(
        env::var("DEP_TCH_LIBTORCH_LIB").expect("torch-sys exports the libtorch folder"),
    );
    let root = lib.parent().expect("libtorch lib folder has a parent");
    let mut build = cc::Build::new();
    build
        .cpp(true)
        .file("csrc/shim.cpp")
        .include(root.join("include"))
        .include(root.join("include/torch/csrc/api/include"))
        .flag_if_supported("-std=c++17")
        .flag_if_supported("/std:c++17")
        .define(
            "_GLIBCXX_USE_CXX11_ABI",
            env::var("AVI_CXX11_ABI")
                .unwrap_or_else(|_| "1".into())
                .as_str(),
        )
        .define("GLOG_USE_GLOG_EXPORT", None)
        // no debug info: the libtorch headers make it slow to build and large
        .debug(false)
        .warnings(false);
    let has_cuda_lib = lib.join("libtorch_cuda.so").exists() && lib.join("libc10_cuda.so").exists();
    let graphs = match (has_cuda_lib, cuda_include(&lib)) {
        (true, Some(inc)) => {
            build.include(inc).define("AVI_CUDA_GRAPHS", None);
            true
        }
        _ => false,
    };
    build.compile("avi_cuda_shim");
    println!("cargo:rustc-link-search=native={}", lib.display());
    // this crate's own test executable finds libtorch without LD_LIBRARY_PATH
    // (the other crates do the same through build/link_torch.rs)
    if env::var("CARGO_CFG_TARGET_OS").as_deref() == Ok("linux") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
    }
    println!("cargo:rustc-link-lib=dylib=torch_cpu");
    println!("cargo:rustc-link-lib=dylib=c10");
    if graphs {
        println!("cargo:rustc-link-lib=dylib=torch_cuda");
        println!("cargo:rustc-link-lib=dylib=c10_cuda");
        println!("cargo:rustc-cfg=avi_cuda_graphs");
    }
    println!("cargo:rustc-check-cfg=cfg(avi_cuda_graphs)");
}
