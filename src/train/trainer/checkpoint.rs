//! Checkpoints: the adapter (the user-facing result) and the resume state (weights, optimizer
//! moments, schedule, data position, live settings), written atomically into the run folder.

use super::Trainer;
use crate::data::DataError;
use crate::model::PeftModel;
use crate::model::checkpoint::KEY_CONFIG;
use crate::model::tensor_file::{HostTensor, StoreAs, TensorFile, write_atomic};
use crate::train::error::{Result, TrainError};
use crate::train::optim::AdamW;
use candle_core::{DType, Device, Tensor};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

/// Metadata key of the resume state in `state.safetensors`.
const KEY_STATE: &str = "moppa.state";

/// State saved for `--resume` (JSON in `state.safetensors` metadata).
#[derive(serde::Serialize, serde::Deserialize, Default)]
pub(super) struct ResumeState {
    pub(super) step: u64,
    opt_t: u64,
    pub(super) loader_epoch: u64,
    pub(super) loader_index: u64,
    peak_lr: f64,
    tau: f64,
    gamma: f64,
    temperature: f64,
    route_weight: f64,
    locked: Vec<String>,
    best_val: Option<f64>,
    time_s: f64,
    probe: usize,
}

fn host(t: &Tensor) -> candle_core::Result<HostTensor> {
    Ok(HostTensor::new(
        t.dims().to_vec(),
        t.flatten_all()?.to_dtype(DType::F32)?.to_vec1()?,
    ))
}

/// Reads `dir/state.safetensors` into the model's trainable tensors and the optimizer (moments,
/// step count, locks); returns the rest of the state for [`Trainer::restore`].
pub(super) fn read_state(dir: &Path, model: &PeftModel, opt: &mut AdamW, device: &Device) -> Result<ResumeState> {
    let path = dir.join("state.safetensors");
    let tf = TensorFile::read(&path)?;
    let bad = |msg: String| TrainError::Data(DataError::file(&path, msg));
    let state: ResumeState = tf
        .metadata
        .get(KEY_STATE)
        .and_then(|s| serde_json::from_str(s).ok())
        .ok_or_else(|| bad(format!("not a MoPPA Studio state file (no {KEY_STATE} metadata)")))?;
    for (name, var) in model.trainable() {
        let t = tf
            .get_shaped(&format!("param.{name}"), var.dims())
            .map_err(|e| bad(e.to_string()))?;
        var.set(&Tensor::from_vec(t.data.clone(), var.dims(), var.device())?.to_dtype(var.dtype())?)?;
    }
    for (name, _) in model.trainable() {
        let m = tf.get(&format!("adam_m.{name}")).map_err(|e| bad(e.to_string()))?;
        let v = tf.get(&format!("adam_v.{name}")).map_err(|e| bad(e.to_string()))?;
        opt.set_moments(name, &m.to_tensor(device)?, &v.to_tensor(device)?)?;
    }
    opt.t = state.opt_t;
    for name in &state.locked {
        opt.set_locked(name, true);
    }
    Ok(state)
}

impl Trainer {
    /// Takes over the schedule, clock and live settings of a resumed run.
    pub(super) fn restore(&mut self, state: &ResumeState) {
        self.step = state.step;
        self.position = (state.loader_epoch, state.loader_index);
        self.peak_lr = state.peak_lr;
        let live = &mut self.model.live;
        (live.tau, live.gamma, live.temperature, live.route_weight) =
            (state.tau, state.gamma, state.temperature, state.route_weight);
        self.best_val = state.best_val;
        self.time_offset = state.time_s;
        self.probe = state.probe;
    }

    /// Writes the adapter (atomically) with the resolved run config.
    pub fn save_adapter(&self, path: &Path) -> Result<()> {
        let run = serde_json::to_string(&self.cfg).unwrap_or_default();
        self.model.save_adapter(path, &run)?;
        Ok(())
    }

    /// Writes `adapter.safetensors` and `state.safetensors` into the run folder (if any).
    pub fn checkpoint(&mut self) -> Result<Vec<PathBuf>> {
        let Some(out) = self.cfg.out.clone() else {
            return Ok(Vec::new());
        };
        let adapter = out.join("adapter.safetensors");
        self.save_adapter(&adapter)?;
        let state = out.join("state.safetensors");
        self.save_state(&state)?;
        for p in [&adapter, &state] {
            if !self.checkpoints.contains(p) {
                self.checkpoints.push(p.clone());
            }
        }
        Ok(vec![adapter, state])
    }

    fn save_state(&self, path: &Path) -> Result<()> {
        let mut tensors: BTreeMap<String, HostTensor> = BTreeMap::new();
        for (name, var) in self.model.trainable() {
            tensors.insert(format!("param.{name}"), host(var.as_tensor())?);
        }
        for (name, m, v) in self.opt.moments()? {
            tensors.insert(format!("adam_m.{name}"), host(&m)?);
            tensors.insert(format!("adam_v.{name}"), host(&v)?);
        }
        let live = &self.model.live;
        let state = ResumeState {
            step: self.step,
            opt_t: self.opt.t,
            loader_epoch: self.position.0,
            loader_index: self.position.1,
            peak_lr: self.peak_lr,
            tau: live.tau,
            gamma: live.gamma,
            temperature: live.temperature,
            route_weight: live.route_weight,
            locked: self.opt.locked().iter().cloned().collect(),
            best_val: self.best_val,
            time_s: self.time_s(),
            probe: self.probe,
        };
        let meta: HashMap<String, String> = [
            (KEY_STATE.to_owned(), serde_json::to_string(&state).unwrap_or_default()),
            (
                KEY_CONFIG.to_owned(),
                serde_json::to_string(&self.cfg).unwrap_or_default(),
            ),
        ]
        .into();
        write_atomic(path, &tensors, &meta, StoreAs::F32)?;
        Ok(())
    }
}
