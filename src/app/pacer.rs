//! Frame pacing while runs deliver data: a frame when something changed, never more than one per
//! [`MIN_FRAME_INTERVAL`], and the lag from new data to the frame that shows it.
//!
//! The window is drawn only when there is something new to show (a batch of training events, user
//! input, an animation). A run's events wake the UI through [`Pacer::waker`]: at once when the
//! last frame is at least one interval old, else at the end of that interval, so a fast run
//! (hundreds of steps a second) costs at most 30 frames a second and no event waits longer than one
//! interval plus a frame. Drawing identical frames at a fixed rate instead costs training for
//! nothing: where the window is drawn in software (no GPU: Mesa's llvmpipe) a frame of this window
//! costs ~10 ms of CPU, and on 2 cores a steady 30 fps left training ~0.6 of its headless speed
//! (README, Performance).

use crate::train::worker::Waker;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// The shortest interval between frames asked for by runs' data (30 fps).
pub const MIN_FRAME_INTERVAL: Duration = Duration::from_millis(33);

/// Shared between the UI thread (which starts frames) and the threads that deliver events.
#[derive(Debug)]
pub struct Pacer {
    epoch: Instant,
    /// Start of the latest frame, in ns since `epoch`.
    last_frame: AtomicU64,
    /// Arrival of the oldest event not yet drawn, in ns since `epoch` plus one; 0 when none.
    pending: AtomicU64,
}

impl Default for Pacer {
    fn default() -> Self {
        Self {
            epoch: Instant::now(),
            last_frame: AtomicU64::new(0),
            pending: AtomicU64::new(0),
        }
    }
}

impl Pacer {
    fn now_ns(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX - 1)
    }

    /// Notes that new data arrived; returns how long to wait before the frame that shows it.
    pub fn event(&self) -> Duration {
        let now = self.now_ns();
        // Keep the oldest arrival: the lag is counted from it.
        let _ = self
            .pending
            .compare_exchange(0, now + 1, Ordering::AcqRel, Ordering::Acquire);
        let since = now.saturating_sub(self.last_frame.load(Ordering::Acquire));
        let gap = u64::try_from(MIN_FRAME_INTERVAL.as_nanos()).unwrap_or(u64::MAX);
        Duration::from_nanos(gap.saturating_sub(since))
    }

    /// Notes the start of a frame that draws whatever arrived; returns the lag in ms from the
    /// oldest event it shows, if there was one.
    pub fn frame_started(&self) -> Option<f64> {
        let now = self.now_ns();
        self.last_frame.store(now, Ordering::Release);
        let pending = self.pending.swap(0, Ordering::AcqRel);
        (pending > 0).then(|| now.saturating_sub(pending - 1) as f64 / 1e6)
    }

    /// A waker for runs' event threads: repaints `ctx` paced as above.
    pub fn waker(self: &Arc<Self>, ctx: egui::Context) -> Waker {
        let pacer = Arc::clone(self);
        // Never a zero delay: egui answers `request_repaint()` with two frames (to let things
        // settle), a delayed request with one, and the second frame would show nothing new.
        Arc::new(move || ctx.request_repaint_after(pacer.event().max(Duration::from_millis(1))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_right_after_a_frame_wait_for_the_interval_and_the_lag_counts_from_the_oldest() {
        let p = Pacer::default();
        assert!(p.frame_started().is_none(), "no event yet: no lag");
        let wait = p.event();
        assert!(wait > Duration::ZERO && wait <= MIN_FRAME_INTERVAL, "{wait:?}");
        std::thread::sleep(Duration::from_millis(5));
        let _ = p.event();
        let lag = p.frame_started().expect("an event was pending");
        assert!(lag >= 5.0, "lag counted from the first event: {lag} ms");
        assert!(p.frame_started().is_none(), "drawn: nothing pending");
    }

    #[test]
    fn an_event_long_after_the_last_frame_repaints_at_once() {
        let p = Pacer::default();
        p.frame_started();
        std::thread::sleep(MIN_FRAME_INTERVAL + Duration::from_millis(2));
        assert_eq!(p.event(), Duration::ZERO);
    }
}
