//! The one evaluation loop: every batch of a split as tensors with gradients off, for the
//! trainer's validation and test evaluations, `moppa eval` and the masked autoencoder's
//! validation; and the classifier tally all of them report.

use super::backbone::{load_backbone, select_device};
use super::batch::{images_tensor, labels_tensor};
use super::error::{Result, TrainError};
use super::protocol::EvalResult;
use crate::config::{DeviceChoice, RunConfig};
use crate::data::loader::EvalSet;
use crate::data::{self, Normalize, Split};
use crate::model::checkpoint::load_adapter_noting;
use crate::model::{GradMode, NoGrad, PeftModel, cross_entropy};
use candle_core::{DType, Device, Tensor};
use std::path::Path;

/// How the images of a split become the model's input.
#[derive(Clone, Copy, Debug)]
pub struct EvalInput<'a> {
    /// Images per forward pass.
    pub batch: usize,
    /// The backbone's input normalisation.
    pub normalize: &'a Normalize,
    /// Image side.
    pub size: usize,
    /// Where the model lives.
    pub device: &'a Device,
    /// The model's compute dtype.
    pub dtype: DType,
}

/// Runs `f(images, labels)` on every batch of `set`, in order, with `model`'s gradients off
/// (back on afterwards, also after an error). `cancel` is asked before each batch; when it says
/// so the pass ends with [`TrainError::Cancelled`].
pub fn for_each_batch(
    model: &dyn GradMode,
    set: &mut EvalSet,
    input: &EvalInput<'_>,
    cancel: &dyn Fn() -> bool,
    mut f: impl FnMut(Tensor, &[u32]) -> Result<()>,
) -> Result<()> {
    let _no_grad = NoGrad::new(model);
    set.for_each_batch(input.batch, input.normalize, |pixels, labels| {
        if cancel() {
            return Err(TrainError::Cancelled);
        }
        let images = images_tensor(pixels, labels.len(), input.size, input.device, input.dtype)?;
        f(images, &labels)
    })
}

/// Accuracy and mean cross-entropy of a classifier over a split, per class too.
#[derive(Clone, Debug)]
pub struct Tally {
    loss_sum: f64,
    /// `(correct, seen)` per class.
    per_class: Vec<(usize, usize)>,
}

impl Tally {
    /// An empty tally over `classes` classes.
    #[must_use]
    pub fn new(classes: usize) -> Self {
        Self {
            loss_sum: 0.0,
            per_class: vec![(0, 0); classes],
        }
    }

    /// Adds one batch: logits `(B, classes)` against its labels.
    pub fn add(&mut self, logits: &Tensor, labels: &[u32]) -> Result<()> {
        let logits = logits.to_dtype(DType::F32)?;
        let y = labels_tensor(labels, logits.device())?;
        let b = labels.len();
        self.loss_sum += f64::from(cross_entropy(&logits, &y)?.to_scalar::<f32>()?) * b as f64;
        let pred = logits.argmax(1)?.to_vec1::<u32>()?;
        for (p, l) in pred.iter().zip(labels) {
            let entry = self
                .per_class
                .get_mut(*l as usize)
                .ok_or_else(|| TrainError::Config(format!("label {l} is outside the model's classes")))?;
            entry.1 += 1;
            entry.0 += usize::from(p == l);
        }
        Ok(())
    }

    /// Images seen.
    #[must_use]
    pub fn seen(&self) -> usize {
        self.per_class.iter().map(|(_, t)| t).sum()
    }

    /// The result at `step` (`None` when nothing was seen).
    #[must_use]
    pub fn result(&self, step: u64, split: Split, time_s: f64) -> Option<EvalResult> {
        let n = self.seen();
        if n == 0 {
            return None;
        }
        let correct: usize = self.per_class.iter().map(|(c, _)| c).sum();
        Some(EvalResult {
            step,
            split: split.name().into(),
            loss: self.loss_sum / n as f64,
            acc: correct as f64 / n as f64,
            per_class_acc: self
                .per_class
                .iter()
                .map(|(c, t)| if *t == 0 { 0.0 } else { *c as f64 / *t as f64 })
                .collect(),
            time_s,
        })
    }
}

/// The classifier's tally over `set` (`cancel` as in [`for_each_batch`]).
pub fn classify(
    model: &PeftModel,
    set: &mut EvalSet,
    input: &EvalInput<'_>,
    cancel: &dyn Fn() -> bool,
) -> Result<Tally> {
    let mut tally = Tally::new(model.classes.len());
    for_each_batch(model, set, input, cancel, |images, labels| {
        tally.add(&model.forward(&images, false)?.logits, labels)
    })?;
    Ok(tally)
}

/// What `moppa eval` reports: the result, the class names and anything the user should be told
/// (a forced load onto another backbone, skipped images).
pub struct AdapterEval {
    /// The evaluation.
    pub result: EvalResult,
    /// Class names, index = label.
    pub classes: Vec<String>,
    /// Warnings, one line each.
    pub warnings: Vec<String>,
}

/// Loads `adapter` onto the backbone `backbone_spec` and evaluates it on `split` of `data_spec`.
pub fn evaluate_adapter(
    adapter: &Path,
    backbone_spec: &str,
    heads: Option<usize>,
    data_spec: &str,
    split: Split,
    force: bool,
    batch: usize,
) -> Result<AdapterEval> {
    let device = select_device(DeviceChoice::Auto)?;
    let backbone = load_backbone(backbone_spec, heads, 0, &device)?;
    let (model, forced) = load_adapter_noting(adapter, backbone, force)?;
    let mut warnings: Vec<String> = forced.into_iter().collect();
    let dataset = data::load(data_spec, false, 0)?;
    if dataset.classes.len() != model.classes.len() {
        return Err(TrainError::Config(format!(
            "{}: the adapter has {} classes, {data_spec} has {}",
            adapter.display(),
            model.classes.len(),
            dataset.classes.len()
        )));
    }
    let cfg = &model.backbone.cfg;
    let normalize = Normalize {
        mean: cfg.mean,
        std: cfg.std,
    };
    let size = cfg.img_size;
    let mut set = EvalSet::new(dataset.split(split).to_vec(), size as u32, 512 << 20);
    let input = EvalInput {
        batch: batch.max(1),
        normalize: &normalize,
        size,
        device: &device,
        dtype: model.backbone.dtype(),
    };
    let result = classify(&model, &mut set, &input, &|| false)?
        .result(0, split, 0.0)
        .ok_or_else(|| TrainError::Config(format!("the {} split of {data_spec} has no usable image", split.name())))?;
    if let Some((path, why)) = set.skipped.first() {
        warnings.push(format!(
            "{} image(s) of the {} split could not be used (first: {}: {why})",
            set.skipped.len(),
            split.name(),
            path.display()
        ));
    }
    Ok(AdapterEval {
        result,
        classes: model.classes.clone(),
        warnings,
    })
}

/// The run config saved in a run folder.
pub fn run_config(dir: &Path) -> Result<RunConfig> {
    let path = dir.join("config.toml");
    let text = std::fs::read_to_string(&path).map_err(|source| TrainError::io(&path, source))?;
    RunConfig::from_toml(&text).map_err(|e| TrainError::Config(format!("{}: {e}", path.display())))
}
