//! The run flags shared by `moppa train` and `moppa compare` (every field of the run
//! configuration, also a TOML key) and the value parsers of the enumerated flags.

use super::{CliError, usage};
use crate::config::{DeviceChoice, MethodKind, Placement, Precision, Prior, RouterKind, RunConfig};
use crate::train::evaluate::run_config;
use clap::Args;
use serde::de::DeserializeOwned;
use std::path::PathBuf;

fn serde_enum<T: DeserializeOwned>(s: &str) -> Result<T, String> {
    serde_json::from_value(serde_json::Value::String(s.to_owned())).map_err(|_| format!("unknown value '{s}'"))
}

pub(crate) fn parse_method(s: &str) -> Result<MethodKind, String> {
    serde_enum(s).map_err(|e| format!("{e} (moppa, lora, adaptformer, linear, full)"))
}
fn parse_placement(s: &str) -> Result<Placement, String> {
    serde_enum(s).map_err(|e| format!("{e} (pre_attn, parallel_mlp)"))
}
fn parse_router(s: &str) -> Result<RouterKind, String> {
    serde_enum(s).map_err(|e| format!("{e} (token, image, layer)"))
}
pub(crate) fn parse_device(s: &str) -> Result<DeviceChoice, String> {
    s.parse()
}
pub(crate) fn parse_dtype(s: &str) -> Result<Precision, String> {
    serde_enum(s).map_err(|e| format!("{e} (f32, bf16)"))
}
fn parse_prior(s: &str) -> Result<Prior, String> {
    s.parse::<Prior>().map_err(|e| e.to_string())
}

/// Every run setting as an optional flag (TOML keys are the same names with `_`).
#[derive(Debug, Clone, Default, Args)]
#[allow(clippy::struct_excessive_bools)] // one per switch flag
pub struct RunArgs {
    /// A TOML run config; flags override its values.
    #[arg(long, help_heading = "Run")]
    pub config: Option<PathBuf>,
    /// Backbone: `builtin` (default: a ViT pretrained on Fashion-MNIST), a timm safetensors file, or random:PRESET.
    #[arg(long, help_heading = "Run")]
    pub backbone: Option<String>,
    /// Heads of a timm backbone file (timm files do not record it; default D/64).
    #[arg(long, help_heading = "Run")]
    pub heads: Option<usize>,
    /// Data: `builtin:digits` (default), `idx:DIR`, a VTAB-1K task folder or an ImageFolder.
    #[arg(long, help_heading = "Run")]
    pub data: Option<String>,
    /// Keep N training images per class (seeded): the low-data regime PEFT is for.
    #[arg(long, help_heading = "Run")]
    pub few_shot: Option<usize>,
    /// VTAB-1K: train on train800val200.txt.
    #[arg(long = "final", help_heading = "Run")]
    pub final_split: bool,
    /// Method: moppa (default), lora, adaptformer, linear, full.
    #[arg(long, value_parser = parse_method, help_heading = "Method")]
    pub method: Option<MethodKind>,
    /// Rank r of MoPPA / LoRA, bottleneck of AdaptFormer (default 8).
    #[arg(long, help_heading = "Method")]
    pub rank: Option<usize>,
    /// MoPPA placement: pre_attn (default) or parallel_mlp.
    #[arg(long, value_parser = parse_placement, help_heading = "Method")]
    pub placement: Option<Placement>,
    /// MoPPA router: token (default), image or layer.
    #[arg(long, value_parser = parse_router, help_heading = "Method")]
    pub router: Option<RouterKind>,
    /// Active priors, comma-separated (default heat,wave,poisson).
    #[arg(long, value_parser = parse_prior, value_delimiter = ',', help_heading = "Method")]
    pub priors: Option<Vec<Prior>>,
    /// Route-regularization weight λ ≥ 0 (default 0.01).
    #[arg(long, allow_negative_numbers = true, help_heading = "Method")]
    pub route_weight: Option<f64>,
    /// τ > 0 of the heat and wave filters (default 1).
    #[arg(long, allow_negative_numbers = true, help_heading = "Method")]
    pub tau: Option<f64>,
    /// Wave damping γ ≥ 0 (default 0).
    #[arg(long, allow_negative_numbers = true, help_heading = "Method")]
    pub gamma: Option<f64>,
    /// Router temperature T > 0 (default 1).
    #[arg(long, allow_negative_numbers = true, help_heading = "Method")]
    pub temperature: Option<f64>,
    /// MoPPA output scale s (default 1).
    #[arg(long, allow_negative_numbers = true, help_heading = "Method")]
    pub scale: Option<f64>,
    /// LoRA α (scale α/r; default r).
    #[arg(long, help_heading = "Method")]
    pub lora_alpha: Option<f64>,
    /// Optimizer steps (default 300 unless --epochs).
    #[arg(long, help_heading = "Optimisation", conflicts_with = "epochs")]
    pub steps: Option<u64>,
    /// Epochs (used when --steps is not given).
    #[arg(long, help_heading = "Optimisation")]
    pub epochs: Option<u64>,
    /// Images per batch (default 48).
    #[arg(long, help_heading = "Optimisation")]
    pub batch: Option<usize>,
    /// Peak learning rate (default: 3e-2 adapters and linear, 1e-3 full).
    #[arg(long, allow_negative_numbers = true, help_heading = "Optimisation")]
    pub lr: Option<f64>,
    /// AdamW weight decay on matrices (default 0.01).
    #[arg(long, allow_negative_numbers = true, help_heading = "Optimisation")]
    pub weight_decay: Option<f64>,
    /// Linear warm-up steps before the cosine decay (default 30).
    #[arg(long, help_heading = "Optimisation")]
    pub warmup: Option<u64>,
    /// Evaluate and checkpoint every N steps (default 100; 0: only at the end).
    #[arg(long, help_heading = "Optimisation")]
    pub eval_every: Option<u64>,
    /// Clip the global gradient norm (default 1; 0: off).
    #[arg(long, help_heading = "Optimisation")]
    pub grad_clip: Option<f64>,
    /// Seed of initialisation, shuffling and augmentation (default 0).
    #[arg(long, help_heading = "Optimisation")]
    pub seed: Option<u64>,
    /// Random horizontal flips while training.
    #[arg(long, help_heading = "Optimisation")]
    pub flip: bool,
    /// Random crops after padding each side by N pixels while training.
    #[arg(long, help_heading = "Optimisation")]
    pub crop_pad: Option<u32>,
    /// Random rotations by up to ± DEG degrees while training (default: 10 for builtin:digits, 0
    /// for other data; 0 turns them off).
    #[arg(long, value_name = "DEG", help_heading = "Optimisation")]
    pub rotate: Option<u32>,
    /// Random zooms by up to ± PCT percent while training.
    #[arg(long, value_name = "PCT", help_heading = "Optimisation")]
    pub zoom: Option<u32>,
    /// auto (default), cpu or cuda.
    #[arg(long, value_parser = parse_device, help_heading = "Machine")]
    pub device: Option<DeviceChoice>,
    /// CPU threads (default: every core).
    #[arg(long, help_heading = "Machine")]
    pub threads: Option<usize>,
    /// f32 (default) or bf16 (GPU: bf16 weights and activations; CPU: the transformer's products
    /// with its weights from bf16 operands, f32 accumulation, like torch.autocast).
    #[arg(long, value_parser = parse_dtype, help_heading = "Machine")]
    pub dtype: Option<Precision>,
    /// Run folder: config.toml, metrics.jsonl/.csv, adapter.safetensors, state.safetensors.
    #[arg(long, help_heading = "Output")]
    pub out: Option<PathBuf>,
    /// Continue the run in this folder (its config, weights, optimizer and data position).
    #[arg(long, help_heading = "Output")]
    pub resume: Option<PathBuf>,
    /// --out names a run folder already: move it aside to DIR.old-N and start afresh.
    #[arg(long, help_heading = "Output", conflicts_with = "resume")]
    pub overwrite: bool,
    /// For schedulers: resume the run in --out if it is unfinished, exit 0 at once if it is
    /// finished, start it if there is none.
    #[arg(long, help_heading = "Output", conflicts_with_all = ["resume", "overwrite"])]
    pub auto_resume: bool,
    /// Publish the run at HOST:PORT (default 127.0.0.1:7878; port 0: any free one) for the app's
    /// Connect… to watch and steer it. Needs --out.
    #[arg(long, value_name = "ADDR", num_args = 0..=1, default_missing_value = "127.0.0.1:7878", help_heading = "Network")]
    pub serve: Option<String>,
    /// The token that lets a client steer the served run, at least 16 characters (default:
    /// $MOPPA_SERVE_TOKEN, else a new one, printed). Limits: docs/limits.md.
    #[arg(long, help_heading = "Network")]
    pub token: Option<String>,
    /// Clients without the token may watch (never steer) the served run.
    #[arg(long, help_heading = "Network")]
    pub serve_public: bool,
}

/// Keys a resumed run may change (INTERFACES.md): its length, the machine and the outputs.
const RESUMABLE_KEYS: [&str; 12] = [
    "steps",
    "epochs",
    "threads",
    "device",
    "eval_every",
    "out",
    "resume",
    "overwrite",
    "auto_resume",
    "serve",
    "token",
    "serve_public",
];

/// The first setting in which `changed` differs from `base` outside the resumable keys, as
/// `(dotted key, base's value)`.
fn first_change(base: &serde_json::Value, changed: &serde_json::Value, prefix: &str) -> Option<(String, String)> {
    let (Some(b), Some(c)) = (base.as_object(), changed.as_object()) else {
        return (base != changed).then(|| (prefix.trim_end_matches('.').to_owned(), base.to_string()));
    };
    for (k, cv) in c {
        if prefix.is_empty() && RESUMABLE_KEYS.contains(&k.as_str()) {
            continue;
        }
        let bv = b.get(k).unwrap_or(&serde_json::Value::Null);
        if bv != cv {
            if bv.is_object() && cv.is_object() {
                return first_change(bv, cv, &format!("{prefix}{k}."));
            }
            let shown = match bv {
                serde_json::Value::String(s) => s.clone(),
                serde_json::Value::Null => "(none)".into(),
                other => other.to_string(),
            };
            return Some((format!("{prefix}{k}"), shown));
        }
    }
    None
}

impl RunArgs {
    /// The flags applied onto `c`.
    fn apply(&self, c: &mut RunConfig) {
        macro_rules! set {
            ($($field:ident => $target:expr),* $(,)?) => { $( if let Some(v) = self.$field.clone() { $target = v.into(); } )* };
        }
        set!(backbone => c.backbone, data => c.data, method => c.method.method, rank => c.method.rank,
             placement => c.method.placement, router => c.method.router, priors => c.method.priors,
             route_weight => c.method.route_weight, tau => c.method.tau, gamma => c.method.gamma,
             temperature => c.method.temperature, scale => c.method.scale, batch => c.batch,
             weight_decay => c.weight_decay, warmup => c.warmup, eval_every => c.eval_every,
             grad_clip => c.grad_clip, seed => c.seed, device => c.device, dtype => c.dtype);
        set!(heads => c.heads, few_shot => c.few_shot, lora_alpha => c.method.lora_alpha, steps => c.steps,
             epochs => c.epochs, lr => c.lr, threads => c.threads, out => c.out);
        if self.epochs.is_some() && self.steps.is_none() {
            c.steps = None;
        }
        if self.final_split {
            c.final_split = true;
        }
        // Augmentation flags change fields of the augmentation in force (the data's default
        // unless a config file named one): `--rotate 0` turns the built-in task's rotations off.
        if self.flip || self.crop_pad.is_some() || self.rotate.is_some() || self.zoom.is_some() {
            let mut a = c.augment();
            a.flip |= self.flip;
            a.crop_pad = self.crop_pad.unwrap_or(a.crop_pad);
            a.rotate_deg = self.rotate.unwrap_or(a.rotate_deg);
            a.scale_pct = self.zoom.unwrap_or(a.scale_pct);
            c.augment = Some(a);
        }
        if self.overwrite {
            c.overwrite = true;
        }
        if self.auto_resume {
            c.auto_resume = true;
        }
        if self.serve.is_some() {
            c.serve.clone_from(&self.serve);
        }
        if self.token.is_some() {
            c.token.clone_from(&self.token);
        }
        if self.serve_public {
            c.serve_public = true;
        }
    }

    /// Defaults ← `--config FILE` ← flags; with `--resume DIR`, the run's own config ← the flags
    /// a resumed run may change ([`Self::resolve_resume`]).
    pub fn resolve(&self) -> Result<RunConfig, CliError> {
        self.resolve_with(None)
    }

    /// As [`Self::resolve`], with the text of `--config FILE` given (`moppa compare` takes its own
    /// keys out of it first); `None` reads the file.
    pub fn resolve_with(&self, config_text: Option<&str>) -> Result<RunConfig, CliError> {
        if let Some(dir) = &self.resume {
            return self.resolve_resume(dir);
        }
        let mut c = if let Some(path) = &self.config {
            let text = match config_text {
                Some(t) => t.to_owned(),
                None => std::fs::read_to_string(path)
                    .map_err(|e| CliError::Failure(anyhow::anyhow!("{}: {e}", path.display())))?,
            };
            RunConfig::from_toml(&text).map_err(|e| usage(format!("{}: {e}", path.display())))?
        } else {
            RunConfig::default()
        };
        self.apply(&mut c);
        c.validate().map_err(usage)?;
        Ok(c)
    }

    /// The configuration of the run in `dir`, continued: its own `config.toml`, with only the
    /// flags a resumed run may change (steps/epochs, threads, device, eval-every, outputs); any
    /// other flag must repeat the run's own value, else a usage error names it.
    pub fn resolve_resume(&self, dir: &std::path::Path) -> Result<RunConfig, CliError> {
        if self.config.is_some() && !self.auto_resume {
            return Err(usage(
                "--config does not apply to a resumed run: its own config.toml is its configuration",
            ));
        }
        if self.out.as_ref().is_some_and(|o| o != dir) && self.resume.is_some() {
            return Err(usage(format!(
                "--out must be the resumed run's folder {} (or left out)",
                dir.display()
            )));
        }
        if !dir.join(crate::train::runfolder::CONFIG_TOML).is_file() {
            return Err(usage(format!(
                "--resume {}: not a run folder (no {})",
                dir.display(),
                crate::train::runfolder::CONFIG_TOML
            )));
        }
        let base = run_config(dir).map_err(|e| CliError::Failure(e.into()))?;
        let as_json = |c: &RunConfig| serde_json::to_value(c).map_err(|e| CliError::Failure(e.into()));
        if let Some(path) = &self.config {
            // `--config F --out DIR --auto-resume` (a job line of `moppa compare --plan`, run
            // again after a requeue): F must describe this run.
            let text = std::fs::read_to_string(path)
                .map_err(|e| CliError::Failure(anyhow::anyhow!("{}: {e}", path.display())))?;
            let planned = RunConfig::from_toml(&text).map_err(|e| usage(format!("{}: {e}", path.display())))?;
            let planned = same_spelling(&base, planned);
            if let Some((key, value)) = first_change(&as_json(&base)?, &as_json(&planned)?, "") {
                return Err(usage(format!(
                    "{}: this run was trained with {key} = {value}, not as --config {} says",
                    dir.display(),
                    path.display()
                )));
            }
        }
        let mut c = base.clone();
        self.apply(&mut c);
        // Paths are compared resolved: `--data ../x` given again from here is the same folder.
        let mut c = same_spelling(&base, c);
        if let Some((key, value)) = first_change(&as_json(&base)?, &as_json(&c)?, "") {
            return Err(usage(format!(
                "this run was trained with {key} = {value}; a resumed run keeps its settings (only --steps/--epochs, --threads, --device, --eval-every may change)"
            )));
        }
        c.resume = Some(dir.to_owned());
        c.out = Some(dir.to_owned());
        c.validate().map_err(usage)?;
        Ok(c)
    }
}

/// `c` with its paths absolute and spelled as in `base` where they name the same file: the
/// spelling given is for display, never a difference between two runs.
fn same_spelling(base: &RunConfig, c: RunConfig) -> RunConfig {
    let mut c = c.with_absolute_paths();
    c.data_given.clone_from(&base.data_given);
    c.backbone_given.clone_from(&base.backbone_given);
    c
}
