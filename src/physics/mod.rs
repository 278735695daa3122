//! The physics of the three priors: orthonormal DCT-II transforms of the token grid, the grid
//! Laplacian's eigenvalues `Λ`, the heat / wave / Poisson spectral filters and their spatial
//! impulse responses, plus image-scale transforms (rustdct) for the playground and `moppa apply`.
//!
//! Every formula is the one in the project's METHOD.md (our implementation of MoPPA, Wang et al.,
//! arXiv 2412.02759). Host functions work in `f64`; [`tensor`] builds the same objects as candle
//! tensors of any dtype and device for the model.

mod coeffs;
mod dct;
mod filters;
pub mod freq;
mod image;
pub mod tensor;

pub use crate::config::Prior;
pub use coeffs::{PhysicsError, PriorCoeffs};
pub use dct::{Dct2, dct_matrix};
pub use filters::{
    FilterSet, channel_gain, heat_filter, impulse_response, impulse_width, laplacian_eigenvalues, poisson_filter,
    prior_gain, radial_profile, wave_filter,
};
pub use image::{ImageDct, apply_prior, image_gain};
