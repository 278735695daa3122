//! Masked-autoencoder pretraining (He et al., "Masked Autoencoders Are Scalable Vision
//! Learners", 2021) for `moppa pretrain --objective mae`: the encoder sees a random
//! `1 − mask_ratio` of the patches (plus the class token), a small transformer decoder gets the
//! encoded patches back in place with a learned mask token everywhere else, and the loss is the
//! mean squared error of the predicted pixels of the masked patches, each patch normalised by its
//! own mean and variance (MAE's `norm_pix_loss`). The encoder is the same `Vit` as everywhere else
//! (same fused ops and backward passes); the decoder is one too, built without a patch embedding
//! input. Only the encoder is written out. With a supervised weight (SupMAE, Liang et al.
//! 2022) a classifier on the mean of the encoded visible patches is trained at the same time and
//! kept as the encoder's head.

use super::optim::{AdamW, Decay, half_decay, schedule};
use super::trainer::{TrainError, select_device};
use crate::data::loader::{Loader, LoaderConfig, LoaderMsg};
use crate::data::transform::{Augment, Normalize};
use crate::data::{self, Split};
use crate::model::config::VitConfig;
use crate::model::cross_entropy;
use crate::model::ops;
use crate::model::vit::Vit;
use candle_core::{D, DType, Device, Tensor, Var};
use rand::seq::SliceRandom as _;
use rand::{Rng as _, SeedableRng as _};
use serde_json::json;
use std::io::Write as _;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

type Result<T> = std::result::Result<T, TrainError>;

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
    /// The run folder (`metrics.jsonl`).
    pub run: PathBuf,
}

/// How a run ended.
#[derive(Debug)]
pub struct MaeOutcome {
    /// The trained encoder (with the SupMAE classifier as its head, if any), or `None` when
    /// interrupted.
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

/// The model: encoder, decoder and the pieces between them.
pub struct Mae {
    /// The encoder (the backbone that is exported).
    pub encoder: Vit,
    decoder: Vit,
    embed_w: Var,
    embed_b: Var,
    mask_token: Var,
    pred_w: Var,
    pred_b: Var,
    /// The classifier on the mean visible token (SupMAE), `(classes, D)` and `(classes)`.
    head: Option<(Var, Var)>,
    /// Patches kept per image.
    pub keep: usize,
    vars: Vec<(String, Var)>,
}

fn randn(rng: &mut rand::rngs::StdRng, n: usize, std: f64) -> Vec<f32> {
    (0..n)
        .map(|_| {
            let (u1, u2): (f64, f64) = (rng.random::<f64>().max(1e-300), rng.random());
            (std * (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
        })
        .collect()
}

impl Mae {
    /// A freshly initialised model.
    pub fn new(
        encoder: &VitConfig,
        mask_ratio: f64,
        decoder: (usize, usize, usize),
        classes: usize,
        seed: u64,
        device: &Device,
    ) -> Result<Self> {
        if !(0.0..1.0).contains(&mask_ratio) {
            return Err(TrainError::Config(format!(
                "--mask-ratio must be in [0, 1) (got {mask_ratio})"
            )));
        }
        let n = encoder.grid() * encoder.grid();
        let keep = ((n as f64) * (1.0 - mask_ratio)).round().clamp(1.0, n as f64) as usize;
        let mut enc = Vit::random(encoder, seed, device)?;
        let (dd, depth, heads) = decoder;
        let dec_cfg = VitConfig {
            embed_dim: dd,
            depth,
            num_heads: heads,
            num_classes: 0,
            ..encoder.clone()
        };
        let mut dec = Vit::random(&dec_cfg, seed.wrapping_add(1), device)?;
        let mut vars: Vec<(String, Var)> = enc.make_trainable()?;
        // The decoder's patch embedding and class token never see an input: not trained.
        vars.extend(
            dec.make_trainable()?
                .into_iter()
                .filter(|(name, _)| name.starts_with("blocks.") || name.starts_with("norm.") || name == "pos_embed")
                .map(|(name, v)| (format!("decoder.{name}"), v)),
        );
        let d = encoder.embed_dim;
        let pix = encoder.patch_size * encoder.patch_size * encoder.in_chans;
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed.wrapping_add(2));
        // Xavier-uniform like MAE's linear layers; the mask token ~ N(0, 0.02).
        let mut xavier = |out: usize, inp: usize| -> Result<Var> {
            let a = (6.0 / (out + inp) as f64).sqrt();
            let v: Vec<f32> = (0..out * inp).map(|_| rng.random_range(-a..a) as f32).collect();
            Ok(Var::from_vec(v, (out, inp), device)?)
        };
        let embed_w = xavier(dd, d)?;
        let pred_w = xavier(pix, dd)?;
        let head = if classes > 0 {
            Some((xavier(classes, d)?, Var::zeros(classes, DType::F32, device)?))
        } else {
            None
        };
        let embed_b = Var::zeros(dd, DType::F32, device)?;
        let pred_b = Var::zeros(pix, DType::F32, device)?;
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed.wrapping_add(3));
        let mask_token = Var::from_vec(randn(&mut rng, dd, 0.02), (1, 1, dd), device)?;
        for (name, v) in [
            ("decoder_embed.weight", &embed_w),
            ("decoder_embed.bias", &embed_b),
            ("mask_token", &mask_token),
            ("decoder_pred.weight", &pred_w),
            ("decoder_pred.bias", &pred_b),
        ] {
            vars.push((name.into(), v.clone()));
        }
        if let Some((w, b)) = &head {
            vars.push(("head.weight".into(), w.clone()));
            vars.push(("head.bias".into(), b.clone()));
        }
        Ok(Self {
            encoder: enc,
            decoder: dec,
            embed_w,
            embed_b,
            mask_token,
            pred_w,
            pred_b,
            head,
            keep,
            vars,
        })
    }

    /// Switches gradient tracking on or off (off: evaluation).
    pub fn set_grad_enabled(&self, on: bool) {
        self.encoder.set_grad_enabled(on);
        self.decoder.set_grad_enabled(on);
    }

    fn w(&self, v: &Var) -> Tensor {
        if self.encoder.grad_enabled() {
            v.as_tensor().clone()
        } else {
            v.as_tensor().detach()
        }
    }

    /// Every trainable tensor with its name.
    #[must_use]
    pub fn vars(&self) -> &[(String, Var)] {
        &self.vars
    }

    /// Where weight decay applies: matrices (inside the flat block buffers too), not vectors,
    /// tokens or position embeddings.
    fn decay(&self, name: &str, var: &Var) -> Decay {
        let (al, ml) = if name.starts_with("decoder.") {
            self.decoder.layouts()
        } else {
            self.encoder.layouts()
        };
        if name.ends_with(".attn_half") || name.ends_with(".mlp_half") {
            let lay = if name.ends_with(".attn_half") { al } else { ml };
            return half_decay(lay, var.device());
        }
        if var.rank() == 2 { Decay::All } else { Decay::None }
    }

    /// Random masks for `b` images: the flat indices (`b·N + n`) of the kept patches, and for
    /// every patch where it sits in the decoder's shuffled sequence (kept first, then masked),
    /// plus a `(B, N)` mask with 1 on the hidden patches.
    pub fn masks(&self, b: usize, rng: &mut rand::rngs::StdRng) -> Result<(Tensor, Tensor, Tensor)> {
        let n = self.encoder.grid() * self.encoder.grid();
        let device = self.encoder.device();
        let (mut keep, mut restore, mut hidden) =
            (Vec::with_capacity(b * self.keep), vec![0u32; b * n], vec![1f32; b * n]);
        let mut order: Vec<usize> = (0..n).collect();
        for i in 0..b {
            order.shuffle(rng);
            for (pos, &patch) in order.iter().enumerate() {
                restore[i * n + patch] = (i * n + pos) as u32;
            }
            for &patch in &order[..self.keep] {
                keep.push((i * n + patch) as u32);
                hidden[i * n + patch] = 0.0;
            }
        }
        Ok((
            Tensor::from_vec(keep, b * self.keep, device)?,
            Tensor::from_vec(restore, b * n, device)?,
            Tensor::from_vec(hidden, (b, n), device)?,
        ))
    }

    /// The reconstruction loss of normalised images `(B, C, S, S)` under the given masks.
    pub fn loss(&self, images: &Tensor, keep: &Tensor, restore: &Tensor, hidden: &Tensor) -> Result<Tensor> {
        Ok(self.forward(images, keep, restore, hidden)?.0)
    }

    /// The reconstruction loss, and with a head the class logits from the mean visible token.
    pub fn forward(
        &self,
        images: &Tensor,
        keep: &Tensor,
        restore: &Tensor,
        hidden: &Tensor,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let k = self.encoder.kernels;
        let (b, c, _, _) = images.dims4()?;
        let (g, p) = (self.encoder.grid(), self.encoder.cfg.patch_size);
        let (n, dd) = (g * g, self.decoder.cfg.embed_dim);
        let mut x = self.encoder.embed_visible(images, keep, self.keep)?;
        for i in 0..self.encoder.depth() {
            x = self.encoder.attn(i, &x, None)?;
            x = self.encoder.mlp(i, &x)?;
        }
        let x = self.encoder.final_norm(&x)?;
        let logits = match &self.head {
            Some((w, b)) => Some(ops::linear(
                k,
                &x.narrow(1, 1, self.keep)?.mean(1)?,
                &self.w(w),
                &self.w(b),
            )?),
            None => None,
        };
        let y = ops::linear(k, &x, &self.w(&self.embed_w), &self.w(&self.embed_b))?; // (B, 1+K, Dd)
        let cls = y.narrow(1, 0, 1)?;
        let vis = y.narrow(1, 1, self.keep)?;
        let masked = self
            .w(&self.mask_token)
            .broadcast_as((b, n - self.keep, dd))?
            .contiguous()?;
        let full = Tensor::cat(&[&vis, &masked], 1)?
            .reshape((b * n, dd))?
            .index_select(restore, 0)?
            .reshape((b, n, dd))?;
        let mut z = self.decoder.add_pos_embed(&Tensor::cat(&[&cls, &full], 1)?)?;
        for i in 0..self.decoder.depth() {
            z = self.decoder.attn(i, &z, None)?;
            z = self.decoder.mlp(i, &z)?;
        }
        let z = self.decoder.final_norm(&z)?.narrow(1, 1, n)?.contiguous()?;
        let pred = ops::linear(k, &z, &self.w(&self.pred_w), &self.w(&self.pred_b))?; // (B, N, p²C)
        let target = patchify(images, g, p, c)?;
        let err = (pred - target)?.sqr()?.mean(D::Minus1)?; // (B, N)
        // Every image hides the same number of patches.
        let recon = ((err * hidden)?.sum_all()? / (b * (n - self.keep)) as f64)?;
        Ok((recon, logits))
    }

    /// Class logits from every patch (no masking), with the SupMAE head; `None` without one.
    pub fn classify(&self, images: &Tensor) -> Result<Option<Tensor>> {
        let Some((w, b)) = &self.head else {
            return Ok(None);
        };
        let n = self.encoder.grid() * self.encoder.grid();
        let bsz = images.dim(0)?;
        let all = Tensor::arange(0u32, (bsz * n) as u32, images.device())?;
        let mut x = self.encoder.embed_visible(images, &all, n)?;
        for i in 0..self.encoder.depth() {
            x = self.encoder.attn(i, &x, None)?;
            x = self.encoder.mlp(i, &x)?;
        }
        let pooled = self.encoder.final_norm(&x)?.narrow(1, 1, n)?.mean(1)?;
        Ok(Some(ops::linear(
            self.encoder.kernels,
            &pooled,
            &self.w(w),
            &self.w(b),
        )?))
    }

    /// The encoder with the SupMAE classifier (if any) as its own head.
    #[must_use]
    pub fn into_encoder(self) -> Vit {
        let mut enc = self.encoder;
        if let Some((w, b)) = self.head {
            enc.set_head(w.as_tensor().detach(), b.as_tensor().detach());
        }
        enc
    }
}

/// `(B, C, S, S)` → `(B, N, p·p·C)` in timm/MAE patch order, each patch normalised by its own
/// mean and variance (ε 1e-6).
pub fn patchify(images: &Tensor, g: usize, p: usize, c: usize) -> candle_core::Result<Tensor> {
    let b = images.dim(0)?;
    let t = images
        .detach()
        .reshape((b, c, g, p, g, p))?
        .permute((0, 2, 4, 3, 5, 1))?
        .contiguous()?
        .reshape((b, g * g, p * p * c))?;
    let mean = t.mean_keepdim(D::Minus1)?;
    let centred = t.broadcast_sub(&mean)?;
    let var = centred.sqr()?.mean_keepdim(D::Minus1)?;
    centred.broadcast_div(&(var + 1e-6)?.sqrt()?)
}

fn log_line(file: &mut Option<std::fs::File>, v: &serde_json::Value) {
    if let Some(f) = file {
        // The log is a record for the user; a full disk must not stop the run here (the export
        // at the end reports its own errors).
        let _ = writeln!(f, "{v}");
    }
}

/// Runs the pretraining; `interrupt` stops it early (the outcome then has no encoder).
/// Runs on the calling thread's rayon pool.
pub fn pretrain(run: &MaeRun, interrupt: &Arc<AtomicBool>) -> Result<MaeOutcome> {
    let device = select_device(crate::train::config::DeviceChoice::Auto)?;
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
    let size = run.encoder.img_size as u32;
    let loader = Loader::spawn(
        train,
        &LoaderConfig {
            size,
            batch: run.batch,
            normalize,
            augment: run.augment,
            seed: run.seed,
        },
        (0, 0),
    )
    .map_err(|source| TrainError::Io {
        path: "moppa-loader".into(),
        source,
    })?;
    std::fs::create_dir_all(&run.run).map_err(|source| TrainError::Io {
        path: run.run.clone(),
        source,
    })?;
    let log_path = run.run.join("metrics.jsonl");
    let mut log = std::fs::File::create(&log_path).ok();
    if log.is_none() {
        eprintln!("warning: {}: cannot write the run log", log_path.display());
    }
    let mut opt = AdamW::new(model.vars(), |n, v| model.decay(n, v), run.weight_decay)?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(run.seed ^ 0x004d_4145);
    let start = Instant::now();
    let report_every = (per_epoch / 4).max(1);
    let (mut step, mut seen, mut loss_sum, mut loss_n) = (0u64, 0usize, 0f64, 0usize);
    let mut ce_sum = 0f64;
    let mut window = Instant::now();
    eprintln!(
        "MAE pretraining · encoder D {} × {} blocks, decoder D {} × {} · {} of {} patches visible · {} steps",
        run.encoder.embed_dim,
        run.encoder.depth,
        run.decoder.0,
        run.decoder.1,
        model.keep,
        run.encoder.grid() * run.encoder.grid(),
        total
    );
    while step < total {
        if interrupt.load(Ordering::Relaxed) {
            log_line(
                &mut log,
                &json!({"kind": "finished", "reason": "interrupted", "step": step, "time_s": start.elapsed().as_secs_f64()}),
            );
            return Ok(MaeOutcome {
                encoder: None,
                steps: step,
                val_loss: None,
                accuracy: None,
                classes: Vec::new(),
                seconds: start.elapsed().as_secs_f64(),
            });
        }
        let batch = match loader.recv_timeout(Duration::from_millis(200)) {
            None => continue,
            Some(LoaderMsg::Ready { usable, skipped }) => {
                if !skipped.is_empty() {
                    let (path, why) = &skipped[0];
                    eprintln!(
                        "warning: {} of {} training images could not be decoded and are left out (first: {}: {why})",
                        skipped.len(),
                        usable + skipped.len(),
                        path.display()
                    );
                    log_line(
                        &mut log,
                        &json!({"kind": "warning", "step": 0, "time_s": 0.0,
                        "message": format!("{} training images could not be decoded", skipped.len()), "path": path}),
                    );
                }
                continue;
            }
            Some(LoaderMsg::Failed(e)) => return Err(e.into()),
            Some(LoaderMsg::Batch(b)) => b,
        };
        let b = batch.labels.len();
        let images = Tensor::from_vec(batch.images, (b, 3, size as usize, size as usize), &device)?;
        let (keep, restore, hidden) = model.masks(b, &mut rng)?;
        let (recon, logits) = model.forward(&images, &keep, &restore, &hidden)?;
        let loss = match &logits {
            Some(logits) => {
                let labels = Tensor::from_vec(batch.labels, b, &device)?;
                let ce = cross_entropy(logits, &labels)?;
                ce_sum += f64::from(ce.to_scalar::<f32>()?);
                (&recon + (ce * run.supervised_weight)?)?
            }
            None => recon.clone(),
        };
        let grads = loss.backward()?;
        let lr = schedule(step, total, run.warmup, run.lr);
        let info = opt.step(&grads, lr, 1.0)?;
        let l = f64::from(recon.to_scalar::<f32>()?);
        if !info.finite || !l.is_finite() {
            log_line(
                &mut log,
                &json!({"kind": "finished", "reason": "diverged", "step": step, "time_s": start.elapsed().as_secs_f64()}),
            );
            return Err(TrainError::Config(format!(
                "MAE pretraining diverged at step {step} (loss {l}); try a lower --lr"
            )));
        }
        step += 1;
        seen += b;
        loss_sum += l;
        loss_n += 1;
        if step % report_every == 0 || step == total {
            let secs = window.elapsed().as_secs_f64();
            let img_s = seen as f64 / secs.max(1e-9);
            let mean = loss_sum / loss_n as f64;
            let t = start.elapsed().as_secs_f64();
            let ce = (classes > 0).then(|| ce_sum / loss_n as f64);
            let ce_text = ce.map(|c| format!(" · class loss {c:.4}")).unwrap_or_default();
            eprintln!(
                "step {step}/{total} · reconstruction loss {mean:.4}{ce_text} · lr {lr:.2e} · {img_s:.0} img/s · {t:.1} s"
            );
            log_line(
                &mut log,
                &json!({"kind": "progress", "step": step, "time_s": t, "loss": mean, "class_loss": ce, "lr": lr, "img_per_s": img_s}),
            );
            (seen, loss_sum, loss_n, ce_sum) = (0, 0.0, 0, 0.0);
            window = Instant::now();
        }
    }
    drop(loader);
    let eval_cfg = (size, &normalize, run.batch);
    let (val_loss, val_acc) = evaluate(&model, &val, eval_cfg, true, run.seed)?;
    if let Some(v) = val_loss {
        eprintln!("validation reconstruction loss {v:.4} ({} images)", val.len());
    }
    let accuracy = match val_acc {
        Some(v) => {
            let t = evaluate(&model, &test, eval_cfg, false, run.seed)?.1.unwrap_or(0.0);
            eprintln!("classifier accuracy: validation {v:.4}, test {t:.4}");
            Some((v, t))
        }
        None => None,
    };
    let seconds = start.elapsed().as_secs_f64();
    log_line(
        &mut log,
        &json!({"kind": "finished", "reason": "done", "step": step, "time_s": seconds, "val_loss": val_loss,
            "best_val_acc": accuracy.map(|a| a.0), "test_acc": accuracy.map(|a| a.1)}),
    );
    Ok(MaeOutcome {
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
    samples: &[data::Sample],
    (size, norm, batch): (u32, &Normalize, usize),
    recon: bool,
    seed: u64,
) -> Result<(Option<f64>, Option<f64>)> {
    if samples.is_empty() {
        return Ok((None, None));
    }
    model.set_grad_enabled(false);
    let mut set = data::loader::EvalSet::new(samples.to_vec(), size, 256 << 20);
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ 0x0056_414c);
    let (mut loss_sum, mut right, mut count) = (0f64, 0usize, 0usize);
    let mut has_head = false;
    let result = set.for_each_batch(batch, norm, |images, labels| -> Result<()> {
        let b = labels.len();
        let images = Tensor::from_vec(images, (b, 3, size as usize, size as usize), model.encoder.device())?;
        if recon {
            let (keep, restore, hidden) = model.masks(b, &mut rng)?;
            let l = model.loss(&images, &keep, &restore, &hidden)?.to_scalar::<f32>()?;
            loss_sum += f64::from(l) * b as f64;
        }
        if let Some(logits) = model.classify(&images)? {
            has_head = true;
            let pred: Vec<u32> = logits.argmax(1)?.to_vec1()?;
            right += pred.iter().zip(&labels).filter(|(p, l)| p == l).count();
        }
        count += b;
        Ok(())
    });
    model.set_grad_enabled(true);
    result?;
    if count == 0 {
        return Ok((None, None));
    }
    let n = count as f64;
    Ok((recon.then(|| loss_sum / n), has_head.then(|| right as f64 / n)))
}
