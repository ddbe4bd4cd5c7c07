//! A TCP fault proxy to put between a client and a server: it forwards bytes both ways and,
//! on request, drops a response after the server got the request, cuts a request or a
//! response part way, delays traffic, or cuts every connection at once.
//!
//! The proxy runs on its own thread with its own runtime, so it works whatever runtime the
//! test uses; [`FaultControl`] is `Send + Clone` and can be driven from any thread or task.
//! Faults act on bytes as TCP delivers them, not on Cap'n Proto messages: a chunk may hold
//! part of a message or several. Any cut or drop there is a fault a real network can cause,
//! so the system's invariants must hold whatever the proxy does.
//!
//! Like [`super::model`] this file uses only `tokio` and `rand`, so the server's own tests can
//! include it with `#[path]`.

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener as StdListener};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// Faults the proxy actually caused (an armed fault counts once it fires).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FaultCounts {
    /// Client connections accepted.
    pub connections: u64,
    /// Connections refused because the server could not be reached.
    pub refused: u64,
    /// Server-to-client bytes discarded after a request reached the server; both sides closed.
    pub responses_dropped: u64,
    /// Client-to-server chunks forwarded only in part; both sides closed.
    pub requests_cut: u64,
    /// Server-to-client chunks forwarded only in part; both sides closed.
    pub responses_cut: u64,
    /// Connections closed by [`FaultControl::cut_all`] (or a proxy-side I/O failure).
    pub connections_cut: u64,
    /// Chunks held back by a delay.
    pub chunks_delayed: u64,
}

impl FaultCounts {
    /// Faults that broke a connection: dropped responses, cut requests and responses, cut
    /// connections.
    pub fn disruptive(&self) -> u64 {
        self.responses_dropped + self.requests_cut + self.responses_cut + self.connections_cut
    }
}

/// A running proxy. Dropping it stops the proxy and closes every connection through it.
pub struct FaultProxy {
    addr: SocketAddr,
    control: FaultControl,
    /// Tells the proxy thread to stop.
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// Shared between the control handle and the proxy thread.
struct Shared {
    /// Where new connections go; [`FaultControl::set_target`] moves it (a restarted server).
    target: Mutex<SocketAddr>,
    /// Armed: the next request's response is dropped.
    drop_response: AtomicBool,
    /// Armed: the next request chunk is forwarded only in part.
    cut_request: AtomicBool,
    /// Armed: the next response chunk is forwarded only in part.
    cut_response: AtomicBool,
    /// Held before forwarding each chunk, both ways; zero for none.
    delay: Mutex<Duration>,
    /// Chooses where a request is cut.
    rng: Mutex<StdRng>,
    /// Kill switches of the live connections, by connection number.
    connections: Mutex<HashMap<u64, watch::Sender<bool>>>,
    next_connection: AtomicU64,
    accepted: AtomicU64,
    refused: AtomicU64,
    responses_dropped: AtomicU64,
    requests_cut: AtomicU64,
    responses_cut: AtomicU64,
    connections_cut: AtomicU64,
    chunks_delayed: AtomicU64,
}

/// Sets faults on a [`FaultProxy`]; cheap to clone, usable from any thread.
#[derive(Clone)]
pub struct FaultControl {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for FaultControl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FaultControl")
            .field("counts", &self.counts())
            .finish_non_exhaustive()
    }
}

impl FaultProxy {
    /// Starts a proxy on `127.0.0.1:0` forwarding to `target`; `seed` drives its own random
    /// choices (where a request is cut). Ready to accept when this returns.
    pub fn start(target: SocketAddr, seed: u64) -> Self {
        let listener = StdListener::bind("127.0.0.1:0").expect("bind the proxy");
        listener
            .set_nonblocking(true)
            .expect("nonblocking listener");
        let addr = listener.local_addr().expect("proxy address");
        let shared = Arc::new(Shared {
            target: Mutex::new(target),
            drop_response: AtomicBool::new(false),
            cut_request: AtomicBool::new(false),
            cut_response: AtomicBool::new(false),
            delay: Mutex::new(Duration::ZERO),
            rng: Mutex::new(StdRng::seed_from_u64(seed)),
            connections: Mutex::new(HashMap::new()),
            next_connection: AtomicU64::new(0),
            accepted: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            responses_dropped: AtomicU64::new(0),
            requests_cut: AtomicU64::new(0),
            responses_cut: AtomicU64::new(0),
            connections_cut: AtomicU64::new(0),
            chunks_delayed: AtomicU64::new(0),
        });
        let (stop, stopped) = tokio::sync::oneshot::channel();
        let thread = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("fault-proxy".into())
                .spawn(move || {
                    let runtime = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .expect("proxy runtime");
                    runtime.block_on(async move {
                        let listener = TcpListener::from_std(listener).expect("tokio listener");
                        tokio::select! {
                            () = accept_loop(listener, shared) => {}
                            _ = stopped => {}
                        }
                    });
                    // Dropping the runtime drops every pump task, closing their sockets.
                })
                .expect("spawn the proxy thread")
        };
        Self {
            addr,
            control: FaultControl { shared },
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn control(&self) -> FaultControl {
        self.control.clone()
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl FaultControl {
    /// The next server-to-client bytes after the next client-to-server bytes (on the same
    /// connection) are discarded and both sides closed: the server has the request, and has
    /// likely acted on it, but the client never hears back.
    pub fn drop_next_response(&self) {
        self.shared.drop_response.store(true, Ordering::SeqCst);
    }

    /// The next client-to-server chunk is forwarded only in part (possibly not at all), then
    /// both sides are closed.
    pub fn cut_next_request(&self) {
        self.shared.cut_request.store(true, Ordering::SeqCst);
    }

    /// The next server-to-client chunk is forwarded only in part (possibly not at all), then
    /// both sides are closed: the client gets a truncated message.
    pub fn cut_next_response(&self) {
        self.shared.cut_response.store(true, Ordering::SeqCst);
    }

    /// Holds every chunk, both ways, for `delay` before forwarding it (`Duration::ZERO`: none).
    pub fn delay(&self, delay: Duration) {
        *self.shared.delay.lock().unwrap() = delay;
    }

    /// Closes every connection through the proxy now. Returns how many there were.
    pub fn cut_all(&self) -> usize {
        let connections: Vec<_> = self.shared.connections.lock().unwrap().drain().collect();
        for (_, kill) in &connections {
            let _ = kill.send(true);
        }
        self.shared
            .connections_cut
            .fetch_add(connections.len() as u64, Ordering::SeqCst);
        connections.len()
    }

    /// Sends new connections to `target` from now on (existing ones stay where they are).
    pub fn set_target(&self, target: SocketAddr) {
        *self.shared.target.lock().unwrap() = target;
    }

    /// Disarms pending one-shot faults and clears the delay.
    pub fn heal(&self) {
        self.shared.drop_response.store(false, Ordering::SeqCst);
        self.shared.cut_request.store(false, Ordering::SeqCst);
        self.shared.cut_response.store(false, Ordering::SeqCst);
        self.delay(Duration::ZERO);
    }

    /// Live connections through the proxy.
    pub fn live_connections(&self) -> usize {
        self.shared.connections.lock().unwrap().len()
    }

    pub fn counts(&self) -> FaultCounts {
        let s = &self.shared;
        FaultCounts {
            connections: s.accepted.load(Ordering::SeqCst),
            refused: s.refused.load(Ordering::SeqCst),
            responses_dropped: s.responses_dropped.load(Ordering::SeqCst),
            requests_cut: s.requests_cut.load(Ordering::SeqCst),
            responses_cut: s.responses_cut.load(Ordering::SeqCst),
            connections_cut: s.connections_cut.load(Ordering::SeqCst),
            chunks_delayed: s.chunks_delayed.load(Ordering::SeqCst),
        }
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let Ok((client, _)) = listener.accept().await else {
            continue;
        };
        shared.accepted.fetch_add(1, Ordering::SeqCst);
        let shared = shared.clone();
        tokio::spawn(async move {
            let target = *shared.target.lock().unwrap();
            let Ok(server) = TcpStream::connect(target).await else {
                // The server is down (killed, restarting): the client sees its connection
                // close, as it would connecting to the server directly.
                shared.refused.fetch_add(1, Ordering::SeqCst);
                return;
            };
            let _ = client.set_nodelay(true);
            let _ = server.set_nodelay(true);
            let id = shared.next_connection.fetch_add(1, Ordering::SeqCst);
            let (kill, killed) = watch::channel(false);
            shared.connections.lock().unwrap().insert(id, kill.clone());
            let (client_read, client_write) = client.into_split();
            let (server_read, server_write) = server.into_split();
            // Set by the request pump when it forwards a request whose response must go.
            let dropping = Arc::new(AtomicBool::new(false));
            let up = pump_requests(
                client_read,
                server_write,
                shared.clone(),
                dropping.clone(),
                killed.clone(),
            );
            let down = pump_responses(server_read, client_write, shared.clone(), dropping, killed);
            // Either direction ending ends the connection: both sockets close when dropped.
            tokio::select! {
                () = up => {}
                () = down => {}
            }
            shared.connections.lock().unwrap().remove(&id);
        });
    }
}

/// Waits until the connection's kill switch is thrown.
async fn killed(mut kill: watch::Receiver<bool>) {
    while !*kill.borrow_and_update() {
        if kill.changed().await.is_err() {
            // The sender lives in the registry until the connection ends; gone means cut.
            return;
        }
    }
}

async fn hold(shared: &Shared) {
    let delay = *shared.delay.lock().unwrap();
    if !delay.is_zero() {
        shared.chunks_delayed.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(delay).await;
    }
}

/// Client to server.
async fn pump_requests(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    shared: Arc<Shared>,
    dropping: Arc<AtomicBool>,
    kill: watch::Receiver<bool>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = tokio::select! {
            read = from.read(&mut buf) => match read {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            },
            () = killed(kill.clone()) => return,
        };
        hold(&shared).await;
        if shared.cut_request.swap(false, Ordering::SeqCst) {
            let keep = shared.rng.lock().unwrap().random_range(0..n);
            let _ = to.write_all(&buf[..keep]).await;
            shared.requests_cut.fetch_add(1, Ordering::SeqCst);
            return;
        }
        if shared.drop_response.swap(false, Ordering::SeqCst) {
            dropping.store(true, Ordering::SeqCst);
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

/// Server to client.
async fn pump_responses(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    shared: Arc<Shared>,
    dropping: Arc<AtomicBool>,
    kill: watch::Receiver<bool>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = tokio::select! {
            read = from.read(&mut buf) => match read {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            },
            () = killed(kill.clone()) => return,
        };
        if dropping.load(Ordering::SeqCst) {
            shared.responses_dropped.fetch_add(1, Ordering::SeqCst);
            return;
        }
        hold(&shared).await;
        if shared.cut_response.swap(false, Ordering::SeqCst) {
            let keep = shared.rng.lock().unwrap().random_range(0..n);
            let _ = to.write_all(&buf[..keep]).await;
            shared.responses_cut.fetch_add(1, Ordering::SeqCst);
            return;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}
