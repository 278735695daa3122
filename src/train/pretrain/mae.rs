//! The masked-autoencoder pretraining loop (`moppa pretrain --objective mae|supmae`; the model is
//! `model::mae`). It reports through the same [`Event`]s as fine-tuning, written to the run
//! folder by the same [`RunLog`]: progress, warnings, the validation result, and a `Finished`
//! whose reason says whether it was done, interrupted or diverged.

use crate::config::{Augment, DeviceChoice, VitConfig};
use crate::data::loader::{EvalSet, Loader, LoaderConfig, LoaderMsg};
use crate::data::{self, Normalize, Sample, Split};
use crate::model::mae::Mae;
use crate::model::{Vit, cross_entropy};
use crate::train::backbone::{device_name, select_device};
use crate::train::batch::{images_tensor, labels_tensor};
use crate::train::error::{Result, TrainError};
use crate::train::evaluate::{EvalInput, for_each_batch};
use crate::train::optim::{AdamW, schedule, timm_decay};
use crate::train::protocol::{EvalResult, Event, FinishReason, Finished, Notice, Progress, RunInfo};
use crate::train::runlog::RunLog;
use candle_core::DType;
use rand::SeedableRng as _;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// The pretraining settings displays show as the run's config (`RunInfo::config`).
#[derive(serde::Serialize)]
struct ShownConfig<'a> {
    objective: &'a str,
    data: &'a str,
    mask_ratio: f64,
    epochs: u64,
    batch: usize,
    lr: f64,
    seed: u64,
}

/// A masked-autoencoder pretraining run.
#[derive(Clone, Debug)]
pub struct MaeRun {
    /// Training data spec.
    pub data: String,
    /// The encoder's architecture (its `mean`/`std` are the data's normalisation).
    pub encoder: VitConfig,
    /// Share of patches hidden from the encoder.
    pub mask_ratio: f64,
    /// Weight of a classification loss on the mean visible token (SupMAE, Liang et al. 2022);
    /// 0: reconstruction only, labels unused.
    pub supervised_weight: f64,
    /// Decoder width, depth and heads.
    pub decoder: (usize, usize, usize),
    /// Epochs over the training split.
    pub epochs: u64,
    /// Images per step.
    pub batch: usize,
    /// Peak learning rate (warm-up then cosine).
    pub lr: f64,
    /// Warm-up steps.
    pub warmup: u64,
    /// AdamW weight decay (matrices only).
    pub weight_decay: f64,
    /// Augmentation.
    pub augment: Augment,
    /// Seed of the weights, the order, the augmentation and the masks.
    pub seed: u64,
    /// The run folder (`metrics.jsonl`, `metrics.csv`).
    pub run: PathBuf,
}

/// How a run ended.
#[derive(Debug)]
pub struct MaeOutcome {
    /// Why it ended.
    pub reason: FinishReason,
    /// The trained encoder (with the SupMAE classifier as its head, if any); `None` unless done.
    pub encoder: Option<Vit>,
    /// Steps done.
    pub steps: u64,
    /// Reconstruction loss on the validation split (fixed masks), at the end.
    pub val_loss: Option<f64>,
    /// SupMAE: accuracy of the head on the validation and test splits (all patches seen).
    pub accuracy: Option<(f64, f64)>,
    /// Class names (the head's outputs).
    pub classes: Vec<String>,
    /// Seconds.
    pub seconds: f64,
}

/// Where events go: the run log, then the caller's display.
struct Reports<'a> {
    log: Option<RunLog>,
    display: &'a mut dyn FnMut(&Event),
}

impl Reports<'_> {
    fn send(&mut self, ev: &Event) {
        if let Some(log) = &mut self.log
            && let Err(e) = log.write(ev)
        {
            // The log is a record for the user; a full disk must not stop pretraining (the
            // export at the end reports its own errors).
            self.log = None;
            (self.display)(&Event::Warning(Notice {
                step: 0,
                time_s: 0.0,
                message: format!("cannot write the run log: {e}"),
                path: None,
                line: None,
            }));
        }
        (self.display)(ev);
    }

    fn finish(&mut self, reason: FinishReason, steps: u64, accuracy: Option<(f64, f64)>, time_s: f64) {
        self.send(&Event::Finished(Finished {
            reason,
            steps,
            best_val_acc: accuracy.map(|a| a.0),
            test_acc: accuracy.map(|a| a.1),
            checkpoints: Vec::new(),
            time_s,
            message: None,
            path: None,
        }));
    }
}

/// Runs the pretraining on the calling thread's rayon pool, sending every event to `display`
/// (and to the run folder's log); `interrupt` stops it early. Only a run that is done returns an
/// encoder.
pub fn pretrain(run: &MaeRun, interrupt: &AtomicBool, display: &mut dyn FnMut(&Event)) -> Result<MaeOutcome> {
    let device = select_device(DeviceChoice::Auto)?;
    let ds = data::load(&run.data, false, run.seed)?;
    let train = ds.split(Split::Train).to_vec();
    let val = ds.split(Split::Val).to_vec();
    let test = ds.split(Split::Test).to_vec();
    if train.is_empty() {
        return Err(TrainError::Config(format!("{}: no training images", run.data)));
    }
    let classes = if run.supervised_weight > 0.0 {
        ds.classes.len()
    } else {
        0
    };
    let model = Mae::new(&run.encoder, run.mask_ratio, run.decoder, classes, run.seed, &device)?;
    let per_epoch = train.len().div_ceil(run.batch) as u64;
    let total = per_epoch * run.epochs;
    let normalize = Normalize {
        mean: run.encoder.mean,
        std: run.encoder.std,
    };
    let size = run.encoder.img_size;
    let loader = Loader::spawn(
        train.clone(),
        &LoaderConfig {
            size: size as u32,
            batch: run.batch,
            normalize,
            augment: run.augment,
            seed: run.seed,
        },
        (0, 0),
    )
    .map_err(|e| TrainError::io("moppa-loader", e))?;
    std::fs::create_dir_all(&run.run).map_err(|e| TrainError::io(&run.run, e))?;
    let mut reports = Reports { log: None, display };
    match RunLog::create(&run.run) {
        Ok(log) => reports.log = Some(log),
        Err(e) => reports.send(&Event::Warning(Notice {
            step: 0,
            time_s: 0.0,
            message: format!("cannot write the run log: {e}"),
            path: Some(run.run.join(crate::train::runfolder::METRICS_JSONL)),
            line: None,
        })),
    }
    let objective = if classes > 0 { "supmae" } else { "mae" };
    let grid = run.encoder.grid();
    reports.send(&Event::Started(Box::new(RunInfo {
        method: format!(
            "{objective} · decoder D {} × {} · {} of {} patches visible",
            run.decoder.0,
            run.decoder.1,
            model.keep,
            grid * grid
        ),
        trainable: model.vars().iter().map(|(_, v)| v.elem_count()).sum(),
        device: device_name(&device),
        threads: rayon::current_num_threads(),
        classes: ds.classes.clone(),
        blocks: run.encoder.depth,
        grid: (grid, grid),
        priors: Vec::new(),
        rank: 0,
        total_steps: total,
        split_sizes: [train.len(), val.len(), test.len()],
        config: serde_json::to_value(ShownConfig {
            objective,
            data: &run.data,
            mask_ratio: run.mask_ratio,
            epochs: run.epochs,
            batch: run.batch,
            lr: run.lr,
            seed: run.seed,
        })
        .unwrap_or_default(),
        out: Some(run.run.clone()),
        start_step: 0,
        backbone: run.encoder.clone(),
        probes: 0,
        run_id: String::new(),
    })));
    let mut opt = AdamW::new(
        model.vars(),
        |n, v| timm_decay(n, v, model.layouts_of(n)),
        run.weight_decay,
    )?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(run.seed ^ 0x004d_4145);
    let start = Instant::now();
    let report_every = (per_epoch / 4).max(1);
    let (mut step, mut seen, mut loss_sum, mut loss_n) = (0u64, 0usize, 0f64, 0usize);
    let (mut ce_sum, mut right) = (0f64, 0usize);
    let mut window = Instant::now();
    let ended = |reason, step| MaeOutcome {
        reason,
        encoder: None,
        steps: step,
        val_loss: None,
        accuracy: None,
        classes: Vec::new(),
        seconds: start.elapsed().as_secs_f64(),
    };
    while step < total {
        if interrupt.load(Ordering::Relaxed) {
            reports.finish(FinishReason::Interrupted, step, None, start.elapsed().as_secs_f64());
            return Ok(ended(FinishReason::Interrupted, step));
        }
        let batch = match loader.recv_timeout(Duration::from_millis(200)) {
            None => continue,
            Some(LoaderMsg::Ready { usable, skipped }) => {
                if let Some((path, why)) = skipped.first() {
                    reports.send(&Event::Warning(Notice {
                        step: 0,
                        time_s: 0.0,
                        message: format!(
                            "{} of {} training images could not be decoded and are left out (first: {}: {why})",
                            skipped.len(),
                            usable + skipped.len(),
                            path.display()
                        ),
                        path: Some(path.clone()),
                        line: None,
                    }));
                }
                continue;
            }
            Some(LoaderMsg::Failed(e)) => return Err(e.into()),
            Some(LoaderMsg::Batch(b)) => b,
        };
        let b = batch.labels.len();
        let images = images_tensor(batch.images, b, size, &device, DType::F32)?;
        let (keep, restore, hidden) = model.masks(b, &mut rng)?;
        let (recon, logits) = model.forward(&images, &keep, &restore, &hidden)?;
        let loss = match &logits {
            Some(logits) => {
                let labels = labels_tensor(&batch.labels, &device)?;
                let ce = cross_entropy(logits, &labels)?;
                ce_sum += f64::from(ce.to_scalar::<f32>()?);
                let pred = logits.argmax(1)?.to_vec1::<u32>()?;
                right += pred.iter().zip(&batch.labels).filter(|(p, l)| p == l).count();
                (&recon + (ce * run.supervised_weight)?)?
            }
            None => recon.clone(),
        };
        let grads = loss.backward()?;
        let lr = schedule(step, total, run.warmup, run.lr);
        let info = opt.step(&grads, lr, 1.0)?;
        let l = f64::from(recon.to_scalar::<f32>()?);
        if !info.finite || !l.is_finite() {
            let t = start.elapsed().as_secs_f64();
            reports.send(&Event::Diverged(Notice {
                step,
                time_s: t,
                message: format!("MAE pretraining diverged at step {step} (loss {l}); try a lower --lr"),
                path: None,
                line: None,
            }));
            reports.finish(FinishReason::Diverged, step, None, t);
            return Ok(ended(FinishReason::Diverged, step));
        }
        step += 1;
        seen += b;
        loss_sum += l;
        loss_n += 1;
        if step % report_every == 0 || step == total {
            let secs = window.elapsed().as_secs_f64();
            reports.send(&Event::Progress(Progress {
                step,
                epoch: step as f64 / per_epoch as f64,
                loss: loss_sum / loss_n as f64,
                route_loss: 0.0,
                train_acc: if classes > 0 {
                    right as f64 / seen.max(1) as f64
                } else {
                    f64::NAN
                },
                lr,
                img_per_s: seen as f64 / secs.max(1e-9),
                time_s: start.elapsed().as_secs_f64(),
                class_loss: (classes > 0).then(|| ce_sum / loss_n as f64),
            }));
            (seen, loss_sum, loss_n, ce_sum, right) = (0, 0.0, 0, 0.0, 0);
            window = Instant::now();
        }
    }
    drop(loader);
    let eval_cfg = (size, &normalize, run.batch, &device);
    let (val_loss, val_acc) = evaluate(&model, &val, eval_cfg, true, run.seed)?;
    let accuracy = match val_acc {
        Some(v) => Some((v, evaluate(&model, &test, eval_cfg, false, run.seed)?.1.unwrap_or(0.0))),
        None => None,
    };
    let seconds = start.elapsed().as_secs_f64();
    if let Some(loss) = val_loss {
        reports.send(&Event::Eval(EvalResult {
            step,
            split: Split::Val.name().into(),
            loss,
            acc: accuracy.map_or(f64::NAN, |a| a.0),
            per_class_acc: Vec::new(),
            n: val.len() as u64,
            time_s: seconds,
            ..EvalResult::default()
        }));
    }
    if let Some((_, t)) = accuracy {
        reports.send(&Event::Eval(EvalResult {
            step,
            split: Split::Test.name().into(),
            loss: f64::NAN,
            acc: t,
            per_class_acc: Vec::new(),
            n: test.len() as u64,
            time_s: seconds,
            ..EvalResult::default()
        }));
    }
    reports.finish(FinishReason::Done, step, accuracy, seconds);
    Ok(MaeOutcome {
        reason: FinishReason::Done,
        encoder: Some(model.into_encoder()),
        steps: step,
        val_loss,
        accuracy,
        classes: ds.classes.clone(),
        seconds,
    })
}

/// One pass over `samples` without gradients: the reconstruction loss with masks from a fixed
/// seed (when `recon`), and the SupMAE head's accuracy with every patch seen (when it has one).
fn evaluate(
    model: &Mae,
    samples: &[Sample],
    (size, normalize, batch, device): (usize, &Normalize, usize, &candle_core::Device),
    recon: bool,
    seed: u64,
) -> Result<(Option<f64>, Option<f64>)> {
    if samples.is_empty() {
        return Ok((None, None));
    }
    let mut set = EvalSet::new(
        samples.to_vec(),
        crate::data::transform::Resize::square(size as u32),
        256 << 20,
    );
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ 0x0056_414c);
    let (mut loss_sum, mut right, mut count) = (0f64, 0usize, 0usize);
    let mut has_head = false;
    let input = EvalInput {
        batch,
        normalize,
        size,
        device,
        dtype: DType::F32,
    };
    for_each_batch(model, &mut set, &input, &|| false, |images, labels| {
        let b = labels.len();
        if recon {
            let (keep, restore, hidden) = model.masks(b, &mut rng)?;
            let l = model.loss(&images, &keep, &restore, &hidden)?.to_scalar::<f32>()?;
            loss_sum += f64::from(l) * b as f64;
        }
        if let Some(logits) = model.classify(&images)? {
            has_head = true;
            let pred: Vec<u32> = logits.argmax(1)?.to_vec1()?;
            right += pred.iter().zip(labels).filter(|(p, l)| p == l).count();
        }
        count += b;
        Ok(())
    })?;
    if count == 0 {
        return Ok((None, None));
    }
    let n = count as f64;
    Ok((recon.then(|| loss_sum / n), has_head.then(|| right as f64 / n)))
}
