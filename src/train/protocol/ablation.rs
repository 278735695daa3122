//! What a prior ablation reports (METHOD.md "Prior ablation and token frequency content";
//! INTERFACES.md "Router diagnostics"): the scores with each prior removed, and how the same
//! images are routed per block. The `ablation` record of `metrics.jsonl` is this type.

use crate::config::Prior;
use serde::{Deserialize, Serialize};

/// Which MoPPA blocks a prior is removed from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum AblationBlock {
    /// One block (its index).
    One(usize),
    /// Every MoPPA block at once (written `"all"`).
    All(AllBlocks),
}

/// The word `"all"`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AllBlocks {
    /// `"all"`.
    All,
}

impl AblationBlock {
    /// Every block.
    pub const ALL: Self = Self::All(AllBlocks::All);

    /// Whether block `b` is one it removes the prior from.
    #[must_use]
    pub fn covers(self, b: usize) -> bool {
        match self {
            Self::One(i) => i == b,
            Self::All(_) => true,
        }
    }
}

impl std::fmt::Display for AblationBlock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::One(i) => write!(f, "{i}"),
            Self::All(_) => f.write_str("all"),
        }
    }
}

/// Accuracy and loss of one model variant on the ablation's images.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct AblationScore {
    /// Accuracy 0..1.
    pub acc: f64,
    /// Mean cross-entropy.
    pub loss: f64,
    /// Accuracy per class (0 for a class without an image: see [`Ablation::class_n`]).
    #[serde(
        default,
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "crate::train::record::nan_list"
    )]
    pub per_class_acc: Vec<f64>,
}

/// One prior removed from some blocks.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AblationRow {
    /// The prior removed.
    pub prior: Prior,
    /// Where.
    pub block: AblationBlock,
    /// The score without it.
    #[serde(flatten)]
    pub score: AblationScore,
}

/// How one block routes the ablation's images: by class and by the tokens' frequency content.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct BlockUsage {
    /// Block index.
    pub block: usize,
    /// `class_share[c][p]`: prior p's mean α over the patch tokens of class c's images (rows of
    /// classes without an image: empty).
    pub class_share: Vec<Vec<f64>>,
    /// Pearson correlation of each prior's α with the tokens' `hf` (NaN, written null, when
    /// either is constant).
    #[serde(deserialize_with = "crate::train::record::nan_list")]
    pub hf_corr: Vec<f64>,
    /// Per prior, a [`USAGE_BINS`]² histogram of tokens, row-major: row = α bin, column = `hf`
    /// bin (both over [0, 1]).
    pub hist: Vec<Vec<u32>>,
}

/// Bins of each axis of [`BlockUsage::hist`].
pub const USAGE_BINS: usize = 16;

/// A prior ablation (METHOD.md "Prior ablation"): the model on a fixed, seeded subset of the
/// validation split, whole and with each prior removed in all MoPPA blocks and in each.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Ablation {
    /// The step of the weights it measured.
    pub step: u64,
    /// Seconds since the run started (0 for a saved adapter).
    #[serde(default)]
    pub time_s: f64,
    /// The split (`val`).
    pub split: String,
    /// Images evaluated.
    pub n: u64,
    /// The whole model.
    pub base: AblationScore,
    /// One row per prior × (all, each MoPPA block).
    pub rows: Vec<AblationRow>,
    /// Images per class in the subset (a class without one shows accuracy 0).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub class_n: Vec<u64>,
    /// Routing of the same images per MoPPA block.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub usage: Vec<BlockUsage>,
    /// Seconds the ablation took.
    #[serde(default)]
    pub seconds: f64,
}
