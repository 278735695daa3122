//! MoPPA Studio: see and steer physics-prior adapters while they train.
//!
//! Layers (each may use the ones before it): [`physics`] (DCT, the three priors) → `model`
//! (candle ViT + adapters) → `train` (engine, protocol) → the CLI and the desktop app.

#[cfg(feature = "gui")]
pub mod app;
pub mod cli;
pub mod data;
pub mod model;
pub mod physics;
pub mod train;
pub mod util;
