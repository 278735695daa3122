//! Reusable drawing pieces: colormaps and heatmaps.

pub mod colormap;
pub mod heatmap;
