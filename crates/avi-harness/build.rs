//! The shared link setup of `build/link_torch.rs`, and the git commit the
//! harness is built from (`AVI_GIT_COMMIT`, recorded in run reports'
//! provenance; absent outside a git checkout, where reports say `unknown`).

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
