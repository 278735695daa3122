//! One optimizer step and the evaluations.

use super::{StepOutcome, Trainer};
use crate::config::Coeff;
use crate::data::loader::LoaderMsg;
use crate::data::{Batch, Split};
use crate::model::{GradMode as _, cross_entropy};
use crate::train::batch::{images_tensor, labels_tensor};
use crate::train::error::{Result, TrainError};
use crate::train::evaluate::{EvalInput, classify};
use crate::train::protocol::{EvalResult, Progress};
use candle_core::DType;
use std::time::{Duration, Instant};

impl Trainer {
    fn next_batch(&mut self) -> Result<Batch> {
        let deadline = Instant::now() + Duration::from_hours(1);
        loop {
            if self.stop.cuts_short() {
                return Err(TrainError::Cancelled);
            }
            if Instant::now() > deadline {
                return Err(TrainError::Config(
                    "the data loader produced nothing for an hour".into(),
                ));
            }
            match self.loader.recv_timeout(Duration::from_millis(100)) {
                Some(LoaderMsg::Batch(b)) => return Ok(b),
                Some(LoaderMsg::Ready { usable, skipped }) if !skipped.is_empty() => {
                    let names: Vec<String> = skipped
                        .iter()
                        .take(5)
                        .map(|(p, why)| format!("{} ({why})", p.display()))
                        .collect();
                    let mut n = self.notice(format!(
                        "skipped {} undecodable training image(s) ({} usable): {}{}",
                        skipped.len(),
                        usable,
                        names.join(", "),
                        if skipped.len() > 5 { ", …" } else { "" }
                    ));
                    n.path = skipped.first().map(|(p, _)| p.clone());
                    self.notices.push(n);
                }
                Some(LoaderMsg::Failed(e)) => return Err(e.into()),
                Some(LoaderMsg::Ready { .. }) | None => {}
            }
        }
    }

    /// One optimizer step.
    pub fn step(&mut self) -> Result<StepOutcome> {
        let started = Instant::now();
        let batch = self.next_batch()?;
        let b = batch.labels.len();
        let s = self.model.backbone.cfg.img_size;
        let images = images_tensor(batch.images, b, s, &self.device, self.model.backbone.dtype())?;
        let labels = labels_tensor(&batch.labels, &self.device)?;
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
            let what = if update.grad_norm.is_finite() {
                format!("the update at learning rate {lr:e} overflows")
            } else {
                format!("gradient norm is {}", update.grad_norm)
            };
            return Ok(StepOutcome::Diverged(format!(
                "{what} at step {}; {}",
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
            class_loss: None,
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
            let vals: Vec<f64> = self
                .model
                .moppa_blocks()
                .into_iter()
                .filter_map(|b| self.model.moppa_unit(b))
                .flat_map(|u| u.coeff_values(coeff))
                .collect();
            if !vals.is_empty() {
                let lo = vals.iter().copied().fold(f64::INFINITY, f64::min);
                let hi = vals.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                parts.push(format!("{} in [{lo:.4}, {hi:.4}]", coeff.name()));
            }
        }
        parts.join(", ")
    }

    /// Evaluates the validation or test split (`None` when it has no usable image).
    pub fn evaluate(&mut self, split: Split) -> Result<Option<EvalResult>> {
        let input = eval_input(&self.cfg, &self.normalize, &self.model, &self.device);
        let set = if split == Split::Test {
            &mut self.test
        } else {
            &mut self.val
        };
        if set.is_empty() {
            return Ok(None);
        }
        let stop = self.stop.clone();
        let tally = classify(&self.model, set, &input, &|| stop.cuts_short())?;
        let result = tally.result(self.step, split, self.time_s());
        if split == Split::Val
            && let Some(r) = &result
            && self.best_val.is_none_or(|b| r.acc > b)
        {
            self.best_val = Some(r.acc);
            self.improved = true;
        }
        Ok(result)
    }
}

impl Trainer {
    /// A prior ablation of the model as it is now, on `images` validation images
    /// ([`crate::train::ablation::subset_indices`]). It reads the model only: no optimizer step,
    /// no RNG draw, no loader change, and the best-validation bookkeeping is left alone.
    pub fn ablate(
        &self,
        images: usize,
        cancel: &dyn Fn() -> bool,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<crate::train::protocol::Ablation> {
        use crate::train::ablation::{ablate, check_images, subset_indices};
        check_images(images)?;
        if self.val.is_empty() {
            return Err(crate::train::TrainError::Config(
                "the run has no validation split to ablate on".into(),
            ));
        }
        let input = eval_input(&self.cfg, &self.normalize, &self.model, &self.device);
        let mut set = self.val.subset(&subset_indices(self.val.len(), images));
        let stop = self.stop.clone();
        let cancel = || cancel() || stop.cuts_short();
        let mut a = ablate(&self.model, &mut set, &input, &cancel, progress)?;
        a.step = self.step;
        a.time_s = self.time_s();
        Ok(a)
    }
}

/// How a run's evaluation batches become the model's input.
fn eval_input<'a>(
    cfg: &crate::config::RunConfig,
    normalize: &'a crate::data::Normalize,
    model: &crate::model::PeftModel,
    device: &'a candle_core::Device,
) -> EvalInput<'a> {
    EvalInput {
        batch: cfg.batch.max(64),
        normalize,
        size: model.backbone.cfg.img_size,
        device,
        dtype: model.backbone.dtype(),
    }
}
