//! The worker's sending side: every event is logged to the run folder first (snapshots to
//! `snapshots.jsonl` at their own cadence), then queued for each receiver (the display, and
//! observers such as a network server) without ever blocking: progress and snapshots are
//! coalesced (latest wins) while a receiver is behind; everything else waits in that receiver's
//! backlog until there is room.

use super::Waker;
use crate::train::coalesce::Pending;
use crate::train::protocol::{Event, Notice};
use crate::train::record::SnapshotRecord;
use crate::train::runlog::RunLog;
use crate::train::snapfile::SnapshotLog;
use crossbeam_channel::{Sender, TrySendError};
use std::sync::{Arc, Mutex};

/// One receiver's queue.
struct Sink {
    tx: Sender<Event>,
    pending: Pending,
    /// Gone (its receiver was dropped): nothing more is queued for it.
    closed: bool,
}

impl Sink {
    fn new(tx: Sender<Event>) -> Self {
        Self {
            tx,
            pending: Pending::default(),
            closed: false,
        }
    }

    fn queue(&mut self, ev: Event) {
        if !self.closed {
            self.pending.push(ev);
        }
    }

    fn is_empty(&self) -> bool {
        self.closed || self.pending.is_empty()
    }

    /// Sends what fits; whether anything was sent.
    fn flush(&mut self) -> bool {
        let mut sent = false;
        while let Some(ev) = self.pending.pop() {
            match self.tx.try_send(ev) {
                Ok(()) => sent = true,
                Err(TrySendError::Full(ev)) => {
                    self.pending.unpop(ev);
                    return sent;
                }
                Err(TrySendError::Disconnected(_)) => {
                    self.closed = true;
                    self.pending.clear();
                    return sent;
                }
            }
        }
        sent
    }
}

/// The sending side: never blocks.
pub(super) struct Outbox {
    display: Sink,
    observers: Vec<Sink>,
    waker: Option<Waker>,
    /// The run folder's log (shared with the heartbeat thread).
    pub(super) log: Option<Arc<Mutex<RunLog>>>,
    /// The run folder's snapshot records.
    pub(super) snapshots: Option<SnapshotLog>,
    log_error: bool,
    /// The step and time of the last progress sent (where a panicked run ends).
    last: (u64, f64),
}

impl Outbox {
    pub(super) fn new(tx: Sender<Event>, observers: Vec<Sender<Event>>, waker: Option<Waker>) -> Self {
        Self {
            display: Sink::new(tx),
            observers: observers.into_iter().map(Sink::new).collect(),
            waker,
            log: None,
            snapshots: None,
            log_error: false,
            last: (0, 0.0),
        }
    }

    pub(super) fn is_empty(&self) -> bool {
        self.display.is_empty() && self.observers.iter().all(Sink::is_empty)
    }

    fn log_failed(&mut self, what: &str, e: &std::io::Error) {
        if !self.log_error {
            self.log_error = true;
            let n = Event::Warning(Notice {
                step: 0,
                time_s: 0.0,
                message: format!("cannot write the {what}: {e}"),
                path: None,
                line: None,
            });
            self.display.queue(n.clone());
            for o in &mut self.observers {
                o.queue(n.clone());
            }
        }
    }

    /// The step and time of the last progress sent.
    pub(super) fn last_step(&self) -> (u64, f64) {
        self.last
    }

    /// Logs the event to the run folder, then queues it for every receiver. A lock poisoned by
    /// a panic elsewhere is still written through: the `finished` record is never lost.
    pub(super) fn push(&mut self, ev: Event) {
        if let Event::Progress(p) = &ev {
            self.last = (p.step, p.time_s);
        }
        let logged = match &self.log {
            Some(log) => log.lock().unwrap_or_else(std::sync::PoisonError::into_inner).write(&ev),
            None => Ok(()),
        };
        if let Err(e) = logged {
            self.log_failed("run log", &e);
        }
        for o in &mut self.observers {
            o.queue(ev.clone());
        }
        self.display.queue(ev);
        self.flush();
    }

    /// Appends a snapshot record to `snapshots.jsonl` (the caller decides the cadence).
    pub(super) fn record(&mut self, s: &SnapshotRecord) {
        let written = match &mut self.snapshots {
            Some(log) => log.write(s),
            None => Ok(()),
        };
        if let Err(e) = written {
            self.log_failed("snapshot log", &e);
        }
    }

    /// Whether a snapshot record is due at `step` by the file's cadence.
    pub(super) fn record_due(&self, step: u64) -> bool {
        self.snapshots.as_ref().is_some_and(|s| s.due(step))
    }

    /// Sends what fits; returns without waiting.
    pub(super) fn flush(&mut self) {
        let mut sent = self.display.flush();
        for o in &mut self.observers {
            sent |= o.flush();
        }
        if sent && let Some(w) = &self.waker {
            w();
        }
    }
}
