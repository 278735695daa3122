//! `moppa bench`: the honest timing of one training step, split into forward (with the loss),
//! backward and optimizer, on fixed random inputs after a warm-up; medians over the timed steps,
//! and the achieved GFLOP/s next to a large GEMM measured in the same run (the ceiling).

use super::backbone::{device_name, load_backbone, select_device};
use super::optim::{AdamW, timm_decay};
use crate::config::{DeviceChoice, MethodConfig, MethodKind, Precision, RunConfig, VitConfig};
use crate::model::ops::{Kernels, profile, verify};
use crate::model::{PeftModel, cross_entropy};
use candle_core::{DType, Device, Tensor};
use serde::Serialize;
use std::time::Instant;

/// Which model to time: the built-in backbone (10 classes) or a preset of the catalogue with
/// random weights (`tiny`: 10 classes, the speed targets'; the ViTs: 100 classes).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Preset(String);

impl Preset {
    /// `builtin` or a name of `config::VIT_PRESETS`; `None` for anything else.
    #[must_use]
    pub fn parse(name: &str) -> Option<Self> {
        (name == "builtin" || VitConfig::preset(name).is_some()).then(|| Self(name.to_owned()))
    }

    /// Name on the command line.
    #[must_use]
    pub fn name(&self) -> &str {
        &self.0
    }

    /// The backbone spec it loads and the classes of its head.
    fn backbone(&self) -> (String, usize) {
        match self.0.as_str() {
            "builtin" => ("builtin".into(), 10),
            "tiny" => ("random:tiny".into(), 10),
            other => (format!("random:{other}"), 100),
        }
    }
}

/// What to time.
#[derive(Clone, Debug)]
pub struct BenchConfig {
    /// Model.
    pub preset: Preset,
    /// Method and its settings.
    pub method: MethodConfig,
    /// Images per step.
    pub batch: usize,
    /// Timed steps (after 3 warm-up steps).
    pub steps: usize,
    /// Device.
    pub device: DeviceChoice,
    /// CPU threads (None: every core).
    pub threads: Option<usize>,
    /// Precision.
    pub dtype: Precision,
    /// Which op implementations (auto: fused on the CPU, lean on CUDA).
    pub kernels: Kernels,
    /// Let CUDA f32 matrix products use TF32 tensor cores (PyTorch's `allow_tf32`).
    pub tf32: bool,
    /// Before timing, check one step against the composite reference ([`Verify`]).
    pub verify: bool,
}

/// One step's loss and gradients with the benchmarked kernels against candle's composite
/// primitives (the reference the kernels are tested against on the CPU), on the same device,
/// weights and batch: how a GPU build shows that its kernels compute what they should.
#[derive(Clone, Debug, Serialize)]
pub struct Verify {
    /// Loss with the benchmarked kernels.
    pub loss: f64,
    /// Loss with the composite ops.
    pub loss_reference: f64,
    /// The largest `‖g − g_ref‖ / ‖g_ref‖` over the trainable tensors.
    pub worst_grad_rel_err: f64,
    /// `‖g − g_ref‖ / ‖g_ref‖` over all trainable tensors together.
    pub total_grad_rel_err: f64,
    /// Which tensor that was.
    pub worst_param: String,
    /// Tensors whose reference gradient is zero or missing (should be none).
    pub zero_grads: Vec<String>,
    /// The bound the relative loss difference and the gradient error must stay under: in f32,
    /// every tensor's (`worst_grad_rel_err`); in bf16 or TF32, whose rounding differs between any
    /// two orders of summation, all together (`total_grad_rel_err`), while each tensor's must stay
    /// under 1 (a gradient of the wrong direction or twice the size is still caught): small
    /// gradients that are sums of many cancelling terms (a prior's scalar coefficient) are
    /// legitimately ~50% off between two bf16 summation orders.
    pub tolerance: f64,
    /// Each one-pass kernel on the device against the CPU loops (`model::ops::rowwise`):
    /// `(kernel, dtype, error relative to the largest reference value)`.
    pub kernel_checks: Vec<(String, String, f64)>,
    /// Whether everything is within its tolerance (kernel checks: 2e-3 in f32, 3e-2 in bf16).
    pub ok: bool,
}

/// The result (`--json` prints it as one object).
#[derive(Clone, Debug, Serialize)]
pub struct BenchResult {
    /// Model.
    pub preset: String,
    /// Method label.
    pub method: String,
    /// Images per step.
    pub batch: usize,
    /// `cpu` or `cuda:0`.
    pub device: String,
    /// CPU threads.
    pub threads: usize,
    /// `f32` or `bf16`.
    pub dtype: String,
    /// `auto`, `lean`, `composite`, or `bf16` (on the CPU with `--dtype bf16`: fused, bf16 products).
    pub kernels: String,
    /// TF32 matrix products (CUDA f32).
    pub tf32: bool,
    /// Median forward + loss, ms.
    pub fwd_ms: f64,
    /// Median backward, ms.
    pub bwd_ms: f64,
    /// Median optimizer, ms.
    pub opt_ms: f64,
    /// Median whole step, ms.
    pub step_ms: f64,
    /// Images per second at the median step.
    pub img_per_s: f64,
    /// Useful model FLOP/s of a step (forward, input gradients, weight gradients of what trains).
    pub gflops_per_s: f64,
    /// A 1024³ f32 GEMM in the same run, GFLOP/s (the ceiling for the above).
    pub gemm_gflops_per_s: f64,
    /// Trainable parameters.
    pub trainable: usize,
    /// The check against the composite reference, with `--verify`.
    pub verify: Option<Verify>,
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    if v.is_empty() { 0.0 } else { v[v.len() / 2] }
}

/// Forward FLOPs of the backbone for one image (2 per multiply-add): the linear layers and
/// attention. Adapters are a rounding error and not counted.
#[must_use]
pub fn forward_flops(cfg: &VitConfig) -> f64 {
    let d = cfg.embed_dim as f64;
    let t = cfg.tokens() as f64;
    let n = (cfg.grid() * cfg.grid()) as f64;
    let hidden = cfg.mlp_hidden() as f64;
    let patch = (cfg.in_chans * cfg.patch_size * cfg.patch_size) as f64;
    let per_block = t * (3.0 * d * d + d * d + 2.0 * d * hidden) + 2.0 * t * t * d;
    2.0 * (n * patch * d + cfg.depth as f64 * per_block)
}

fn sync(device: &Device) -> candle_core::Result<()> {
    device.synchronize()
}

/// Times a large GEMM through candle (the machine's practical ceiling).
pub fn gemm_rate(device: &Device) -> candle_core::Result<f64> {
    let n = 1024;
    let a = Tensor::randn(0f32, 1f32, (n, n), device)?;
    let b = Tensor::randn(0f32, 1f32, (n, n), device)?;
    a.matmul(&b)?;
    sync(device)?;
    let mut times = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        let c = a.matmul(&b)?;
        sync(device)?;
        times.push(t.elapsed().as_secs_f64());
        drop(c);
    }
    Ok(2.0 * (n as f64).powi(3) / median(&mut times) / 1e9)
}

/// Runs the benchmark (call inside the rayon pool that should do the work).
pub fn run(cfg: &BenchConfig) -> anyhow::Result<BenchResult> {
    let device = select_device(cfg.device)?;
    let (backbone_spec, classes) = cfg.preset.backbone();
    let mut backbone = load_backbone(&backbone_spec, None, 0, &device)?;
    backbone.kernels = cfg.kernels;
    let tf32 = cfg.tf32 && !device.is_cpu();
    candle_core::cuda::set_gemm_reduced_precision_f32(tf32);
    backbone = backbone.with_precision(cfg.dtype)?;
    let kernels = backbone.kernels;
    let vcfg = backbone.cfg.clone();
    let mut model = PeftModel::new(
        backbone,
        cfg.method.clone(),
        (0..classes).map(|c| c.to_string()).collect(),
        0,
    )?;
    let mut opt = AdamW::new(
        model.trainable(),
        |n, v| timm_decay(n, v, model.backbone.layouts()),
        0.01,
    )?;
    let s = vcfg.img_size;
    let images = Tensor::randn(0f32, 1f32, (cfg.batch, 3, s, s), &device)?.to_dtype(model.backbone.dtype())?;
    let labels = Tensor::from_vec(
        (0..cfg.batch).map(|i| (i % classes) as u32).collect::<Vec<_>>(),
        cfg.batch,
        &device,
    )?;
    let verify = if cfg.verify {
        Some(verify(
            &mut model,
            &images,
            &labels,
            cfg.dtype == Precision::Bf16 || tf32,
        )?)
    } else {
        None
    };
    let (mut fwd, mut bwd, mut upd, mut total) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for i in 0..cfg.steps + 3 {
        if i == 3 {
            profile::reset();
        }
        let t0 = Instant::now();
        let loss = step_loss(&model, &images, &labels)?;
        loss.to_scalar::<f32>()?;
        let t1 = Instant::now();
        let grads = loss.backward()?;
        sync(&device)?;
        let t2 = Instant::now();
        opt.step(&grads, 1e-4, 1.0)?;
        sync(&device)?;
        let t3 = Instant::now();
        if i >= 3 {
            fwd.push((t1 - t0).as_secs_f64());
            bwd.push((t2 - t1).as_secs_f64());
            upd.push((t3 - t2).as_secs_f64());
            total.push((t3 - t0).as_secs_f64());
        }
    }
    if profile::enabled() {
        // Per-section device time of the timed steps (each section synchronised: see
        // `model::ops::profile`), per step.
        let n = cfg.steps as f64;
        eprintln!("section (synchronised), ms per step:");
        for (name, secs, calls) in profile::report() {
            eprintln!(
                "  {name:<28} {:>9.2}  ({} calls)",
                1e3 * secs / n,
                calls / cfg.steps as u64
            );
        }
        let sum = |v: &[f64]| 1e3 * v.iter().sum::<f64>() / n;
        eprintln!("  {:<28} {:>9.2}", "forward (whole)", sum(&fwd));
        eprintln!("  {:<28} {:>9.2}", "backward (whole)", sum(&bwd));
        eprintln!("  {:<28} {:>9.2}", "optimizer (whole)", sum(&upd));
    }
    let step = median(&mut total);
    let factor = match cfg.method.method {
        MethodKind::Linear => 1.0,
        MethodKind::Full => 3.0,
        _ => 2.0,
    };
    let flops = forward_flops(&vcfg) * cfg.batch as f64 * factor;
    Ok(BenchResult {
        preset: cfg.preset.name().into(),
        method: cfg.method.label(),
        batch: cfg.batch,
        device: device_name(&device),
        threads: rayon::current_num_threads(),
        // What ran: on the CPU bf16 means the fused halves' bf16 products (`--dtype bf16` with the
        // auto kernels, or `--kernels bf16`); with other kernels the CPU computes in f32.
        dtype: if (cfg.dtype == Precision::Bf16 && !device.is_cpu()) || (device.is_cpu() && kernels.bf16_products()) {
            "bf16"
        } else {
            "f32"
        }
        .into(),
        kernels: kernels.name().into(),
        tf32,
        fwd_ms: 1e3 * median(&mut fwd),
        bwd_ms: 1e3 * median(&mut bwd),
        opt_ms: 1e3 * median(&mut upd),
        step_ms: 1e3 * step,
        img_per_s: cfg.batch as f64 / step,
        gflops_per_s: flops / step / 1e9,
        gemm_gflops_per_s: gemm_rate(&device)?,
        trainable: model.num_trainable(),
        verify,
    })
}

/// The training loss of one batch (cross-entropy in f32, plus the route loss).
fn step_loss(model: &PeftModel, images: &Tensor, labels: &Tensor) -> anyhow::Result<Tensor> {
    let out = model.forward(images, false)?;
    let loss = cross_entropy(&out.logits.to_dtype(DType::F32)?, labels)?;
    Ok(match out.route_loss {
        Some(r) => (loss + r.to_dtype(DType::F32)?)?,
        None => loss,
    })
}

/// [`Verify`]: one forward and backward with the model's kernels, one with the composite ops.
/// Trainable tensors that are all zero get small random values first.
fn verify(model: &mut PeftModel, images: &Tensor, labels: &Tensor, loose: bool) -> anyhow::Result<Verify> {
    let tolerance = if loose { 5e-2 } else { 2e-3 };
    let kernels = model.backbone.kernels;
    let run = |model: &PeftModel| -> anyhow::Result<(f64, Vec<Option<Tensor>>)> {
        let loss = step_loss(model, images, labels)?;
        let grads = loss.backward()?;
        let g = model
            .trainable()
            .iter()
            .map(|(_, v)| grads.get(v.as_tensor()).map(|g| g.to_dtype(DType::F32)))
            .map(Option::transpose)
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok((f64::from(loss.to_scalar::<f32>()?), g))
    };
    // Zero-initialised tensors (adapters' up projections) would leave everything upstream of them
    // without a gradient at step 0: give them small random values first (timing is unaffected).
    for (_, v) in model.trainable() {
        if v.as_tensor()
            .abs()?
            .max_all()?
            .to_dtype(DType::F32)?
            .to_scalar::<f32>()?
            == 0.0
        {
            let noise = (Tensor::randn(0f32, 1f32, v.shape(), v.device())? * 0.02)?;
            v.set(&noise.to_dtype(v.dtype())?)?;
        }
    }
    let (loss, fast) = run(model)?;
    model.backbone.kernels = Kernels::Composite;
    let reference = run(model);
    model.backbone.kernels = kernels;
    let (loss_reference, reference) = reference?;
    let norm =
        |t: &Tensor| -> candle_core::Result<f64> { Ok(f64::from(t.sqr()?.sum_all()?.to_scalar::<f32>()?.sqrt())) };
    let (mut worst, mut worst_param, mut zero_grads) = (0.0f64, String::new(), Vec::new());
    let (mut diff_sq, mut ref_sq) = (0.0f64, 0.0f64);
    for (((name, _), g), r) in model.trainable().iter().zip(&fast).zip(&reference) {
        let r_norm = match r {
            Some(r) => norm(r)?,
            None => 0.0,
        };
        if r_norm == 0.0 {
            zero_grads.push(name.clone());
            continue;
        }
        let err = match (g, r) {
            (Some(g), Some(r)) => norm(&(g - r)?)? / r_norm,
            _ => f64::INFINITY,
        };
        diff_sq += (err * r_norm).powi(2);
        ref_sq += r_norm * r_norm;
        // NaN counts as the worst.
        if err.is_nan() || err > worst {
            worst = err;
            worst_param.clone_from(name);
        }
    }
    let loss_err = (loss - loss_reference).abs() / loss_reference.abs().max(1e-12);
    let checks = verify::self_check(images.device())?;
    let kernels_ok = checks
        .iter()
        .all(|(_, dtype, err)| *err <= if *dtype == DType::F32 { 2e-3 } else { 3e-2 });
    let kernel_checks = checks
        .into_iter()
        .map(|(k, d, e)| (k, format!("{d:?}").to_lowercase(), e))
        .collect();
    Ok(Verify {
        kernel_checks,
        loss,
        loss_reference,
        worst_grad_rel_err: worst,
        total_grad_rel_err: diff_sq.sqrt() / ref_sq.sqrt().max(1e-30),
        worst_param,
        ok: kernels_ok
            && loss_err <= tolerance
            && zero_grads.is_empty()
            && if loose {
                diff_sq.sqrt() <= tolerance * ref_sq.sqrt() && worst <= 1.0
            } else {
                worst <= tolerance
            },
        zero_grads,
        tolerance,
    })
}

/// The run config a bench corresponds to (for reference in reports).
#[must_use]
pub fn as_run_config(cfg: &BenchConfig) -> RunConfig {
    RunConfig {
        method: cfg.method.clone(),
        batch: cfg.batch,
        device: cfg.device,
        threads: cfg.threads,
        dtype: cfg.dtype,
        ..RunConfig::default()
    }
}
