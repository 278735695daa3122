//! Image folders on disk: ImageFolder trees (class subfolders, optionally under `train/`,
//! `val/`, `test/`) and VTAB-1K split files (`relative/path label` per line).

use super::{DataError, Dataset, Sample, Source, split_per_class};
use std::path::{Path, PathBuf};

const EXTENSIONS: [&str; 4] = ["png", "jpg", "jpeg", "JPEG"];

fn is_image(p: &Path) -> bool {
    p.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| EXTENSIONS.iter().any(|x| x.eq_ignore_ascii_case(e)))
}

fn list_dir(dir: &Path) -> Result<Vec<PathBuf>, DataError> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| DataError::file(dir, e.to_string()))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .collect();
    v.sort();
    Ok(v)
}

/// Class subfolders of `dir`, sorted by name.
fn class_dirs(dir: &Path) -> Result<Vec<PathBuf>, DataError> {
    Ok(list_dir(dir)?.into_iter().filter(|p| p.is_dir()).collect())
}

/// Image files of one class folder (recursively), zero-byte files set aside.
fn class_files(dir: &Path, label: u32, skipped: &mut Vec<(PathBuf, String)>) -> Result<Vec<Sample>, DataError> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for p in list_dir(&d)? {
            if p.is_dir() {
                stack.push(p);
            } else if is_image(&p) {
                match std::fs::metadata(&p) {
                    Ok(m) if m.len() == 0 => skipped.push((p, "zero bytes".into())),
                    Ok(_) => out.push(Sample {
                        source: Source::File(p),
                        label,
                    }),
                    Err(e) => skipped.push((p, e.to_string())),
                }
            }
        }
    }
    out.sort_by(|a, b| match (&a.source, &b.source) {
        (Source::File(x), Source::File(y)) => x.cmp(y),
        _ => std::cmp::Ordering::Equal,
    });
    Ok(out)
}

fn names(dirs: &[PathBuf]) -> Vec<String> {
    dirs.iter()
        .map(|d| {
            d.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
        })
        .collect()
}

/// An ImageFolder tree: `train/` (+ optional `val/`, `test/`) or class folders only (seeded
/// 80/10/10 split per class).
pub fn load_image_folder(dir: &Path, seed: u64) -> Result<Dataset, DataError> {
    let mut skipped = Vec::new();
    let train_dir = dir.join("train");
    let (classes, train, val, test) = if train_dir.is_dir() {
        let classes = names(&class_dirs(&train_dir)?);
        if classes.is_empty() {
            return Err(DataError::file(&train_dir, "no class subfolders"));
        }
        let read = |sub: &str, skipped: &mut Vec<(PathBuf, String)>| -> Result<Vec<Sample>, DataError> {
            let d = dir.join(sub);
            if !d.is_dir() {
                return Ok(Vec::new());
            }
            let mut all = Vec::new();
            for cd in class_dirs(&d)? {
                let name = names(std::slice::from_ref(&cd)).remove(0);
                let Some(label) = classes.iter().position(|c| *c == name) else {
                    return Err(DataError::file(&cd, format!("class '{name}' does not exist in train/")));
                };
                all.extend(class_files(&cd, label as u32, skipped)?);
            }
            Ok(all)
        };
        let mut train = read("train", &mut skipped)?;
        let mut val = read("val", &mut skipped)?;
        let test = read("test", &mut skipped)?;
        if val.is_empty() {
            // No val/: hold out a seeded 10% of train for model selection (the test split is
            // never used for that).
            (train, val, _) = split_per_class(&train, classes.len(), 0.1, 0.0, seed);
        }
        (classes, train, val, test)
    } else {
        let dirs = class_dirs(dir)?;
        let classes = names(&dirs);
        if classes.is_empty() {
            return Err(DataError::file(
                dir,
                "no class subfolders (expected one folder per class, or train/ val/ test/)",
            ));
        }
        let mut all = Vec::new();
        for (label, cd) in dirs.iter().enumerate() {
            all.extend(class_files(cd, label as u32, &mut skipped)?);
        }
        let (train, val, test) = split_per_class(&all, classes.len(), 0.1, 0.1, seed);
        (classes, train, val, test)
    };
    if train.is_empty() {
        return Err(DataError::file(
            dir,
            "no usable image (PNG or JPEG) in the training split",
        ));
    }
    Ok(Dataset {
        spec: dir.display().to_string(),
        classes,
        train,
        val,
        test,
        skipped,
    })
}

/// Reads one VTAB split file: `relative/path label` per line (blank lines ignored).
fn read_split_file(
    dir: &Path,
    name: &str,
    skipped: &mut Vec<(PathBuf, String)>,
) -> Result<Vec<(Sample, usize)>, DataError> {
    let path = dir.join(name);
    let text = std::fs::read_to_string(&path).map_err(|e| DataError::file(&path, e.to_string()))?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line_no = i + 1;
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let Some((rel, label)) = line.rsplit_once(char::is_whitespace) else {
            return Err(DataError::line(
                &path,
                line_no,
                format!("expected 'relative/path label', got '{line}'"),
            ));
        };
        let label: u32 = label.trim().parse().map_err(|_| {
            DataError::line(
                &path,
                line_no,
                format!("label '{}' is not a non-negative integer", label.trim()),
            )
        })?;
        let file = dir.join(rel.trim());
        match std::fs::metadata(&file) {
            Err(_) => {
                return Err(DataError::line(
                    &path,
                    line_no,
                    format!("image '{}' does not exist", file.display()),
                ));
            }
            Ok(m) if m.len() == 0 => skipped.push((file, "zero bytes".into())),
            Ok(_) => out.push((
                Sample {
                    source: Source::File(file),
                    label,
                },
                line_no,
            )),
        }
    }
    Ok(out)
}

/// A VTAB-1K task folder.
pub fn load_vtab(dir: &Path, final_split: bool) -> Result<Dataset, DataError> {
    let mut skipped = Vec::new();
    let train_file = if final_split {
        "train800val200.txt"
    } else {
        "train800.txt"
    };
    let train = read_split_file(dir, train_file, &mut skipped)?;
    let val = read_split_file(dir, "val200.txt", &mut skipped)?;
    let test = if dir.join("test.txt").exists() {
        read_split_file(dir, "test.txt", &mut skipped)?
    } else {
        Vec::new()
    };
    // Classes are the labels seen in training; a label only in val/test is an error.
    let n = train.iter().map(|(s, _)| s.label + 1).max().unwrap_or(0);
    for (set, file) in [(&val, "val200.txt"), (&test, "test.txt")] {
        if let Some((s, line)) = set.iter().find(|(s, _)| s.label >= n) {
            return Err(DataError::line(
                &dir.join(file),
                *line,
                format!(
                    "unknown label {} (training labels are 0..{})",
                    s.label,
                    n.saturating_sub(1)
                ),
            ));
        }
    }
    if train.is_empty() {
        return Err(DataError::file(&dir.join(train_file), "no usable image"));
    }
    let strip = |v: Vec<(Sample, usize)>| v.into_iter().map(|(s, _)| s).collect();
    Ok(Dataset {
        spec: dir.display().to_string(),
        classes: (0..n).map(|c| c.to_string()).collect(),
        train: strip(train),
        val: strip(val),
        test: strip(test),
        skipped,
    })
}
