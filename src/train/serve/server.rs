//! The server side of `moppa train --serve`: a listener, a hub that fans the worker's events out
//! to every client without ever blocking the worker, and one thread per client. A client that
//! connects mid-run first receives the run folder's history, then live events. Progress and
//! snapshots are coalesced for a slow client; a client whose backlog of other events grows past
//! a bound, or that sends anything malformed, is dropped alone.

use super::frame::{FrameError, Hello, read_frame, read_value, same_secret, write_frame};
use crate::train::coalesce::Pending;
use crate::train::protocol::{Command, Event, Notice, PROTOCOL_VERSION};
use crate::train::replay::RunFolderReader;
use crate::train::runfolder::{ADAPTER, CONFIG_TOML};
use crossbeam_channel::{Receiver, Sender};
use std::io::Write as _;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

/// Events waiting for one client beyond which it is dropped as too slow (progress and
/// snapshots never count: they are coalesced).
const BACKLOG_LIMIT: usize = 10_000;

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
}

/// One client's queue: what the hub has for it and its writer has not sent yet.
#[derive(Default)]
struct Queue {
    pending: Pending,
    /// The client is gone or dropped: stop queueing.
    closed: bool,
}

impl Queue {
    fn push(&mut self, ev: Event) {
        if self.closed {
            return;
        }
        self.pending.push(ev);
        if self.pending.kept() > BACKLOG_LIMIT {
            self.closed = true;
            self.pending.clear();
        }
    }
}

type Shared = Arc<(Mutex<Queue>, Condvar)>;

/// A running server; dropping it stops accepting clients and closes them.
pub struct Server {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
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
        let stop = Arc::new(AtomicBool::new(false));
        let clients: Arc<Mutex<Vec<Shared>>> = Arc::default();
        // The hub: every event to every client's queue; it never waits on a client.
        let (hub_clients, hub_stop) = (clients.clone(), stop.clone());
        std::thread::Builder::new()
            .name("moppa-serve-hub".into())
            .spawn(move || {
                while !hub_stop.load(Ordering::Acquire) {
                    let Ok(ev) = events.recv_timeout(Duration::from_millis(200)) else {
                        continue;
                    };
                    let Ok(mut list) = hub_clients.lock() else { return };
                    list.retain(|c| {
                        let Ok(mut q) = c.0.lock() else { return false };
                        q.push(ev.clone());
                        c.1.notify_one();
                        !q.closed
                    });
                }
            })?;
        let opts = Arc::new(opts);
        let accept_stop = stop.clone();
        std::thread::Builder::new()
            .name("moppa-serve-accept".into())
            .spawn(move || {
                while !accept_stop.load(Ordering::Acquire) {
                    match listener.accept() {
                        Ok((stream, _)) => {
                            let (opts, commands, clients, stop) =
                                (opts.clone(), commands.clone(), clients.clone(), accept_stop.clone());
                            std::thread::Builder::new()
                                .name("moppa-serve-client".into())
                                .spawn(move || serve_client(stream, &opts, &commands, &clients, &stop))
                                .ok();
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(50)),
                    }
                }
            })?;
        Ok(Self { addr, stop })
    }

    /// The address it listens on.
    #[must_use]
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
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
fn serve_client(
    stream: TcpStream,
    opts: &ServeOptions,
    commands: &Sender<Command>,
    clients: &Mutex<Vec<Shared>>,
    stop: &AtomicBool,
) {
    stream.set_nonblocking(false).ok();
    stream.set_nodelay(true).ok();
    stream.set_read_timeout(Some(Duration::from_secs(10))).ok();
    // A client that stops reading must not hold its writer forever.
    stream.set_write_timeout(Some(Duration::from_secs(10))).ok();
    let peer = stream
        .peer_addr()
        .map_or_else(|_| "a client".to_owned(), |a| a.to_string());
    let (Ok(mut reader), mut writer) = (stream.try_clone(), stream) else {
        return;
    };
    let refuse = |w: &mut TcpStream, why: String| {
        // The operator sees it too (the run goes on).
        eprintln!("serve: refused {peer}: {why}");
        let hello = Hello {
            protocol: PROTOCOL_VERSION,
            run_id: Some(opts.run_id.clone()),
            error: Some(why),
            ..Hello::default()
        };
        write_frame(w, &hello).ok();
    };
    let hello: Hello = match read_value(&mut reader) {
        Ok(h) => h,
        Err(e) => {
            refuse(&mut writer, format!("expected a handshake: {e}"));
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
        );
        return;
    }
    if hello.run_id.as_ref().is_some_and(|id| *id != opts.run_id) {
        refuse(
            &mut writer,
            format!("this server runs {}, not the run asked for", opts.run_id),
        );
        return;
    }
    let control = hello.token.as_deref().is_some_and(|t| same_secret(t, &opts.token));
    if !control && (hello.token.is_some() || !opts.public) {
        refuse(
            &mut writer,
            if hello.token.is_some() {
                "wrong token".into()
            } else {
                "this run is not public: a token is needed (moppa train printed it)".into()
            },
        );
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
    // Queue live events from now on, then send the history the folder holds.
    let queue: Shared = Arc::default();
    if let Ok(mut list) = clients.lock() {
        list.push(queue.clone());
    }
    let mut sent = Sent::default();
    if let Ok(mut history) = RunFolderReader::open(&opts.run_dir) {
        for ev in history.poll() {
            sent.note(&ev);
            if write_frame(&mut writer, &ev).is_err() {
                close(&queue);
                return;
            }
        }
    }
    // Commands in, on their own thread.
    let (cmd_queue, cmd_tx, cmd_opts) = (queue.clone(), commands.clone(), opts.clone());
    std::thread::Builder::new()
        .name("moppa-serve-read".into())
        .spawn(move || read_commands(reader, control, &cmd_opts, &cmd_tx, &cmd_queue, &peer))
        .ok();
    // Events out.
    let mut last_words = Vec::new();
    while !stop.load(Ordering::Acquire) {
        let next = {
            let Ok(mut q) = queue.0.lock() else { return };
            if q.closed {
                // Why it is dropped, if it was (a notice queued just before).
                last_words = q.pending.take_kept();
                break;
            }
            if q.pending.is_empty() {
                q = match queue.1.wait_timeout(q, Duration::from_millis(200)) {
                    Ok((q, _)) => q,
                    Err(_) => return,
                };
            }
            q.pending.pop()
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
fn read_commands(
    mut reader: TcpStream,
    control: bool,
    opts: &ServeOptions,
    commands: &Sender<Command>,
    queue: &Shared,
    peer: &str,
) {
    reader.set_read_timeout(None).ok();
    let drop_client = |why: String| {
        eprintln!("serve: dropped {peer}: {why}");
        reply(queue, note(format!("dropped: {why}")));
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
        match cmd {
            Command::SaveCheckpoint { .. } => reply(
                queue,
                note("a network client cannot write files on the server; ask for the run's files instead".into()),
            ),
            Command::FetchRunFiles => {
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
            other => {
                if commands.try_send(other).is_err() {
                    reply(queue, note("the run's command queue is full or closed".into()));
                }
            }
        }
    }
    // The writer sends what is left (why the client is dropped), then closes the connection.
    close(queue);
}

/// An event for this client only.
fn reply(queue: &Shared, ev: Event) {
    if let Ok(mut q) = queue.0.lock() {
        q.push(ev);
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
