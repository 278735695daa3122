//! Setting a run up: device, backbone, data, model, optimizer, the resume state and the loader.

use super::Trainer;
use super::checkpoint::read_state;
use crate::config::{MethodKind, Precision, RunConfig, check_resources};
use crate::data::loader::{EvalSet, Loader};
use crate::data::transform::Resize;
use crate::data::{self, LoaderConfig, Normalize};
use crate::model::PeftModel;
use crate::train::backbone::{backbone_assumptions, device_name, load_backbone, resolve_backbone, select_device};
use crate::train::error::{Result, TrainError};
use crate::train::optim::{AdamW, timm_decay};
use crate::train::protocol::{Notice, RunInfo};
use crate::train::runfolder::{CONFIG_TOML, RunLock};
use crate::train::stop::StopFlag;
use std::path::PathBuf;
use std::time::Instant;

/// Memory an evaluation split may take decoded (larger splits are decoded per pass).
const EVAL_CACHE_BYTES: usize = 512 << 20;

fn setup_notice(message: String, path: Option<PathBuf>) -> Notice {
    Notice {
        step: 0,
        time_s: 0.0,
        message,
        path,
        line: None,
    }
}

/// A run id: start time and process, in hex.
#[must_use]
pub fn new_run_id() -> String {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    format!("{t:x}-{:x}", std::process::id())
}

/// Ends setup early when an interrupt asks to (nothing has been saved yet).
fn check(stop: &StopFlag) -> Result<()> {
    if stop.cuts_short() {
        Err(TrainError::Cancelled)
    } else {
        Ok(())
    }
}

impl Trainer {
    /// Sets a run up: the run folder's lock, backbone, data, model, optimizer, the resume state,
    /// the loader. `stop` ends it early (and later, the waits for data and the evaluations).
    pub fn new(cfg: &RunConfig, threads: usize, stop: StopFlag) -> Result<Self> {
        cfg.validate().map_err(TrainError::Config)?;
        let lock = cfg.out.as_deref().map(RunLock::acquire).transpose()?;
        let mut notices = Vec::new();
        let device = select_device(cfg.device)?;
        // A resumed run loads the commit and file it started with.
        let resuming = cfg.resume.is_some();
        let pinned = cfg.backbone_revision.as_deref().filter(|_| resuming);
        let resolved = resolve_backbone(&cfg.backbone, pinned, &mut ())?;
        let mut backbone = load_backbone(&resolved.spec, cfg.heads, cfg.seed, &device)?;
        check(&stop)?;
        let sha = &backbone.source.sha256;
        if let Some(want) = cfg
            .backbone_sha256
            .as_deref()
            .filter(|w| resuming && !w.is_empty() && !sha.is_empty())
            && want != sha
        {
            return Err(TrainError::Config(format!(
                "backbone {} has sha256 {sha}, but the run being resumed was trained on {want}: resume it with the file it started with",
                resolved.spec
            )));
        }
        let assumed = backbone_assumptions(&resolved.spec, cfg.heads)?;
        if !assumed.is_empty() {
            notices.push(setup_notice(
                format!(
                    "the backbone file records no architecture (no config.json beside it); assumed {}",
                    assumed.join(", ")
                ),
                Some(std::path::PathBuf::from(&resolved.spec)),
            ));
        }
        if let Some(m) = cfg.mean {
            backbone.cfg.mean = m;
        }
        if let Some(s) = cfg.std {
            if s.iter().any(|v| !(v.is_finite() && *v > 0.0)) {
                return Err(TrainError::Config(format!("--std {s:?} must be positive")));
            }
            backbone.cfg.std = s;
        }
        if cfg.dtype == Precision::Bf16 && device.is_cpu() && !crate::model::ops::cpu::bf16::native() {
            notices.push(setup_notice(
                "--dtype bf16: this CPU has no AVX512-BF16, so its bf16 products are emulated (slower than f32)".into(),
                None,
            ));
        }
        backbone = backbone.with_precision(cfg.dtype)?;
        let mut dataset = data::load(&cfg.data, cfg.final_split, cfg.seed)?;
        check(&stop)?;
        if let Some(n) = cfg.few_shot {
            dataset.few_shot(n, cfg.seed)?;
        }
        check_resources(
            &backbone.cfg,
            &cfg.method,
            cfg.batch,
            dataset.classes.len(),
            crate::util::physical_memory_bytes(),
        )
        .map_err(TrainError::Config)?;
        for (path, reason) in &dataset.skipped {
            notices.push(setup_notice(format!("skipped: {reason}"), Some(path.clone())));
        }
        for (path, message) in &dataset.notes {
            notices.push(setup_notice(message.clone(), path.clone()));
        }
        if cfg.batch > dataset.train.len() {
            notices.push(setup_notice(
                format!(
                    "--batch {} is larger than the {} training images: every batch is the whole split",
                    cfg.batch,
                    dataset.train.len()
                ),
                None,
            ));
        }
        let normalize = Normalize {
            mean: backbone.cfg.mean,
            std: backbone.cfg.std,
        };
        let size = backbone.cfg.img_size as u32;
        // Images larger than the model's input lose their detail: say so once.
        if let Some(first) = dataset.train.first()
            && let Ok(img) = data::transform::decode(first)
            && (img.width > size || img.height > size)
        {
            notices.push(setup_notice(
                format!(
                    "your {}×{} images are shown to the model at {size}×{size} (its input size): finer detail is lost",
                    img.width, img.height
                ),
                None,
            ));
        }
        let total = cfg.total_steps(dataset.train.len());
        let mut cfg = cfg.resolved(total);
        cfg.backbone_revision = resolved.hub.as_ref().map(|h| h.commit.clone());
        cfg.backbone_sha256 = Some(backbone.source.sha256.clone()).filter(|s| !s.is_empty());
        let model = PeftModel::new(backbone, cfg.method.clone(), dataset.classes.clone(), cfg.seed)?;
        let mut opt = AdamW::new(
            model.trainable(),
            |n, v| timm_decay(n, v, model.backbone.layouts()),
            cfg.weight_decay,
        )?;
        let resize = Resize {
            size,
            crop: model.backbone.cfg.eval_crop,
        };
        let val = EvalSet::new(dataset.val.clone(), resize, EVAL_CACHE_BYTES);
        let test = EvalSet::new(dataset.test.clone(), resize, EVAL_CACHE_BYTES);
        check(&stop)?;
        for (path, reason) in val.skipped.iter().chain(&test.skipped) {
            notices.push(setup_notice(format!("skipped: {reason}"), Some(path.clone())));
        }
        let moppa = cfg.method.method == MethodKind::Moppa;
        let g = model.backbone.grid();
        let mut info = RunInfo {
            method: cfg.method.label(),
            trainable: model.num_trainable(),
            device: device_name(&device),
            threads,
            classes: dataset.classes.clone(),
            blocks: model.backbone.depth(),
            grid: (g, g),
            priors: if moppa { cfg.method.active_priors() } else { Vec::new() },
            rank: if moppa { cfg.method.rank } else { 0 },
            total_steps: total,
            split_sizes: [dataset.train.len(), dataset.val.len(), dataset.test.len()],
            config: serde_json::to_value(&cfg).unwrap_or_default(),
            out: cfg.out.clone(),
            start_step: 0,
            backbone: model.backbone.cfg.clone(),
            probes: dataset.val.len(),
            run_id: new_run_id(),
        };
        let resumed = match &cfg.resume {
            Some(dir) => Some(read_state(dir, &model, &mut opt, &device)?),
            None => None,
        };
        let position = resumed.as_ref().map_or((0, 0), |s| (s.loader_epoch, s.loader_index));
        info.start_step = resumed.as_ref().map_or(0, |s| s.step);
        let loader_cfg = LoaderConfig {
            size,
            batch: cfg.batch,
            normalize,
            augment: cfg.augment(),
            seed: cfg.seed,
        };
        let loader =
            Loader::spawn(dataset.train, &loader_cfg, position).map_err(|e| TrainError::io("loader thread", e))?;
        let mut trainer = Self {
            peak_lr: cfg.lr(),
            model,
            opt,
            loader,
            val,
            test,
            normalize,
            device,
            step: 0,
            total,
            position,
            epoch: 0.0,
            probe: 0,
            probe_image: None,
            channel: None,
            last_routing: Vec::new(),
            best_val: None,
            clock: Instant::now(),
            time_offset: 0.0,
            throughput: 0.0,
            notices,
            checkpoints: Vec::new(),
            info,
            cfg,
            improved: false,
            stop,
            _lock: lock,
        };
        if let Some(state) = resumed {
            trainer.restore(&state);
            trainer.verify_pair()?;
        }
        if let Some(out) = trainer.cfg.out.clone() {
            let text = trainer.cfg.to_toml().map_err(TrainError::Config)?;
            let path = out.join(CONFIG_TOML);
            crate::util::write_atomic(&path, |w| {
                use std::io::Write as _;
                w.write_all(text.as_bytes())
            })
            .map_err(|e| TrainError::io(&path, e))?;
        }
        Ok(trainer)
    }
}
