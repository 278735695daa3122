//! `idx:DIR`: MNIST-style IDX files (plain or `.gz`): `train-images-idx3-ubyte`,
//! `train-labels-idx1-ubyte`, `t10k-images-idx3-ubyte`, `t10k-labels-idx1-ubyte`. Validation is
//! a seeded 10% of train. A folder whose path mentions "fashion" gets Fashion-MNIST's class names.

use super::{DataError, Dataset, RawImage, Sample, Source, split_per_class};
use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Fashion-MNIST's classes, in label order.
pub const FASHION_CLASSES: [&str; 10] = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
];

fn find(dir: &Path, stem: &str) -> Result<PathBuf, DataError> {
    for name in [stem.to_owned(), format!("{stem}.gz")] {
        let p = dir.join(&name);
        if p.exists() {
            return Ok(p);
        }
    }
    Err(DataError::file(&dir.join(stem), "missing (also looked for .gz)"))
}

fn read_all(path: &Path) -> Result<Vec<u8>, DataError> {
    let raw = std::fs::read(path).map_err(|e| DataError::file(path, e.to_string()))?;
    if path.extension().is_some_and(|e| e == "gz") {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(raw.as_slice())
            .read_to_end(&mut out)
            .map_err(|e| DataError::file(path, format!("cannot gunzip: {e}")))?;
        Ok(out)
    } else {
        Ok(raw)
    }
}

/// Parses an IDX file: returns the dimensions and the u8 payload.
pub fn parse(path: &Path, bytes: &[u8]) -> Result<(Vec<usize>, Vec<u8>), DataError> {
    if bytes.len() < 4 || bytes[0] != 0 || bytes[1] != 0 {
        return Err(DataError::file(path, "not an IDX file (bad magic number)"));
    }
    if bytes[2] != 0x08 {
        return Err(DataError::file(
            path,
            format!("IDX element type 0x{:02x} is not unsigned bytes", bytes[2]),
        ));
    }
    let nd = bytes[3] as usize;
    let header = 4 + 4 * nd;
    if bytes.len() < header {
        return Err(DataError::file(path, "truncated header"));
    }
    let dims: Vec<usize> = (0..nd)
        .map(|i| u32::from_be_bytes([bytes[4 + 4 * i], bytes[5 + 4 * i], bytes[6 + 4 * i], bytes[7 + 4 * i]]) as usize)
        .collect();
    let Some(n) = dims.iter().try_fold(1usize, |a, &d| a.checked_mul(d)) else {
        return Err(DataError::file(path, format!("dimensions {dims:?} are too large")));
    };
    if bytes.len() - header < n {
        return Err(DataError::file(
            path,
            format!(
                "truncated: the header says {dims:?} ({n} bytes), the file has {}",
                bytes.len() - header
            ),
        ));
    }
    Ok((dims, bytes[header..header + n].to_vec()))
}

fn read_split(dir: &Path, prefix: &str) -> Result<Vec<Sample>, DataError> {
    let ipath = find(dir, &format!("{prefix}-images-idx3-ubyte"))?;
    let lpath = find(dir, &format!("{prefix}-labels-idx1-ubyte"))?;
    let (idims, pixels) = parse(&ipath, &read_all(&ipath)?)?;
    let (ldims, labels) = parse(&lpath, &read_all(&lpath)?)?;
    let [n, h, w] = idims[..] else {
        return Err(DataError::file(
            &ipath,
            format!("expected 3 dimensions (N×H×W), got {idims:?}"),
        ));
    };
    if n == 0 || h == 0 || w == 0 {
        return Err(DataError::file(
            &ipath,
            format!("holds no image (dimensions {idims:?}: every one must be at least 1)"),
        ));
    }
    if ldims != [n] {
        return Err(DataError::file(
            &lpath,
            format!("{} labels for {n} images", ldims.first().copied().unwrap_or(0)),
        ));
    }
    if let Some(bad) = labels.iter().position(|&l| l > 9) {
        return Err(DataError::file(
            &lpath,
            format!("label {} at index {bad} is not a digit 0-9", labels[bad]),
        ));
    }
    Ok(pixels
        .chunks_exact(h * w)
        .zip(labels)
        .map(|(p, l)| Sample {
            source: Source::Memory(Arc::new(RawImage {
                width: w as u32,
                height: h as u32,
                channels: 1,
                pixels: p.to_vec(),
            })),
            label: u32::from(l),
        })
        .collect())
}

/// Loads `idx:DIR`.
pub fn load(dir: &Path, seed: u64) -> Result<Dataset, DataError> {
    if !dir.is_dir() {
        return Err(DataError::file(dir, "no such directory"));
    }
    let train_all = read_split(dir, "train")?;
    let test = read_split(dir, "t10k")?;
    let (train, val, _) = split_per_class(&train_all, 10, 0.1, 0.0, seed);
    let fashion = dir.to_string_lossy().to_lowercase().contains("fashion");
    let classes = if fashion {
        FASHION_CLASSES.iter().map(|s| (*s).to_owned()).collect()
    } else {
        (0..10).map(|d| d.to_string()).collect()
    };
    Ok(Dataset {
        spec: format!("idx:{}", dir.display()),
        classes,
        train,
        val,
        test,
        skipped: Vec::new(),
        notes: Vec::new(),
    })
}
