//! `moppa pretrain`: a ViT trained from scratch by the same engine, written as a backbone file.
//! Supervised: a full fine-tuning run of the worker, then exported; `mae` / `supmae`: the masked
//! autoencoder's loop (`train::pretrain::mae`), shown by the same reporter.

use super::reporter::{Reporter, follow};
use super::train::{EXIT_INTERRUPTED, exit_code, headless};
use super::{CliError, usage};
use crate::config::{Augment, MethodConfig, MethodKind, Pool, RunConfig, VitConfig};
use crate::model::tensor_file::StoreAs;
use crate::model::vit::{BackboneFileMeta, write_backbone};
use crate::train::WorkerHandle;
use crate::train::pretrain::mae::{MaeRun, pretrain as pretrain_mae_run};
use crate::train::pretrain::{dataset_stats, export_backbone};
use crate::train::protocol::{FinishReason, Finished};
use crate::train::record::{Record, reader::last_of};
use crate::train::runfolder::{METRICS_JSONL, OutFlags, RunFolderError, plan_out};
use clap::Args;
use std::io::IsTerminal as _;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// The architecture preset by name, or a usage error listing the presets.
fn preset(name: &str) -> Result<VitConfig, CliError> {
    VitConfig::preset(name).ok_or_else(|| {
        usage(format!(
            "--preset must be one of {} (got {name})",
            VitConfig::preset_names()
        ))
    })
}

fn store(args: &PretrainArgs) -> StoreAs {
    if args.f16 { StoreAs::F16 } else { StoreAs::F32 }
}

/// The run folder: `--run`, else next to the output (`OUTPUT` without its extension + `.run`),
/// never a surprise folder in the working directory. With `export_only` it must exist.
fn run_dir(args: &PretrainArgs) -> Result<PathBuf, CliError> {
    let dir = args.run.clone().unwrap_or_else(|| args.output.with_extension("run"));
    if args.export_only {
        return Ok(dir);
    }
    let flags = OutFlags {
        overwrite: args.overwrite,
        ..OutFlags::default()
    };
    match plan_out(&dir, flags) {
        Ok(_) => {}
        Err(RunFolderError::Usage(m)) => return Err(usage(m.replace("--out", "--run"))),
        Err(e) => return Err(CliError::Failure(e.into())),
    }
    eprintln!("run folder: {}", dir.display());
    Ok(dir)
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
    /// Architecture: tiny (32 px, patch 4, D 96, depth 4, 3 heads), vit-ti16, vit-s16, vit-b16, vit-l16.
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
    /// Run folder (metrics, checkpoints; default: OUTPUT's name with `.run`, next to it).
    #[arg(long)]
    pub run: Option<PathBuf>,
    /// --run names a run folder already: move it aside (DIR.old-N) and start afresh.
    #[arg(long)]
    pub overwrite: bool,
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
    let patches = preset(&args.preset)?.grid().pow(2);
    if ((patches as f64) * (1.0 - args.mask_ratio)).round() as usize >= patches {
        return Err(usage(format!(
            "--mask-ratio {} hides no patch of the {patches}-patch grid: there is nothing to reconstruct (use at least {:.3})",
            args.mask_ratio,
            0.5 / patches as f64 + 1e-3
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
    let base = preset(&args.preset)?;
    let encoder = VitConfig {
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
        augment: Augment {
            flip: true,
            crop_pad: 2,
            rotate_deg: args.rotate,
            scale_pct: args.zoom,
        },
        seed: args.seed,
        run: run_dir(args)?,
    };
    let (threads, lowered) = crate::util::clamp_threads(args.threads);
    if let Some(w) = lowered {
        eprintln!("warning: {w}");
    }
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(|i| format!("moppa-compute-{i}"))
        .build()
        .map_err(|e| CliError::Failure(anyhow::anyhow!("cannot start {threads} compute threads: {e}")))?;
    let interrupt = Arc::new(AtomicBool::new(false));
    let flag = interrupt.clone();
    ctrlc::set_handler(move || flag.store(true, Ordering::Relaxed)).ok();
    let mut reporter = Reporter::new(std::io::stderr().is_terminal());
    let outcome = pool
        .install(|| {
            pretrain_mae_run(&run, &interrupt, &mut |ev| {
                reporter.show(ev);
            })
        })
        .map_err(|e| CliError::Failure(e.into()))?;
    let Some(enc) = outcome.encoder else {
        if outcome.reason == FinishReason::Diverged {
            return Err(CliError::Failure(anyhow::anyhow!(
                "{}",
                reporter.first_error().unwrap_or("MAE pretraining diverged")
            )));
        }
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
    let cfg = VitConfig {
        pool: Pool::Avg,
        ..enc.cfg.clone()
    };
    let meta = BackboneFileMeta {
        provenance: Some(provenance),
        classes: enc.has_head().then(|| outcome.classes.clone()),
    };
    write_backbone(&args.output, &cfg, &tensors, &meta, store(args)).map_err(|e| CliError::Failure(e.into()))?;
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
    let (mean, std) = dataset_stats(data, 10_000).map_err(|e| CliError::Failure(e.into()))?;
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

/// The last `finished` record of a run folder that ended `done`.
fn finished_from_log(dir: &std::path::Path) -> Result<Finished, CliError> {
    let path = dir.join(METRICS_JSONL);
    if !path.is_file() {
        return Err(CliError::Failure(anyhow::anyhow!("{}: no such file", path.display())));
    }
    let f = last_of(&path, |r| match r {
        Record::Finished(f) if f.reason == FinishReason::Done => Some(f),
        _ => None,
    })
    .ok_or_else(|| CliError::Failure(anyhow::anyhow!("{}: no finished run to export", path.display())))?;
    Ok(Finished {
        reason: FinishReason::Done,
        steps: f.step,
        best_val_acc: f.best_val_acc,
        test_acc: f.test_acc,
        checkpoints: Vec::new(),
        time_s: f.time_s,
        message: None,
        path: None,
    })
}

/// Runs `moppa pretrain`.
pub fn pretrain(args: &PretrainArgs) -> Result<i32, CliError> {
    preset(&args.preset)?;
    if args.objective != "supervised" {
        return pretrain_mae(args);
    }
    let run = run_dir(args)?;
    let finished = if args.export_only {
        finished_from_log(&run)?
    } else {
        let (mean, std) = dataset_stats_cli(&args.data)?;
        let cfg = RunConfig {
            backbone: format!("random:{}", args.preset),
            data: args.data.clone(),
            method: MethodConfig::of(MethodKind::Full),
            epochs: Some(args.epochs),
            steps: None,
            batch: args.batch,
            lr: Some(args.lr),
            weight_decay: args.weight_decay,
            warmup: 200,
            eval_every: 0,
            seed: args.seed,
            threads: args.threads,
            augment: Some(Augment {
                flip: true,
                crop_pad: 2,
                rotate_deg: args.rotate,
                scale_pct: args.zoom,
            }),
            out: Some(run.clone()),
            mean: Some(mean),
            std: Some(std),
            ..RunConfig::default()
        };
        cfg.validate().map_err(usage)?;
        let handle = WorkerHandle::spawn(cfg, headless()).map_err(|e| CliError::Failure(e.into()))?;
        let flag = handle.stop_flag();
        let on_signal = flag.clone();
        ctrlc::set_handler(move || on_signal.interrupt()).ok();
        let finished = follow(&handle, &flag, std::io::stderr().is_terminal())?;
        handle.join();
        if finished.reason != FinishReason::Done {
            return Ok(exit_code(finished.reason).max(1));
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
    export_backbone(&run, &args.output, store(args), &provenance).map_err(|e| CliError::Failure(e.into()))?;
    println!(
        "wrote backbone {} (test accuracy {:.4})",
        args.output.display(),
        finished.test_acc.unwrap_or(f64::NAN)
    );
    Ok(0)
}
