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

/// What a campaign of kills did.
#[derive(Debug, Default)]
pub struct Campaign {
    /// Runs started.
    pub runs: usize,
    /// Runs killed with SIGKILL.
    pub killed: usize,
    /// Runs that resumed after a checkpoint.
    pub resumed: usize,
    /// Events read over all runs (the killed ones as their metrics said just before the kill).
    pub events_read: u64,
}

/// Kills `replay` with SIGKILL `kills` times, each time at a random moment up to `max_delay`
/// after its checkpoint moved (so that part of the output is durable and part is not, and the
/// next run resumes), then lets it finish. The checkpoint is committed every 100 ms rather than every 2 s, as
/// otherwise it moves only at the very end of a run this short. A run that finishes before its
/// kill makes the next one be killed sooner; after `2 × kills + 3` runs it is left to finish.
/// Each run serves `/metrics`, read just before its kill, to count the events read twice.
pub fn kill_campaign(
    replay: &mut Replay,
    kills: usize,
    max_delay: std::time::Duration,
    rng: &mut fastrand::Rng,
) -> Campaign {
    replay
        .env
        .push(("IOMT__PIPELINE__CHECKPOINT_INTERVAL".into(), "100ms".into()));
    replay.args.extend(["--summary".into(), "json".into()]);
    let mut max_delay = max_delay;
    let mut c = Campaign::default();
    loop {
        c.runs += 1;
        let port = free_port();
        replay
            .env
            .retain(|(k, _)| k != "IOMT__OUTPUT__METRICS_ADDR");
        replay.env.push((
            "IOMT__OUTPUT__METRICS_ADDR".into(),
            format!("127.0.0.1:{port}"),
        ));
        let before = replay.checkpoint();
        let resumes = before.is_some_and(Checkpoint::resumes);
        let from = before.filter(|c| c.resumes()).map_or(0, |c| c.position);
        let mut run = Running::start(replay, c.runs);
        let started = Instant::now();
        let kill = c.killed < kills && c.runs <= 2 * kills + 3;
        let mut status = None;
        let mut read = 0;
        if kill {
            // Wait for the checkpoint to move past where this run started, then a random delay.
            let moved = |c: Checkpoint| !c.complete && c.position > from;
            while status.is_none() && !replay.checkpoint().is_some_and(moved) {
                let waited = started.elapsed();
                assert!(
                    waited < std::time::Duration::from_secs(300),
                    "run {}: no progress",
                    c.runs
                );
                std::thread::sleep(std::time::Duration::from_millis(5));
                status = run.exited();
            }
            let until = Instant::now() + max_delay.mul_f64(rng.f64());
            while status.is_none() && Instant::now() < until {
                std::thread::sleep(std::time::Duration::from_millis(5));
                status = run.exited();
            }
            if status.is_none() {
                read = events_read(port).unwrap_or(0);
            }
        }
        let (status, stderr) = match status {
            Some(status) => (status, run.stderr()),
            None if kill => run.kill(),
            None => run.wait(),
        };
        let elapsed = started.elapsed().as_secs_f64();
        assert_eq!(
            stderr.contains("resuming"),
            resumes,
            "run {} after checkpoint {before:?}:\n{stderr}",
            c.runs
        );
        c.resumed += usize::from(resumes);
        if status.success() {
            let stdout =
                std::fs::read_to_string(replay.cwd.join(format!("run-{}.stdout", c.runs))).unwrap();
            let summary: Value = serde_json::from_str(&stdout).unwrap_or_default();
            c.events_read += summary["events"].as_u64().unwrap_or(0);
            eprintln!(
                "run {}: finished in {elapsed:.2} s (resumed: {resumes})",
                c.runs
            );
            if !kill {
                break;
            }
            // It finished before its kill: kill the next one (which starts over) sooner.
            max_delay /= 2;
        } else {
            // Killed; a run that fails on its own fails the test here.
            assert!(
                kill && status.code().is_none(),
                "run {}: {status}\n{stderr}",
                c.runs
            );
            c.killed += 1;
            c.events_read += read;
            let after = replay.checkpoint();
            eprintln!(
                "run {}: killed after {elapsed:.2} s, {read} events read (resumed: {resumes}); \
                 checkpoint {before:?} -> {after:?}",
                c.runs
            );
        }
    }
    eprintln!(
        "{} runs, {} killed, {} resumed",
        c.runs, c.killed, c.resumed
    );
    if c.resumed == 0 {
        eprintln!("warning: no run was killed mid-way; the resume path went untested");
    }
    assert_eq!(replay.checkpoint().map(|c| c.complete), Some(true));
    c
}

/// A free loopback port.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `DeviceEvent_total` from the `/metrics` a process serves on `port`.
pub fn events_read(port: u16) -> Option<u64> {
    metric(&scrape(port)?, "DeviceEvent_total").map(|n| n as u64)
}

/// The `/metrics` text a process serves on `port`; `None` while nothing answers.
pub fn scrape(port: u16) -> Option<String> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream
        .write_all(b"GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        .ok()?;
    let mut text = String::new();
    stream.read_to_string(&mut text).ok()?;
    Some(text)
}

/// The value of the series `series` (a name with its labels, as exposed) in a scrape.
pub fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|n| n.trim().parse().ok())
}
