//! Watching and steering a run over the network (`moppa train --serve`): length-delimited JSON
//! frames of the protocol's own events and commands ([`frame`]), the server a training process
//! runs ([`server`]) and the client the app and tests use ([`client`]). Loopback by default;
//! reach a server's run through an SSH tunnel (README).

pub mod client;
pub mod frame;
pub mod guard;
mod queue;
pub mod server;

pub use client::RemoteLink;
pub use guard::{LIMIT_VARS, Limits, MIN_TOKEN_LEN};
pub use server::{ServeOptions, Server};

/// The default address: loopback only (other machines reach it through an SSH tunnel).
pub const DEFAULT_ADDR: &str = "127.0.0.1:7878";

/// A fresh random token (128 bits, hex).
#[must_use]
pub fn new_token() -> String {
    use rand::Rng as _;
    format!("{:032x}", rand::rng().random::<u128>())
}
