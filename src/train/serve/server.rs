//! The server side of `moppa train --serve`: a listener, a hub that fans the worker's events out
//! to every client without ever blocking the worker, and one thread per client. A client that
//! connects mid-run first receives the run folder's history (streamed from the files), then live
//! events. Progress and snapshots are coalesced for a slow client; a client whose backlog of
//! other events grows past [`Limits::queue_bytes`], or that sends anything malformed, is dropped
//! alone. Nothing a peer sends before its token is checked sizes more than
//! [`super::frame::MAX_HANDSHAKE`] bytes, and the whole handshake has one deadline; connections
//! waiting for a handshake and connections in all are bounded; wrong tokens slow their peer down
//! (INTERFACES.md "Remote runs").

use super::frame::{
    Deadline, FrameError, Hello, MAX_HANDSHAKE, read_frame, read_frame_within, same_secret, tame, write_frame,
};
use crate::train::protocol::{Command, Event, Notice, PROTOCOL_VERSION};
use crate::train::replay::RunFolderReader;
use crate::train::runfolder::{ADAPTER, CONFIG_TOML};
use crossbeam_channel::{Receiver, Sender};
use std::collections::{HashMap, VecDeque};
use std::io::Write as _;
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// The shortest token a server accepts (shorter ones are refused at start).
pub const MIN_TOKEN_LEN: usize = 16;

/// The longest string from a peer that is kept or echoed (a probe image's name, a refusal's text).
pub const MAX_REMOTE_TEXT: usize = 256;

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

/// How a run is served.
#[derive(Clone, Debug)]
pub struct ServeOptions {
    /// `HOST:PORT` to listen on (port 0: any free port).
    pub addr: String,
    /// The token that lets a client send commands.
    pub token: String,
    /// Clients without the token may watch.
    pub public: bool,
    /// The run folder (the history a late client receives comes from it).
    pub run_dir: PathBuf,
    /// The run's id, told in the handshake.
    pub run_id: String,
    /// The bounds kept.
    pub limits: Limits,
}

/// One client's queue: what the hub has for it and its writer has not sent yet. Progress and
/// snapshots are coalesced (the latest wins); every other event is kept, in order, and counted
/// in bytes.
struct Queue {
    kept: VecDeque<(Event, usize)>,
    progress: Option<Event>,
    snapshot: Option<Event>,
    /// Bytes the kept events take (their JSON, plus the event itself).
    bytes: usize,
    limit: usize,
    /// The client is gone or dropped: stop queueing.
    closed: bool,
    /// What a dropped client still hears (why it is dropped).
    last_words: Vec<Event>,
    peer: String,
}

impl Queue {
    fn new(limit: usize, peer: String) -> Self {
        Self {
            kept: VecDeque::new(),
            progress: None,
            snapshot: None,
            bytes: 0,
            limit,
            closed: false,
            last_words: Vec::new(),
            peer,
        }
    }

    /// Queues `ev`, whose JSON takes `size` bytes (only kept events are counted).
    fn push(&mut self, ev: Event, size: usize) {
        if self.closed {
            return;
        }
        match ev {
            Event::Progress(_) => self.progress = Some(ev),
            Event::Snapshot(_) => self.snapshot = Some(ev),
            other => {
                let size = size + std::mem::size_of::<Event>();
                self.bytes += size;
                self.kept.push_back((other, size));
                if self.bytes > self.limit {
                    let limit = self.limit >> 20;
                    eprintln!(
                        "serve: dropped {}: more than {limit} MiB queued for it (it reads too slowly)",
                        self.peer
                    );
                    *self = Self {
                        closed: true,
                        last_words: vec![note(format!(
                            "dropped: more than {limit} MiB of events waited for this connection (it reads too slowly); reconnect to receive the run again from its folder"
                        ))],
                        ..Self::new(self.limit, std::mem::take(&mut self.peer))
                    };
                }
            }
        }
    }

    /// The next event to send: kept ones first, in order, then the latest progress and snapshot.
    fn pop(&mut self) -> Option<Event> {
        if let Some((ev, size)) = self.kept.pop_front() {
            self.bytes -= size;
            return Some(ev);
        }
        self.progress.take().or_else(|| self.snapshot.take())
    }

    fn is_empty(&self) -> bool {
        self.kept.is_empty() && self.progress.is_none() && self.snapshot.is_none()
    }
}

/// The size of `ev` as a frame (what it costs while it waits).
fn frame_size(ev: &Event) -> usize {
    match ev {
        Event::Progress(_) | Event::Snapshot(_) => 0,
        other => serde_json::to_vec(other).map_or(0, |v| v.len()),
    }
}

type Shared = Arc<(Mutex<Queue>, Condvar)>;

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
struct Peers {
    map: HashMap<(IpAddr, &'static str), PeerRecord>,
}

/// The kind of refusal that counts towards a lockout.
const TOKEN: &str = "token";

/// A burst of refusals ends after this long without one (longer than a lockout's delay, so that
/// a locked-out peer's one try per delay is one burst).
const BURST_GAP: Duration = Duration::from_secs(5);
/// Peer addresses remembered at most (the oldest quiet ones are forgotten first).
const MAX_PEERS: usize = 4096;

impl Peers {
    /// Notes a refusal of `ip` of kind `kind` (`"token"`: a wrong token, which counts towards the
    /// lockout) and logs it if it starts a burst. Returns whether the refusal must wait (the
    /// peer is locked out).
    fn refused(&mut self, ip: IpAddr, kind: &'static str, peer: &str, why: &str, limits: &Limits) -> bool {
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
    fn flush(&mut self) {
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
struct Counts {
    pending: AtomicUsize,
    open: AtomicUsize,
    /// Refusals waiting out a lockout (each holds a thread, so they are bounded too).
    delayed: AtomicUsize,
    /// Connections closed at once for the limits, not yet logged.
    turned_away: AtomicUsize,
}

/// One slot of a counter, given back on drop.
struct Slot<'a>(&'a AtomicUsize);

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// What every client thread shares.
struct Context {
    opts: ServeOptions,
    commands: Sender<Command>,
    clients: Mutex<Vec<Shared>>,
    stop: AtomicBool,
    counts: Counts,
    peers: Mutex<Peers>,
}

/// A running server; dropping it stops accepting clients and closes them.
pub struct Server {
    addr: SocketAddr,
    ctx: Arc<Context>,
}

impl Server {
    /// Binds `opts.addr` (before the run starts, so that an address in use fails at once).
    ///
    /// # Errors
    /// The address cannot be bound.
    pub fn bind(opts: &ServeOptions) -> std::io::Result<TcpListener> {
        TcpListener::bind(&opts.addr)
    }

    /// Serves on `listener`: fans `events` out to clients and forwards the commands of clients
    /// with the token to `commands`.
    ///
    /// # Errors
    /// The listener or a thread cannot be set up.
    pub fn start(
        listener: TcpListener,
        opts: ServeOptions,
        commands: Sender<Command>,
        events: Receiver<Event>,
    ) -> std::io::Result<Self> {
        let addr = listener.local_addr()?;
        listener.set_nonblocking(true)?;
        let ctx = Arc::new(Context {
            opts,
            commands,
            clients: Mutex::default(),
            stop: AtomicBool::new(false),
            counts: Counts::default(),
            peers: Mutex::new(Peers { map: HashMap::new() }),
        });
        // The hub: every event to every client's queue; it never waits on a client.
        let hub = ctx.clone();
        std::thread::Builder::new()
            .name("moppa-serve-hub".into())
            .spawn(move || {
                while !hub.stop.load(Ordering::Acquire) {
                    let Ok(ev) = events.recv_timeout(Duration::from_millis(200)) else {
                        continue;
                    };
                    let size = frame_size(&ev);
                    let Ok(mut list) = hub.clients.lock() else { return };
                    list.retain(|c| {
                        let Ok(mut q) = c.0.lock() else { return false };
                        q.push(ev.clone(), size);
                        c.1.notify_one();
                        !q.closed
                    });
                }
            })?;
        let accept = ctx.clone();
        std::thread::Builder::new()
            .name("moppa-serve-accept".into())
            .spawn(move || accept_loop(&listener, &accept))?;
        Ok(Self { addr, ctx })
    }

    /// The address it listens on.
    #[must_use]
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.ctx.stop.store(true, Ordering::Release);
    }
}

/// Accepts connections while the server runs: each within the limits gets a thread, the others
/// are closed at once (counted, and logged once a second at most).
fn accept_loop(listener: &TcpListener, ctx: &Arc<Context>) {
    let mut last_log = Instant::now();
    while !ctx.stop.load(Ordering::Acquire) {
        if last_log.elapsed() >= Duration::from_secs(1) {
            last_log = Instant::now();
            let n = ctx.counts.turned_away.swap(0, Ordering::AcqRel);
            if n > 0 {
                let l = &ctx.opts.limits;
                eprintln!(
                    "serve: closed {n} connection(s) at once (limits: {} waiting for a handshake, {} in all)",
                    l.pending, l.connections
                );
            }
            if let Ok(mut peers) = ctx.peers.lock() {
                peers.flush();
            }
        }
        match listener.accept() {
            Ok((stream, peer)) => {
                let c = &ctx.counts;
                let l = &ctx.opts.limits;
                // Both slots are taken here, on the accept thread, so that the limits hold
                // however fast connections arrive.
                let within =
                    c.open.load(Ordering::Acquire) < l.connections && c.pending.load(Ordering::Acquire) < l.pending;
                if !within {
                    c.turned_away.fetch_add(1, Ordering::AcqRel);
                    drop(stream);
                    continue;
                }
                c.open.fetch_add(1, Ordering::AcqRel);
                c.pending.fetch_add(1, Ordering::AcqRel);
                let ctx = ctx.clone();
                let spawned = std::thread::Builder::new()
                    .name("moppa-serve-client".into())
                    .spawn(move || {
                        let open = Slot(&ctx.counts.open);
                        let pending = Slot(&ctx.counts.pending);
                        serve_client(stream, peer, &ctx, pending);
                        drop(open);
                    });
                if spawned.is_err() {
                    c.open.fetch_sub(1, Ordering::AcqRel);
                    c.pending.fetch_sub(1, Ordering::AcqRel);
                }
            }
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// A notice for one client.
fn note(message: String) -> Event {
    Event::Warning(Notice {
        step: 0,
        time_s: 0.0,
        message,
        path: None,
        line: None,
    })
}

/// One client, start to end: handshake, history, then live events out and commands in.
fn serve_client(stream: TcpStream, peer: SocketAddr, ctx: &Arc<Context>, pending: Slot<'_>) {
    let opts = &ctx.opts;
    stream.set_nonblocking(false).ok();
    stream.set_nodelay(true).ok();
    // A client that stops reading must not hold its writer forever.
    stream.set_write_timeout(Some(Duration::from_secs(10))).ok();
    let ip = peer.ip();
    let peer = peer.to_string();
    let refuse = |w: &mut TcpStream, why: String, kind: &'static str| {
        let why = tame(&why, MAX_REMOTE_TEXT);
        let wait = ctx
            .peers
            .lock()
            .is_ok_and(|mut p| p.refused(ip, kind, &peer, &why, &opts.limits));
        let hello = Hello {
            protocol: PROTOCOL_VERSION,
            run_id: Some(opts.run_id.clone()),
            error: Some(why),
            ..Hello::default()
        };
        if wait {
            // Locked out: answered after the delay, by a bounded number of threads (more are
            // closed without an answer).
            let delayed = &ctx.counts.delayed;
            if delayed.fetch_add(1, Ordering::AcqRel) < opts.limits.pending {
                std::thread::sleep(opts.limits.lockout_delay);
                write_frame(w, &hello).ok();
            }
            delayed.fetch_sub(1, Ordering::AcqRel);
        } else {
            write_frame(w, &hello).ok();
        }
    };
    let (Ok(reader), mut writer) = (stream.try_clone(), stream) else {
        return;
    };
    // The handshake: at most MAX_HANDSHAKE bytes, all within one deadline.
    let hello = read_frame_within(&mut Deadline::new(&reader, opts.limits.handshake), MAX_HANDSHAKE)
        .and_then(|b| serde_json::from_slice::<Hello>(&b).map_err(|e| FrameError::Malformed(e.to_string())));
    let hello = match hello {
        Ok(h) => h,
        Err(e) => {
            refuse(&mut writer, format!("expected a handshake: {e}"), "handshake");
            return;
        }
    };
    if hello.protocol != PROTOCOL_VERSION {
        refuse(
            &mut writer,
            format!(
                "this server speaks protocol {PROTOCOL_VERSION}, the client {}: use the same version of moppa on both sides",
                hello.protocol
            ),
            "protocol",
        );
        return;
    }
    if hello.run_id.as_ref().is_some_and(|id| *id != opts.run_id) {
        refuse(
            &mut writer,
            format!("this server runs {}, not the run asked for", opts.run_id),
            "run",
        );
        return;
    }
    let control = hello.token.as_deref().is_some_and(|t| same_secret(t, &opts.token));
    // No longer waiting for a handshake: a refusal that waits out a lockout must not keep others
    // from shaking hands.
    drop(pending);
    if !control && (hello.token.is_some() || !opts.public) {
        if hello.token.is_some() {
            refuse(&mut writer, "wrong token".into(), TOKEN);
        } else {
            refuse(
                &mut writer,
                "this run is not public: a token is needed (moppa train printed it)".into(),
                "public",
            );
        }
        return;
    }
    let ok = Hello {
        protocol: PROTOCOL_VERSION,
        run_id: Some(opts.run_id.clone()),
        control: Some(control),
        ..Hello::default()
    };
    if write_frame(&mut writer, &ok).is_err() {
        return;
    }
    // Queue live events from now on, then stream the history the folder holds.
    let queue: Shared = Arc::new((
        Mutex::new(Queue::new(opts.limits.queue_bytes, peer.clone())),
        Condvar::new(),
    ));
    if let Ok(mut list) = ctx.clients.lock() {
        list.push(queue.clone());
    }
    // Commands in, on their own thread, from now on (a client may stop the run while its
    // history is still on the way).
    let (cmd_queue, cmd_ctx) = (queue.clone(), ctx.clone());
    std::thread::Builder::new()
        .name("moppa-serve-read".into())
        .spawn(move || read_commands(reader, control, &cmd_ctx, &cmd_queue, &peer))
        .ok();
    let mut sent = Sent::default();
    if let Ok(mut history) = RunFolderReader::open(&opts.run_dir) {
        loop {
            let events = history.poll_some(HISTORY_CHUNK);
            if events.is_empty() {
                break;
            }
            for ev in events {
                sent.note(&ev);
                if write_frame(&mut writer, &ev).is_err() {
                    close(&queue);
                    return;
                }
            }
            if ctx.stop.load(Ordering::Acquire) || queue.0.lock().map_or(true, |q| q.closed) {
                break;
            }
        }
    }
    // Events out.
    let mut last_words = Vec::new();
    while !ctx.stop.load(Ordering::Acquire) {
        let next = {
            let Ok(mut q) = queue.0.lock() else { return };
            if q.closed {
                // Why it is dropped, if it was.
                last_words = std::mem::take(&mut q.last_words);
                break;
            }
            if q.is_empty() {
                q = match queue.1.wait_timeout(q, Duration::from_millis(200)) {
                    Ok((q, _)) => q,
                    Err(_) => return,
                };
            }
            q.pop()
        };
        let Some(ev) = next else { continue };
        // What the history already held is not sent twice.
        if sent.holds(&ev) {
            continue;
        }
        if write_frame(&mut writer, &ev).is_err() {
            break;
        }
    }
    for ev in last_words {
        if write_frame(&mut writer, &ev).is_err() {
            break;
        }
    }
    close(&queue);
    writer.shutdown(std::net::Shutdown::Both).ok();
}

/// Bytes of the run folder's files read per step of a history (a late viewer's history is
/// streamed, never read whole).
const HISTORY_CHUNK: usize = 1 << 20;

/// What the history sent a client held: live events queued while it was read are not sent again.
#[derive(Default)]
struct Sent {
    progress: Option<u64>,
    snapshot: Option<u64>,
    /// Evaluations as (split, step).
    evals: Vec<(String, u64)>,
    applied: Vec<crate::train::protocol::Applied>,
}

impl Sent {
    fn note(&mut self, ev: &Event) {
        match ev {
            Event::Progress(p) => self.progress = self.progress.max(Some(p.step)),
            Event::Snapshot(s) => self.snapshot = self.snapshot.max(Some(s.step)),
            Event::Eval(e) => self.evals.push((e.split.clone(), e.step)),
            Event::Applied(a) => self.applied.push(a.clone()),
            _ => {}
        }
    }

    fn holds(&self, ev: &Event) -> bool {
        match ev {
            Event::Progress(p) => self.progress.is_some_and(|s| p.step <= s),
            Event::Snapshot(s) => self.snapshot.is_some_and(|t| s.step <= t),
            Event::Eval(e) => self
                .evals
                .iter()
                .any(|(split, step)| *split == e.split && *step == e.step),
            Event::Applied(a) => self.applied.iter().any(|h| {
                h.step == a.step && h.command == a.command && h.target == a.target && h.new.to_bits() == a.new.to_bits()
            }),
            _ => false,
        }
    }
}

fn close(queue: &Shared) {
    if let Ok(mut q) = queue.0.lock() {
        q.closed = true;
    }
    queue.1.notify_all();
}

/// A client's frames: commands for the run (with the token), requests for the run's files;
/// anything malformed or oversized drops this client.
fn read_commands(mut reader: TcpStream, control: bool, ctx: &Context, queue: &Shared, peer: &str) {
    reader.set_read_timeout(None).ok();
    let opts = &ctx.opts;
    let drop_client = |why: String| {
        let why = tame(&why, MAX_REMOTE_TEXT);
        eprintln!("serve: dropped {peer}: {why}");
        if let Ok(mut q) = queue.0.lock() {
            q.last_words.push(note(format!("dropped: {why}")));
        }
    };
    loop {
        let body = match read_frame(&mut reader) {
            Ok(b) => b,
            Err(FrameError::Io(_)) => break,
            Err(e) => {
                drop_client(e.to_string());
                break;
            }
        };
        let Ok(cmd) = serde_json::from_slice::<Command>(&body) else {
            drop_client("a frame that is not a command".into());
            break;
        };
        if !control {
            reply(
                queue,
                note("this connection may watch only (no token): command ignored".into()),
            );
            continue;
        }
        let cmd = match cmd {
            Command::SaveCheckpoint { .. } => {
                reply(
                    queue,
                    note("a network client cannot write files on the server; ask for the run's files instead".into()),
                );
                continue;
            }
            Command::FetchRunFiles => {
                fetch_run_files(opts, queue);
                continue;
            }
            // A name from outside is bounded before it reaches the run's records.
            Command::SetProbeImage { name, image } => Command::SetProbeImage {
                name: tame(&name, MAX_REMOTE_TEXT),
                image,
            },
            other => other,
        };
        if ctx.commands.try_send(cmd).is_err() {
            reply(queue, note("the run's command queue is full or closed".into()));
        }
    }
    // The writer sends what is left (why the client is dropped), then closes the connection.
    close(queue);
}

/// Queues the run folder's adapter and config for the client that asked.
fn fetch_run_files(opts: &ServeOptions, queue: &Shared) {
    for name in [ADAPTER, CONFIG_TOML] {
        match std::fs::read(opts.run_dir.join(name)) {
            Ok(bytes) if bytes.len() * 4 / 3 + 256 < super::frame::MAX_FRAME => reply(
                queue,
                Event::RunFile {
                    name: name.to_owned(),
                    base64: crate::util::base64_encode(&bytes),
                },
            ),
            Ok(bytes) => reply(
                queue,
                note(format!(
                    "{name} ({} bytes) is too large to send in one frame",
                    bytes.len()
                )),
            ),
            Err(e) => reply(queue, note(format!("{name}: {e}"))),
        }
    }
}

/// An event for this client only.
fn reply(queue: &Shared, ev: Event) {
    let size = frame_size(&ev);
    if let Ok(mut q) = queue.0.lock() {
        q.push(ev, size);
    }
    queue.1.notify_one();
}

/// Writes `bytes` as the only content of a file for a client that fetched it.
pub fn save_fetched(dir: &std::path::Path, name: &str, base64: &str) -> std::io::Result<PathBuf> {
    let bytes =
        crate::util::base64_decode(base64).ok_or_else(|| std::io::Error::other(format!("{name}: not valid base64")))?;
    let safe = std::path::Path::new(name)
        .file_name()
        .ok_or_else(|| std::io::Error::other(format!("{name}: not a file name")))?;
    std::fs::create_dir_all(dir)?;
    let path = dir.join(safe);
    crate::util::write_atomic(&path, |w| w.write_all(&bytes))?;
    Ok(path)
}
