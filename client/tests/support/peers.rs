//! Peers that are not (quite) a capsync server, for the tests of what the client does when
//! `--server` points at the wrong thing or the server stops answering: a listener that
//! answers in another protocol, and a relay in front of the real server that holds back
//! its answers after the first few.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// A listener that answers every connection with `reply`, then closes it: a stand-in for
/// whatever else may listen where a capsync server was expected (an SSH or mail server).
pub fn foreign_listener(reply: &'static [u8]) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    let addr = listener.local_addr().expect("local addr");
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            let _ = stream.write_all(reply);
            let _ = stream.shutdown(Shutdown::Write);
            // Drain what the client sends until it hangs up, so it sees the reply, not a reset.
            let _ = std::io::copy(&mut stream, &mut std::io::sink());
        }
    });
    addr
}

/// A TCP relay in front of a real server. It passes everything the client sends, and only
/// the first `answers` Cap'n Proto messages the server sends back; the rest it swallows,
/// so from then on the server seems to stop answering (a hung server, a dead link that
/// still looks open). Counting messages keeps that point exact: the connect handshake is
/// the server's first message (the bootstrap answer), redeeming a token the second.
pub struct HoldingRelay {
    addr: SocketAddr,
    /// Tells the accept loop to end.
    stopped: Arc<AtomicBool>,
}

impl HoldingRelay {
    pub fn start(server: SocketAddr, answers: usize) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("local addr");
        let stopped = Arc::new(AtomicBool::new(false));
        let stop = stopped.clone();
        std::thread::spawn(move || {
            for client in listener.incoming() {
                if stop.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(client) = client else { return };
                let Ok(upstream) = TcpStream::connect(server) else {
                    continue;
                };
                relay(client, upstream, answers);
            }
        });
        Self { addr, stopped }
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for HoldingRelay {
    fn drop(&mut self) {
        self.stopped.store(true, Ordering::SeqCst);
        // Wakes the accept loop so it sees the flag.
        let _ = TcpStream::connect(self.addr);
    }
}

fn relay(client: TcpStream, upstream: TcpStream, answers: usize) {
    let (mut from_client, mut to_upstream) =
        (client.try_clone().unwrap(), upstream.try_clone().unwrap());
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut from_client, &mut to_upstream);
        let _ = to_upstream.shutdown(Shutdown::Write);
    });
    let (mut from_upstream, mut to_client) = (upstream, client);
    std::thread::spawn(move || {
        for _ in 0..answers {
            match read_message(&mut from_upstream) {
                Ok(message) if to_client.write_all(&message).is_ok() => {}
                _ => return,
            }
        }
        // Held back: read, so the server is never blocked, and never delivered.
        let _ = std::io::copy(&mut from_upstream, &mut std::io::sink());
        drop(to_client);
    });
}

/// One Cap'n Proto message in the standard framing: the segment table (a count, then
/// each segment's size in words, padded to 8 bytes), then the segments.
fn read_message(stream: &mut impl Read) -> std::io::Result<Vec<u8>> {
    let mut message = vec![0u8; 8];
    stream.read_exact(&mut message)?;
    let word = |bytes: &[u8], at: usize| u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap());
    let segments = word(&message, 0) as usize + 1;
    let table = (4 + 4 * segments).next_multiple_of(8);
    message.resize(table, 0);
    stream.read_exact(&mut message[8..])?;
    let words: usize = (0..segments)
        .map(|i| word(&message, 4 + 4 * i) as usize)
        .sum();
    let start = message.len();
    message.resize(start + 8 * words, 0);
    stream.read_exact(&mut message[start..])?;
    Ok(message)
}
