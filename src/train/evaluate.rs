//! The one evaluation loop: every batch of a split as tensors with gradients off, for the
//! trainer's validation and test evaluations, `moppa eval` and the masked autoencoder's
//! validation; and the classifier tally all of them report.

use super::backbone::{load_backbone, select_device};
use super::batch::{images_tensor, labels_tensor};
use super::error::{Result, TrainError};
use super::protocol::{
    BlockSnapshot, EvalResult, MAX_CONFUSION_CLASSES, MAX_MISCLASSIFIED, Misclassified, Probe, ProbeOrigin, Rgb,
    Snapshot,
};
use crate::config::{DeviceChoice, Precision, RunConfig};
use crate::data::loader::{EvalBatch, EvalSet};
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

/// [`for_each_batch`], with each batch's indices and unnormalised pixels.
pub fn for_each_indexed(
    model: &dyn GradMode,
    set: &mut EvalSet,
    input: &EvalInput<'_>,
    cancel: &dyn Fn() -> bool,
    mut f: impl FnMut(Tensor, &EvalBatch<'_>) -> Result<()>,
) -> Result<()> {
    let _no_grad = NoGrad::new(model);
    set.for_each_indexed(input.batch, input.normalize, |mut batch| {
        if cancel() {
            return Err(TrainError::Cancelled);
        }
        let pixels = std::mem::take(&mut batch.pixels);
        let images = images_tensor(pixels, batch.labels.len(), input.size, input.device, input.dtype)?;
        f(images, &batch)
    })
}

/// Accuracy and mean cross-entropy of a classifier over a split, per class too, with the
/// confusion counts and the misclassified images.
#[derive(Clone, Debug)]
pub struct Tally {
    loss_sum: f64,
    /// `(correct, seen)` per class.
    per_class: Vec<(usize, usize)>,
    /// `confusion[true][predicted]` (empty beyond [`MAX_CONFUSION_CLASSES`] classes).
    confusion: Vec<Vec<u64>>,
    /// Every misclassified image seen.
    wrong: Vec<Misclassified>,
}

impl Tally {
    /// An empty tally over `classes` classes.
    #[must_use]
    pub fn new(classes: usize) -> Self {
        let confusion = if classes <= MAX_CONFUSION_CLASSES {
            vec![vec![0; classes]; classes]
        } else {
            Vec::new()
        };
        Self {
            loss_sum: 0.0,
            per_class: vec![(0, 0); classes],
            confusion,
            wrong: Vec::new(),
        }
    }

    /// Adds one batch: logits `(B, classes)` against its labels.
    pub fn add(&mut self, logits: &Tensor, labels: &[u32]) -> Result<()> {
        self.add_indexed(logits, labels, &[])
    }

    /// [`Self::add`], with each image's index in its split (`index` empty: the misclassified
    /// are not kept).
    pub fn add_indexed(&mut self, logits: &Tensor, labels: &[u32], index: &[usize]) -> Result<()> {
        let logits = logits.to_dtype(DType::F32)?;
        let y = labels_tensor(labels, logits.device())?;
        let b = labels.len();
        self.loss_sum += f64::from(cross_entropy(&logits, &y)?.to_scalar::<f32>()?) * b as f64;
        let rows: Vec<Vec<f32>> = logits.to_vec2()?;
        for (j, (row, l)) in rows.iter().zip(labels).enumerate() {
            let p = argmax(row);
            let entry = self
                .per_class
                .get_mut(*l as usize)
                .ok_or_else(|| TrainError::Config(format!("label {l} is outside the model's classes")))?;
            entry.1 += 1;
            entry.0 += usize::from(p == *l as usize);
            if let Some(cell) = self.confusion.get_mut(*l as usize).and_then(|r| r.get_mut(p)) {
                *cell += 1;
            }
            if p != *l as usize
                && let Some(&i) = index.get(j)
            {
                self.wrong.push(Misclassified {
                    index: i as u64,
                    predicted: p as u32,
                    prob: f64::from(softmax(row).get(p).copied().unwrap_or(0.0)),
                });
            }
        }
        Ok(())
    }

    /// `(correct, seen)` per class.
    #[must_use]
    pub fn per_class_counts(&self) -> Vec<(u64, u64)> {
        self.per_class.iter().map(|&(c, t)| (c as u64, t as u64)).collect()
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
            n: n as u64,
            time_s,
            confusion: self.confusion.clone(),
            misclassified: if split == Split::Val {
                let mut w = self.wrong.clone();
                w.sort_by(|a, b| b.prob.total_cmp(&a.prob).then(a.index.cmp(&b.index)));
                w.truncate(MAX_MISCLASSIFIED);
                w
            } else {
                Vec::new()
            },
        })
    }
}

/// The index of the largest value (the first of equals; NaN never wins).
fn argmax(row: &[f32]) -> usize {
    let mut best = 0;
    for (i, v) in row.iter().enumerate() {
        if *v > row[best] || row[best].is_nan() {
            best = i;
        }
    }
    best
}

/// The classifier's tally over `set` (`cancel` as in [`for_each_batch`]).
pub fn classify(
    model: &PeftModel,
    set: &mut EvalSet,
    input: &EvalInput<'_>,
    cancel: &dyn Fn() -> bool,
) -> Result<Tally> {
    let mut tally = Tally::new(model.classes.len());
    for_each_indexed(model, set, input, cancel, |images, batch| {
        tally.add_indexed(&model.forward(&images, false)?.logits, &batch.labels, &batch.index)
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
    /// `(correct, images)` per class, index = label.
    pub per_class_counts: Vec<(u64, u64)>,
    /// Warnings, one line each.
    pub warnings: Vec<String>,
}

/// A saved adapter on its backbone, with the input preparation evaluation uses (the backbone's
/// size, mean and std): what `moppa eval` and `moppa predict` share.
pub(crate) struct LoadedAdapter {
    model: PeftModel,
    device: Device,
    normalize: Normalize,
    /// Said when the adapter was forced onto another backbone file.
    forced: Option<String>,
}

/// The backbone an adapter goes on, and the precision it computes at (a run's own, so that
/// evaluating a run folder reproduces the accuracy the run reported).
#[derive(Clone, Copy, Debug)]
pub struct OnBackbone<'a> {
    /// `builtin`, a file, `hf:ORG/NAME[@REV]` or `random:PRESET`.
    pub spec: &'a str,
    /// Heads of a timm backbone file.
    pub heads: Option<usize>,
    /// The run's `--dtype` (f32 for a bare adapter file).
    pub precision: Precision,
}

impl LoadedAdapter {
    pub(crate) fn load(adapter: &Path, on: OnBackbone<'_>, force: bool) -> Result<Self> {
        let device = select_device(DeviceChoice::Auto)?;
        let backbone = load_backbone(on.spec, on.heads, 0, &device)?.with_precision(on.precision)?;
        let (model, forced) = load_adapter_noting(adapter, backbone, force)?;
        let cfg = &model.backbone.cfg;
        let normalize = Normalize {
            mean: cfg.mean,
            std: cfg.std,
        };
        Ok(Self {
            model,
            device,
            normalize,
            forced,
        })
    }

    /// [`Self::load`], and the dataset `data_spec`, which must have the adapter's classes.
    fn with_data(adapter: &Path, on: OnBackbone<'_>, force: bool, data_spec: &str) -> Result<(Self, data::Dataset)> {
        let loaded = Self::load(adapter, on, force)?;
        let dataset = data::load(data_spec, false, 0)?;
        if dataset.classes.len() != loaded.model.classes.len() {
            return Err(TrainError::Config(format!(
                "{}: the adapter has {} classes, {data_spec} has {}",
                adapter.display(),
                loaded.model.classes.len(),
                dataset.classes.len()
            )));
        }
        Ok((loaded, dataset))
    }

    fn eval_set(&self, samples: Vec<data::Sample>) -> EvalSet {
        let cfg = &self.model.backbone.cfg;
        let resize = crate::data::transform::Resize {
            size: cfg.img_size as u32,
            crop: cfg.eval_crop,
        };
        EvalSet::new(samples, resize, 512 << 20)
    }

    fn input(&self, batch: usize) -> EvalInput<'_> {
        EvalInput {
            batch: batch.max(1),
            normalize: &self.normalize,
            size: self.model.backbone.cfg.img_size,
            device: &self.device,
            dtype: self.model.backbone.dtype(),
        }
    }
}

/// Loads `adapter` onto the backbone `backbone_spec` and evaluates it on `split` of `data_spec`.
pub fn evaluate_adapter(
    adapter: &Path,
    on: OnBackbone<'_>,
    data_spec: &str,
    split: Split,
    force: bool,
    batch: usize,
) -> Result<AdapterEval> {
    let (loaded, dataset) = LoadedAdapter::with_data(adapter, on, force, data_spec)?;
    let model = &loaded.model;
    let mut warnings: Vec<String> = loaded.forced.iter().cloned().collect();
    let mut set = loaded.eval_set(dataset.split(split).to_vec());
    let tally = classify(model, &mut set, &loaded.input(batch), &|| false)?;
    let per_class_counts = tally.per_class_counts();
    let result = tally
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
        per_class_counts,
        warnings,
    })
}

/// What `moppa eval --ablate` and a reopened run's ablation report.
pub struct AdapterAblation {
    /// The ablation (step 0: a saved adapter has no step of its own here).
    pub ablation: super::protocol::Ablation,
    /// Class names, index = label.
    pub classes: Vec<String>,
    /// Warnings, one line each.
    pub warnings: Vec<String>,
}

/// A prior ablation ([`super::ablation::ablate`]) of a saved adapter on `images` images of the
/// validation split of `data_spec` (the fixed subset every ablation of that split uses).
#[allow(clippy::too_many_arguments)]
pub fn ablate_adapter(
    adapter: &Path,
    on: OnBackbone<'_>,
    data_spec: &str,
    force: bool,
    batch: usize,
    images: usize,
    cancel: &dyn Fn() -> bool,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<AdapterAblation> {
    use super::ablation::{ablate, check_images, subset_indices};
    check_images(images)?;
    let (loaded, dataset) = LoadedAdapter::with_data(adapter, on, force, data_spec)?;
    let model = &loaded.model;
    let mut warnings: Vec<String> = loaded.forced.iter().cloned().collect();
    let val = dataset.split(Split::Val);
    if val.is_empty() {
        return Err(TrainError::Config(format!(
            "{data_spec} has no validation split to ablate on"
        )));
    }
    let picked: Vec<data::Sample> = subset_indices(val.len(), images)
        .into_iter()
        .filter_map(|i| val.get(i).cloned())
        .collect();
    let mut set = loaded.eval_set(picked);
    let ablation = ablate(model, &mut set, &loaded.input(batch), cancel, progress)?;
    if let Some((path, why)) = set.skipped.first() {
        warnings.push(format!(
            "{} image(s) of the ablation's subset could not be used (first: {}: {why})",
            set.skipped.len(),
            path.display()
        ));
    }
    Ok(AdapterAblation {
        ablation,
        classes: model.classes.clone(),
        warnings,
    })
}

/// [`ablate_adapter`] on a run folder's saved adapter, its backbone, precision and data.
pub fn ablate_run(
    dir: &Path,
    images: usize,
    cancel: &dyn Fn() -> bool,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<AdapterAblation> {
    let (cfg, notes) = run_config_noted(dir)?;
    let spec = run_backbone_spec(&cfg);
    let on = OnBackbone {
        spec: &spec,
        heads: cfg.heads,
        precision: cfg.dtype,
    };
    let adapter = dir.join(crate::train::runfolder::ADAPTER);
    let mut a = ablate_adapter(
        &adapter,
        on,
        &cfg.data,
        false,
        cfg.batch.max(64),
        images,
        cancel,
        progress,
    )?;
    a.ablation.step = adapter_step(dir);
    a.warnings.extend(notes);
    Ok(a)
}

/// The step of a run folder's saved adapter: it is written with each validation evaluation and
/// at the end, so the last of those its records hold (0 when none can be read).
fn adapter_step(dir: &Path) -> u64 {
    use crate::train::record::{Record, RecordReader};
    let Ok(reader) = RecordReader::open(&dir.join(crate::train::runfolder::METRICS_JSONL)) else {
        return 0;
    };
    reader
        .filter_map(|r| match r {
            Record::Eval(e) if e.split == "val" => Some(e.step),
            Record::Finished(f) => Some(f.step),
            _ => None,
        })
        .last()
        .unwrap_or(0)
}

/// The run config saved in a run folder, with any path recorded relative (by a version before
/// they were recorded absolute) located as [`RunConfig::locate_relative_paths`] does; where it
/// looked is printed on stderr as a note.
pub fn run_config(dir: &Path) -> Result<RunConfig> {
    let (cfg, notes) = run_config_noted(dir)?;
    for n in notes {
        eprintln!("note: {n}");
    }
    Ok(cfg)
}

/// [`run_config`], with its notes returned instead of printed.
pub fn run_config_noted(dir: &Path) -> Result<(RunConfig, Vec<String>)> {
    let path = dir.join(crate::train::runfolder::CONFIG_TOML);
    let text = std::fs::read_to_string(&path).map_err(|source| TrainError::io(&path, source))?;
    let mut cfg = RunConfig::from_toml(&text).map_err(|e| TrainError::Config(format!("{}: {e}", path.display())))?;
    let notes = cfg.locate_relative_paths(dir);
    Ok((cfg, notes))
}

/// The backbone a run trained on, as a spec to load again: an `hf:` id pinned to the commit the
/// run recorded.
#[must_use]
pub fn run_backbone_spec(cfg: &RunConfig) -> String {
    match &cfg.backbone_revision {
        Some(rev) if cfg.backbone.starts_with("hf:") && !cfg.backbone.contains('@') => {
            format!("{}@{rev}", cfg.backbone)
        }
        _ => cfg.backbone.clone(),
    }
}

/// The probe fields of a snapshot for `image` (named `name`) on a saved adapter: its prediction
/// and each MoPPA block's router weights over its patch tokens; every other field is empty.
pub(crate) fn probe_snapshot(loaded: &LoadedAdapter, name: &str, image: &Rgb) -> Result<Snapshot> {
    let model = &loaded.model;
    let size = model.backbone.cfg.img_size;
    if image.size != size || image.pixels.len() != size * size * 3 {
        return Err(TrainError::Config(format!(
            "{name}: the probe must be {size}×{size} RGB (the backbone's input), got {} bytes",
            image.pixels.len()
        )));
    }
    let _no_grad = NoGrad::new(model);
    let fwd = super::probe::probe_forward(model, image, &loaded.normalize, &loaded.device)?;
    let blocks = fwd
        .alpha
        .into_iter()
        .map(|(block, probe_alpha)| BlockSnapshot {
            block,
            filters_mean: Vec::new(),
            filters_channel: Vec::new(),
            mix: Vec::new(),
            coeffs: crate::config::PerCoeff::default(),
            source: Vec::new(),
            router: None,
            probe_alpha,
            locked: Vec::new(),
        })
        .collect();
    let method = &model.method;
    Ok(Snapshot {
        step: 0,
        grid: (model.grid.h, model.grid.w),
        priors: method.active_priors(),
        channel: None,
        tau: 0.0,
        gamma: 0.0,
        route_weight: 0.0,
        temperature: 1.0,
        blocks,
        probe: Some(Probe {
            image: image.clone(),
            origin: ProbeOrigin::File { name: name.to_owned() },
        }),
        probe_prediction: fwd.prediction,
    })
}

/// What `moppa predict` reports: each readable image's class probabilities, in the order given.
pub struct Predictions {
    /// Class names, index = class.
    pub classes: Vec<String>,
    /// `(file, probabilities)` of every image that could be read, in input order.
    pub rows: Vec<(std::path::PathBuf, Vec<f32>)>,
    /// Files that could not be read, and why.
    pub skipped: Vec<(std::path::PathBuf, String)>,
    /// Anything else the user should be told (a forced load onto another backbone).
    pub warnings: Vec<String>,
}

/// Loads `adapter` onto `backbone_spec` and classifies `files`, resized and normalised as in
/// evaluation (the backbone's input size, mean and std), `batch` images per forward pass.
/// Unreadable files are returned apart, never an error.
pub fn predict_files(
    adapter: &Path,
    on: OnBackbone<'_>,
    force: bool,
    files: &[std::path::PathBuf],
    batch: usize,
) -> Result<Predictions> {
    let loaded = LoadedAdapter::load(adapter, on, force)?;
    let model = &loaded.model;
    // The label of each sample is its index in `files`: it survives the skips.
    let samples = files
        .iter()
        .enumerate()
        .map(|(i, p)| data::Sample {
            source: data::Source::File(p.clone()),
            label: i as u32,
        })
        .collect();
    let mut set = loaded.eval_set(samples);
    let mut probs: Vec<Option<Vec<f32>>> = vec![None; files.len()];
    for_each_batch(model, &mut set, &loaded.input(batch), &|| false, |images, index| {
        let logits: Vec<Vec<f32>> = model.forward(&images, false)?.logits.to_dtype(DType::F32)?.to_vec2()?;
        for (row, &i) in logits.into_iter().zip(index) {
            if let Some(slot) = probs.get_mut(i as usize) {
                *slot = Some(softmax(&row));
            }
        }
        Ok(())
    })?;
    let rows = files
        .iter()
        .zip(probs)
        .filter_map(|(f, p)| p.map(|p| (f.clone(), p)))
        .collect();
    Ok(Predictions {
        classes: model.classes.clone(),
        rows,
        skipped: set.skipped,
        warnings: loaded.forced.into_iter().collect(),
    })
}

/// Softmax of one row of logits (in f64, so large logits neither overflow nor lose the small).
fn softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let exp: Vec<f64> = logits.iter().map(|&l| f64::from(l - max).exp()).collect();
    let sum: f64 = exp.iter().sum();
    exp.iter().map(|e| (e / sum) as f32).collect()
}
