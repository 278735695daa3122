//! Evaluating a saved adapter on a dataset split (for `moppa eval` and the app).

use super::protocol::EvalResult;
use super::trainer::{TrainError, load_backbone, select_device};
use super::{RunConfig, config::DeviceChoice};
use crate::data::loader::EvalSet;
use crate::data::{self, Normalize, Split};
use crate::model::checkpoint::load_adapter;
use crate::model::cross_entropy;
use candle_core::{DType, Tensor};
use std::path::Path;

/// Loads `adapter` onto the backbone `backbone_spec` and evaluates it on `split` of `data_spec`.
/// Returns the result and the class names.
pub fn evaluate_adapter(
    adapter: &Path,
    backbone_spec: &str,
    heads: Option<usize>,
    data_spec: &str,
    split: Split,
    force: bool,
    batch: usize,
) -> Result<(EvalResult, Vec<String>), TrainError> {
    let device = select_device(DeviceChoice::Auto)?;
    let backbone = load_backbone(backbone_spec, heads, 0, &device)?;
    let model = load_adapter(adapter, backbone, force)?;
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
    let (s, norm) = (
        cfg.img_size,
        Normalize {
            mean: cfg.mean,
            std: cfg.std,
        },
    );
    let mut set = EvalSet::new(dataset.split(split).to_vec(), s as u32, 512 << 20);
    model.set_grad_enabled(false);
    let classes = model.classes.len();
    let mut per_class = vec![(0usize, 0usize); classes];
    let (mut loss_sum, mut n) = (0.0f64, 0usize);
    set.for_each_batch(batch.max(1), &norm, |images, labels| -> Result<(), TrainError> {
        let b = labels.len();
        let x = Tensor::from_vec(images, (b, 3, s, s), &device)?.to_dtype(model.backbone.dtype())?;
        let logits = model.forward(&x, false)?.logits.to_dtype(DType::F32)?;
        let y = Tensor::from_vec(labels.clone(), b, &device)?;
        loss_sum += f64::from(cross_entropy(&logits, &y)?.to_scalar::<f32>()?) * b as f64;
        for (p, l) in logits.argmax(1)?.to_vec1::<u32>()?.iter().zip(&labels) {
            let e = &mut per_class[*l as usize];
            e.1 += 1;
            e.0 += usize::from(p == l);
        }
        n += b;
        Ok(())
    })?;
    if n == 0 {
        return Err(TrainError::Config(format!(
            "the {} split of {data_spec} has no usable image",
            split.name()
        )));
    }
    let correct: usize = per_class.iter().map(|(c, _)| c).sum();
    Ok((
        EvalResult {
            step: 0,
            split: split.name().into(),
            loss: loss_sum / n as f64,
            acc: correct as f64 / n as f64,
            per_class_acc: per_class
                .iter()
                .map(|(c, t)| if *t == 0 { 0.0 } else { *c as f64 / *t as f64 })
                .collect(),
            time_s: 0.0,
        },
        model.classes.clone(),
    ))
}

/// The run config saved in a run folder.
pub fn run_config(dir: &Path) -> Result<RunConfig, TrainError> {
    let path = dir.join("config.toml");
    let text = std::fs::read_to_string(&path).map_err(|source| TrainError::Io {
        path: path.clone(),
        source,
    })?;
    RunConfig::from_toml(&text).map_err(|e| TrainError::Config(format!("{}: {e}", path.display())))
}
