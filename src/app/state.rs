//! Settings the app keeps between launches (eframe persistence). Everything is
//! `#[serde(default)]`, so settings from an older version still load. Runtime state (runs,
//! histories, textures) lives in the app itself and is never persisted.

use crate::config::{Prior, RunConfig};
use crate::physics::PriorCoeffs;
use serde::{Deserialize, Serialize};

/// The main views.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum Tab {
    /// Spectral filters, radial profiles, impulse responses.
    #[default]
    Filters,
    /// Router weights per block.
    Router,
    /// Loss and accuracy curves.
    Curves,
    /// Every run shown, side by side.
    Runs,
    /// The priors on a photo.
    Playground,
}

impl Tab {
    /// All tabs in order.
    pub const ALL: [Self; 5] = [Self::Filters, Self::Router, Self::Curves, Self::Runs, Self::Playground];

    /// Label.
    #[must_use]
    pub fn label(self) -> &'static str {
        match self {
            Self::Filters => "Filters",
            Self::Router => "Router",
            Self::Curves => "Curves",
            Self::Runs => "Runs",
            Self::Playground => "Playground",
        }
    }

    /// From a command-line name.
    #[must_use]
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.label().eq_ignore_ascii_case(s))
    }
}

/// Curve options.
#[allow(clippy::struct_excessive_bools)] // four independent switches of the view
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct CurveSettings {
    /// EMA weight of the past (0 = raw).
    pub ema: f64,
    /// Logarithmic loss axis.
    pub log_y: bool,
    /// x axis in seconds instead of steps.
    pub by_time: bool,
    /// Draw the other runs shown.
    pub overlay: bool,
    /// Seeds of one setting as one mean line with a ± std band.
    pub group_seeds: bool,
}

impl Default for CurveSettings {
    fn default() -> Self {
        Self {
            ema: 0.9,
            log_y: false,
            by_time: false,
            overlay: true,
            group_seeds: true,
        }
    }
}

/// Filter-view options.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct FilterSettings {
    /// Block shown.
    pub block: usize,
    /// Channel shown (None: the channel mean).
    pub channel: Option<usize>,
}

/// Router-view options.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct RouterSettings {
    /// Block whose lines and probe map are shown.
    pub block: usize,
    /// A prior whose mean weight α stays below this (and whose token share below
    /// `dead_share`) is "dead".
    pub dead_below: f32,
    /// A prior whose token share (argmax) stays below this (and mean α below `dead_below`) is
    /// "dead".
    pub dead_share: f32,
    /// One prior's token share above this has "collapsed" the router.
    pub collapse_above: f32,
    /// Normalised per-token routing entropy below this has "collapsed" the router.
    pub collapse_entropy: f32,
    /// The span of steps an alert reads: every snapshot in the last `span` steps (at least 2)
    /// must meet its condition.
    pub span: u64,
    /// Probe image index in the validation split.
    pub probe: usize,
}

impl Default for RouterSettings {
    fn default() -> Self {
        Self {
            block: 0,
            dead_below: 0.05,
            dead_share: 0.02,
            collapse_above: 0.9,
            collapse_entropy: 0.2,
            span: 100,
            probe: 0,
        }
    }
}

/// Whether a live coefficient change sets or scales.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum ChangeMode {
    /// Set every channel to the slider value.
    #[default]
    Set,
    /// Multiply every channel by the slider value.
    Scale,
}

/// The live-control panel's choices (the values it shows are the selected run's, see
/// `RunHistory::values`; they are never kept here).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ControlSettings {
    /// Block addressed (None: all blocks).
    pub block: Option<usize>,
    /// Set or scale.
    pub mode: ChangeMode,
    /// Factor slider (scale mode).
    pub factor: f64,
}

impl Default for ControlSettings {
    fn default() -> Self {
        Self {
            block: None,
            mode: ChangeMode::Set,
            factor: 1.5,
        }
    }
}

/// Playground settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct PlaygroundSettings {
    /// Prior applied.
    pub prior: Prior,
    /// Coefficients (pixel units).
    pub coeffs: PriorCoeffs,
    /// Last image opened (None: the bundled sample).
    pub image: Option<std::path::PathBuf>,
}

impl Default for PlaygroundSettings {
    fn default() -> Self {
        Self {
            prior: Prior::Heat,
            coeffs: PriorCoeffs {
                kappa: 8.0,
                c: 10.0,
                eps: 0.005,
                tau: 1.0,
                gamma: 0.02,
            },
            image: None,
        }
    }
}

/// Everything persisted.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Settings {
    /// The run to launch.
    pub config: RunConfig,
    /// Visible tab.
    pub tab: Tab,
    /// Curves.
    pub curves: CurveSettings,
    /// Filters.
    pub filters: FilterSettings,
    /// Router.
    pub router: RouterSettings,
    /// Live controls.
    pub controls: ControlSettings,
    /// Playground.
    pub playground: PlaygroundSettings,
    /// Dark theme.
    pub dark: bool,
    /// Run folders opened lately, newest first.
    pub recent_runs: Vec<std::path::PathBuf>,
    /// The last server connected to (`HOST:PORT`).
    pub last_server: String,
    /// How the runs table is sorted and filtered.
    pub runs_table: crate::app::panels::runs::RunsTable,
    /// The router's diagnostics (ablation, tokens, classes, accuracy).
    pub diagnose: crate::app::panels::diagnose::DiagnoseSettings,
}

/// How many run folders the recent list keeps.
pub const RECENT_RUNS: usize = 12;

impl Settings {
    /// Puts `dir` first in the recent runs.
    pub fn remember(&mut self, dir: &std::path::Path) {
        self.recent_runs.retain(|d| d != dir);
        self.recent_runs.insert(0, dir.to_owned());
        self.recent_runs.truncate(RECENT_RUNS);
    }
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            config: RunConfig::default(),
            tab: Tab::Filters,
            curves: CurveSettings::default(),
            filters: FilterSettings::default(),
            router: RouterSettings::default(),
            controls: ControlSettings::default(),
            playground: PlaygroundSettings::default(),
            dark: true,
            recent_runs: Vec::new(),
            last_server: crate::train::serve::DEFAULT_ADDR.to_owned(),
            runs_table: crate::app::panels::runs::RunsTable::default(),
            diagnose: crate::app::panels::diagnose::DiagnoseSettings::default(),
        }
    }
}
