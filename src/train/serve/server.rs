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
use super::guard::{Counts, Limits, Peers, Slot, TOKEN};
use super::queue::{Queue, Sent, Shared, close, frame_size, note, reply};
use crate::train::protocol::{Command, Event, PROTOCOL_VERSION};
use crate::train::replay::RunFolderReader;
use crate::train::runfolder::{ADAPTER, CONFIG_TOML};
use crossbeam_channel::{Receiver, Sender};
use std::io::Write as _;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// The longest string from a peer that is kept or echoed (a probe image's name, a refusal's text).
pub const MAX_REMOTE_TEXT: usize = 256;

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
            peers: Mutex::new(Peers::default()),
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
