//! One receiver's pending events, by INTERFACES.md's channel rule: progress and snapshots are
//! coalesced (the latest wins), every other event is kept, in order. The worker's outbox holds one
//! per receiver (the display, a server) and the server one per client.

use super::protocol::Event;
use std::collections::VecDeque;

/// Events waiting for one receiver.
#[derive(Debug, Default)]
pub struct Pending {
    kept: VecDeque<Event>,
    progress: Option<Event>,
    snapshot: Option<Event>,
}

impl Pending {
    /// Queues `ev` (a progress or snapshot replaces the one waiting).
    pub fn push(&mut self, ev: Event) {
        match ev {
            Event::Progress(_) => self.progress = Some(ev),
            Event::Snapshot(_) => self.snapshot = Some(ev),
            other => self.kept.push_back(other),
        }
    }

    /// The next event to send: the kept ones first, in order, then the latest progress, then the
    /// latest snapshot.
    pub fn pop(&mut self) -> Option<Event> {
        self.kept
            .pop_front()
            .or_else(|| self.progress.take())
            .or_else(|| self.snapshot.take())
    }

    /// Puts back an event [`Pending::pop`] gave that could not be sent (a progress or snapshot
    /// queued since is newer and wins).
    pub fn unpop(&mut self, ev: Event) {
        match ev {
            Event::Progress(_) => {
                self.progress.get_or_insert(ev);
            }
            Event::Snapshot(_) => {
                self.snapshot.get_or_insert(ev);
            }
            other => self.kept.push_front(other),
        }
    }

    /// How many events are kept (coalesced ones do not count: they cannot pile up).
    #[must_use]
    pub fn kept(&self) -> usize {
        self.kept.len()
    }

    /// Nothing waits.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.kept.is_empty() && self.progress.is_none() && self.snapshot.is_none()
    }

    /// Drops everything.
    pub fn clear(&mut self) {
        *self = Self::default();
    }

    /// Takes the kept events (what a receiver that is being closed should still hear).
    pub fn take_kept(&mut self) -> Vec<Event> {
        self.kept.drain(..).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::protocol::{Notice, Progress};

    fn progress(step: u64) -> Event {
        Event::Progress(Progress {
            step,
            epoch: 0.0,
            loss: 1.0,
            route_loss: 0.0,
            train_acc: 0.5,
            lr: 1e-3,
            img_per_s: 1.0,
            time_s: 0.0,
            class_loss: None,
        })
    }

    fn warning(step: u64) -> Event {
        Event::Warning(Notice {
            step,
            time_s: 0.0,
            message: String::new(),
            path: None,
            line: None,
        })
    }

    fn step(ev: &Event) -> u64 {
        match ev {
            Event::Progress(p) => p.step,
            Event::Warning(n) => n.step,
            _ => u64::MAX,
        }
    }

    #[test]
    fn progress_is_coalesced_and_other_events_kept_in_order() {
        let mut p = Pending::default();
        for s in 1..=5 {
            p.push(progress(s));
            p.push(warning(s));
        }
        assert_eq!(p.kept(), 5);
        let order: Vec<u64> = std::iter::from_fn(|| p.pop()).map(|e| step(&e)).collect();
        assert_eq!(
            order,
            [1, 2, 3, 4, 5, 5],
            "five warnings, then only the latest progress"
        );
        assert!(p.is_empty());
        // Put back: a newer progress queued meanwhile wins; a kept event goes first again.
        p.push(progress(7));
        p.unpop(progress(6));
        p.unpop(warning(9));
        let order: Vec<u64> = std::iter::from_fn(|| p.pop()).map(|e| step(&e)).collect();
        assert_eq!(order, [9, 7]);
    }
}
