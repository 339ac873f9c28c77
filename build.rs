//! Puts the git commit of the build into `pumpwatch --version` (`PUMPWATCH_GIT_COMMIT`):
//! `git rev-parse --short HEAD`, or "unknown" outside a git checkout (a source tarball,
//! `cargo install` from a copy) or without git.

use std::path::Path;
use std::process::Command;

fn main() {
    let commit = Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown".to_owned());
    println!("cargo:rustc-env=PUMPWATCH_GIT_COMMIT={commit}");
    // Rebuild when HEAD moves: HEAD itself (a checkout) and the branch it points to (a
    // commit). In a worktree `.git` is a file naming the real git dir.
    if let Some(git_dir) = git_dir() {
        let head = git_dir.join("HEAD");
        watch(&head);
        if let Ok(text) = std::fs::read_to_string(&head)
            && let Some(r) = text.strip_prefix("ref: ")
        {
            let r = r.trim();
            // A branch's ref lives in the common dir of a worktree.
            let common = std::fs::read_to_string(git_dir.join("commondir"))
                .map(|c| git_dir.join(c.trim()))
                .unwrap_or_else(|_| git_dir.clone());
            watch(&common.join(r));
            watch(&common.join("packed-refs"));
        }
    }
    println!("cargo:rerun-if-changed=build.rs");
}

/// Only paths that exist: cargo reruns a build script on every build while a watched path
/// is missing (a branch whose ref is packed has no file of its own).
fn watch(path: &Path) {
    if path.exists() {
        println!("cargo:rerun-if-changed={}", path.display());
    }
}

fn git_dir() -> Option<std::path::PathBuf> {
    let dot = Path::new(".git");
    if dot.is_dir() {
        return Some(dot.to_path_buf());
    }
    let text = std::fs::read_to_string(dot).ok()?;
    let dir = text.strip_prefix("gitdir: ")?.trim();
    Some(Path::new(dir).to_path_buf())
}
