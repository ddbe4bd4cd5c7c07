//! capsync's side of its opencode plugin: the journal the plugin writes
//! ([`journal`]), and the shipper that sends it to the server exactly once
//! ([`shipper`]), keeping what it has read and shared in a state file of its own
//! ([`state`]).

pub mod journal;
pub mod shipper;
pub mod state;
