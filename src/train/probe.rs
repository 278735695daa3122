//! The user's own image as the router probe: decoded and resized exactly as evaluation prepares
//! images (`data::transform`), so the app sends pixels the run reads as it would a validation
//! image ([`crate::train::protocol::Command::SetProbeImage`]).

use super::protocol::Rgb;
use crate::data::transform::{decode_bytes, to_rgb_square};
use std::path::Path;

/// The image file `path` (its contents in `bytes`, e.g. a file dropped on the window) as a probe
/// at the backbone's input size `size`; the error names the file and the problem.
pub fn probe_rgb(path: &Path, bytes: &[u8], size: usize) -> Result<Rgb, String> {
    let raw = decode_bytes(path, bytes).map_err(|e| e.to_string())?;
    Ok(Rgb {
        size,
        pixels: to_rgb_square(&raw, size as u32),
    })
}

/// [`probe_rgb`] of a file on disk.
pub fn probe_rgb_file(path: &Path, size: usize) -> Result<Rgb, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    probe_rgb(path, &bytes, size)
}
