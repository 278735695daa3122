//! Checkpoints: the adapter (the user-facing result) and the resume state (weights, optimizer
//! moments, schedule, data position, live settings) of one step, a consistent pair: both files are
//! written and synced under temporary names before either replaces its predecessor, so a failure
//! (a full disk, a kill) leaves the previous pair in place; `--resume` checks that the adapter
//! belongs to the state. The best validation accuracy's adapter is kept apart.

use super::Trainer;
use crate::data::DataError;
use crate::model::ModelError;
use crate::model::PeftModel;
use crate::model::checkpoint::{KEY_CONFIG, KEY_STEP};
use crate::model::tensor_file::{HostTensor, StoreAs, TensorFile, encode, stage};
use crate::train::error::{Result, TrainError};
use crate::train::optim::AdamW;
use crate::train::runfolder::{ADAPTER, ADAPTER_BEST, STATE};
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
    let path = dir.join(STATE);
    let tf = TensorFile::read(&path)?;
    let bad = |msg: String| TrainError::Data(DataError::file(&path, msg));
    if let Some((name, _)) = tf.tensors.iter().find(|(_, t)| t.data.iter().any(|v| !v.is_finite())) {
        return Err(bad(format!(
            "tensor '{name}' holds NaN or infinite values: this state cannot be resumed"
        )));
    }
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

    fn run_config_json(&self) -> String {
        serde_json::to_string(&self.cfg).unwrap_or_default()
    }

    /// Writes the adapter (atomically) with the resolved run config.
    pub fn save_adapter(&self, path: &Path) -> Result<()> {
        self.model.save_adapter(path, &self.run_config_json(), self.step)?;
        Ok(())
    }

    /// Writes `adapter-best.safetensors` (the weights now, at a new best validation accuracy).
    pub fn save_best(&mut self) -> Result<Option<PathBuf>> {
        let Some(out) = self.cfg.out.clone() else {
            return Ok(None);
        };
        let path = out.join(ADAPTER_BEST);
        self.save_adapter(&path)?;
        self.remember(&path);
        Ok(Some(path))
    }

    fn remember(&mut self, path: &Path) {
        if !self.checkpoints.iter().any(|p| p == path) {
            self.checkpoints.push(path.to_owned());
        }
    }

    /// Writes `adapter.safetensors` and `state.safetensors` of this step into the run folder (if
    /// any) as a pair: both are complete on disk before either replaces the previous pair.
    pub fn checkpoint(&mut self) -> Result<Vec<PathBuf>> {
        let Some(out) = self.cfg.out.clone() else {
            return Ok(Vec::new());
        };
        let adapter = out.join(ADAPTER);
        let state = out.join(STATE);
        let adapter_bytes = self
            .model
            .encode_adapter(&adapter, &self.run_config_json(), self.step)?;
        let staged_adapter = stage(&adapter, &adapter_bytes)?;
        let staged_state = stage(&state, &self.encode_state(&state)?)?;
        for (staged, path) in [(staged_adapter, &adapter), (staged_state, &state)] {
            staged.commit().map_err(|source| ModelError::Io {
                path: path.clone(),
                error: source,
            })?;
        }
        self.remember(&adapter);
        self.remember(&state);
        Ok(vec![adapter, state])
    }

    fn encode_state(&self, path: &Path) -> Result<Vec<u8>> {
        let mut tensors: BTreeMap<String, HostTensor> = BTreeMap::new();
        for (name, var) in self.model.trainable() {
            tensors.insert(format!("param.{name}"), host(var.as_tensor())?);
        }
        for (name, m, v) in self.opt.moments()? {
            tensors.insert(format!("adam_m.{name}"), host(&m)?);
            tensors.insert(format!("adam_v.{name}"), host(&v)?);
        }
        if crate::panics::fault("nonfinite-state", self.step)
            && let Some(v) = tensors.values_mut().next().and_then(|t| t.data.first_mut())
        {
            *v = f32::NAN;
        }
        // A state that cannot be resumed is never written: the last good pair stays.
        if let Some((name, _)) = tensors.iter().find(|(_, t)| t.data.iter().any(|v| !v.is_finite())) {
            return Err(ModelError::Config(format!(
                "refusing to write {}: tensor '{name}' is not finite",
                path.display()
            ))
            .into());
        }
        let live = &self.model.live;
        if let Some((name, v)) = [
            ("lr", self.peak_lr),
            ("tau", live.tau),
            ("gamma", live.gamma),
            ("temperature", live.temperature),
            ("route_weight", live.route_weight),
        ]
        .into_iter()
        .find(|(_, v)| !(*v as f32).is_finite())
        {
            return Err(ModelError::Config(format!(
                "refusing to write {}: {name} = {v} is not finite in f32",
                path.display()
            ))
            .into());
        }
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
            (KEY_CONFIG.to_owned(), self.run_config_json()),
            (KEY_STEP.to_owned(), self.step.to_string()),
        ]
        .into();
        Ok(encode(path, &tensors, &meta, StoreAs::F32)?)
    }

    /// After `--resume`: the adapter must be the state's pair. One from another step (the write
    /// of a checkpoint was cut between its two files) is rewritten from the resumed weights.
    pub(super) fn verify_pair(&mut self) -> Result<()> {
        let Some(dir) = self.cfg.resume.clone() else {
            return Ok(());
        };
        let path = dir.join(ADAPTER);
        let step = TensorFile::read_header(&path)
            .ok()
            .and_then(|tf| tf.metadata.get(KEY_STEP).and_then(|s| s.parse::<u64>().ok()));
        if step != Some(self.step) {
            let mut n = self.notice(format!(
                "{} was not of the state's step {} ({}); rewritten from the resumed weights",
                ADAPTER,
                self.step,
                step.map_or_else(|| "unreadable or unknown step".into(), |s| format!("step {s}"))
            ));
            n.path = Some(path.clone());
            self.notices.push(n);
            self.save_adapter(&path)?;
        }
        Ok(())
    }
}
