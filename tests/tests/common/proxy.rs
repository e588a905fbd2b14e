//! A fault-injecting TCP proxy for tests: agents connect to it, it connects to the
//! coordinator, and each connection gets faults drawn from a seeded generator:
//!
//! * a delay on every chunk forwarded,
//! * a bandwidth cap,
//! * a cut after some bytes: a drop (both sides closed) or a reset (RST, SO_LINGER 0),
//! * half-open: after some bytes it stops forwarding but keeps both sockets open, so only
//!   the peers' timeouts end the connection.
//!
//! [`Faults::forced`] lets a test cut given connections at a fixed point (an interrupted
//! first download). [`ProxyStats`] counts what was injected.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::SplitMix64;

/// What faults to inject; probabilities are per connection.
#[derive(Debug, Clone)]
pub struct Faults {
    /// Delay added to each forwarded chunk, drawn in `[0, max_delay]`.
    pub max_delay: Duration,
    /// Bytes per second each direction may carry (0: unlimited).
    pub bandwidth: u64,
    /// Probability a connection is dropped after some bytes.
    pub drop: f64,
    /// Probability a connection is reset after some bytes.
    pub reset: f64,
    /// Probability a connection goes half-open after some bytes.
    pub half_open: f64,
    /// The cut or stall happens after a number of bytes drawn in this range.
    pub after_bytes: (u64, u64),
    /// Connections from number `forced_from` on get these cuts, in order, after
    /// `forced_cut_bytes` sent to the client, whatever the probabilities.
    pub forced: Vec<Cut>,
    /// See `forced`.
    pub forced_from: u64,
    /// See `forced`.
    pub forced_cut_bytes: u64,
}

impl Faults {
    /// No fault.
    pub fn none() -> Self {
        Self {
            max_delay: Duration::ZERO,
            bandwidth: 0,
            drop: 0.0,
            reset: 0.0,
            half_open: 0.0,
            after_bytes: (0, 0),
            forced: Vec::new(),
            forced_from: 0,
            forced_cut_bytes: 0,
        }
    }
}

/// What the proxy injected.
#[derive(Debug, Default)]
pub struct ProxyStats {
    /// Connections accepted.
    pub connections: AtomicU64,
    /// Connections dropped mid-stream.
    pub dropped: AtomicU64,
    /// Connections reset mid-stream.
    pub reset: AtomicU64,
    /// Connections left half-open.
    pub half_open: AtomicU64,
    /// Bytes forwarded to clients.
    pub bytes_down: AtomicU64,
}

/// A running proxy.
pub struct FaultProxy {
    /// Where clients connect.
    pub addr: SocketAddr,
    /// Counters.
    pub stats: Arc<ProxyStats>,
    faults: Arc<Mutex<Faults>>,
    task: tokio::task::JoinHandle<()>,
}

impl FaultProxy {
    /// Start a proxy in front of `upstream` with `faults`, seeded by `seed`.
    pub async fn start(upstream: SocketAddr, faults: Faults, seed: u64) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("proxy address");
        let stats = Arc::new(ProxyStats::default());
        let faults = Arc::new(Mutex::new(faults));
        let (s, f) = (stats.clone(), faults.clone());
        let task = tokio::spawn(async move {
            let mut rng = SplitMix64(seed);
            loop {
                let Ok((client, _)) = listener.accept().await else { return };
                let n = s.connections.fetch_add(1, Ordering::SeqCst);
                let plan = Plan::draw(&f.lock().expect("faults"), n, &mut rng);
                let stats = s.clone();
                tokio::spawn(async move {
                    if let Ok(server) = TcpStream::connect(upstream).await {
                        plan.run(client, server, stats).await;
                    }
                });
            }
        });
        Self { addr, stats, faults, task }
    }

    /// Change the faults of connections accepted from now on.
    pub fn set(&self, faults: Faults) {
        *self.faults.lock().expect("faults") = faults;
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// How a connection ends early.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Cut {
    /// It does not.
    None,
    /// Both sides closed (FIN).
    Drop,
    /// The client side reset (RST).
    Reset,
    /// Silence with both sockets open.
    HalfOpen,
}

/// The faults of one connection.
#[derive(Debug, Clone, Copy)]
struct Plan {
    delay: Duration,
    bandwidth: u64,
    cut: Cut,
    after: u64,
}

impl Plan {
    fn draw(f: &Faults, n: u64, rng: &mut SplitMix64) -> Self {
        let delay = Duration::from_micros(rng.range(0, f.max_delay.as_micros() as u64));
        let forced = n.checked_sub(f.forced_from).and_then(|i| f.forced.get(i as usize));
        let (cut, after) = if let Some(&cut) = forced {
            (cut, f.forced_cut_bytes)
        } else {
            let u = rng.unit();
            let cut = if u < f.drop {
                Cut::Drop
            } else if u < f.drop + f.reset {
                Cut::Reset
            } else if u < f.drop + f.reset + f.half_open {
                Cut::HalfOpen
            } else {
                Cut::None
            };
            (cut, rng.range(f.after_bytes.0, f.after_bytes.1))
        };
        Self { delay, bandwidth: f.bandwidth, cut, after }
    }

    async fn run(self, mut client: TcpStream, mut server: TcpStream, stats: Arc<ProxyStats>) {
        let _ = client.set_nodelay(true);
        let _ = server.set_nodelay(true);
        let mut left = if self.cut == Cut::None { u64::MAX } else { self.after };
        let (mut up, mut down) = (vec![0u8; 16 << 10], vec![0u8; 16 << 10]);
        {
            let (mut cr, mut cw) = client.split();
            let (mut sr, mut sw) = server.split();
            loop {
                // Read whichever side has bytes; `read` is cancel-safe.
                let (n, toward_client) = tokio::select! {
                    r = cr.read(&mut up) => (r.unwrap_or(0), false),
                    r = sr.read(&mut down) => (r.unwrap_or(0), true),
                };
                if n == 0 {
                    // One side closed: close the other, as a plain proxy does.
                    let _ = cw.shutdown().await;
                    let _ = sw.shutdown().await;
                    return;
                }
                let take = (n as u64).min(left) as usize;
                if left != u64::MAX {
                    left -= take as u64;
                }
                if !self.delay.is_zero() {
                    tokio::time::sleep(self.delay).await;
                }
                if self.bandwidth > 0 {
                    tokio::time::sleep(Duration::from_secs_f64(take as f64 / self.bandwidth as f64)).await;
                }
                let written = if toward_client {
                    stats.bytes_down.fetch_add(take as u64, Ordering::Relaxed);
                    cw.write_all(&down[..take]).await
                } else {
                    sw.write_all(&up[..take]).await
                };
                if written.is_err() {
                    return;
                }
                if left == 0 {
                    break;
                }
            }
        }
        match self.cut {
            Cut::Drop => {
                stats.dropped.fetch_add(1, Ordering::Relaxed);
                let _ = client.shutdown().await;
            }
            Cut::Reset => {
                stats.reset.fetch_add(1, Ordering::Relaxed);
                #[allow(deprecated)]
                let _ = client.set_linger(Some(Duration::ZERO));
            }
            Cut::HalfOpen => {
                stats.half_open.fetch_add(1, Ordering::Relaxed);
                // Both sockets stay open and silent until the peers' timeouts end them.
                tokio::time::sleep(Duration::from_secs(120)).await;
            }
            Cut::None => {}
        }
        drop((client, server));
    }
}
