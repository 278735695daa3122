//! Lessons: guided experiments through the app's own views (INTERFACES.md, "Lessons"). A lesson
//! is one TOML file: a `title`, an optional `summary`, then `[[step]]` tables, each with `text`,
//! an optional `setup` (playground settings, a run to prepare or start, a step to pause at), a
//! view to `look` at, an `action` the learner is asked to do and a `check` that it happened,
//! both from fixed vocabularies, so a teacher writes lessons without Rust and the app can perform
//! and check every step itself. Built-in lessons are embedded from `assets/lessons/`; teachers'
//! lessons come from `lessons/` in the app's data folder and `moppa --lesson PATH`.

mod parse;
pub mod player;

use super::state::Tab;
use crate::config::{Coeff, Lockable, Prior, RunConfig};
use crate::train::protocol::{Hyper, RunStatus};
use std::path::{Path, PathBuf};

pub use parse::parse;

/// A value a step may set or check.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Value {
    /// A playground coefficient (pixel units).
    Playground(PlaygroundCoeff),
    /// κ, c or ε of the run shown: the mean over its blocks and channels.
    RunCoeff(Coeff),
    /// τ, γ, λ, T or the learning rate of the run shown.
    RunHyper(Hyper),
    /// Something the run shown measured (checked, never set).
    Measured(Measure),
}

/// What a lesson can check but not set: the router's statistics in the last snapshot of the run
/// shown, and its latest prior ablation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Measure {
    /// `router.top_share`: the largest token share of any prior in any block (1: every token of
    /// a block prefers one prior; 1/k: the load is spread evenly).
    TopShare,
    /// `router.entropy`: the normalised per-token entropy, mean over blocks (0: each token picks
    /// one prior; 1: each mixes all evenly).
    Entropy,
    /// `ablation.heat|wave|poisson`: the accuracy change in points when the prior is removed in
    /// every block (negative: the model needs it).
    Ablation(Prior),
}

impl Measure {
    /// All five, with their names in lesson files.
    pub const ALL: [(Self, &'static str); 5] = [
        (Self::TopShare, "router.top_share"),
        (Self::Entropy, "router.entropy"),
        (Self::Ablation(Prior::Heat), "ablation.heat"),
        (Self::Ablation(Prior::Wave), "ablation.wave"),
        (Self::Ablation(Prior::Poisson), "ablation.poisson"),
    ];

    /// The name used in lesson files.
    #[must_use]
    pub fn name(self) -> &'static str {
        Self::ALL.iter().find(|(m, _)| *m == self).map_or("?", |(_, n)| n)
    }
}

/// The playground's coefficients.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PlaygroundCoeff {
    /// κ.
    Kappa,
    /// c.
    C,
    /// ε.
    Eps,
    /// τ.
    Tau,
    /// γ.
    Gamma,
}

/// A button the learner presses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Press {
    /// Start (or resume) the run.
    Start,
    /// Pause it.
    Pause,
    /// One step.
    Step,
    /// Stop it (final evaluation).
    Stop,
    /// Prepare a fresh run with the launch settings.
    Reset,
    /// Evaluate now.
    Evaluate,
    /// Ask what each prior does (a prior ablation of the run shown).
    Ablate,
}

/// What a step asks the learner to do (the app can also do it: "Do it").
#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    /// Move a value to this number.
    Set(Value, f64),
    /// Lock a coefficient (or the source map) of every block out of the optimizer.
    Lock(Lockable),
    /// Press a run button.
    Press(Press),
    /// Switch to a view.
    Tab(Tab),
    /// Open the bundled sample photo in the playground.
    OpenSample,
}

/// An alert a step may wait for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AlertKind {
    /// A prior's router weight stayed near zero.
    Dead,
    /// The router collapsed onto one prior.
    Collapse,
    /// An error was shown (a diverged run, a failed command).
    Error,
    /// Any of them.
    Any,
}

/// What must hold before Next.
#[derive(Clone, Debug, PartialEq)]
pub enum Check {
    /// A value within `[min, max]`.
    InRange(Value, f64, f64),
    /// This view is shown.
    Tab(Tab),
    /// The run shown reached this step.
    Step(u64),
    /// The run shown is in this state.
    State(RunStatus),
    /// This tensor is locked in every block of the run shown.
    Locked(Lockable),
    /// An alert was raised since the step began.
    Alert(AlertKind),
    /// The run shown has a finished prior ablation.
    Ablated,
}

/// Where the learner should look.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Look {
    /// A main view.
    Tab(Tab),
    /// The live controls (the panel on the right during a MoPPA run).
    Live,
}

/// Playground settings a step sets up (unset fields keep their value).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PlaygroundSetup {
    /// The prior shown.
    pub prior: Option<Prior>,
    /// Coefficients.
    pub kappa: Option<f64>,
    /// Wave speed.
    pub c: Option<f64>,
    /// Screening.
    pub eps: Option<f64>,
    /// Time.
    pub tau: Option<f64>,
    /// Damping.
    pub gamma: Option<f64>,
    /// Show the bundled sample photo.
    pub sample: bool,
}

/// What a step prepares when it begins.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Setup {
    /// Playground settings.
    pub playground: Option<PlaygroundSetup>,
    /// A run to prepare (the built-in default with these settings over it).
    pub run: Option<RunConfig>,
    /// Start the run (prepared here, or the one shown).
    pub start: bool,
    /// Pause the run shown when it reaches this step.
    pub pause_at: Option<u64>,
}

/// One step of a lesson.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Step {
    /// One or two sentences.
    pub text: String,
    /// What it prepares.
    pub setup: Setup,
    /// Where to look.
    pub look: Option<Look>,
    /// What to do.
    pub action: Option<Action>,
    /// What must hold before Next (from `check`, else what the action implies).
    pub check: Option<Check>,
}

/// A lesson.
#[derive(Clone, Debug, PartialEq)]
pub struct Lesson {
    /// Its file stem (`moppa --lesson NAME`).
    pub name: String,
    /// Title.
    pub title: String,
    /// One line on what it teaches.
    pub summary: String,
    /// The steps, in order.
    pub steps: Vec<Step>,
}

/// The built-in lessons, in teaching order: file stem and text.
pub const BUILT_IN: [(&str, &str); 6] = [
    (
        "heat-low-pass",
        include_str!("../../../assets/lessons/heat-low-pass.toml"),
    ),
    ("waves-ring", include_str!("../../../assets/lessons/waves-ring.toml")),
    (
        "poisson-global",
        include_str!("../../../assets/lessons/poisson-global.toml"),
    ),
    (
        "inside-a-network",
        include_str!("../../../assets/lessons/inside-a-network.toml"),
    ),
    ("the-router", include_str!("../../../assets/lessons/the-router.toml")),
    ("breaking-it", include_str!("../../../assets/lessons/breaking-it.toml")),
];

/// The lessons found, and the files that could not be read (each message names the file and
/// line).
#[derive(Clone, Debug, Default)]
pub struct Catalogue {
    /// Readable lessons: built-ins first, then the user's (sorted by file name).
    pub lessons: Vec<Lesson>,
    /// `FILE:LINE: problem`, one per unreadable file.
    pub errors: Vec<String>,
}

impl Catalogue {
    /// The built-ins and every `*.toml` in `user_dir` (if given).
    #[must_use]
    pub fn load(user_dir: Option<&Path>) -> Self {
        let mut c = Self::default();
        for (name, text) in BUILT_IN {
            match parse(name, text) {
                Ok(l) => c.lessons.push(l),
                Err(e) => c.errors.push(format!("assets/lessons/{name}.toml:{e}")),
            }
        }
        if let Some(dir) = user_dir
            && let Ok(entries) = std::fs::read_dir(dir)
        {
            let mut files: Vec<PathBuf> = entries
                .filter_map(Result::ok)
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|e| e == "toml"))
                .collect();
            files.sort();
            for f in files {
                c.add_file(&f);
            }
        }
        c
    }

    /// Reads one lesson file; on error records it and returns `None`.
    pub fn add_file(&mut self, path: &Path) -> Option<usize> {
        match read_file(path) {
            Ok(l) => {
                self.lessons.push(l);
                Some(self.lessons.len() - 1)
            }
            Err(e) => {
                self.errors.push(e);
                None
            }
        }
    }

    /// A lesson by its file stem.
    #[must_use]
    pub fn find(&self, name: &str) -> Option<usize> {
        self.lessons.iter().position(|l| l.name == name)
    }
}

/// Reads a lesson file; the error is `FILE:LINE: problem`.
///
/// # Errors
/// The file cannot be read or is not a valid lesson.
pub fn read_file(path: &Path) -> Result<Lesson, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let stem = path
        .file_stem()
        .map_or_else(|| "lesson".to_owned(), |s| s.to_string_lossy().into_owned());
    parse(&stem, &text).map_err(|e| format!("{}:{e}", path.display()))
}

/// What `--lesson` names: a built-in by file stem, or a file (anything with a `/` or ending in
/// `.toml`).
///
/// # Errors
/// Neither: the message lists the built-in names (or says why the file cannot be read).
pub fn resolve(arg: &str) -> Result<Lesson, String> {
    if names_a_file(arg) {
        return read_file(Path::new(arg));
    }
    let Some((name, text)) = BUILT_IN.iter().find(|(n, _)| *n == arg) else {
        let names: Vec<&str> = BUILT_IN.iter().map(|(n, _)| *n).collect();
        return Err(format!(
            "no lesson named '{arg}' (built-in: {}; or a path to a .toml file)",
            names.join(", ")
        ));
    };
    parse(name, text).map_err(|e| format!("assets/lessons/{name}.toml:{e}"))
}

/// Whether `--lesson` names a file rather than a built-in.
#[must_use]
pub fn names_a_file(arg: &str) -> bool {
    arg.contains(std::path::MAIN_SEPARATOR)
        || arg.contains('/')
        || Path::new(arg)
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("toml"))
}

impl Value {
    /// The name used in lesson files.
    #[must_use]
    pub fn name(self) -> String {
        match self {
            Self::Playground(c) => format!("playground.{}", c.name()),
            Self::RunCoeff(c) => format!("run.{}", c.name()),
            Self::RunHyper(h) => format!("run.{}", h.name()),
            Self::Measured(m) => m.name().to_owned(),
        }
    }

    /// How it is written for the learner.
    #[must_use]
    pub fn symbol(self) -> &'static str {
        match self {
            Self::Playground(PlaygroundCoeff::Kappa) | Self::RunCoeff(Coeff::Kappa) => "κ",
            Self::Playground(PlaygroundCoeff::C) | Self::RunCoeff(Coeff::C) => "c",
            Self::Playground(PlaygroundCoeff::Eps) | Self::RunCoeff(Coeff::Eps) => "ε",
            Self::Playground(PlaygroundCoeff::Tau) | Self::RunHyper(Hyper::Tau) => "τ",
            Self::Playground(PlaygroundCoeff::Gamma) | Self::RunHyper(Hyper::Gamma) => "γ",
            Self::RunHyper(Hyper::RouteWeight) => "λ",
            Self::RunHyper(Hyper::Temperature) => "T",
            Self::RunHyper(Hyper::Lr) => "the learning rate",
            Self::Measured(Measure::TopShare) => "the largest prior share",
            Self::Measured(Measure::Entropy) => "the routing entropy",
            Self::Measured(Measure::Ablation(_)) => "the accuracy change without the prior",
        }
    }
}

impl PlaygroundCoeff {
    /// All five.
    pub const ALL: [Self; 5] = [Self::Kappa, Self::C, Self::Eps, Self::Tau, Self::Gamma];

    /// The name used in lesson files (κ, c and ε spelled as everywhere else, by [`Coeff::name`]).
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Self::Kappa => Coeff::Kappa.name(),
            Self::C => Coeff::C.name(),
            Self::Eps => Coeff::Eps.name(),
            Self::Tau => "tau",
            Self::Gamma => "gamma",
        }
    }

    /// The range of valid values (the same as the run's: `config::range`).
    #[must_use]
    pub fn range(self) -> crate::config::ValueRange {
        use crate::config::range;
        match self {
            Self::Kappa => range::KAPPA,
            Self::C => range::WAVE_SPEED,
            Self::Eps => range::EPS,
            Self::Tau => range::TAU,
            Self::Gamma => range::GAMMA,
        }
    }
}

impl Value {
    /// The range of valid values of what this names.
    #[must_use]
    pub fn range(self) -> crate::config::ValueRange {
        match self {
            Self::Playground(c) => c.range(),
            Self::RunCoeff(c) => c.range(),
            Self::RunHyper(h) => h.range(),
            Self::Measured(m) => crate::config::ValueRange {
                name: m.name(),
                min: if matches!(m, Measure::Ablation(_)) { -100.0 } else { 0.0 },
                max: if matches!(m, Measure::Ablation(_)) { 100.0 } else { 1.0 },
                open_min: false,
            },
        }
    }
}

impl Press {
    /// All seven, with their names in lesson files.
    pub const ALL: [(Self, &'static str); 7] = [
        (Self::Start, "start"),
        (Self::Pause, "pause"),
        (Self::Step, "step"),
        (Self::Stop, "stop"),
        (Self::Reset, "reset"),
        (Self::Evaluate, "evaluate"),
        (Self::Ablate, "ablate"),
    ];

    /// The button's label.
    #[must_use]
    pub fn label(self) -> &'static str {
        match self {
            Self::Start => "Start",
            Self::Pause => "Pause",
            Self::Step => "Step",
            Self::Stop => "Stop",
            Self::Reset => "Reset",
            Self::Evaluate => "Evaluate now",
            Self::Ablate => "Run (What does each prior do?)",
        }
    }
}

impl Action {
    /// What the learner is asked to do, in words.
    #[must_use]
    pub fn describe(&self) -> String {
        match self {
            Self::Set(v @ Value::Playground(_), x) => format!("set {} to {x} in the playground", v.symbol()),
            Self::Set(v @ Value::RunCoeff(_), x) => format!("set {} to {x} for all blocks (live panel)", v.symbol()),
            Self::Set(v, x) => format!("set {} to {x} (live panel)", v.symbol()),
            Self::Lock(l) => format!("lock {} (live panel)", l.name()),
            Self::Press(p) => format!("press {}", p.label()),
            Self::Tab(t) => format!("open the {} view", t.label()),
            Self::OpenSample => "open the sample photo".into(),
        }
    }

    /// The check an action implies when the step gives none.
    #[must_use]
    pub fn implied_check(&self) -> Option<Check> {
        match self {
            Self::Set(v, x) => {
                let tol = (x.abs() * 0.1).max(1e-3);
                Some(Check::InRange(*v, x - tol, x + tol))
            }
            Self::Lock(l) => Some(Check::Locked(*l)),
            Self::Press(Press::Start) => Some(Check::State(RunStatus::Running)),
            Self::Press(Press::Pause) => Some(Check::State(RunStatus::Paused)),
            Self::Press(Press::Stop) => Some(Check::State(RunStatus::Finished)),
            Self::Press(Press::Reset) => Some(Check::State(RunStatus::Ready)),
            Self::Press(Press::Ablate) => Some(Check::Ablated),
            Self::Tab(t) => Some(Check::Tab(*t)),
            Self::Press(Press::Step | Press::Evaluate) | Self::OpenSample => None,
        }
    }
}

impl Check {
    /// What is awaited, in words.
    #[must_use]
    pub fn describe(&self) -> String {
        match self {
            Self::InRange(v, lo, hi) if hi.is_infinite() => format!("{} at least {lo}", v.symbol()),
            Self::InRange(v, lo, hi) if lo.is_infinite() => format!("{} at most {hi}", v.symbol()),
            Self::InRange(v, lo, hi) => format!("{} between {lo} and {hi}", v.symbol()),
            Self::Tab(t) => format!("the {} view shown", t.label()),
            Self::Step(n) => format!("the run at step {n}"),
            Self::State(s) => format!(
                "the run {}",
                RunStatus::LESSON_NAMES
                    .iter()
                    .find(|(x, _)| x == s)
                    .map_or(s.label(), |(_, n)| n)
            ),
            Self::Locked(l) => format!("{} locked", l.name()),
            Self::Alert(AlertKind::Error) => "an error shown".into(),
            Self::Alert(a) => format!("a router alert ({})", a.label()),
            Self::Ablated => "a prior ablation of the run (Router view, Priors removed)".into(),
        }
    }
}

impl AlertKind {
    /// All four, with their names in lesson files.
    pub const ALL: [(Self, &'static str); 4] = [
        (Self::Dead, "dead"),
        (Self::Collapse, "collapse"),
        (Self::Error, "error"),
        (Self::Any, "any"),
    ];

    /// In words.
    #[must_use]
    pub fn label(self) -> &'static str {
        Self::ALL.iter().find(|(s, _)| *s == self).map_or("", |(_, n)| n)
    }
}
