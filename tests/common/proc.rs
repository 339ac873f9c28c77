//! Running the real `pumpwatch` binary from tests: output collected line by line as it
//! arrives, so a test can wait for "listening" instead of sleeping; killed on drop.

#![allow(dead_code)]

use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_pumpwatch")
}

pub struct Proc {
    child: Child,
    pub stdout: Arc<Mutex<Vec<String>>>,
    pub stderr: Arc<Mutex<Vec<String>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

fn collect<R: tokio::io::AsyncRead + Unpin + Send + 'static>(
    r: R,
    into: Arc<Mutex<Vec<String>>>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut lines = BufReader::new(r).lines();
        while let Ok(Some(l)) = lines.next_line().await {
            into.lock().unwrap().push(l);
        }
    })
}

/// Starts `pumpwatch <args>` with `PUMPWATCH_BROKER` unset and no config file.
pub fn spawn(args: &[&str]) -> Proc {
    let mut cmd = Command::new(bin());
    cmd.args(args)
        .env_remove("PUMPWATCH_BROKER")
        .env_remove("RUST_LOG")
        .current_dir(std::env::temp_dir())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd.spawn().expect("spawn pumpwatch");
    let stdout = Arc::new(Mutex::new(Vec::new()));
    let stderr = Arc::new(Mutex::new(Vec::new()));
    let tasks = vec![
        collect(child.stdout.take().unwrap(), stdout.clone()),
        collect(child.stderr.take().unwrap(), stderr.clone()),
    ];
    Proc {
        child,
        stdout,
        stderr,
        tasks,
    }
}

impl Proc {
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// True while the process has not exited.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    pub fn stdout_lines(&self) -> Vec<String> {
        self.stdout.lock().unwrap().clone()
    }

    pub fn stderr_text(&self) -> String {
        self.stderr.lock().unwrap().join("\n")
    }

    /// Waits until stderr has a line containing `text`.
    pub async fn wait_stderr(&self, text: &str, deadline: Duration) {
        let err = self.stderr.clone();
        let what = format!("stderr line containing {text:?}");
        super::wait_until(&what, deadline, || {
            let found = err.lock().unwrap().iter().any(|l| l.contains(text));
            async move { found }
        })
        .await;
    }

    /// Waits until stdout has at least `n` lines.
    pub async fn wait_stdout_lines(&self, n: usize, deadline: Duration) {
        let out = self.stdout.clone();
        super::wait_until(&format!("{n} lines on stdout"), deadline, || {
            let len = out.lock().unwrap().len();
            async move { len >= n }
        })
        .await;
    }

    /// Waits for exit; returns (exit code, stdout lines, stderr text).
    pub async fn finish(mut self, deadline: Duration) -> (i32, Vec<String>, String) {
        let status = match tokio::time::timeout(deadline, self.child.wait()).await {
            Ok(s) => s.expect("wait pumpwatch"),
            Err(_) => {
                let _ = self.child.kill().await;
                panic!(
                    "pumpwatch did not exit within {deadline:?}; stderr:\n{}",
                    self.stderr_text()
                );
            }
        };
        for t in self.tasks.drain(..) {
            let _ = t.await;
        }
        let out = self.stdout_lines();
        (status.code().unwrap_or(-1), out, self.stderr_text())
    }

    /// Sends a signal (e.g. libc SIGTERM = 15) by pid.
    pub fn signal(&self, sig: &str) {
        if let Some(pid) = self.pid() {
            let _ = std::process::Command::new("kill")
                .args([&format!("-{sig}"), &pid.to_string()])
                .status();
        }
    }
}

/// Runs `pumpwatch <args>` to completion.
pub async fn run(args: &[&str], deadline: Duration) -> (i32, Vec<String>, String) {
    spawn(args).finish(deadline).await
}
