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
