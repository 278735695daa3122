//! How a run is asked to end: one flag shared by the worker, its handle, the Ctrl-C handler and
//! the trainer's long waits (setup, waiting for data, evaluation), so an interrupt is honoured
//! at once where there is nothing to save and at the next step boundary otherwise.

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};

/// What has been asked of a run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopRequest {
    /// Nothing: keep going.
    None,
    /// Stop at the next step boundary with the final evaluation and checkpoint.
    Graceful,
    /// Ctrl-C: stop at the next step boundary, checkpoint, skip the evaluation.
    Interrupt,
    /// The display went away: stop without evaluating.
    Abandon,
}

/// A shared stop flag (cheap to clone).
#[derive(Clone, Debug, Default)]
pub struct StopFlag(Arc<AtomicU8>);

const NONE: u8 = 0;
const GRACEFUL: u8 = 1;
const INTERRUPT: u8 = 2;
const ABANDON: u8 = 3;

impl StopFlag {
    /// A flag with nothing requested.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// What is requested now.
    #[must_use]
    pub fn request(&self) -> StopRequest {
        match self.0.load(Ordering::Acquire) {
            GRACEFUL => StopRequest::Graceful,
            INTERRUPT => StopRequest::Interrupt,
            ABANDON => StopRequest::Abandon,
            _ => StopRequest::None,
        }
    }

    /// Asks for a graceful stop (unless something stronger was asked already).
    pub fn stop(&self) {
        self.0
            .compare_exchange(NONE, GRACEFUL, Ordering::AcqRel, Ordering::Relaxed)
            .ok();
    }

    /// Ctrl-C.
    pub fn interrupt(&self) {
        self.0.store(INTERRUPT, Ordering::Release);
    }

    /// The display is gone.
    pub fn abandon(&self) {
        self.0.store(ABANDON, Ordering::Release);
    }

    /// Whether long work (setup, waiting for data, evaluation) should be cut short now.
    #[must_use]
    pub fn cuts_short(&self) -> bool {
        matches!(self.request(), StopRequest::Interrupt | StopRequest::Abandon)
    }
}
