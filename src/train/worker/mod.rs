//! The training worker: a named thread that owns the [`Trainer`](crate::train::trainer::Trainer), reads [`Command`]s from a
//! bounded channel at every step boundary and sends [`Event`]s through another. It never
//! blocks on a display: progress and snapshots are coalesced (latest wins) when the receiver is
//! behind, while evaluations, applied commands, warnings, errors and the end of the run wait in
//! a small backlog until there is room. A waker closure (the app passes `request_repaint`) is
//! called after each batch of events.

mod outbox;
mod run;

use super::protocol::{Command, Event};
use super::stop::{StopFlag, StopRequest};
use crate::config::RunConfig;
use crossbeam_channel::{Receiver, Sender, TrySendError, bounded};
use outbox::Outbox;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// Called after events were sent (e.g. `egui::Context::request_repaint`).
pub type Waker = Arc<dyn Fn() + Send + Sync>;

/// How many nice steps training threads under a display sit below the display's thread: low
/// enough a weight (110 against the display's 1024 in Linux's scheduler, at nice 0) that a frame
/// waits at most for a time slice, high enough that training still outranks background jobs
/// niced to 19.
pub const UI_COMPUTE_NICE: i32 = 10;

/// How a worker runs.
#[derive(Clone)]
pub struct WorkerOptions {
    /// Called after each batch of events.
    pub waker: Option<Waker>,
    /// Start training immediately (else wait for [`Command::Start`]).
    pub autostart: bool,
    /// Threads of the training pool when the config does not say (`None`: every core).
    pub default_threads: Option<usize>,
    /// Nice steps of the training threads below the thread that starts the run (0: the same;
    /// more: they yield to a display thread on the same cores, see
    /// [`crate::util::lower_thread_priority`]).
    pub compute_nice: i32,
    /// Capacity of the event channel.
    pub event_capacity: usize,
    /// At most this many snapshots per second.
    pub max_snapshots_per_s: f64,
    /// On divergence, end the run (headless: nobody can change the coefficients and resume)
    /// instead of holding for a display to steer it.
    pub stop_on_divergence: bool,
    /// Further receivers of every event (e.g. a network server), each fed like the display:
    /// never blocking the worker, progress and snapshots coalesced for a slow one.
    pub observers: Vec<Sender<Event>>,
    /// The run's id (a network server names it in its handshake); `None`: a new one.
    pub run_id: Option<String>,
}

impl Default for WorkerOptions {
    fn default() -> Self {
        Self {
            waker: None,
            autostart: true,
            default_threads: None,
            compute_nice: 0,
            event_capacity: 256,
            max_snapshots_per_s: 10.0,
            stop_on_divergence: false,
            observers: Vec::new(),
            run_id: None,
        }
    }
}

impl WorkerOptions {
    /// Defaults for a display that shares the machine: training on every core, as headless, but
    /// at a lower priority, so the display thread runs first whenever it has a frame to draw
    /// (a few milliseconds per frame) and training takes every other cycle. Leaving a core to the
    /// display instead halves training on 2 cores (and idles most of that core between frames).
    #[must_use]
    pub fn with_ui(waker: Waker) -> Self {
        Self {
            waker: Some(waker),
            autostart: false,
            default_threads: None,
            compute_nice: UI_COMPUTE_NICE,
            ..Self::default()
        }
    }
}

/// A running worker.
pub struct WorkerHandle {
    commands: Sender<Command>,
    events: Receiver<Event>,
    stop: StopFlag,
    join: Option<std::thread::JoinHandle<()>>,
    finished: Arc<AtomicBool>,
}

impl WorkerHandle {
    /// Starts a run on a new thread. Setup errors arrive as `Error` + `Finished(failed)` events.
    pub fn spawn(cfg: RunConfig, opts: WorkerOptions) -> std::io::Result<Self> {
        let (cmd_tx, cmd_rx) = bounded(64);
        let (ev_tx, ev_rx) = bounded(opts.event_capacity.max(4));
        let stop = StopFlag::new();
        let finished = Arc::new(AtomicBool::new(false));
        let (stop2, finished2) = (stop.clone(), finished.clone());
        let join = std::thread::Builder::new()
            .name("moppa-trainer".into())
            .spawn(move || {
                let mut out = Outbox::new(ev_tx, opts.observers.clone(), opts.waker.clone());
                // A panic anywhere in the run is a failed run the displays and the log hear of.
                if let Err(message) = crate::panics::catch(|| run::run(&cfg, &opts, &cmd_rx, &mut out, &stop2)) {
                    run::panicked(&mut out, &message);
                }
                finished2.store(true, Ordering::Release);
                // Deliver what is left without ever blocking for long.
                let deadline = Instant::now() + Duration::from_secs(2);
                while !out.is_empty() && Instant::now() < deadline && stop2.request() != StopRequest::Abandon {
                    out.flush();
                    std::thread::sleep(Duration::from_millis(5));
                }
            })?;
        Ok(Self {
            commands: cmd_tx,
            events: ev_rx,
            stop,
            join: Some(join),
            finished,
        })
    }

    /// Sends a command (never blocks; fails only when 64 commands are already waiting).
    pub fn send(&self, c: Command) -> Result<(), Command> {
        self.commands.try_send(c).map_err(|e| match e {
            TrySendError::Full(c) | TrySendError::Disconnected(c) => c,
        })
    }

    /// A sender of commands to this run (for another front end, e.g. a network server).
    #[must_use]
    pub fn commands(&self) -> Sender<Command> {
        self.commands.clone()
    }

    /// The event stream.
    #[must_use]
    pub fn events(&self) -> &Receiver<Event> {
        &self.events
    }

    /// Asks for a graceful stop at the next step boundary (final evaluation and checkpoint).
    pub fn stop(&self) {
        self.stop.stop();
    }

    /// Ctrl-C: stop at the next step boundary with a final checkpoint and no evaluation.
    pub fn interrupt(&self) {
        self.stop.interrupt();
    }

    /// The run's stop flag, for a signal handler ([`StopFlag::interrupt`]).
    #[must_use]
    pub fn stop_flag(&self) -> StopFlag {
        self.stop.clone()
    }

    /// Whether the worker thread has ended its run.
    #[must_use]
    pub fn is_finished(&self) -> bool {
        self.finished.load(Ordering::Acquire)
    }

    /// Waits for the thread to end.
    pub fn join(mut self) {
        if let Some(j) = self.join.take() {
            j.join().ok();
        }
    }
}

impl Drop for WorkerHandle {
    /// Abandons the run (no final evaluation) and waits for the current step to end.
    fn drop(&mut self) {
        if let Some(j) = self.join.take() {
            if !self.finished.load(Ordering::Acquire) {
                self.stop.abandon();
            }
            j.join().ok();
        }
    }
}
