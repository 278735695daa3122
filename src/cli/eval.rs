//! `moppa eval`: a saved adapter's accuracy on a dataset split, with per-class results.

use super::{CliError, usage};
use crate::config::RunConfig;
use crate::data::Split;
use crate::train::evaluate::{OnBackbone, evaluate_adapter, run_config};
use clap::Args;
use std::fmt::Write as _;
use std::path::PathBuf;

/// `moppa eval`.
#[derive(Debug, Clone, Args)]
#[command(
    after_help = "Examples:\n  moppa eval --run runs/digits\n  moppa eval --adapter a.safetensors --backbone builtin --data builtin:digits --split val"
)]
pub struct EvalArgs {
    /// The adapter and its backbone.
    #[command(flatten)]
    pub source: AdapterSource,
    /// Data spec (default: the run's, or builtin:digits).
    #[arg(long)]
    pub data: Option<String>,
    /// test (default) or val.
    #[arg(long, default_value = "test")]
    pub split: String,
    /// Per-class results CSV (default: RUN/eval-SPLIT.csv, or next to the adapter).
    #[arg(long)]
    pub output: Option<PathBuf>,
    /// Images per forward pass.
    #[arg(long, default_value_t = 128)]
    pub batch: usize,
}

/// Which trained adapter, on which backbone (`moppa eval`, `moppa predict`).
#[derive(Debug, Clone, Args)]
pub struct AdapterSource {
    /// A run folder (its config.toml names backbone and data; its adapter.safetensors is used).
    #[arg(long, conflicts_with = "adapter")]
    pub run: Option<PathBuf>,
    /// An adapter checkpoint.
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// Backbone for --adapter (default: the run's, or builtin).
    #[arg(long)]
    pub backbone: Option<String>,
    /// Heads of a timm backbone file.
    #[arg(long)]
    pub heads: Option<usize>,
    /// Load onto a backbone file other than the one trained on (same shapes).
    #[arg(long)]
    pub force: bool,
}

/// An [`AdapterSource`] with its defaults filled in.
pub struct Resolved {
    /// The adapter file.
    pub adapter: PathBuf,
    /// The backbone spec.
    pub backbone: String,
    /// Heads of a timm backbone file.
    pub heads: Option<usize>,
    /// The run's config, for `--run`.
    pub base: Option<RunConfig>,
}

impl Resolved {
    /// The backbone, at the run's precision (f32 for a bare adapter file).
    #[must_use]
    pub fn on(&self) -> OnBackbone<'_> {
        OnBackbone {
            spec: &self.backbone,
            heads: self.heads,
            precision: self.base.as_ref().map(|c| c.dtype).unwrap_or_default(),
        }
    }
}

impl AdapterSource {
    /// The adapter file, backbone and heads: from the run folder, or the flags (default builtin).
    pub fn resolve(&self) -> Result<Resolved, CliError> {
        let (adapter, base) = match (&self.run, &self.adapter) {
            (Some(dir), _) => (
                dir.join(crate::train::runfolder::ADAPTER),
                Some(run_config(dir).map_err(|e| CliError::Failure(e.into()))?),
            ),
            (None, Some(a)) => (a.clone(), None),
            (None, None) => return Err(usage("give --run DIR or --adapter FILE")),
        };
        // A run's hf: backbone is loaded at the commit it trained on.
        let from_run = base.as_ref().map(crate::train::evaluate::run_backbone_spec);
        let backbone = self.backbone.clone().or(from_run).unwrap_or_else(|| "builtin".into());
        let heads = self.heads.or_else(|| base.as_ref().and_then(|c| c.heads));
        super::backbones::fetch(&backbone, None)?;
        Ok(Resolved {
            adapter,
            backbone,
            heads,
            base,
        })
    }
}

/// Runs `moppa eval`.
pub fn eval(args: &EvalArgs) -> Result<(), CliError> {
    let split = match args.split.as_str() {
        "test" => Split::Test,
        "val" => Split::Val,
        other => return Err(usage(format!("--split must be val or test (got {other})"))),
    };
    let resolved = args.source.resolve()?;
    let data = args
        .data
        .clone()
        .or_else(|| resolved.base.as_ref().map(|c| c.data.clone()))
        .unwrap_or_else(|| "builtin:digits".into());
    let eval = evaluate_adapter(
        &resolved.adapter,
        resolved.on(),
        &data,
        split,
        args.source.force,
        args.batch,
    )
    .map_err(|e| CliError::Failure(e.into()))?;
    for w in &eval.warnings {
        eprintln!("warning: {w}");
    }
    let (result, classes) = (eval.result, eval.classes);
    println!(
        "{} accuracy {:.4} (loss {:.4}) on {data}",
        split.name(),
        result.acc,
        result.loss
    );
    let mut csv = String::from("class,name,acc\n");
    for (i, (name, acc)) in classes.iter().zip(&result.per_class_acc).enumerate() {
        let _ = writeln!(csv, "{i},{name},{acc:.6}");
    }
    let out = args.output.clone().unwrap_or_else(|| match &args.source.run {
        Some(dir) => dir.join(format!("eval-{}.csv", split.name())),
        None => resolved.adapter.with_extension(format!("eval-{}.csv", split.name())),
    });
    std::fs::write(&out, csv)
        .map_err(|e| CliError::Failure(anyhow::anyhow!("cannot write '{}': {e}", out.display())))?;
    println!("per-class results: {}", out.display());
    Ok(())
}
