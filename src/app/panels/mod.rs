//! One panel per file. A panel is a struct with its own sub-state (its settings, or the
//! playground's image) whose `ui(&mut self, ui, …)` draws from plain data and returns
//! [`Action`]s; the app applies them after drawing (panels never change the app's state or talk
//! to the engine themselves). The runs table and the status bar hold no state: plain functions.

pub mod accuracy;
pub mod alerts;
pub mod curves;
pub mod diagnose;
pub mod filters;
pub mod launch;
pub mod live;
pub mod playground;
pub mod router;
pub mod runs;
pub mod status;
pub mod usage;

use crate::train::protocol::Command;

/// What a panel asks the app to do.
#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    /// Start (or resume) training.
    Start,
    /// Pause.
    Pause,
    /// One step.
    Step,
    /// Stop (final evaluation and checkpoint).
    Stop,
    /// Abandon the run and prepare a fresh one with the current settings.
    Reset,
    /// Send a command to the engine.
    Send(Command),
    /// Pick a backbone file.
    PickBackbone,
    /// Pick an image to probe the router with.
    PickProbeImage,
    /// Probe the router with this image file.
    ProbeWith(std::path::PathBuf),
    /// Download a backbone by hub id (`hf:ORG/NAME[@REV]`) into the cache, then use it.
    DownloadBackbone(String),
    /// Pick a dataset folder.
    PickData,
    /// Load run settings from TOML.
    LoadConfig,
    /// Save run settings as TOML.
    SaveConfig,
    /// Save the metrics as CSV.
    ExportCsv,
    /// Save a plot (by id) as PNG.
    ExportPlot(&'static str),
    /// Save a screenshot of the window.
    Screenshot,
    /// Save the adapter checkpoint.
    SaveAdapter,
    /// Open an image in the playground.
    PickImage,
    /// Show run `i` in the filter, router and live views.
    Select(usize),
    /// Pick run folders to open.
    OpenRuns,
    /// Open this run folder.
    OpenRun(std::path::PathBuf),
    /// Connect to a served run with the Connect… dialog's fields.
    Connect,
    /// Ask a served run for its adapter and config (into a folder picked then).
    FetchRunFiles,
    /// Pick a lesson file and play it.
    OpenLesson,
    /// Play lesson `i` of the catalogue.
    StartLesson(usize),
    /// Open the Connect… dialog.
    OpenConnect,
    /// Close the Connect… dialog.
    CloseConnect,
    /// Switch the dark theme on or off.
    SetDark(bool),
    /// Dismiss message `i`.
    Dismiss(usize),
    /// A new run of this app's with the selected run's settings.
    NewRunFrom,
    /// Show (true) or hide these runs in the plots.
    Show(Vec<usize>, bool),
    /// Pin this run as the baseline (None: unpin).
    Pin(Option<usize>),
    /// A prior ablation of the run shown on this many validation images (by its worker, or
    /// here on its saved adapter).
    Ablate(usize),
    /// Stop the ablation in progress.
    CancelAblation,
    /// Make validation image `i` the router's probe.
    ProbeVal(usize),
}

pub use crate::train::protocol::RunStatus;
