//! Where a run's backbone and device come from: the built-in backbone, a random preset, a file;
//! the CPU or a CUDA GPU.

use super::error::{Result, TrainError};
use crate::config::{DeviceChoice, VitConfig};
use crate::model::tensor_file::TensorFile;
use crate::model::vit::timm::config_of;
use crate::model::{BackboneOptions, Vit};
use candle_core::Device;
use std::path::Path;

/// The built-in backbone: a ViT pretrained on Fashion-MNIST (see assets/README.md).
pub static BUILTIN_BACKBONE: &[u8] = include_bytes!("../../assets/backbone-tiny.safetensors");

/// Resolves a backbone spec: `builtin`, `random:PRESET` (random weights, for tests and
/// benchmarks; no head) or a safetensors file.
pub fn load_backbone(spec: &str, heads: Option<usize>, seed: u64, device: &Device) -> Result<Vit> {
    let opts = BackboneOptions {
        heads,
        ..BackboneOptions::default()
    };
    load_backbone_with(spec, &opts, seed, device)
}

/// [`load_backbone`] with every option (e.g. another image size: position embeddings resampled).
pub fn load_backbone_with(spec: &str, opts: &BackboneOptions, seed: u64, device: &Device) -> Result<Vit> {
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
            "--backbone {spec}: no such file (expected builtin, random:PRESET or a .safetensors file)"
        )));
    }
    Ok(config_of(&TensorFile::read_header(path)?, &opts)?)
}

/// Whether this build has CUDA and a GPU answers (the app offers the device choice then).
#[must_use]
pub fn cuda_available() -> bool {
    cfg!(feature = "cuda") && candle_core::utils::cuda_is_available()
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
