//! Datasets for fine-tuning: the built-in digits, IDX files (MNIST / Fashion-MNIST), ImageFolder
//! trees and VTAB-1K split files; decoding, resizing, normalisation, augmentation and a
//! background loader that assembles batches so the trainer never waits on disk.

mod builtin;
mod folder;
mod idx;
pub mod loader;
pub mod transform;

pub use builtin::{DIGITS_PNG, digits};
pub use folder::{MAX_WALK_DEPTH, MAX_WALK_ENTRIES, check_folder_layout, image_files};
pub use idx::parse as parse_idx;
pub use loader::{Batch, EvalSet, Loader, LoaderConfig, LoaderMsg};
pub use transform::Normalize;

use rand::SeedableRng as _;
use rand::seq::SliceRandom as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// A data problem, with the file (and line) it comes from.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// Something wrong with a file or a line in it.
    #[error("{}{}: {message}", path.display(), line.map(|l| format!(":{l}")).unwrap_or_default())]
    File {
        /// The file.
        path: PathBuf,
        /// 1-based line, for split files.
        line: Option<usize>,
        /// What is wrong.
        message: String,
    },
    /// A bad dataset spec or option.
    #[error("{0}")]
    Spec(String),
}

impl DataError {
    pub(crate) fn file(path: &Path, message: impl Into<String>) -> Self {
        Self::File {
            path: path.to_owned(),
            line: None,
            message: message.into(),
        }
    }

    pub(crate) fn line(path: &Path, line: usize, message: impl Into<String>) -> Self {
        Self::File {
            path: path.to_owned(),
            line: Some(line),
            message: message.into(),
        }
    }
}

/// A decoded image: 8-bit, 1 (grey) or 3 (RGB) channels, row-major interleaved.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RawImage {
    /// Width.
    pub width: u32,
    /// Height.
    pub height: u32,
    /// 1 or 3.
    pub channels: u8,
    /// Pixels.
    pub pixels: Vec<u8>,
}

/// Where a sample's pixels come from.
#[derive(Clone, Debug)]
pub enum Source {
    /// Decoded already (built-in, IDX).
    Memory(Arc<RawImage>),
    /// A PNG/JPEG file, decoded by the loader.
    File(PathBuf),
}

/// One labelled example.
#[derive(Clone, Debug)]
pub struct Sample {
    /// Pixels.
    pub source: Source,
    /// Class index.
    pub label: u32,
}

/// The three splits of a task.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Split {
    /// Training.
    Train,
    /// Validation (model selection).
    Val,
    /// Test (never used for selection).
    Test,
}

impl Split {
    /// Lower-case name.
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Self::Train => "train",
            Self::Val => "val",
            Self::Test => "test",
        }
    }
}

/// A task: class names and three splits.
#[derive(Clone, Debug)]
pub struct Dataset {
    /// What it was loaded from (`builtin:digits`, a folder).
    pub spec: String,
    /// Class names, index = label.
    pub classes: Vec<String>,
    /// Training samples.
    pub train: Vec<Sample>,
    /// Validation samples.
    pub val: Vec<Sample>,
    /// Test samples.
    pub test: Vec<Sample>,
    /// Files left out while building the lists (zero bytes), with the reason.
    pub skipped: Vec<(PathBuf, String)>,
    /// Things worth a warning (the file involved, if one): empty splits or classes, duplicates,
    /// label gaps, files outside the dataset folder, symlink loops; each with its count.
    pub notes: Vec<(Option<PathBuf>, String)>,
}

impl Dataset {
    /// The samples of a split.
    #[must_use]
    pub fn split(&self, s: Split) -> &[Sample] {
        match s {
            Split::Train => &self.train,
            Split::Val => &self.val,
            Split::Test => &self.test,
        }
    }

    /// Notes about empty evaluation splits and (with `classes`) classes without training images.
    pub(crate) fn note_empty(&mut self, classes: bool) {
        for (split, name) in [(Split::Val, "validation"), (Split::Test, "test")] {
            if self.split(split).is_empty() {
                self.notes
                    .push((None, format!("the {name} split of {} is empty", self.spec)));
            }
        }
        if !classes {
            return;
        }
        let counts = self.counts(Split::Train);
        let empty: Vec<&str> = self
            .classes
            .iter()
            .zip(&counts)
            .filter(|(_, n)| **n == 0)
            .map(|(c, _)| c.as_str())
            .collect();
        if !empty.is_empty() {
            let shown: Vec<&str> = empty.iter().take(5).copied().collect();
            self.notes.push((
                None,
                format!(
                    "{} of {} classes have no training image ({}{})",
                    empty.len(),
                    self.classes.len(),
                    shown.join(", "),
                    if empty.len() > 5 { ", …" } else { "" }
                ),
            ));
        }
    }

    /// Keeps `n` training samples per class (seeded choice); the other splits are unchanged.
    pub fn few_shot(&mut self, n: usize, seed: u64) -> Result<(), DataError> {
        if n == 0 {
            return Err(DataError::Spec("--few-shot must be ≥ 1".into()));
        }
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ 0x5eed_f3e5);
        let mut kept = Vec::new();
        for c in 0..self.classes.len() as u32 {
            let mut of_class: Vec<Sample> = self.train.iter().filter(|s| s.label == c).cloned().collect();
            of_class.shuffle(&mut rng);
            of_class.truncate(n);
            kept.extend(of_class);
        }
        self.train = kept;
        Ok(())
    }

    /// Samples per class in a split.
    #[must_use]
    pub fn counts(&self, s: Split) -> Vec<usize> {
        let mut c = vec![0; self.classes.len()];
        for x in self.split(s) {
            if let Some(v) = c.get_mut(x.label as usize) {
                *v += 1;
            }
        }
        c
    }
}

/// The most classes a dataset, a run record or a plan may have (INTERFACES.md "Bounds").
pub const MAX_CLASSES: usize = 100_000;

/// The built-in datasets' specs.
pub const BUILTIN_SPECS: [&str; 1] = ["builtin:digits"];

/// Checks a spec's form without reading anything: `builtin:` names a built-in dataset, `idx:`
/// has a folder. (Whether files exist and parse is for [`load`].)
pub fn check_spec(spec: &str) -> Result<(), String> {
    if spec.starts_with("builtin:") && !BUILTIN_SPECS.contains(&spec) {
        return Err(format!(
            "--data {spec}: no such built-in dataset (available: {})",
            BUILTIN_SPECS.join(", ")
        ));
    }
    if spec.is_empty() || spec == "idx:" {
        return Err(format!("--data '{spec}' names no folder"));
    }
    Ok(())
}

/// Loads a dataset from a spec (INTERFACES.md): `builtin:digits`, `idx:DIR`, or a directory with
/// VTAB-1K split files, `train/` (+ `val/`, `test/`) ImageFolders, or class folders only.
/// `final_split` trains on `train800val200.txt` for VTAB.
pub fn load(spec: &str, final_split: bool, seed: u64) -> Result<Dataset, DataError> {
    if let Some(name) = spec.strip_prefix("builtin:") {
        return match name {
            "digits" => digits(),
            other => Err(DataError::Spec(format!(
                "unknown built-in dataset '{other}' (available: builtin:digits)"
            ))),
        };
    }
    if let Some(dir) = spec.strip_prefix("idx:") {
        return idx::load(Path::new(dir), seed);
    }
    let dir = Path::new(spec);
    if !dir.exists() {
        return Err(DataError::file(
            dir,
            "no such directory (expected builtin:digits, idx:DIR or a folder)",
        ));
    }
    if !dir.is_dir() {
        return Err(DataError::file(dir, "not a directory"));
    }
    // Only a folder laid out as a dataset is walked (a spec of `/` must not read the disk).
    folder::check_folder_layout(dir)?;
    if dir.join("train800val200.txt").exists() || dir.join("train800.txt").exists() {
        return folder::load_vtab(dir, final_split);
    }
    folder::load_image_folder(dir, seed)
}

/// Splits `samples` per class with a seeded shuffle: `val_frac` and `test_frac` of each class go
/// to validation and test, the rest to training.
pub(crate) fn split_per_class(
    samples: &[Sample],
    classes: usize,
    val_frac: f64,
    test_frac: f64,
    seed: u64,
) -> (Vec<Sample>, Vec<Sample>, Vec<Sample>) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let (mut train, mut val, mut test) = (Vec::new(), Vec::new(), Vec::new());
    for c in 0..classes as u32 {
        let mut of_class: Vec<Sample> = samples.iter().filter(|s| s.label == c).cloned().collect();
        of_class.shuffle(&mut rng);
        let n = of_class.len();
        let n_val = ((n as f64) * val_frac).round() as usize;
        let n_test = (((n as f64) * test_frac).round() as usize).min(n - n_val.min(n));
        for (i, s) in of_class.into_iter().enumerate() {
            if i < n_val {
                val.push(s);
            } else if i < n_val + n_test {
                test.push(s);
            } else {
                train.push(s);
            }
        }
    }
    (train, val, test)
}
