//! The app's only connection to the engine: commands out, events in. A real run is a
//! [`WorkerHandle`]; tests plug in a fake that records commands and replays events.

use crate::config::RunConfig;
use crate::train::protocol::{Command, Event};
use crate::train::worker::Waker;
use crate::train::{WorkerHandle, WorkerOptions};

/// A connection to a run.
pub trait Link {
    /// Sends a command; false when it could not be queued.
    fn send(&mut self, command: Command) -> bool;
    /// The next event, if one is waiting (never blocks).
    fn try_recv(&mut self) -> Option<Event>;
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

/// The launcher of real runs (all cores but one for training, so the UI stays smooth).
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
