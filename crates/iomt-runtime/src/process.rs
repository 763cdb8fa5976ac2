//! The standard Prometheus process metrics (`process_cpu_seconds_total`,
//! `process_resident_memory_bytes`, `process_virtual_memory_bytes`, `process_open_fds`,
//! `process_max_fds`, `process_start_time_seconds`), read from `/proc` at each scrape.
//! `prometheus-client` has no process collector, and the few reads needed do not warrant a
//! `/proc` crate. Elsewhere than Linux they are absent.

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;

/// `/proc` counts CPU time in USER_HZ ticks, 100 a second on every Linux architecture.
const TICKS_PER_SECOND: f64 = 100.0;

#[derive(Debug)]
pub(crate) struct ProcessCollector;

/// What `/proc` says of this process.
#[derive(Debug, Default, PartialEq)]
struct Sample {
    cpu_seconds: Option<f64>,
    resident_bytes: Option<i64>,
    virtual_bytes: Option<i64>,
    open_fds: Option<i64>,
    max_fds: Option<i64>,
    start_time_seconds: Option<f64>,
}

fn read(path: &str) -> Option<String> {
    std::fs::read_to_string(path).ok()
}

/// The fields of `/proc/self/stat` after the command name (which may hold spaces), so that
/// field N of proc(5) is at index N - 3.
fn stat_fields(stat: &str) -> Vec<&str> {
    stat.rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default()
}

/// A `Name:   value kB` line of `/proc/self/status`, in bytes.
fn status_bytes(status: &str, name: &str) -> Option<i64> {
    let line = status.lines().find(|l| l.starts_with(name))?;
    let kb: i64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

fn sample() -> Sample {
    let stat = read("/proc/self/stat").unwrap_or_default();
    let fields = stat_fields(&stat);
    let field = |n: usize| fields.get(n - 3).and_then(|v| v.parse::<f64>().ok());
    let status = read("/proc/self/status").unwrap_or_default();
    let boot = read("/proc/stat").and_then(|s| {
        s.lines()
            .find_map(|l| l.strip_prefix("btime "))
            .and_then(|v| v.trim().parse::<f64>().ok())
    });
    let max_fds = read("/proc/self/limits").and_then(|limits| {
        limits
            .lines()
            .find(|l| l.starts_with("Max open files"))
            .and_then(|l| l.split_whitespace().nth(3))
            .and_then(|v| v.parse().ok())
    });
    Sample {
        cpu_seconds: field(14)
            .zip(field(15))
            .map(|(user, system)| (user + system) / TICKS_PER_SECOND),
        resident_bytes: status_bytes(&status, "VmRSS:"),
        virtual_bytes: status_bytes(&status, "VmSize:"),
        open_fds: std::fs::read_dir("/proc/self/fd")
            .ok()
            .map(|d| d.count() as i64),
        max_fds,
        start_time_seconds: field(22)
            .zip(boot)
            .map(|(ticks, boot)| boot + ticks / TICKS_PER_SECOND),
    }
}

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let s = sample();
        if let Some(v) = s.cpu_seconds {
            let metric = ConstCounter::new(v);
            metric.encode(encoder.encode_descriptor(
                "process_cpu_seconds",
                "User and system CPU time spent, in seconds",
                None,
                metric.metric_type(),
            )?)?;
        }
        let gauges = [
            (
                "process_resident_memory_bytes",
                "Resident memory size, in bytes",
                s.resident_bytes,
            ),
            (
                "process_virtual_memory_bytes",
                "Virtual memory size, in bytes",
                s.virtual_bytes,
            ),
            ("process_open_fds", "Open file descriptors", s.open_fds),
            (
                "process_max_fds",
                "The most file descriptors the process may open",
                s.max_fds,
            ),
        ];
        for (name, help, value) in gauges {
            if let Some(v) = value {
                let metric = ConstGauge::new(v);
                metric.encode(encoder.encode_descriptor(
                    name,
                    help,
                    None,
                    metric.metric_type(),
                )?)?;
            }
        }
        if let Some(v) = s.start_time_seconds {
            let metric = ConstGauge::new(v);
            metric.encode(encoder.encode_descriptor(
                "process_start_time_seconds",
                "When the process started, in seconds since the Unix epoch",
                None,
                metric.metric_type(),
            )?)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_survive_a_command_with_spaces_and_parens() {
        let stat = "4242 (my (odd) cmd) S 1 4242 4242 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 4 0 1234 10000 300";
        let fields = stat_fields(stat);
        assert_eq!(fields[0], "S");
        assert_eq!(fields[14 - 3], "250");
        assert_eq!(fields[22 - 3], "1234");
        assert_eq!(
            status_bytes("VmRSS:\t  2048 kB\n", "VmRSS:"),
            Some(2 * 1024 * 1024)
        );
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn this_process_is_sampled() {
        let s = sample();
        assert!(s.cpu_seconds.is_some_and(|c| c >= 0.0));
        assert!(s.resident_bytes.is_some_and(|r| r > 0));
        assert!(s.open_fds.is_some_and(|n| n > 0));
        assert!(s.start_time_seconds.is_some_and(|t| t > 1.6e9));
    }
}
