//! The MoPPA spectral mixing as one op: `y_b = Σ_p α_p ⊙ Kᵀ·(G_pᵀ ⊙ (K·Z_b))` for every image
//! `b`, where `K = C_H ⊗ C_W` is the 2-D DCT of a row-major grid and `Z_b (HW × r)` holds the
//! `r` channels of the patch tokens. One node in candle's graph instead of about fifteen, with an
//! explicit backward for `Z`, the gains `G (k, r, HW)` and the router weights `α`.

use super::cpu::gemm::{Par, View, gemm};
use super::cpu::pool::{give_all, take};
use candle_core::{CpuStorage, CustomOp3, Device, Layout, Result, Shape, Storage, Tensor, bail};
use rayon::prelude::*;
use std::sync::{Arc, Mutex};

/// Saved activations: `Ẑ (B, HW, r)` and every `Y_p (B, k, HW, r)`.
struct Cache {
    z_hat: Vec<f32>,
    y: Vec<f32>,
}

impl Drop for Cache {
    fn drop(&mut self) {
        give_all([std::mem::take(&mut self.z_hat), std::mem::take(&mut self.y)]);
    }
}

/// The op. Arguments: `Z (B, HW, r)`, `G (k, r, HW)`, `α` shaped `(B, HW, k)` (token router),
/// `(B, 1, k)` (image), `(1, 1, k)` (layer) or `(1, 1, 1)` (a single prior).
pub struct SpectralMixOp {
    /// `K`, row-major `HW × HW`.
    pub kron: Arc<Vec<f32>>,
    /// Keep activations for backward.
    pub save: bool,
    cache: Mutex<Option<Cache>>,
}

impl SpectralMixOp {
    /// A new op for the DCT matrix `kron` (`HW × HW`).
    #[must_use]
    pub fn new(kron: Arc<Vec<f32>>, save: bool) -> Self {
        Self {
            kron,
            save,
            cache: Mutex::new(None),
        }
    }
}

/// Strides of α over images and tokens (0 when broadcast).
fn alpha_strides(dims: &[usize], b: usize, hw: usize, k: usize) -> Result<(usize, usize)> {
    match dims {
        [ab, at, ak] if *ak == k && (*ab == b || *ab == 1) && (*at == hw || *at == 1) => {
            Ok((if *ab == 1 { 0 } else { at * ak }, if *at == 1 { 0 } else { *ak }))
        }
        _ => bail!("spectral mix: router weights {dims:?} do not fit ({b}, {hw}, {k})"),
    }
}

fn slice<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<&'a [f32]> {
    let data = s.as_slice::<f32>()?;
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => bail!("spectral mix: {what} must be contiguous"),
    }
}

impl CustomOp3 for SpectralMixOp {
    fn name(&self) -> &'static str {
        "moppa-spectral-mix"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (b, hw, r) = l1.shape().dims3()?;
        let (k, r2, hw2) = l2.shape().dims3()?;
        if r2 != r || hw2 != hw || self.kron.len() != hw * hw {
            bail!(
                "spectral mix: Z {:?}, gains {:?}, K {} do not fit",
                l1.shape(),
                l2.shape(),
                self.kron.len()
            );
        }
        let (z, g, a) = (slice(s1, l1, "Z")?, slice(s2, l2, "gains")?, slice(s3, l3, "alpha")?);
        let (sab, sat) = alpha_strides(l3.shape().dims(), b, hw, k)?;
        let kron = self.kron.as_slice();
        let mut z_hat = take(b * hw * r);
        let mut y_all = take(b * k * hw * r);
        let mut out = take(b * hw * r);
        z_hat
            .par_chunks_mut(hw * r)
            .zip(y_all.par_chunks_mut(k * hw * r))
            .zip(out.par_chunks_mut(hw * r))
            .zip(z.par_chunks(hw * r))
            .enumerate()
            .for_each_init(
                || vec![0f32; hw * r],
                |filtered, (bi, (((zh, yb), ob), zb))| {
                    // Ẑ = K·Z_b
                    gemm(
                        hw,
                        r,
                        hw,
                        View::rows(kron, hw),
                        View::rows(zb, r),
                        zh,
                        r,
                        false,
                        Par::Serial,
                    );
                    ob.fill(0.0);
                    for p in 0..k {
                        let gp = &g[p * r * hw..(p + 1) * r * hw];
                        for t in 0..hw {
                            for j in 0..r {
                                filtered[t * r + j] = zh[t * r + j] * gp[j * hw + t];
                            }
                        }
                        // Y_p = Kᵀ·(G_pᵀ ⊙ Ẑ)
                        let yp = &mut yb[p * hw * r..(p + 1) * hw * r];
                        gemm(
                            hw,
                            r,
                            hw,
                            View::t(kron, hw),
                            View::rows(filtered, r),
                            yp,
                            r,
                            false,
                            Par::Serial,
                        );
                        for t in 0..hw {
                            let w = a[bi * sab + t * sat + p];
                            for j in 0..r {
                                ob[t * r + j] += w * yp[t * r + j];
                            }
                        }
                    }
                },
            );
        if self.save {
            *self.cache.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(Cache { z_hat, y: y_all });
        } else {
            give_all([z_hat, y_all]);
        }
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        z: &Tensor,
        g: &Tensor,
        alpha: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let Some(cache) = self
            .cache
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take()
        else {
            bail!("spectral mix: backward without saved activations")
        };
        let (b, hw, r) = z.dims3()?;
        let k = g.dim(0)?;
        let adims = alpha.dims().to_vec();
        let (sab, sat) = alpha_strides(&adims, b, hw, k)?;
        let kron = self.kron.as_slice();
        let (g, alpha, grad) = (g.contiguous()?, alpha.contiguous()?, grad.contiguous()?);
        let (gs, _) = g.storage_and_layout();
        let (als, _) = alpha.storage_and_layout();
        let (grs, gl) = grad.storage_and_layout();
        let (Storage::Cpu(gs), Storage::Cpu(als), Storage::Cpu(grs)) = (&*gs, &*als, &*grs) else {
            bail!("spectral mix: CPU tensors expected")
        };
        let gv = gs.as_slice::<f32>()?;
        let av = als.as_slice::<f32>()?;
        let dy = slice(grs, gl, "grad")?;
        // Per image: dZ_b, its share of dG (k·r·HW) and dα_b (HW·k).
        let per: Vec<(Vec<f32>, Vec<f32>, Vec<f32>)> = (0..b)
            .into_par_iter()
            .map(|bi| {
                let dyb = &dy[bi * hw * r..(bi + 1) * hw * r];
                let zh = &cache.z_hat[bi * hw * r..(bi + 1) * hw * r];
                let yb = &cache.y[bi * k * hw * r..(bi + 1) * k * hw * r];
                let mut dalpha = vec![0f32; hw * k];
                let mut dg = vec![0f32; k * r * hw];
                let mut dz_hat = vec![0f32; hw * r];
                let mut dyp = vec![0f32; hw * r];
                let mut df = vec![0f32; hw * r];
                for p in 0..k {
                    let yp = &yb[p * hw * r..(p + 1) * hw * r];
                    for t in 0..hw {
                        let w = av[bi * sab + t * sat + p];
                        let mut s = 0f32;
                        for j in 0..r {
                            s += dyb[t * r + j] * yp[t * r + j];
                            dyp[t * r + j] = w * dyb[t * r + j];
                        }
                        dalpha[t * k + p] = s;
                    }
                    // dF_p = K·dY_p (the transpose of Y_p = Kᵀ·F_p)
                    gemm(
                        hw,
                        r,
                        hw,
                        View::rows(kron, hw),
                        View::rows(&dyp, r),
                        &mut df,
                        r,
                        false,
                        Par::Serial,
                    );
                    let gp = &gv[p * r * hw..(p + 1) * r * hw];
                    let dgp = &mut dg[p * r * hw..(p + 1) * r * hw];
                    for t in 0..hw {
                        for j in 0..r {
                            dgp[j * hw + t] += df[t * r + j] * zh[t * r + j];
                            dz_hat[t * r + j] += df[t * r + j] * gp[j * hw + t];
                        }
                    }
                }
                // dZ = Kᵀ·dẐ
                let mut dz = vec![0f32; hw * r];
                gemm(
                    hw,
                    r,
                    hw,
                    View::t(kron, hw),
                    View::rows(&dz_hat, r),
                    &mut dz,
                    r,
                    false,
                    Par::Serial,
                );
                (dz, dg, dalpha)
            })
            .collect();
        let mut dz = Vec::with_capacity(b * hw * r);
        let mut dg = vec![0f32; k * r * hw];
        let mut dalpha_full = Vec::with_capacity(b * hw * k);
        for (z_b, g_b, a_b) in per {
            dz.extend_from_slice(&z_b);
            for (acc, v) in dg.iter_mut().zip(&g_b) {
                *acc += v;
            }
            dalpha_full.extend_from_slice(&a_b);
        }
        // Sum α's gradient over broadcast dimensions.
        let dalpha: Vec<f32> = match (sab == 0, sat == 0) {
            (false, false) => dalpha_full,
            (false, true) => (0..b)
                .flat_map(|bi| (0..k).map(move |p| (bi, p)))
                .map(|(bi, p)| (0..hw).map(|t| dalpha_full[(bi * hw + t) * k + p]).sum())
                .collect(),
            (true, true) => (0..k)
                .map(|p| (0..b * hw).map(|i| dalpha_full[i * k + p]).sum())
                .collect(),
            (true, false) => (0..hw * k)
                .map(|i| (0..b).map(|bi| dalpha_full[bi * hw * k + i]).sum())
                .collect(),
        };
        let dev = Device::Cpu;
        let dz = z
            .track_op()
            .then(|| Tensor::from_vec(dz, z.shape(), &dev))
            .transpose()?;
        let dg = g
            .track_op()
            .then(|| Tensor::from_vec(dg, g.shape(), &dev))
            .transpose()?;
        let da = alpha
            .track_op()
            .then(|| Tensor::from_vec(dalpha, adims.as_slice(), &dev))
            .transpose()?;
        Ok((dz, dg, da))
    }
}
