//! The app's connections to runs: commands out, events in. A run of this app's is a
//! [`WorkerHandle`]; a run folder is a [`FolderLink`] (read, then followed while it grows); a
//! served run is a [`RemoteRun`]. Tests plug in a fake that records commands and replays events.

use crate::config::RunConfig;
use crate::train::protocol::{Command, Event};
use crate::train::replay::{Liveness, RunFolderReader};
use crate::train::serve::RemoteLink;
use crate::train::worker::Waker;
use crate::train::{WorkerHandle, WorkerOptions};
use std::collections::VecDeque;
use std::path::Path;
use std::time::{Duration, Instant};

/// A connection to a run.
pub trait Link {
    /// Sends a command; false when it could not be queued (or the run cannot be steered).
    fn send(&mut self, command: Command) -> bool;
    /// The next event, if one is waiting (never blocks).
    fn try_recv(&mut self) -> Option<Event>;
    /// For a run read from its folder: whether it finished, crashed or is still written.
    fn liveness(&self) -> Option<Liveness> {
        None
    }
    /// Whether the run's events start over from here (a followed file was replaced under its
    /// reader): what was shown of the run is to be dropped before the next event.
    fn take_reset(&mut self) -> bool {
        false
    }
}

impl Link for WorkerHandle {
    fn send(&mut self, command: Command) -> bool {
        WorkerHandle::send(self, command).is_ok()
    }

    fn try_recv(&mut self) -> Option<Event> {
        self.events().try_recv().ok()
    }
}

/// Starts runs: the real one spawns a training worker; tests substitute their own.
pub type Launcher = Box<dyn FnMut(&RunConfig, Waker, bool) -> anyhow::Result<Box<dyn Link>>>;

/// The launcher of real runs (every core for training, at a lower priority than the UI thread so
/// frames stay smooth).
#[must_use]
pub fn worker_launcher() -> Launcher {
    Box::new(|cfg: &RunConfig, waker: Waker, autostart: bool| {
        let opts = WorkerOptions {
            autostart,
            ..WorkerOptions::with_ui(waker)
        };
        let handle = WorkerHandle::spawn(cfg.clone(), opts)?;
        Ok(Box::new(handle) as Box<dyn Link>)
    })
}

/// How often a followed folder is looked at (a new record shows within this).
pub const FOLLOW_EVERY: Duration = Duration::from_millis(250);

/// A run folder as a link: its records first, then whatever is appended (read-only: commands
/// are refused). The app repaints at least every [`FOLLOW_EVERY`] while such a run may still
/// grow, so a new record shows within a quarter of a second.
pub struct FolderLink {
    reader: RunFolderReader,
    queue: VecDeque<Event>,
    last_poll: Option<Instant>,
    /// The reader's rereads already told ([`Link::take_reset`]).
    rereads: u64,
    reset: bool,
}

impl FolderLink {
    /// Opens `dir` (a run folder).
    pub fn open(dir: &Path) -> Result<Self, String> {
        Ok(Self {
            reader: RunFolderReader::open(dir)?,
            queue: VecDeque::new(),
            last_poll: None,
            rereads: 0,
            reset: false,
        })
    }

    /// Reads what was appended once the queue is empty (at most every [`FOLLOW_EVERY`]).
    fn fill(&mut self) {
        if self.queue.is_empty() && self.last_poll.is_none_or(|t| t.elapsed() >= FOLLOW_EVERY) {
            self.last_poll = Some(Instant::now());
            self.queue.extend(self.reader.poll());
            if self.reader.rereads() != self.rereads {
                self.rereads = self.reader.rereads();
                self.reset = true;
            }
        }
    }
}

impl Link for FolderLink {
    fn send(&mut self, _: Command) -> bool {
        false
    }

    fn try_recv(&mut self) -> Option<Event> {
        self.fill();
        self.queue.pop_front()
    }

    fn liveness(&self) -> Option<Liveness> {
        Some(self.reader.liveness())
    }

    fn take_reset(&mut self) -> bool {
        self.fill();
        std::mem::take(&mut self.reset)
    }
}

/// A run served elsewhere (`moppa train --serve`), watched and (with the token) steered.
pub struct RemoteRun {
    link: RemoteLink,
}

impl RemoteRun {
    /// Wraps a connection.
    #[must_use]
    pub fn new(link: RemoteLink) -> Self {
        Self { link }
    }
}

impl Link for RemoteRun {
    fn send(&mut self, command: Command) -> bool {
        self.link.can_control() && self.link.send(&command).is_ok()
    }

    fn try_recv(&mut self) -> Option<Event> {
        self.link.events().try_recv().ok()
    }
}

/// A link for tests: records commands, delivers events pushed through a channel.
pub struct FakeLink {
    /// Every command the app sent.
    pub sent: std::sync::Arc<std::sync::Mutex<Vec<Command>>>,
    /// Events to deliver.
    pub events: crossbeam_channel::Receiver<Event>,
}

impl Link for FakeLink {
    fn send(&mut self, command: Command) -> bool {
        self.sent.lock().map(|mut v| v.push(command)).is_ok()
    }

    fn try_recv(&mut self) -> Option<Event> {
        self.events.try_recv().ok()
    }
}
