//! No secrets and no patient data where an operator or a log collector sees them: credentials in
//! a FHIR URL (user info, a gateway `code` in the query) never print, plain HTTP to a remote FHIR
//! server is refused unless allowed, and the warnings of an unreachable server name neither the
//! search values nor the URL's secrets (issue 13).

use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

const SECRET_URL: &str = "https://fhir-user:PASSWORD@fhir.example.org/fhir?code=GATEWAYKEY";

fn repo(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(path)
}

fn iomt(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_iomt"));
    command.args(args).env("NO_COLOR", "1");
    for (key, value) in env {
        command.env(key, value);
    }
    command.output().unwrap()
}

fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

fn assert_no_secret(printed: &str) {
    for secret in ["PASSWORD", "GATEWAYKEY", "fhir-user"] {
        assert!(!printed.contains(secret), "{secret} printed:\n{printed}");
    }
}

#[test]
fn config_print_and_check_hide_the_credentials_of_a_fhir_url() {
    let config = repo("examples/capture/iomt.toml");
    let config = config.to_str().unwrap();
    let env = [("IOMT__FHIR__URL", SECRET_URL)];
    let printed = iomt(&["config", "print", "--config", config], &env);
    assert!(printed.status.success(), "{}", text(&printed));
    assert_no_secret(&text(&printed));
    assert!(text(&printed).contains("https://fhir.example.org/fhir?***"));

    let checked = iomt(&["config", "check", "--config", config], &env);
    assert!(checked.status.success(), "{}", text(&checked));
    assert_no_secret(&text(&checked));
}

#[test]
fn plain_http_to_a_remote_fhir_server_is_refused_unless_allowed() {
    let config = repo("examples/capture/iomt.toml");
    let config = config.to_str().unwrap();
    let remote = [
        ("IOMT__FHIR__URL", "http://10.255.255.1/fhir"),
        ("IOMT__FHIR__AUTH", "bearer"),
        ("IOMT__FHIR__TOKEN", "token"),
    ];
    let refused = iomt(&["config", "check", "--config", config], &remote);
    assert!(!refused.status.success());
    let said = text(&refused);
    assert!(
        said.contains("fhir.url") && said.contains("allow_insecure_http"),
        "{said}"
    );

    let mut allowed = remote.to_vec();
    allowed.push(("IOMT__FHIR__ALLOW_INSECURE_HTTP", "true"));
    let checked = iomt(&["config", "check", "--config", config], &allowed);
    assert!(checked.status.success(), "{}", text(&checked));

    let loopback = [("IOMT__FHIR__URL", "http://127.0.0.1:9/fhir")];
    let checked = iomt(&["config", "check", "--config", config], &loopback);
    assert!(checked.status.success(), "{}", text(&checked));
}

/// Replays the first 60 events of the shipped capture into a closed loopback port, with URL
/// credentials, until the first retry warnings; what it logged, and the events.
fn unreachable_replay(extra: &[&str]) -> (String, Vec<String>) {
    let dir = tempfile::tempdir().unwrap();
    let capture = std::fs::read_to_string(repo("examples/capture/wearables.jsonl")).unwrap();
    let lines: Vec<String> = capture.lines().take(60).map(str::to_owned).collect();
    let input = dir.path().join("cut.jsonl");
    std::fs::write(&input, lines.join("\n")).unwrap();
    // A closed loopback port: every request fails at once with a connection error.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("http://fhir-user:PASSWORD@127.0.0.1:{port}/fhir?code=GATEWAYKEY");
    let stderr = dir.path().join("stderr");
    let mut child = Command::new(env!("CARGO_BIN_EXE_iomt"))
        .args(extra)
        .args(["replay", "--no-progress", "--config"])
        .arg(repo("examples/capture/iomt.toml"))
        .arg(&input)
        .args(["--state-dir"])
        .arg(dir.path().join("state"))
        .env_remove("NO_COLOR")
        .env("RUST_LOG", "info")
        .env("IOMT__FHIR__URL", &url)
        .env("IOMT__FHIR__BACKOFF_BASE", "10ms")
        .env("IOMT__FHIR__BACKOFF_CAP", "50ms")
        .env("IOMT__IDENTITY__MODE", "create")
        .env("IOMT__GROUP__MAX_WAIT", "100ms")
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&stderr).unwrap())
        .spawn()
        .unwrap();
    let started = Instant::now();
    let read = || std::fs::read_to_string(&stderr).unwrap_or_default();
    while !read().contains("will be retried") {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "no retry logged:\n{}",
            read()
        );
        if child.try_wait().unwrap().is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(300));
    child.kill().ok();
    let output = child.wait_with_output().unwrap();
    let mut logged = read();
    logged.push_str(&String::from_utf8_lossy(&output.stdout));
    (logged, lines)
}

#[test]
fn an_unreachable_fhir_server_logs_no_search_values_or_url_secrets() {
    let (logged, lines) = unreachable_replay(&[]);
    assert!(logged.contains("will be retried"), "{logged}");
    assert!(logged.contains("kind=\"connection\""), "{logged}");
    // Written to a file, not a terminal: no colour codes.
    assert!(!logged.contains('\u{1b}'), "{logged}");
    assert_no_secret(&logged);
    assert!(!logged.contains("identifier="), "{logged}");
    for line in &lines {
        let record: serde_json::Value = serde_json::from_str(line).unwrap();
        for key in ["deviceId", "patientId"] {
            if let Some(id) = record["Body"][key].as_str() {
                assert!(!logged.contains(id), "{id} logged:\n{logged}");
            }
        }
    }
}

#[test]
fn json_logs_are_one_object_a_line() {
    let (logged, _) = unreachable_replay(&["--log-format", "json"]);
    let warnings: Vec<serde_json::Value> = logged
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .filter(|v: &serde_json::Value| v["level"] == "WARN")
        .collect();
    assert!(!warnings.is_empty(), "{logged}");
    let retry = warnings
        .iter()
        .find(|w| w["fields"]["message"] == "fhir request will be retried")
        .unwrap_or_else(|| panic!("{logged}"));
    assert_eq!(retry["fields"]["kind"], "connection");
    assert_eq!(retry["fields"]["resource"], "Device");
    assert_no_secret(&logged);
}
