//! Reusable drawing pieces: colormaps, heatmaps and coloured tables.

pub mod cells;
pub mod colormap;
pub mod heatmap;
