//! What stands between the network and the server: connection slots,
//! accepting with back-off, and reading RPC frames within memory limits.
//!
//! - [`acceptor`]: accepts on a listener; slots per listener and per address,
//!   TCP keepalive, a growing wait (and summarised logs) when accepting fails.
//! - [`slots`]: the slot counts, and the address a limit counts a peer under.
//! - [`frames`]: an `AsyncRead` between a socket and capnp-rpc that hands on
//!   whole frames only, so memory follows bytes received, never sizes
//!   announced; a small allowance before the connection redeems a token, and
//!   a budget shared by all connections for large frames.

pub mod acceptor;
pub mod frames;
pub mod slots;

pub use acceptor::{AcceptPolicy, Accepted, Acceptor};
pub use frames::{ConnectionState, FrameGate, FrameLimits};
pub use slots::{ConnectionSlots, address_group};
