//! Image-scale transforms for the playground and `moppa apply`: orthonormal 2-D DCT-II of any
//! `H×W` plane with rustdct (fast, O(N log N) per row/column), and `apply_prior` per colour channel.
//!
//! At image scale `Λ` is in pixel units, so visible effects need larger coefficients than on a
//! token grid (e.g. κ·τ of 1–50 for a clear blur on a 512-pixel photo).

use super::{PhysicsError, Prior, PriorCoeffs, laplacian_eigenvalues};
use image::{DynamicImage, ImageBuffer, Luma, LumaA, Rgb, Rgba};
use rayon::prelude::*;
use rustdct::{DctPlanner, TransformType2And3};
use std::sync::Arc;

/// A planned orthonormal 2-D DCT-II / inverse for `H×W` planes of `f32`, row-major.
pub struct ImageDct {
    h: usize,
    w: usize,
    rows: Arc<dyn TransformType2And3<f32>>,
    cols: Arc<dyn TransformType2And3<f32>>,
}

impl ImageDct {
    /// Plans transforms of length `w` (rows) and `h` (columns).
    #[must_use]
    pub fn new(h: usize, w: usize) -> Self {
        let mut planner = DctPlanner::new();
        Self {
            h,
            w,
            rows: planner.plan_dct2(w.max(1)),
            cols: planner.plan_dct2(h.max(1)),
        }
    }

    fn check(&self, len: usize) -> Result<(), PhysicsError> {
        if len == self.h * self.w {
            Ok(())
        } else {
            Err(PhysicsError::Shape(format!(
                "plane has {len} values, expected {}×{}",
                self.h, self.w
            )))
        }
    }

    /// In-place orthonormal DCT-II of a plane: `Ẑ = C_H·Z·C_Wᵀ`.
    pub fn forward(&self, plane: &mut [f32]) -> Result<(), PhysicsError> {
        self.check(plane.len())?;
        Self::pass(plane, self.w, &self.rows, false);
        let mut t = transpose(plane, self.h, self.w);
        Self::pass(&mut t, self.h, &self.cols, false);
        plane.copy_from_slice(&transpose(&t, self.w, self.h));
        Ok(())
    }

    /// In-place inverse of [`Self::forward`]: `Z = C_Hᵀ·Ẑ·C_W`.
    pub fn inverse(&self, plane: &mut [f32]) -> Result<(), PhysicsError> {
        self.check(plane.len())?;
        let mut t = transpose(plane, self.h, self.w);
        Self::pass(&mut t, self.h, &self.cols, true);
        plane.copy_from_slice(&transpose(&t, self.w, self.h));
        Self::pass(plane, self.w, &self.rows, true);
        Ok(())
    }

    /// `IDCT2(G ⊙ DCT2(Z))` in place, with `gain` row-major `H×W`.
    pub fn filter(&self, plane: &mut [f32], gain: &[f32]) -> Result<(), PhysicsError> {
        self.check(gain.len())?;
        self.forward(plane)?;
        for (p, g) in plane.iter_mut().zip(gain) {
            *p *= g;
        }
        self.inverse(plane)
    }

    /// Orthonormal DCT-II (or its inverse, DCT-III) of every row of length `n`, in parallel.
    fn pass(data: &mut [f32], n: usize, plan: &Arc<dyn TransformType2And3<f32>>, inverse: bool) {
        let first = (1.0 / n as f64).sqrt() as f32;
        let rest = (2.0 / n as f64).sqrt() as f32;
        data.par_chunks_mut(n).for_each_init(
            || vec![0.0f32; plan.get_scratch_len()],
            |scratch, row| {
                if inverse {
                    // rustdct's DCT-III computes x_i = X_0/2 + Σ_{k≥1} X_k·cos(…): undo the
                    // orthonormal scaling first.
                    row[0] *= 2.0 * first;
                    for v in &mut row[1..] {
                        *v *= rest;
                    }
                    plan.process_dct3_with_scratch(row, scratch);
                } else {
                    plan.process_dct2_with_scratch(row, scratch);
                    row[0] *= first;
                    for v in &mut row[1..] {
                        *v *= rest;
                    }
                }
            },
        );
    }
}

fn transpose(data: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0.0; data.len()];
    for r in 0..rows {
        for c in 0..cols {
            out[c * rows + r] = data[r * cols + c];
        }
    }
    out
}

/// The gain of `prior` on an `h×w` pixel grid, as `f32` (source map all ones).
pub fn image_gain(prior: Prior, h: usize, w: usize, coeffs: &PriorCoeffs) -> Result<Vec<f32>, PhysicsError> {
    let lambda = laplacian_eigenvalues(h, w);
    let gain = super::filters::prior_gain(prior, &lambda, coeffs)?;
    Ok(gain.into_iter().map(|g| g as f32).collect())
}

/// Applies `prior` at full resolution to each colour channel of an image (alpha is kept as is),
/// clamping to the 8-bit range. Greyscale stays greyscale; 16-bit and float images come back as
/// 8-bit RGB(A).
pub fn apply_prior(image: &DynamicImage, prior: Prior, coeffs: &PriorCoeffs) -> Result<DynamicImage, PhysicsError> {
    let (w, h) = (image.width() as usize, image.height() as usize);
    let gain = image_gain(prior, h, w, coeffs)?;
    let dct = ImageDct::new(h, w);
    let (channels, colour, has_alpha): (Vec<Vec<f32>>, usize, bool) = match image {
        DynamicImage::ImageLuma8(_) => (split(image.to_luma8().as_raw(), 1), 1, false),
        DynamicImage::ImageLumaA8(_) => (split(image.to_luma_alpha8().as_raw(), 2), 1, true),
        DynamicImage::ImageRgb8(_) => (split(image.to_rgb8().as_raw(), 3), 3, false),
        _ if image.color().has_alpha() => (split(image.to_rgba8().as_raw(), 4), 3, true),
        _ => (split(image.to_rgb8().as_raw(), 3), 3, false),
    };
    let mut channels = channels;
    for plane in channels.iter_mut().take(colour) {
        dct.filter(plane, &gain)?;
    }
    let n = channels.len();
    let mut raw = vec![0u8; w * h * n];
    for (c, plane) in channels.iter().enumerate() {
        for (i, v) in plane.iter().enumerate() {
            raw[i * n + c] = to_u8(*v);
        }
    }
    let (w32, h32) = (image.width(), image.height());
    let bad = || PhysicsError::Shape("image buffer size".into());
    Ok(match (colour, has_alpha) {
        (1, false) => DynamicImage::ImageLuma8(ImageBuffer::<Luma<u8>, _>::from_raw(w32, h32, raw).ok_or_else(bad)?),
        (1, true) => DynamicImage::ImageLumaA8(ImageBuffer::<LumaA<u8>, _>::from_raw(w32, h32, raw).ok_or_else(bad)?),
        (_, false) => DynamicImage::ImageRgb8(ImageBuffer::<Rgb<u8>, _>::from_raw(w32, h32, raw).ok_or_else(bad)?),
        (_, true) => DynamicImage::ImageRgba8(ImageBuffer::<Rgba<u8>, _>::from_raw(w32, h32, raw).ok_or_else(bad)?),
    })
}

/// Splits interleaved 8-bit pixels into `n` planes of `f32` in `0..=255`.
fn split(raw: &[u8], n: usize) -> Vec<Vec<f32>> {
    let mut planes = vec![Vec::with_capacity(raw.len() / n); n];
    for px in raw.chunks_exact(n) {
        for (plane, &v) in planes.iter_mut().zip(px) {
            plane.push(f32::from(v));
        }
    }
    planes
}

fn to_u8(v: f32) -> u8 {
    v.round().clamp(0.0, 255.0) as u8
}
