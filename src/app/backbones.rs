//! The backbone picker's state: where the backbone comes from (built-in, the Hugging Face cache, a
//! hub id to download, a file), the cached models, the chosen backbone's description, and a
//! download running on its own thread with progress and Cancel. Descriptions come from `train`
//! (headers only); the app never loads weights here.

use crate::train::backbone::{BackboneSummary, CachedBackbone, describe_backbone, list_backbones};
use crate::train::hub::{DownloadProgress, Hub, HubId};
use crate::train::worker::Waker;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

/// Where the backbone comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Source {
    /// The built-in backbone.
    #[default]
    Builtin,
    /// A model in the Hugging Face cache.
    Cache,
    /// A hub id, downloaded into the cache.
    Hub,
    /// A `.safetensors` file.
    File,
}

impl Source {
    /// The source a backbone spec implies.
    #[must_use]
    pub fn of(spec: &str) -> Self {
        if spec == "builtin" {
            Self::Builtin
        } else if spec.starts_with("hf:") {
            Self::Cache
        } else {
            Self::File
        }
    }
}

/// A download's progress, shared with its thread.
#[derive(Clone, Debug, Default)]
pub struct DownloadStatus {
    /// The id being downloaded.
    pub spec: String,
    /// The file now arriving.
    pub file: String,
    /// Its size, bytes.
    pub total: u64,
    /// Bytes so far.
    pub done: u64,
    /// `Some` when over: `Ok(spec)` or the error to show.
    pub result: Option<Result<String, String>>,
}

/// The payload that unwinds a cancelled download out of hf-hub's copy loop (without a panic
/// message: `resume_unwind` skips the panic hook).
struct Cancelled;

struct Progress {
    status: Arc<Mutex<DownloadStatus>>,
    cancel: Arc<AtomicBool>,
    wake: Waker,
}

impl Progress {
    fn update(&self, f: impl FnOnce(&mut DownloadStatus)) {
        if let Ok(mut s) = self.status.lock() {
            f(&mut s);
        }
        (self.wake)();
    }
}

impl DownloadProgress for Progress {
    fn start(&mut self, file: &str, total: u64) {
        self.update(|s| {
            file.clone_into(&mut s.file);
            s.total = total;
            s.done = 0;
        });
    }
    fn advance(&mut self, bytes: u64) {
        if self.cancel.load(Ordering::Relaxed) {
            // The part downloaded stays as blobs/HASH.part; the next try resumes it.
            std::panic::resume_unwind(Box::new(Cancelled));
        }
        self.update(|s| s.done += bytes);
    }
    fn finish(&mut self) {}
}

/// A download in flight.
pub struct Download {
    /// Its progress.
    pub status: Arc<Mutex<DownloadStatus>>,
    cancel: Arc<AtomicBool>,
}

impl Download {
    /// A copy of its progress.
    #[must_use]
    pub fn snapshot(&self) -> DownloadStatus {
        self.status.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// Asks the download to stop at its next chunk.
    pub fn cancel(&self) {
        self.cancel.store(true, Ordering::Relaxed);
    }
}

/// The picker's state (not persisted; the chosen spec lives in the run settings).
pub struct BackbonePicker {
    /// The cache and hub the picker uses (the environment's; tests point it elsewhere).
    pub hub: Hub,
    /// The source shown.
    pub source: Source,
    /// The search text over the cached models.
    pub search: String,
    /// The hub id typed.
    pub hub_id: String,
    /// The cached models (`None`: not listed yet).
    pub cached: Option<Vec<CachedBackbone>>,
    /// The download in flight.
    pub download: Option<Download>,
    /// The last download's failure (shown under the hub id).
    pub message: Option<String>,
    summary: Option<(String, Option<usize>, Result<BackboneSummary, String>)>,
}

impl Default for BackbonePicker {
    fn default() -> Self {
        Self {
            hub: Hub::from_env(),
            source: Source::default(),
            search: String::new(),
            hub_id: "hf:timm/".into(),
            cached: None,
            download: None,
            message: None,
            summary: None,
        }
    }
}

impl BackbonePicker {
    /// Lists the cache again.
    pub fn refresh(&mut self) {
        self.cached = Some(list_backbones(&self.hub));
        self.summary = None;
    }

    /// The cached models, listed on first use.
    pub fn cached(&mut self) -> &[CachedBackbone] {
        if self.cached.is_none() {
            self.refresh();
        }
        self.cached.as_deref().unwrap_or_default()
    }

    /// What `spec` is (memoised per spec and head count; headers only, never the network).
    pub fn summary(&mut self, spec: &str, heads: Option<usize>) -> &Result<BackboneSummary, String> {
        let stale = self.summary.as_ref().is_none_or(|(s, h, _)| s != spec || *h != heads);
        if stale {
            self.summary = None;
        }
        let cache = &self.hub.cache;
        let (_, _, summary) = self.summary.get_or_insert_with(|| {
            let file = match HubId::parse(spec) {
                Some(Ok(id)) => crate::train::hub::find_cached(cache, &id)
                    .map(|c| c.weights.to_string_lossy().into_owned())
                    .ok_or_else(|| format!("{spec} is not in the cache {}: download it first", cache.display())),
                Some(Err(e)) => Err(e.to_string()),
                None => Ok(spec.to_owned()),
            };
            let summary = file.and_then(|f| describe_backbone(&f, heads).map_err(|e| e.to_string()));
            (spec.to_owned(), heads, summary)
        });
        summary
    }

    /// Starts downloading `spec` on its own thread (nothing if one is running; a message instead
    /// when `HF_HUB_OFFLINE` forbids the network).
    pub fn start_download(&mut self, spec: String, wake: Waker) {
        if self.downloading() {
            return;
        }
        if self.hub.offline {
            self.message = Some(format!("{spec}: HF_HUB_OFFLINE is set, so nothing is downloaded"));
            return;
        }
        let status = Arc::new(Mutex::new(DownloadStatus {
            spec: spec.clone(),
            ..DownloadStatus::default()
        }));
        let cancel = Arc::new(AtomicBool::new(false));
        let mut progress = Progress {
            status: status.clone(),
            cancel: cancel.clone(),
            wake,
        };
        let hub = self.hub.clone();
        let spawned = std::thread::Builder::new().name("hub-download".into()).spawn(move || {
            let result = match HubId::parse(&spec) {
                None => Err(format!("'{spec}' is not a hub id (hf:ORG/NAME[@REV])")),
                Some(Err(e)) => Err(e.to_string()),
                Some(Ok(id)) => {
                    let run = std::panic::AssertUnwindSafe(|| hub.resolve(&id, &mut progress));
                    match std::panic::catch_unwind(run) {
                        Ok(Ok(found)) => Ok(found.id.spec()),
                        Ok(Err(e)) => Err(e.to_string()),
                        Err(payload) if payload.is::<Cancelled>() => Err(format!(
                            "{spec}: download cancelled (the part downloaded is kept; Download resumes it)"
                        )),
                        Err(_) => Err(format!("{spec}: the download stopped unexpectedly")),
                    }
                }
            };
            progress.update(|s| s.result = Some(result));
        });
        if let Err(e) = spawned
            && let Ok(mut s) = status.lock()
        {
            s.result = Some(Err(format!("cannot start the download: {e}")));
        }
        self.download = Some(Download { status, cancel });
    }

    /// Whether `spec` is an `hf:` id that must be downloaded before a run can use it (not in the
    /// cache, and the network allowed).
    #[must_use]
    pub fn needs_download(&self, spec: &str) -> bool {
        matches!(HubId::parse(spec), Some(Ok(id)) if !self.hub.offline && crate::train::hub::find_cached(&self.hub.cache, &id).is_none())
    }

    /// Whether a download is running.
    #[must_use]
    pub fn downloading(&self) -> bool {
        self.download.as_ref().is_some_and(|d| d.snapshot().result.is_none())
    }

    /// A download that just finished successfully: its id, once (the listing is refreshed); a
    /// failed or cancelled one leaves its message in [`Self::message`].
    pub fn take_finished(&mut self) -> Option<String> {
        let result = self.download.as_ref()?.snapshot().result?;
        self.download = None;
        match result {
            Ok(spec) => {
                self.refresh();
                self.message = None;
                Some(spec)
            }
            Err(e) => {
                self.message = Some(e);
                None
            }
        }
    }
}
