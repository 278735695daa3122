//! `snapshots.jsonl` (INTERFACES.md): the live internals of a MoPPA run, one JSON object per line
//! after a header, appended by the worker so every complete line survives a crash. Both
//! directions live here: [`SnapshotLog`] writes records from the protocol's [`Snapshot`] (the
//! filters are left out: they follow from the coefficients), and [`snapshot_view`] turns a
//! record into what the views draw, filters recomputed, for a live run and a reopened one alike.
//!
//! Cadence: a record every `10 · 2^⌊n/500⌋` steps after `n` records (dense early, thinning as the
//! run grows), at every evaluation and at the end. Coefficients and the source map are written at
//! f32 precision, router statistics and probe weights at 5 significant digits. A
//! 10,000-step MoPPA r8 run of the tiny preset writes ~750 records of ~8 kB (README).

use super::protocol::{BlockSnapshot, RouterStats, Snapshot};
use super::record::{Record, RecordReader, SnapshotHeader, SnapshotRecord};
use crate::config::{Lockable, PerCoeff};
use crate::physics::{Dct2, channel_gain, impulse_response, laplacian_eigenvalues, radial_profile};
use std::fs::File;
use std::io::{BufWriter, Write as _};
use std::path::Path;

pub use super::record::snapshot::FORMAT;
pub use super::runfolder::SNAPSHOTS_JSONL;

/// Steps between records at the start.
const BASE_INTERVAL: u64 = 10;
/// Records after which the interval doubles.
const RECORDS_PER_DOUBLING: u64 = 500;

/// Appends records to a run folder's `snapshots.jsonl` at the cadence above.
pub struct SnapshotLog {
    file: BufWriter<File>,
    records: u64,
    last_step: Option<u64>,
}

impl SnapshotLog {
    /// Opens (or appends to) `dir/snapshots.jsonl`; a new or empty file gets the header first.
    /// The records already there are counted by streaming them (the cadence goes on).
    pub fn open(dir: &Path, header: &SnapshotHeader) -> std::io::Result<Self> {
        let path = dir.join(SNAPSHOTS_JSONL);
        let records = match RecordReader::open(&path) {
            Ok(r) => r.filter(|r| matches!(r, Record::Snapshot(_))).count() as u64,
            Err(_) => 0,
        };
        let (file, existed, cut) = super::runlog::open_append(&path)?;
        let mut file = BufWriter::new(file);
        if cut {
            // A line cut by a crash: end it, so the next record starts on its own line.
            writeln!(file)?;
        }
        if !existed {
            writeln!(file, "{}", Record::Header(header.clone()).to_line())?;
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
    pub fn write(&mut self, s: &SnapshotRecord) -> std::io::Result<()> {
        if self.last_step == Some(s.step) {
            return Ok(());
        }
        let record = Record::Snapshot(Box::new(s.clone()));
        writeln!(self.file, "{}", record.to_line())?;
        self.file.flush()?;
        self.records += 1;
        self.last_step = Some(s.step);
        Ok(())
    }
}

fn floats(v: &[f64]) -> Vec<f32> {
    v.iter().map(|x| *x as f32).collect()
}

/// Block `b`'s values of a per-block list, at most `limit` of them (a hostile record cannot ask
/// for more work than its header's shapes).
fn per_block(v: Option<&Vec<Vec<f64>>>, b: usize, limit: usize) -> Vec<f32> {
    v.and_then(|v| v.get(b))
        .map(|v| floats(&v[..v.len().min(limit)]))
        .unwrap_or_default()
}

/// The one snapshot view: what the views draw from a snapshot record, for a live run (computed
/// from the record as it is written, the same rounding) and for a reopened one alike, so both
/// show identical filters, mix, coefficients and router statistics. Coefficients, source, router
/// and probe weights as recorded; each block's per-prior gains recomputed from the coefficients
/// (channel mean, and channel `channel` when one is chosen) with their router-weighted mix. The
/// probe's pixels are not in the record (`probe` is `None`: the caller attaches them). `None`
/// for a record whose format the header does not announce.
#[must_use]
pub fn snapshot_view(v: &SnapshotRecord, h: &SnapshotHeader, channel: Option<usize>) -> Option<Snapshot> {
    h.check().ok()?;
    let (gh, gw) = h.grid;
    let lambda = laplacian_eigenvalues(gh, gw);
    let (tau, gamma) = (v.tau, v.gamma);
    let k = h.priors.len();
    let mut blocks = Vec::with_capacity(h.blocks);
    for b in 0..h.blocks {
        let coeffs = PerCoeff::from_fn(|c| per_block(v.coeff(c), b, h.rank));
        let source = per_block(v.source.as_ref(), b, gh * gw);
        let source64: Vec<f64> = source.iter().map(|x| f64::from(*x)).collect();
        let source_map = (!source64.is_empty()).then_some(source64.as_slice());
        let gain = |p: crate::config::Prior, c: f32| {
            channel_gain(p, &lambda, f64::from(c), tau, gamma, source_map).unwrap_or_else(|_| vec![f64::NAN; gh * gw])
        };
        let filters_mean: Vec<Vec<f32>> = h
            .priors
            .iter()
            .map(|p| {
                let values = &coeffs[p.coeff()];
                let mut mean = vec![0f64; gh * gw];
                for &c in values {
                    for (m, x) in mean.iter_mut().zip(gain(*p, c)) {
                        *m += x;
                    }
                }
                let n = values.len().max(1) as f64;
                mean.into_iter().map(|m| (m / n) as f32).collect()
            })
            .collect();
        let filters_channel: Vec<Vec<f32>> = channel.map_or_else(Vec::new, |ch| {
            h.priors
                .iter()
                .filter_map(|p| {
                    coeffs[p.coeff()]
                        .get(ch)
                        .map(|&c| gain(*p, c).into_iter().map(|x| x as f32).collect())
                })
                .collect()
        });
        let router = v.router.get(b).and_then(Option::as_ref).map(|r| {
            let entropy = r.entropy as f32;
            // One value per prior at most, whatever the record holds.
            RouterStats {
                mean_alpha: floats(&r.mean[..r.mean.len().min(k)]),
                entropy,
                entropy_norm: if k > 1 { entropy / (k as f32).ln() } else { 0.0 },
                argmax_share: floats(&r.share[..r.share.len().min(k)]),
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
        let locked: Vec<Lockable> = v.locks.get(b).cloned().unwrap_or_default();
        blocks.push(BlockSnapshot {
            block: b,
            filters_mean,
            filters_channel,
            mix,
            coeffs,
            source,
            router,
            probe_alpha: per_block(v.probe.as_ref().map(|p| &p.alpha), b, gh * gw * k.max(1)),
            locked,
        });
    }
    Some(Snapshot {
        step: v.step,
        grid: h.grid,
        priors: h.priors.clone(),
        channel,
        tau,
        gamma,
        route_weight: v.route_weight,
        temperature: v.temperature,
        blocks,
        probe: None,
        probe_prediction: v.probe.as_ref().and_then(|p| p.prediction),
    })
}

/// What the filter view draws of one block's gains besides the heatmaps: each prior's radial
/// profile against √Λ (then the mix's, last) and each prior's spatial impulse response. One
/// function for live and reopened runs; the app computes it once per snapshot, block and channel.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct GainView {
    /// `(√Λ, mean gain)` points per prior, then the mix's.
    pub radial: Vec<Vec<[f64; 2]>>,
    /// `IDCT2(G ⊙ DCT2(δ))` per prior, `H·W` row-major, for a unit impulse at the centre cell.
    pub impulses: Vec<Vec<f32>>,
    /// The largest magnitude over the impulse responses (their colour scale).
    pub impulse_limit: f32,
}

/// The radial profiles and impulse responses of `gains` (per prior) and `mix` on a grid.
#[must_use]
pub fn gain_view((h, w): (usize, usize), gains: &[Vec<f32>], mix: &[f32]) -> GainView {
    let lambda = laplacian_eigenvalues(h, w);
    let wide = |g: &[f32]| g.iter().map(|v| f64::from(*v)).collect::<Vec<f64>>();
    let radial = gains
        .iter()
        .map(Vec::as_slice)
        .chain(std::iter::once(mix))
        .map(|g| {
            radial_profile(&lambda, &wide(g))
                .into_iter()
                .map(|(k, v)| [k, v])
                .collect()
        })
        .collect();
    let dct = Dct2::new(h, w);
    let impulses: Vec<Vec<f32>> = gains
        .iter()
        .map(|g| {
            impulse_response(&dct, &wide(g))
                .unwrap_or_default()
                .into_iter()
                .map(|v| v as f32)
                .collect()
        })
        .collect();
    let impulse_limit = impulses.iter().flatten().fold(1e-6f32, |m, v| m.max(v.abs()));
    GainView {
        radial,
        impulses,
        impulse_limit,
    }
}
