//! Reading and writing safetensors files with their `__metadata__`, on the host.

use super::error::{ModelError, Result};
use safetensors::{Dtype, SafeTensors};
use sha2::{Digest as _, Sha256};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

/// A tensor on the host, as `f32` (f16/bf16/f64 files are converted on load).
#[derive(Clone, Debug, PartialEq)]
pub struct HostTensor {
    /// Shape.
    pub shape: Vec<usize>,
    /// Row-major values.
    pub data: Vec<f32>,
}

impl HostTensor {
    /// A tensor from a shape and values.
    #[must_use]
    pub fn new(shape: Vec<usize>, data: Vec<f32>) -> Self {
        Self { shape, data }
    }

    /// As a candle tensor.
    pub fn to_tensor(&self, device: &candle_core::Device) -> candle_core::Result<candle_core::Tensor> {
        candle_core::Tensor::from_vec(self.data.clone(), self.shape.as_slice(), device)
    }
}

/// Integer tensors (labels in fixtures) are kept apart from the float ones.
#[derive(Clone, Debug, Default)]
pub struct TensorFile {
    /// Where it came from.
    pub path: PathBuf,
    /// Float tensors by name.
    pub tensors: BTreeMap<String, HostTensor>,
    /// Integer tensors by name (as i64).
    pub int_tensors: BTreeMap<String, (Vec<usize>, Vec<i64>)>,
    /// `__metadata__`.
    pub metadata: HashMap<String, String>,
    /// sha256 of the file's bytes, lower-case hex.
    pub sha256: String,
}

fn format_err(path: &Path, msg: impl Into<String>) -> ModelError {
    ModelError::Format {
        path: path.to_owned(),
        msg: msg.into(),
    }
}

impl TensorFile {
    /// Reads and decodes a whole file.
    pub fn read(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|source| ModelError::Io {
            path: path.to_owned(),
            error: source,
        })?;
        Self::from_bytes(path, &bytes)
    }

    /// Decodes file contents (`path` is only used in messages).
    pub fn from_bytes(path: &Path, bytes: &[u8]) -> Result<Self> {
        if bytes.is_empty() {
            return Err(format_err(path, "the file is empty"));
        }
        let st =
            SafeTensors::deserialize(bytes).map_err(|e| format_err(path, format!("not a safetensors file ({e})")))?;
        let (_, meta) = SafeTensors::read_metadata(bytes).map_err(|e| format_err(path, format!("bad header ({e})")))?;
        let mut out = Self {
            path: path.to_owned(),
            metadata: meta.metadata().clone().unwrap_or_default(),
            sha256: hex(&Sha256::digest(bytes)),
            ..Self::default()
        };
        for (name, view) in st.tensors() {
            let shape = view.shape().to_vec();
            let raw = view.data();
            let data: Vec<f32> = match view.dtype() {
                Dtype::F32 => raw
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                    .collect(),
                Dtype::F16 => raw
                    .chunks_exact(2)
                    .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
                    .collect(),
                Dtype::BF16 => raw
                    .chunks_exact(2)
                    .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
                    .collect(),
                Dtype::F64 => raw
                    .chunks_exact(8)
                    .map(|b| f64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]) as f32)
                    .collect(),
                Dtype::I64 => {
                    let v = raw
                        .chunks_exact(8)
                        .map(|b| i64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]))
                        .collect();
                    out.int_tensors.insert(name, (shape, v));
                    continue;
                }
                Dtype::I32 => {
                    let v = raw
                        .chunks_exact(4)
                        .map(|b| i64::from(i32::from_le_bytes([b[0], b[1], b[2], b[3]])))
                        .collect();
                    out.int_tensors.insert(name, (shape, v));
                    continue;
                }
                other => {
                    return Err(format_err(
                        path,
                        format!("tensor '{name}' has unsupported dtype {other:?}"),
                    ));
                }
            };
            out.tensors.insert(name, HostTensor { shape, data });
        }
        Ok(out)
    }

    /// A float tensor by name (an integer tensor of that name is an error saying so).
    pub fn get(&self, name: &str) -> Result<&HostTensor> {
        if self.int_tensors.contains_key(name) {
            return Err(format_err(
                &self.path,
                format!("tensor '{name}' holds integers; a floating-point tensor is expected"),
            ));
        }
        self.tensors.get(name).ok_or_else(|| ModelError::Missing {
            path: self.path.clone(),
            name: name.to_owned(),
        })
    }

    /// Reads only a file's header: metadata and every tensor's name, dtype class and shape, with
    /// no values (`data` empty, `sha256` empty). For describing a checkpoint without loading it.
    pub fn read_header(path: &Path) -> Result<Self> {
        use std::io::Read as _;
        let io = |source| ModelError::Io {
            path: path.to_owned(),
            error: source,
        };
        let mut f = std::fs::File::open(path).map_err(io)?;
        let mut len = [0u8; 8];
        f.read_exact(&mut len)
            .map_err(|_| format_err(path, "not a safetensors file (shorter than its 8-byte header length)"))?;
        let n = u64::from_le_bytes(len);
        let size = f.metadata().map_err(io)?.len();
        if n == 0 || n > 100 << 20 || n + 8 > size {
            return Err(format_err(
                path,
                format!("not a safetensors file (header length {n} for a file of {size} bytes)"),
            ));
        }
        let mut header = vec![0u8; n as usize];
        f.read_exact(&mut header).map_err(io)?;
        let json: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&header)
            .map_err(|e| format_err(path, format!("not a safetensors file (bad header: {e})")))?;
        let mut out = Self {
            path: path.to_owned(),
            ..Self::default()
        };
        for (name, v) in json {
            if name == "__metadata__" {
                out.metadata = v
                    .as_object()
                    .map(|o| {
                        o.iter()
                            .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_owned())))
                            .collect()
                    })
                    .unwrap_or_default();
                continue;
            }
            let shape: Vec<usize> = v["shape"]
                .as_array()
                .map(|a| a.iter().filter_map(|d| d.as_u64().map(|d| d as usize)).collect())
                .ok_or_else(|| format_err(path, format!("tensor '{name}' has no shape in the header")))?;
            match v["dtype"].as_str() {
                Some("I64" | "I32" | "I16" | "I8" | "U8" | "U16" | "U32" | "U64" | "BOOL") => {
                    out.int_tensors.insert(name, (shape, Vec::new()));
                }
                _ => {
                    out.tensors.insert(
                        name,
                        HostTensor {
                            shape,
                            data: Vec::new(),
                        },
                    );
                }
            }
        }
        Ok(out)
    }

    /// A float tensor checked against an expected shape.
    pub fn get_shaped(&self, name: &str, expected: &[usize]) -> Result<&HostTensor> {
        let t = self.get(name)?;
        if t.shape != expected {
            return Err(ModelError::Shape {
                path: self.path.clone(),
                name: name.to_owned(),
                expected: expected.to_vec(),
                got: t.shape.clone(),
            });
        }
        Ok(t)
    }

    /// Whether a float tensor exists.
    #[must_use]
    pub fn has(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }
}

/// Lower-case hex of bytes.
#[must_use]
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes.iter().fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// sha256 of a file's bytes, lower-case hex.
pub fn sha256_file(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).map_err(|source| ModelError::Io {
        path: path.to_owned(),
        error: source,
    })?;
    Ok(hex(&Sha256::digest(&bytes)))
}

/// How to store floats in a written file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StoreAs {
    /// Full precision.
    F32,
    /// Half precision (the built-in backbone, to stay inside the assets budget).
    F16,
}

/// Encodes tensors and metadata as safetensors bytes (`path` only names the file in errors).
pub fn encode<S: std::hash::BuildHasher>(
    path: &Path,
    tensors: &BTreeMap<String, HostTensor>,
    metadata: &HashMap<String, String, S>,
    store: StoreAs,
) -> Result<Vec<u8>> {
    let bytes: Vec<(String, Vec<u8>, Vec<usize>)> = tensors
        .iter()
        .map(|(name, t)| {
            let raw = match store {
                StoreAs::F32 => t.data.iter().flat_map(|v| v.to_le_bytes()).collect(),
                StoreAs::F16 => t
                    .data
                    .iter()
                    .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
                    .collect(),
            };
            (name.clone(), raw, t.shape.clone())
        })
        .collect();
    let dtype = match store {
        StoreAs::F32 => Dtype::F32,
        StoreAs::F16 => Dtype::F16,
    };
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = bytes
        .iter()
        .map(|(name, raw, shape)| {
            safetensors::tensor::TensorView::new(dtype, shape.clone(), raw)
                .map(|v| (name.clone(), v))
                .map_err(|e| format_err(path, format!("cannot encode '{name}': {e}")))
        })
        .collect::<Result<_>>()?;
    safetensors::serialize(
        views,
        Some(metadata.iter().map(|(k, v)| (k.clone(), v.clone())).collect()),
    )
    .map_err(|e| format_err(path, format!("cannot encode: {e}")))
}

/// Writes `bytes` to a temporary file next to `path` and syncs it, ready to be committed.
pub fn stage(path: &Path, bytes: &[u8]) -> Result<crate::util::StagedFile> {
    crate::util::StagedFile::write(path, |w| {
        use std::io::Write as _;
        w.write_all(bytes)
    })
    .map_err(|source| ModelError::Io {
        path: path.to_owned(),
        error: source,
    })
}

/// Writes tensors and metadata atomically: a temporary file in the same folder, fsync, rename.
/// A failure never leaves a half-written file behind.
pub fn write_atomic<S: std::hash::BuildHasher>(
    path: &Path,
    tensors: &BTreeMap<String, HostTensor>,
    metadata: &HashMap<String, String, S>,
    store: StoreAs,
) -> Result<()> {
    let data = encode(path, tensors, metadata, store)?;
    stage(path, &data)?.commit().map_err(|source| ModelError::Io {
        path: path.to_owned(),
        error: source,
    })
}
