//! From decoded pixels to the backbone's input: resize to S×S (bilinear), grey → RGB,
//! optional augmentation (random crop after padding, horizontal flip, small random rotations and
//! scalings), normalisation with the backbone's mean/std, CHW `f32`.

use super::{DataError, RawImage, Sample, Source};
use crate::config::{Augment, EvalCrop, Interpolation};
use image::imageops::FilterType;
use std::path::Path;

/// Per-channel normalisation (pixels scaled to 0..1 first).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Normalize {
    /// Mean.
    pub mean: [f32; 3],
    /// Std.
    pub std: [f32; 3],
}

/// An error's text made safe for one line of a message: printable characters only (a corrupt
/// file's bytes can end up in a decoder's error), at most 160 of them.
fn printable(text: &str) -> String {
    let clean: String = text
        .chars()
        .map(|c| if c.is_control() || c == '\u{fffd}' { '?' } else { c })
        .collect();
    if clean.chars().count() > 160 {
        format!("{}…", clean.chars().take(160).collect::<String>())
    } else {
        clean
    }
}

/// Whether JPEG bytes end with the end-of-image marker (`FF D9`, allowing a little trailing
/// padding): a file cut short decodes to a partly grey image without an error otherwise.
fn jpeg_complete(bytes: &[u8]) -> bool {
    let tail = &bytes[bytes.len().saturating_sub(64)..];
    tail.windows(2).any(|w| w == [0xFF, 0xD9])
}

/// Decodes a sample's pixels (files are read here, on the loader thread). Undecodable and
/// truncated files are errors naming the file.
pub fn decode(sample: &Sample) -> Result<RawImage, DataError> {
    match &sample.source {
        Source::Memory(img) => Ok((**img).clone()),
        Source::File(path) => {
            let bytes = std::fs::read(path).map_err(|e| DataError::file(path, e.to_string()))?;
            decode_bytes(path, &bytes)
        }
    }
}

/// Decodes an image file's contents (`path` names it in errors): PNG or JPEG, grey kept as one
/// channel; a truncated JPEG is an error.
pub fn decode_bytes(path: &Path, bytes: &[u8]) -> Result<RawImage, DataError> {
    let format = image::guess_format(bytes)
        .map_err(|e| DataError::file(path, format!("cannot decode: {}", printable(&e.to_string()))))?;
    if format == image::ImageFormat::Jpeg && !jpeg_complete(bytes) {
        return Err(DataError::file(path, "truncated JPEG (no end-of-image marker)"));
    }
    let img = image::load_from_memory_with_format(bytes, format)
        .map_err(|e| DataError::file(path, format!("cannot decode: {}", printable(&e.to_string()))))?;
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

/// How an image is brought to the backbone's square input.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Resize {
    /// The input side.
    pub size: u32,
    /// timm's evaluation resize and centre crop; `None`: stretched to the square
    /// ([`to_rgb_square`]).
    pub crop: Option<EvalCrop>,
}

impl Resize {
    /// Stretched to `size × size`.
    #[must_use]
    pub fn square(size: u32) -> Self {
        Self { size, crop: None }
    }
}

fn filter(i: Interpolation) -> FilterType {
    match i {
        Interpolation::Nearest => FilterType::Nearest,
        Interpolation::Bilinear => FilterType::Triangle,
        Interpolation::Bicubic => FilterType::CatmullRom,
        Interpolation::Lanczos => FilterType::Lanczos3,
    }
}

/// The image as `size × size` RGB, as `r` says: stretched, or (timm's evaluation transform) the
/// shorter side resized to `floor(size / crop_pct)` keeping the aspect ratio, then the centre
/// `size × size` cropped.
#[must_use]
pub fn to_rgb(img: &RawImage, r: &Resize) -> Vec<u8> {
    let Some(crop) = r.crop else {
        return to_rgb_square(img, r.size);
    };
    let rgb = rgb_image(img);
    let (w, h) = rgb.dimensions();
    if w == 0 || h == 0 {
        return vec![0; (r.size * r.size * 3) as usize];
    }
    let scale = ((f64::from(r.size) / crop.crop_pct).floor() as u32).max(r.size);
    // timm/torchvision: the shorter side to `scale`, the longer side int(scale · long / short).
    let (nw, nh) = if w <= h {
        (scale, (f64::from(scale) * f64::from(h) / f64::from(w)) as u32)
    } else {
        ((f64::from(scale) * f64::from(w) / f64::from(h)) as u32, scale)
    };
    let resized = if (nw, nh) == (w, h) {
        rgb
    } else {
        image::imageops::resize(&rgb, nw, nh, filter(crop.interpolation))
    };
    // torchvision's CenterCrop: offsets int(round((n - size) / 2)), Python's round (ties to even).
    let left = (f64::from(nw - r.size.min(nw)) / 2.0).round_ties_even() as u32;
    let top = (f64::from(nh - r.size.min(nh)) / 2.0).round_ties_even() as u32;
    image::imageops::crop_imm(&resized, left, top, r.size, r.size)
        .to_image()
        .into_raw()
}

fn rgb_image(img: &RawImage) -> image::RgbImage {
    if img.channels == 1 {
        image::GrayImage::from_raw(img.width, img.height, img.pixels.clone())
            .map(|g| image::DynamicImage::ImageLuma8(g).to_rgb8())
            .unwrap_or_default()
    } else {
        image::RgbImage::from_raw(img.width, img.height, img.pixels.clone()).unwrap_or_default()
    }
}

/// Resizes to `size × size` RGB (bilinear); grey is replicated to three channels.
#[must_use]
pub fn to_rgb_square(img: &RawImage, size: u32) -> Vec<u8> {
    let rgb = rgb_image(img);
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
        if a.rotate_deg > 0 || a.scale_pct > 0 {
            let r = f64::from(a.rotate_deg);
            let p = f64::from(a.scale_pct) / 100.0;
            let angle = if r > 0.0 {
                rng.random_range(-r..=r).to_radians()
            } else {
                0.0
            };
            let scale = if p > 0.0 {
                rng.random_range(1.0 - p..=1.0 + p)
            } else {
                1.0
            };
            let warp = Warp {
                angle,
                scale,
                dx: dx as f64,
                dy: dy as f64,
                flip,
            };
            warp_chw(rgb, size, norm, &warp, out);
            return;
        }
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

/// A similarity transform of the output grid: the output pixel at `p` shows the input at
/// `R(-angle) (p - c) / scale + c + (dx, dy)` (c the centre, x mirrored first when `flip`).
struct Warp {
    angle: f64,
    scale: f64,
    dx: f64,
    dy: f64,
    flip: bool,
}

/// [`write_chw`] through a [`Warp`], sampled bilinearly; outside the image is black (pixel 0).
fn warp_chw(rgb: &[u8], size: usize, norm: &Normalize, w: &Warp, out: &mut [f32]) {
    let c = (size as f64 - 1.0) / 2.0;
    let (sin, cos) = w.angle.sin_cos();
    let pixel = |x: i64, y: i64, ch: usize| -> f64 {
        if x < 0 || y < 0 || x >= size as i64 || y >= size as i64 {
            0.0
        } else {
            f64::from(rgb[((y as usize) * size + x as usize) * 3 + ch]) / 255.0
        }
    };
    for y in 0..size {
        for x in 0..size {
            let xo = if w.flip { size - 1 - x } else { x };
            let (u, v) = (xo as f64 - c, y as f64 - c);
            let sx = (cos * u + sin * v) / w.scale + c + w.dx;
            let sy = (-sin * u + cos * v) / w.scale + c + w.dy;
            let (x0, y0) = (sx.floor(), sy.floor());
            let (fx, fy) = (sx - x0, sy - y0);
            let (x0, y0) = (x0 as i64, y0 as i64);
            for ch in 0..3 {
                let top = pixel(x0, y0, ch) * (1.0 - fx) + pixel(x0 + 1, y0, ch) * fx;
                let bottom = pixel(x0, y0 + 1, ch) * (1.0 - fx) + pixel(x0 + 1, y0 + 1, ch) * fx;
                let v = top * (1.0 - fy) + bottom * fy;
                out[ch * size * size + y * size + x] = (v as f32 - norm.mean[ch]) / norm.std[ch];
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

#[cfg(test)]
mod tests {
    use super::*;

    const SIZE: usize = 7;
    const NORM: Normalize = Normalize {
        mean: [0.0; 3],
        std: [1.0; 3],
    };

    /// An asymmetric test image (every pixel and channel distinct).
    fn image() -> Vec<u8> {
        (0..SIZE * SIZE * 3).map(|i| (i * 5 % 251) as u8).collect()
    }

    fn warped(w: &Warp) -> Vec<f32> {
        let mut out = vec![0.0; 3 * SIZE * SIZE];
        warp_chw(&image(), SIZE, &NORM, w, &mut out);
        out
    }

    fn shifted(dx: i64, dy: i64, flip: bool) -> Vec<f32> {
        // The integer-crop path of write_chw, driven by a fixed crop/flip.
        let (img, s) = (image(), SIZE as i64);
        let mut out = vec![0.0; 3 * SIZE * SIZE];
        for c in 0..3 {
            for y in 0..s {
                for x in 0..s {
                    let sx = if flip { s - 1 - x } else { x } + dx;
                    let sy = y + dy;
                    out[c * SIZE * SIZE + (y * s + x) as usize] = if (0..s).contains(&sx) && (0..s).contains(&sy) {
                        f32::from(img[((sy * s + sx) * 3) as usize + c]) / 255.0
                    } else {
                        0.0
                    };
                }
            }
        }
        out
    }

    #[test]
    fn warp_without_rotation_or_zoom_is_the_integer_crop() {
        for (dx, dy, flip) in [(0, 0, false), (2, -1, false), (-2, 2, true)] {
            let w = Warp {
                angle: 0.0,
                scale: 1.0,
                dx: dx as f64,
                dy: dy as f64,
                flip,
            };
            let (a, b) = (warped(&w), shifted(dx, dy, flip));
            for (u, v) in a.iter().zip(&b) {
                assert!((u - v).abs() < 1e-6, "shift ({dx}, {dy}, flip {flip}): {u} vs {v}");
            }
        }
    }

    #[test]
    fn warp_rotates_a_quarter_turn_exactly_and_zooms_about_the_centre() {
        // 90°: output (x, y) shows input (c + v, c - u) with (u, v) = (x - c, y - c).
        let img = image();
        let out = warped(&Warp {
            angle: std::f64::consts::FRAC_PI_2,
            scale: 1.0,
            dx: 0.0,
            dy: 0.0,
            flip: false,
        });
        for y in 0..SIZE {
            for x in 0..SIZE {
                let (sx, sy) = (y, SIZE - 1 - x);
                let want = f32::from(img[(sy * SIZE + sx) * 3 + 1]) / 255.0;
                let got = out[SIZE * SIZE + y * SIZE + x];
                assert!((got - want).abs() < 1e-5, "({x}, {y}): {got} vs {want}");
            }
        }
        // Zoom 2: the centre pixel stays, its neighbour shows the half-way (bilinear) value.
        let out = warped(&Warp {
            angle: 0.0,
            scale: 2.0,
            dx: 0.0,
            dy: 0.0,
            flip: false,
        });
        let c = SIZE / 2;
        let at = |x: usize, y: usize| f32::from(img[(y * SIZE + x) * 3]) / 255.0;
        assert!((out[c * SIZE + c] - at(c, c)).abs() < 1e-6);
        let half = 0.5 * (at(c, c) + at(c + 1, c));
        assert!((out[c * SIZE + c + 2] - at(c + 1, c)).abs() < 1e-6);
        assert!((out[c * SIZE + c + 1] - half).abs() < 1e-6);
    }
}
