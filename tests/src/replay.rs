//! Driving `iomt replay` from tests: its command line, its checkpoint, and runs that can be
//! killed.

use std::ffi::OsString;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Instant;

use serde_json::Value;

use crate::golden::{Capture, capture_dir, read_json_lines};
use crate::iomt;

/// The FHIR tests reset the one server they share: one at a time.
static FHIR_SERVER: Mutex<()> = Mutex::new(());

pub fn serial() -> MutexGuard<'static, ()> {
    FHIR_SERVER.lock().unwrap_or_else(PoisonError::into_inner)
}

/// One `iomt replay` command line.
#[derive(Debug)]
pub struct Replay {
    pub input: PathBuf,
    pub state: PathBuf,
    pub out: PathBuf,
    pub fhir_url: Option<String>,
    /// Scratch working directory, so that no default path lands in the repository.
    pub cwd: PathBuf,
    /// More options.
    pub args: Vec<String>,
    /// Environment of the run (configuration overrides).
    pub env: Vec<(String, String)>,
}

impl Replay {
    pub fn new(capture: &Capture, dir: &Path) -> Self {
        Replay {
            input: capture.path.clone(),
            state: dir.join("state"),
            out: dir.join("out"),
            fhir_url: None,
            cwd: dir.to_owned(),
            args: Vec::new(),
            env: Vec::new(),
        }
    }

    pub fn fhir(mut self, url: &str) -> Self {
        self.fhir_url = Some(url.to_owned());
        self
    }

    pub fn command(&self) -> Command {
        let capture = capture_dir();
        let mut args: Vec<OsString> = vec![
            "replay".into(),
            self.input.clone().into(),
            "--device-mapping".into(),
            capture.join("devicecontent.json").into(),
            "--fhir-mapping".into(),
            capture.join("fhirmapping.json").into(),
            "--state-dir".into(),
            self.state.clone().into(),
            "--no-progress".into(),
        ];
        match &self.fhir_url {
            Some(url) => {
                args.extend(["--fhir-url".into(), url.into()]);
                args.extend(["--identity-mode".into(), "create".into()]);
            }
            None => args.extend(["--out".into(), self.out.clone().into()]),
        }
        args.extend(self.args.iter().map(OsString::from));
        let mut cmd = Command::new(iomt());
        cmd.args(args).current_dir(&self.cwd).stdin(Stdio::null());
        // Only this test configures the run.
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("IOMT") {
                cmd.env_remove(key);
            }
        }
        cmd.envs(self.env.iter().map(|(k, v)| (k, v)));
        cmd
    }

    pub fn run(&self) -> Output {
        let started = Instant::now();
        let output = self.command().output().expect("iomt runs");
        eprintln!(
            "iomt replay {} in {:.1} s ({})",
            self.fhir_url.as_deref().unwrap_or("NDJSON"),
            started.elapsed().as_secs_f64(),
            output.status
        );
        output
    }

    pub fn checkpoint(&self) -> Option<Checkpoint> {
        Checkpoint::read(&self.state.join("replay-checkpoint.json"))
    }

    pub fn dead_letters(&self) -> Vec<Value> {
        read_json_lines(&self.state.join("deadletter.jsonl"))
    }
}

pub fn assert_success(output: &Output) {
    assert_eq!(
        output.status.code(),
        Some(0),
        "iomt replay failed\nstdout:\n{}\nstderr:\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// The replay checkpoint file: how far the output is durable.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Checkpoint {
    /// Whether the replay finished.
    pub complete: bool,
    /// The last record whose output is durable.
    pub position: i64,
}

impl Checkpoint {
    pub fn read(path: &Path) -> Option<Self> {
        // Written atomically (rename), so whatever is there parses.
        let bytes = std::fs::read(path).ok()?;
        let value: Value = serde_json::from_slice(&bytes)
            .unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()));
        Some(Checkpoint {
            complete: value["complete"].as_bool().expect("complete"),
            position: value["partitions"]["0"].as_i64().unwrap_or(0),
        })
    }

    /// Whether a replay started now resumes after this checkpoint.
    pub fn resumes(self) -> bool {
        !self.complete && self.position > 0
    }
}

/// A running replay, its output going to files (a pipe nobody reads could block it).
#[derive(Debug)]
pub struct Running {
    child: Child,
    stderr: PathBuf,
}

impl Running {
    pub fn start(replay: &Replay, n: usize) -> Self {
        let stdout = replay.cwd.join(format!("run-{n}.stdout"));
        let stderr = replay.cwd.join(format!("run-{n}.stderr"));
        let child = replay
            .command()
            .stdout(File::create(&stdout).unwrap())
            .stderr(File::create(&stderr).unwrap())
            .spawn()
            .expect("iomt starts");
        Running { child, stderr }
    }

    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().unwrap()
    }

    /// SIGKILL: no drain, no final checkpoint. (It may have finished just before.)
    pub fn kill(mut self) -> (ExitStatus, String) {
        self.child.kill().unwrap();
        (self.child.wait().unwrap(), self.stderr())
    }

    pub fn wait(mut self) -> (ExitStatus, String) {
        (self.child.wait().unwrap(), self.stderr())
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.child.kill().ok();
            self.child.wait().ok();
        }
    }
}
