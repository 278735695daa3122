//! What keeps a served run's listener within bounds (INTERFACES.md "Remote runs"): the limits and
//! the variables that change them, the connection counts, and the refusals per peer address
//! (the lockout of token guessers, one log line per burst).

use super::frame::tame;
use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// The shortest token a server accepts (shorter ones are refused at start).
pub const MIN_TOKEN_LEN: usize = 16;

/// The bounds one server keeps (INTERFACES.md "Remote runs"); each can be changed by an
/// environment variable ([`Limits::from_env`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// The whole handshake must arrive within this time of connecting.
    pub handshake: Duration,
    /// Connections waiting for a handshake; more are closed at once.
    pub pending: usize,
    /// Connections in all (waiting, watching, steering); more are closed at once.
    pub connections: usize,
    /// Bytes waiting for one client beyond which it is dropped as too slow.
    pub queue_bytes: usize,
    /// Failed tokens from one peer address within [`Limits::lockout_window`] before its further
    /// failures are answered only after [`Limits::lockout_delay`].
    pub lockout_after: usize,
    /// The span in which failures count.
    pub lockout_window: Duration,
    /// How long a locked-out peer waits for each further refusal.
    pub lockout_delay: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            handshake: Duration::from_secs(5),
            pending: 16,
            connections: 64,
            queue_bytes: 64 << 20,
            lockout_after: 5,
            lockout_window: Duration::from_mins(1),
            lockout_delay: Duration::from_secs(2),
        }
    }
}

/// The environment variables that change [`Limits`], with what each sets.
pub const LIMIT_VARS: [(&str, &str); 5] = [
    (
        "MOPPA_SERVE_HANDSHAKE_S",
        "seconds a client has for its whole handshake (default 5)",
    ),
    (
        "MOPPA_SERVE_MAX_PENDING",
        "connections waiting for a handshake (default 16)",
    ),
    ("MOPPA_SERVE_MAX_CONNECTIONS", "connections in all (default 64)"),
    (
        "MOPPA_SERVE_QUEUE_MIB",
        "MiB queued for one client before it is dropped (default 64)",
    ),
    (
        "MOPPA_SERVE_LOCKOUT",
        "failed tokens per peer in 60 s before refusals wait 2 s (default 5)",
    ),
];

impl Limits {
    /// The defaults, changed by the variables of [`LIMIT_VARS`] that are set; the error names
    /// the variable and what it must be.
    pub fn from_env() -> Result<Self, String> {
        Self::from_vars(|name| std::env::var(name).ok())
    }

    /// [`Limits::from_env`] over any source of variables (tests).
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<Self, String> {
        let mut l = Self::default();
        let read = |name: &str, max: u64| -> Result<Option<u64>, String> {
            let Some(text) = var(name) else { return Ok(None) };
            match text.trim().parse::<u64>() {
                Ok(v) if (1..=max).contains(&v) => Ok(Some(v)),
                _ => Err(format!(
                    "{name} = {:?} must be a whole number in 1..={max}",
                    tame(&text, 40)
                )),
            }
        };
        if let Some(v) = read(LIMIT_VARS[0].0, 3600)? {
            l.handshake = Duration::from_secs(v);
        }
        if let Some(v) = read(LIMIT_VARS[1].0, 4096)? {
            l.pending = usize::try_from(v).unwrap_or(usize::MAX);
        }
        if let Some(v) = read(LIMIT_VARS[2].0, 4096)? {
            l.connections = usize::try_from(v).unwrap_or(usize::MAX);
        }
        if let Some(v) = read(LIMIT_VARS[3].0, 1 << 14)? {
            l.queue_bytes = usize::try_from(v << 20).unwrap_or(usize::MAX);
        }
        if let Some(v) = read(LIMIT_VARS[4].0, 1 << 20)? {
            l.lockout_after = usize::try_from(v).unwrap_or(usize::MAX);
        }
        Ok(l)
    }
}

/// One peer address's refusals: the failed tokens that count towards its lockout, and the log
/// lines it has cost (one per burst, with a count).
#[derive(Default)]
struct PeerRecord {
    failures: VecDeque<Instant>,
    /// Refusals not logged yet (the first of a burst is logged at once, the rest counted).
    unlogged: u64,
    last_refusal: Option<Instant>,
    logged_burst: bool,
}

/// Refusals per peer address and kind (a wrong token, a malformed handshake, …): lockout and
/// quiet logging.
#[derive(Default)]
pub(super) struct Peers {
    map: HashMap<(IpAddr, &'static str), PeerRecord>,
}

/// The kind of refusal that counts towards a lockout.
pub(super) const TOKEN: &str = "token";

/// A burst of refusals ends after this long without one (longer than a lockout's delay, so that
/// a locked-out peer's one try per delay is one burst).
const BURST_GAP: Duration = Duration::from_secs(5);
/// Peer addresses remembered at most (the oldest quiet ones are forgotten first).
const MAX_PEERS: usize = 4096;

impl Peers {
    /// Notes a refusal of `ip` of kind `kind` (`"token"`: a wrong token, which counts towards the
    /// lockout) and logs it if it starts a burst. Returns whether the refusal must wait (the
    /// peer is locked out).
    pub(super) fn refused(&mut self, ip: IpAddr, kind: &'static str, peer: &str, why: &str, limits: &Limits) -> bool {
        let now = Instant::now();
        let key = (ip, kind);
        if self.map.len() >= MAX_PEERS && !self.map.contains_key(&key) {
            self.map.retain(|_, r| {
                r.last_refusal
                    .is_some_and(|t| now.duration_since(t) < limits.lockout_window)
            });
            if self.map.len() >= MAX_PEERS {
                self.map.clear();
            }
        }
        let r = self.map.entry(key).or_default();
        let new_burst = r.last_refusal.is_none_or(|t| now.duration_since(t) > BURST_GAP);
        if new_burst && r.unlogged > 0 {
            eprintln!("serve: {} more refusal(s) of {ip} in its last burst", r.unlogged);
            r.unlogged = 0;
        }
        if new_burst || !r.logged_burst {
            eprintln!("serve: refused {peer}: {why}");
            r.logged_burst = true;
        } else {
            r.unlogged += 1;
        }
        r.last_refusal = Some(now);
        if kind != TOKEN {
            return false;
        }
        while r
            .failures
            .front()
            .is_some_and(|t| now.duration_since(*t) > limits.lockout_window)
        {
            r.failures.pop_front();
        }
        r.failures.push_back(now);
        if r.failures.len() > limits.lockout_after.max(1) * 4 {
            r.failures.pop_front();
        }
        r.failures.len() > limits.lockout_after
    }

    /// Logs the count of every burst that has ended.
    pub(super) fn flush(&mut self) {
        let now = Instant::now();
        for ((ip, _), r) in &mut self.map {
            if r.unlogged > 0 && r.last_refusal.is_some_and(|t| now.duration_since(t) > BURST_GAP) {
                eprintln!("serve: {} more refusal(s) of {ip} in its last burst", r.unlogged);
                r.unlogged = 0;
                r.logged_burst = false;
            }
        }
    }
}

/// Connections counted while they live (a slot is given back when its guard drops).
#[derive(Default)]
pub(super) struct Counts {
    pub(super) pending: AtomicUsize,
    pub(super) open: AtomicUsize,
    /// Refusals waiting out a lockout (each holds a thread, so they are bounded too).
    pub(super) delayed: AtomicUsize,
    /// Connections closed at once for the limits, not yet logged.
    pub(super) turned_away: AtomicUsize,
}

/// One slot of a counter, given back on drop.
pub(super) struct Slot<'a>(pub(super) &'a AtomicUsize);

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}
