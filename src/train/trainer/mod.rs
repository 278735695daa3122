//! One training run's state and its operations, one file per responsibility: [`setup`]
//! (backbone, data, model, optimizer, resume), [`step`] (one optimizer step, evaluation),
//! [`live`] (the commands that change a run while it trains), [`snapshot`] (the model's internals
//! for the live views) and [`checkpoint`] (adapter and resume state). The worker thread drives
//! it; nothing here knows about displays.

mod checkpoint;
mod live;
mod setup;
mod snapshot;
mod step;

use super::optim::{AdamW, schedule};
use super::protocol::{Notice, Progress, RunInfo};
use crate::config::RunConfig;
use crate::data::Normalize;
use crate::data::loader::{EvalSet, Loader};
use crate::model::PeftModel;
use crate::model::peft::BlockRouting;
use crate::train::runfolder::RunLock;
use crate::train::stop::StopFlag;
use candle_core::Device;
use std::path::PathBuf;
use std::time::Instant;

pub use super::error::TrainError;
pub use setup::new_run_id;

/// What a step produced.
pub enum StepOutcome {
    /// A normal step.
    Done(Progress),
    /// The loss or a gradient was not finite; nothing was updated. The message names the step
    /// and the coefficients in force.
    Diverged(String),
}

/// A training run.
pub struct Trainer {
    /// The resolved config.
    pub cfg: RunConfig,
    /// The model.
    pub model: PeftModel,
    opt: AdamW,
    loader: Loader,
    val: EvalSet,
    test: EvalSet,
    normalize: Normalize,
    device: Device,
    /// Steps done.
    pub step: u64,
    /// Planned steps.
    pub total: u64,
    peak_lr: f64,
    /// The loader's position after the last step: (epoch, batch index).
    position: (u64, u64),
    epoch: f64,
    probe: usize,
    /// The user's image as the probe (name, pixels), in place of the validation image.
    probe_image: Option<(String, crate::train::protocol::Rgb)>,
    channel: Option<usize>,
    last_routing: Vec<BlockRouting>,
    /// Best validation accuracy so far.
    pub best_val: Option<f64>,
    clock: Instant,
    time_offset: f64,
    throughput: f64,
    /// Notices collected during setup and loading, for the worker to emit.
    pub notices: Vec<Notice>,
    /// Checkpoints written.
    pub checkpoints: Vec<PathBuf>,
    info: RunInfo,
    /// Set by a validation evaluation that beat the best so far (the worker then keeps that
    /// adapter as `adapter-best.safetensors`).
    improved: bool,
    /// Long waits (data, evaluation) end early when this asks to.
    stop: StopFlag,
    /// The run folder's one-writer lock, held for the whole run.
    _lock: Option<RunLock>,
}

impl Trainer {
    /// Static facts about the run.
    #[must_use]
    pub fn info(&self) -> &RunInfo {
        &self.info
    }

    /// Seconds since the run began (resumed runs continue the clock).
    #[must_use]
    pub fn time_s(&self) -> f64 {
        self.time_offset + self.clock.elapsed().as_secs_f64()
    }

    /// Names the run (a served run's id is chosen before its setup).
    pub fn set_run_id(&mut self, id: String) {
        self.info.run_id = id;
    }

    /// The run's clock: when it started here and the seconds before (resumed runs continue it).
    #[must_use]
    pub fn clock(&self) -> (Instant, f64) {
        (self.clock, self.time_offset)
    }

    /// Whether the planned steps are done.
    #[must_use]
    pub fn done(&self) -> bool {
        self.step >= self.total
    }

    /// Learning rate of the next step.
    #[must_use]
    pub fn current_lr(&self) -> f64 {
        schedule(self.step, self.total, self.cfg.warmup, self.peak_lr)
    }

    /// Whether the last validation evaluation beat the best before it (cleared by reading).
    pub fn take_improved(&mut self) -> bool {
        std::mem::take(&mut self.improved)
    }

    fn notice(&self, message: String) -> Notice {
        Notice {
            step: self.step,
            time_s: self.time_s(),
            message,
            path: None,
            line: None,
        }
    }
}
