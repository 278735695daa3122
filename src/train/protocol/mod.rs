//! The one seam between the engine and every display (CLI reporter, desktop app, tests): plain,
//! serialisable data. Displays send [`Command`]s and receive [`Event`]s; they never see a tensor.

pub use crate::config::{Coeff, Lockable, PerCoeff};
use crate::config::{Prior, VitConfig};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

mod ablation;
pub use ablation::{Ablation, AblationBlock, AblationRow, AblationScore, AllBlocks, BlockUsage, USAGE_BINS};

/// The version of this protocol's serde form (a network client and server must agree).
pub const PROTOCOL_VERSION: u32 = 2;

/// Which blocks a coefficient command addresses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Target {
    /// Every MoPPA block.
    All,
    /// One block, by index.
    Block(usize),
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::All => f.write_str("all"),
            Self::Block(b) => write!(f, "{b}"),
        }
    }
}

/// How a coefficient command changes every channel.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SetMode {
    /// Set every channel to this value (> 0).
    Set(f64),
    /// Multiply every channel by this factor (> 0).
    Scale(f64),
}

/// A run-wide hyper-parameter that can change live.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Hyper {
    /// τ of heat and wave (> 0).
    Tau,
    /// Wave damping γ (≥ 0).
    Gamma,
    /// Route-regularization weight λ (≥ 0).
    RouteWeight,
    /// Router temperature T (> 0).
    Temperature,
    /// Peak learning rate (> 0); the schedule keeps its shape.
    Lr,
}

impl Hyper {
    /// Name as in files and logs.
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Self::Tau => "tau",
            Self::Gamma => "gamma",
            Self::RouteWeight => "route_weight",
            Self::Temperature => "temperature",
            Self::Lr => "lr",
        }
    }

    /// The range of valid values (INTERFACES.md "General").
    #[must_use]
    pub fn range(self) -> crate::config::ValueRange {
        use crate::config::range;
        match self {
            Self::Tau => range::TAU,
            Self::Gamma => range::GAMMA,
            Self::RouteWeight => range::ROUTE_WEIGHT,
            Self::Temperature => range::TEMPERATURE,
            Self::Lr => range::LR,
        }
    }
}

/// What a display asks of the engine. Takes effect at the next step boundary.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "snake_case")]
pub enum Command {
    /// Begin training (a worker may also start on its own).
    Start,
    /// Hold at the next step boundary.
    Pause,
    /// Continue after a pause.
    Resume,
    /// Run exactly one step, then hold.
    Step,
    /// Finish now: final evaluation and checkpoint, then `Finished`.
    Stop,
    /// Change κ, c or ε of one block or all.
    SetCoeff {
        /// Which coefficient.
        coeff: Coeff,
        /// Which blocks.
        target: Target,
        /// Set or scale.
        mode: SetMode,
    },
    /// Change τ, γ, λ, T or the learning rate.
    SetHyper {
        /// Which.
        hyper: Hyper,
        /// New value.
        value: f64,
    },
    /// Hold a coefficient out of the optimizer (or release it).
    Lock {
        /// Which tensor.
        what: Lockable,
        /// Which blocks.
        target: Target,
        /// True to lock, false to release.
        locked: bool,
    },
    /// Evaluate on the validation split now.
    Evaluate,
    /// Write the adapter to a path.
    SaveCheckpoint {
        /// Destination.
        path: PathBuf,
    },
    /// Use validation image `index` as the probe for router maps.
    SetProbe {
        /// Index into the validation split.
        index: usize,
    },
    /// Use the user's own image as the probe (opened or dropped on the Router view): already
    /// resized to the backbone's input size ([`crate::train::probe::probe_rgb`]); the snapshots
    /// then carry its prediction and every block's per-token router weights. Protocol 2.
    SetProbeImage {
        /// The file's name, for display.
        name: String,
        /// The pixels, square at the backbone's input size.
        image: Rgb,
    },
    /// Which channel the per-channel filter view shows (`None`: only the channel mean).
    SetChannel {
        /// Channel index `< rank`.
        channel: Option<usize>,
    },
    /// Measure what each prior contributes now ([`Ablation`]) on `images` validation images
    /// (a fixed, seeded subset), between steps, leaving the run as it was.
    Ablate {
        /// Subset size.
        images: usize,
    },
    /// Stop an ablation in progress.
    CancelAblation,
    /// A network client asks for the run folder's adapter and config (answered by the server
    /// with [`Event::RunFile`]s; a local run has no use for it).
    FetchRunFiles,
}

/// Static facts about a run, sent once when the model is ready.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunInfo {
    /// Method label (`moppa r8`).
    pub method: String,
    /// Trainable scalars.
    pub trainable: usize,
    /// `cpu` or `cuda:0`.
    pub device: String,
    /// CPU threads of the training pool.
    pub threads: usize,
    /// Class names.
    pub classes: Vec<String>,
    /// Transformer blocks.
    pub blocks: usize,
    /// Token grid (H, W).
    pub grid: (usize, usize),
    /// Active priors (MoPPA), in order.
    pub priors: Vec<Prior>,
    /// MoPPA rank (0 for other methods).
    pub rank: usize,
    /// Planned steps.
    pub total_steps: u64,
    /// Training / validation / test images.
    pub split_sizes: [usize; 3],
    /// The resolved run config as JSON.
    pub config: serde_json::Value,
    /// The run folder, if any.
    pub out: Option<PathBuf>,
    /// The step the run starts at (resumed runs start later).
    pub start_step: u64,
    /// The backbone's architecture (for parameter counts of other methods).
    pub backbone: VitConfig,
    /// Validation images available as probes.
    pub probes: usize,
    /// This run's id in this session (network viewers check they reach the run they expect).
    #[serde(default)]
    pub run_id: String,
}

/// One optimizer step's numbers.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Progress {
    /// Steps done.
    pub step: u64,
    /// Epoch (fractional).
    pub epoch: f64,
    /// Total loss (fine-tuning: cross-entropy + route loss; masked pretraining: the
    /// reconstruction loss).
    pub loss: f64,
    /// Route loss (already × λ).
    pub route_loss: f64,
    /// Accuracy on this batch, 0..1.
    pub train_acc: f64,
    /// Learning rate used.
    pub lr: f64,
    /// Training throughput (images/s, smoothed).
    pub img_per_s: f64,
    /// Seconds since the run started.
    pub time_s: f64,
    /// SupMAE pretraining: the classifier's cross-entropy beside the reconstruction loss.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub class_loss: Option<f64>,
}

/// A small square image (RGB, row-major).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Rgb {
    /// Side in pixels.
    pub size: usize,
    /// `size·size·3` bytes.
    pub pixels: Vec<u8>,
}

/// The image the router maps are drawn over.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Probe {
    /// Its pixels at the backbone's input size.
    pub image: Rgb,
    /// Where it came from.
    pub origin: ProbeOrigin,
}

/// Where a probe image came from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProbeOrigin {
    /// A validation image.
    Val {
        /// Its index in the validation split.
        index: usize,
        /// Its label.
        label: u32,
    },
    /// The user's image ([`Command::SetProbeImage`]).
    File {
        /// Its file name.
        name: String,
    },
}

/// Router statistics of one block (patch tokens).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RouterStats {
    /// ᾱ: mean weight of each prior over the batch.
    pub mean_alpha: Vec<f32>,
    /// Mean routing entropy −Σ α ln α.
    pub entropy: f32,
    /// Entropy / ln k, 0..1.
    pub entropy_norm: f32,
    /// Share of tokens whose argmax is each prior.
    pub argmax_share: Vec<f32>,
}

/// One MoPPA block at a snapshot.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BlockSnapshot {
    /// Block index.
    pub block: usize,
    /// Channel-mean gain of each active prior, `H·W` row-major, in prior order.
    pub filters_mean: Vec<Vec<f32>>,
    /// The selected channel's gains (empty when no channel is selected).
    pub filters_channel: Vec<Vec<f32>>,
    /// ᾱ-weighted mix of the channel-mean gains.
    pub mix: Vec<f32>,
    /// κ, c and ε per channel (empty for an inactive prior).
    #[serde(flatten)]
    pub coeffs: PerCoeff<Vec<f32>>,
    /// Source map S (`H·W`, empty if Poisson is off).
    pub source: Vec<f32>,
    /// Router statistics on the last training batch (None for a single prior).
    pub router: Option<RouterStats>,
    /// Per-token α of the probe image, `H·W·k` (token router), or `k` values.
    pub probe_alpha: Vec<f32>,
    /// Locked tensors of this block.
    pub locked: Vec<Lockable>,
}

/// The model's internals at one step, for the live views.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    /// Step.
    pub step: u64,
    /// Token grid (H, W).
    pub grid: (usize, usize),
    /// Active priors.
    pub priors: Vec<Prior>,
    /// Selected channel for `filters_channel`.
    pub channel: Option<usize>,
    /// τ, γ, λ, T in force.
    pub tau: f64,
    /// γ.
    pub gamma: f64,
    /// λ.
    pub route_weight: f64,
    /// T.
    pub temperature: f64,
    /// MoPPA blocks.
    pub blocks: Vec<BlockSnapshot>,
    /// The probe image and where it came from.
    pub probe: Option<Probe>,
    /// Predicted class of the probe.
    pub probe_prediction: Option<u32>,
}

/// A misclassified validation image (INTERFACES.md "Run folder", `eval.misclassified`).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Misclassified {
    /// Index into the split as the data spec orders it.
    pub index: u64,
    /// The predicted class.
    pub predicted: u32,
    /// The predicted class's probability.
    pub prob: f64,
}

/// An evaluation result.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct EvalResult {
    /// Step.
    pub step: u64,
    /// `val` or `test`.
    pub split: String,
    /// Mean cross-entropy (masked pretraining: the reconstruction loss).
    pub loss: f64,
    /// Accuracy 0..1 (NaN, written as null, for a pretraining objective without a classifier).
    pub acc: f64,
    /// Accuracy per class.
    pub per_class_acc: Vec<f64>,
    /// Images evaluated (0 where unknown: a record written before it was recorded).
    pub n: u64,
    /// Seconds since start.
    pub time_s: f64,
    /// Counts, `confusion[true][predicted]` (empty where unknown, or beyond
    /// [`MAX_CONFUSION_CLASSES`] classes).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub confusion: Vec<Vec<u64>>,
    /// Validation only: up to [`MAX_MISCLASSIFIED`] misclassified images, the most confident first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub misclassified: Vec<Misclassified>,
}

/// Evaluations of tasks with more classes than this carry no confusion matrix (its counts grow
/// as the square of the classes).
pub const MAX_CONFUSION_CLASSES: usize = 1000;
/// How many misclassified images a validation record lists.
pub const MAX_MISCLASSIFIED: usize = 32;

/// A command took effect.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Applied {
    /// Step at which it applies (the next step runs with it).
    pub step: u64,
    /// What changed (`kappa`, `lock source`, `lr`, …).
    pub command: String,
    /// `all` or a block index.
    pub target: String,
    /// Old value (channel mean for coefficients).
    pub old: f64,
    /// New value.
    pub new: f64,
    /// Seconds since start.
    pub time_s: f64,
}

/// A warning or error, with the file (and line) involved.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Notice {
    /// Step, when known.
    pub step: u64,
    /// Seconds since start.
    pub time_s: f64,
    /// One line.
    pub message: String,
    /// File involved.
    pub path: Option<PathBuf>,
    /// Line in that file.
    pub line: Option<usize>,
}

/// Where a run is in its life: the one lifecycle type of the worker (which holds at `Ready`,
/// `Running` or `Paused`), the displays and the lessons' checks. (A run folder followed by a
/// reader has its own [`crate::train::replay::Liveness`]: whether its writer still writes, which
/// is another question.)
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum RunStatus {
    /// Setting up (no model yet).
    #[default]
    None,
    /// Model loaded, waiting for Start.
    Ready,
    /// Training.
    Running,
    /// Holding.
    Paused,
    /// Ended.
    Finished,
    /// Ended by a failure (setup, a checkpoint write, a panic).
    Failed,
}

impl RunStatus {
    /// The states a lesson's check may name, with their names in lesson files.
    pub const LESSON_NAMES: [(Self, &'static str); 4] = [
        (Self::Ready, "ready"),
        (Self::Running, "running"),
        (Self::Paused, "paused"),
        (Self::Finished, "finished"),
    ];

    /// Label for the status bar.
    #[must_use]
    pub fn label(self) -> &'static str {
        match self {
            Self::None => "starting",
            Self::Ready => "ready",
            Self::Running => "training",
            Self::Paused => "paused",
            Self::Finished => "finished",
            Self::Failed => "failed",
        }
    }
}

/// Why a run ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FinishReason {
    /// All steps done.
    Done,
    /// A Stop command.
    Stopped,
    /// The loss was not finite and the run could not continue.
    Diverged,
    /// Ctrl-C.
    Interrupted,
    /// Setup failed (bad data, bad checkpoint).
    Failed,
}

impl FinishReason {
    /// The name as in files (`done`, `stopped`, `diverged`, `interrupted`, `failed`).
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Self::Done => "done",
            Self::Stopped => "stopped",
            Self::Diverged => "diverged",
            Self::Interrupted => "interrupted",
            Self::Failed => "failed",
        }
    }
}

/// The end of a run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Finished {
    /// Why.
    pub reason: FinishReason,
    /// Steps done.
    pub steps: u64,
    /// Best validation accuracy seen.
    pub best_val_acc: Option<f64>,
    /// Final test accuracy.
    pub test_acc: Option<f64>,
    /// Checkpoints written.
    pub checkpoints: Vec<PathBuf>,
    /// Seconds since start.
    pub time_s: f64,
    /// For a failed run: what failed, in one line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// For a failed run: the file involved, if one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathBuf>,
}

/// What the engine tells displays.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Event {
    /// The model and data are ready.
    Started(Box<RunInfo>),
    /// One step done (may be dropped for a slow display).
    Progress(Progress),
    /// Live internals (may be coalesced for a slow display).
    Snapshot(Box<Snapshot>),
    /// An evaluation.
    Eval(EvalResult),
    /// A command took effect.
    Applied(Applied),
    /// Training is holding (pause, single step done, or a non-finite loss).
    Paused {
        /// Step.
        step: u64,
    },
    /// Training continues.
    Resumed {
        /// Step.
        step: u64,
    },
    /// Something worth knowing; the run goes on.
    Warning(Notice),
    /// Something went wrong.
    Error(Notice),
    /// The loss or a gradient was not finite: nothing was updated, the last good weights are
    /// kept, and training holds (or stops, for a worker told to stop on divergence).
    Diverged(Notice),
    /// The run ended.
    Finished(Finished),
    /// A prior ablation finished.
    Ablation(Box<Ablation>),
    /// How far an ablation in progress is: `done` of `total` passes (may be dropped).
    AblationProgress {
        /// Passes done.
        done: usize,
        /// Passes in all.
        total: usize,
    },
    /// A file of the run folder, sent to the network client that asked ([`Command::FetchRunFiles`]).
    RunFile {
        /// Its name in the run folder.
        name: String,
        /// Its bytes, base64.
        base64: String,
    },
}

impl Event {
    /// Progress and snapshots may be dropped or coalesced for a slow display; nothing else may.
    #[must_use]
    pub fn is_droppable(&self) -> bool {
        matches!(
            self,
            Self::Progress(_) | Self::Snapshot(_) | Self::AblationProgress { .. }
        )
    }
}
