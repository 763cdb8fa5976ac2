//! End-to-end benchmark of `iomt run` through the Event Hubs test broker
//! (`tests/eventhubs-broker`), with checkpoints in Azurite, into a blackhole FHIR endpoint.
//!
//! ```sh
//! IOMT_TEST_AZURITE_URL=http://127.0.0.1:PORT/devstoreaccount1 \
//!     cargo bench -p iomt-tests --bench eventhubs          # 1,000,000 events, 1,000 devices
//! IOMT_BENCH_EVENTS=300000 cargo bench -p iomt-tests --bench eventhubs
//! ```
//!
//! Other knobs: `IOMT_BENCH_DEVICES` (1000), `IOMT_BENCH_PARTITIONS` (8 per hub),
//! `IOMT_BENCH_UPDATE_INTERVAL` (`source.update_interval`, 1s), `IOMT_BENCH_TIMEOUT` (seconds
//! per run, 900), and, to see how much the broker's simulated latency matters,
//! `IOMT_BENCH_LATENCY_MS` (the report says when it is not the default).
//!
//! The broker runs in this process, with a device hub and an internal hub of
//! `IOMT_BENCH_PARTITIONS` (8) partitions each and its default simulated network latency
//! ([`DEFAULT_LATENCY`], 5 ms on everything it writes). Before any timing, the device hub is
//! loaded with `IOMT_BENCH_EVENTS` heart rate events from `IOMT_BENCH_DEVICES` watches (one
//! reading per watch per second, interleaved, each device on the partition its id hashes to, as
//! with the device id as partition key; sent by partition id in large batches, so a partition
//! keeps the interleaving, which `iomt_tests::eventhubs::send`, batching per device, would not).
//! Then, each from the start of its processes until the hubs it reads show no lag the way KEDA
//! reads it (checkpoint blobs against the hub's last sequence number):
//!
//! * (a) one `iomt run --role all` process reads the device hub;
//! * (b) an `iomt run --role normalize` and an `iomt run --role convert` process, joined by the
//!   internal hub, each with a consumer group of its own on the same preloaded device hub.
//!
//! Both write to a blackhole FHIR endpoint on a thread of this process (the one of the
//! `iomt-cli` pipeline bench: Device searches answered with a Device linked to a Patient,
//! Observation searches with an empty Bundle, PUTs with their body), so the FHIR code path runs.
//! The CPU time of each `iomt` process (utime + stime from `/proc/<pid>/stat`, read just before
//! SIGTERM) gives its CPU per event. The broker's CPU is that of its runtime's threads in this
//! process; Azurite's (found by its port) and the whole machine's (`/proc/stat`) are reported
//! too, since they share the CPUs, and so is the steady part of each run (every partition
//! claimed until the lag is under 5 %), with the busiest threads of each process. Measured in
//! the same run: the physical reference, single-threaded
//! `serde_json::from_slice::<serde_json::Value>` of the same event bodies, and (c) `iomt replay`
//! of the same events into the same blackhole, the pipeline without Event Hubs.
//!
//! Every child is killed when the bench ends or panics, and every wait has a deadline
//! (`IOMT_BENCH_TIMEOUT`, seconds per run). `cargo test --benches` runs it on 5,000 events when
//! Azurite is configured, and skips it otherwise.

use std::fmt::Write as _;
use std::fs::File;
use std::io::{BufWriter, Write as _};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use azure_messaging_eventhubs::models::EventData;
use azure_messaging_eventhubs::{EventDataBatchOptions, ProducerClient};
use iomt_bench_fixtures::{Counts, Event, blackhole, device_id, generate};
use iomt_eventhubs::blob::BlobCheckpointStore;
use iomt_eventhubs_broker::hash::partition_index_for_key;
use iomt_eventhubs_broker::{
    BrokerConfig, BrokerHandle, CONNECTION_STRING, DEFAULT_LATENCY, HubConfig,
};
use iomt_tests::eventhubs::{hub_section, keda_lag, storage_connection_string, toml_string};
use iomt_tests::{IomtProcess, Scratch, iomt, repo_root};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const DEVICE_HUB: &str = "devicedata";
const INTERNAL_HUB: &str = "normalizeddata";
/// How often the hubs' lag is read.
const POLL: Duration = Duration::from_millis(200);

fn env_parse<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// What one run of the bench does.
#[derive(Debug)]
struct Settings {
    events: usize,
    devices: usize,
    partitions: u32,
    /// The broker's simulated network latency.
    latency: Duration,
    timeout: Duration,
    /// `source.update_interval`: the processor claims one partition per interval.
    update_interval: String,
    max_wait: String,
    checkpoint_interval: String,
}

// ---------------------------------------------------------------------------------------------
// Data

/// The same events as JSON Lines for `iomt replay`: the body as sent, the application property
/// the hub events carry, and the enqueued time.
fn write_capture(path: &Path, events: &[Event]) {
    let mut out = BufWriter::new(File::create(path).unwrap());
    for (i, e) in events.iter().enumerate() {
        writeln!(
            out,
            r#"{{"Body":{},"Properties":{{"iothub-connection-device-id":"{}"}},"SystemProperties":{{"x-opt-enqueued-time":"{}","x-opt-sequence-number":{}}}}}"#,
            e.body,
            device_id(e.device),
            e.time,
            i + 1
        )
        .unwrap();
    }
    out.flush().unwrap();
}

/// Sends the events to the device hub, each on the partition its device id hashes to (as a
/// partition key would route it), keeping the interleaved order within each partition, in
/// batches as large as the broker takes.
async fn preload(broker: &BrokerHandle, events: &[Event]) {
    let ids = broker.partition_ids(DEVICE_HUB).unwrap();
    let producer = ProducerClient::builder()
        .with_custom_endpoint(broker.endpoint())
        .open_with_connection_string(CONNECTION_STRING, Some(DEVICE_HUB))
        .await
        .unwrap();
    let mut by_partition: Vec<Vec<&Event>> = vec![Vec::new(); ids.len()];
    for e in events {
        by_partition[partition_index_for_key(&device_id(e.device), ids.len())].push(e);
    }
    for (id, list) in ids.iter().zip(by_partition) {
        let mut list = list.into_iter().peekable();
        while list.peek().is_some() {
            let batch = producer
                .create_batch(Some(EventDataBatchOptions {
                    partition_id: Some(id.clone()),
                    ..Default::default()
                }))
                .await
                .unwrap();
            let mut added = 0;
            while let Some(e) = list.peek() {
                let data = EventData::builder()
                    .with_body(e.body.as_bytes().to_vec())
                    .add_property(
                        "iothub-connection-device-id".to_owned(),
                        device_id(e.device),
                    )
                    .build();
                if !batch.try_add_event_data(data, None).unwrap() {
                    break;
                }
                added += 1;
                list.next();
            }
            assert!(added > 0, "an event does not fit in an empty batch");
            producer.send_batch(batch, None).await.unwrap();
        }
    }
    producer.close().await.ok();
}

// ---------------------------------------------------------------------------------------------
// Blackhole FHIR endpoint (as in crates/iomt-cli/benches/pipeline.rs)

// ---------------------------------------------------------------------------------------------
// CPU accounting

/// Clock ticks per second of `/proc/*/stat` times.
fn clock_ticks() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100.0)
}

/// The state and utime + stime (ticks) of a `/proc/…/stat` line.
fn parse_stat(stat: &str) -> Option<(char, u64)> {
    // The command name (field 2) is in parentheses and may hold spaces.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let state = fields.first()?.chars().next()?;
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((state, utime + stime))
}

fn process_stat(pid: u32) -> Option<(char, u64)> {
    parse_stat(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// CPU ticks of the whole machine (every CPU; `/proc/stat`).
#[derive(Debug, Clone, Copy, Default)]
struct MachineCpu {
    /// user, nice, system.
    tasks: u64,
    /// irq and softirq (loopback TCP is mostly here).
    irq: u64,
    /// Taken by the hypervisor.
    steal: u64,
}

impl MachineCpu {
    fn read() -> Self {
        let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
        let v: Vec<u64> = stat
            .lines()
            .next()
            .unwrap_or_default()
            .split_whitespace()
            .skip(1)
            .filter_map(|v| v.parse().ok())
            .collect();
        let at = |i: usize| v.get(i).copied().unwrap_or(0);
        // user nice system idle iowait irq softirq steal
        MachineCpu {
            tasks: at(0) + at(1) + at(2),
            irq: at(5) + at(6),
            steal: at(7),
        }
    }

    fn cpus() -> usize {
        std::fs::read_to_string("/proc/stat")
            .unwrap_or_default()
            .lines()
            .filter(|l| l.starts_with("cpu") && !l.starts_with("cpu "))
            .count()
            .max(1)
    }
}

/// The process listening on a loopback TCP port (Azurite), from `/proc/net/tcp` and the
/// processes' socket descriptors.
fn listener_pid(port: u16) -> Option<u32> {
    let table = std::fs::read_to_string("/proc/net/tcp").ok()?;
    let inode = table.lines().skip(1).find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        let local_port = u16::from_str_radix(f.get(1)?.rsplit(':').next()?, 16).ok()?;
        (local_port == port && *f.get(3)? == "0A").then(|| f.get(9).map(|i| (*i).to_owned()))?
    })?;
    let socket = format!("socket:[{inode}]");
    std::fs::read_dir("/proc")
        .ok()?
        .flatten()
        .find_map(|entry| {
            let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
            let found = std::fs::read_dir(entry.path().join("fd"))
                .ok()?
                .flatten()
                .any(|fd| {
                    std::fs::read_link(fd.path()).is_ok_and(|l| l.as_os_str() == socket.as_str())
                });
            found.then_some(pid)
        })
}

/// Azurite's process, from the port of `IOMT_TEST_AZURITE_URL`.
fn azurite_pid() -> Option<u32> {
    let url = std::env::var("IOMT_TEST_AZURITE_URL").ok()?;
    let authority = url.split("://").nth(1)?.split('/').next()?;
    listener_pid(authority.rsplit(':').next()?.parse().ok()?)
}

/// CPU ticks of this process's threads, by thread-name prefix, and of the whole process.
#[derive(Debug, Clone, Copy, Default)]
struct OwnCpu {
    broker: u64,
    blackhole: u64,
    total: u64,
    azurite: u64,
    machine: MachineCpu,
}

impl OwnCpu {
    fn read(azurite: Option<u32>) -> Self {
        let mut cpu = OwnCpu {
            azurite: azurite.and_then(process_stat).map_or(0, |(_, t)| t),
            total: std::fs::read_to_string("/proc/self/stat")
                .ok()
                .and_then(|s| parse_stat(&s))
                .map_or(0, |(_, t)| t),
            machine: MachineCpu::read(),
            ..OwnCpu::default()
        };
        let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
            return cpu;
        };
        for task in tasks.flatten() {
            let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
            let ticks = std::fs::read_to_string(task.path().join("stat"))
                .ok()
                .and_then(|s| parse_stat(&s))
                .map_or(0, |(_, t)| t);
            if comm.starts_with("broker") {
                cpu.broker += ticks;
            } else if comm.starts_with("blackhole") {
                cpu.blackhole += ticks;
            }
        }
        cpu
    }

    fn since(self, start: OwnCpu) -> OwnCpu {
        OwnCpu {
            broker: self.broker - start.broker,
            blackhole: self.blackhole - start.blackhole,
            total: self.total - start.total,
            azurite: self.azurite - start.azurite,
            machine: MachineCpu {
                tasks: self.machine.tasks - start.machine.tasks,
                irq: self.machine.irq - start.machine.irq,
                steal: self.machine.steal - start.machine.steal,
            },
        }
    }
}

// ---------------------------------------------------------------------------------------------
// iomt processes

/// One `iomt` process (see [`IomtProcess`]), with what the bench reads of it.
struct Proc {
    name: &'static str,
    process: IomtProcess,
}

impl Proc {
    fn spawn(name: &'static str, dir: &Path, args: &[&std::ffi::OsStr]) -> Self {
        Proc {
            name,
            process: IomtProcess::start(dir, name, args, "warn"),
        }
    }

    fn pid(&self) -> u32 {
        self.process.child.id()
    }

    /// CPU ticks so far.
    fn cpu(&self) -> u64 {
        process_stat(self.pid()).map_or(0, |(_, t)| t)
    }

    /// CPU ticks so far of each thread: thread id, name, ticks; busiest first.
    fn threads(&self) -> Vec<ThreadCpu> {
        let mut threads: Vec<ThreadCpu> = std::fs::read_dir(format!("/proc/{}/task", self.pid()))
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|task| {
                let tid = task.file_name().to_str()?.parse().ok()?;
                let comm = std::fs::read_to_string(task.path().join("comm")).ok()?;
                let (_, ticks) =
                    parse_stat(&std::fs::read_to_string(task.path().join("stat")).ok()?)?;
                Some((tid, comm.trim().to_owned(), ticks))
            })
            .collect();
        threads.sort_by_key(|t| std::cmp::Reverse(t.2));
        threads
    }

    /// SIGTERM, then waits up to `deadline`; the process must exit 0. Returns its summary.
    fn terminate(self, deadline: Duration) -> String {
        self.process.terminate(deadline)
    }

    /// Waits for a process that ends by itself; returns its CPU ticks, read from the zombie
    /// before it is reaped, and its summary.
    fn finish(mut self, deadline: Duration) -> (u64, String) {
        let until = Instant::now() + deadline;
        let ticks = loop {
            match process_stat(self.pid()) {
                Some(('Z', ticks)) => break ticks,
                Some(_) => {}
                None => panic!("{} vanished before its CPU time was read", self.name),
            }
            assert!(
                Instant::now() < until,
                "{} did not finish within {deadline:?}",
                self.name
            );
            std::thread::sleep(Duration::from_millis(10));
        };
        let status = self.process.child.wait().unwrap();
        assert!(
            status.success(),
            "{} failed ({status}):\n{}",
            self.name,
            self.process.log("stderr")
        );
        (ticks, self.process.log("stdout"))
    }
}

/// The first number after `marker` in a summary (thousands separators dropped).
fn number_after(text: &str, marker: &str) -> Option<f64> {
    let at = text.find(marker)? + marker.len();
    let digits: String = text[at..]
        .trim_start()
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == ',' || *c == '.')
        .filter(|c| *c != ',')
        .collect();
    digits.parse().ok()
}

/// The first number of a summary (`1,234 events in …`).
fn leading_number(text: &str) -> Option<f64> {
    number_after(text, "")
}

// ---------------------------------------------------------------------------------------------
// Runs

fn write_config(
    dir: &Path,
    settings: &Settings,
    broker: &BrokerHandle,
    fhir_url: &str,
    container: &str,
    consumer_group: &str,
) -> PathBuf {
    let mappings = repo_root().join("mappings/heartrate");
    let path = |p: PathBuf| toml_string(p.to_str().unwrap());
    let hub = |name: &str| {
        hub_section(
            broker,
            name,
            consumer_group,
            &settings.update_interval,
            "30s",
        )
    };
    let config = format!(
        "[templates]\ndevice_mapping = {}\nfhir_mapping = {}\n\n\
         [fhir]\nurl = {}\n\n[identity]\nmode = \"lookup\"\n\n[group]\nmax_wait = {}\n\n\
         [pipeline]\ncheckpoint_interval = {}\n\n\
         [source]\n{}\n[internal_hub]\n{}\n\
         [checkpoints]\nconnection_string = {}\ncontainer = {}\n",
        path(mappings.join("devicecontent.json")),
        path(mappings.join("fhirmapping.json")),
        toml_string(fhir_url),
        toml_string(&settings.max_wait),
        toml_string(&settings.checkpoint_interval),
        hub(DEVICE_HUB),
        hub(INTERNAL_HUB),
        toml_string(&storage_connection_string()),
        toml_string(container),
    );
    let file = dir.join(format!("{consumer_group}.toml"));
    std::fs::write(&file, config).unwrap();
    file
}

/// What one `iomt` process of a run used and said.
#[derive(Debug)]
struct ProcResult {
    name: &'static str,
    /// CPU seconds.
    cpu: f64,
    /// Its busiest threads: name (the main thread marked), CPU seconds.
    threads: Vec<(String, f64)>,
    summary: String,
}

/// A thread's id, name and CPU ticks.
type ThreadCpu = (u32, String, u64);

/// CPU counters at one moment of a run.
#[derive(Debug)]
struct Snap {
    at: f64,
    /// KEDA lag, all hubs read.
    lag: i64,
    own: OwnCpu,
    /// Each process's threads: id, name, ticks.
    threads: Vec<(&'static str, Vec<ThreadCpu>)>,
}

/// The steady part of a run: from every partition claimed until the lag is under 5 % of the
/// events, without the ramp-up and the last flush and checkpoint.
#[derive(Debug)]
struct Steady {
    secs: f64,
    /// Events/s by the lag's decrease.
    rate: f64,
    /// Busy share of all CPUs of the machine.
    machine: f64,
    /// The broker's threads, % of one CPU.
    broker: f64,
    /// The two busiest threads of each process: process, thread, % of one CPU.
    busiest: Vec<(&'static str, String, f64)>,
}

impl Steady {
    fn between(start: &Snap, end: &Snap, ticks: f64) -> Self {
        let secs = end.at - start.at;
        let own = end.own.since(start.own);
        let pct = |t: u64| t as f64 / ticks / secs * 100.0;
        let m = own.machine;
        let mut busiest = Vec::new();
        for ((name, before), (_, after)) in start.threads.iter().zip(&end.threads) {
            let mut threads: Vec<(String, f64)> = after
                .iter()
                .map(|(tid, comm, t)| {
                    let t0 = before
                        .iter()
                        .find(|(id, _, _)| id == tid)
                        .map_or(0, |b| b.2);
                    (comm.clone(), pct(t - t0))
                })
                .collect();
            threads.sort_by(|a, b| b.1.total_cmp(&a.1));
            busiest.extend(threads.into_iter().take(2).map(|(c, p)| (*name, c, p)));
        }
        Steady {
            secs,
            rate: (start.lag - end.lag) as f64 / secs,
            machine: pct(m.tasks + m.irq + m.steal) / MachineCpu::cpus() as f64,
            broker: pct(own.broker),
            busiest,
        }
    }
}

/// What one timed run measured.
#[derive(Debug)]
struct Measured {
    label: &'static str,
    wall: f64,
    /// When every partition of the hubs read had a receiver, from the start.
    claimed: Option<f64>,
    /// KEDA lag (both hubs) at that moment.
    lag_at_claim: i64,
    processes: Vec<ProcResult>,
    steady: Option<Steady>,
    own: OwnCpu,
    /// PUTs, Observation searches, Device searches.
    fhir: [u64; 3],
}

struct Bench {
    settings: Settings,
    ticks: f64,
    dir: PathBuf,
    broker: BrokerHandle,
    /// The runtime the lag checks run on (the broker has its own).
    monitor: tokio::runtime::Runtime,
    fhir_url: String,
    counts: Arc<Counts>,
    azurite: Option<u32>,
}

impl Bench {
    fn store(&self, container: &str) -> BlobCheckpointStore {
        let store =
            BlobCheckpointStore::from_connection_string(&storage_connection_string(), container)
                .unwrap();
        self.monitor.block_on(store.ensure_container()).unwrap();
        store
    }

    fn claimed(&self, hubs: &[&str], consumer_group: &str) -> bool {
        hubs.iter().all(|hub| {
            self.broker
                .partition_ids(hub)
                .unwrap()
                .iter()
                .all(|p| self.broker.reader_count(hub, consumer_group, p) > 0)
        })
    }

    /// Starts the processes `roles` with one configuration, waits until the hubs they read
    /// (`hubs`, in pipeline order) show no lag, reads their CPU and stops them.
    fn run(&self, label: &'static str, roles: &[&'static str], hubs: &[&str]) -> Measured {
        let consumer_group = format!("bench-{}", roles.join("-"));
        let container = format!("bench-{:08x}", fastrand::u32(..));
        let store = self.store(&container);
        let config = write_config(
            &self.dir,
            &self.settings,
            &self.broker,
            &self.fhir_url,
            &container,
            &consumer_group,
        );
        let fhir_before = self.counts.snapshot();
        let own_before = OwnCpu::read(self.azurite);
        let started = Instant::now();
        let mut procs: Vec<Proc> = roles
            .iter()
            .map(|&role| {
                Proc::spawn(
                    role,
                    &self.dir,
                    &[
                        "run".as_ref(),
                        "--role".as_ref(),
                        role.as_ref(),
                        "--owner-id".as_ref(),
                        role.as_ref(),
                        "--config".as_ref(),
                        config.as_os_str(),
                    ],
                )
            })
            .collect();
        let mut claimed = None;
        let mut lag_at_claim = 0;
        let (mut steady_start, mut steady_end) = (None, None);
        let snap = |procs: &[Proc], at: f64, lag: i64| Snap {
            at,
            lag,
            own: OwnCpu::read(self.azurite),
            threads: procs.iter().map(|p| (p.name, p.threads())).collect(),
        };
        let mut last_report = Instant::now();
        loop {
            for p in &mut procs {
                p.process.assert_running();
            }
            let now_claimed = claimed.is_none() && self.claimed(hubs, &consumer_group);
            // In pipeline order: the device hub's lag is 0 only once everything is stored on
            // the internal hub, so a 0 read after it there means everything is converted.
            let lags: Vec<i64> = hubs
                .iter()
                .map(|hub| {
                    self.monitor
                        .block_on(keda_lag(&self.broker, &store, hub, &consumer_group))
                })
                .collect();
            let elapsed = started.elapsed().as_secs_f64();
            let lag: i64 = lags.iter().sum();
            if now_claimed {
                claimed = Some(elapsed);
                lag_at_claim = lag;
                steady_start = Some(snap(&procs, elapsed, lag));
            } else if steady_start.is_some()
                && steady_end.is_none()
                && lag <= self.settings.events as i64 / 20
            {
                steady_end = Some(snap(&procs, elapsed, lag));
            }
            if lags.iter().all(|&l| l == 0) {
                break;
            }
            if last_report.elapsed() > Duration::from_secs(5) {
                eprintln!("  {label}: {elapsed:5.1} s, lag {lags:?}");
                last_report = Instant::now();
            }
            assert!(
                started.elapsed() < self.settings.timeout,
                "{label}: the lag did not reach 0 within {:?}: {lags:?}",
                self.settings.timeout
            );
            std::thread::sleep(POLL);
        }
        let wall = started.elapsed().as_secs_f64();
        let steady = match (&steady_start, &steady_end) {
            (Some(start), Some(end)) if end.at > start.at => {
                Some(Steady::between(start, end, self.ticks))
            }
            _ => None,
        };
        let cpu: Vec<(u64, Vec<(String, f64)>)> =
            procs.iter().map(|p| (p.cpu(), self.busiest(p))).collect();
        let own = OwnCpu::read(self.azurite).since(own_before);
        let fhir_after = self.counts.snapshot();
        // Stop in reverse pipeline order.
        let mut processes = Vec::new();
        while let Some(p) = procs.pop() {
            let (ticks, threads) = cpu[procs.len()].clone();
            let name = p.name;
            let summary = p.terminate(Duration::from_secs(60));
            processes.insert(
                0,
                ProcResult {
                    name,
                    cpu: ticks as f64 / self.ticks,
                    threads,
                    summary,
                },
            );
        }
        Measured {
            label,
            wall,
            claimed,
            lag_at_claim,
            processes,
            steady,
            own,
            fhir: std::array::from_fn(|i| fhir_after[i] - fhir_before[i]),
        }
    }

    /// The three busiest threads of a process, in CPU seconds.
    fn busiest(&self, p: &Proc) -> Vec<(String, f64)> {
        p.threads()
            .into_iter()
            .take(3)
            .map(|(tid, comm, ticks)| {
                let main = if tid == p.pid() { " (main)" } else { "" };
                (format!("{comm}{main}"), ticks as f64 / self.ticks)
            })
            .collect()
    }

    /// `iomt replay` of the same events into the same blackhole.
    fn replay(&self, capture: &Path) -> Measured {
        let mappings = repo_root().join("mappings/heartrate");
        let state = self.dir.join("replay-state");
        let (device, fhir) = (
            mappings.join("devicecontent.json"),
            mappings.join("fhirmapping.json"),
        );
        let fhir_before = self.counts.snapshot();
        let own_before = OwnCpu::read(self.azurite);
        let started = Instant::now();
        let proc = Proc::spawn(
            "replay",
            &self.dir,
            &[
                "replay".as_ref(),
                "--no-progress".as_ref(),
                "--restart".as_ref(),
                "--identity-mode".as_ref(),
                "lookup".as_ref(),
                capture.as_os_str(),
                "--device-mapping".as_ref(),
                device.as_os_str(),
                "--fhir-mapping".as_ref(),
                fhir.as_os_str(),
                "--fhir-url".as_ref(),
                self.fhir_url.as_ref(),
                "--max-wait".as_ref(),
                self.settings.max_wait.as_ref(),
                "--state-dir".as_ref(),
                state.as_os_str(),
            ],
        );
        let (ticks, summary) = proc.finish(self.settings.timeout);
        let wall = started.elapsed().as_secs_f64();
        let own = OwnCpu::read(self.azurite).since(own_before);
        let fhir_after = self.counts.snapshot();
        Measured {
            label: "(c) iomt replay, no broker",
            wall,
            claimed: None,
            lag_at_claim: 0,
            processes: vec![ProcResult {
                name: "replay",
                cpu: ticks as f64 / self.ticks,
                threads: Vec::new(),
                summary,
            }],
            steady: None,
            own,
            fhir: std::array::from_fn(|i| fhir_after[i] - fhir_before[i]),
        }
    }
}

/// Single-threaded `serde_json::from_slice::<Value>` of every body: the median pass, in µs per
/// event.
fn parse_reference(events: &[Event]) -> f64 {
    let mut passes: Vec<f64> = (0..7)
        .map(|_| {
            let started = Instant::now();
            for e in events {
                let value: serde_json::Value = serde_json::from_slice(e.body.as_bytes()).unwrap();
                std::hint::black_box(value);
            }
            started.elapsed().as_secs_f64() * 1e6 / events.len() as f64
        })
        .collect();
    passes.sort_by(f64::total_cmp);
    passes[passes.len() / 2]
}

fn print_report(settings: &Settings, ticks: f64, parse_us: f64, runs: &[Measured]) {
    let n = settings.events as f64;
    let mut out = String::new();
    writeln!(
        out,
        "\neventhubs: {} events, {} devices, heart rate, {} + {} partitions, broker latency {:?}{}, \
         update_interval {}, max_wait {}, checkpoint_interval {}, blackhole FHIR",
        settings.events,
        settings.devices,
        settings.partitions,
        settings.partitions,
        settings.latency,
        if settings.latency == DEFAULT_LATENCY {
            " (default)"
        } else {
            " (NOT the default)"
        },
        settings.update_interval,
        settings.max_wait,
        settings.checkpoint_interval,
    )
    .ok();
    writeln!(
        out,
        "reference: serde_json::from_slice::<Value> of the bodies, one thread: {parse_us:.2} µs/event \
         ({:.0} events/s)\n",
        1e6 / parse_us
    )
    .ok();
    writeln!(
        out,
        "{:<30} {:>10} {:>7} {:>12} {:>13} {:>8} {:>9} {:>8} {:>8} {:>7}",
        "run / process",
        "events/s",
        "wall s",
        "all claimed",
        "after claim/s",
        "CPU s",
        "µs/event",
        "× parse",
        "RSS MB",
        "written"
    )
    .ok();
    for r in runs {
        let claim = r.claimed.map_or("-".to_owned(), |c| format!("{c:.1} s"));
        let after = r.claimed.map_or("-".to_owned(), |c| {
            format!("{:.0}", r.lag_at_claim as f64 / (r.wall - c))
        });
        writeln!(
            out,
            "{:<30} {:>10.0} {:>7.2} {:>12} {:>13}",
            r.label,
            n / r.wall,
            r.wall,
            claim,
            after
        )
        .ok();
        let mut total = 0.0;
        for ProcResult {
            name,
            cpu,
            threads,
            summary,
        } in &r.processes
        {
            total += cpu;
            let rss = number_after(summary, "peak RSS").unwrap_or(f64::NAN);
            // `--role all` and replay write measurements, convert reads them; normalize
            // stores them on the internal hub.
            let written = match *name {
                "normalize" => number_after(summary, "measurements"),
                "convert" => leading_number(summary),
                _ => number_after(summary, "normalized,"),
            }
            .unwrap_or(f64::NAN);
            let check = if written == n { "" } else { " MISMATCH" };
            writeln!(
                out,
                "  {:<28} {:>10} {:>7} {:>12} {:>13} {:>8.2} {:>9.2} {:>8.2} {:>8.0} {:>7.0}{check}",
                name,
                "",
                "",
                "",
                "",
                cpu,
                cpu * 1e6 / n,
                cpu * 1e6 / n / parse_us,
                rss,
                written
            )
            .ok();
            if !threads.is_empty() {
                let list: Vec<String> = threads
                    .iter()
                    .map(|(t, c)| format!("{t} {c:.2} s ({:.0} %)", c * 100.0 / r.wall))
                    .collect();
                writeln!(out, "      busiest threads: {}", list.join(", ")).ok();
            }
        }
        if r.processes.len() > 1 {
            writeln!(
                out,
                "  {:<28} {:>10} {:>7} {:>12} {:>13} {:>8.2} {:>9.2} {:>8.2}",
                "iomt, both",
                "",
                "",
                "",
                "",
                total,
                total * 1e6 / n,
                total * 1e6 / n / parse_us
            )
            .ok();
        }
        let secs = |t: u64| t as f64 / ticks;
        writeln!(
            out,
            "  {:<28} {:>10} {:>7} {:>12} {:>13} {:>8.2} {:>9.2}",
            "broker (threads)",
            "",
            "",
            "",
            "",
            secs(r.own.broker),
            secs(r.own.broker) * 1e6 / n
        )
        .ok();
        writeln!(
            out,
            "  {:<28} {:>10} {:>7} {:>12} {:>13} {:>8.2} {:>9.2}   ({} PUTs, {} Observation searches, {} Device searches)",
            "blackhole FHIR (thread)",
            "",
            "",
            "",
            "",
            secs(r.own.blackhole),
            secs(r.own.blackhole) * 1e6 / n,
            r.fhir[0],
            r.fhir[1],
            r.fhir[2]
        )
        .ok();
        writeln!(
            out,
            "  {:<28} {:>10} {:>7} {:>12} {:>13} {:>8.2}",
            "bench process, all threads",
            "",
            "",
            "",
            "",
            secs(r.own.total)
        )
        .ok();
        let iomt_ticks: f64 = r.processes.iter().map(|p| p.cpu).sum::<f64>() * ticks;
        let m = r.own.machine;
        let cpus = MachineCpu::cpus() as f64;
        // Clamped: the counters are sampled at slightly different moments.
        let others = (m.tasks as f64 - iomt_ticks - (r.own.total + r.own.azurite) as f64).max(0.0);
        writeln!(
            out,
            "  {:<28} {:>10} {:>7} {:>12} {:>13} {:>8.2}",
            "Azurite (checkpoints, lag)",
            "",
            "",
            "",
            "",
            secs(r.own.azurite)
        )
        .ok();
        writeln!(
            out,
            "  machine: {:.0} % of {cpus} CPUs busy: processes {:.2} s (other users' {:.2} s), \
             irq+softirq {:.2} s, steal {:.2} s",
            secs(m.tasks + m.irq + m.steal) * 100.0 / (r.wall * cpus),
            secs(m.tasks),
            others / ticks,
            secs(m.irq),
            secs(m.steal),
        )
        .ok();
        if let Some(st) = &r.steady {
            let threads: Vec<String> = st
                .busiest
                .iter()
                .map(|(p, t, pct)| format!("{p}/{t} {pct:.0} %"))
                .collect();
            writeln!(
                out,
                "  steady part (all claimed → lag < 5 %): {:.1} s, {:.0} events/s by lag; machine \
                 {:.0} % busy; broker {:.0} % of a CPU; busiest threads (% of a CPU): {}",
                st.secs,
                st.rate,
                st.machine,
                st.broker,
                threads.join(", ")
            )
            .ok();
        }
    }
    print!("{out}");
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` passes nothing and wants a quick
    // check, which needs Azurite.
    let quick = !std::env::args().any(|a| a == "--bench");
    if quick && std::env::var_os("IOMT_TEST_AZURITE_URL").is_none() {
        eprintln!("eventhubs bench: IOMT_TEST_AZURITE_URL is not set; skipped");
        return;
    }
    let settings = Settings {
        events: env_parse("IOMT_BENCH_EVENTS", if quick { 5_000 } else { 1_000_000 }),
        devices: env_parse("IOMT_BENCH_DEVICES", if quick { 100 } else { 1000 }),
        partitions: env_parse("IOMT_BENCH_PARTITIONS", 8),
        latency: std::env::var("IOMT_BENCH_LATENCY_MS")
            .ok()
            .and_then(|v| v.parse().ok())
            .map_or(DEFAULT_LATENCY, Duration::from_millis),
        timeout: Duration::from_secs(env_parse("IOMT_BENCH_TIMEOUT", 900)),
        update_interval: std::env::var("IOMT_BENCH_UPDATE_INTERVAL")
            .unwrap_or_else(|_| "1s".to_owned()),
        max_wait: "1s".to_owned(),
        checkpoint_interval: "500ms".to_owned(),
    };
    let ticks = clock_ticks();
    // Built (or found fresh) before anything is timed.
    let binary = iomt();
    eprintln!("eventhubs bench: {settings:?}, iomt {}", binary.display());

    let scratch = Scratch::new(env!("CARGO_TARGET_TMPDIR"), "bench-eventhubs");
    let events = generate(settings.events, settings.devices);
    let capture = scratch.path().join("capture.jsonl");
    write_capture(&capture, &events);

    let broker_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("broker")
        .enable_all()
        .build()
        .unwrap();
    let mut broker_config = BrokerConfig::new(vec![
        HubConfig::new(DEVICE_HUB, settings.partitions).unwrap(),
        HubConfig::new(INTERNAL_HUB, settings.partitions).unwrap(),
    ]);
    broker_config.latency = settings.latency;
    let broker = broker_rt
        .block_on(BrokerHandle::start(broker_config))
        .unwrap();
    let monitor = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("monitor")
        .enable_all()
        .build()
        .unwrap();
    let loading = Instant::now();
    monitor.block_on(preload(&broker, &events));
    let stored: u64 = broker
        .partition_ids(DEVICE_HUB)
        .unwrap()
        .iter()
        .map(|p| broker.partition_state(DEVICE_HUB, p).unwrap().count)
        .sum();
    assert_eq!(stored, settings.events as u64, "events on the device hub");
    eprintln!(
        "preloaded {stored} events in {:.1} s",
        loading.elapsed().as_secs_f64()
    );

    let parse_us = parse_reference(&events);
    let counts = Arc::new(Counts::default());
    let fhir_url = blackhole(counts.clone());
    let bench = Bench {
        settings,
        ticks,
        dir: scratch.path().to_owned(),
        broker,
        monitor,
        fhir_url,
        counts,
        azurite: azurite_pid(),
    };
    match bench.azurite {
        Some(pid) => eprintln!("Azurite is process {pid}"),
        None => eprintln!("Azurite's process not found: its CPU is counted as other users'"),
    }
    let runs = vec![
        bench.run("(a) iomt run --role all", &["all"], &[DEVICE_HUB]),
        bench.run(
            "(b) normalize + convert",
            &["normalize", "convert"],
            &[DEVICE_HUB, INTERNAL_HUB],
        ),
        bench.replay(&capture),
    ];
    print_report(&bench.settings, ticks, parse_us, &runs);
    let Bench {
        broker, monitor, ..
    } = bench;
    drop(monitor);
    broker_rt.block_on(broker.stop());
}
