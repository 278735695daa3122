//! The status bar: run state, device, step, throughput, UI frame time, memory.

use super::RunStatus;

/// Rolling frame times of the UI.
#[derive(Default)]
pub struct FrameTimes {
    samples: std::collections::VecDeque<f64>,
}

impl FrameTimes {
    /// Records one frame's duration in ms.
    pub fn push(&mut self, ms: f64) {
        self.samples.push_back(ms);
        if self.samples.len() > 600 {
            self.samples.pop_front();
        }
    }

    /// `(median, p99)` in ms.
    #[must_use]
    pub fn stats(&self) -> Option<(f64, f64)> {
        if self.samples.is_empty() {
            return None;
        }
        let mut v: Vec<f64> = self.samples.iter().copied().collect();
        v.sort_by(f64::total_cmp);
        let p = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
        Some((p(0.5), p(0.99)))
    }
}

/// Draws the bar.
/// `frames` None hides the volatile numbers (frame time, memory).
pub fn ui(
    ui: &mut egui::Ui,
    status: RunStatus,
    device: &str,
    step: u64,
    total: u64,
    img_per_s: f64,
    frames: Option<&FrameTimes>,
) {
    ui.horizontal(|ui| {
        ui.label(status.label());
        ui.separator();
        ui.label(format!("device {device}"));
        ui.separator();
        ui.label(format!("step {step}/{total}"));
        ui.separator();
        ui.label(format!("{img_per_s:.0} img/s"));
        ui.separator();
        let Some(frames) = frames else { return };
        if let Some((med, p99)) = frames.stats() {
            ui.label(format!("UI frame {med:.1} ms (p99 {p99:.1})"));
            ui.separator();
        }
        if let Some(m) = crate::util::resident_mib() {
            ui.label(format!("memory {m:.0} MiB"));
        }
    });
}
