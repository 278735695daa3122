//! The model layer (candle only): a timm-compatible ViT backbone, the PEFT methods (MoPPA, LoRA,
//! AdaptFormer, linear probe, full fine-tuning) injected by `peft`, the masked autoencoder used
//! for pretraining, training ops with explicit backward passes (`ops`), and adapter checkpoints.
//! Configuration types come from [`crate::config`]; this layer owns every tensor and how
//! parameters are represented (e.g. MoPPA's coefficients through softplus).

pub mod adaptformer;
pub mod checkpoint;
pub mod error;
pub mod init;
pub mod lora;
pub mod mae;
pub mod moppa;
pub mod ops;
pub mod peft;
pub mod resample;
pub mod tensor_file;
pub mod vit;

pub use error::ModelError;
pub use peft::{Forward, PeftModel, cross_entropy};
pub use vit::{BackboneOptions, Vit};

/// A network whose forward passes can stop building a gradient graph (for evaluation).
pub trait GradMode {
    /// Switches gradient tracking off (no graph, no saved activations) or back on.
    fn set_grad_enabled(&self, on: bool);
}

/// Gradient tracking off while this lives; back on when it is dropped, also on an early return.
pub struct NoGrad<'a>(&'a dyn GradMode);

impl<'a> NoGrad<'a> {
    /// Switches `model`'s gradients off until the guard is dropped.
    #[must_use]
    pub fn new(model: &'a dyn GradMode) -> Self {
        model.set_grad_enabled(false);
        Self(model)
    }
}

impl Drop for NoGrad<'_> {
    fn drop(&mut self) {
        self.0.set_grad_enabled(true);
    }
}

/// A parameter as used in a forward pass: tracked while training, detached (no graph, no
/// saved activations) for evaluation, and cast to the compute dtype (adapters keep `f32` master
/// weights when the backbone computes in bf16; the cast's backward brings gradients back to f32).
pub fn param(v: &candle_core::Var, grad: bool, dtype: candle_core::DType) -> candle_core::Result<candle_core::Tensor> {
    let t = if grad {
        v.as_tensor().clone()
    } else {
        v.as_tensor().detach()
    };
    if t.dtype() == dtype { Ok(t) } else { t.to_dtype(dtype) }
}
