//! What a timm checkpoint's weights cannot reveal: the activation, the LayerNorm epsilon, the head
//! count, the pooling, and whether the architecture uses something this crate does not implement.
//! One table keyed by timm's architecture name (`config.json`'s `architecture`), read with the
//! `config.json` timm writes next to `model.safetensors` on the Hugging Face hub
//! (INTERFACES.md, "Backbones by name"). tests/families.rs checks the table against timm's own
//! modules for ~45 architectures (tests/fixtures/families/archs.json).

use serde::{Deserialize, Serialize};

/// The MLP's activation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    /// Exact (erf) GELU, timm's default.
    #[default]
    Gelu,
    /// `x·σ(1.702·x)`, OpenAI CLIP's (timm `act_layer='quick_gelu'`).
    QuickGelu,
}

impl Activation {
    /// The name timm's `act_layer` uses.
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Self::Gelu => "gelu",
            Self::QuickGelu => "quick_gelu",
        }
    }
}

/// The properties of one timm architecture the table knows.
#[derive(Clone, Debug, PartialEq)]
pub struct ArchTraits {
    /// Family, for listings (`ViT`, `DeiT`, `DINOv2`, `CLIP ViT`, …).
    pub family: &'static str,
    /// Attention heads (`None`: from the width, D/64).
    pub num_heads: Option<usize>,
    /// MLP activation.
    pub act: Activation,
    /// LayerNorm epsilon.
    pub ln_eps: f64,
}

/// A feature this crate does not implement, and the family that uses it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Unsupported {
    /// What is missing, in words.
    pub feature: &'static str,
    /// The architecture that needs it.
    pub arch: String,
}

impl std::fmt::Display for Unsupported {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} uses {}, which MoPPA Studio does not implement",
            self.arch, self.feature
        )
    }
}

/// Architectures refused by name: a name part and the feature it stands for. Checked before the
/// supported families, in order.
const REFUSED: [(&str, &str); 9] = [
    ("eva", "RoPE position embeddings and a SwiGLU MLP (EVA)"),
    ("_rope", "RoPE position embeddings"),
    ("beit", "relative position bias (BEiT)"),
    ("relpos", "relative position bias"),
    ("samvit", "windowed attention with relative positions (SAM)"),
    ("siglip", "an attention-pool (map) head (SigLIP)"),
    ("giant_patch14_dinov2", "a SwiGLU MLP (DINOv2 giant)"),
    ("giant_patch14_reg4_dinov2", "a SwiGLU MLP (DINOv2 giant)"),
    ("naflex", "variable-resolution patchification (NaFlex)"),
];

/// Heads by timm size word (D/64 except where named).
const HEADS: [(&str, usize); 8] = [
    ("tiny", 3),
    ("small", 6),
    ("medium", 8),
    ("base", 12),
    ("large", 16),
    ("huge", 16),
    ("giant", 16),
    ("gigantic", 16),
];

/// Architectures whose head count differs from their size word's.
const HEAD_EXCEPTIONS: [(&str, usize); 1] = [("vit_base_patch16_gap_224", 16)];

/// The architecture name without its pretrained tag (`vit_base_patch16_224.mae` →
/// `vit_base_patch16_224`).
#[must_use]
pub fn arch_base(name: &str) -> &str {
    name.split('.').next().unwrap_or(name)
}

/// The table's entry for a timm architecture name (with or without its pretrained tag):
/// its traits, or the feature that makes it unsupported, or `Ok(None)` when the name is not a
/// ViT family the table knows.
pub fn arch_traits(name: &str) -> Result<Option<ArchTraits>, Unsupported> {
    let arch = arch_base(name);
    if let Some((_, feature)) = REFUSED.iter().find(|(part, _)| arch.contains(part)) {
        return Err(Unsupported {
            feature,
            arch: arch.to_owned(),
        });
    }
    let family = if arch.starts_with("deit3_") {
        "DeiT III"
    } else if arch.starts_with("deit_") {
        if arch.contains("distilled") {
            "DeiT distilled"
        } else {
            "DeiT"
        }
    } else if arch.starts_with("vit_") {
        if arch.contains("dinov2") {
            if arch.contains("_reg") {
                "DINOv2 + registers"
            } else {
                "DINOv2"
            }
        } else if arch.contains("_clip_") {
            "CLIP ViT"
        } else {
            "ViT"
        }
    } else {
        return Ok(None);
    };
    let size = arch.split('_').nth(1).unwrap_or_default();
    let num_heads = HEAD_EXCEPTIONS
        .iter()
        .find(|(a, _)| *a == arch)
        .or_else(|| HEADS.iter().find(|(s, _)| *s == size))
        .map(|(_, h)| *h);
    Ok(Some(ArchTraits {
        family,
        num_heads,
        act: if arch.contains("quickgelu") {
            Activation::QuickGelu
        } else {
            Activation::Gelu
        },
        // timm builds CLIP towers with nn.LayerNorm's default eps.
        ln_eps: if arch.contains("_clip_") { 1e-5 } else { 1e-6 },
    }))
}

/// timm's `pretrained_cfg`: the preprocessing the weights expect.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
pub struct PretrainedCfg {
    /// `(C, H, W)`.
    #[serde(default)]
    pub input_size: Option<Vec<usize>>,
    /// Per-channel mean.
    #[serde(default)]
    pub mean: Option<Vec<f32>>,
    /// Per-channel std.
    #[serde(default)]
    pub std: Option<Vec<f32>>,
    /// Resize interpolation (`bicubic`, `bilinear`, …).
    #[serde(default)]
    pub interpolation: Option<String>,
    /// Centre-crop fraction.
    #[serde(default)]
    pub crop_pct: Option<f64>,
    /// Pretrained tag (`augreg2_in21k_ft_in1k`, `mae`, …).
    #[serde(default)]
    pub tag: Option<String>,
}

/// The `config.json` timm writes next to `model.safetensors` (`timm.models.push_to_hf_hub`).
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
pub struct TimmConfig {
    /// timm's architecture name (`vit_base_patch16_224`).
    pub architecture: String,
    /// Classes of the checkpoint's own head.
    #[serde(default)]
    pub num_classes: Option<usize>,
    /// `token`, `avg`, `map`, … (informational in timm; the model's pooling).
    #[serde(default)]
    pub global_pool: Option<String>,
    /// Arguments the model was built with beyond the architecture's defaults.
    #[serde(default)]
    pub model_args: serde_json::Map<String, serde_json::Value>,
    /// Preprocessing.
    #[serde(default)]
    pub pretrained_cfg: PretrainedCfg,
}

impl TimmConfig {
    /// Parses a `config.json`; the error says what is wrong with it.
    pub fn parse(text: &str) -> Result<Self, String> {
        let cfg: Self = serde_json::from_str(text).map_err(|e| format!("not a timm config.json: {e}"))?;
        if cfg.architecture.is_empty() {
            return Err("not a timm config.json: empty \"architecture\"".into());
        }
        Ok(cfg)
    }

    /// `model_args[key]` as a number.
    #[must_use]
    pub fn arg_usize(&self, key: &str) -> Option<usize> {
        self.model_args.get(key)?.as_u64().map(|v| v as usize)
    }

    /// `model_args[key]` as a string.
    #[must_use]
    pub fn arg_str(&self, key: &str) -> Option<&str> {
        self.model_args.get(key)?.as_str()
    }

    /// The pooling: `model_args.global_pool`, else the top-level `global_pool`.
    #[must_use]
    pub fn pool(&self) -> Option<&str> {
        self.arg_str("global_pool").or(self.global_pool.as_deref())
    }

    /// The activation `model_args.act_layer` names, if any; an unknown one is an error.
    pub fn act_override(&self) -> Result<Option<Activation>, String> {
        match self.arg_str("act_layer") {
            None => Ok(None),
            Some("gelu") => Ok(Some(Activation::Gelu)),
            Some("quick_gelu") => Ok(Some(Activation::QuickGelu)),
            Some(other) => Err(format!(
                "model_args.act_layer '{other}' is not implemented (gelu and quick_gelu are)"
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_are_ignored_and_unknown_names_are_not_guessed() -> Result<(), String> {
        let t = arch_traits("vit_base_patch16_clip_quickgelu_224.openai")
            .map_err(|e| e.to_string())?
            .ok_or("known")?;
        assert_eq!((t.num_heads, t.act, t.ln_eps), (Some(12), Activation::QuickGelu, 1e-5));
        assert_eq!(arch_traits("resnet50.a1_in1k"), Ok(None));
        let refused = arch_traits("vit_base_patch16_siglip_224.v2_webli")
            .err()
            .ok_or("refused")?;
        assert!(refused.to_string().contains("attention-pool"), "{refused}");
        Ok(())
    }
}
