//! Which tokens and which classes each prior takes: the ablation's routing statistics per block
//! (α against the tokens' frequency content `hf`, α per class), and the probe image's tokens,
//! each α against its `hf` (METHOD.md "Prior ablation and token frequency content").

use super::diagnose::{DiagRun, DiagView, DiagnoseSettings};
use crate::app::widgets::cells::{Row, corr_text, pearson, rgb, table};
use crate::app::widgets::colormap::{prior_color, sequential};
use crate::app::widgets::heatmap::{Scale, Textures, heatmap};
use crate::config::Prior;
use crate::train::ablation::usage::mean_class_share;
use crate::train::protocol::{BlockUsage, Snapshot, USAGE_BINS};
use egui::RichText;
use egui_plot::{Plot, Points};

/// The probe's token `hf`, computed once per probe image.
#[derive(Default)]
pub struct HfCache {
    key: Option<(usize, usize, u64)>,
    hf: Vec<f64>,
}

impl HfCache {
    /// `hf` of each token of the square RGB image `pixels` (`side`) cut into `patch`-wide
    /// patches (empty when they do not fit).
    fn get(&mut self, pixels: &[u8], side: usize, patch: usize) -> &[f64] {
        let sum = pixels.iter().enumerate().fold(0u64, |h, (i, &b)| {
            h.wrapping_mul(31).wrapping_add(u64::from(b) ^ i as u64)
        });
        let key = (side, patch, sum);
        if self.key != Some(key) {
            self.hf = crate::physics::freq::token_hf(pixels, side, patch);
            self.key = Some(key);
        }
        &self.hf
    }
}

/// The block chooser (`None`: every block together, named `all`).
fn block_choice(ui: &mut egui::Ui, id: &str, block: &mut Option<usize>, blocks: &[usize], all: &str) {
    let text = block.map_or_else(|| all.to_owned(), |b| format!("block {b}"));
    egui::ComboBox::from_id_salt(id).selected_text(text).show_ui(ui, |ui| {
        ui.selectable_value(block, None, all);
        for &b in blocks {
            ui.selectable_value(block, Some(b), format!("block {b}"));
        }
    });
}

/// The ablation's routing statistics, or why there are none.
fn usage<'a>(ui: &mut egui::Ui, run: &'a DiagRun<'_>) -> Option<(&'a [BlockUsage], &'a [Prior])> {
    let priors = run.history.info.as_ref().map_or(&[][..], |i| i.priors.as_slice());
    match &run.history.ablation {
        Some(a) if !a.usage.is_empty() && priors.len() > 1 => {
            ui.label(
                RichText::new(format!(
                    "From the ablation at step {} on {} {} images.",
                    a.step, a.n, a.split
                ))
                .small(),
            );
            Some((a.usage.as_slice(), priors))
        }
        _ => {
            ui.label(format!(
                "Measured with the prior ablation: run one in the \"{}\" view.",
                DiagView::Priors.label()
            ));
            None
        }
    }
}

impl DiagnoseSettings {
    /// Each prior's α against the tokens' `hf`: the ablation's histograms per block, and the
    /// probe image's tokens.
    pub fn tokens_ui(&mut self, ui: &mut egui::Ui, run: &DiagRun<'_>, textures: &mut Textures, cache: &mut HfCache) {
        ui.heading(DiagView::Tokens.question());
        ui.label(
            "hf: the share of a patch's contrast energy outside its lowest-frequency quarter (0 flat or smooth, \
             1 fine detail), on the image as the model sees it. Heat damps high frequencies, waves carry them, \
             Poisson is global.",
        );
        if let Some((usage, priors)) = usage(ui, run) {
            let blocks: Vec<usize> = usage.iter().map(|u| u.block).collect();
            ui.horizontal(|ui| {
                ui.label("block:");
                block_choice(ui, "tokens-block", &mut self.block, &blocks, "all blocks");
            });
            let chosen: Vec<&BlockUsage> = usage
                .iter()
                .filter(|u| self.block.is_none_or(|b| u.block == b))
                .collect();
            histograms(ui, &chosen, priors, textures);
        }
        ui.add_space(8.0);
        probe_scatter(ui, run, self.block, cache);
    }

    /// Each prior's mean α per class (one block, or the mean over blocks).
    pub fn classes_ui(&mut self, ui: &mut egui::Ui, run: &DiagRun<'_>) {
        ui.heading(DiagView::Classes.question());
        ui.label("Each prior's mean weight α over the patch tokens of each class's images.");
        let Some((usage, priors)) = usage(ui, run) else { return };
        let blocks: Vec<usize> = usage.iter().map(|u| u.block).collect();
        ui.horizontal(|ui| {
            ui.label("block:");
            block_choice(ui, "classes-block", &mut self.block, &blocks, "mean over blocks");
        });
        let share = match self.block {
            None => mean_class_share(usage),
            Some(b) => usage
                .iter()
                .find(|u| u.block == b)
                .map(|u| u.class_share.clone())
                .unwrap_or_default(),
        };
        let class_n = run.history.ablation.as_ref().map_or(&[][..], |a| a.class_n.as_slice());
        let cols: Vec<String> = priors.iter().map(|p| p.name().to_owned()).collect();
        let rows: Vec<Row> = share
            .iter()
            .enumerate()
            .map(|(c, row)| {
                let name = run.classes.get(c).cloned().unwrap_or_else(|| c.to_string());
                let n = class_n.get(c).map_or_else(String::new, |n| format!(" (n = {n})"));
                let cells = priors
                    .iter()
                    .enumerate()
                    .map(|(p, prior)| match row.get(p) {
                        Some(v) => (
                            format!("{v:.2}"),
                            rgb(sequential(*v as f32)),
                            format!("{name}: mean α of {} = {v:.3}", prior.name()),
                        ),
                        None => ("-".to_owned(), ui.visuals().faint_bg_color, format!("{name}: no image")),
                    })
                    .collect();
                (format!("{name}{n}"), cells)
            })
            .collect();
        if rows.is_empty() {
            ui.label("No class was measured.");
            return;
        }
        egui::ScrollArea::vertical()
            .id_salt("class-share")
            .max_height(520.0)
            .show(ui, |ui| table(ui, "class-share-grid", "class", &cols, &rows, 56.0));
        ui.label(RichText::new("colour: mean α from 0 (dark) to 1 (yellow)").small());
    }
}

/// Each prior's 2-D histogram of tokens (α against `hf`) over `blocks` together, with the
/// correlation of α and `hf`.
fn histograms(ui: &mut egui::Ui, blocks: &[&BlockUsage], priors: &[Prior], textures: &mut Textures) {
    let n = USAGE_BINS;
    ui.horizontal_wrapped(|ui| {
        for (p, prior) in priors.iter().enumerate() {
            let mut counts = vec![0u64; n * n];
            for b in blocks {
                if let Some(h) = b.hist.get(p).filter(|h| h.len() == n * n) {
                    for (c, v) in counts.iter_mut().zip(h) {
                        *c += u64::from(*v);
                    }
                }
            }
            let corr: Vec<f64> = blocks.iter().filter_map(|b| b.hf_corr.get(p).copied()).collect();
            let r = if corr.len() == 1 {
                corr[0]
            } else {
                let finite: Vec<f64> = corr.iter().copied().filter(|v| v.is_finite()).collect();
                if finite.is_empty() {
                    f64::NAN
                } else {
                    finite.iter().sum::<f64>() / finite.len() as f64
                }
            };
            let max = counts.iter().copied().max().unwrap_or(0);
            // High α at the top: rows flipped; counts on a log scale.
            let values: Vec<f32> = (0..n)
                .rev()
                .flat_map(|row| {
                    let counts = &counts;
                    (0..n).map(move |col| {
                        let c = counts[row * n + col];
                        if max == 0 {
                            0.0
                        } else {
                            ((c as f64).ln_1p() / (max as f64).ln_1p()) as f32
                        }
                    })
                })
                .collect();
            ui.vertical(|ui| {
                let what = if blocks.len() == 1 {
                    "r(α, hf)"
                } else {
                    "mean r(α, hf)"
                };
                ui.label(
                    RichText::new(format!("{}: {what} = {}", prior.name(), corr_text(r))).color(prior_color(*prior)),
                );
                heatmap(
                    ui,
                    textures,
                    &format!("usage-hist-{}", prior.name()),
                    &values,
                    (n, n),
                    Scale::Unit,
                    150.0,
                );
                ui.label(RichText::new("x: hf 0..1, y: α 0..1 (up)").small());
            });
        }
    });
    ui.label(RichText::new("colour: tokens per cell, log scale").small());
}

/// The probe image's tokens: each prior's α against the token's `hf`, for block `block` (the
/// first block with weights when `None`).
fn probe_scatter(ui: &mut egui::Ui, run: &DiagRun<'_>, block: Option<usize>, cache: &mut HfCache) {
    ui.label(RichText::new("The probe image: each token's α against its hf").strong());
    let Some(snap) = run.snap else {
        ui.label("No snapshot yet.");
        return;
    };
    let Some((pixels, side)) = snap.probe.as_ref().map(|p| (&p.image.pixels, p.image.size)) else {
        ui.label("The run has no probe image.");
        return;
    };
    let Some(b) = pick_block(snap, block) else {
        ui.label("The probe has no per-token router weights.");
        return;
    };
    let (gh, gw) = snap.grid;
    let k = snap.priors.len();
    let patch = run
        .history
        .info
        .as_ref()
        .map(|i| i.backbone.patch_size)
        .filter(|&p| p * gw == side)
        .unwrap_or(if gw > 0 && side.is_multiple_of(gw) {
            side / gw
        } else {
            0
        });
    let hf = cache.get(pixels, side, patch);
    let alpha = &snap.blocks[b].probe_alpha;
    if gh != gw || hf.len() != gh * gw || alpha.len() != hf.len() * k {
        ui.label("The probe's tokens do not match its image: no scatter.");
        return;
    }
    ui.label(RichText::new(format!("block {}, {} tokens", snap.blocks[b].block, hf.len())).small());
    let series: Vec<(Prior, Vec<[f64; 2]>, f64)> = snap
        .priors
        .iter()
        .enumerate()
        .map(|(p, prior)| {
            let a: Vec<f64> = alpha.chunks_exact(k).map(|t| f64::from(t[p])).collect();
            let pts = hf.iter().zip(&a).map(|(x, y)| [*x, *y]).collect();
            (*prior, pts, pearson(hf, &a))
        })
        .collect();
    ui.horizontal(|ui| {
        for (prior, _, r) in &series {
            ui.label(RichText::new(format!("{}: r = {}", prior.name(), corr_text(*r))).color(prior_color(*prior)));
        }
    });
    Plot::new("probe-alpha-hf")
        .height(240.0)
        .width(420.0)
        .include_x(0.0)
        .include_x(1.0)
        .include_y(0.0)
        .include_y(1.0)
        .x_axis_label("hf")
        .y_axis_label("α")
        .show(ui, |pu| {
            for (prior, pts, _) in series {
                pu.points(Points::new(prior.name(), pts).color(prior_color(prior)).radius(2.0));
            }
        });
}

/// The index in `snap.blocks` of block `block` (or the first) with per-token weights.
fn pick_block(snap: &Snapshot, block: Option<usize>) -> Option<usize> {
    let has = |i: &usize| !snap.blocks[*i].probe_alpha.is_empty();
    block
        .and_then(|b| snap.blocks.iter().position(|s| s.block == b))
        .filter(has)
        .or_else(|| (0..snap.blocks.len()).find(has))
}
