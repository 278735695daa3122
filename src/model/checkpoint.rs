//! Adapter checkpoints: the trainable tensors (adapters + head, or the whole model for full
//! fine-tuning under timm names) in safetensors, with the run config, the backbone's config and
//! sha256, and the class names as JSON metadata (INTERFACES.md, format `adapter-v1`).

use super::error::{ModelError, Result};
use super::peft::PeftModel;
use super::tensor_file::{HostTensor, StoreAs, TensorFile, encode, stage};
use super::vit::Vit;
use crate::config::{MethodConfig, VitConfig};
use candle_core::{DType, Tensor};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

/// `moppa.format` of adapter files.
pub const ADAPTER_FORMAT: &str = "adapter-v1";
/// Metadata keys.
pub const KEY_FORMAT: &str = "moppa.format";
/// The run config (flat JSON; the method fields are top-level keys).
pub const KEY_CONFIG: &str = "moppa.config";
/// The backbone config plus `sha256`.
pub const KEY_BACKBONE: &str = "moppa.backbone";
/// Class names, a JSON list.
pub const KEY_CLASSES: &str = "moppa.classes";
/// The step the checkpoint was taken at (an adapter and `state.safetensors` of one checkpoint
/// carry the same value).
pub const KEY_STEP: &str = "moppa.step";

fn host(t: &Tensor) -> Result<HostTensor> {
    Ok(HostTensor::new(
        t.dims().to_vec(),
        t.flatten_all()?.to_dtype(DType::F32)?.to_vec1()?,
    ))
}

/// The shape a trainable tensor has in timm's files (the patch embedding is stored 2-D here).
fn file_shape(model: &PeftModel, name: &str, var_dims: &[usize]) -> Vec<usize> {
    if name == "patch_embed.proj.weight" {
        let c = &model.backbone.cfg;
        vec![c.embed_dim, c.in_chans, c.patch_size, c.patch_size]
    } else {
        var_dims.to_vec()
    }
}

impl PeftModel {
    /// Host copies of every trainable tensor under its checkpoint name; for full fine-tuning the
    /// block halves are expanded into timm names.
    pub fn trainable_host(&self) -> Result<BTreeMap<String, HostTensor>> {
        let (al, ml) = self.backbone.layouts();
        let mut out = BTreeMap::new();
        for (name, var) in self.trainable() {
            if let Some(block) = name
                .strip_suffix(".attn_half")
                .or_else(|| name.strip_suffix(".mlp_half"))
            {
                let lay = if name.ends_with("attn_half") { al } else { ml };
                let flat: Vec<f32> = var.as_tensor().to_dtype(DType::F32)?.to_vec1()?;
                for s in lay.slots.iter().filter(|s| s.present) {
                    out.insert(
                        format!("{block}.{}", s.name),
                        HostTensor::new(s.shape.clone(), flat[s.range()].to_vec()),
                    );
                }
            } else {
                let mut t = host(var.as_tensor())?;
                t.shape = file_shape(self, name, var.dims());
                out.insert(name.clone(), t);
            }
        }
        Ok(out)
    }

    /// Overwrites every trainable tensor from `tensors` (names as written by
    /// [`Self::trainable_host`]). Missing, unknown or mis-shaped tensors are errors naming them.
    pub fn set_trainable(&self, tensors: &BTreeMap<String, HostTensor>, path: &Path) -> Result<()> {
        let (al, ml) = self.backbone.layouts();
        let mut used = std::collections::BTreeSet::new();
        let mut get = |name: &str, shape: &[usize]| -> Result<&HostTensor> {
            let t = tensors.get(name).ok_or_else(|| ModelError::Missing {
                path: path.to_owned(),
                name: name.to_owned(),
            })?;
            if t.shape != shape {
                return Err(ModelError::Shape {
                    path: path.to_owned(),
                    name: name.to_owned(),
                    expected: shape.to_vec(),
                    got: t.shape.clone(),
                });
            }
            used.insert(name.to_owned());
            Ok(t)
        };
        for (name, var) in self.trainable() {
            let device = var.device();
            let value = if let Some(block) = name
                .strip_suffix(".attn_half")
                .or_else(|| name.strip_suffix(".mlp_half"))
            {
                let lay = if name.ends_with("attn_half") { al } else { ml };
                let mut flat: Vec<f32> = var.as_tensor().to_dtype(DType::F32)?.to_vec1()?;
                for s in lay.slots.iter().filter(|s| s.present) {
                    flat[s.range()].copy_from_slice(&get(&format!("{block}.{}", s.name), &s.shape)?.data);
                }
                Tensor::from_vec(flat, var.dims(), device)?
            } else {
                let t = get(name, &file_shape(self, name, var.dims()))?;
                Tensor::from_vec(t.data.clone(), var.dims(), device)?
            };
            var.set(&value.to_dtype(var.dtype())?)?;
        }
        let unknown: Vec<String> = tensors.keys().filter(|k| !used.contains(*k)).cloned().collect();
        if unknown.is_empty() {
            self.check_coeff_ranges(path)
        } else {
            Err(ModelError::Unknown {
                path: path.to_owned(),
                names: unknown,
            })
        }
    }

    /// Every MoPPA coefficient read from `path` is usable in f32 (finite and > 0): a damaged or
    /// hand-edited file must not poison a resumed run or an evaluation with an inf, a NaN or an
    /// ε of 0. (Training may carry a coefficient past the range a user may set, `config::range`:
    /// such a checkpoint is still the run's own and loads.)
    fn check_coeff_ranges(&self, path: &Path) -> Result<()> {
        for b in self.moppa_blocks() {
            let Some(unit) = self.moppa_unit(b) else { continue };
            for (c, values) in unit.coeffs().iter() {
                if let Some(v) = values.iter().find(|v| !(**v as f32 > 0.0 && (**v as f32).is_finite())) {
                    return Err(ModelError::Format {
                        path: path.to_owned(),
                        msg: format!(
                            "block {b}: {} = {} is not usable (it must be finite and > 0 in f32)",
                            c.name(),
                            crate::util::short_number(*v)
                        ),
                    });
                }
            }
        }
        Ok(())
    }

    /// The backbone description stored with an adapter: its config plus the file's sha256.
    #[must_use]
    pub fn backbone_meta(&self) -> String {
        let mut v = serde_json::to_value(&self.backbone.cfg).unwrap_or_default();
        if let Some(obj) = v.as_object_mut() {
            obj.insert("sha256".into(), self.backbone.source.sha256.clone().into());
        }
        v.to_string()
    }

    /// The adapter file's bytes: every trainable tensor (finite, or an error naming it) with the
    /// run config (flat JSON; it must contain the method fields), the backbone's description, the
    /// class names and the step it was taken at.
    pub fn encode_adapter(&self, path: &Path, run_config: &str, step: u64) -> Result<Vec<u8>> {
        let tensors = self.trainable_host()?;
        for (name, t) in &tensors {
            if t.data.iter().any(|v| !v.is_finite()) {
                return Err(ModelError::Config(format!(
                    "refusing to write {}: tensor '{name}' is not finite",
                    path.display()
                )));
            }
        }
        let meta: HashMap<String, String> = [
            (KEY_FORMAT.to_owned(), ADAPTER_FORMAT.to_owned()),
            (KEY_CONFIG.to_owned(), run_config.to_owned()),
            (KEY_BACKBONE.to_owned(), self.backbone_meta()),
            (
                KEY_CLASSES.to_owned(),
                serde_json::to_string(&self.classes).unwrap_or_default(),
            ),
            (KEY_STEP.to_owned(), step.to_string()),
        ]
        .into();
        encode(path, &tensors, &meta, StoreAs::F32)
    }

    /// Writes the adapter atomically (temporary file, fsync, rename).
    pub fn save_adapter(&self, path: &Path, run_config: &str, step: u64) -> Result<()> {
        let data = self.encode_adapter(path, run_config, step)?;
        stage(path, &data)?.commit().map_err(|source| ModelError::Io {
            path: path.to_owned(),
            error: source,
        })
    }
}

/// What an adapter file says about itself.
#[derive(Debug, Clone)]
pub struct AdapterInfo {
    /// The run config as stored.
    pub run_config: serde_json::Value,
    /// The method.
    pub method: MethodConfig,
    /// The backbone it was trained on.
    pub backbone: VitConfig,
    /// That backbone file's sha256 (empty for random weights).
    pub backbone_sha256: String,
    /// Class names.
    pub classes: Vec<String>,
}

/// Reads an adapter file's metadata.
pub fn adapter_info(tf: &TensorFile) -> Result<AdapterInfo> {
    let bad = |msg: String| ModelError::Format {
        path: tf.path.clone(),
        msg,
    };
    match tf.metadata.get(KEY_FORMAT).map(String::as_str) {
        Some(ADAPTER_FORMAT) => {}
        Some(other) => {
            return Err(bad(format!(
                "unsupported adapter format '{other}' (this build reads {ADAPTER_FORMAT})"
            )));
        }
        None => {
            return Err(bad(format!("not a MoPPA Studio adapter (no {KEY_FORMAT} metadata)")));
        }
    }
    let field = |key: &str| {
        tf.metadata
            .get(key)
            .ok_or_else(|| bad(format!("missing {key} metadata")))
    };
    let run_config: serde_json::Value =
        serde_json::from_str(field(KEY_CONFIG)?).map_err(|e| bad(format!("bad {KEY_CONFIG}: {e}")))?;
    let method: MethodConfig =
        serde_json::from_value(run_config.clone()).map_err(|e| bad(format!("bad method in {KEY_CONFIG}: {e}")))?;
    let backbone_json: serde_json::Value =
        serde_json::from_str(field(KEY_BACKBONE)?).map_err(|e| bad(format!("bad {KEY_BACKBONE}: {e}")))?;
    let backbone: VitConfig =
        serde_json::from_value(backbone_json.clone()).map_err(|e| bad(format!("bad {KEY_BACKBONE}: {e}")))?;
    let backbone_sha256 = backbone_json
        .get("sha256")
        .and_then(|v| v.as_str())
        .unwrap_or_default()
        .to_owned();
    let classes: Vec<String> =
        serde_json::from_str(field(KEY_CLASSES)?).map_err(|e| bad(format!("bad {KEY_CLASSES}: {e}")))?;
    Ok(AdapterInfo {
        run_config,
        method,
        backbone,
        backbone_sha256,
        classes,
    })
}

/// Loads an adapter onto `backbone`. The backbone must be the file it was trained on (same
/// sha256) unless `force`, and must always have the same shapes (width, depth, grid, tokens).
pub fn load_adapter(path: &Path, backbone: Vit, force: bool) -> Result<PeftModel> {
    load_adapter_noting(path, backbone, force).map(|(m, _)| m)
}

/// [`load_adapter`], also returning what the user should be told: that `force` loaded it onto a
/// backbone file other than its own.
pub fn load_adapter_noting(path: &Path, backbone: Vit, force: bool) -> Result<(PeftModel, Option<String>)> {
    let tf = TensorFile::read(path)?;
    let info = adapter_info(&tf)?;
    if let Some((name, _)) = tf.tensors.iter().find(|(_, t)| t.data.iter().any(|v| !v.is_finite())) {
        return Err(ModelError::Format {
            path: path.to_owned(),
            msg: format!("tensor '{name}' holds NaN or infinite values"),
        });
    }
    let (want, have) = (&info.backbone, &backbone.cfg);
    let shape = |c: &VitConfig| {
        (
            c.embed_dim,
            c.depth,
            c.grid(),
            c.prefix_tokens,
            c.mlp_hidden(),
            c.num_heads,
        )
    };
    if shape(want) != shape(have) {
        return Err(ModelError::Incompatible(format!(
            "{}: adapter was trained on a backbone with D {}, depth {}, grid {g}×{g}, {} prefix tokens; this backbone has D {}, depth {}, grid {h}×{h}, {} prefix tokens",
            path.display(),
            want.embed_dim,
            want.depth,
            want.prefix_tokens,
            have.embed_dim,
            have.depth,
            have.prefix_tokens,
            g = want.grid(),
            h = have.grid(),
        )));
    }
    let have_sha = &backbone.source.sha256;
    let mut note = None;
    if info.backbone_sha256 != *have_sha {
        let what = format!(
            "{}: adapter was trained on backbone sha256 {}, this backbone ({}) is {}",
            path.display(),
            short(&info.backbone_sha256),
            backbone
                .source
                .path
                .as_ref()
                .map_or_else(|| "random weights".into(), |p| p.display().to_string()),
            short(have_sha),
        );
        if !force {
            return Err(ModelError::Incompatible(format!(
                "{what}; pass --force to load it onto a different file with identical shapes"
            )));
        }
        note = Some(format!("--force: {what}; the results describe that other backbone"));
    }
    let model = PeftModel::new(backbone, info.method.clone(), info.classes.clone(), 0)?;
    model.set_trainable(&tf.tensors, path)?;
    Ok((model, note))
}

fn short(sha: &str) -> String {
    if sha.is_empty() {
        "(none: random weights)".into()
    } else {
        sha.chars().take(12).collect()
    }
}

/// Loads the backbone named in an adapter when none is given: not possible (adapters do not embed
/// it), so this reports what is needed.
#[must_use]
pub fn backbone_hint(info: &AdapterInfo) -> String {
    format!(
        "this adapter needs its backbone: a ViT with D {}, depth {}, {} px, patch {} (sha256 {})",
        info.backbone.embed_dim,
        info.backbone.depth,
        info.backbone.img_size,
        info.backbone.patch_size,
        short(&info.backbone_sha256)
    )
}
