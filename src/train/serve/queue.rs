//! One client's queue of events: what the hub has for it and its writer has not sent yet,
//! bounded in bytes; and what a late client's history already held.

use crate::train::protocol::{Event, Notice};
use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex};

/// One client's queue: what the hub has for it and its writer has not sent yet. Progress and
/// snapshots are coalesced (the latest wins); every other event is kept, in order, and counted
/// in bytes.
pub(super) struct Queue {
    kept: VecDeque<(Event, usize)>,
    progress: Option<Event>,
    snapshot: Option<Event>,
    /// Bytes the kept events take (their JSON, plus the event itself).
    bytes: usize,
    limit: usize,
    /// The client is gone or dropped: stop queueing.
    pub(super) closed: bool,
    /// What a dropped client still hears (why it is dropped).
    pub(super) last_words: Vec<Event>,
    peer: String,
}

impl Queue {
    pub(super) fn new(limit: usize, peer: String) -> Self {
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
    pub(super) fn push(&mut self, ev: Event, size: usize) {
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
    pub(super) fn pop(&mut self) -> Option<Event> {
        if let Some((ev, size)) = self.kept.pop_front() {
            self.bytes -= size;
            return Some(ev);
        }
        self.progress.take().or_else(|| self.snapshot.take())
    }

    pub(super) fn is_empty(&self) -> bool {
        self.kept.is_empty() && self.progress.is_none() && self.snapshot.is_none()
    }
}

/// The size of `ev` as a frame (what it costs while it waits).
pub(super) fn frame_size(ev: &Event) -> usize {
    match ev {
        Event::Progress(_) | Event::Snapshot(_) => 0,
        other => serde_json::to_vec(other).map_or(0, |v| v.len()),
    }
}

pub(super) type Shared = Arc<(Mutex<Queue>, Condvar)>;

/// A notice for one client.
pub(super) fn note(message: String) -> Event {
    Event::Warning(Notice {
        step: 0,
        time_s: 0.0,
        message,
        path: None,
        line: None,
    })
}

/// What the history sent a client held: live events queued while it was read are not sent again.
#[derive(Default)]
pub(super) struct Sent {
    progress: Option<u64>,
    snapshot: Option<u64>,
    /// Evaluations as (split, step).
    evals: Vec<(String, u64)>,
    applied: Vec<crate::train::protocol::Applied>,
}

impl Sent {
    pub(super) fn note(&mut self, ev: &Event) {
        match ev {
            Event::Progress(p) => self.progress = self.progress.max(Some(p.step)),
            Event::Snapshot(s) => self.snapshot = self.snapshot.max(Some(s.step)),
            Event::Eval(e) => self.evals.push((e.split.clone(), e.step)),
            Event::Applied(a) => self.applied.push(a.clone()),
            _ => {}
        }
    }

    pub(super) fn holds(&self, ev: &Event) -> bool {
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

/// Marks a client gone: its writer stops and the hub forgets it.
pub(super) fn close(queue: &Shared) {
    if let Ok(mut q) = queue.0.lock() {
        q.closed = true;
    }
    queue.1.notify_all();
}

/// An event for this client only.
pub(super) fn reply(queue: &Shared, ev: Event) {
    let size = frame_size(&ev);
    if let Ok(mut q) = queue.0.lock() {
        q.push(ev, size);
    }
    queue.1.notify_one();
}
