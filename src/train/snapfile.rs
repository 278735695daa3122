//! `snapshots.jsonl` (INTERFACES.md): the live internals of a MoPPA run, one JSON object per line
//! after a header, appended by the worker so every complete line survives a crash. Both
//! directions live here: [`SnapshotLog`] writes records from the protocol's [`Snapshot`] (the
//! filters are left out: they follow from the coefficients), and [`record_to_snapshot`] turns a
//! record back into a `Snapshot` with the filters recomputed, for a run folder opened later.
//!
//! Cadence: a record every `10 · 2^⌊n/500⌋` steps after `n` records (dense early, thinning as the
//! run grows), at every evaluation and at the end. Values carry 5 significant digits. A
//! 10,000-step MoPPA r8 run of the tiny preset writes ~750 records of ~8 kB (README).

use super::protocol::{BlockSnapshot, ProbeOrigin, RouterStats, Snapshot};
use crate::config::{Coeff, Lockable, PerCoeff, Prior};
use crate::physics::{channel_gain, laplacian_eigenvalues};
use serde_json::{Value, json};
use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write as _};
use std::path::Path;

/// The file's name in a run folder.
pub const SNAPSHOTS_JSONL: &str = "snapshots.jsonl";
/// The format the header announces.
pub const FORMAT: u64 = 1;
/// Steps between records at the start.
const BASE_INTERVAL: u64 = 10;
/// Records after which the interval doubles.
const RECORDS_PER_DOUBLING: u64 = 500;

/// `v` rounded to 5 significant digits (a shorter file, the same pictures).
fn sig5(v: f32) -> Value {
    let v = f64::from(v);
    if v == 0.0 || !v.is_finite() {
        return json!(if v.is_finite() { 0.0 } else { v });
    }
    let scale = 10f64.powi(4 - v.abs().log10().floor() as i32);
    json!((v * scale).round() / scale)
}

fn list(v: &[f32]) -> Value {
    Value::Array(v.iter().map(|x| sig5(*x)).collect())
}

/// The header line: what every record's arrays are shaped by.
#[must_use]
pub fn header(blocks: usize, rank: usize, grid: (usize, usize), priors: &[Prior]) -> Value {
    json!({"kind": "header", "format": FORMAT, "blocks": blocks, "rank": rank,
        "grid": [grid.0, grid.1], "priors": priors})
}

/// A snapshot as a record (without the filters, which follow from the coefficients).
#[must_use]
pub fn snapshot_record(s: &Snapshot, time_s: f64) -> Value {
    let mut v = json!({"kind": "snapshot", "step": s.step, "time_s": time_s, "tau": s.tau, "gamma": s.gamma,
        "route_weight": s.route_weight, "temperature": s.temperature});
    for c in Coeff::ALL {
        if s.priors.contains(&c.prior()) {
            v[c.name()] = Value::Array(s.blocks.iter().map(|b| list(&b.coeffs[c])).collect());
        }
    }
    if s.priors.contains(&Prior::Poisson) {
        v["source"] = Value::Array(s.blocks.iter().map(|b| list(&b.source)).collect());
    }
    v["locks"] = Value::Array(s.blocks.iter().map(|b| json!(b.locked)).collect());
    v["router"] = Value::Array(
        s.blocks
            .iter()
            .map(|b| match &b.router {
                Some(r) => {
                    json!({"mean": list(&r.mean_alpha), "entropy": sig5(r.entropy), "share": list(&r.argmax_share)})
                }
                None => Value::Null,
            })
            .collect(),
    );
    if let Some(p) = &s.probe {
        let alpha = s.blocks.iter().map(|b| list(&b.probe_alpha)).collect::<Vec<_>>();
        v["probe"] = match &p.origin {
            ProbeOrigin::Val { index, label } => {
                json!({"index": index, "label": label, "prediction": s.probe_prediction, "alpha": alpha})
            }
            ProbeOrigin::File { name } => json!({"file": name, "prediction": s.probe_prediction, "alpha": alpha}),
        };
    }
    v
}

/// Appends records to a run folder's `snapshots.jsonl` at the cadence above.
pub struct SnapshotLog {
    file: BufWriter<File>,
    records: u64,
    last_step: Option<u64>,
}

impl SnapshotLog {
    /// Opens (or appends to) `dir/snapshots.jsonl`; a new or empty file gets the header first.
    pub fn open(dir: &Path, header: &Value) -> std::io::Result<Self> {
        let path = dir.join(SNAPSHOTS_JSONL);
        let existing = std::fs::read_to_string(&path).unwrap_or_default();
        let records = existing.lines().filter(|l| l.contains("\"snapshot\"")).count() as u64;
        let fresh = existing.trim().is_empty();
        let mut file = BufWriter::new(OpenOptions::new().create(true).append(true).open(&path)?);
        if !existing.is_empty() && !existing.ends_with('\n') {
            // A line cut by a crash: end it, so the next record starts on its own line.
            writeln!(file)?;
        }
        if fresh {
            writeln!(file, "{header}")?;
            file.flush()?;
        }
        Ok(Self {
            file,
            records,
            last_step: None,
        })
    }

    /// Steps between records now.
    #[must_use]
    pub fn interval(&self) -> u64 {
        BASE_INTERVAL << (self.records / RECORDS_PER_DOUBLING).min(20)
    }

    /// Whether step `step` gets a record (besides evaluations and the end).
    #[must_use]
    pub fn due(&self, step: u64) -> bool {
        step.is_multiple_of(self.interval()) && self.last_step != Some(step)
    }

    /// Appends one record (one per step at most) and flushes it: a crash never leaves half a
    /// line behind it.
    pub fn write(&mut self, s: &Snapshot, time_s: f64) -> std::io::Result<()> {
        if self.last_step == Some(s.step) {
            return Ok(());
        }
        writeln!(self.file, "{}", snapshot_record(s, time_s))?;
        self.file.flush()?;
        self.records += 1;
        self.last_step = Some(s.step);
        Ok(())
    }
}

/// The header's shape of a `snapshots.jsonl`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    /// MoPPA blocks.
    pub blocks: usize,
    /// Rank.
    pub rank: usize,
    /// Token grid.
    pub grid: (usize, usize),
    /// Active priors.
    pub priors: Vec<Prior>,
}

/// Parses a header line.
#[must_use]
pub fn parse_header(v: &Value) -> Option<Header> {
    if v["kind"] != "header" || v["format"].as_u64() != Some(FORMAT) {
        return None;
    }
    let grid = v["grid"].as_array()?;
    Some(Header {
        blocks: v["blocks"].as_u64()? as usize,
        rank: v["rank"].as_u64()? as usize,
        grid: (grid.first()?.as_u64()? as usize, grid.get(1)?.as_u64()? as usize),
        priors: serde_json::from_value(v["priors"].clone()).ok()?,
    })
}

fn floats(v: &Value) -> Vec<f32> {
    v.as_array()
        .map(|a| a.iter().map(|x| x.as_f64().unwrap_or(f64::NAN) as f32).collect())
        .unwrap_or_default()
}

fn per_block(v: &Value, b: usize) -> Vec<f32> {
    v.get(b).map(floats).unwrap_or_default()
}

/// A record back into a [`Snapshot`]: coefficients, source, router, probe weights as written,
/// and each block's channel-mean filters and their router-weighted mix recomputed from the
/// coefficients (the probe's pixels are not in the file: `probe` carries none).
#[must_use]
pub fn record_to_snapshot(v: &Value, h: &Header) -> Option<Snapshot> {
    if v["kind"] != "snapshot" {
        return None;
    }
    let (gh, gw) = h.grid;
    let lambda = laplacian_eigenvalues(gh, gw);
    let tau = v["tau"].as_f64()?;
    let gamma = v["gamma"].as_f64().unwrap_or(0.0);
    let k = h.priors.len();
    let mut blocks = Vec::with_capacity(h.blocks);
    for b in 0..h.blocks {
        let coeffs = PerCoeff::from_fn(|c| per_block(&v[c.name()], b));
        let source = per_block(&v["source"], b);
        let source64: Vec<f64> = source.iter().map(|x| f64::from(*x)).collect();
        let filters_mean: Vec<Vec<f32>> = h
            .priors
            .iter()
            .map(|p| {
                let values = &coeffs[p.coeff()];
                let mut mean = vec![0f64; gh * gw];
                for &c in values {
                    let g = channel_gain(
                        *p,
                        &lambda,
                        f64::from(c),
                        tau,
                        gamma,
                        (!source64.is_empty()).then_some(source64.as_slice()),
                    )
                    .unwrap_or_default();
                    for (m, x) in mean.iter_mut().zip(g) {
                        *m += x;
                    }
                }
                let n = values.len().max(1) as f64;
                mean.into_iter().map(|m| (m / n) as f32).collect()
            })
            .collect();
        let router = v["router"].get(b).filter(|r| !r.is_null()).map(|r| {
            let entropy = r["entropy"].as_f64().unwrap_or(0.0) as f32;
            RouterStats {
                mean_alpha: floats(&r["mean"]),
                entropy,
                entropy_norm: if k > 1 { entropy / (k as f32).ln() } else { 0.0 },
                argmax_share: floats(&r["share"]),
            }
        });
        let weights: Vec<f32> = router
            .as_ref()
            .map_or_else(|| vec![1.0 / k.max(1) as f32; k], |r| r.mean_alpha.clone());
        let mix = (0..gh * gw)
            .map(|i| {
                filters_mean
                    .iter()
                    .zip(&weights)
                    .map(|(f, a)| f.get(i).copied().unwrap_or(0.0) * a)
                    .sum()
            })
            .collect();
        let locked: Vec<Lockable> = serde_json::from_value(v["locks"][b].clone()).unwrap_or_default();
        blocks.push(BlockSnapshot {
            block: b,
            filters_mean,
            filters_channel: Vec::new(),
            mix,
            coeffs,
            source,
            router,
            probe_alpha: per_block(&v["probe"]["alpha"], b),
            locked,
        });
    }
    Some(Snapshot {
        step: v["step"].as_u64()?,
        grid: h.grid,
        priors: h.priors.clone(),
        channel: None,
        tau,
        gamma,
        route_weight: v["route_weight"].as_f64().unwrap_or(0.0),
        temperature: v["temperature"].as_f64().unwrap_or(1.0),
        blocks,
        probe: None,
        probe_prediction: v["probe"]["prediction"].as_u64().map(|p| p as u32),
    })
}
