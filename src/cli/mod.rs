//! The `moppa` command line: clap definitions, one file per command family, dispatch, and the
//! mapping of failures to exit codes (2 = usage / bad value, 1 = runtime failure, 130 =
//! interrupted). A sibling of the app: it never names it (`main.rs` builds the app's options).

pub mod args;
pub mod backbones;
pub mod bench;
pub mod compare;
pub mod eval;
pub mod eval_ablate;
pub mod model_cmds;
mod physics_cmds;
pub mod predict;
pub mod pretrain;
pub mod reporter;
pub mod train;

use clap::{Parser, Subcommand};

/// Exit status for usage errors and invalid values.
pub const EXIT_USAGE: i32 = 2;
/// Exit status for runtime failures (unreadable files, bad data).
pub const EXIT_FAILURE: i32 = 1;

/// A failure with the exit code it maps to; printed once, as one line, by `main`.
#[derive(Debug)]
pub enum CliError {
    /// A bad flag value or combination: exit 2.
    Usage(anyhow::Error),
    /// A runtime failure: exit 1.
    Failure(anyhow::Error),
    /// A failure whose message was printed already (by the reporter): exit with this code, say
    /// nothing more.
    Reported(i32),
}

impl CliError {
    /// The process exit code.
    #[must_use]
    pub fn exit_code(&self) -> i32 {
        match self {
            Self::Usage(_) => EXIT_USAGE,
            Self::Failure(_) => EXIT_FAILURE,
            Self::Reported(code) => *code,
        }
    }

    /// The message, causes joined on one line (`None`: already shown).
    #[must_use]
    pub fn message(&self) -> Option<String> {
        match self {
            Self::Usage(e) | Self::Failure(e) => Some(format!("{e:#}")),
            Self::Reported(_) => None,
        }
    }
}

impl From<anyhow::Error> for CliError {
    fn from(e: anyhow::Error) -> Self {
        Self::Failure(e)
    }
}

/// Shorthand for a usage error.
pub fn usage(msg: impl std::fmt::Display) -> CliError {
    CliError::Usage(anyhow::anyhow!("{msg}"))
}

/// MoPPA Studio: see and steer physics-prior adapters (heat, wave, Poisson) while they train.
///
/// Run without a subcommand to open the desktop app (when built with the `gui` feature).
#[derive(Debug, Parser)]
#[command(name = "moppa", version, about, long_about = None)]
pub struct Cli {
    /// What to do; none opens the app.
    #[command(subcommand)]
    pub command: Option<Command>,
    /// App: press Start as soon as the model is ready.
    #[arg(long, help_heading = "App (no subcommand)")]
    pub autostart: bool,
    /// App: let the built-in run train, save a PNG of the window here, and exit.
    #[arg(long, value_name = "FILE", help_heading = "App (no subcommand)")]
    pub screenshot: Option<std::path::PathBuf>,
    /// App: steps to train before --screenshot.
    #[arg(long, default_value_t = 200, help_heading = "App (no subcommand)")]
    pub after_steps: u64,
    /// App: the tab to show (filters, router, curves, runs, playground).
    #[arg(long, help_heading = "App (no subcommand)")]
    pub tab: Option<String>,
    /// App: renderer, glow (default; fast in software GL) or wgpu.
    #[arg(long, help_heading = "App (no subcommand)")]
    pub renderer: Option<String>,
    /// App: train, print UI frame-time statistics after SECS seconds, and exit.
    #[arg(long, value_name = "SECS", help_heading = "App (no subcommand)")]
    pub frame_stats: Option<f64>,
    /// App: type file paths in the window instead of the desktop's file dialogs (also
    /// MOPPA_TYPED_PATHS=1; the app does so by itself where no dialog can open).
    #[arg(long, help_heading = "App (no subcommand)")]
    pub typed_paths: bool,
    /// App: start from this run config (TOML) instead of the saved settings.
    #[arg(long, value_name = "FILE", help_heading = "App (no subcommand)")]
    pub config: Option<std::path::PathBuf>,
    /// App: play a lesson: a built-in by name (heat-low-pass, waves-ring, poisson-global,
    /// inside-a-network, the-router, breaking-it) or a lesson file.
    #[arg(long, value_name = "NAME|FILE", help_heading = "App (no subcommand)")]
    pub lesson: Option<String>,
    /// App: with --lesson, walk it by itself to step N (e.g. for --screenshot).
    #[arg(long, value_name = "N", requires = "lesson", help_heading = "App (no subcommand)")]
    pub lesson_step: Option<usize>,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Print the frequency grid Λ, the three spectral filters and their impulse responses.
    Filters(physics_cmds::FiltersArgs),
    /// Apply one prior to an image at full resolution, per colour channel.
    Apply(physics_cmds::ApplyArgs),
    /// List the timm models in the Hugging Face cache: id, family, parameters, input size, size on disk, whether they load.
    Backbones(backbones::BackbonesArgs),
    /// Print a table of trainable parameters per method for a backbone and class count.
    Params(model_cmds::ParamsArgs),
    /// Run a backbone (and adapter) on images stored in a safetensors file; write logits and router weights.
    Infer(model_cmds::InferArgs),
    /// Fine-tune a backbone on a dataset (headless; same engine as the app).
    Train(Box<train::TrainArgs>),
    /// Evaluate a saved adapter on a dataset split; print accuracy and write per-class results.
    Eval(eval::EvalArgs),
    /// Classify your own images (files or folders) with a trained adapter; CSV of classes and probabilities.
    Predict(predict::PredictArgs),
    /// Time forward, backward and optimizer of a training step (medians), with GFLOP/s.
    Bench(bench::BenchArgs),
    /// Train a ViT from scratch (supervised or masked autoencoder) and write it as a backbone file.
    Pretrain(pretrain::PretrainArgs),
    /// Run several methods on the same backbone, data and budget over several seeds; print a table.
    Compare(Box<compare::CompareArgs>),
    /// Open run folders in the app (a parent folder opens every run under it); curves,
    /// filters and router views, the runs table, and runs still being written are followed.
    View(ViewArgs),
}

/// `moppa view`.
#[derive(Debug, Clone, clap::Args)]
pub struct ViewArgs {
    /// Run folders, or folders holding run folders (e.g. a `moppa compare --plan` folder).
    #[arg(required = true, value_name = "DIR")]
    pub dirs: Vec<std::path::PathBuf>,
}

impl ViewArgs {
    /// The run folders named, parents expanded; a path that is missing or holds no run folder is
    /// a usage error naming it.
    ///
    /// # Errors
    /// A usage error naming the first path that is not, and does not hold, a run folder.
    pub fn run_folders(&self) -> Result<Vec<std::path::PathBuf>, CliError> {
        let mut out = Vec::new();
        for d in &self.dirs {
            if !d.is_dir() {
                return Err(usage(format!("{}: no such folder", d.display())));
            }
            let found = crate::train::replay::run_folders_under(d);
            if found.is_empty() {
                return Err(usage(format!(
                    "{}: not a run folder and no run folder below it (a run folder holds metrics.jsonl)",
                    d.display()
                )));
            }
            out.extend(found);
        }
        Ok(out)
    }
}

/// Runs a parsed subcommand; returns the exit code.
pub fn run(command: Command) -> Result<i32, CliError> {
    match &command {
        Command::Train(args) => return train::train(args),
        Command::Pretrain(args) => return pretrain::pretrain(args),
        Command::Compare(args) => return compare::compare(args),
        Command::View(_) => {
            return Err(usage(
                "moppa view needs the desktop app (this build has none: rebuild with the default `gui` feature)",
            ));
        }
        _ => {}
    }
    match command {
        Command::Train(_) | Command::Pretrain(_) | Command::Compare(_) | Command::View(_) => Ok(()),
        Command::Eval(args) => eval::eval(&args),
        Command::Predict(args) => predict::predict(&args),
        Command::Bench(args) => bench::bench(&args),
        Command::Filters(args) => physics_cmds::filters(&args),
        Command::Apply(args) => physics_cmds::apply(&args),
        Command::Params(args) => model_cmds::params(&args),
        Command::Backbones(args) => backbones::backbones(&args),
        Command::Infer(args) => model_cmds::infer(&args),
    }
    .map(|()| 0)
}
