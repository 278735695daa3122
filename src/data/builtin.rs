//! `builtin:digits`: OpenCV's `digits.png` (5000 handwritten digits, 20×20, 500 per class;
//! Apache-2.0 AND BSD-3-Clause), embedded in the binary, with INTERFACES.md's fixed split: a
//! seeded (seed 0) shuffle within each class, 300 train / 100 val / 100 test per class.

use super::{DataError, Dataset, RawImage, Sample, Source};
use rand::SeedableRng as _;
use rand::seq::SliceRandom as _;
use std::path::Path;
use std::sync::Arc;

/// The PNG itself (2000×1000 grey; 100 columns × 50 rows of 20×20 cells, label = row / 5).
pub static DIGITS_PNG: &[u8] = include_bytes!("../../assets/digits.png");

/// The built-in digits task.
pub fn digits() -> Result<Dataset, DataError> {
    let path = Path::new("assets/digits.png (built in)");
    let img = image::load_from_memory_with_format(DIGITS_PNG, image::ImageFormat::Png)
        .map_err(|e| DataError::file(path, format!("cannot decode: {e}")))?
        .to_luma8();
    if img.dimensions() != (2000, 1000) {
        return Err(DataError::file(
            path,
            format!("expected 2000×1000 pixels, got {:?}", img.dimensions()),
        ));
    }
    let mut per_class: Vec<Vec<Sample>> = vec![Vec::new(); 10];
    for row in 0..50u32 {
        for col in 0..100u32 {
            let mut pixels = Vec::with_capacity(400);
            for y in 0..20 {
                for x in 0..20 {
                    pixels.push(img.get_pixel(col * 20 + x, row * 20 + y).0[0]);
                }
            }
            let label = row / 5;
            per_class[label as usize].push(Sample {
                source: Source::Memory(Arc::new(RawImage {
                    width: 20,
                    height: 20,
                    channels: 1,
                    pixels,
                })),
                label,
            });
        }
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(0);
    let (mut train, mut val, mut test) = (Vec::new(), Vec::new(), Vec::new());
    for mut samples in per_class {
        samples.shuffle(&mut rng);
        let rest = samples.split_off(300);
        train.extend(samples);
        let (v, t) = rest.split_at(100);
        val.extend_from_slice(v);
        test.extend_from_slice(t);
    }
    Ok(Dataset {
        spec: "builtin:digits".into(),
        classes: (0..10).map(|d| d.to_string()).collect(),
        train,
        val,
        test,
        skipped: Vec::new(),
        notes: Vec::new(),
    })
}
