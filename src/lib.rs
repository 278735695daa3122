//! MoPPA Studio: see and steer physics-prior adapters while they train.
//!
//! Layers (each may use the ones before it): [`config`] (plain configuration data) → [`physics`]
//! (DCT, the three priors) → [`model`] (candle ViT + adapters) → [`train`] (engine, protocol;
//! reads [`data`]) → the CLI and the desktop app, siblings that never import each other.

#[cfg(feature = "gui")]
pub mod app;
pub mod cli;
pub mod config;
pub mod data;
pub mod model;
pub mod panics;
pub mod physics;
pub mod stats;
pub mod train;
pub mod util;
