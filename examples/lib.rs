//! Runnable capsync examples live beside this file (`cargo run -p capsync-examples --example NAME`);
//! sample session exports are in `sessions/`.
