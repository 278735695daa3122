//! Prior ablation (METHOD.md "Prior ablation and token frequency content"): the model on a fixed,
//! seeded subset of the validation split, whole and with each prior removed in every MoPPA block
//! and in each, plus how the same images are routed ([`usage`]): per class, and against each
//! token's frequency content. One function serves the live run (on its worker, between steps),
//! a run reopened from its folder (through its saved adapter) and `moppa eval --ablate`. It
//! reads the model and never changes it: no optimizer step, no RNG draw, no data-order change.

pub mod usage;

use super::error::{Result, TrainError};
use super::evaluate::{EvalInput, Tally, for_each_indexed};
use super::protocol::{Ablation, AblationBlock, AblationRow, AblationScore};
use crate::data::Split;
use crate::data::loader::EvalSet;
use crate::model::PeftModel;
use crate::model::peft::Removal;
use std::time::Instant;

/// Images an ablation evaluates unless told otherwise.
pub const DEFAULT_IMAGES: usize = 256;
/// The most images one ablation may be asked for.
pub const MAX_IMAGES: usize = 100_000;

/// Whether `images` is a size an ablation may be asked for (1 to [`MAX_IMAGES`]).
pub fn check_images(images: usize) -> Result<()> {
    if images == 0 || images > MAX_IMAGES {
        return Err(TrainError::Config(format!(
            "an ablation takes 1 to {MAX_IMAGES} images, not {images}"
        )));
    }
    Ok(())
}

/// The fixed subset of a split of `len` images an ablation of `n` images evaluates: the first
/// `n` of a seeded shuffle (seed 0, independent of any run's RNG), in split order. Every run and
/// every reopening picks the same images.
#[must_use]
pub fn subset_indices(len: usize, n: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..len).collect();
    let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
    // Fisher-Yates with splitmix64 draws.
    for i in (1..len).rev() {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        let j = (z % (i as u64 + 1)) as usize;
        idx.swap(i, j);
    }
    idx.truncate(n.min(len));
    idx.sort_unstable();
    idx
}

/// The passes an ablation of `model` makes: the whole model, then per active prior every block
/// at once and each MoPPA block.
#[must_use]
pub fn passes(model: &PeftModel) -> Vec<Option<Removal>> {
    let blocks = model.moppa_blocks();
    let mut out = vec![None];
    for prior in model.method.active_priors() {
        out.push(Some(Removal { prior, block: None }));
        out.extend(blocks.iter().map(|&b| Some(Removal { prior, block: Some(b) })));
    }
    out
}

/// Runs the ablation on `set` (already the subset). Batch by batch: the whole model first,
/// keeping the tokens entering each block, then each removal from the first block it changes
/// (the blocks before compute the same as in the whole model), so removing a prior in block b
/// costs the blocks from b on. `progress(done, total)` is told after each pass over a batch;
/// `cancel` is asked before each (then [`TrainError::Cancelled`]).
pub fn ablate(
    model: &PeftModel,
    set: &mut EvalSet,
    input: &EvalInput<'_>,
    cancel: &dyn Fn() -> bool,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Ablation> {
    let blocks = model.moppa_blocks();
    let Some(&first) = blocks.first() else {
        return Err(TrainError::Config(format!(
            "a prior ablation needs a MoPPA adapter; this one is {}",
            model.method.method
        )));
    };
    let started = Instant::now();
    let classes = model.classes.len();
    let patch = model.backbone.cfg.patch_size;
    let plan = passes(model);
    let total = set.len().div_ceil(input.batch.max(1)) * plan.len();
    let mut tallies: Vec<Tally> = plan.iter().map(|_| Tally::new(classes)).collect();
    let mut usage = usage::UsageTally::new(classes, model.method.active_priors().len());
    let mut done = 0;
    for_each_indexed(model, set, input, cancel, |images, batch| {
        let mut inputs = Vec::with_capacity(model.adapters.len());
        let base = model.forward_from(model.embed(&images)?, 0, true, None, Some(&mut inputs))?;
        tallies[0].add(&base.logits, &batch.labels)?;
        usage.add(&base.routing, &batch.labels, &batch.rgb, input.size, patch)?;
        done += 1;
        progress(done, total);
        for (removal, tally) in plan.iter().zip(tallies.iter_mut()).skip(1) {
            if cancel() {
                return Err(TrainError::Cancelled);
            }
            let Some(r) = *removal else { continue };
            let from = r.block.unwrap_or(first);
            let x = inputs
                .get(from)
                .cloned()
                .ok_or_else(|| TrainError::Config(format!("no tokens kept for block {from}")))?;
            tally.add(
                &model.forward_from(x, from, false, Some(r), None)?.logits,
                &batch.labels,
            )?;
            done += 1;
            progress(done, total);
        }
        Ok(())
    })?;
    progress(total, total);
    let mut scores = tallies.iter().map(|t| {
        t.result(0, Split::Val, 0.0).map(|r| {
            let n = r.n;
            (
                AblationScore {
                    acc: r.acc,
                    loss: r.loss,
                    per_class_acc: r.per_class_acc,
                },
                n,
            )
        })
    });
    let (base, n) = scores
        .next()
        .flatten()
        .ok_or_else(|| TrainError::Config("the ablation's images could not be used".into()))?;
    let rows = plan
        .iter()
        .skip(1)
        .zip(scores)
        .filter_map(|(removal, score)| {
            let (Some(Removal { prior, block }), Some((score, _))) = (*removal, score) else {
                return None;
            };
            Some(AblationRow {
                prior,
                block: block.map_or(AblationBlock::ALL, AblationBlock::One),
                score,
            })
        })
        .collect();
    Ok(Ablation {
        step: 0,
        time_s: 0.0,
        split: Split::Val.name().into(),
        n,
        base,
        rows,
        class_n: tallies[0].per_class_counts().iter().map(|(_, t)| *t).collect(),
        usage: usage.finish(),
        seconds: started.elapsed().as_secs_f64(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_subset_is_fixed_sorted_and_bounded() {
        let a = subset_indices(1000, 256);
        assert_eq!(a, subset_indices(1000, 256));
        assert_eq!(a.len(), 256);
        assert!(a.windows(2).all(|w| w[0] < w[1]));
        assert!(a.iter().all(|&i| i < 1000));
        // Not simply the first images.
        assert!(*a.last().unwrap_or(&0) > 900);
        assert_eq!(subset_indices(10, 256), (0..10).collect::<Vec<_>>());
        assert!(subset_indices(0, 5).is_empty());
    }
}
