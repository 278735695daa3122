//! The bounds a record must keep before a reader uses what it sizes (INTERFACES.md "Bounds";
//! docs/limits.md): a run's facts, an evaluation's per-class lists and confusion counts, an
//! ablation's rows and histograms. Each error names the field and the bound.

use super::EvalRecord;
use super::snapshot::{MAX_BLOCKS, MAX_GRID_SIDE, MAX_PRIORS, MAX_RANK};
use crate::train::protocol::{Ablation, MAX_CONFUSION_CLASSES, MAX_MISCLASSIFIED, RunInfo, USAGE_BINS};

/// Whether a run's facts (a `started` record's `info`, or what a served run sends) are within
/// what a reader accepts (INTERFACES.md "Bounds"): classes, blocks, grid, rank and priors, checked
/// before anything they size is allocated; the error names the field and the bound. A grid of
/// 0×0 (a method without a token grid) passes.
pub fn check_info(info: &RunInfo) -> Result<(), String> {
    let max_classes = crate::data::MAX_CLASSES;
    let (h, w) = info.grid;
    if info.classes.len() > max_classes {
        return Err(format!("{} classes (at most {max_classes})", info.classes.len()));
    }
    if info.blocks > MAX_BLOCKS {
        return Err(format!("{} blocks (at most {MAX_BLOCKS})", info.blocks));
    }
    if h > MAX_GRID_SIDE || w > MAX_GRID_SIDE {
        return Err(format!("grid {h}×{w} is beyond {MAX_GRID_SIDE}×{MAX_GRID_SIDE}"));
    }
    if info.rank > MAX_RANK {
        return Err(format!("rank {} (at most {MAX_RANK})", info.rank));
    }
    if info.priors.len() > MAX_PRIORS {
        return Err(format!("{} priors (at most {MAX_PRIORS})", info.priors.len()));
    }
    Ok(())
}

impl EvalRecord {
    /// Whether its per-class list is within the bound on classes (INTERFACES.md "Bounds").
    pub fn check(&self) -> Result<(), String> {
        let max = crate::data::MAX_CLASSES;
        if self.per_class_acc.len() > max {
            return Err(format!(
                "per_class_acc holds {} classes (at most {max})",
                self.per_class_acc.len()
            ));
        }
        let classes = self.confusion.len();
        if classes > MAX_CONFUSION_CLASSES {
            return Err(format!(
                "confusion has {classes} rows (at most {MAX_CONFUSION_CLASSES})"
            ));
        }
        if let Some(row) = self.confusion.iter().find(|r| r.len() != classes) {
            return Err(format!(
                "a confusion row holds {} counts for {classes} classes",
                row.len()
            ));
        }
        if self.misclassified.len() > MAX_MISCLASSIFIED {
            return Err(format!(
                "{} misclassified images (at most {MAX_MISCLASSIFIED})",
                self.misclassified.len()
            ));
        }
        Ok(())
    }
}

/// Whether an ablation record is within the bounds on classes, blocks and priors.
pub fn check_ablation(a: &Ablation) -> Result<(), String> {
    let rows_max = MAX_PRIORS * (MAX_BLOCKS + 1);
    if a.rows.len() > rows_max {
        return Err(format!("{} ablation rows (at most {rows_max})", a.rows.len()));
    }
    if a.usage.len() > MAX_BLOCKS {
        return Err(format!("usage of {} blocks (at most {MAX_BLOCKS})", a.usage.len()));
    }
    let classes = a.base.per_class_acc.len();
    if classes > MAX_CONFUSION_CLASSES
        || a.rows.iter().any(|r| r.score.per_class_acc.len() != classes)
        || a.usage
            .iter()
            .any(|u| u.class_share.len() > MAX_CONFUSION_CLASSES || u.hist.len() > MAX_PRIORS)
    {
        return Err(format!(
            "per-class lists disagree or exceed {MAX_CONFUSION_CLASSES} classes"
        ));
    }
    let cells = USAGE_BINS * USAGE_BINS;
    if a.usage.iter().any(|u| {
        u.hist.iter().any(|h| h.len() != cells)
            || u.hf_corr.len() > MAX_PRIORS
            || u.class_share.iter().any(|r| r.len() > MAX_PRIORS)
    }) {
        return Err(format!(
            "a usage histogram is not {cells} cells, or lists more than {MAX_PRIORS} priors"
        ));
    }
    Ok(())
}
