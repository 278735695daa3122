//! What the app remembers of a run: decimated metric series (bounded memory however long the
//! run), evaluations, applied commands, and a bounded list of snapshots for scrubbing.

use crate::config::{Coeff, PerCoeff, RunConfig};
use crate::train::protocol::{Applied, EvalResult, Event, FinishReason, Hyper, Progress, RunInfo, Snapshot};
use crate::train::record::Record;

/// Points kept per series before halving its resolution.
pub const MAX_POINTS: usize = 4096;
/// Snapshots kept for the step slider.
pub const MAX_SNAPSHOTS: usize = 400;

/// A series of `(step, time_s, value)` that keeps at most [`MAX_POINTS`]: when full, every other
/// point is dropped and the stride doubles, so a 100k-step run plots as fast as a short one.
#[derive(Clone, Debug, Default)]
pub struct Series {
    /// Kept points.
    pub points: Vec<[f64; 3]>,
    stride: u64,
    seen: u64,
}

impl Series {
    /// Adds a point (kept when it falls on the current stride).
    pub fn push(&mut self, step: f64, time_s: f64, value: f64) {
        if self.stride == 0 {
            self.stride = 1;
        }
        if self.seen.is_multiple_of(self.stride) && value.is_finite() {
            self.points.push([step, time_s, value]);
            if self.points.len() > MAX_POINTS {
                let mut i = 0;
                self.points.retain(|_| {
                    i += 1;
                    i % 2 == 1
                });
                self.stride *= 2;
            }
        }
        self.seen += 1;
    }

    /// Points as `[x, y]` with x = step or time.
    #[must_use]
    pub fn xy(&self, by_time: bool) -> Vec<[f64; 2]> {
        self.points
            .iter()
            .map(|p| [if by_time { p[1] } else { p[0] }, p[2]])
            .collect()
    }

    /// Exponential moving average of the kept points (`alpha` = weight of the past, 0..1).
    #[must_use]
    pub fn ema(&self, by_time: bool, alpha: f64) -> Vec<[f64; 2]> {
        let mut out = Vec::with_capacity(self.points.len());
        let mut m: Option<f64> = None;
        for p in &self.points {
            let v = match m {
                None => p[2],
                Some(prev) => alpha * prev + (1.0 - alpha) * p[2],
            };
            m = Some(v);
            out.push([if by_time { p[1] } else { p[0] }, v]);
        }
        out
    }

    /// The last value.
    #[must_use]
    pub fn last(&self) -> Option<f64> {
        self.points.last().map(|p| p[2])
    }
}

/// One run as the app saw it.
#[derive(Clone, Debug, Default)]
pub struct RunHistory {
    /// A label (`#1 moppa r8`).
    pub label: String,
    /// Static facts, once started.
    pub info: Option<RunInfo>,
    /// The run's resolved configuration, read from `info` (`None` before it started, or for a
    /// run whose configuration is not a fine-tuning run's, e.g. masked pretraining).
    pub config: Option<RunConfig>,
    /// What makes its setting (`groups::setting_key` of its configuration, read once at start):
    /// runs with the same key are seeds of one setting.
    pub setting: Option<String>,
    /// Training loss.
    pub loss: Series,
    /// Route loss.
    pub route_loss: Series,
    /// Training accuracy.
    pub train_acc: Series,
    /// Learning rate.
    pub lr: Series,
    /// Throughput.
    pub img_per_s: Series,
    /// Validation evaluations `(step, time, acc, loss, n)`: n the images evaluated, 0 where
    /// unknown (a record written before it was recorded).
    pub val: Vec<[f64; 5]>,
    /// Test evaluations, as `val`.
    pub test: Vec<[f64; 5]>,
    /// Last per-class validation accuracy.
    pub per_class: Vec<f64>,
    /// The last evaluation of each split with its confusion counts and misclassified images.
    pub last_val: Option<EvalResult>,
    /// See `last_val`.
    pub last_test: Option<EvalResult>,
    /// The latest prior ablation (the run's own, or one made here on its saved adapter).
    pub ablation: Option<Box<crate::train::protocol::Ablation>>,
    /// An ablation in progress: passes done of all.
    pub ablation_progress: Option<(usize, usize)>,
    /// Commands that took effect.
    pub applied: Vec<Applied>,
    /// Snapshots for scrubbing (oldest first; thinned when full).
    pub snapshots: Vec<Snapshot>,
    /// Per-block router share over steps: `[block][prior]` series of mean α.
    pub shares: Vec<Vec<Series>>,
    /// Per-block routing entropy (normalised) over steps.
    pub entropy: Vec<Series>,
    /// Latest step and time.
    pub step: u64,
    /// Seconds since the run started.
    pub time_s: f64,
    /// Seconds spent training (pauses left out).
    pub train_s: f64,
    /// The run paused since its last progress (that gap is not training time).
    pub paused_gap: bool,
    /// Stop was asked: the run is evaluating its final model.
    pub stopping: bool,
    /// Latest images/s.
    pub throughput: f64,
    /// Times the run was resumed (a recorded run started again).
    pub resumes: usize,
    /// How it ended, once it did.
    pub finished: Option<FinishReason>,
    /// The filter view's radial profiles and impulse responses for what it shows.
    pub filter_cache: crate::app::panels::filters::FilterCache,
    /// A served run's progress and evaluations received, as `metrics.csv` rows (its folder is not
    /// on this machine; the series above are thinned for drawing).
    pub csv_rows: Vec<String>,
}

/// The values a run trains with now, as its records say: κ, c, ε as the channel mean of its
/// last snapshot (one block or all), τ, γ, λ, T from that snapshot, and the peak learning rate
/// last applied (else the run's own). NaN where the run has not said yet.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RunValues {
    /// κ, c, ε.
    pub coeffs: PerCoeff<f64>,
    /// τ.
    pub tau: f64,
    /// γ.
    pub gamma: f64,
    /// λ.
    pub route_weight: f64,
    /// T.
    pub temperature: f64,
    /// Peak learning rate.
    pub lr: f64,
}

impl RunValues {
    /// The value of `h`.
    #[must_use]
    pub fn hyper(&self, h: Hyper) -> f64 {
        match h {
            Hyper::Tau => self.tau,
            Hyper::Gamma => self.gamma,
            Hyper::RouteWeight => self.route_weight,
            Hyper::Temperature => self.temperature,
            Hyper::Lr => self.lr,
        }
    }
}

/// The mean of coefficient `c` over the channels of `block` (None: every block) in `s`.
#[must_use]
pub fn coeff_mean(s: &Snapshot, c: Coeff, block: Option<usize>) -> Option<f64> {
    let (sum, n) = s
        .blocks
        .iter()
        .filter(|b| block.is_none_or(|k| b.block == k))
        .flat_map(|b| b.coeffs[c].iter())
        .fold((0.0, 0usize), |(s, n), x| (s + f64::from(*x), n + 1));
    (n > 0).then(|| sum / n as f64)
}

impl RunHistory {
    /// What the run trains with now (for `block`, or every block: `None`).
    #[must_use]
    pub fn values(&self, block: Option<usize>) -> RunValues {
        let snap = self.snapshots.last();
        let cfg = self.config.as_ref();
        // A change applied since the last snapshot is newer than it.
        let applied = |h: Hyper| {
            self.applied
                .iter()
                .rev()
                .find(|a| a.command == h.name() && snap.is_none_or(|s| a.step >= s.step || h == Hyper::Lr))
                .map(|a| a.new)
        };
        let value = |h: Hyper, from_snap: fn(&Snapshot) -> f64, from_cfg: fn(&RunConfig) -> f64| {
            applied(h)
                .or_else(|| snap.map(from_snap))
                .or_else(|| cfg.map(from_cfg))
                .unwrap_or(f64::NAN)
        };
        RunValues {
            coeffs: PerCoeff::from_fn(|c| snap.and_then(|s| coeff_mean(s, c, block)).unwrap_or(f64::NAN)),
            tau: value(Hyper::Tau, |s| s.tau, |c| c.method.tau),
            gamma: value(Hyper::Gamma, |s| s.gamma, |c| c.method.gamma),
            route_weight: value(Hyper::RouteWeight, |s| s.route_weight, |c| c.method.route_weight),
            temperature: value(Hyper::Temperature, |s| s.temperature, |c| c.method.temperature),
            // Snapshots do not carry the peak learning rate.
            lr: applied(Hyper::Lr)
                .or_else(|| cfg.map(RunConfig::lr))
                .unwrap_or(f64::NAN),
        }
    }

    /// An empty history.
    #[must_use]
    pub fn new(label: String) -> Self {
        Self {
            label,
            ..Self::default()
        }
    }

    /// Optimizer steps per second of training (pauses left out).
    #[must_use]
    pub fn steps_per_s(&self) -> Option<f64> {
        let start = self.info.as_ref().map_or(0, |i| i.start_step);
        (self.train_s > 0.0).then(|| self.step.saturating_sub(start) as f64 / self.train_s)
    }

    /// Whether the run is testing its final model: its last step is done (or Stop was asked)
    /// and it has not finished.
    #[must_use]
    pub fn testing(&self) -> bool {
        let total = self.info.as_ref().map_or(u64::MAX, |i| i.total_steps);
        self.finished.is_none() && self.info.is_some() && (self.step >= total || self.stopping)
    }

    /// Best validation accuracy so far.
    #[must_use]
    pub fn best_val(&self) -> Option<f64> {
        self.val.iter().map(|v| v[2]).reduce(f64::max)
    }

    /// The validation evaluation with the best accuracy so far (the first of equals), NaN
    /// accuracies left out: `(step, time, acc, loss, n)`.
    #[must_use]
    pub fn best_val_eval(&self) -> Option<[f64; 5]> {
        self.val
            .iter()
            .filter(|v| !v[2].is_nan())
            .fold(None, |best: Option<[f64; 5]>, v| match best {
                Some(b) if b[2] >= v[2] => Some(b),
                _ => Some(*v),
            })
    }

    /// Keeps a served run's progress or evaluation as its `metrics.csv` row (the run folder is on
    /// another machine: Export CSV writes these).
    pub fn keep_row(&mut self, ev: &Event) {
        if matches!(ev, Event::Progress(_) | Event::Eval(_)) {
            self.csv_rows.extend(Record::from_event(ev).and_then(|r| r.csv_row()));
        }
    }

    /// Records a progress event.
    pub fn on_progress(&mut self, p: &Progress) {
        let s = p.step as f64;
        self.loss.push(s, p.time_s, p.loss);
        self.route_loss.push(s, p.time_s, p.route_loss);
        self.train_acc.push(s, p.time_s, p.train_acc);
        self.lr.push(s, p.time_s, p.lr);
        self.img_per_s.push(s, p.time_s, p.img_per_s);
        // Training time: the gaps between progress records, except one spanning a pause (and
        // the first of a resumed run, which spans the earlier session).
        let first = self.loss.seen == 0;
        let resumed = self.info.as_ref().is_some_and(|i| i.start_step > 0);
        if self.paused_gap {
            self.paused_gap = false;
        } else if first && !resumed {
            self.train_s += p.time_s.max(0.0);
        } else if !first {
            self.train_s += (p.time_s - self.time_s).max(0.0);
        }
        self.step = p.step;
        self.time_s = p.time_s;
        self.throughput = p.img_per_s;
    }

    /// Records an evaluation.
    pub fn on_eval(&mut self, e: &EvalResult) {
        let row = [e.step as f64, e.time_s, e.acc, e.loss, e.n as f64];
        if e.split == "test" {
            self.test.push(row);
            self.last_test = Some(e.clone());
        } else {
            self.val.push(row);
            self.per_class.clone_from(&e.per_class_acc);
            self.last_val = Some(e.clone());
        }
    }

    /// Records a snapshot (and its router statistics as series).
    pub fn on_snapshot(&mut self, s: Snapshot) {
        let step = s.step as f64;
        if self.shares.len() < s.blocks.len() {
            self.shares.resize_with(s.blocks.len(), Vec::new);
            self.entropy.resize_with(s.blocks.len(), Series::default);
        }
        for (i, b) in s.blocks.iter().enumerate() {
            if let Some(r) = &b.router {
                if self.shares[i].len() < r.mean_alpha.len() {
                    self.shares[i].resize_with(r.mean_alpha.len(), Series::default);
                }
                for (p, a) in r.mean_alpha.iter().enumerate() {
                    self.shares[i][p].push(step, self.time_s, f64::from(*a));
                }
                self.entropy[i].push(step, self.time_s, f64::from(r.entropy_norm));
            }
        }
        // Replace a snapshot of the same step (e.g. after a command while paused).
        if self.snapshots.last().is_some_and(|l| l.step == s.step) {
            self.snapshots.pop();
            self.filter_cache.clear();
        }
        self.snapshots.push(s);
        if self.snapshots.len() > MAX_SNAPSHOTS {
            // Thin the older half, keep the recent half dense.
            let half = self.snapshots.len() / 2;
            let mut i = 0;
            self.snapshots.retain(|_| {
                i += 1;
                i > half || i % 2 == 0
            });
        }
    }

    /// Whether anything was recorded.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.loss.points.is_empty() && self.snapshots.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn progress(step: u64, time_s: f64) -> Progress {
        Progress {
            step,
            epoch: 0.0,
            loss: 1.0,
            route_loss: 0.0,
            train_acc: 0.5,
            lr: 1e-3,
            img_per_s: 10.0,
            time_s,
            class_loss: None,
        }
    }

    #[test]
    fn steps_per_second_leave_paused_time_out() {
        // 10 steps in 1 s, a pause of 60 s, 10 more steps in 1 s: 20 steps / 2 s of training,
        // not 20 / 62.
        let mut h = RunHistory::default();
        for s in 1..=10 {
            h.on_progress(&progress(s, 0.1 * s as f64));
        }
        h.paused_gap = true;
        for s in 11..=20 {
            h.on_progress(&progress(s, 61.0 + 0.1 * (s - 10) as f64));
        }
        let sps = h.steps_per_s();
        assert!(sps.is_some_and(|v| (v - 20.0 / 1.9).abs() < 1e-9), "{sps:?}");
    }

    fn eval(step: u64, split: &str, acc: f64, n: u64) -> EvalResult {
        EvalResult {
            step,
            split: split.into(),
            loss: 0.5,
            acc,
            per_class_acc: Vec::new(),
            n,
            time_s: step as f64,
            ..EvalResult::default()
        }
    }

    #[test]
    fn each_evaluation_keeps_its_n_and_the_best_validation_is_found() {
        let mut h = RunHistory::default();
        assert_eq!(h.best_val_eval(), None);
        h.on_eval(&eval(10, "val", 0.7, 200));
        h.on_eval(&eval(20, "val", 0.8, 200));
        h.on_eval(&eval(30, "val", f64::NAN, 200));
        h.on_eval(&eval(40, "val", 0.8, 0));
        h.on_eval(&eval(40, "test", 0.75, 12));
        assert_eq!(
            h.val.iter().map(|v| v[4]).collect::<Vec<_>>(),
            [200.0, 200.0, 200.0, 0.0]
        );
        assert_eq!(h.test, [[40.0, 40.0, 0.75, 0.5, 12.0]]);
        // The first of the equal best, with its n.
        assert_eq!(h.best_val_eval(), Some([20.0, 20.0, 0.8, 0.5, 200.0]));
        assert_eq!(h.best_val(), Some(0.8));
    }

    #[test]
    fn series_stays_bounded_and_keeps_the_shape() {
        let mut s = Series::default();
        for i in 0..100_000 {
            s.push(f64::from(i), f64::from(i) * 0.01, f64::from(i).sqrt());
        }
        assert!(s.points.len() <= MAX_POINTS);
        assert!(s.points.len() > MAX_POINTS / 2);
        let first = s.points[0];
        let last = s.points[s.points.len() - 1];
        assert!(first[0].abs() < f64::EPSILON);
        assert!(last[0] > 99_000.0, "the end of the run is kept: {}", last[0]);
        let ema = s.ema(false, 0.9);
        assert_eq!(ema.len(), s.points.len());
    }
}
