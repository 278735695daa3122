//! From decoded pixels to the backbone's input: resize to S×S (bilinear), grey → RGB,
//! optional augmentation (random crop after padding, horizontal flip), normalisation with the
//! backbone's mean/std, CHW `f32`.

use super::{DataError, RawImage, Sample, Source};
use image::imageops::FilterType;
use serde::{Deserialize, Serialize};

/// Per-channel normalisation (pixels scaled to 0..1 first).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Normalize {
    /// Mean.
    pub mean: [f32; 3],
    /// Std.
    pub std: [f32; 3],
}

/// Training-time augmentation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Augment {
    /// Random horizontal flips (off for digits and text).
    pub flip: bool,
    /// Random crops after zero-padding each side by this many pixels (0 = off).
    pub crop_pad: u32,
}

/// Decodes a sample's pixels (files are read here, on the loader thread).
pub fn decode(sample: &Sample) -> Result<RawImage, DataError> {
    match &sample.source {
        Source::Memory(img) => Ok((**img).clone()),
        Source::File(path) => {
            let img = image::ImageReader::open(path)
                .map_err(|e| DataError::file(path, e.to_string()))?
                .with_guessed_format()
                .map_err(|e| DataError::file(path, e.to_string()))?
                .decode()
                .map_err(|e| DataError::file(path, format!("cannot decode: {e}")))?;
            let grey = !img.color().has_color();
            Ok(if grey {
                let g = img.to_luma8();
                RawImage {
                    width: g.width(),
                    height: g.height(),
                    channels: 1,
                    pixels: g.into_raw(),
                }
            } else {
                let c = img.to_rgb8();
                RawImage {
                    width: c.width(),
                    height: c.height(),
                    channels: 3,
                    pixels: c.into_raw(),
                }
            })
        }
    }
}

/// Resizes to `size × size` RGB (bilinear); grey is replicated to three channels.
#[must_use]
pub fn to_rgb_square(img: &RawImage, size: u32) -> Vec<u8> {
    let rgb: image::RgbImage = if img.channels == 1 {
        image::GrayImage::from_raw(img.width, img.height, img.pixels.clone())
            .map(|g| image::DynamicImage::ImageLuma8(g).to_rgb8())
            .unwrap_or_default()
    } else {
        image::RgbImage::from_raw(img.width, img.height, img.pixels.clone()).unwrap_or_default()
    };
    if rgb.dimensions() == (size, size) {
        return rgb.into_raw();
    }
    image::imageops::resize(&rgb, size, size, FilterType::Triangle).into_raw()
}

/// Writes one image (`size × size` RGB u8) into `out` (3·size·size, CHW), normalised, with
/// optional augmentation drawn from `rng`.
pub fn write_chw<R: rand::Rng>(
    rgb: &[u8],
    size: usize,
    norm: &Normalize,
    augment: Option<(&Augment, &mut R)>,
    out: &mut [f32],
) {
    let (mut dx, mut dy, mut flip) = (0i64, 0i64, false);
    if let Some((a, rng)) = augment {
        if a.crop_pad > 0 {
            let p = i64::from(a.crop_pad);
            dx = rng.random_range(-p..=p);
            dy = rng.random_range(-p..=p);
        }
        flip = a.flip && rng.random_bool(0.5);
    }
    let s = size as i64;
    for c in 0..3 {
        let (m, sd) = (norm.mean[c], norm.std[c]);
        let zero = (0.0 - m) / sd;
        for y in 0..s {
            for x in 0..s {
                let sx = if flip { s - 1 - x } else { x } + dx;
                let sy = y + dy;
                let v = if (0..s).contains(&sx) && (0..s).contains(&sy) {
                    let v = f32::from(rgb[((sy * s + sx) * 3) as usize + c]) / 255.0;
                    (v - m) / sd
                } else {
                    zero
                };
                out[c * size * size + (y * s + x) as usize] = v;
            }
        }
    }
}

/// A small deterministic RNG for augmentation, one per (seed, epoch, batch).
#[must_use]
pub fn batch_rng(seed: u64, epoch: u64, batch: u64) -> rand::rngs::StdRng {
    use rand::SeedableRng as _;
    rand::rngs::StdRng::seed_from_u64(
        seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ epoch.wrapping_mul(0xC2B2_AE3D_27D4_EB4F) ^ batch,
    )
}
