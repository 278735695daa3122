//! The client side of a served run: the connection the app's Connect… and the tests use. It
//! shakes hands, then a reader thread turns frames into [`Event`]s; commands go out as frames.

use super::frame::{Hello, read_value, write_frame};
use crate::train::protocol::{Command, Event, Notice, PROTOCOL_VERSION};
use crate::train::worker::Waker;
use crossbeam_channel::{Receiver, bounded};
use std::net::{TcpStream, ToSocketAddrs as _};
use std::sync::Mutex;
use std::time::Duration;

/// A connection to a served run.
pub struct RemoteLink {
    writer: Mutex<TcpStream>,
    events: Receiver<Event>,
    hello: Hello,
    addr: String,
}

impl RemoteLink {
    /// Connects to `addr` (`HOST:PORT`) with an optional token; the error says why not in one line
    /// (unreachable, another protocol version, a wrong or missing token).
    pub fn connect(addr: &str, token: Option<&str>) -> Result<Self, String> {
        Self::connect_waking(addr, token, None)
    }

    /// [`RemoteLink::connect`], calling `waker` after each event arrives (the app passes its
    /// paced repaint, so a served run's data shows as soon as a local run's).
    pub fn connect_waking(addr: &str, token: Option<&str>, waker: Option<Waker>) -> Result<Self, String> {
        let sock = addr
            .to_socket_addrs()
            .map_err(|e| format!("{addr}: {e}"))?
            .next()
            .ok_or_else(|| format!("{addr}: no such address"))?;
        let mut stream =
            TcpStream::connect_timeout(&sock, Duration::from_secs(5)).map_err(|e| format!("{addr}: {e}"))?;
        stream.set_nodelay(true).ok();
        stream.set_read_timeout(Some(Duration::from_secs(10))).ok();
        let hello = Hello {
            protocol: PROTOCOL_VERSION,
            token: token.filter(|t| !t.is_empty()).map(str::to_owned),
            ..Hello::default()
        };
        write_frame(&mut stream, &hello).map_err(|e| format!("{addr}: {e}"))?;
        let answer: Hello =
            read_value(&mut stream).map_err(|e| format!("{addr}: no handshake from the server ({e})"))?;
        if let Some(why) = answer.error {
            return Err(format!("{addr}: {why}"));
        }
        if answer.protocol != PROTOCOL_VERSION {
            return Err(format!(
                "{addr}: the server speaks protocol {}, this client {PROTOCOL_VERSION}",
                answer.protocol
            ));
        }
        stream.set_read_timeout(None).ok();
        let mut reader = stream.try_clone().map_err(|e| format!("{addr}: {e}"))?;
        let (tx, rx) = bounded(1024);
        let from = addr.to_owned();
        std::thread::Builder::new()
            .name("moppa-remote-read".into())
            .spawn(move || {
                loop {
                    match read_value::<Event>(&mut reader) {
                        Ok(ev) => {
                            if tx.send(ev).is_err() {
                                return;
                            }
                            if let Some(w) = &waker {
                                w();
                            }
                        }
                        Err(e) => {
                            tx.send(Event::Warning(Notice {
                                step: 0,
                                time_s: 0.0,
                                message: format!("{from}: the connection closed ({e})"),
                                path: None,
                                line: None,
                            }))
                            .ok();
                            if let Some(w) = &waker {
                                w();
                            }
                            return;
                        }
                    }
                }
            })
            .map_err(|e| e.to_string())?;
        Ok(Self {
            writer: Mutex::new(stream),
            events: rx,
            hello: answer,
            addr: addr.to_owned(),
        })
    }

    /// Sends a command (a watcher's are ignored by the server, with a notice).
    pub fn send(&self, c: &Command) -> Result<(), String> {
        let mut w = self.writer.lock().map_err(|_| "the connection is broken".to_owned())?;
        write_frame(&mut *w, c).map_err(|e| format!("{}: {e}", self.addr))
    }

    /// The events, history first.
    #[must_use]
    pub fn events(&self) -> &Receiver<Event> {
        &self.events
    }

    /// Whether this connection may send commands (it gave the token).
    #[must_use]
    pub fn can_control(&self) -> bool {
        self.hello.control == Some(true)
    }

    /// The served run's id.
    #[must_use]
    pub fn run_id(&self) -> &str {
        self.hello.run_id.as_deref().unwrap_or_default()
    }

    /// `HOST:PORT`.
    #[must_use]
    pub fn addr(&self) -> &str {
        &self.addr
    }
}

impl Drop for RemoteLink {
    fn drop(&mut self) {
        if let Ok(w) = self.writer.lock() {
            w.shutdown(std::net::Shutdown::Both).ok();
        }
    }
}
