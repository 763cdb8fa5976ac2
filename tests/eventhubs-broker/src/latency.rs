//! A socket wrapper that delivers everything the broker writes a fixed time later, like a
//! network hop.
//!
//! Why: over loopback the broker answers within microseconds, faster than any real Event Hubs
//! namespace, and that exposes a race in fe2o3-amqp 0.16 (the SDK 0.16's AMQP stack). After each
//! CBS `put-token` the SDK drops its two CBS links and their session at once. If the broker's
//! reply to one of those detaches reaches the client before the client's session task has
//! processed its own end, the client fails the session (`UnattachedHandle`) and then closes the
//! whole connection with `amqp:not-found` ("Session is not found"), which fails the operation
//! that needed the token. A few milliseconds of latency keep the reply behind the client's end,
//! as a network always does. Writes are pipelined: throughput is unchanged, only latency is
//! added.

use std::{
    io,
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use tokio::{
    io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf},
    net::{
        TcpStream,
        tcp::{OwnedReadHalf, OwnedWriteHalf},
    },
    sync::mpsc,
    time::Instant,
};
use tracing::debug;

/// What the writer task does next.
#[derive(Debug)]
enum Chunk {
    Bytes { due: Instant, bytes: Vec<u8> },
    Shutdown { due: Instant },
}

/// A TCP stream whose writes reach the peer `latency` later.
#[derive(Debug)]
pub(crate) struct DelayedStream {
    read: OwnedReadHalf,
    /// `None` once shut down.
    write: Option<mpsc::UnboundedSender<Chunk>>,
    latency: Duration,
}

impl DelayedStream {
    /// Wraps `stream`; with a zero latency the writer task still orders the writes, at no delay.
    pub(crate) fn new(stream: TcpStream, latency: Duration) -> Self {
        let (read, write) = stream.into_split();
        let (sender, receiver) = mpsc::unbounded_channel();
        tokio::spawn(write_delayed(write, receiver));
        Self {
            read,
            write: Some(sender),
            latency,
        }
    }
}

/// Writes each chunk when it is due; ends on a write error (the sender then sees a closed
/// channel and reports a broken pipe) or when the stream is dropped and everything is written.
async fn write_delayed(mut socket: OwnedWriteHalf, mut chunks: mpsc::UnboundedReceiver<Chunk>) {
    while let Some(chunk) = chunks.recv().await {
        let result = match chunk {
            Chunk::Bytes { due, bytes } => {
                tokio::time::sleep_until(due).await;
                socket.write_all(&bytes).await
            }
            Chunk::Shutdown { due } => {
                tokio::time::sleep_until(due).await;
                socket.shutdown().await
            }
        };
        if let Err(error) = result {
            debug!(%error, "socket write failed");
            return;
        }
    }
}

impl AsyncRead for DelayedStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.read).poll_read(cx, buf)
    }
}

impl AsyncWrite for DelayedStream {
    fn poll_write(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let due = Instant::now() + self.latency;
        let sent = self.write.as_ref().is_some_and(|write| {
            write
                .send(Chunk::Bytes {
                    due,
                    bytes: buf.to_vec(),
                })
                .is_ok()
        });
        if sent {
            Poll::Ready(Ok(buf.len()))
        } else {
            Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()))
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Everything written is queued in order; the writer task delivers it when due.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let due = Instant::now() + self.latency;
        let stopped = self
            .write
            .take()
            .is_some_and(|write| write.send(Chunk::Shutdown { due }).is_err());
        if stopped {
            // The writer already stopped on an error: there is nothing left to shut.
            debug!("shutdown after a failed write");
        }
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use tokio::{
        io::{AsyncReadExt, AsyncWriteExt},
        net::TcpListener,
    };

    use super::*;

    #[tokio::test]
    async fn writes_arrive_in_order_after_the_latency() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let client = tokio::spawn(async move {
            let mut socket = TcpStream::connect(addr).await.unwrap();
            let mut received = Vec::new();
            socket.read_to_end(&mut received).await.unwrap();
            received
        });
        let (socket, _) = listener.accept().await.unwrap();
        let latency = Duration::from_millis(30);
        let mut stream = DelayedStream::new(socket, latency);
        let start = Instant::now();
        stream.write_all(b"hello ").await.unwrap();
        stream.write_all(b"world").await.unwrap();
        stream.shutdown().await.unwrap();
        drop(stream);
        assert_eq!(client.await.unwrap(), b"hello world");
        assert!(start.elapsed() >= latency);
    }
}
