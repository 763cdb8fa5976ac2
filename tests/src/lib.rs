//! Helpers the integration tests of this crate (its `[[test]]` targets) share: the `iomt`
//! binary and its processes, the repository root, and scratch directories; the capture's oracle and the checks
//! against it ([`golden`]); live Event Hubs runs ([`eventhubs`]).

pub mod cosmos;
pub mod eventhubs;
pub mod events;
pub mod faults;
pub mod golden;
pub mod replay;

use std::ffi::OsStr;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde_json::Value;

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate is inside the repository")
        .to_owned()
}

/// The `iomt` binary, built once per test process in this test's profile. `CARGO_BIN_EXE_*`
/// exists only in the crate that defines the binary, and `cargo test -p iomt-tests` does not
/// build it, so build it here; cargo makes this a no-op when it is fresh.
pub fn iomt() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.current_dir(repo_root()).args([
            "build",
            "--quiet",
            "--package",
            "iomt-cli",
            "--bin",
            "iomt",
            "--message-format",
            "json-render-diagnostics",
        ]);
        // This test runs from <target>/<profile dir>/deps/.
        let exe = std::env::current_exe().unwrap();
        let profile_dir = exe
            .parent()
            .and_then(Path::parent)
            .and_then(Path::file_name);
        match profile_dir.and_then(|p| p.to_str()) {
            Some("debug") | None => {}
            Some("release") => {
                cmd.arg("--release");
            }
            Some(profile) => {
                cmd.args(["--profile", profile]);
            }
        }
        let output = cmd.stderr(Stdio::inherit()).output().expect("cargo runs");
        assert!(output.status.success(), "cargo build of iomt failed");
        String::from_utf8_lossy(&output.stdout)
            .lines()
            .filter_map(|line| serde_json::from_str::<Value>(line).ok())
            .filter(|m| m["reason"] == "compiler-artifact" && m["target"]["name"] == "iomt")
            .find_map(|m| m["executable"].as_str().map(PathBuf::from))
            .expect("cargo reported the iomt executable")
    })
}

/// A scratch directory under the target directory, removed when the test passes and kept
/// (its path printed) when it fails.
#[derive(Debug)]
pub struct Scratch(PathBuf);

impl Scratch {
    /// A fresh directory `{base}/{name}-…`; tests pass `env!("CARGO_TARGET_TMPDIR")`.
    pub fn new(base: &str, name: &str) -> Self {
        let dir = Path::new(base).join(format!(
            "{name}-{}-{:x}",
            std::process::id(),
            fastrand::u32(..)
        ));
        std::fs::remove_dir_all(&dir).ok();
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("kept {} for inspection", self.0.display());
        } else {
            std::fs::remove_dir_all(&self.0).ok();
        }
    }
}

/// A running `iomt` process of a test or benchmark. It works in `{dir}/{name}` (created),
/// which also holds its `stdout` and `stderr`, and is configured only by its arguments: the
/// caller's `IOMT…` environment is removed. Dropped while running, it is killed, so a failing
/// test leaves no process behind.
#[derive(Debug)]
pub struct IomtProcess {
    /// Names it in messages.
    pub name: String,
    /// The process.
    pub child: Child,
    /// Its directory.
    pub dir: PathBuf,
}

impl IomtProcess {
    /// Starts `iomt ARGS…` with `RUST_LOG=rust_log`.
    pub fn start(
        dir: &Path,
        name: &str,
        args: impl IntoIterator<Item = impl AsRef<OsStr>>,
        rust_log: &str,
    ) -> Self {
        let dir = dir.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        let mut cmd = Command::new(iomt());
        cmd.args(args)
            .current_dir(&dir)
            .stdin(Stdio::null())
            .stdout(File::create(dir.join("stdout")).unwrap())
            .stderr(File::create(dir.join("stderr")).unwrap());
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("IOMT") {
                cmd.env_remove(key);
            }
        }
        cmd.env("RUST_LOG", rust_log);
        IomtProcess {
            name: name.to_owned(),
            child: cmd.spawn().expect("iomt starts"),
            dir,
        }
    }

    /// What it wrote so far to `stdout` or `stderr`.
    pub fn log(&self, file: &str) -> String {
        std::fs::read_to_string(self.dir.join(file)).unwrap_or_default()
    }

    /// Fails if the process has exited.
    pub fn assert_running(&mut self) {
        if let Some(status) = self.child.try_wait().unwrap() {
            panic!(
                "{} exited early with {status}:\n{}",
                self.name,
                self.log("stderr")
            );
        }
    }

    /// SIGTERM, then waits up to `deadline` for it to drain; it must exit 0. Returns its
    /// summary (stdout).
    pub fn terminate(mut self, deadline: Duration) -> String {
        Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        let until = Instant::now() + deadline;
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            assert!(
                Instant::now() < until,
                "{} did not stop within {deadline:?}",
                self.name
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        assert!(
            status.success(),
            "{} failed ({status}):\n{}",
            self.name,
            self.log("stderr")
        );
        self.log("stdout")
    }
}

impl Drop for IomtProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.child.kill().ok();
            self.child.wait().ok();
        }
    }
}

/// The Python of the test tools (`tests/python`), which `tests/run.sh` prepares.
pub fn python() -> String {
    std::env::var("IOMT_TEST_PYTHON")
        .expect("IOMT_TEST_PYTHON is not set: run tests/run.sh, which prepares the test tools")
}

/// A test server of `tests/python` on a free loopback port, killed when dropped.
#[derive(Debug)]
pub struct PythonServer {
    child: Child,
    /// Its port, as it printed it (`listening on PORT`).
    pub port: u16,
}

impl PythonServer {
    /// Starts `tests/python/{script} ARGS…` and waits until it listens.
    pub fn start(script: &str, args: impl IntoIterator<Item = impl AsRef<OsStr>>) -> Self {
        use std::io::BufRead as _;
        let mut child = Command::new(python())
            .arg(repo_root().join("tests/python").join(script))
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("{script} does not start: {e}"));
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let port = line
            .trim()
            .strip_prefix("listening on ")
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("{script} said {line:?}"));
        PythonServer { child, port }
    }
}

impl Drop for PythonServer {
    fn drop(&mut self) {
        self.child.kill().ok();
        self.child.wait().ok();
    }
}
