//! Image folders on disk: ImageFolder trees (class subfolders, optionally under `train/`,
//! `val/`, `test/`) and VTAB-1K split files (`relative/path label` per line).
//!
//! Hygiene: a directory reached through symlinks is walked at most once (a link back up the tree
//! cannot loop or relabel other classes' images); the same file (canonical path) is never in two
//! splits (an evaluation split keeps it, training loses it); duplicate lines, label gaps, files
//! outside the task folder, empty splits and empty classes are counted in the dataset's notes.
//!
//! Bounds: a folder is walked only once it has a dataset's layout ([`check_folder_layout`]: a
//! look at its top and the top of each subfolder, never a walk), and every walk stops with an
//! error past [`MAX_WALK_DEPTH`] folders deep or [`MAX_WALK_ENTRIES`] entries listed, so a data
//! spec of `/` or a home folder is refused at once instead of reading the disk.

use super::{DataError, Dataset, MAX_CLASSES, Sample, Source, split_per_class};
use std::collections::HashSet;
use std::path::{Path, PathBuf};

const EXTENSIONS: [&str; 4] = ["png", "jpg", "jpeg", "JPEG"];

/// The deepest a walk goes below the folder it starts from.
pub const MAX_WALK_DEPTH: usize = 32;
/// The most directory entries one dataset walk lists (ImageNet-1k's training set is 1.3 M).
pub const MAX_WALK_ENTRIES: usize = 20_000_000;
/// Entries looked at near the top of each subfolder when judging a folder's layout.
const PEEK_ENTRIES: usize = 1024;
/// Subfolders of a class folder looked into when judging a folder's layout.
const PEEK_SUBFOLDERS: usize = 8;

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

/// The image files named by `paths` for prediction: a file is taken as it is (decoded by its
/// content, whatever its extension), a folder gives its PNG/JPEG files recursively (each directory
/// walked once, sorted by path; the walk bounded as a dataset's is). Missing paths and zero-byte
/// files come back apart with the reason, and so does a folder whose walk stopped at a bound.
#[must_use]
pub fn image_files(paths: &[PathBuf]) -> (Vec<PathBuf>, Vec<(PathBuf, String)>) {
    let mut files = Vec::new();
    let mut skipped = Vec::new();
    let mut walked = Walked::default();
    for p in paths {
        if p.is_dir() {
            if !walked.enter(p) {
                continue;
            }
            let mut found = Vec::new();
            let mut stack = vec![(p.clone(), 0)];
            while let Some((d, depth)) = stack.pop() {
                let listed = list_dir(&d).and_then(|entries| walked.listed(&d, depth, entries.len()).map(|()| entries));
                match listed {
                    Ok(entries) => {
                        for e in entries {
                            if e.is_dir() {
                                if walked.enter(&e) {
                                    stack.push((e, depth + 1));
                                }
                            } else if is_image(&e) {
                                found.push(e);
                            }
                        }
                    }
                    Err(e @ DataError::Spec(_)) => {
                        skipped.push((d.clone(), e.to_string()));
                        break;
                    }
                    Err(e) => skipped.push((d.clone(), e.to_string())),
                }
            }
            found.sort();
            files.extend(found);
        } else {
            files.push(p.clone());
        }
    }
    let (files, empty): (Vec<PathBuf>, Vec<PathBuf>) = files.into_iter().partition(|f| match std::fs::metadata(f) {
        Ok(m) => m.len() > 0,
        Err(_) => true, // reported by the decoder with the OS's reason
    });
    skipped.extend(empty.into_iter().map(|f| (f, "zero bytes".to_owned())));
    (files, skipped)
}

/// Class subfolders of `dir`, sorted by name.
fn class_dirs(dir: &Path) -> Result<Vec<PathBuf>, DataError> {
    Ok(list_dir(dir)?.into_iter().filter(|p| p.is_dir()).collect())
}

/// The directories already walked (canonical paths), so none is walked twice, and how much was
/// listed (the walk's bounds).
#[derive(Default)]
struct Walked {
    dirs: HashSet<PathBuf>,
    /// Subfolders passed over because they were walked already (symlink loops and aliases).
    repeats: Vec<PathBuf>,
    /// Directory entries listed so far.
    entries: usize,
}

impl Walked {
    /// Counts `n` entries listed in `dir`, `depth` folders below the walk's start: an error
    /// (`DataError::Spec`, naming the folder and the bound) past [`MAX_WALK_DEPTH`] or
    /// [`MAX_WALK_ENTRIES`].
    fn listed(&mut self, dir: &Path, depth: usize, n: usize) -> Result<(), DataError> {
        if depth > MAX_WALK_DEPTH {
            return Err(DataError::Spec(format!(
                "{}: more than {MAX_WALK_DEPTH} folders deep: not walked further (a dataset folder is shallower)",
                dir.display()
            )));
        }
        self.entries = self.entries.saturating_add(n);
        if self.entries > MAX_WALK_ENTRIES {
            return Err(DataError::Spec(format!(
                "{}: more than {MAX_WALK_ENTRIES} files and folders listed: not walked further (too many for a dataset folder)",
                dir.display()
            )));
        }
        Ok(())
    }

    /// Marks `dir` walked; false when it was already.
    fn enter(&mut self, dir: &Path) -> bool {
        let canon = dir.canonicalize().unwrap_or_else(|_| dir.to_owned());
        self.dirs.insert(canon)
    }
}

/// Image files of one class folder (recursively), zero-byte files set aside.
fn class_files(
    dir: &Path,
    label: u32,
    walked: &mut Walked,
    skipped: &mut Vec<(PathBuf, String)>,
) -> Result<Vec<Sample>, DataError> {
    let mut out = Vec::new();
    let mut stack = vec![(dir.to_owned(), 0)];
    while let Some((d, depth)) = stack.pop() {
        let entries = list_dir(&d)?;
        walked.listed(&d, depth, entries.len())?;
        for p in entries {
            if p.is_dir() {
                if walked.enter(&p) {
                    stack.push((p, depth + 1));
                } else {
                    walked.repeats.push(p);
                }
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

fn canonical(s: &Sample) -> Option<PathBuf> {
    match &s.source {
        Source::File(p) => Some(p.canonicalize().unwrap_or_else(|_| p.clone())),
        Source::Memory(_) => None,
    }
}

/// Keeps each file (canonical path) in one place: duplicates within a split are dropped, and a
/// file in an evaluation split is dropped from training (and from validation when it is also a
/// test image). With `final_split`, VTAB's train800val200 contains val200 by design: the
/// validation images stay in training then. Returns the notes.
fn dedupe(
    train: &mut Vec<Sample>,
    val: &mut Vec<Sample>,
    test: &mut Vec<Sample>,
    final_split: bool,
) -> Vec<(Option<PathBuf>, String)> {
    let mut notes = Vec::new();
    let mut within = 0;
    let mut unique = |v: &mut Vec<Sample>| {
        let mut seen = HashSet::new();
        let before = v.len();
        v.retain(|s| canonical(s).is_none_or(|c| seen.insert(c)));
        within += before - v.len();
        seen
    };
    let test_set = unique(test);
    let val_set = unique(val);
    let _ = unique(train);
    if within > 0 {
        notes.push((None, format!("{within} duplicate image(s) within a split left out")));
    }
    let mut drop_from = |v: &mut Vec<Sample>, others: &[&HashSet<PathBuf>], what: &str| {
        let before = v.len();
        v.retain(|s| canonical(s).is_none_or(|c| !others.iter().any(|o| o.contains(&c))));
        let n = before - v.len();
        if n > 0 {
            notes.push((
                None,
                format!("{n} image(s) of the {what} split are also in an evaluation split and were left out of {what}"),
            ));
        }
    };
    drop_from(val, &[&test_set], "validation");
    if final_split {
        drop_from(train, &[&test_set], "training");
    } else {
        drop_from(train, &[&test_set, &val_set], "training");
    }
    notes
}

/// Whether `dir` looks like a dataset folder (INTERFACES.md "Data specs"), judged without a walk:
/// VTAB-1K split files, a `train/` subfolder, or class subfolders of which at least half hold a
/// PNG/JPEG file at their top or one folder below (looking at most at [`PEEK_ENTRIES`] entries of
/// each). At most [`MAX_CLASSES`] subfolders. The error says what was expected.
pub fn check_folder_layout(dir: &Path) -> Result<(), DataError> {
    if dir.join("train800val200.txt").exists() || dir.join("train800.txt").exists() || dir.join("train").is_dir() {
        return Ok(());
    }
    let entries = std::fs::read_dir(dir).map_err(|e| DataError::file(dir, e.to_string()))?;
    let mut classes = Vec::new();
    for (n, e) in entries.filter_map(Result::ok).enumerate() {
        if n >= 2 * MAX_CLASSES {
            return Err(DataError::file(
                dir,
                format!(
                    "more than {} entries: not a dataset folder (at most {MAX_CLASSES} classes)",
                    2 * MAX_CLASSES
                ),
            ));
        }
        let p = e.path();
        if p.is_dir() && !e.file_name().to_string_lossy().starts_with('.') {
            classes.push(p);
            if classes.len() > MAX_CLASSES {
                return Err(DataError::file(
                    dir,
                    format!("more than {MAX_CLASSES} class subfolders (at most {MAX_CLASSES} classes)"),
                ));
            }
        }
    }
    let with_images = classes.iter().filter(|c| holds_images_near_top(c)).count();
    if classes.is_empty() || with_images * 2 < classes.len() {
        return Err(DataError::file(
            dir,
            format!(
                "no usable image (PNG or JPEG) near the top of {with_images} of its {} subfolder(s): not a dataset \
                 folder, not searched (expected VTAB-1K split files, train/ val/ test/, or one subfolder per class \
                 holding images)",
                classes.len()
            ),
        ));
    }
    Ok(())
}

/// Whether a PNG/JPEG file is among the first [`PEEK_ENTRIES`] entries of `dir` or of one of its
/// first [`PEEK_SUBFOLDERS`] subfolders.
fn holds_images_near_top(dir: &Path) -> bool {
    let peek = |d: &Path, subs: &mut Vec<PathBuf>| -> bool {
        let Ok(entries) = std::fs::read_dir(d) else {
            return false;
        };
        for e in entries.filter_map(Result::ok).take(PEEK_ENTRIES) {
            let p = e.path();
            if is_image(&p) && p.is_file() {
                return true;
            }
            if subs.len() < PEEK_SUBFOLDERS && p.is_dir() {
                subs.push(p);
            }
        }
        false
    };
    let mut subs = Vec::new();
    if peek(dir, &mut subs) {
        return true;
    }
    subs.iter().any(|s| peek(s, &mut Vec::new()))
}

/// An ImageFolder tree: `train/` (+ optional `val/`, `test/`) or class folders only (seeded
/// 80/10/10 split per class).
pub fn load_image_folder(dir: &Path, seed: u64) -> Result<Dataset, DataError> {
    let mut skipped = Vec::new();
    let mut aliased = 0;
    let mut walked = Walked::default();
    walked.enter(dir);
    let train_dir = dir.join("train");
    let (classes, mut train, mut val, mut test) = if train_dir.is_dir() {
        let classes = names(&class_dirs(&train_dir)?);
        if classes.is_empty() {
            return Err(DataError::file(&train_dir, "no class subfolders"));
        }
        if classes.len() > MAX_CLASSES {
            return Err(DataError::file(
                &train_dir,
                format!("{} class subfolders (at most {MAX_CLASSES} classes)", classes.len()),
            ));
        }
        for sub in ["train", "val", "test"] {
            let d = dir.join(sub);
            walked.enter(&d);
            if d.is_dir() {
                for cd in class_dirs(&d)? {
                    walked.enter(&cd);
                }
            }
        }
        let mut read = |sub: &str| -> Result<Vec<Sample>, DataError> {
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
                all.extend(class_files(&cd, label as u32, &mut walked, &mut skipped)?);
            }
            Ok(all)
        };
        let mut train = read("train")?;
        let mut val = read("val")?;
        let test = read("test")?;
        if val.is_empty() {
            // No val/: hold out a seeded 10% of train for model selection (the test split is
            // never used for that).
            (train, val, _) = split_per_class(&train, classes.len(), 0.1, 0.0, seed);
        }
        (classes, train, val, test)
    } else {
        let dirs = class_dirs(dir)?;
        let classes = names(&dirs);
        if classes.len() > MAX_CLASSES {
            return Err(DataError::file(
                dir,
                format!("{} class subfolders (at most {MAX_CLASSES} classes)", classes.len()),
            ));
        }
        if classes.is_empty() {
            return Err(DataError::file(
                dir,
                "no class subfolders (expected one folder per class, or train/ val/ test/)",
            ));
        }
        for cd in &dirs {
            walked.enter(cd);
        }
        let mut all = Vec::new();
        for (label, cd) in dirs.iter().enumerate() {
            all.extend(class_files(cd, label as u32, &mut walked, &mut skipped)?);
        }
        // One file reached under two class folders (a link) would be two labels: keep the first.
        let mut seen = HashSet::new();
        let before = all.len();
        all.retain(|s| canonical(s).is_none_or(|c| seen.insert(c)));
        aliased = before - all.len();
        let (train, val, test) = split_per_class(&all, classes.len(), 0.1, 0.1, seed);
        (classes, train, val, test)
    };
    if train.is_empty() {
        return Err(DataError::file(
            dir,
            "no usable image (PNG or JPEG) in the training split",
        ));
    }
    let mut notes = dedupe(&mut train, &mut val, &mut test, false);
    if aliased > 0 {
        notes.push((
            Some(dir.to_owned()),
            format!("{aliased} file(s) reached twice through links were counted once"),
        ));
    }
    if !walked.repeats.is_empty() {
        notes.push((
            walked.repeats.first().cloned(),
            format!(
                "{} folder(s) reached again through a link were not walked twice (first: {})",
                walked.repeats.len(),
                walked.repeats[0].display()
            ),
        ));
    }
    let mut ds = Dataset {
        spec: dir.display().to_string(),
        classes,
        train,
        val,
        test,
        skipped,
        notes,
    };
    ds.note_empty(true);
    Ok(ds)
}

/// One VTAB split file's usable lines (sample, line number) and what was odd about it.
struct SplitFile {
    rows: Vec<(Sample, usize)>,
    duplicates: usize,
    outside: usize,
}

/// Reads one VTAB split file: `relative/path label` per line (blank lines ignored).
fn read_split_file(dir: &Path, name: &str, skipped: &mut Vec<(PathBuf, String)>) -> Result<SplitFile, DataError> {
    let path = dir.join(name);
    let text = std::fs::read_to_string(&path).map_err(|e| DataError::file(&path, e.to_string()))?;
    let root = dir.canonicalize().unwrap_or_else(|_| dir.to_owned());
    let mut out = SplitFile {
        rows: Vec::new(),
        duplicates: 0,
        outside: 0,
    };
    let mut seen: HashSet<(String, u32)> = HashSet::new();
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
        if label as usize >= MAX_CLASSES {
            return Err(DataError::line(
                &path,
                line_no,
                format!(
                    "label {label} is beyond the bound on classes (at most {MAX_CLASSES}: labels 0..{})",
                    MAX_CLASSES - 1
                ),
            ));
        }
        let rel = rel.trim();
        if !seen.insert((rel.to_owned(), label)) {
            out.duplicates += 1;
            continue;
        }
        let file = dir.join(rel);
        match std::fs::metadata(&file) {
            Err(_) => {
                return Err(DataError::line(
                    &path,
                    line_no,
                    format!("image '{}' does not exist", file.display()),
                ));
            }
            Ok(m) if m.len() == 0 => skipped.push((file, "zero bytes".into())),
            Ok(_) => {
                if !file.canonicalize().is_ok_and(|c| c.starts_with(&root)) {
                    out.outside += 1;
                }
                out.rows.push((
                    Sample {
                        source: Source::File(file),
                        label,
                    },
                    line_no,
                ));
            }
        }
    }
    Ok(out)
}

/// A VTAB-1K task folder.
pub fn load_vtab(dir: &Path, final_split: bool) -> Result<Dataset, DataError> {
    let mut skipped = Vec::new();
    let mut notes = Vec::new();
    let train_file = if final_split {
        "train800val200.txt"
    } else {
        "train800.txt"
    };
    let train = read_split_file(dir, train_file, &mut skipped)?;
    if train.rows.is_empty() {
        return Err(DataError::file(&dir.join(train_file), "no usable image"));
    }
    let val = read_split_file(dir, "val200.txt", &mut skipped)?;
    let test = if dir.join("test.txt").exists() {
        read_split_file(dir, "test.txt", &mut skipped)?
    } else {
        notes.push((
            Some(dir.join("test.txt")),
            "no test.txt: the test split is empty (no test accuracy)".to_owned(),
        ));
        SplitFile {
            rows: Vec::new(),
            duplicates: 0,
            outside: 0,
        }
    };
    for (set, file) in [(&train, train_file), (&val, "val200.txt"), (&test, "test.txt")] {
        if set.duplicates > 0 {
            notes.push((
                Some(dir.join(file)),
                format!("{} duplicate line(s) in {file} were counted once", set.duplicates),
            ));
        }
        if set.outside > 0 {
            notes.push((
                Some(dir.join(file)),
                format!("{} line(s) of {file} name files outside the task folder", set.outside),
            ));
        }
    }
    // Classes are the labels seen in training; a label only in val/test is an error.
    let n = train.rows.iter().map(|(s, _)| s.label + 1).max().unwrap_or(0);
    for (set, file) in [(&val, "val200.txt"), (&test, "test.txt")] {
        if let Some((s, line)) = set.rows.iter().find(|(s, _)| s.label >= n) {
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
    let used: HashSet<u32> = train.rows.iter().map(|(s, _)| s.label).collect();
    if used.len() < n as usize {
        notes.push((
            Some(dir.join(train_file)),
            format!(
                "labels are not contiguous: {} distinct labels in 0..{} ({} classes have no training image)",
                used.len(),
                n - 1,
                n as usize - used.len()
            ),
        ));
    }
    let strip = |v: SplitFile| -> Vec<Sample> { v.rows.into_iter().map(|(s, _)| s).collect() };
    let (mut train, mut val, mut test) = (strip(train), strip(val), strip(test));
    notes.extend(dedupe(&mut train, &mut val, &mut test, final_split));
    let mut ds = Dataset {
        spec: dir.display().to_string(),
        classes: (0..n).map(|c| c.to_string()).collect(),
        train,
        val,
        test,
        skipped,
        notes,
    };
    ds.note_empty(false);
    Ok(ds)
}
