//! Where a run's backbone and device come from: the built-in backbone, a random preset, a file;
//! the CPU or a CUDA GPU.

use super::error::{Result, TrainError};
use super::hub::{Cached, DownloadProgress, Hub, HubId};
use crate::config::{DeviceChoice, VitConfig};
use crate::model::tensor_file::TensorFile;
use crate::model::vit::timm::{assumptions, config_of};
use crate::model::{BackboneOptions, Vit};
use candle_core::Device;
use std::path::Path;

/// The built-in backbone: a ViT pretrained on Fashion-MNIST (see assets/README.md).
pub static BUILTIN_BACKBONE: &[u8] = include_bytes!("../../assets/backbone-tiny.safetensors");

/// A backbone spec made loadable: `hf:` ids resolved through the Hugging Face cache.
#[derive(Clone, Debug)]
pub struct ResolvedSpec {
    /// `builtin`, `random:PRESET` or a file path.
    pub spec: String,
    /// Where an `hf:` id was found (its commit), `None` for other specs.
    pub hub: Option<Cached>,
}

/// Resolves `hf:ORG/NAME[@REV]` to its cached weights (downloading them when missing and the
/// network is allowed, reporting to `progress`); `pinned` is a commit recorded by an earlier run
/// (`config.toml`), used when the id names no revision. Other specs are returned unchanged.
pub fn resolve_backbone(spec: &str, pinned: Option<&str>, progress: &mut dyn DownloadProgress) -> Result<ResolvedSpec> {
    let Some(id) = HubId::parse(spec) else {
        return Ok(ResolvedSpec {
            spec: spec.to_owned(),
            hub: None,
        });
    };
    let mut id = id?;
    if id.revision.is_none() {
        id.revision = pinned.map(str::to_owned);
    }
    let found = Hub::from_env().resolve(&id, progress)?;
    Ok(ResolvedSpec {
        spec: found.weights.to_string_lossy().into_owned(),
        hub: Some(found),
    })
}

/// What loading `spec` assumed because the file records neither our metadata nor a timm
/// `config.json` (for a warning; empty when nothing was assumed or the spec is not a file).
pub fn backbone_assumptions(spec: &str, heads: Option<usize>) -> Result<Vec<String>> {
    let spec = resolve_backbone(spec, None, &mut ())?.spec;
    let path = Path::new(&spec);
    if spec == "builtin" || spec.starts_with("random:") || !path.is_file() {
        return Ok(Vec::new());
    }
    let opts = BackboneOptions {
        heads,
        ..BackboneOptions::default()
    };
    Ok(assumptions(&TensorFile::read_header(path)?, &opts)?)
}

/// What a backbone is, for listings and the app's picker (from headers only).
#[derive(Clone, Debug, PartialEq)]
pub struct BackboneSummary {
    /// Family (`ViT`, `DINOv2`, `CLIP ViT`, …; `built-in`, `random`, or `unknown` without a
    /// timm `config.json`).
    pub family: String,
    /// Its architecture as it will run.
    pub cfg: VitConfig,
    /// Backbone parameters (without a head).
    pub params: usize,
    /// Assumptions made for a bare file (see [`backbone_assumptions`]).
    pub assumed: Vec<String>,
}

/// The family a weights file's timm `config.json` names (`unknown (no config.json)` without one).
#[must_use]
pub fn family_of(file: &Path) -> String {
    match crate::model::vit::timm::sidecar_config(file).ok().flatten() {
        None => "unknown (no config.json)".to_owned(),
        Some(t) => match crate::config::arch_traits(&t.architecture) {
            Ok(Some(tr)) => tr.family.to_owned(),
            Ok(None) => t.architecture,
            Err(_) => "not a plain ViT".to_owned(),
        },
    }
}

/// Describes a backbone spec without loading its weights and without the network: an `hf:` id
/// that is not in the cache is an error saying so (nothing is downloaded).
pub fn describe_backbone(spec: &str, heads: Option<usize>) -> Result<BackboneSummary> {
    let (file, family) = if let Some(id) = HubId::parse(spec) {
        let id = id?;
        let hub = Hub::from_env();
        let found = super::hub::find_cached(&hub.cache, &id).ok_or_else(|| {
            TrainError::Config(format!(
                "{spec}: not in the Hugging Face cache ({}); download it first",
                hub.cache.join(id.folder()).display()
            ))
        })?;
        (found.weights.to_string_lossy().into_owned(), None)
    } else if spec == "builtin" {
        (spec.to_owned(), Some("built-in"))
    } else if spec.starts_with("random:") {
        (spec.to_owned(), Some("random"))
    } else {
        (spec.to_owned(), None)
    };
    let family = family.map_or_else(|| family_of(Path::new(&file)), str::to_owned);
    let cfg = backbone_config(&file, heads)?;
    Ok(BackboneSummary {
        family,
        params: crate::config::backbone_params(&cfg),
        assumed: backbone_assumptions(&file, heads)?,
        cfg,
    })
}

/// One model of the Hugging Face cache, described (or why it does not load).
#[derive(Clone, Debug)]
pub struct CachedBackbone {
    /// `hf:ORG/NAME`.
    pub spec: String,
    /// Family from its `config.json`.
    pub family: String,
    /// Size of its weights on disk, bytes.
    pub bytes: u64,
    /// What it is, or the one-line reason it does not load.
    pub summary: std::result::Result<BackboneSummary, String>,
}

/// Every model in `hub`'s cache with a `model.safetensors`, described from headers (the CLI's
/// `moppa backbones` and the app's picker).
#[must_use]
pub fn list_backbones(hub: &Hub) -> Vec<CachedBackbone> {
    super::hub::list_cached(&hub.cache)
        .into_iter()
        .map(|m| {
            let file = m.weights.to_string_lossy().into_owned();
            let summary = describe_backbone(&file, None).map_err(|e| {
                // One line, without the path the id already names.
                e.to_string()
                    .replace(&format!("{file}: "), "")
                    .replace("invalid configuration: ", "")
            });
            CachedBackbone {
                spec: m.spec,
                family: family_of(&m.weights),
                bytes: m.bytes,
                summary,
            }
        })
        .collect()
}

/// Resolves a backbone spec: `builtin`, `random:PRESET` (random weights, for tests and
/// benchmarks; no head), `hf:ORG/NAME[@REV]` or a safetensors file.
pub fn load_backbone(spec: &str, heads: Option<usize>, seed: u64, device: &Device) -> Result<Vit> {
    let opts = BackboneOptions {
        heads,
        ..BackboneOptions::default()
    };
    load_backbone_with(spec, &opts, seed, device)
}

/// [`load_backbone`] with every option (e.g. another image size: position embeddings resampled).
pub fn load_backbone_with(spec: &str, opts: &BackboneOptions, seed: u64, device: &Device) -> Result<Vit> {
    let resolved = resolve_backbone(spec, None, &mut ())?;
    let spec = resolved.spec.as_str();
    if let Some(size) = opts.img_size {
        let cfg = backbone_config(spec, opts.heads)?;
        if size == 0 || !size.is_multiple_of(cfg.patch_size) {
            return Err(TrainError::Config(format!(
                "images of {size}×{size} pixels do not split into the backbone's {p}×{p} patches (use a multiple of {p})",
                p = cfg.patch_size
            )));
        }
    }
    if spec == "builtin" {
        let tf = TensorFile::from_bytes(Path::new("builtin"), BUILTIN_BACKBONE)?;
        return Ok(Vit::from_tensor_file(&tf, opts, device)?);
    }
    if let Some(name) = spec.strip_prefix("random:") {
        let cfg = VitConfig::preset(name).ok_or_else(|| {
            TrainError::Config(format!(
                "unknown preset '{name}' in --backbone random:{name} ({})",
                VitConfig::preset_names()
            ))
        })?;
        let cfg = VitConfig {
            num_classes: 0,
            img_size: opts.img_size.unwrap_or(cfg.img_size),
            num_heads: opts.heads.unwrap_or(cfg.num_heads),
            ..cfg
        };
        return Ok(Vit::random(&cfg, seed, device)?);
    }
    Ok(Vit::from_file(Path::new(spec), opts, device)?)
}

/// The architecture a backbone spec names, from file headers only (nothing loaded): for checks
/// before a run starts and for describing a backbone. An unknown `random:` preset is a
/// [`TrainError::Config`].
pub fn backbone_config(spec: &str, heads: Option<usize>) -> Result<VitConfig> {
    let resolved = resolve_backbone(spec, None, &mut ())?;
    let spec = resolved.spec.as_str();
    let opts = BackboneOptions {
        heads,
        ..BackboneOptions::default()
    };
    if spec == "builtin" {
        let tf = TensorFile::from_bytes(Path::new("builtin"), BUILTIN_BACKBONE)?;
        return Ok(config_of(&tf, &opts)?);
    }
    if let Some(name) = spec.strip_prefix("random:") {
        return VitConfig::preset(name)
            .map(|c| VitConfig { num_classes: 0, ..c })
            .ok_or_else(|| {
                TrainError::Config(format!(
                    "unknown preset '{name}' in --backbone random:{name} ({})",
                    VitConfig::preset_names()
                ))
            });
    }
    let path = Path::new(spec);
    if !path.exists() {
        return Err(TrainError::Config(format!(
            "--backbone {spec}: no such file (expected builtin, random:PRESET, hf:ORG/NAME or a .safetensors file)"
        )));
    }
    Ok(config_of(&TensorFile::read_header(path)?, &opts)?)
}

/// Whether this build has CUDA and a GPU answers (the app offers the device choice then).
#[must_use]
pub fn cuda_available() -> bool {
    cfg!(feature = "cuda") && candle_core::utils::cuda_is_available()
}

/// What `--dtype bf16` does on this machine's CPU, in words (the app says it beside its precision
/// choice): native AVX512-BF16 products and what they cost on the built-in run, or emulation.
#[must_use]
pub fn cpu_bf16_capability() -> &'static str {
    if crate::model::ops::cpu::bf16::native() {
        "this CPU has AVX512-BF16: a tiny-ViT step takes ~0.7-0.8x its f32 time (the built-in run: \
         ~16% less wall time, mean test accuracy 94.7% against 95.3% in f32 over seeds 0-4)"
    } else {
        "this CPU has no AVX512-BF16: emulated, slower than f32"
    }
}

/// Picks the device for a run.
pub fn select_device(choice: DeviceChoice) -> Result<Device> {
    let device = match choice {
        DeviceChoice::Cpu => Device::Cpu,
        DeviceChoice::Cuda(n) => Device::new_cuda(n)
            .map_err(|e| TrainError::Config(format!("--device {choice}: no such CUDA device ({e})")))?,
        DeviceChoice::Auto => {
            if cfg!(feature = "cuda") {
                Device::new_cuda(0).unwrap_or(Device::Cpu)
            } else {
                Device::Cpu
            }
        }
    };
    single_stream(&device);
    Ok(device)
}

/// The device's name in reports: `cpu` or `cuda:0`.
#[must_use]
pub fn device_name(device: &Device) -> String {
    if device.is_cpu() { "cpu".into() } else { "cuda:0".into() }
}

/// candle's CUDA device tracks every tensor's reads and writes with CUDA events (two events
/// created per allocation, recorded and waited on at every kernel launch) so that tensors can be
/// shared between streams. The engine uses the device's one stream only, where stream order
/// already orders everything, so the tracking is pure host overhead per op; it is switched off.
#[cfg(feature = "cuda")]
#[allow(unsafe_code)]
fn single_stream(device: &Device) {
    if let Device::Cuda(d) = device {
        // SAFETY: every tensor of the engine is created and used on this device's single stream
        // (no other stream is ever created), which is the condition candle documents for
        // `disable_event_tracking`.
        unsafe { d.disable_event_tracking() };
    }
}

#[cfg(not(feature = "cuda"))]
fn single_stream(_: &Device) {}
