//! The worker's sending side: every event is logged to the run folder first, then queued for
//! the display without ever blocking: progress and snapshots are coalesced (latest wins) while
//! the display is behind; everything else waits in a backlog until there is room.

use super::Waker;
use crate::train::protocol::{Event, Notice};
use crate::train::runlog::RunLog;
use crossbeam_channel::{Sender, TrySendError};
use std::collections::VecDeque;

/// The sending side: never blocks.
pub(super) struct Outbox {
    tx: Sender<Event>,
    backlog: VecDeque<Event>,
    progress: Option<Event>,
    snapshot: Option<Event>,
    waker: Option<Waker>,
    pub(super) log: Option<RunLog>,
    log_error: bool,
}

impl Outbox {
    pub(super) fn new(tx: Sender<Event>, waker: Option<Waker>) -> Self {
        Self {
            tx,
            backlog: VecDeque::new(),
            progress: None,
            snapshot: None,
            waker,
            log: None,
            log_error: false,
        }
    }

    pub(super) fn is_empty(&self) -> bool {
        self.backlog.is_empty() && self.progress.is_none() && self.snapshot.is_none()
    }

    /// Logs the event to the run folder, then queues it.
    pub(super) fn push(&mut self, ev: Event) {
        if let Some(log) = &mut self.log
            && let Err(e) = log.write(&ev)
            && !self.log_error
        {
            self.log_error = true;
            self.backlog.push_back(Event::Warning(Notice {
                step: 0,
                time_s: 0.0,
                message: format!("cannot write the run log: {e}"),
                path: None,
                line: None,
            }));
        }
        match ev {
            Event::Progress(_) => self.progress = Some(ev),
            Event::Snapshot(_) => self.snapshot = Some(ev),
            other => self.backlog.push_back(other),
        }
        self.flush();
    }

    /// Sends what fits; returns without waiting.
    pub(super) fn flush(&mut self) {
        let mut sent = false;
        while let Some(ev) = self.backlog.pop_front() {
            match self.tx.try_send(ev) {
                Ok(()) => sent = true,
                Err(TrySendError::Full(ev)) => {
                    self.backlog.push_front(ev);
                    break;
                }
                Err(TrySendError::Disconnected(_)) => {
                    self.backlog.clear();
                    break;
                }
            }
        }
        if self.backlog.is_empty() {
            for slot in [&mut self.progress, &mut self.snapshot] {
                if let Some(ev) = slot.take() {
                    match self.tx.try_send(ev) {
                        Ok(()) => sent = true,
                        Err(TrySendError::Full(ev)) => *slot = Some(ev),
                        Err(TrySendError::Disconnected(_)) => {}
                    }
                }
            }
        }
        if sent && let Some(w) = &self.waker {
            w();
        }
    }
}
