//! `moppa train` and `moppa eval`: the engine from the command line, with a progress bar on a
//! terminal and plain lines otherwise.

use super::{CliError, usage};
use crate::data::Split;
use crate::model::{MethodKind, Placement, RouterKind};
use crate::physics::Prior;
use crate::train::config::{DeviceChoice, Precision};
use crate::train::eval::{evaluate_adapter, run_config};
use crate::train::protocol::{Command, Event, FinishReason, Finished};
use crate::train::worker::raise_interrupt;
use crate::train::{RunConfig, WorkerHandle, WorkerOptions};
use clap::Args;
use serde::de::DeserializeOwned;
use std::fmt::Write as _;
use std::io::IsTerminal as _;
use std::path::PathBuf;

/// Exit status of an interrupted run.
pub const EXIT_INTERRUPTED: i32 = 130;

fn serde_enum<T: DeserializeOwned>(s: &str) -> Result<T, String> {
    serde_json::from_value(serde_json::Value::String(s.to_owned())).map_err(|_| format!("unknown value '{s}'"))
}

fn parse_method(s: &str) -> Result<MethodKind, String> {
    serde_enum(s).map_err(|e| format!("{e} (moppa, lora, adaptformer, linear, full)"))
}
fn parse_placement(s: &str) -> Result<Placement, String> {
    serde_enum(s).map_err(|e| format!("{e} (pre_attn, parallel_mlp)"))
}
fn parse_router(s: &str) -> Result<RouterKind, String> {
    serde_enum(s).map_err(|e| format!("{e} (token, image, layer)"))
}
fn parse_device(s: &str) -> Result<DeviceChoice, String> {
    serde_enum(s).map_err(|e| format!("{e} (auto, cpu, cuda)"))
}
fn parse_dtype(s: &str) -> Result<Precision, String> {
    serde_enum(s).map_err(|e| format!("{e} (f32, bf16)"))
}
fn parse_prior(s: &str) -> Result<Prior, String> {
    s.parse::<Prior>().map_err(|e| e.to_string())
}

/// Every run setting as an optional flag (TOML keys are the same names with `_`).
#[derive(Debug, Clone, Default, Args)]
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
    /// Optimizer steps (default 600 unless --epochs).
    #[arg(long, help_heading = "Optimisation")]
    pub steps: Option<u64>,
    /// Epochs (used when --steps is not given).
    #[arg(long, help_heading = "Optimisation")]
    pub epochs: Option<u64>,
    /// Images per batch (default 64).
    #[arg(long, help_heading = "Optimisation")]
    pub batch: Option<usize>,
    /// Peak learning rate (default: 1e-2 adapters, 3e-2 linear, 1e-3 full).
    #[arg(long, allow_negative_numbers = true, help_heading = "Optimisation")]
    pub lr: Option<f64>,
    /// AdamW weight decay on matrices (default 0.01).
    #[arg(long, allow_negative_numbers = true, help_heading = "Optimisation")]
    pub weight_decay: Option<f64>,
    /// Linear warm-up steps before the cosine decay (default 50).
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
    /// Random rotations by up to ± DEG degrees while training.
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
    /// f32 (default) or bf16 (GPU).
    #[arg(long, value_parser = parse_dtype, help_heading = "Machine")]
    pub dtype: Option<Precision>,
    /// Run folder: config.toml, metrics.jsonl/.csv, adapter.safetensors, state.safetensors.
    #[arg(long, help_heading = "Output")]
    pub out: Option<PathBuf>,
    /// Continue the run in this folder (its config, weights, optimizer and data position).
    #[arg(long, help_heading = "Output")]
    pub resume: Option<PathBuf>,
}

impl RunArgs {
    /// Defaults ← `--resume DIR/config.toml` or `--config FILE` ← flags.
    pub fn resolve(&self) -> Result<RunConfig, CliError> {
        let mut c = if let Some(dir) = &self.resume {
            let mut c = run_config(dir).map_err(|e| CliError::Failure(e.into()))?;
            c.resume = Some(dir.clone());
            c.out = Some(dir.clone());
            c
        } else if let Some(path) = &self.config {
            let text = std::fs::read_to_string(path)
                .map_err(|e| CliError::Failure(anyhow::anyhow!("{}: {e}", path.display())))?;
            RunConfig::from_toml(&text).map_err(|e| usage(format!("{}: {e}", path.display())))?
        } else {
            RunConfig::default()
        };
        macro_rules! set {
            ($($field:ident => $target:expr),* $(,)?) => { $( if let Some(v) = self.$field.clone() { $target = v.into(); } )* };
        }
        set!(backbone => c.backbone, data => c.data, method => c.method.method, rank => c.method.rank,
             placement => c.method.placement, router => c.method.router, priors => c.method.priors,
             route_weight => c.method.route_weight, tau => c.method.tau, gamma => c.method.gamma,
             temperature => c.method.temperature, scale => c.method.scale, batch => c.batch,
             weight_decay => c.weight_decay, warmup => c.warmup, eval_every => c.eval_every,
             grad_clip => c.grad_clip, seed => c.seed, device => c.device, dtype => c.dtype,
             crop_pad => c.augment.crop_pad, rotate => c.augment.rotate_deg, zoom => c.augment.scale_pct);
        set!(heads => c.heads, few_shot => c.few_shot, lora_alpha => c.method.lora_alpha, steps => c.steps,
             epochs => c.epochs, lr => c.lr, threads => c.threads, out => c.out);
        if self.epochs.is_some() && self.steps.is_none() {
            c.steps = None;
        }
        if self.final_split {
            c.final_split = true;
        }
        if self.flip {
            c.augment.flip = true;
        }
        c.validate().map_err(usage)?;
        Ok(c)
    }
}

/// `moppa train`.
#[derive(Debug, Clone, Args)]
#[command(
    after_help = "Examples:\n  moppa train                                   # MoPPA on the built-in pair (backbone + digits)\n  \
moppa train --method lora --few-shot 10 --out runs/lora10\n  \
moppa train --backbone vit_base.safetensors --data vtab/dtd --epochs 100 --out runs/dtd\n  \
moppa train --resume runs/dtd --steps 20000\nCtrl-C stops at the next step, writes a final checkpoint and exits with 130."
)]
pub struct TrainArgs {
    #[command(flatten)]
    pub run: RunArgs,
    /// Print plain lines even on a terminal.
    #[arg(long)]
    pub plain: bool,
}

/// Runs `moppa train`.
pub fn train(args: &TrainArgs) -> Result<i32, CliError> {
    let cfg = args.run.resolve()?;
    let handle = WorkerHandle::spawn(cfg, WorkerOptions::default()).map_err(|e| CliError::Failure(e.into()))?;
    let flag = handle.interrupt_flag();
    ctrlc::set_handler(move || raise_interrupt(&flag)).ok();
    let tty = std::io::stderr().is_terminal() && !args.plain;
    let finished = report(&handle, tty)?;
    handle.join();
    Ok(match finished.reason {
        FinishReason::Done | FinishReason::Stopped => 0,
        FinishReason::Interrupted => EXIT_INTERRUPTED,
        FinishReason::Diverged | FinishReason::Failed => 1,
    })
}

/// Turns events into a progress bar or plain lines; returns the end of the run.
fn report(handle: &WorkerHandle, tty: bool) -> Result<Finished, CliError> {
    let mut bar: Option<indicatif::ProgressBar> = None;
    let mut total = 0u64;
    let mut last_line = 0u64;
    let mut first_error: Option<String> = None;
    let say = |bar: &Option<indicatif::ProgressBar>, line: String| match bar {
        Some(b) => b.println(line),
        None => eprintln!("{line}"),
    };
    loop {
        let Ok(ev) = handle.events().recv() else {
            return Err(CliError::Failure(anyhow::anyhow!(
                "the training thread ended without a result"
            )));
        };
        match ev {
            Event::Started(info) => {
                total = info.total_steps;
                say(
                    &bar,
                    format!(
                        "{} · {} trainable · {} ({} threads) · {} classes · {}/{}/{} train/val/test images · {} steps",
                        info.method,
                        super::model_cmds::group_digits(info.trainable),
                        info.device,
                        info.threads,
                        info.classes.len(),
                        info.split_sizes[0],
                        info.split_sizes[1],
                        info.split_sizes[2],
                        info.total_steps
                    ),
                );
                if tty {
                    let b = indicatif::ProgressBar::new(total);
                    b.set_style(
                        indicatif::ProgressStyle::with_template(
                            "{bar:30.cyan/blue} {pos}/{len} {msg} · {elapsed_precise} ETA {eta}",
                        )
                        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
                    );
                    b.set_position(info.start_step);
                    bar = Some(b);
                }
            }
            Event::Progress(p) => {
                let msg = format!(
                    "loss {:.4} acc {:.3} lr {:.2e} {:.0} img/s",
                    p.loss, p.train_acc, p.lr, p.img_per_s
                );
                if let Some(b) = &bar {
                    b.set_position(p.step);
                    b.set_message(msg);
                } else if p.step == total || p.step >= last_line + (total / 20).max(1) {
                    last_line = p.step;
                    eprintln!("step {}/{} · {msg} · {:.1} s", p.step, total, p.time_s);
                }
            }
            Event::Eval(e) => say(
                &bar,
                format!(
                    "eval {} at step {}: acc {:.4} loss {:.4}",
                    e.split, e.step, e.acc, e.loss
                ),
            ),
            Event::Applied(a) => say(
                &bar,
                format!(
                    "applied {} ({}) at step {}: {} → {}",
                    a.command, a.target, a.step, a.old, a.new
                ),
            ),
            Event::Warning(n) => say(&bar, format!("warning: {}", n.message)),
            Event::Error(n) => {
                let where_ = match (&n.path, n.line) {
                    (Some(p), Some(l)) if !n.message.contains(&p.display().to_string()) => {
                        format!(" ({}:{l})", p.display())
                    }
                    (Some(p), None) if !n.message.contains(&p.display().to_string()) => format!(" ({})", p.display()),
                    _ => String::new(),
                };
                let line = format!("{}{where_}", n.message);
                say(&bar, format!("error: {line}"));
                first_error.get_or_insert(line);
                if n.message.contains("diverged") {
                    // Headless: nobody can change the coefficients and resume, so end the run.
                    handle.send(Command::Stop).ok();
                }
            }
            Event::Finished(f) => {
                if let Some(b) = bar.take() {
                    b.finish_and_clear();
                }
                if f.reason == FinishReason::Failed {
                    return Err(CliError::Failure(anyhow::anyhow!(
                        first_error.unwrap_or_else(|| "the run failed".into())
                    )));
                }
                let fmt = |v: Option<f64>| v.map_or_else(|| "-".into(), |a| format!("{a:.4}"));
                println!(
                    "{:?}: {} steps in {:.1} s · best val acc {} · test acc {}",
                    f.reason,
                    f.steps,
                    f.time_s,
                    fmt(f.best_val_acc),
                    fmt(f.test_acc)
                );
                for c in &f.checkpoints {
                    println!("wrote {}", c.display());
                }
                return Ok(f);
            }
            Event::Snapshot(_) | Event::Paused { .. } | Event::Resumed { .. } => {}
        }
    }
}

/// `moppa eval`.
#[derive(Debug, Clone, Args)]
#[command(
    after_help = "Examples:\n  moppa eval --run runs/digits\n  moppa eval --adapter a.safetensors --backbone builtin --data builtin:digits --split val"
)]
pub struct EvalArgs {
    /// A run folder (its config.toml names backbone and data; its adapter.safetensors is evaluated).
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
    /// Data spec (default: the run's, or builtin:digits).
    #[arg(long)]
    pub data: Option<String>,
    /// test (default) or val.
    #[arg(long, default_value = "test")]
    pub split: String,
    /// Load onto a backbone file other than the one trained on (same shapes).
    #[arg(long)]
    pub force: bool,
    /// Per-class results CSV (default: RUN/eval-SPLIT.csv, or next to the adapter).
    #[arg(long)]
    pub output: Option<PathBuf>,
    /// Images per forward pass.
    #[arg(long, default_value_t = 128)]
    pub batch: usize,
}

/// Runs `moppa eval`.
pub fn eval(args: &EvalArgs) -> Result<(), CliError> {
    let split = match args.split.as_str() {
        "test" => Split::Test,
        "val" => Split::Val,
        other => return Err(usage(format!("--split must be val or test (got {other})"))),
    };
    let (adapter, base) = match (&args.run, &args.adapter) {
        (Some(dir), _) => (
            dir.join("adapter.safetensors"),
            Some(run_config(dir).map_err(|e| CliError::Failure(e.into()))?),
        ),
        (None, Some(a)) => (a.clone(), None),
        (None, None) => return Err(usage("give --run DIR or --adapter FILE")),
    };
    let backbone = args
        .backbone
        .clone()
        .or_else(|| base.as_ref().map(|c| c.backbone.clone()))
        .unwrap_or_else(|| "builtin".into());
    let data = args
        .data
        .clone()
        .or_else(|| base.as_ref().map(|c| c.data.clone()))
        .unwrap_or_else(|| "builtin:digits".into());
    let heads = args.heads.or_else(|| base.as_ref().and_then(|c| c.heads));
    let (result, classes) = evaluate_adapter(&adapter, &backbone, heads, &data, split, args.force, args.batch)
        .map_err(|e| CliError::Failure(e.into()))?;
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
    let out = args.output.clone().unwrap_or_else(|| match &args.run {
        Some(dir) => dir.join(format!("eval-{}.csv", split.name())),
        None => adapter.with_extension(format!("eval-{}.csv", split.name())),
    });
    std::fs::write(&out, csv)
        .map_err(|e| CliError::Failure(anyhow::anyhow!("cannot write '{}': {e}", out.display())))?;
    println!("per-class results: {}", out.display());
    Ok(())
}

/// `moppa bench`.
#[derive(Debug, Clone, Args)]
#[command(
    after_help = "Example: moppa bench --preset tiny --method moppa --batch 64 --steps 20 --json\n\
Times forward (+loss), backward and optimizer separately (medians after 3 warm-up steps) on random inputs."
)]
pub struct BenchArgs {
    /// tiny (32 px, D 96, depth 4), builtin, or vit-b16 (224 px, 100 classes).
    #[arg(long, default_value = "tiny")]
    pub preset: String,
    /// Method (moppa, lora, adaptformer, linear, full).
    #[arg(long, value_parser = parse_method, default_value = "moppa")]
    pub method: MethodKind,
    /// Rank of MoPPA / LoRA / AdaptFormer.
    #[arg(long, default_value_t = 8)]
    pub rank: usize,
    /// Images per step.
    #[arg(long, default_value_t = 64)]
    pub batch: usize,
    /// Timed steps.
    #[arg(long, default_value_t = 10)]
    pub steps: usize,
    /// auto, cpu or cuda.
    #[arg(long, value_parser = parse_device, default_value = "auto")]
    pub device: DeviceChoice,
    /// CPU threads (default: every core).
    #[arg(long)]
    pub threads: Option<usize>,
    /// f32 or bf16 (GPU).
    #[arg(long, value_parser = parse_dtype, default_value = "f32")]
    pub dtype: Precision,
    /// Op implementations: auto (fused on the CPU, lean on CUDA), lean, or composite (candle's
    /// differentiable primitives only; the reference).
    #[arg(long, value_parser = crate::model::ops::Kernels::parse, default_value = "auto")]
    pub kernels: crate::model::ops::Kernels,
    /// CUDA: let f32 matrix products use TF32 tensor cores (like PyTorch's allow_tf32).
    #[arg(long)]
    pub tf32: bool,
    /// Before timing, check one step's loss and gradients against the composite reference on the
    /// same device (exit 1 when they differ by more than the tolerance).
    #[arg(long)]
    pub verify: bool,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
}

/// Runs `moppa bench`.
pub fn bench(args: &BenchArgs) -> Result<(), CliError> {
    use crate::train::bench::{BenchConfig, Preset, run};
    let preset = match args.preset.as_str() {
        "tiny" => Preset::Tiny,
        "builtin" => Preset::Builtin,
        "vit-b16" => Preset::VitB16,
        other => {
            return Err(usage(format!(
                "--preset must be tiny, builtin or vit-b16 (got {other})"
            )));
        }
    };
    if args.batch == 0 || args.steps == 0 || args.threads == Some(0) {
        return Err(usage("--batch, --steps and --threads must be ≥ 1"));
    }
    let cfg = BenchConfig {
        preset,
        method: crate::model::MethodConfig {
            rank: args.rank,
            ..crate::model::MethodConfig::of(args.method)
        },
        batch: args.batch,
        steps: args.steps,
        device: args.device,
        threads: args.threads,
        dtype: args.dtype,
        kernels: args.kernels,
        tf32: args.tf32,
        verify: args.verify,
    };
    let threads = args
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, std::num::NonZero::get));
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .map_err(|e| CliError::Failure(e.into()))?;
    let r = pool.install(|| run(&cfg)).map_err(CliError::Failure)?;
    if args.json {
        println!(
            "{}",
            serde_json::to_string(&r).map_err(|e| CliError::Failure(e.into()))?
        );
    } else {
        println!(
            "{} {} batch {} on {} ({} threads, {}{}, {} kernels): step {:.1} ms = fwd {:.1} + bwd {:.1} + opt {:.1} · {:.0} img/s · {:.0} GFLOP/s ({:.0}% of a 1024³ GEMM at {:.0})",
            r.preset,
            r.method,
            r.batch,
            r.device,
            r.threads,
            r.dtype,
            if r.tf32 { " tf32" } else { "" },
            r.kernels,
            r.step_ms,
            r.fwd_ms,
            r.bwd_ms,
            r.opt_ms,
            r.img_per_s,
            r.gflops_per_s,
            100.0 * r.gflops_per_s / r.gemm_gflops_per_s,
            r.gemm_gflops_per_s
        );
    }
    if let Some(v) = &r.verify {
        eprintln!(
            "verify against the composite ops: loss {:.6} vs {:.6}, gradient error {:.2e} in all, worst {:.2e} ({}), tolerance {:.0e}{}",
            v.loss,
            v.loss_reference,
            v.total_grad_rel_err,
            v.worst_grad_rel_err,
            v.worst_param,
            v.tolerance,
            if v.zero_grads.is_empty() {
                String::new()
            } else {
                format!(", no reference gradient: {}", v.zero_grads.join(", "))
            }
        );
        for (kernel, dtype, err) in &v.kernel_checks {
            eprintln!("  kernel {kernel} ({dtype}) against the CPU loops: relative error {err:.2e}");
        }
        if !v.ok {
            return Err(CliError::Failure(anyhow::anyhow!(
                "the {} kernels do not match the composite reference (see above)",
                r.kernels
            )));
        }
    }
    Ok(())
}

/// `moppa pretrain`.
#[derive(Debug, Clone, Args)]
#[command(after_help = "Example (the built-in backbone; see assets/README.md):\n  \
apt-get download dataset-fashion-mnist && dpkg -x dataset-fashion-mnist_*.deb fm\n  \
moppa pretrain --objective mae --data idx:fm/usr/share/datasets/fashion-mnist --epochs 24 \\\n      \
--run runs/pretrain-mae --output assets/backbone-tiny.safetensors")]
pub struct PretrainArgs {
    /// Training data: `idx:DIR` (MNIST / Fashion-MNIST) or an ImageFolder.
    #[arg(long)]
    pub data: String,
    /// Architecture: tiny (32 px, patch 4, D 96, depth 4, 3 heads), vit-ti16, vit-s16, vit-b16.
    #[arg(long, default_value = "tiny")]
    pub preset: String,
    /// Epochs.
    #[arg(long, default_value_t = 12)]
    pub epochs: u64,
    /// Images per batch.
    #[arg(long, default_value_t = 64)]
    pub batch: usize,
    /// Peak learning rate.
    #[arg(long, default_value_t = 1e-3)]
    pub lr: f64,
    /// AdamW weight decay.
    #[arg(long, default_value_t = 0.05)]
    pub weight_decay: f64,
    /// Seed.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// CPU threads.
    #[arg(long)]
    pub threads: Option<usize>,
    /// Run folder (metrics, checkpoints).
    #[arg(long, default_value = "runs/pretrain")]
    pub run: PathBuf,
    /// The backbone file to write.
    #[arg(long)]
    pub output: PathBuf,
    /// Random rotations by up to ± DEG degrees (on top of flips and crops with padding 2).
    #[arg(long, value_name = "DEG", default_value_t = 0)]
    pub rotate: u32,
    /// Random zooms by up to ± PCT percent.
    #[arg(long, value_name = "PCT", default_value_t = 0)]
    pub zoom: u32,
    /// Store the weights as f16 (half the size; loaded as f32).
    #[arg(long)]
    pub f16: bool,
    /// Do not train: export the finished run in --run again (e.g. after a failed write).
    #[arg(long)]
    pub export_only: bool,
    /// supervised (a classifier on the data's labels) or mae (masked autoencoder: reconstruct
    /// hidden patches; labels unused; the file has no classifier head).
    /// supmae: both at once (SupMAE, Liang et al. 2022): the masked autoencoder plus a classifier
    /// on the mean visible token, kept as the file's head.
    #[arg(long, default_value = "supervised", value_parser = ["supervised", "mae", "supmae"])]
    pub objective: String,
    /// MAE: share of patches hidden from the encoder.
    #[arg(long, default_value_t = 0.75)]
    pub mask_ratio: f64,
    /// MAE: decoder width (heads of 32 channels).
    #[arg(long, default_value_t = 64)]
    pub decoder_dim: usize,
    /// MAE: decoder blocks.
    #[arg(long, default_value_t = 2)]
    pub decoder_depth: usize,
}

/// `moppa pretrain --objective mae`.
fn pretrain_mae(args: &PretrainArgs) -> Result<i32, CliError> {
    use crate::model::tensor_file::{StoreAs, write_atomic};
    use crate::model::vit::BACKBONE_META_KEY;
    use crate::train::mae::{MaeRun, pretrain};
    if args.export_only {
        return Err(usage(
            "--export-only applies to supervised runs (an MAE run writes its file when it ends)",
        ));
    }
    if !(0.0..0.99).contains(&args.mask_ratio) {
        return Err(usage(format!(
            "--mask-ratio must be in [0, 0.99) (got {})",
            args.mask_ratio
        )));
    }
    if args.decoder_dim == 0 || !args.decoder_dim.is_multiple_of(32) || args.decoder_depth == 0 {
        return Err(usage(format!(
            "--decoder-dim must be a positive multiple of 32 and --decoder-depth positive (got {} and {})",
            args.decoder_dim, args.decoder_depth
        )));
    }
    if args.rotate > 90 || args.zoom > 50 {
        return Err(usage(format!(
            "--rotate must be at most 90 and --zoom at most 50 (got {} and {})",
            args.rotate, args.zoom
        )));
    }
    if args.epochs == 0 || args.batch == 0 || args.lr.is_nan() || args.lr <= 0.0 {
        return Err(usage("--epochs, --batch and --lr must be positive"));
    }
    let (mean, std) = dataset_stats_cli(&args.data)?;
    let base = super::model_cmds::preset(&args.preset)
        .ok_or_else(|| usage(format!("--preset: unknown preset {}", args.preset)))?;
    let encoder = crate::model::config::VitConfig {
        num_classes: 0,
        mean,
        std,
        ..base
    };
    let run = MaeRun {
        data: args.data.clone(),
        encoder,
        mask_ratio: args.mask_ratio,
        supervised_weight: if args.objective == "supmae" { 1.0 } else { 0.0 },
        decoder: (args.decoder_dim, args.decoder_depth, args.decoder_dim / 32),
        epochs: args.epochs,
        batch: args.batch,
        lr: args.lr,
        warmup: 200,
        weight_decay: args.weight_decay,
        augment: crate::data::Augment {
            flip: true,
            crop_pad: 2,
            rotate_deg: args.rotate,
            scale_pct: args.zoom,
        },
        seed: args.seed,
        run: args.run.clone(),
    };
    let threads = args
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, std::num::NonZero::get));
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(|i| format!("moppa-compute-{i}"))
        .build()
        .map_err(|e| CliError::Failure(anyhow::anyhow!("cannot start {threads} compute threads: {e}")))?;
    let interrupt = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = interrupt.clone();
    ctrlc::set_handler(move || flag.store(true, std::sync::atomic::Ordering::Relaxed)).ok();
    let outcome = pool
        .install(|| pretrain(&run, &interrupt))
        .map_err(|e| CliError::Failure(e.into()))?;
    let Some(enc) = outcome.encoder else {
        eprintln!("interrupted after {} steps: nothing written", outcome.steps);
        return Ok(EXIT_INTERRUPTED);
    };
    let tensors = enc.to_host().map_err(|e| CliError::Failure(e.into()))?;
    let provenance = serde_json::json!({
        "objective": args.objective, "mask_ratio": args.mask_ratio, "decoder_dim": args.decoder_dim,
        "decoder_depth": args.decoder_depth, "data": args.data, "preset": args.preset, "epochs": args.epochs,
        "batch": args.batch, "lr": args.lr, "weight_decay": args.weight_decay, "seed": args.seed,
        "augment": augment_label(args), "val_reconstruction_loss": outcome.val_loss, "steps": outcome.steps,
        "seconds": outcome.seconds, "best_val_acc": outcome.accuracy.map(|a| a.0), "test_acc": outcome.accuracy.map(|a| a.1),
    });
    // MAE's class token is never asked to summarise the image: like MAE's own fine-tuning,
    // the backbone pools the mean of its (final-normed) patch tokens.
    let cfg = crate::model::config::VitConfig {
        pool: crate::model::Pool::Avg,
        ..enc.cfg.clone()
    };
    let mut meta = std::collections::HashMap::new();
    meta.insert(
        BACKBONE_META_KEY.to_owned(),
        serde_json::to_string(&cfg).map_err(|e| CliError::Failure(e.into()))?,
    );
    meta.insert("moppa.pretrain".to_owned(), provenance.to_string());
    if enc.has_head() {
        meta.insert(
            "moppa.classes".to_owned(),
            serde_json::to_string(&outcome.classes).unwrap_or_default(),
        );
    }
    if let Some(dir) = args.output.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| CliError::Failure(anyhow::anyhow!("{}: {e}", dir.display())))?;
    }
    let store = if args.f16 { StoreAs::F16 } else { StoreAs::F32 };
    write_atomic(&args.output, &tensors, &meta, store).map_err(|e| CliError::Failure(e.into()))?;
    let head = outcome
        .accuracy
        .map(|(_, t)| format!(", head test accuracy {t:.4}"))
        .unwrap_or_default();
    println!(
        "wrote backbone {} ({}, validation reconstruction loss {:.4}{head})",
        args.output.display(),
        args.objective,
        outcome.val_loss.unwrap_or(f64::NAN)
    );
    Ok(0)
}

fn dataset_stats_cli(data: &str) -> Result<([f32; 3], [f32; 3]), CliError> {
    let (mean, std) = crate::train::pretrain::dataset_stats(data, 10_000).map_err(|e| CliError::Failure(e.into()))?;
    eprintln!("input normalisation from the data: mean {mean:?}, std {std:?}");
    Ok((mean, std))
}

fn augment_label(args: &PretrainArgs) -> String {
    let mut parts = vec!["flip + crop (pad 2)".to_string()];
    if args.rotate > 0 {
        parts.push(format!("rotate ±{}°", args.rotate));
    }
    if args.zoom > 0 {
        parts.push(format!("zoom ±{}%", args.zoom));
    }
    parts.join(" + ")
}

/// The `finished` line of a run folder's `metrics.jsonl`.
fn finished_from_log(dir: &std::path::Path) -> Result<Finished, CliError> {
    let path = dir.join("metrics.jsonl");
    let text =
        std::fs::read_to_string(&path).map_err(|e| CliError::Failure(anyhow::anyhow!("{}: {e}", path.display())))?;
    let v = text
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .rfind(|v| v["kind"] == "finished" && v["reason"] == "done")
        .ok_or_else(|| CliError::Failure(anyhow::anyhow!("{}: no finished run to export", path.display())))?;
    Ok(Finished {
        reason: FinishReason::Done,
        steps: v["step"].as_u64().unwrap_or(0),
        best_val_acc: v["best_val_acc"].as_f64(),
        test_acc: v["test_acc"].as_f64(),
        checkpoints: Vec::new(),
        time_s: v["time_s"].as_f64().unwrap_or(0.0),
    })
}

/// Runs `moppa pretrain`.
pub fn pretrain(args: &PretrainArgs) -> Result<i32, CliError> {
    use crate::train::pretrain::export_backbone;
    if !["tiny", "vit-ti16", "vit-s16", "vit-b16"].contains(&args.preset.as_str()) {
        return Err(usage(format!(
            "--preset must be tiny, vit-ti16, vit-s16 or vit-b16 (got {})",
            args.preset
        )));
    }
    if args.objective != "supervised" {
        return pretrain_mae(args);
    }
    let finished = if args.export_only {
        finished_from_log(&args.run)?
    } else {
        let (mean, std) = dataset_stats_cli(&args.data)?;
        let cfg = RunConfig {
            backbone: format!("random:{}", args.preset),
            data: args.data.clone(),
            method: crate::model::MethodConfig::of(MethodKind::Full),
            epochs: Some(args.epochs),
            steps: None,
            batch: args.batch,
            lr: Some(args.lr),
            weight_decay: args.weight_decay,
            warmup: 200,
            eval_every: 0,
            seed: args.seed,
            threads: args.threads,
            augment: crate::data::Augment {
                flip: true,
                crop_pad: 2,
                rotate_deg: args.rotate,
                scale_pct: args.zoom,
            },
            out: Some(args.run.clone()),
            mean: Some(mean),
            std: Some(std),
            ..RunConfig::default()
        };
        cfg.validate().map_err(usage)?;
        let handle = WorkerHandle::spawn(cfg, WorkerOptions::default()).map_err(|e| CliError::Failure(e.into()))?;
        let flag = handle.interrupt_flag();
        ctrlc::set_handler(move || raise_interrupt(&flag)).ok();
        let finished = report(&handle, std::io::stderr().is_terminal())?;
        handle.join();
        if finished.reason != FinishReason::Done {
            return Ok(if finished.reason == FinishReason::Interrupted {
                EXIT_INTERRUPTED
            } else {
                1
            });
        }
        finished
    };
    let augment_text = augment_label(args);
    let provenance = serde_json::json!({
        "data": args.data, "preset": args.preset, "epochs": args.epochs, "batch": args.batch, "lr": args.lr,
        "weight_decay": args.weight_decay, "seed": args.seed, "augment": augment_text,
        "test_acc": finished.test_acc, "best_val_acc": finished.best_val_acc, "steps": finished.steps,
        "seconds": finished.time_s,
    });
    let store = if args.f16 {
        crate::model::tensor_file::StoreAs::F16
    } else {
        crate::model::tensor_file::StoreAs::F32
    };
    export_backbone(&args.run, &args.output, store, &provenance).map_err(|e| CliError::Failure(e.into()))?;
    println!(
        "wrote backbone {} (test accuracy {:.4})",
        args.output.display(),
        finished.test_acc.unwrap_or(f64::NAN)
    );
    Ok(0)
}

/// `moppa compare`.
#[derive(Debug, Clone, Args)]
#[command(
    after_help = "Example (the README's table):\n  moppa compare --seeds 3 --steps 600\n\
Methods: linear, full, lora, adaptformer, moppa, moppa-noroute (λ = 0), heat, wave, poisson (one prior alone)."
)]
pub struct CompareArgs {
    /// Comma-separated methods.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "linear,full,lora,adaptformer,moppa,moppa-noroute,heat,wave,poisson"
    )]
    pub methods: Vec<String>,
    /// Seeds per method (0, 1, …).
    #[arg(long, default_value_t = 3)]
    pub seeds: u64,
    /// Write the markdown table here too.
    #[arg(long)]
    pub output: Option<PathBuf>,
    /// The shared run settings (backbone, data, steps, batch, …; --method/--seed are set per run).
    #[command(flatten)]
    pub run: RunArgs,
}

fn compare_method(name: &str, base: &crate::model::MethodConfig) -> Option<crate::model::MethodConfig> {
    use crate::model::MethodConfig;
    let rank = base.rank;
    Some(match name {
        "linear" => MethodConfig::of(MethodKind::Linear),
        "full" => MethodConfig::of(MethodKind::Full),
        "lora" => MethodConfig {
            rank,
            ..MethodConfig::of(MethodKind::Lora)
        },
        "adaptformer" => MethodConfig {
            rank,
            ..MethodConfig::of(MethodKind::Adaptformer)
        },
        "moppa" => MethodConfig {
            method: MethodKind::Moppa,
            ..base.clone()
        },
        "moppa-noroute" => MethodConfig {
            method: MethodKind::Moppa,
            route_weight: 0.0,
            ..base.clone()
        },
        "heat" | "wave" | "poisson" => MethodConfig {
            method: MethodKind::Moppa,
            priors: vec![name.parse().ok()?],
            ..base.clone()
        },
        _ => return None,
    })
}

fn mean_std(v: &[f64]) -> (f64, f64) {
    let n = v.len().max(1) as f64;
    let m = v.iter().sum::<f64>() / n;
    let var = if v.len() > 1 {
        v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (n - 1.0)
    } else {
        0.0
    };
    (m, var.sqrt())
}

/// Runs `moppa compare`.
pub fn compare(args: &CompareArgs) -> Result<i32, CliError> {
    let base = args.run.resolve()?;
    if args.seeds == 0 {
        return Err(usage("--seeds must be ≥ 1"));
    }
    let methods: Vec<(String, crate::model::MethodConfig)> = args
        .methods
        .iter()
        .map(|m| {
            compare_method(m, &base.method)
                .map(|c| (m.clone(), c))
                .ok_or_else(|| usage(format!("unknown method '{m}' in --methods")))
        })
        .collect::<Result<_, _>>()?;
    let mut rows = Vec::new();
    for (name, method) in &methods {
        let (mut val, mut test, mut rate, mut trainable) = (Vec::new(), Vec::new(), Vec::new(), 0);
        for seed in 0..args.seeds {
            let cfg = RunConfig {
                method: method.clone(),
                seed,
                out: base.out.as_ref().map(|o| o.join(format!("{name}-seed{seed}"))),
                ..base.clone()
            };
            eprintln!("== {name} (seed {seed})");
            let handle = WorkerHandle::spawn(cfg, WorkerOptions::default()).map_err(|e| CliError::Failure(e.into()))?;
            let mut finished = None;
            for ev in handle.events() {
                match ev {
                    Event::Started(info) => trainable = info.trainable,
                    Event::Error(n) => eprintln!("error: {}", n.message),
                    Event::Finished(f) => {
                        finished = Some(f);
                        break;
                    }
                    _ => {}
                }
            }
            handle.join();
            let f =
                finished.ok_or_else(|| CliError::Failure(anyhow::anyhow!("{name}: the run ended without a result")))?;
            if f.reason != FinishReason::Done {
                return Err(CliError::Failure(anyhow::anyhow!(
                    "{name} (seed {seed}) ended: {:?}",
                    f.reason
                )));
            }
            eprintln!(
                "   val {:.4} test {:.4} in {:.1} s",
                f.best_val_acc.unwrap_or(f64::NAN),
                f.test_acc.unwrap_or(f64::NAN),
                f.time_s
            );
            val.push(f.best_val_acc.unwrap_or(f64::NAN));
            test.push(f.test_acc.unwrap_or(f64::NAN));
            rate.push(f.steps as f64 / f.time_s.max(1e-9));
        }
        rows.push((
            name.clone(),
            method.label(),
            trainable,
            mean_std(&val),
            mean_std(&test),
            mean_std(&rate).0,
        ));
    }
    let mut table = String::from("| method | trainable | val acc | test acc | steps/s |\n|---|---:|---:|---:|---:|\n");
    for (_, label, n, (vm, vs), (tm, ts), r) in &rows {
        let _ = writeln!(
            table,
            "| {label} | {} | {:.2} ± {:.2} | {:.2} ± {:.2} | {r:.1} |",
            crate::util::group_digits(*n),
            100.0 * vm,
            100.0 * vs,
            100.0 * tm,
            100.0 * ts
        );
    }
    let steps = base.steps.map_or_else(|| "default".to_owned(), |s| s.to_string());
    let _ = writeln!(
        table,
        "\n{} seeds each; {} steps of batch {} on `{}` with `{}`; val = best validation accuracy, test = final test accuracy (%), mean ± std.",
        args.seeds, steps, base.batch, base.data, base.backbone
    );
    print!("{table}");
    if let Some(p) = &args.output {
        std::fs::write(p, &table)
            .map_err(|e| CliError::Failure(anyhow::anyhow!("cannot write '{}': {e}", p.display())))?;
    }
    Ok(0)
}
