//! The status bar: run state, device, step, throughput, UI frame time, memory.

/// Rolling UI frame statistics: the CPU time of each frame (event handling, layout, drawing,
/// tessellation: what limits the frame rate) and the interval between frames.
#[derive(Default)]
pub struct FrameTimes {
    cpu: std::collections::VecDeque<f64>,
    interval: std::collections::VecDeque<f64>,
    lag: std::collections::VecDeque<f64>,
    count: u64,
}

/// Frames (and lags) the statistics are over.
const WINDOW: usize = 600;

fn push_bounded(q: &mut std::collections::VecDeque<f64>, v: f64) {
    q.push_back(v);
    if q.len() > WINDOW {
        q.pop_front();
    }
}

fn percentiles(v: &std::collections::VecDeque<f64>) -> Option<(f64, f64)> {
    if v.is_empty() {
        return None;
    }
    let mut v: Vec<f64> = v.iter().copied().collect();
    v.sort_by(f64::total_cmp);
    let p = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
    Some((p(0.5), p(0.99)))
}

impl FrameTimes {
    /// Records one frame: its CPU time and the time since the previous frame, in ms.
    pub fn push(&mut self, cpu_ms: f64, interval_ms: f64) {
        self.count += 1;
        push_bounded(&mut self.cpu, cpu_ms);
        push_bounded(&mut self.interval, interval_ms);
    }

    /// Records the lag in ms from a run's new data to the start of the frame that shows it.
    pub fn push_lag(&mut self, lag_ms: f64) {
        push_bounded(&mut self.lag, lag_ms);
    }

    /// `(median, p99)` of the lag from new data to its frame in ms.
    #[must_use]
    pub fn lags(&self) -> Option<(f64, f64)> {
        percentiles(&self.lag)
    }

    /// `(median, p99)` of the frame CPU time in ms.
    #[must_use]
    pub fn stats(&self) -> Option<(f64, f64)> {
        percentiles(&self.cpu)
    }

    /// `(median, p99)` of the interval between frames in ms.
    #[must_use]
    pub fn intervals(&self) -> Option<(f64, f64)> {
        percentiles(&self.interval)
    }

    /// Frames recorded since the start (the statistics are over the last 600).
    #[must_use]
    pub fn count(&self) -> u64 {
        self.count
    }

    /// Frames the statistics are over.
    #[must_use]
    pub fn len(&self) -> usize {
        self.cpu.len()
    }

    /// True before the first frame.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.cpu.is_empty()
    }
}

/// Draws the bar.
/// `frames` None hides the volatile numbers (frame time, memory).
pub fn ui(
    ui: &mut egui::Ui,
    status: &str,
    device: &str,
    step: u64,
    total: u64,
    img_per_s: f64,
    frames: Option<&FrameTimes>,
) {
    ui.horizontal(|ui| {
        ui.label(status);
        ui.separator();
        ui.label(format!("device {device}"));
        ui.separator();
        ui.label(format!("step {step}/{total}"));
        ui.separator();
        ui.label(format!("{img_per_s:.0} img/s"));
        ui.separator();
        let Some(frames) = frames else { return };
        if let (Some((med, p99)), Some((gap, _))) = (frames.stats(), frames.intervals()) {
            let lag = frames
                .lags()
                .map_or_else(String::new, |(l, _)| format!(" · data shown in {l:.0} ms"));
            ui.label(format!(
                "UI {med:.1} ms/frame (p99 {p99:.1}) · {:.0} fps{lag}",
                1000.0 / gap.max(1e-3)
            ))
            .on_hover_text(
                "CPU time of a UI frame (median, 99th percentile) and the frame rate. The window is \
                 drawn when something changes, at most 30 times a second for training data: the \
                 frame rate follows the data (a frame per step or two) and the delay (median) is \
                 from new data to the frame that shows it",
            );
            ui.separator();
        }
        if let Some(m) = crate::util::resident_mib() {
            ui.label(format!("memory {m:.0} MiB"));
        }
    });
}
