//! The masked autoencoder (He et al., "Masked Autoencoders Are Scalable Vision Learners", 2021)
//! that `moppa pretrain --objective mae` trains: the encoder sees a random `1 − mask_ratio` of the
//! patches (plus the class token), a small transformer decoder gets the encoded patches back in
//! place with a learned mask token everywhere else, and the loss is the mean squared error of the
//! predicted pixels of the masked patches, each patch normalised by its own mean and variance
//! (MAE's `norm_pix_loss`). The encoder is the same [`Vit`] as everywhere else (same fused ops
//! and backward passes); the decoder is one too, built without a patch embedding input. With a
//! classifier (SupMAE, Liang et al. 2022) the mean visible token is also classified.
//! The training loop is `train::pretrain::mae`.

use super::error::{ModelError, Result};
use super::ops;
use super::vit::Vit;
use crate::config::VitConfig;
use candle_core::{D, DType, Device, Tensor, Var};
use rand::seq::SliceRandom as _;
use rand::{Rng as _, SeedableRng as _};

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
            return Err(ModelError::Config(format!(
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

    /// The half-block layouts of the network a trainable tensor belongs to (decoder or encoder).
    #[must_use]
    pub fn layouts_of(&self, name: &str) -> (&ops::HalfLayout, &ops::HalfLayout) {
        if name.starts_with("decoder.") {
            self.decoder.layouts()
        } else {
            self.encoder.layouts()
        }
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
            x = self.encoder.mlp(i, &x, None)?;
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
            z = self.decoder.mlp(i, &z, None)?;
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
            x = self.encoder.mlp(i, &x, None)?;
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

impl super::GradMode for Mae {
    fn set_grad_enabled(&self, on: bool) {
        self.encoder.set_grad_enabled(on);
        self.decoder.set_grad_enabled(on);
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
