//! The model layer (candle only): a timm-compatible ViT backbone, the PEFT methods (MoPPA, LoRA,
//! AdaptFormer, linear probe, full fine-tuning), training ops with explicit backward passes, and
//! adapter checkpoints.

pub mod config;
pub mod error;
pub mod ops;
pub mod resample;
pub mod tensor_file;
pub mod vit;

pub use config::{MethodConfig, MethodKind, Placement, Pool, RouterKind, VitConfig};
pub use error::ModelError;
pub use vit::{BackboneOptions, Vit};
pub mod adaptformer;
pub mod init;
pub mod lora;
pub mod moppa;
pub mod peft;

pub use peft::{Forward, PeftModel, count_trainable, cross_entropy};
pub mod checkpoint;

/// A parameter as used in a forward pass: tracked while training, detached (no graph, no
/// saved activations) for evaluation.
#[must_use]
pub fn param(v: &candle_core::Var, grad: bool) -> candle_core::Tensor {
    if grad {
        v.as_tensor().clone()
    } else {
        v.as_tensor().detach()
    }
}
