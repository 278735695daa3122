//! Work the app does itself for a run, each on a thread of its own and polled every frame: a
//! prior ablation of a saved adapter (a run opened from its folder, or one whose worker is gone),
//! and the pixels of validation images (the misclassified gallery, the probe of a folder run).
//! Neither writes into the run folder.

use crate::config::{RunConfig, VitConfig};
use crate::train::evaluate::AdapterAblation;
use crate::train::protocol::Rgb;
use crate::train::worker::Waker;
use crossbeam_channel::{Receiver, Sender, bounded};
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

/// The app's own jobs for one run.
#[derive(Default)]
pub struct RunJobs {
    /// An ablation of the saved adapter in progress.
    pub ablation: Option<AblationJob>,
    /// Validation images, decoded as asked.
    pub images: Option<ValImages>,
}

/// A prior ablation of a run folder's saved adapter on a thread of its own.
pub struct AblationJob {
    cancel: Arc<AtomicBool>,
    progress: Arc<Mutex<(usize, usize)>>,
    result: Receiver<Result<AdapterAblation, String>>,
}

impl AblationJob {
    /// Ablates `dir`'s adapter on `images` validation images; `wake` is called on progress and
    /// at the end.
    ///
    /// # Errors
    /// When no thread could be started.
    pub fn spawn(dir: PathBuf, images: usize, wake: Waker) -> Result<Self, String> {
        let cancel = Arc::new(AtomicBool::new(false));
        let progress = Arc::new(Mutex::new((0, 0)));
        let (tx, result) = bounded(1);
        let (c, p) = (cancel.clone(), progress.clone());
        std::thread::Builder::new()
            .name("moppa-ablation".into())
            .spawn(move || {
                let stop = || c.load(Ordering::Relaxed);
                let mut report = |done: usize, total: usize| {
                    if let Ok(mut g) = p.lock() {
                        *g = (done, total);
                    }
                    wake();
                };
                let r = crate::train::evaluate::ablate_run(&dir, images, &stop, &mut report).map_err(|e| {
                    if matches!(e, crate::train::error::TrainError::Cancelled) {
                        "ablation cancelled".to_owned()
                    } else {
                        format!("ablation of {}: {e}", dir.display())
                    }
                });
                tx.send(r).ok();
                wake();
            })
            .map_err(|e| format!("cannot start the ablation thread: {e}"))?;
        Ok(Self {
            cancel,
            progress,
            result,
        })
    }

    /// Asks it to stop (it answers "cancelled" soon after).
    pub fn cancel(&self) {
        self.cancel.store(true, Ordering::Relaxed);
    }

    /// Passes done of all.
    #[must_use]
    pub fn progress(&self) -> (usize, usize) {
        self.progress.lock().map_or((0, 0), |g| *g)
    }

    /// Its result once it ended (never blocks).
    #[must_use]
    pub fn try_result(&self) -> Option<Result<AdapterAblation, String>> {
        self.result.try_recv().ok()
    }
}

impl Drop for AblationJob {
    fn drop(&mut self) {
        self.cancel();
    }
}

/// One validation image: its label and pixels as evaluation prepares them (the backbone's input
/// size and crop), and a small RGBA thumbnail.
#[derive(Clone, Debug)]
pub struct ValImage {
    /// Its class.
    pub label: u32,
    /// At the backbone's input size.
    pub rgb: Rgb,
    /// RGBA, `side × side`.
    pub thumb: Vec<u8>,
    /// The thumbnail's side.
    pub side: usize,
}

/// What the loader answers.
enum Answer {
    Image(usize, Box<ValImage>),
    Missing(usize),
    Failed(String),
}

/// Requests (and answers) waiting at most.
const REQUESTS: usize = 64;

/// The side of gallery thumbnails (pixels, at most).
pub const THUMB_SIDE: usize = 96;

/// Validation images of a run's data, read on a thread of its own (the data loaded once, at the
/// first request); each image decoded once.
pub struct ValImages {
    requests: Sender<usize>,
    answers: Receiver<Answer>,
    asked: HashSet<usize>,
    /// The images decoded (`None`: not in the split, or unreadable).
    pub got: HashMap<usize, Option<ValImage>>,
    /// Why the data cannot be read here, once known.
    pub error: Option<String>,
}

/// Where a run's data spec comes from: its folder's `config.toml` (relative paths located as
/// `moppa eval` does), else its configuration as recorded.
pub struct DataOf {
    /// The run folder, when on this machine.
    pub dir: Option<PathBuf>,
    /// The run's configuration.
    pub config: Option<RunConfig>,
    /// Its backbone (input size and crop).
    pub backbone: VitConfig,
}

impl ValImages {
    /// A loader for the run described by `of`; `wake` is called as images arrive.
    #[must_use]
    pub fn spawn(of: DataOf, wake: Waker) -> Self {
        let (requests, rx) = bounded::<usize>(REQUESTS);
        let (tx, answers) = bounded(REQUESTS);
        let spawned = std::thread::Builder::new()
            .name("moppa-val-images".into())
            .spawn(move || load_images(&of, &rx, &tx, &wake));
        let mut me = Self {
            requests,
            answers,
            asked: HashSet::new(),
            got: HashMap::new(),
            error: None,
        };
        if let Err(e) = spawned {
            me.error = Some(format!("cannot start the image thread: {e}"));
        }
        me
    }

    /// Asks for the images `indices` not asked yet.
    pub fn want(&mut self, indices: impl IntoIterator<Item = usize>) {
        for i in indices {
            // One the queue cannot take now is asked again next time.
            if self.error.is_none() && self.asked.insert(i) && self.requests.try_send(i).is_err() {
                self.asked.remove(&i);
            }
        }
    }

    /// Takes what the thread answered since.
    pub fn poll(&mut self) {
        while let Ok(a) = self.answers.try_recv() {
            match a {
                Answer::Image(i, img) => {
                    self.got.insert(i, Some(*img));
                }
                Answer::Missing(i) => {
                    self.got.insert(i, None);
                }
                Answer::Failed(e) => self.error = Some(e),
            }
        }
    }

    /// Image `i`, once decoded.
    #[must_use]
    pub fn get(&self, i: usize) -> Option<&ValImage> {
        self.got.get(&i).and_then(Option::as_ref)
    }
}

/// The loader's thread: the data once, then each image asked.
fn load_images(of: &DataOf, rx: &Receiver<usize>, tx: &Sender<Answer>, wake: &Waker) {
    let cfg = match &of.dir {
        Some(d) if d.join(crate::train::runfolder::CONFIG_TOML).is_file() => {
            crate::train::evaluate::run_config_noted(d).map(|c| c.0).ok()
        }
        _ => None,
    }
    .or_else(|| of.config.clone());
    let Some(cfg) = cfg else {
        tx.send(Answer::Failed("the run's configuration is unknown here".into()))
            .ok();
        wake();
        return;
    };
    let val = match crate::data::load(&cfg.data, cfg.final_split, cfg.seed) {
        Ok(d) => d.val,
        Err(e) => {
            tx.send(Answer::Failed(format!("data {} cannot be read here: {e}", cfg.data)))
                .ok();
            wake();
            return;
        }
    };
    let resize = crate::data::transform::Resize {
        size: of.backbone.img_size as u32,
        crop: of.backbone.eval_crop,
    };
    for i in rx {
        let img = val.get(i).and_then(|s| {
            let raw = crate::data::transform::decode(s).ok()?;
            let pixels = crate::data::transform::to_rgb(&raw, &resize);
            let size = of.backbone.img_size;
            Some(ValImage {
                label: s.label,
                thumb: thumbnail(&pixels, size),
                side: size.min(THUMB_SIDE),
                rgb: Rgb { size, pixels },
            })
        });
        let answer = img.map_or(Answer::Missing(i), |v| Answer::Image(i, Box::new(v)));
        if tx.send(answer).is_err() {
            return;
        }
        wake();
    }
}

/// A square RGB image (`side`) as RGBA at most [`THUMB_SIDE`] wide (nearest neighbour).
fn thumbnail(rgb: &[u8], side: usize) -> Vec<u8> {
    let t = side.min(THUMB_SIDE);
    if t == 0 || rgb.len() < side * side * 3 {
        return vec![0; t * t * 4];
    }
    let mut out = Vec::with_capacity(t * t * 4);
    for y in 0..t {
        for x in 0..t {
            let (sy, sx) = (y * side / t, x * side / t);
            let at = (sy * side + sx) * 3;
            out.extend_from_slice(&[rgb[at], rgb[at + 1], rgb[at + 2], 255]);
        }
    }
    out
}

/// The run folder whose saved adapter an ablation can use: `dir` when it holds one.
#[must_use]
pub fn adapter_folder(dir: &Path) -> Option<PathBuf> {
    dir.join(crate::train::runfolder::ADAPTER)
        .is_file()
        .then(|| dir.to_owned())
}
