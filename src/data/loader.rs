//! Background batch assembly: a named thread decodes and resizes the training split once (in
//! parallel), then produces shuffled, augmented, normalised batches into a small bounded
//! channel, so the trainer never waits on disk. Shuffling is seeded per epoch, so any position
//! (epoch, batch) can be resumed exactly.

use super::transform::{Normalize, Resize, batch_rng, decode, to_rgb, write_chw};
use super::{DataError, Sample};
use crate::config::Augment;
use crossbeam_channel::{Receiver, RecvTimeoutError, SendTimeoutError, bounded};
use rand::SeedableRng as _;
use rand::seq::SliceRandom as _;
use rayon::prelude::*;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// How batches are made.
#[derive(Clone, Debug)]
pub struct LoaderConfig {
    /// Side of the square input.
    pub size: u32,
    /// Images per batch (the last batch of an epoch may be smaller).
    pub batch: usize,
    /// The backbone's normalisation.
    pub normalize: Normalize,
    /// Training augmentation.
    pub augment: Augment,
    /// Seed of the shuffles and augmentations.
    pub seed: u64,
}

/// One training batch.
#[derive(Clone, Debug)]
pub struct Batch {
    /// `B × 3 × S × S`, normalised.
    pub images: Vec<f32>,
    /// Labels.
    pub labels: Vec<u32>,
    /// Epoch (0-based) this batch belongs to.
    pub epoch: u64,
    /// Index of this batch within its epoch.
    pub index: u64,
    /// Batches per epoch.
    pub per_epoch: u64,
}

/// What the loader thread says.
#[derive(Debug)]
pub enum LoaderMsg {
    /// Decoding finished: how many images are usable and which were skipped (path, reason).
    Ready {
        /// Usable training images.
        usable: usize,
        /// Undecodable files.
        skipped: Vec<(PathBuf, String)>,
    },
    /// A batch.
    Batch(Batch),
    /// Nothing usable: the run cannot start.
    Failed(DataError),
}

/// A decoded, resized image (RGB, `size × size`) and its label.
pub type Prepared = (Vec<u8>, u32);
/// A file that could not be used, and why.
pub type Skipped = (PathBuf, String);

/// Decodes and resizes samples in parallel; failures are returned apart.
#[must_use]
pub fn prepare_all(samples: &[Sample], resize: &Resize) -> (Vec<Prepared>, Vec<Skipped>) {
    let (ok, bad) = prepare_indexed(samples, resize, 0);
    (ok.into_iter().map(|(_, p)| p).collect(), bad)
}

/// [`prepare_all`], each usable image with its index (`first` + its position in `samples`).
#[must_use]
pub fn prepare_indexed(samples: &[Sample], resize: &Resize, first: usize) -> (Vec<(usize, Prepared)>, Vec<Skipped>) {
    let results: Vec<Result<Prepared, Skipped>> = samples
        .par_iter()
        .map(|s| match decode(s) {
            Ok(img) => Ok((to_rgb(&img, resize), s.label)),
            Err(DataError::File { path, message, .. }) => Err((path, message)),
            Err(e) => Err((PathBuf::new(), e.to_string())),
        })
        .collect();
    let mut ok = Vec::with_capacity(results.len());
    let mut bad = Vec::new();
    for (i, r) in results.into_iter().enumerate() {
        match r {
            Ok(v) => ok.push((first + i, v)),
            Err(e) => bad.push(e),
        }
    }
    (ok, bad)
}

/// Writes a batch of prepared images as normalised CHW floats.
#[must_use]
pub fn assemble(images: &[&[u8]], size: u32, norm: &Normalize, augment: Option<(&Augment, u64, u64, u64)>) -> Vec<f32> {
    let s = size as usize;
    let per = 3 * s * s;
    let mut out = vec![0.0f32; images.len() * per];
    match augment {
        Some((a, seed, epoch, batch)) => {
            let mut rng = batch_rng(seed, epoch, batch);
            for (img, o) in images.iter().zip(out.chunks_exact_mut(per)) {
                write_chw(img, s, norm, Some((a, &mut rng)), o);
            }
        }
        None => {
            out.par_chunks_mut(per)
                .zip(images.par_iter())
                .for_each(|(o, img)| write_chw::<rand::rngs::StdRng>(img, s, norm, None, o));
        }
    }
    out
}

/// The training-batch producer.
pub struct Loader {
    rx: Receiver<LoaderMsg>,
    stop: Arc<AtomicBool>,
    join: Option<std::thread::JoinHandle<()>>,
}

impl Loader {
    /// Starts the loader thread at `(epoch, batch)`.
    pub fn spawn(samples: Vec<Sample>, cfg: &LoaderConfig, start: (u64, u64)) -> std::io::Result<Self> {
        let cfg = cfg.clone();
        let (tx, rx) = bounded(4);
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let join = std::thread::Builder::new().name("moppa-loader".into()).spawn(move || {
            let send = |mut msg: LoaderMsg| -> bool {
                loop {
                    if stop2.load(Ordering::Relaxed) {
                        return false;
                    }
                    match tx.send_timeout(msg, Duration::from_millis(50)) {
                        Ok(()) => return true,
                        Err(SendTimeoutError::Timeout(m)) => msg = m,
                        Err(SendTimeoutError::Disconnected(_)) => return false,
                    }
                }
            };
            // A panic while preparing or assembling batches reaches the trainer as a failure
            // with its message, not as a silent end of the batches.
            let produced = crate::panics::catch(|| {
                let (prepared, skipped) = prepare_all(&samples, &Resize::square(cfg.size));
                if prepared.is_empty() {
                    let msg = format!("no usable training image ({} could not be decoded)", skipped.len());
                    send(LoaderMsg::Failed(match skipped.first() {
                        Some((path, _)) => DataError::file(path, msg),
                        None => DataError::Spec("the training split is empty".into()),
                    }));
                    return;
                }
                if !send(LoaderMsg::Ready {
                    usable: prepared.len(),
                    skipped,
                }) {
                    return;
                }
                let n = prepared.len();
                let per_epoch = n.div_ceil(cfg.batch) as u64;
                let (mut epoch, mut index) = start;
                loop {
                    let mut order: Vec<usize> = (0..n).collect();
                    let mut rng =
                        rand::rngs::StdRng::seed_from_u64(cfg.seed ^ epoch.wrapping_mul(0x2545_F491_4F6C_DD1D));
                    order.shuffle(&mut rng);
                    while index < per_epoch {
                        let lo = index as usize * cfg.batch;
                        let ids = &order[lo..(lo + cfg.batch).min(n)];
                        assert!(
                            !crate::panics::fault("loader-panic", index),
                            "fault injection: the data loader panics at batch {index}"
                        );
                        let imgs: Vec<&[u8]> = ids.iter().map(|&i| prepared[i].0.as_slice()).collect();
                        let aug = cfg.augment.is_on().then_some((&cfg.augment, cfg.seed, epoch, index));
                        let batch = Batch {
                            images: assemble(&imgs, cfg.size, &cfg.normalize, aug),
                            labels: ids.iter().map(|&i| prepared[i].1).collect(),
                            epoch,
                            index,
                            per_epoch,
                        };
                        if !send(LoaderMsg::Batch(batch)) {
                            return;
                        }
                        index += 1;
                    }
                    epoch += 1;
                    index = 0;
                }
            });
            if let Err(message) = produced {
                send(LoaderMsg::Failed(DataError::Spec(format!(
                    "the data loader panicked: {message}"
                ))));
            }
        })?;
        Ok(Self {
            rx,
            stop,
            join: Some(join),
        })
    }

    /// The next message, waiting at most `timeout`; `None` on timeout.
    #[must_use]
    pub fn recv_timeout(&self, timeout: Duration) -> Option<LoaderMsg> {
        match self.rx.recv_timeout(timeout) {
            Ok(m) => Some(m),
            Err(RecvTimeoutError::Timeout) => None,
            Err(RecvTimeoutError::Disconnected) => {
                Some(LoaderMsg::Failed(DataError::Spec("the data loader stopped".to_owned())))
            }
        }
    }
}

impl Drop for Loader {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(j) = self.join.take() {
            j.join().ok();
        }
    }
}

/// One batch of an [`EvalSet`].
pub struct EvalBatch<'a> {
    /// Normalised CHW floats.
    pub pixels: Vec<f32>,
    /// Labels.
    pub labels: Vec<u32>,
    /// Each image's index in the split (skipped files leave gaps).
    pub index: Vec<usize>,
    /// Each image as the model sees it before normalisation: RGB, `size × size`.
    pub rgb: Vec<&'a [u8]>,
}

/// A validation or test split ready for evaluation: prepared once, kept in memory when it fits
/// `budget_bytes`, else decoded again per pass.
pub struct EvalSet {
    samples: Vec<Sample>,
    resize: Resize,
    cache: Option<Vec<(usize, Prepared)>>,
    /// Files that could not be decoded (reported once).
    pub skipped: Vec<(PathBuf, String)>,
}

impl EvalSet {
    /// Prepares `samples` (decoding them now if they fit the budget).
    #[must_use]
    pub fn new(samples: Vec<Sample>, resize: Resize, budget_bytes: usize) -> Self {
        let size = resize.size as usize;
        let fits = samples.len() * size * size * 3 <= budget_bytes;
        let (cache, skipped) = if fits {
            let (ok, bad) = prepare_indexed(&samples, &resize, 0);
            (Some(ok), bad)
        } else {
            (None, Vec::new())
        };
        Self {
            samples,
            resize,
            cache,
            skipped,
        }
    }

    /// The samples at `indices` (in that order, each at most once, out-of-range ones left out)
    /// as a set of their own, indexed from 0; prepared images are copied, not decoded again.
    #[must_use]
    pub fn subset(&self, indices: &[usize]) -> Self {
        let picked: Vec<usize> = indices.iter().copied().filter(|&i| i < self.samples.len()).collect();
        let samples = picked.iter().map(|&i| self.samples[i].clone()).collect();
        let cache = self.cache.as_ref().map(|c| {
            picked
                .iter()
                .enumerate()
                .filter_map(|(j, &i)| {
                    let at = c.binary_search_by_key(&i, |(k, _)| *k).ok()?;
                    Some((j, c[at].1.clone()))
                })
                .collect()
        });
        Self {
            samples,
            resize: self.resize,
            cache,
            skipped: Vec::new(),
        }
    }

    /// Number of samples (before skips).
    #[must_use]
    pub fn len(&self) -> usize {
        self.samples.len()
    }

    /// True when the split is empty.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }

    /// The prepared RGB pixels and label of sample `i` (for probe images).
    #[must_use]
    pub fn rgb(&self, i: usize) -> Option<(Vec<u8>, u32)> {
        if let Some(c) = &self.cache {
            let at = c.binary_search_by_key(&i, |(k, _)| *k).ok()?;
            Some(c[at].1.clone())
        } else {
            let s = self.samples.get(i)?;
            decode(s).ok().map(|img| (to_rgb(&img, &self.resize), s.label))
        }
    }

    /// Runs `f` on normalised batches `(images, labels)` in order.
    pub fn for_each_batch<E>(
        &mut self,
        batch: usize,
        norm: &Normalize,
        mut f: impl FnMut(Vec<f32>, Vec<u32>) -> Result<(), E>,
    ) -> Result<(), E> {
        self.for_each_indexed(batch, norm, |b| f(b.pixels, b.labels))
    }

    /// Runs `f` on every batch in order, with each image's index and unnormalised pixels.
    pub fn for_each_indexed<E>(
        &mut self,
        batch: usize,
        norm: &Normalize,
        mut f: impl FnMut(EvalBatch<'_>) -> Result<(), E>,
    ) -> Result<(), E> {
        let batch = batch.max(1);
        let size = self.resize.size;
        if let Some(cache) = &self.cache {
            for chunk in cache.chunks(batch) {
                f(batch_of(chunk, size, norm))?;
            }
            return Ok(());
        }
        let mut skipped = Vec::new();
        for (c, chunk) in self.samples.chunks(batch).enumerate() {
            let (ok, bad) = prepare_indexed(chunk, &self.resize, c * batch);
            skipped.extend(bad);
            if ok.is_empty() {
                continue;
            }
            f(batch_of(&ok, size, norm))?;
        }
        self.skipped = skipped;
        Ok(())
    }
}

/// One batch of prepared images with their indices.
fn batch_of<'c>(chunk: &'c [(usize, Prepared)], size: u32, norm: &Normalize) -> EvalBatch<'c> {
    let rgb: Vec<&[u8]> = chunk.iter().map(|(_, (p, _))| p.as_slice()).collect();
    EvalBatch {
        pixels: assemble(&rgb, size, norm, None),
        labels: chunk.iter().map(|(_, (_, l))| *l).collect(),
        index: chunk.iter().map(|(i, _)| *i).collect(),
        rgb,
    }
}
