//! One training run's state and its operations: setup (backbone, data, model, optimizer,
//! resume), one optimizer step, evaluation, snapshots of the model's internals, the live
//! commands, and checkpoints. The worker thread drives it; nothing here knows about displays.

use super::config::{DeviceChoice, Precision, RunConfig};
use super::optim::{AdamW, Decay, schedule};
use super::protocol::{
    Applied, BlockSnapshot, Coeff, EvalResult, Hyper, Lockable, Notice, Progress, Rgb, RouterStats, RunInfo, SetMode,
    Snapshot, Target,
};
use crate::data::loader::{EvalSet, Loader, LoaderMsg};
use crate::data::{self, DataError, LoaderConfig, Normalize};
use crate::model::checkpoint::KEY_CONFIG;
use crate::model::peft::{BlockAdapter, BlockRouting};
use crate::model::tensor_file::{HostTensor, StoreAs, TensorFile, write_atomic};
use crate::model::{BackboneOptions, MethodKind, ModelError, PeftModel, Vit, VitConfig, cross_entropy};
use crate::physics::Prior;
use crate::physics::tensor::{inv_softplus, softplus_f64};
use candle_core::{DType, Device, Tensor, Var};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Why a run cannot go on.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// Bad data.
    #[error(transparent)]
    Data(#[from] DataError),
    /// Bad backbone or checkpoint.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// A bad setting.
    #[error("{0}")]
    Config(String),
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

impl TrainError {
    /// As a notice with the file (and line) involved.
    #[must_use]
    pub fn notice(&self, step: u64, time_s: f64) -> Notice {
        let (path, line) = match self {
            Self::Data(DataError::File { path, line, .. }) => (Some(path.clone()), *line),
            Self::Io { path, .. }
            | Self::Model(
                ModelError::Io { path, .. } | ModelError::Format { path, .. } | ModelError::Shape { path, .. },
            ) => (Some(path.clone()), None),
            _ => (None, None),
        };
        Notice {
            step,
            time_s,
            message: self.to_string(),
            path,
            line,
        }
    }
}

type Result<T> = std::result::Result<T, TrainError>;

/// The built-in backbone: a ViT pretrained on Fashion-MNIST (see assets/README.md).
pub static BUILTIN_BACKBONE: &[u8] = include_bytes!("../../assets/backbone-tiny.safetensors");

/// Resolves a backbone spec: `builtin`, `random:PRESET` (random weights, for tests and
/// benchmarks) or a safetensors file.
pub fn load_backbone(spec: &str, heads: Option<usize>, seed: u64, device: &Device) -> Result<Vit> {
    let opts = BackboneOptions {
        heads,
        ..BackboneOptions::default()
    };
    if spec == "builtin" {
        let tf = TensorFile::from_bytes(Path::new("builtin"), BUILTIN_BACKBONE)?;
        return Ok(Vit::from_tensor_file(&tf, &opts, device)?);
    }
    if let Some(name) = spec.strip_prefix("random:") {
        let cfg = match name {
            "tiny" => VitConfig::tiny(),
            "vit-b16" => VitConfig::vit_b16(),
            "vit-s16" => VitConfig::vit_s16(),
            "vit-ti16" => VitConfig::vit_ti16(),
            other => {
                return Err(TrainError::Config(format!(
                    "unknown preset '{other}' in --backbone random:{other} (tiny, vit-ti16, vit-s16, vit-b16)"
                )));
            }
        };
        return Ok(Vit::random(&VitConfig { num_classes: 0, ..cfg }, seed, device)?);
    }
    Ok(Vit::from_file(Path::new(spec), &opts, device)?)
}

/// Picks the device for a run.
pub fn select_device(choice: DeviceChoice) -> Result<Device> {
    let device = match choice {
        DeviceChoice::Cpu => Device::Cpu,
        DeviceChoice::Cuda => {
            Device::new_cuda(0).map_err(|e| TrainError::Config(format!("--device cuda: no CUDA device ({e})")))?
        }
        DeviceChoice::Auto => {
            if cfg!(feature = "cuda") {
                Device::new_cuda(0).unwrap_or(Device::Cpu)
            } else {
                Device::Cpu
            }
        }
    };
    single_stream(&device);
    Ok(device)
}

/// candle's CUDA device tracks every tensor's reads and writes with CUDA events (two events
/// created per allocation, recorded and waited on at every kernel launch) so that tensors can be
/// shared between streams. The engine uses the device's one stream only, where stream order
/// already orders everything, so the tracking is pure host overhead per op; it is switched off.
#[cfg(feature = "cuda")]
#[allow(unsafe_code)]
fn single_stream(device: &Device) {
    if let Device::Cuda(d) = device {
        // SAFETY: every tensor of the engine is created and used on this device's single stream
        // (no other stream is ever created), which is the condition candle documents for
        // `disable_event_tracking`.
        unsafe { d.disable_event_tracking() };
    }
}

#[cfg(not(feature = "cuda"))]
fn single_stream(_: &Device) {}

/// What a step produced.
pub enum StepOutcome {
    /// A normal step.
    Done(Progress),
    /// The loss or a gradient was not finite; nothing was updated.
    Diverged(String),
}

/// State saved for `--resume` (JSON in `state.safetensors` metadata).
#[derive(serde::Serialize, serde::Deserialize, Default)]
struct ResumeState {
    step: u64,
    opt_t: u64,
    loader_epoch: u64,
    loader_index: u64,
    peak_lr: f64,
    tau: f64,
    gamma: f64,
    temperature: f64,
    route_weight: f64,
    locked: Vec<String>,
    best_val: Option<f64>,
    time_s: f64,
    probe: usize,
}

/// A training run.
pub struct Trainer {
    /// The resolved config.
    pub cfg: RunConfig,
    /// The model.
    pub model: PeftModel,
    opt: AdamW,
    loader: Loader,
    val: EvalSet,
    test: EvalSet,
    normalize: Normalize,
    device: Device,
    /// Steps done.
    pub step: u64,
    /// Planned steps.
    pub total: u64,
    peak_lr: f64,
    position: (u64, u64),
    epoch: f64,
    probe: usize,
    channel: Option<usize>,
    last_routing: Vec<BlockRouting>,
    /// Best validation accuracy so far.
    pub best_val: Option<f64>,
    clock: Instant,
    time_offset: f64,
    throughput: f64,
    ready: bool,
    /// Notices collected during setup and loading, for the worker to emit.
    pub notices: Vec<Notice>,
    /// Checkpoints written.
    pub checkpoints: Vec<PathBuf>,
    info: RunInfo,
}

fn decay_mask(name: &str, var: &Var, model: &PeftModel) -> Decay {
    let (al, ml) = model.backbone.layouts();
    if name.ends_with(".attn_half") || name.ends_with(".mlp_half") {
        let lay = if name.ends_with(".attn_half") { al } else { ml };
        return super::optim::half_decay(lay, var.device());
    }
    // Matrices decay (timm's convention); vectors, coefficients and the source map do not.
    if var.rank() == 2 && !name.ends_with("source") && !name.ends_with("pos_embed") {
        Decay::All
    } else {
        Decay::None
    }
}

impl Trainer {
    /// Sets a run up: backbone, data, model, optimizer, loader (and the resume state).
    pub fn new(cfg: &RunConfig, threads: usize) -> Result<Self> {
        cfg.validate().map_err(TrainError::Config)?;
        let mut notices = Vec::new();
        let device = select_device(cfg.device)?;
        let mut backbone = load_backbone(&cfg.backbone, cfg.heads, cfg.seed, &device)?;
        if let Some(m) = cfg.mean {
            backbone.cfg.mean = m;
        }
        if let Some(s) = cfg.std {
            if s.iter().any(|v| !(v.is_finite() && *v > 0.0)) {
                return Err(TrainError::Config(format!("--std {s:?} must be positive")));
            }
            backbone.cfg.std = s;
        }
        if cfg.dtype == Precision::Bf16 {
            if device.is_cpu() {
                notices.push(Notice {
                    step: 0,
                    time_s: 0.0,
                    message: "--dtype bf16 needs a GPU; training in f32 on the CPU".into(),
                    path: None,
                    line: None,
                });
            } else {
                backbone = backbone.to_dtype(DType::BF16)?;
            }
        }
        let mut dataset = data::load(&cfg.data, cfg.final_split, cfg.seed)?;
        if let Some(n) = cfg.few_shot {
            dataset.few_shot(n, cfg.seed)?;
        }
        for (path, reason) in &dataset.skipped {
            notices.push(Notice {
                step: 0,
                time_s: 0.0,
                message: format!("skipped: {reason}"),
                path: Some(path.clone()),
                line: None,
            });
        }
        let normalize = Normalize {
            mean: backbone.cfg.mean,
            std: backbone.cfg.std,
        };
        let size = backbone.cfg.img_size as u32;
        let total = cfg.total_steps(dataset.train.len());
        let cfg = cfg.resolved(total);
        let model = PeftModel::new(backbone, cfg.method.clone(), dataset.classes.clone(), cfg.seed)?;
        let opt = AdamW::new(model.trainable(), |n, v| decay_mask(n, v, &model), cfg.weight_decay)?;
        let budget = 512 << 20;
        let val = EvalSet::new(dataset.val.clone(), size, budget);
        let test = EvalSet::new(dataset.test.clone(), size, budget);
        for (path, reason) in val.skipped.iter().chain(&test.skipped) {
            notices.push(Notice {
                step: 0,
                time_s: 0.0,
                message: format!("skipped: {reason}"),
                path: Some(path.clone()),
                line: None,
            });
        }
        let priors = if cfg.method.method == MethodKind::Moppa {
            cfg.method.active_priors()
        } else {
            Vec::new()
        };
        let g = model.backbone.grid();
        let info = RunInfo {
            method: cfg.method.label(),
            trainable: model.num_trainable(),
            device: if device.is_cpu() { "cpu".into() } else { "cuda:0".into() },
            threads,
            classes: dataset.classes.clone(),
            blocks: model.backbone.depth(),
            grid: (g, g),
            priors,
            rank: if cfg.method.method == MethodKind::Moppa {
                cfg.method.rank
            } else {
                0
            },
            total_steps: total,
            split_sizes: [dataset.train.len(), dataset.val.len(), dataset.test.len()],
            config: serde_json::to_value(&cfg).unwrap_or_default(),
            out: cfg.out.clone(),
            start_step: 0,
            backbone: model.backbone.cfg.clone(),
            probes: dataset.val.len(),
        };
        let loader_cfg = LoaderConfig {
            size,
            batch: cfg.batch,
            normalize,
            augment: cfg.augment,
            seed: cfg.seed,
        };
        let mut trainer = Self {
            peak_lr: cfg.lr(),
            model,
            opt,
            loader: Loader::spawn(Vec::new(), &loader_cfg, (0, 0)).map_err(|source| TrainError::Io {
                path: "loader thread".into(),
                source,
            })?,
            val,
            test,
            normalize,
            device,
            step: 0,
            total,
            position: (0, 0),
            epoch: 0.0,
            probe: 0,
            channel: None,
            last_routing: Vec::new(),
            best_val: None,
            clock: Instant::now(),
            time_offset: 0.0,
            throughput: 0.0,
            ready: false,
            notices,
            checkpoints: Vec::new(),
            info,
            cfg,
        };
        if let Some(dir) = trainer.cfg.resume.clone() {
            trainer.load_state(&dir)?;
        }
        trainer.loader =
            Loader::spawn(dataset.train, &loader_cfg, trainer.position).map_err(|source| TrainError::Io {
                path: "loader thread".into(),
                source,
            })?;
        trainer.info.start_step = trainer.step;
        if let Some(out) = trainer.cfg.out.clone() {
            std::fs::create_dir_all(&out).map_err(|source| TrainError::Io {
                path: out.clone(),
                source,
            })?;
            let text = trainer.cfg.to_toml().map_err(TrainError::Config)?;
            let path = out.join("config.toml");
            std::fs::write(&path, text).map_err(|source| TrainError::Io { path, source })?;
        }
        Ok(trainer)
    }

    /// Static facts about the run.
    #[must_use]
    pub fn info(&self) -> &RunInfo {
        &self.info
    }

    /// Seconds since the run began (resumed runs continue the clock).
    #[must_use]
    pub fn time_s(&self) -> f64 {
        self.time_offset + self.clock.elapsed().as_secs_f64()
    }

    /// Whether the planned steps are done.
    #[must_use]
    pub fn done(&self) -> bool {
        self.step >= self.total
    }

    /// Learning rate of the next step.
    #[must_use]
    pub fn current_lr(&self) -> f64 {
        schedule(self.step, self.total, self.cfg.warmup, self.peak_lr)
    }

    fn next_batch(&mut self) -> Result<data::Batch> {
        loop {
            match self.loader.recv_timeout(Duration::from_hours(1)) {
                Some(LoaderMsg::Batch(b)) => return Ok(b),
                Some(LoaderMsg::Ready { usable, skipped }) => {
                    self.ready = true;
                    if !skipped.is_empty() {
                        let names: Vec<String> = skipped.iter().take(5).map(|(p, _)| p.display().to_string()).collect();
                        self.notices.push(Notice {
                            step: self.step,
                            time_s: self.time_s(),
                            message: format!(
                                "skipped {} undecodable training image(s) ({} usable): {}{}",
                                skipped.len(),
                                usable,
                                names.join(", "),
                                if skipped.len() > 5 { ", …" } else { "" }
                            ),
                            path: skipped.first().map(|(p, _)| p.clone()),
                            line: None,
                        });
                    }
                }
                Some(LoaderMsg::Failed(e)) => return Err(e.into()),
                None => {
                    return Err(TrainError::Config(
                        "the data loader produced nothing for an hour".into(),
                    ));
                }
            }
        }
    }

    /// One optimizer step.
    pub fn step(&mut self) -> Result<StepOutcome> {
        let started = Instant::now();
        let batch = self.next_batch()?;
        let b = batch.labels.len();
        let s = self.model.backbone.cfg.img_size;
        let dtype = self.model.backbone.dtype();
        let images = Tensor::from_vec(batch.images, (b, 3, s, s), &self.device)?.to_dtype(dtype)?;
        let labels = Tensor::from_vec(batch.labels.clone(), b, &self.device)?;
        self.model.set_grad_enabled(true);
        let fwd = self.model.forward(&images, true)?;
        let ce = cross_entropy(&fwd.logits.to_dtype(DType::F32)?, &labels)?;
        let route = fwd.route_loss.as_ref().map(|r| r.to_dtype(DType::F32)).transpose()?;
        let loss = match &route {
            Some(r) => (&ce + r)?,
            None => ce.clone(),
        };
        let loss_v = f64::from(loss.to_scalar::<f32>()?);
        if !loss_v.is_finite() {
            return Ok(StepOutcome::Diverged(format!(
                "loss is {loss_v} at step {}; {}",
                self.step + 1,
                self.coefficients_in_force()
            )));
        }
        let grads = loss.backward()?;
        let lr = self.current_lr();
        let update = self.opt.step(&grads, lr, self.cfg.grad_clip)?;
        if !update.finite {
            return Ok(StepOutcome::Diverged(format!(
                "gradient norm is {} at step {}; {}",
                update.grad_norm,
                self.step + 1,
                self.coefficients_in_force()
            )));
        }
        let pred = fwd.logits.argmax(1)?.to_vec1::<u32>()?;
        let correct = pred.iter().zip(&batch.labels).filter(|(p, l)| p == l).count();
        self.last_routing = fwd.routing;
        self.step += 1;
        self.position = (batch.epoch, batch.index + 1);
        self.epoch = batch.epoch as f64 + (batch.index + 1) as f64 / batch.per_epoch as f64;
        let rate = b as f64 / started.elapsed().as_secs_f64().max(1e-9);
        self.throughput = if self.throughput == 0.0 {
            rate
        } else {
            0.9 * self.throughput + 0.1 * rate
        };
        Ok(StepOutcome::Done(Progress {
            step: self.step,
            epoch: self.epoch,
            loss: loss_v,
            route_loss: route.map_or(Ok(0.0), |r| r.to_scalar::<f32>().map(f64::from))?,
            train_acc: correct as f64 / b as f64,
            lr,
            img_per_s: self.throughput,
            time_s: self.time_s(),
        }))
    }

    /// The coefficients in force, for error messages.
    #[must_use]
    pub fn coefficients_in_force(&self) -> String {
        let live = &self.model.live;
        let mut parts = vec![
            format!("lr {:.3e}", self.current_lr()),
            format!("τ {}", live.tau),
            format!("γ {}", live.gamma),
            format!("λ {}", live.route_weight),
            format!("T {}", live.temperature),
        ];
        for coeff in Coeff::ALL {
            let vals: Vec<f64> = (0..self.model.adapters.len())
                .flat_map(|b| self.coeff_values(b, coeff))
                .collect();
            if !vals.is_empty() {
                let lo = vals.iter().copied().fold(f64::INFINITY, f64::min);
                let hi = vals.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                parts.push(format!("{} in [{lo:.4}, {hi:.4}]", coeff.name()));
            }
        }
        parts.join(", ")
    }

    /// Evaluates a split (`val` or `test`).
    pub fn evaluate(&mut self, test: bool) -> Result<Option<EvalResult>> {
        let classes = self.model.classes.len();
        let (mut loss_sum, mut n, mut correct) = (0.0f64, 0usize, 0usize);
        let mut per_class = vec![(0usize, 0usize); classes];
        let s = self.model.backbone.cfg.img_size;
        let dtype = self.model.backbone.dtype();
        let batch = self.cfg.batch.max(64);
        let norm = self.normalize;
        let device = self.device.clone();
        self.model.set_grad_enabled(false);
        let model = &self.model;
        let set = if test { &mut self.test } else { &mut self.val };
        if set.is_empty() {
            model.set_grad_enabled(true);
            return Ok(None);
        }
        let result = set.for_each_batch(batch, &norm, |images, labels| -> Result<()> {
            let b = labels.len();
            let x = Tensor::from_vec(images, (b, 3, s, s), &device)?.to_dtype(dtype)?;
            let y = Tensor::from_vec(labels.clone(), b, &device)?;
            let logits = model.forward(&x, false)?.logits.to_dtype(DType::F32)?;
            loss_sum += f64::from(cross_entropy(&logits, &y)?.to_scalar::<f32>()?) * b as f64;
            let pred = logits.argmax(1)?.to_vec1::<u32>()?;
            for (p, l) in pred.iter().zip(&labels) {
                let entry = &mut per_class[*l as usize];
                entry.1 += 1;
                if p == l {
                    entry.0 += 1;
                    correct += 1;
                }
            }
            n += b;
            Ok(())
        });
        self.model.set_grad_enabled(true);
        result?;
        if n == 0 {
            return Ok(None);
        }
        let acc = correct as f64 / n as f64;
        if !test {
            self.best_val = Some(self.best_val.map_or(acc, |b| b.max(acc)));
        }
        Ok(Some(EvalResult {
            step: self.step,
            split: if test { "test" } else { "val" }.into(),
            loss: loss_sum / n as f64,
            acc,
            per_class_acc: per_class
                .iter()
                .map(|(c, t)| if *t == 0 { 0.0 } else { *c as f64 / *t as f64 })
                .collect(),
            time_s: self.time_s(),
        }))
    }

    fn moppa(&self, block: usize) -> Option<&crate::model::moppa::MoppaUnit> {
        match self.model.adapters.get(block) {
            Some(BlockAdapter::Moppa(u)) => Some(u),
            _ => None,
        }
    }

    fn coeff_var(&self, block: usize, coeff: Coeff) -> Option<&Var> {
        let u = self.moppa(block)?;
        match coeff {
            Coeff::Kappa => u.kappa_raw.as_ref(),
            Coeff::C => u.c_raw.as_ref(),
            Coeff::Eps => u.eps_raw.as_ref(),
        }
    }

    /// Per-channel values of a coefficient in a block (empty if absent).
    #[must_use]
    pub fn coeff_values(&self, block: usize, coeff: Coeff) -> Vec<f64> {
        self.coeff_var(block, coeff)
            .and_then(|v| v.as_tensor().to_dtype(DType::F64).ok()?.to_vec1::<f64>().ok())
            .map(|raw| raw.into_iter().map(softplus_f64).collect())
            .unwrap_or_default()
    }

    fn blocks_of(&self, target: Target) -> std::result::Result<Vec<usize>, String> {
        let moppa: Vec<usize> = (0..self.model.adapters.len())
            .filter(|&b| self.moppa(b).is_some())
            .collect();
        match target {
            Target::All => Ok(moppa),
            Target::Block(b) if moppa.contains(&b) => Ok(vec![b]),
            Target::Block(b) => Err(format!(
                "block {b} has no MoPPA unit (blocks 0..{})",
                self.model.adapters.len()
            )),
        }
    }

    /// Changes κ, c or ε; returns what changed, or a message why not.
    pub fn set_coeff(&mut self, coeff: Coeff, target: Target, mode: SetMode) -> std::result::Result<Applied, String> {
        let v = match mode {
            SetMode::Set(v) | SetMode::Scale(v) => v,
        };
        if !(v.is_finite() && v > 0.0) {
            return Err(format!("{} must be > 0 (got {v})", coeff.name()));
        }
        if self.cfg.method.method != MethodKind::Moppa {
            return Err(format!(
                "{} applies to MoPPA; this run is {}",
                coeff.name(),
                self.cfg.method.label()
            ));
        }
        if !self.cfg.method.active_priors().contains(&coeff.prior()) {
            return Err(format!(
                "{} belongs to the {} prior, which is not active in this run",
                coeff.name(),
                coeff.prior()
            ));
        }
        let blocks = self.blocks_of(target)?;
        let mut old_all = Vec::new();
        let mut new_all = Vec::new();
        for b in blocks {
            let old = self.coeff_values(b, coeff);
            let new: Vec<f64> = old
                .iter()
                .map(|o| if let SetMode::Scale(f) = mode { o * f } else { v })
                .collect();
            let raw: Vec<f64> = new.iter().map(|&x| inv_softplus(x)).collect();
            if let Some(var) = self.coeff_var(b, coeff) {
                let t = Tensor::from_vec(raw, var.dims(), var.device())
                    .and_then(|t| t.to_dtype(var.dtype()))
                    .map_err(|e| e.to_string())?;
                var.set(&t).map_err(|e| e.to_string())?;
            }
            old_all.extend(old);
            new_all.extend(new);
        }
        let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
        let mode_name = if matches!(mode, SetMode::Scale(_)) {
            " scale"
        } else {
            ""
        };
        Ok(Applied {
            step: self.step,
            command: format!("{}{mode_name}", coeff.name()),
            target: target.to_string(),
            old: mean(&old_all),
            new: mean(&new_all),
            time_s: self.time_s(),
        })
    }

    /// Changes τ, γ, λ, T or the peak learning rate.
    pub fn set_hyper(&mut self, hyper: Hyper, value: f64) -> std::result::Result<Applied, String> {
        let positive = matches!(hyper, Hyper::Tau | Hyper::Temperature | Hyper::Lr);
        let ok = value.is_finite() && if positive { value > 0.0 } else { value >= 0.0 };
        if !ok {
            return Err(format!(
                "{} must be {} (got {value})",
                hyper.name(),
                if positive { "> 0" } else { "≥ 0" }
            ));
        }
        let live = &mut self.model.live;
        let slot = match hyper {
            Hyper::Tau => &mut live.tau,
            Hyper::Gamma => &mut live.gamma,
            Hyper::RouteWeight => &mut live.route_weight,
            Hyper::Temperature => &mut live.temperature,
            Hyper::Lr => &mut self.peak_lr,
        };
        let old = std::mem::replace(slot, value);
        Ok(Applied {
            step: self.step,
            command: hyper.name().into(),
            target: "all".into(),
            old,
            new: value,
            time_s: self.time_s(),
        })
    }

    /// Locks or releases a coefficient (or the source map).
    pub fn set_lock(&mut self, what: Lockable, target: Target, locked: bool) -> std::result::Result<Applied, String> {
        let blocks = self.blocks_of(target)?;
        let mut n = 0;
        for b in blocks {
            let name = format!("blocks.{b}.moppa.{}", what.tensor());
            if self.model.trainable().iter().any(|(n2, _)| *n2 == name) {
                self.opt.set_locked(&name, locked);
                n += 1;
            }
        }
        if n == 0 {
            return Err(format!("{} is not trained in this run", what.name()));
        }
        let verb = if locked { "lock" } else { "unlock" };
        Ok(Applied {
            step: self.step,
            command: format!("{verb} {}", what.name()),
            target: target.to_string(),
            old: if locked { 0.0 } else { 1.0 },
            new: if locked { 1.0 } else { 0.0 },
            time_s: self.time_s(),
        })
    }

    /// Chooses the probe image (an index into the validation split).
    pub fn set_probe(&mut self, index: usize) -> std::result::Result<(), String> {
        if index >= self.val.len() {
            return Err(format!(
                "probe index {index} is outside the validation split (0..{})",
                self.val.len()
            ));
        }
        self.probe = index;
        Ok(())
    }

    /// Chooses the channel of the per-channel filter view.
    pub fn set_channel(&mut self, channel: Option<usize>) -> std::result::Result<(), String> {
        let r = self.cfg.method.rank;
        match channel {
            Some(c) if c >= r || self.cfg.method.method != MethodKind::Moppa => {
                Err(format!("channel {c} does not exist (rank {r})"))
            }
            _ => {
                self.channel = channel;
                Ok(())
            }
        }
    }

    /// The model's internals now (MoPPA blocks; empty for other methods).
    pub fn snapshot(&self) -> Result<Snapshot> {
        let (h, w) = (self.model.grid.h, self.model.grid.w);
        let priors = self.info.priors.clone();
        let k = priors.len();
        self.model.set_grad_enabled(false);
        let result = (|| -> Result<Snapshot> {
            let probe = self.val.rgb(self.probe);
            let mut probe_alpha: HashMap<usize, Vec<f32>> = HashMap::new();
            let mut probe_prediction = None;
            if let Some((rgb, _)) = &probe {
                let s = self.model.backbone.cfg.img_size;
                let x = data::loader::assemble(&[rgb.as_slice()], s as u32, &self.normalize, None);
                let x = Tensor::from_vec(x, (1, 3, s, s), &self.device)?.to_dtype(self.model.backbone.dtype())?;
                let fwd = self.model.forward(&x, true)?;
                probe_prediction = fwd.logits.argmax(1)?.to_vec1::<u32>()?.first().copied();
                for r in fwd.routing {
                    probe_alpha.insert(r.block, r.alpha.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?);
                }
            }
            let mut blocks = Vec::new();
            for b in 0..self.model.adapters.len() {
                let Some(u) = self.moppa(b) else { continue };
                let gains: Vec<Vec<Vec<f32>>> = u
                    .filters(&self.model.grid, &self.model.live, false)?
                    .iter()
                    .map(|g| g.to_dtype(DType::F32)?.to_vec2::<f32>())
                    .collect::<candle_core::Result<_>>()?;
                let mean_of = |g: &Vec<Vec<f32>>| -> Vec<f32> {
                    let r = g.len().max(1) as f32;
                    (0..h * w)
                        .map(|i| g.iter().map(|row| row[i]).sum::<f32>() / r)
                        .collect()
                };
                let filters_mean: Vec<Vec<f32>> = gains.iter().map(mean_of).collect();
                let filters_channel = match self.channel {
                    Some(c) => gains.iter().filter_map(|g| g.get(c).cloned()).collect(),
                    None => Vec::new(),
                };
                let router = self
                    .last_routing
                    .iter()
                    .find(|r| r.block == b)
                    .map(|r| router_stats(&r.alpha, k))
                    .transpose()?;
                let weights: Vec<f32> = router
                    .as_ref()
                    .map_or_else(|| vec![1.0 / k as f32; k], |r| r.mean_alpha.clone());
                let mix = (0..h * w)
                    .map(|i| filters_mean.iter().zip(&weights).map(|(f, a)| f[i] * a).sum())
                    .collect();
                let vals = |c: Coeff| self.coeff_values(b, c).into_iter().map(|v| v as f32).collect();
                let locked = [Lockable::Kappa, Lockable::C, Lockable::Eps, Lockable::Source]
                    .into_iter()
                    .filter(|l| self.opt.is_locked(&format!("blocks.{b}.moppa.{}", l.tensor())))
                    .collect();
                blocks.push(BlockSnapshot {
                    block: b,
                    filters_mean,
                    filters_channel,
                    mix,
                    kappa: vals(Coeff::Kappa),
                    c: vals(Coeff::C),
                    eps: vals(Coeff::Eps),
                    source: match &u.source {
                        Some(s) => s.as_tensor().to_dtype(DType::F32)?.flatten_all()?.to_vec1()?,
                        None => Vec::new(),
                    },
                    router,
                    probe_alpha: probe_alpha.remove(&b).unwrap_or_default(),
                    locked,
                });
            }
            let live = &self.model.live;
            Ok(Snapshot {
                step: self.step,
                grid: (h, w),
                priors,
                channel: self.channel,
                tau: live.tau,
                gamma: live.gamma,
                route_weight: live.route_weight,
                temperature: live.temperature,
                blocks,
                probe: probe.map(|(pixels, label)| {
                    (
                        Rgb {
                            size: self.model.backbone.cfg.img_size,
                            pixels,
                        },
                        self.probe,
                        label,
                    )
                }),
                probe_prediction,
            })
        })();
        self.model.set_grad_enabled(true);
        result
    }

    /// Writes the adapter (atomically) with the resolved run config.
    pub fn save_adapter(&self, path: &Path) -> Result<()> {
        let run = serde_json::to_string(&self.cfg).unwrap_or_default();
        self.model.save_adapter(path, &run)?;
        Ok(())
    }

    /// Writes `adapter.safetensors` and `state.safetensors` into the run folder (if any).
    pub fn checkpoint(&mut self) -> Result<Vec<PathBuf>> {
        let Some(out) = self.cfg.out.clone() else {
            return Ok(Vec::new());
        };
        let adapter = out.join("adapter.safetensors");
        self.save_adapter(&adapter)?;
        let state = out.join("state.safetensors");
        self.save_state(&state)?;
        for p in [&adapter, &state] {
            if !self.checkpoints.contains(p) {
                self.checkpoints.push(p.clone());
            }
        }
        Ok(vec![adapter, state])
    }

    fn save_state(&self, path: &Path) -> Result<()> {
        let mut tensors: BTreeMap<String, HostTensor> = BTreeMap::new();
        let host = |t: &Tensor| -> candle_core::Result<HostTensor> {
            Ok(HostTensor::new(
                t.dims().to_vec(),
                t.flatten_all()?.to_dtype(DType::F32)?.to_vec1()?,
            ))
        };
        for (name, var) in self.model.trainable() {
            tensors.insert(format!("param.{name}"), host(var.as_tensor())?);
        }
        for (name, m, v) in self.opt.moments()? {
            tensors.insert(format!("adam_m.{name}"), host(&m)?);
            tensors.insert(format!("adam_v.{name}"), host(&v)?);
        }
        let live = &self.model.live;
        let state = ResumeState {
            step: self.step,
            opt_t: self.opt.t,
            loader_epoch: self.position.0,
            loader_index: self.position.1,
            peak_lr: self.peak_lr,
            tau: live.tau,
            gamma: live.gamma,
            temperature: live.temperature,
            route_weight: live.route_weight,
            locked: self.opt.locked().iter().cloned().collect(),
            best_val: self.best_val,
            time_s: self.time_s(),
            probe: self.probe,
        };
        let meta: HashMap<String, String> = [
            (
                "moppa.state".to_owned(),
                serde_json::to_string(&state).unwrap_or_default(),
            ),
            (
                KEY_CONFIG.to_owned(),
                serde_json::to_string(&self.cfg).unwrap_or_default(),
            ),
        ]
        .into();
        write_atomic(path, &tensors, &meta, StoreAs::F32)?;
        Ok(())
    }

    fn load_state(&mut self, dir: &Path) -> Result<()> {
        let path = dir.join("state.safetensors");
        let tf = TensorFile::read(&path)?;
        let bad = |msg: String| TrainError::Data(DataError::file(&path, msg));
        let state: ResumeState = tf
            .metadata
            .get("moppa.state")
            .and_then(|s| serde_json::from_str(s).ok())
            .ok_or_else(|| bad("not a MoPPA Studio state file (no moppa.state metadata)".into()))?;
        for (name, var) in self.model.trainable() {
            let t = tf
                .get_shaped(&format!("param.{name}"), var.dims())
                .map_err(|e| bad(e.to_string()))?;
            var.set(&Tensor::from_vec(t.data.clone(), var.dims(), var.device())?.to_dtype(var.dtype())?)?;
        }
        let names: Vec<String> = self.model.trainable().iter().map(|(n, _)| n.clone()).collect();
        for name in names {
            let m = tf.get(&format!("adam_m.{name}")).map_err(|e| bad(e.to_string()))?;
            let v = tf.get(&format!("adam_v.{name}")).map_err(|e| bad(e.to_string()))?;
            self.opt
                .set_moments(&name, &m.to_tensor(&self.device)?, &v.to_tensor(&self.device)?)?;
        }
        self.opt.t = state.opt_t;
        for name in &state.locked {
            self.opt.set_locked(name, true);
        }
        self.step = state.step;
        self.position = (state.loader_epoch, state.loader_index);
        self.peak_lr = state.peak_lr;
        let live = &mut self.model.live;
        (live.tau, live.gamma, live.temperature, live.route_weight) =
            (state.tau, state.gamma, state.temperature, state.route_weight);
        self.best_val = state.best_val;
        self.time_offset = state.time_s;
        self.probe = state.probe;
        Ok(())
    }
}

/// ᾱ, entropy and argmax shares from router weights `(B|1, N|1, k)`.
fn router_stats(alpha: &Tensor, k: usize) -> Result<RouterStats> {
    let v: Vec<f32> = alpha.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    let rows = v.len() / k.max(1);
    let mut mean = vec![0f32; k];
    let mut share = vec![0f32; k];
    let mut entropy = 0f32;
    for row in v.chunks_exact(k) {
        let mut best = 0;
        for (p, &a) in row.iter().enumerate() {
            mean[p] += a;
            if a > row[best] {
                best = p;
            }
            if a > 0.0 {
                entropy -= a * a.ln();
            }
        }
        share[best] += 1.0;
    }
    let n = rows.max(1) as f32;
    for x in mean.iter_mut().chain(share.iter_mut()) {
        *x /= n;
    }
    entropy /= n;
    let norm = if k > 1 { entropy / (k as f32).ln() } else { 0.0 };
    Ok(RouterStats {
        mean_alpha: mean,
        entropy,
        entropy_norm: norm,
        argmax_share: share,
    })
}

/// Names of the priors, for messages.
#[must_use]
pub fn prior_names(p: &[Prior]) -> String {
    p.iter().map(|p| p.name()).collect::<Vec<_>>().join(", ")
}
