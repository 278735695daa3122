//! Router alerts (INTERFACES.md "Router diagnostics"): dead priors and collapse, read from the
//! per-token statistics over a span of steps — one function for the router view, live and
//! reopened runs, and the lessons' `alert` check.

use crate::app::state::RouterSettings;
use crate::physics::Prior;
use crate::train::protocol::{RouterStats, Snapshot};

/// An alert about the router.
#[derive(Clone, Debug, PartialEq)]
pub enum Alert {
    /// A prior is barely used: its token share and its mean weight stayed low over the span.
    Dead {
        /// Block.
        block: usize,
        /// Prior.
        prior: Prior,
        /// Its mean weight α in the latest snapshot.
        alpha: f32,
        /// Its token share (argmax) in the latest snapshot.
        share: f32,
    },
    /// Routing collapsed: one prior takes nearly every token, or each token is routed almost
    /// one-hot, over the whole span.
    Collapse {
        /// Block.
        block: usize,
        /// The prior taking most tokens in the latest snapshot.
        prior: Prior,
        /// Its token share in the latest snapshot.
        share: f32,
        /// The normalised per-token entropy in the latest snapshot (0: one-hot, 1: uniform).
        entropy: f32,
    },
}

impl Alert {
    /// One line.
    #[must_use]
    pub fn message(&self) -> String {
        match self {
            Self::Dead {
                block,
                prior,
                alpha,
                share,
            } => format!(
                "block {block}: {prior} is dead (token share {:.1}%, mean α = {alpha:.3})",
                100.0 * share
            ),
            Self::Collapse {
                block,
                prior,
                share,
                entropy,
            } => format!(
                "block {block}: the router collapsed onto {prior} (token share {:.1}%, per-token entropy {entropy:.2} of 1)",
                100.0 * share
            ),
        }
    }
}

/// Router alerts (INTERFACES.md "Router diagnostics"), one function for live and reopened runs
/// and lessons alike. Per block, over the snapshots of the last `settings.span` steps (at least
/// two of them; every one must meet the condition, so a run's cadence of snapshots does not
/// change the verdict): collapse = one prior's token share above `collapse_above`, or the
/// normalised per-token entropy below `collapse_entropy`; dead = a prior's token share below
/// `dead_share` and its mean α below `dead_below`.
#[must_use]
pub fn alerts(snapshots: &[Snapshot], settings: &RouterSettings) -> Vec<Alert> {
    let Some(last) = snapshots.last() else {
        return Vec::new();
    };
    let from = last.step.saturating_sub(settings.span);
    let recent: Vec<&Snapshot> = snapshots.iter().rev().take_while(|s| s.step >= from).collect();
    if recent.len() < 2 {
        return Vec::new();
    }
    let stats = |s: &Snapshot, block: usize| {
        s.blocks
            .iter()
            .find(|x| x.block == block)
            .and_then(|x| x.router.clone())
    };
    let mut out = Vec::new();
    for b in &last.blocks {
        let Some(r) = &b.router else { continue };
        let all =
            |cond: &dyn Fn(&RouterStats) -> bool| recent.iter().all(|s| stats(s, b.block).is_some_and(|r| cond(&r)));
        let top = r
            .argmax_share
            .iter()
            .enumerate()
            .max_by(|x, y| x.1.total_cmp(y.1))
            .map(|(p, _)| p);
        let collapsed = all(&|r| {
            r.entropy_norm < settings.collapse_entropy || r.argmax_share.iter().any(|s| *s > settings.collapse_above)
        });
        if let (true, Some(p), Some(&prior)) = (collapsed, top, top.and_then(|p| last.priors.get(p))) {
            out.push(Alert::Collapse {
                block: b.block,
                prior,
                share: r.argmax_share[p],
                entropy: r.entropy_norm,
            });
        }
        for (p, &prior) in last.priors.iter().enumerate() {
            let dead = all(&|r| {
                r.argmax_share.get(p).is_some_and(|s| *s < settings.dead_share)
                    && r.mean_alpha.get(p).is_some_and(|a| *a < settings.dead_below)
            });
            if dead {
                out.push(Alert::Dead {
                    block: b.block,
                    prior,
                    alpha: r.mean_alpha.get(p).copied().unwrap_or(0.0),
                    share: r.argmax_share.get(p).copied().unwrap_or(0.0),
                });
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::protocol::BlockSnapshot;

    /// A snapshot at `step` of one block routed as `(mean α, token share, normalised entropy)`.
    fn snap(step: u64, alpha: [f32; 3], share: [f32; 3], entropy: f32) -> Snapshot {
        Snapshot {
            step,
            grid: (2, 2),
            priors: vec![Prior::Heat, Prior::Wave, Prior::Poisson],
            channel: None,
            tau: 1.0,
            gamma: 0.0,
            route_weight: 0.01,
            temperature: 1.0,
            blocks: vec![BlockSnapshot {
                block: 0,
                filters_mean: Vec::new(),
                filters_channel: Vec::new(),
                mix: Vec::new(),
                coeffs: crate::config::PerCoeff::default(),
                source: Vec::new(),
                router: Some(RouterStats {
                    mean_alpha: alpha.to_vec(),
                    entropy: entropy * 3f32.ln(),
                    entropy_norm: entropy,
                    argmax_share: share.to_vec(),
                }),
                probe_alpha: Vec::new(),
                locked: Vec::new(),
            }],
            probe: None,
            probe_prediction: None,
        }
    }

    const SPREAD: ([f32; 3], [f32; 3], f32) = ([0.34, 0.33, 0.33], [0.4, 0.3, 0.3], 0.98);
    /// Mean α spread out, but every token routed nearly one-hot, most onto Poisson: the
    /// case mean-α alerts missed (per-token entropy 0.12).
    const ONE_HOT: ([f32; 3], [f32; 3], f32) = ([0.2, 0.2, 0.6], [0.15, 0.1, 0.75], 0.12);

    fn run(steps: &[u64], at: impl Fn(u64) -> ([f32; 3], [f32; 3], f32)) -> Vec<Snapshot> {
        steps
            .iter()
            .map(|&s| {
                let (a, sh, e) = at(s);
                snap(s, a, sh, e)
            })
            .collect()
    }

    #[test]
    fn a_one_hot_router_collapses_even_when_mean_alpha_is_spread() {
        let settings = RouterSettings::default();
        let snaps = run(&[100, 150, 200], |_| ONE_HOT);
        let got = alerts(&snaps, &settings);
        assert_eq!(
            got,
            vec![Alert::Collapse {
                block: 0,
                prior: Prior::Poisson,
                share: 0.75,
                entropy: 0.12
            }]
        );
        assert!(
            got[0].message().contains("collapsed onto poisson"),
            "{}",
            got[0].message()
        );
        // A token share above 0.9 alone is a collapse too, with high entropy.
        let snaps = run(&[100, 200], |_| ([0.5, 0.3, 0.2], [0.95, 0.05, 0.0], 0.6));
        assert!(matches!(
            alerts(&snaps, &settings)[..],
            [Alert::Collapse { prior: Prior::Heat, .. }, ..]
        ));
        // A spread router: nothing.
        assert!(alerts(&run(&[100, 200], |_| SPREAD), &settings).is_empty());
    }

    #[test]
    fn every_snapshot_of_the_span_must_meet_the_condition_and_two_are_needed() {
        let settings = RouterSettings::default();
        // Spread until step 150, one-hot from 160: the last 100 steps (100..=200) hold a spread
        // snapshot, so no alert yet; a span of 40 steps (160..=200) sees only one-hot ones.
        let snaps = run(&[100, 150, 160, 200], |s| if s < 160 { SPREAD } else { ONE_HOT });
        assert!(alerts(&snaps, &settings).is_empty());
        let short = RouterSettings {
            span: 40,
            ..RouterSettings::default()
        };
        assert_eq!(alerts(&snaps, &short).len(), 1);
        // One snapshot in the span is not enough.
        assert!(alerts(&run(&[10, 200], |s| if s < 100 { SPREAD } else { ONE_HOT }), &settings).is_empty());
        // The cadence does not change the verdict: every 10 steps or every 50, the same alerts.
        let dense: Vec<u64> = (0..=30).map(|i| i * 10).collect();
        let sparse: Vec<u64> = (0..=6).map(|i| i * 50).collect();
        let at = |s: u64| if s < 150 { SPREAD } else { ONE_HOT };
        assert_eq!(
            alerts(&run(&dense, at), &settings),
            alerts(&run(&sparse, at), &settings)
        );
        assert_eq!(alerts(&run(&dense, at), &settings).len(), 1);
    }

    #[test]
    fn a_dead_prior_needs_both_a_small_token_share_and_a_small_mean_weight() {
        let settings = RouterSettings::default();
        let dead = run(&[100, 200], |_| ([0.6, 0.37, 0.03], [0.6, 0.39, 0.01], 0.7));
        assert_eq!(
            alerts(&dead, &settings),
            vec![Alert::Dead {
                block: 0,
                prior: Prior::Poisson,
                alpha: 0.03,
                share: 0.01
            }]
        );
        // A small share but a real mean weight (0.2): the prior still contributes.
        let alive = run(&[100, 200], |_| ([0.5, 0.3, 0.2], [0.6, 0.39, 0.01], 0.9));
        assert!(alerts(&alive, &settings).is_empty());
    }
}
