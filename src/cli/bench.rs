//! `moppa bench`: the timing of one training step (forward, backward, optimizer), optionally
//! verified against the composite reference first.

use super::args::{parse_device, parse_dtype, parse_method};
use super::{CliError, usage};
use crate::config::{DeviceChoice, MethodConfig, MethodKind, Precision, VitConfig};
use crate::model::ops::Kernels;
use crate::train::bench::{BenchConfig, Preset, run};
use clap::Args;

/// `moppa bench`.
#[derive(Debug, Clone, Args)]
#[command(
    after_help = "Example: moppa bench --preset tiny --method moppa --batch 64 --steps 20 --json\n\
Times forward (+loss), backward and optimizer separately (medians after 3 warm-up steps) on random inputs."
)]
pub struct BenchArgs {
    /// tiny (32 px, D 96, depth 4, 10 classes), builtin, or a ViT preset (vit-ti16, vit-s16,
    /// vit-b16, vit-l16: 224 px, 100 classes); random weights except builtin.
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
    /// f32 or bf16 (GPU: bf16 weights and activations; CPU: the transformer's products with its
    /// weights from bf16 operands, f32 accumulation, like torch.autocast).
    #[arg(long, value_parser = parse_dtype, default_value = "f32")]
    pub dtype: Precision,
    /// Op implementations: auto (fused on the CPU, lean on CUDA), lean, or composite (candle's
    /// differentiable primitives only; the reference).
    #[arg(long, value_parser = Kernels::parse, default_value = "auto")]
    pub kernels: Kernels,
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
    let preset = Preset::parse(&args.preset).ok_or_else(|| {
        usage(format!(
            "--preset must be builtin or one of {} (got {})",
            VitConfig::preset_names(),
            args.preset
        ))
    })?;
    if args.batch == 0 || args.steps == 0 || args.threads == Some(0) {
        return Err(usage("--batch, --steps and --threads must be ≥ 1"));
    }
    let cfg = BenchConfig {
        preset,
        method: MethodConfig {
            rank: args.rank,
            ..MethodConfig::of(args.method)
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
    let (threads, lowered) = crate::util::clamp_threads(args.threads);
    if let Some(w) = lowered {
        eprintln!("warning: {w}");
    }
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
