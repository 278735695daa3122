//! The user's own image as the router probe: decoded and resized exactly as evaluation prepares
//! images (`data::transform`), so the app sends pixels the run reads as it would a validation
//! image ([`crate::train::protocol::Command::SetProbeImage`]).

use super::protocol::Rgb;
use crate::config::VitConfig;
use crate::data::transform::{Resize, decode_bytes, to_rgb};
use std::path::Path;

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
