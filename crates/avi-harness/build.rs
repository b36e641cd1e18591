//! The shared link setup of `build/link_torch.rs`, and the git commit the
//! harness is built from (`AVI_GIT_COMMIT`, recorded in run reports'
//! provenance; absent outside a git checkout, where reports say `unknown`)
//! with whether the code had uncommitted changes (`AVI_GIT_DIRTY`).

#[path = "../../build/link_torch.rs"]
mod link_torch;

use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    if !out.status.success() {
        return None;
    }
    let s = String::from_utf8(out.stdout).ok()?.trim().to_string();
    (!s.is_empty()).then_some(s)
}

fn main() {
    link_torch::main();
    println!("cargo:rerun-if-env-changed=AVI_GIT_COMMIT");
    if let Some(commit) = git(&["rev-parse", "HEAD"]) {
        println!("cargo:rustc-env=AVI_GIT_COMMIT={commit}");
        // Whether the code differs from that commit (tracked changes under
        // crates/, build/ or the manifests): a binary built from an
        // uncommitted tree says so. Re-checked whenever that code changes.
        let out = Command::new("git")
            .args([
                "status",
                "--porcelain",
                "--untracked-files=no",
                "--",
                ":/crates",
                ":/build",
                ":/Cargo.toml",
                ":/Cargo.lock",
            ])
            .output();
        if let Ok(out) = out {
            if out.status.success() {
                let dirty = !out.stdout.is_empty();
                println!("cargo:rustc-env=AVI_GIT_DIRTY={}", u8::from(dirty));
            }
        }
        for path in [
            "../../crates",
            "../../build",
            "../../Cargo.toml",
            "../../Cargo.lock",
        ] {
            if std::path::Path::new(path).exists() {
                println!("cargo:rerun-if-changed={path}");
            }
        }
        // Rebuild when HEAD moves: HEAD itself, and the branch it names.
        for path in [
            git(&["rev-parse", "--git-path", "HEAD"]),
            git(&["symbolic-ref", "-q", "HEAD"])
                .and_then(|r| git(&["rev-parse", "--git-path", &r])),
        ]
        .into_iter()
        .flatten()
        {
            if std::path::Path::new(&path).exists() {
                println!("cargo:rerun-if-changed={path}");
            }
        }
    }
}
