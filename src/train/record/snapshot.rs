//! The records of `snapshots.jsonl`: its header and one record per snapshot, as written from the
//! protocol's [`Snapshot`]: coefficients and the source map at full f32 precision, router
//! statistics and probe weights at 5 significant digits (older files hold 5 digits everywhere),
//! filters left out (they follow from the coefficients).

use super::{Extra, nan_if_null, nan_list};
use crate::config::{Coeff, Lockable, PerCoeff, Prior};
use crate::train::protocol::{ProbeOrigin, Snapshot};
use serde::{Deserialize, Deserializer, Serialize};

/// The format the header announces.
pub const FORMAT: u64 = 1;

/// The first line of `snapshots.jsonl`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotHeader {
    /// The record format ([`FORMAT`]).
    pub format: u64,
    /// MoPPA blocks.
    pub blocks: usize,
    /// Rank.
    pub rank: usize,
    /// Token grid (H, W), written `[H, W]`.
    pub grid: (usize, usize),
    /// Active priors.
    pub priors: Vec<Prior>,
    /// Fields this version does not know.
    #[serde(flatten)]
    pub extra: Extra,
}

/// The largest grid side a reader accepts (INTERFACES.md "Bounds": 512×512 tokens).
pub const MAX_GRID_SIDE: usize = 512;
/// The most blocks a reader accepts.
pub const MAX_BLOCKS: usize = 256;
/// The largest rank a reader accepts.
pub const MAX_RANK: usize = 4096;
/// The most priors a reader accepts.
pub const MAX_PRIORS: usize = 3;

impl SnapshotHeader {
    /// Whether the shapes are within what a reader accepts (INTERFACES.md "Bounds"), checked
    /// before anything they size is allocated; the error names the field.
    pub fn check(&self) -> Result<(), String> {
        let (h, w) = self.grid;
        if self.format != FORMAT {
            return Err(format!("snapshot format {} (this version reads {FORMAT})", self.format));
        }
        if h == 0 || w == 0 || h > MAX_GRID_SIDE || w > MAX_GRID_SIDE {
            return Err(format!("grid {h}×{w} is outside 1×1 … {MAX_GRID_SIDE}×{MAX_GRID_SIDE}"));
        }
        if self.blocks > MAX_BLOCKS {
            return Err(format!("{} blocks (at most {MAX_BLOCKS})", self.blocks));
        }
        if self.rank > MAX_RANK {
            return Err(format!("rank {} (at most {MAX_RANK})", self.rank));
        }
        if self.priors.len() > MAX_PRIORS {
            return Err(format!("{} priors (at most {MAX_PRIORS})", self.priors.len()));
        }
        Ok(())
    }

    /// The header of a run with these shapes.
    #[must_use]
    pub fn new(blocks: usize, rank: usize, grid: (usize, usize), priors: &[Prior]) -> Self {
        Self {
            format: FORMAT,
            blocks,
            rank,
            grid,
            priors: priors.to_vec(),
            extra: Extra::new(),
        }
    }
}

/// A block's router statistics as recorded.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RouterRecord {
    /// ᾱ per prior.
    #[serde(default, deserialize_with = "nan_list")]
    pub mean: Vec<f64>,
    /// Mean routing entropy.
    #[serde(default, deserialize_with = "nan_if_null")]
    pub entropy: f64,
    /// Share of tokens whose argmax is each prior.
    #[serde(default, deserialize_with = "nan_list")]
    pub share: Vec<f64>,
}

/// The probe as recorded: a validation image (`index`, `label`) or the user's file (`file`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ProbeRecord {
    /// Index into the validation split.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub index: Option<usize>,
    /// Its label.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<u32>,
    /// The user's file name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<String>,
    /// The predicted class (written as `null` when there is none).
    #[serde(default)]
    pub prediction: Option<u32>,
    /// Per-token α per block.
    #[serde(default, deserialize_with = "nan_lists")]
    pub alpha: Vec<Vec<f64>>,
}

/// One snapshot record.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SnapshotRecord {
    /// Step.
    pub step: u64,
    /// Seconds since start.
    #[serde(default, deserialize_with = "nan_if_null")]
    pub time_s: f64,
    /// τ.
    #[serde(deserialize_with = "nan_if_null")]
    pub tau: f64,
    /// γ.
    #[serde(default, deserialize_with = "nan_if_null")]
    pub gamma: f64,
    /// λ.
    #[serde(default, deserialize_with = "nan_if_null")]
    pub route_weight: f64,
    /// T.
    #[serde(default = "one", deserialize_with = "nan_if_null")]
    pub temperature: f64,
    /// κ per block and channel (heat active).
    #[serde(default, deserialize_with = "opt_nan_lists", skip_serializing_if = "Option::is_none")]
    pub kappa: Option<Vec<Vec<f64>>>,
    /// c per block and channel (wave active).
    #[serde(default, deserialize_with = "opt_nan_lists", skip_serializing_if = "Option::is_none")]
    pub c: Option<Vec<Vec<f64>>>,
    /// ε per block and channel (Poisson active).
    #[serde(default, deserialize_with = "opt_nan_lists", skip_serializing_if = "Option::is_none")]
    pub eps: Option<Vec<Vec<f64>>>,
    /// Source map per block (Poisson active).
    #[serde(default, deserialize_with = "opt_nan_lists", skip_serializing_if = "Option::is_none")]
    pub source: Option<Vec<Vec<f64>>>,
    /// Locked tensors per block.
    #[serde(default)]
    pub locks: Vec<Vec<Lockable>>,
    /// Router statistics per block (`null` for a single prior).
    #[serde(default)]
    pub router: Vec<Option<RouterRecord>>,
    /// The probe's routing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub probe: Option<ProbeRecord>,
    /// Fields this version does not know.
    #[serde(flatten)]
    pub extra: Extra,
}

fn one() -> f64 {
    1.0
}

#[derive(Deserialize)]
#[serde(transparent)]
struct LenientList(#[serde(deserialize_with = "nan_list")] Vec<f64>);

fn nan_lists<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Vec<f64>>, D::Error> {
    Ok(Vec::<LenientList>::deserialize(d)?.into_iter().map(|l| l.0).collect())
}

fn opt_nan_lists<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<Vec<f64>>>, D::Error> {
    Ok(Option::<Vec<LenientList>>::deserialize(d)?.map(|v| v.into_iter().map(|l| l.0).collect()))
}

/// `v` rounded to 5 significant digits (a shorter file, the same pictures); non-finite values
/// stay as they are (written as `null`).
#[must_use]
pub fn sig5(v: f32) -> f64 {
    let v = f64::from(v);
    if v == 0.0 || !v.is_finite() {
        return v;
    }
    let scale = 10f64.powi(4 - v.abs().log10().floor() as i32);
    (v * scale).round() / scale
}

fn sig5_list(v: &[f32]) -> Vec<f64> {
    v.iter().map(|x| sig5(*x)).collect()
}

/// `v` as the shortest decimal that reads back as the same f32 (`0.2771411`, not the f64
/// widening `0.27714109420776367`): the coefficients and the source map keep their full f32
/// precision, so the view of a record matches the model's own filters.
#[must_use]
pub fn exact_f32(v: f32) -> f64 {
    format!("{v}").parse().unwrap_or(f64::from(v))
}

fn exact_list(v: &[f32]) -> Vec<f64> {
    v.iter().map(|x| exact_f32(*x)).collect()
}

impl SnapshotRecord {
    /// The record of a snapshot taken `time_s` seconds into the run.
    #[must_use]
    pub fn from_snapshot(s: &Snapshot, time_s: f64) -> Self {
        let per_block = |f: &dyn Fn(&crate::train::protocol::BlockSnapshot) -> &[f32],
                         round: fn(&[f32]) -> Vec<f64>| {
            s.blocks.iter().map(|b| round(f(b))).collect::<Vec<_>>()
        };
        let coeff = |c: Coeff| {
            s.priors
                .contains(&c.prior())
                .then(|| per_block(&|b| &b.coeffs[c], exact_list))
        };
        let coeffs: PerCoeff<Option<Vec<Vec<f64>>>> = PerCoeff::from_fn(coeff);
        let probe = s.probe.as_ref().map(|p| {
            let (index, label, file) = match &p.origin {
                ProbeOrigin::Val { index, label } => (Some(*index), Some(*label), None),
                ProbeOrigin::File { name } => (None, None, Some(name.clone())),
            };
            ProbeRecord {
                index,
                label,
                file,
                prediction: s.probe_prediction,
                alpha: per_block(&|b| &b.probe_alpha, sig5_list),
            }
        });
        Self {
            step: s.step,
            time_s,
            tau: s.tau,
            gamma: s.gamma,
            route_weight: s.route_weight,
            temperature: s.temperature,
            kappa: coeffs.kappa,
            c: coeffs.c,
            eps: coeffs.eps,
            source: s
                .priors
                .contains(&Prior::Poisson)
                .then(|| per_block(&|b| &b.source, exact_list)),
            locks: s.blocks.iter().map(|b| b.locked.clone()).collect(),
            router: s
                .blocks
                .iter()
                .map(|b| {
                    b.router.as_ref().map(|r| RouterRecord {
                        mean: sig5_list(&r.mean_alpha),
                        entropy: sig5(r.entropy),
                        share: sig5_list(&r.argmax_share),
                    })
                })
                .collect(),
            probe,
            extra: super::Extra::new(),
        }
    }

    /// Whether the record's lists fit the shapes `h` announces (a header that passed
    /// [`SnapshotHeader::check`]): at most `blocks` per-block entries, at most `rank` values per
    /// coefficient, `H·W` per source map, `H·W·k` probe weights and `k` router shares per block.
    /// Shorter lists are fine (an absent block or prior); the error names the list and the bound.
    pub fn check(&self, h: &SnapshotHeader) -> Result<(), String> {
        let k = h.priors.len();
        let cells = h
            .grid
            .0
            .checked_mul(h.grid.1)
            .ok_or_else(|| format!("grid {}×{} overflows", h.grid.0, h.grid.1))?;
        let probe_cells = cells
            .checked_mul(k.max(1))
            .ok_or_else(|| format!("grid {}×{} × {k} priors overflows", h.grid.0, h.grid.1))?;
        let lists = |name: &str, v: Option<&Vec<Vec<f64>>>, each: usize, what: &str| -> Result<(), String> {
            let Some(v) = v else { return Ok(()) };
            if v.len() > h.blocks {
                return Err(format!(
                    "{name} holds {} blocks (the header says {})",
                    v.len(),
                    h.blocks
                ));
            }
            match v.iter().position(|b| b.len() > each) {
                Some(b) => Err(format!(
                    "{name} of block {b} holds {} values (at most {each}: {what})",
                    v[b].len()
                )),
                None => Ok(()),
            }
        };
        lists("kappa", self.kappa.as_ref(), h.rank, "the rank")?;
        lists("c", self.c.as_ref(), h.rank, "the rank")?;
        lists("eps", self.eps.as_ref(), h.rank, "the rank")?;
        lists("source", self.source.as_ref(), cells, "H·W")?;
        lists(
            "probe alpha",
            self.probe.as_ref().map(|p| &p.alpha),
            probe_cells,
            "H·W × priors",
        )?;
        if self.locks.len() > h.blocks {
            return Err(format!(
                "locks hold {} blocks (the header says {})",
                self.locks.len(),
                h.blocks
            ));
        }
        if self.router.len() > h.blocks {
            return Err(format!(
                "router holds {} blocks (the header says {})",
                self.router.len(),
                h.blocks
            ));
        }
        for (b, r) in self.router.iter().enumerate() {
            if let Some(r) = r
                && (r.mean.len() > k || r.share.len() > k)
            {
                return Err(format!(
                    "router of block {b} holds {} values (at most {k}: the priors)",
                    r.mean.len().max(r.share.len())
                ));
            }
        }
        Ok(())
    }

    /// A coefficient's values per block and channel, if recorded.
    #[must_use]
    pub fn coeff(&self, c: Coeff) -> Option<&Vec<Vec<f64>>> {
        match c {
            Coeff::Kappa => self.kappa.as_ref(),
            Coeff::C => self.c.as_ref(),
            Coeff::Eps => self.eps.as_ref(),
        }
    }
}
