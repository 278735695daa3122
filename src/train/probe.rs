//! The user's own image as the router probe: decoded and resized exactly as evaluation prepares
//! images (`data::transform`), so the app sends pixels the run reads as it would a validation
//! image ([`crate::train::protocol::Command::SetProbeImage`]).

use super::evaluate::{LoadedAdapter, OnBackbone, probe_snapshot, run_backbone_spec, run_config};
use super::protocol::{Rgb, Snapshot};
use super::worker::Waker;
use crate::config::VitConfig;
use crate::data::Normalize;
use crate::data::loader::assemble;
use crate::data::transform::{Resize, decode_bytes, to_rgb};
use crate::model::PeftModel;
use crate::train::batch::images_tensor;
use crate::train::error::Result as TrainResult;
use candle_core::{DType, Device};
use std::path::Path;

/// What one probe image gives: the predicted class and each MoPPA block's per-token router
/// weights (`H·W·k`, row-major), in block order.
pub(crate) struct ProbeForward {
    pub prediction: Option<u32>,
    pub alpha: Vec<(usize, Vec<f32>)>,
}

/// One probe image through `model`, normalised as evaluation does (the caller turns gradients
/// off): shared by a live run's snapshots and a saved adapter's probe, so both read the same.
pub(crate) fn probe_forward(
    model: &PeftModel,
    image: &Rgb,
    normalize: &Normalize,
    device: &Device,
) -> TrainResult<ProbeForward> {
    let size = model.backbone.cfg.img_size;
    let x = assemble(&[image.pixels.as_slice()], size as u32, normalize, None);
    let x = images_tensor(x, 1, size, device, model.backbone.dtype())?;
    let fwd = model.forward(&x, true)?;
    let prediction = fwd.logits.argmax(1)?.to_vec1::<u32>()?.first().copied();
    let alpha = fwd
        .routing
        .into_iter()
        .map(|r| Ok((r.block, r.alpha.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?)))
        .collect::<candle_core::Result<_>>()?;
    Ok(ProbeForward { prediction, alpha })
}

/// The image file `path` (its contents in `bytes`, e.g. a file dropped on the window) as a probe
/// for `backbone` (its input size, and a timm checkpoint's evaluation resize); the error names the
/// file and the problem.
pub fn probe_rgb(path: &Path, bytes: &[u8], backbone: &VitConfig) -> Result<Rgb, String> {
    let raw = decode_bytes(path, bytes).map_err(|e| e.to_string())?;
    let resize = Resize {
        size: backbone.img_size as u32,
        crop: backbone.eval_crop,
    };
    Ok(Rgb {
        size: backbone.img_size,
        pixels: to_rgb(&raw, &resize),
    })
}

/// [`probe_rgb`] of a file on disk.
pub fn probe_rgb_file(path: &Path, backbone: &VitConfig) -> Result<Rgb, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    probe_rgb(path, &bytes, backbone)
}

/// A saved run's adapter answering probe images on its own thread: what lets a display probe the
/// router of a run opened from its folder (no training worker behind it). Requests are the same
/// pixels a live run takes ([`probe_rgb`]); each answer is a [`Snapshot`] whose probe fields
/// (image, prediction, every MoPPA block's `probe_alpha`) are filled and everything else empty.
/// The model loads on the thread at the first request.
pub struct AdapterProbe {
    requests: crossbeam_channel::Sender<(String, Rgb)>,
    answers: crossbeam_channel::Receiver<Result<Snapshot, String>>,
}

impl AdapterProbe {
    /// For run folder `dir` (its `config.toml`: backbone at the recorded commit, heads; its
    /// `adapter.safetensors`); `wake` is called when an answer is ready.
    #[must_use]
    pub fn spawn(dir: &Path, wake: Waker) -> Self {
        let (requests, rx) = crossbeam_channel::bounded::<(String, Rgb)>(4);
        let (tx, answers) = crossbeam_channel::bounded(4);
        let dir = dir.to_owned();
        let spawned = std::thread::Builder::new().name("adapter-probe".into()).spawn(move || {
            let mut loaded = None;
            for (name, image) in rx {
                if loaded.is_none() {
                    match load(&dir) {
                        Ok(l) => loaded = Some(l),
                        Err(e) => {
                            let _ = tx.send(Err(e));
                            wake();
                            continue;
                        }
                    }
                }
                let Some(l) = &loaded else { continue };
                let answer = probe_snapshot(l, &name, &image).map_err(|e| e.to_string());
                if tx.send(answer).is_err() {
                    break;
                }
                wake();
            }
        });
        if let Err(e) = spawned {
            let (tx, answers) = crossbeam_channel::bounded(1);
            let _ = tx.send(Err(format!("cannot start the probe thread: {e}")));
            let (requests, _) = crossbeam_channel::bounded(1);
            return Self { requests, answers };
        }
        Self { requests, answers }
    }

    /// Asks for `image`'s maps; false when too many requests are waiting.
    #[must_use]
    pub fn request(&self, name: String, image: Rgb) -> bool {
        self.requests.try_send((name, image)).is_ok()
    }

    /// The next answer, if one is ready (never blocks).
    #[must_use]
    pub fn try_answer(&self) -> Option<Result<Snapshot, String>> {
        self.answers.try_recv().ok()
    }
}

fn load(dir: &Path) -> Result<LoadedAdapter, String> {
    let adapter = dir.join(crate::train::runfolder::ADAPTER);
    if !adapter.is_file() {
        return Err(format!("{}: no adapter.safetensors to probe", dir.display()));
    }
    let cfg = run_config(dir).map_err(|e| e.to_string())?;
    let on = OnBackbone {
        spec: &run_backbone_spec(&cfg),
        heads: cfg.heads,
        precision: cfg.dtype,
    };
    LoadedAdapter::load(&adapter, on, false).map_err(|e| e.to_string())
}
