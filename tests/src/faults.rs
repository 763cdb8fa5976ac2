//! A fault-injecting HTTP proxy in front of the FHIR test server: a share of requests get 429,
//! 503, a reset connection or a stall, and an outage resets every connection for a while.
//!
//! It works one request per connection (it forwards with `Connection: close` and closes after
//! the answer), so a fault hits a request, not a pooled connection the client reuses. Requests
//! must carry a `Content-Length` (reqwest sends one for the bodies iomt writes).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// What the proxy did, by kind.
#[derive(Debug, Default)]
pub struct FaultCounts {
    pub forwarded: AtomicU64,
    pub too_many_requests: AtomicU64,
    pub unavailable: AtomicU64,
    pub reset: AtomicU64,
    pub stalled: AtomicU64,
    pub outage: AtomicU64,
}

impl FaultCounts {
    /// Requests seen.
    pub fn requests(&self) -> u64 {
        self.forwarded.load(Ordering::Relaxed) + self.faults()
    }

    /// Requests that got a fault (the stalled ones were forwarded after the stall too late for
    /// the client, which had given up).
    pub fn faults(&self) -> u64 {
        [
            &self.too_many_requests,
            &self.unavailable,
            &self.reset,
            &self.stalled,
            &self.outage,
        ]
        .iter()
        .map(|c| c.load(Ordering::Relaxed))
        .sum()
    }

    pub fn describe(&self) -> String {
        format!(
            "{} requests: {} forwarded, {} answered 429, {} answered 503, {} reset, {} stalled, {} reset during the outage",
            self.requests(),
            self.forwarded.load(Ordering::Relaxed),
            self.too_many_requests.load(Ordering::Relaxed),
            self.unavailable.load(Ordering::Relaxed),
            self.reset.load(Ordering::Relaxed),
            self.stalled.load(Ordering::Relaxed),
            self.outage.load(Ordering::Relaxed),
        )
    }
}

/// The proxy, serving until the runtime it was started on stops.
#[derive(Debug)]
pub struct FaultProxy {
    /// `http://127.0.0.1:PORT`: the upstream's paths are the same under it.
    pub base: String,
    pub counts: Arc<FaultCounts>,
    outage_until: Arc<Mutex<Option<Instant>>>,
}

/// How the proxy misbehaves.
#[derive(Debug, Clone, Copy)]
pub struct Faults {
    /// The share of requests that get a fault, split evenly among 429, 503, reset and stall.
    pub rate: f64,
    /// How long a stalled request is held before it is forwarded (longer than the client's
    /// request timeout makes it a timeout).
    pub stall: Duration,
}

impl FaultProxy {
    /// Starts a proxy to `upstream` (`host:port`) on `rt`.
    pub fn start(rt: &tokio::runtime::Runtime, upstream: &str, faults: Faults) -> Self {
        let listener = rt
            .block_on(TcpListener::bind("127.0.0.1:0"))
            .expect("the proxy binds");
        let base = format!("http://{}", listener.local_addr().unwrap());
        let counts = Arc::new(FaultCounts::default());
        let outage_until = Arc::new(Mutex::new(None::<Instant>));
        let upstream = upstream.to_owned();
        let (c, o) = (counts.clone(), outage_until.clone());
        rt.spawn(async move {
            let rng = Mutex::new(fastrand::Rng::with_seed(0x00fa_0175));
            let rng = Arc::new(rng);
            while let Ok((client, _)) = listener.accept().await {
                let (upstream, c, o, rng) = (upstream.clone(), c.clone(), o.clone(), rng.clone());
                tokio::spawn(async move {
                    let draw = rng.lock().unwrap().f64();
                    serve(client, &upstream, faults, draw, &c, &o).await;
                });
            }
        });
        FaultProxy {
            base,
            counts,
            outage_until,
        }
    }

    /// Resets every connection from now on for `length`.
    pub fn outage(&self, length: Duration) {
        *self.outage_until.lock().unwrap() = Some(Instant::now() + length);
    }
}

async fn serve(
    mut client: TcpStream,
    upstream: &str,
    faults: Faults,
    draw: f64,
    counts: &FaultCounts,
    outage_until: &Mutex<Option<Instant>>,
) {
    let Some(request) = read_request(&mut client).await else {
        return;
    };
    let in_outage = outage_until
        .lock()
        .unwrap()
        .is_some_and(|until| Instant::now() < until);
    let share = faults.rate / 4.0;
    if in_outage {
        counts.outage.fetch_add(1, Ordering::Relaxed);
        return reset(client);
    }
    if draw < share {
        counts.too_many_requests.fetch_add(1, Ordering::Relaxed);
        let answer = "HTTP/1.1 429 Too Many Requests\r\nRetry-After: 1\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";
        client.write_all(answer.as_bytes()).await.ok();
        return;
    }
    if draw < 2.0 * share {
        counts.unavailable.fetch_add(1, Ordering::Relaxed);
        let answer = "HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/html\r\nContent-Length: 21\r\nConnection: close\r\n\r\n<h1>unavailable</h1>\n";
        client.write_all(answer.as_bytes()).await.ok();
        return;
    }
    if draw < 3.0 * share {
        counts.reset.fetch_add(1, Ordering::Relaxed);
        return reset(client);
    }
    if draw < 4.0 * share {
        counts.stalled.fetch_add(1, Ordering::Relaxed);
        tokio::time::sleep(faults.stall).await;
    } else {
        counts.forwarded.fetch_add(1, Ordering::Relaxed);
    }
    let Ok(mut server) = TcpStream::connect(upstream).await else {
        return reset(client);
    };
    if server.write_all(&request).await.is_err() {
        return reset(client);
    }
    let mut answer = Vec::new();
    if server.read_to_end(&mut answer).await.is_err() {
        return reset(client);
    }
    client.write_all(&answer).await.ok();
}

/// Closes with a TCP reset rather than a clean close.
fn reset(client: TcpStream) {
    client.set_zero_linger().ok();
    drop(client);
}

/// Reads one request (head and `Content-Length` body) and rewrites it to close the connection
/// after the answer.
async fn read_request(client: &mut TcpStream) -> Option<Vec<u8>> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = client.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut length = 0usize;
    let mut lines: Vec<&str> = Vec::new();
    for line in head.trim_end().split("\r\n") {
        let lower = line.to_ascii_lowercase();
        if let Some(v) = lower.strip_prefix("content-length:") {
            length = v.trim().parse().ok()?;
        }
        if lower.starts_with("connection:") || lower.starts_with("keep-alive:") {
            continue;
        }
        lines.push(line);
    }
    while buf.len() < head_end + length {
        let n = client.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let mut request = lines.join("\r\n").into_bytes();
    request.extend_from_slice(b"\r\nConnection: close\r\n\r\n");
    request.extend_from_slice(&buf[head_end..head_end + length]);
    Some(request)
}
