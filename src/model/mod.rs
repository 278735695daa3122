//! The model layer (candle only): a timm-compatible ViT backbone, the PEFT methods (MoPPA, LoRA,
//! AdaptFormer, linear probe, full fine-tuning), training ops with explicit backward passes, and
//! adapter checkpoints.

pub mod ops;
