//! Where each timm tensor of a transformer block lives inside the block's flat parameter buffer.
//!
//! A block's weights are stored as two flat vectors ("halves": attention and MLP) so one fused op
//! can return the gradient of all of them at once during full fine-tuning, and the optimizer walks
//! a few long buffers instead of many small tensors. Absent optional tensors (qkv bias, layer
//! scale) keep a slot (zeros / ones) marked `present = false`: they never train and are never saved.

use std::ops::Range;

/// One tensor inside a flat buffer.
#[derive(Clone, Debug)]
pub struct Slot {
    /// Name relative to the block (`attn.qkv.weight`).
    pub name: &'static str,
    /// Offset in elements.
    pub offset: usize,
    /// timm shape.
    pub shape: Vec<usize>,
    /// False for a placeholder of an optional tensor the checkpoint does not have.
    pub present: bool,
    /// Whether weight decay applies (matrices only, as timm does).
    pub decay: bool,
}

impl Slot {
    /// Number of elements.
    #[must_use]
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }

    /// True for an empty slot.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Element range in the flat buffer.
    #[must_use]
    pub fn range(&self) -> Range<usize> {
        self.offset..self.offset + self.len()
    }
}

/// The slots of one half-block, in a fixed order.
#[derive(Clone, Debug)]
pub struct HalfLayout {
    /// Slots in order; indices are the `ATTN_*` / `MLP_*` constants.
    pub slots: Vec<Slot>,
    /// Total elements.
    pub len: usize,
}

/// Slot indices shared by both halves: the half's LayerNorm.
pub const NORM_W: usize = 0;
/// LayerNorm bias.
pub const NORM_B: usize = 1;
/// Attention: fused qkv weight `(3D, D)`.
pub const QKV_W: usize = 2;
/// Attention: qkv bias `(3D)`.
pub const QKV_B: usize = 3;
/// Attention: output projection `(D, D)`.
pub const PROJ_W: usize = 4;
/// Attention: projection bias.
pub const PROJ_B: usize = 5;
/// MLP: first layer `(hidden, D)`.
pub const FC1_W: usize = 2;
/// MLP: first bias.
pub const FC1_B: usize = 3;
/// MLP: second layer `(D, hidden)`.
pub const FC2_W: usize = 4;
/// MLP: second bias.
pub const FC2_B: usize = 5;
/// Layer scale `γ` (both halves).
pub const LS: usize = 6;

impl HalfLayout {
    fn build(spec: &[(&'static str, Vec<usize>, bool, bool)]) -> Self {
        let mut offset = 0;
        let slots = spec
            .iter()
            .map(|(name, shape, present, decay)| {
                let slot = Slot {
                    name,
                    offset,
                    shape: shape.clone(),
                    present: *present,
                    decay: *decay,
                };
                offset += slot.len();
                slot
            })
            .collect();
        Self { slots, len: offset }
    }

    /// The attention half: `norm1`, `attn.qkv`, `attn.proj`, `ls1`.
    #[must_use]
    pub fn attn(d: usize, qkv_bias: bool, layer_scale: bool) -> Self {
        Self::build(&[
            ("norm1.weight", vec![d], true, false),
            ("norm1.bias", vec![d], true, false),
            ("attn.qkv.weight", vec![3 * d, d], true, true),
            ("attn.qkv.bias", vec![3 * d], qkv_bias, false),
            ("attn.proj.weight", vec![d, d], true, true),
            ("attn.proj.bias", vec![d], true, false),
            ("ls1.gamma", vec![d], layer_scale, false),
        ])
    }

    /// The MLP half: `norm2`, `mlp.fc1`, `mlp.fc2`, `ls2`.
    #[must_use]
    pub fn mlp(d: usize, hidden: usize, layer_scale: bool) -> Self {
        Self::build(&[
            ("norm2.weight", vec![d], true, false),
            ("norm2.bias", vec![d], true, false),
            ("mlp.fc1.weight", vec![hidden, d], true, true),
            ("mlp.fc1.bias", vec![hidden], true, false),
            ("mlp.fc2.weight", vec![d, hidden], true, true),
            ("mlp.fc2.bias", vec![d], true, false),
            ("ls2.gamma", vec![d], layer_scale, false),
        ])
    }

    /// Element range of slot `i`.
    #[must_use]
    pub fn range(&self, i: usize) -> Range<usize> {
        self.slots[i].range()
    }

    /// Whether slot `i` holds a real tensor.
    #[must_use]
    pub fn present(&self, i: usize) -> bool {
        self.slots[i].present
    }
}
