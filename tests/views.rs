//! The one snapshot view (`snapfile::snapshot_view`): a live run and the same run reopened from
//! its folder show identical filters, mix, coefficients and router statistics, and the view of a
//! recorded snapshot agrees with the model's own f32 filters.
#![allow(clippy::unwrap_used, clippy::pedantic)]

mod common;

use candle_core::{DType, Device};
use moppa_studio::config::{Coeff, MethodConfig, PerCoeff, RunConfig};
use moppa_studio::model::init::Init;
use moppa_studio::model::moppa::{Live, MoppaUnit};
use moppa_studio::physics::tensor::SpectralGrid;
use moppa_studio::train::protocol::{BlockSnapshot, Event, Snapshot};
use moppa_studio::train::record::{SnapshotHeader, SnapshotRecord};
use moppa_studio::train::replay::RunFolderReader;
use moppa_studio::train::snapfile::snapshot_view;
use moppa_studio::train::{WorkerHandle, WorkerOptions};
use std::time::{Duration, Instant};

fn last_snapshot(events: &[Event]) -> &Snapshot {
    events
        .iter()
        .rev()
        .find_map(|e| match e {
            Event::Snapshot(s) => Some(s.as_ref()),
            _ => None,
        })
        .expect("a snapshot")
}

#[test]
fn a_live_run_and_the_same_run_reopened_show_identical_views() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let cfg = RunConfig {
        backbone: common::micro_backbone(dir.path()).display().to_string(),
        steps: Some(12),
        batch: 32,
        eval_every: 0,
        threads: Some(2),
        out: Some(out.clone()),
        ..RunConfig::default()
    };
    let h = WorkerHandle::spawn(
        cfg,
        WorkerOptions {
            autostart: true,
            max_snapshots_per_s: 1000.0,
            ..WorkerOptions::default()
        },
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut live = Vec::new();
    while !live.iter().any(|e| matches!(e, Event::Finished(_))) {
        assert!(Instant::now() < deadline, "the run did not finish");
        if let Ok(e) = h.events().recv_timeout(Duration::from_millis(200)) {
            live.push(e);
        }
    }
    h.join();
    let live = last_snapshot(&live);
    let reopened = RunFolderReader::open(&out).unwrap().poll();
    let reopened = last_snapshot(&reopened);
    assert_eq!(live.step, 12);
    assert_eq!(reopened.step, live.step);
    assert_eq!(
        reopened.blocks, live.blocks,
        "filters, mix, coefficients, router, probe weights"
    );
    assert!(!live.blocks[0].filters_mean[0].is_empty() && !live.blocks[0].mix.is_empty());
    assert_eq!(
        (
            reopened.tau,
            reopened.gamma,
            reopened.route_weight,
            reopened.temperature
        ),
        (live.tau, live.gamma, live.route_weight, live.temperature)
    );
    assert_eq!(reopened.probe_prediction, live.probe_prediction);
    assert_eq!(
        reopened.probe.as_ref().map(|p| &p.origin),
        live.probe.as_ref().map(|p| &p.origin)
    );
}

/// ‖a − b‖₂ / ‖b‖₂ over all elements, in f64 (INTERFACES.md).
fn rel(a: &[f32], b: &[f32]) -> f64 {
    let num: f64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| (f64::from(*x) - f64::from(*y)).powi(2))
        .sum();
    let den: f64 = b.iter().map(|y| f64::from(*y).powi(2)).sum();
    (num / den).sqrt()
}

/// The snapshot record of one MoPPA unit (block 0) with `method`'s τ, γ, λ and T on a grid.
fn record_of(unit: &MoppaUnit, method: &MethodConfig, grid: (usize, usize)) -> SnapshotRecord {
    let natural = unit.coeffs();
    let snapshot = Snapshot {
        step: 1,
        grid,
        priors: method.priors.clone(),
        channel: None,
        tau: method.tau,
        gamma: method.gamma,
        route_weight: method.route_weight,
        temperature: method.temperature,
        blocks: vec![BlockSnapshot {
            block: 0,
            filters_mean: Vec::new(),
            filters_channel: Vec::new(),
            mix: Vec::new(),
            coeffs: PerCoeff::from_fn(|c| natural[c].iter().map(|v| *v as f32).collect()),
            source: unit.source_map().unwrap(),
            router: None,
            probe_alpha: Vec::new(),
            locked: Vec::new(),
        }],
        probe: None,
        probe_prediction: None,
    };
    SnapshotRecord::from_snapshot(&snapshot, 0.5)
}

#[test]
fn the_view_of_a_recorded_snapshot_agrees_with_the_models_f32_filters() {
    let (h, w, rank) = (7, 5, 6);
    let method = MethodConfig {
        rank,
        tau: 1.3,
        gamma: 0.2,
        ..MethodConfig::default()
    };
    let mut init = Init::new(3, &Device::Cpu, DType::F32);
    let unit = MoppaUnit::new(24, (h, w), &method, &mut init).unwrap();
    // Spread κ, c and ε over several decades, as trained runs do, with more digits than the
    // record keeps (5 significant).
    let digits = |v: [f64; 6]| v.map(|x| x * 1.234_567_891);
    unit.set_coeff(Coeff::Kappa, &digits([1e-3, 0.031, 0.2, 0.77, 2.5, 9.0]))
        .unwrap();
    unit.set_coeff(Coeff::C, &digits([0.05, 0.3, 0.9, 1.4, 2.2, 3.1]))
        .unwrap();
    unit.set_coeff(Coeff::Eps, &digits([0.01, 0.12, 0.5, 1.0, 4.0, 20.0]))
        .unwrap();
    let grid = SpectralGrid::new(h, w, DType::F32, &Device::Cpu).unwrap();
    let live = Live::from_config(&method);
    let model: Vec<Vec<Vec<f32>>> = unit
        .filters(&grid, &live, false)
        .unwrap()
        .iter()
        .map(|g| g.to_vec2::<f32>().unwrap())
        .collect();
    let record = record_of(&unit, &method, (h, w));
    let header = SnapshotHeader::new(1, rank, (h, w), &method.priors);
    let mut worst = 0f64;
    for channel in 0..rank {
        let view = snapshot_view(&record, &header, Some(channel)).unwrap();
        let b = &view.blocks[0];
        for (p, gains) in model.iter().enumerate() {
            let mean: Vec<f32> = (0..h * w)
                .map(|i| gains.iter().map(|row| row[i]).sum::<f32>() / rank as f32)
                .collect();
            let e_mean = rel(&b.filters_mean[p], &mean);
            let e_channel = rel(&b.filters_channel[p], &gains[channel]);
            assert!(e_mean < 1e-4, "prior {p}: channel mean off by {e_mean:e}");
            assert!(e_channel < 1e-4, "prior {p}, channel {channel}: off by {e_channel:e}");
            worst = worst.max(e_mean).max(e_channel);
        }
    }
    eprintln!("view against the model's f32 filters: worst relative error {worst:.2e}");
}

/// Every filter is finite in f32 at every corner of the coefficient ranges, alone and together:
/// κ, c, ε ∈ {1e-8, 1e8}, τ ∈ {1e-8, 1e8}, γ ∈ {0, 1e8} (INTERFACES.md "General"), in the
/// model's own f32 filters (through the softplus parameterisation) and in the view of a record.
#[test]
fn every_filter_is_finite_at_every_corner_of_the_ranges() {
    use moppa_studio::config::range;
    let (h, w, rank) = (5, 4, 2);
    let ends = |r: moppa_studio::config::ValueRange| [r.min, r.max];
    for kappa in ends(range::KAPPA) {
        for c in ends(range::WAVE_SPEED) {
            for eps in ends(range::EPS) {
                for tau in ends(range::TAU) {
                    for gamma in ends(range::GAMMA) {
                        let method = MethodConfig {
                            rank,
                            tau,
                            gamma,
                            ..MethodConfig::default()
                        };
                        let mut init = Init::new(1, &Device::Cpu, DType::F32);
                        let unit = MoppaUnit::new(8, (h, w), &method, &mut init).unwrap();
                        unit.set_coeff(Coeff::Kappa, &[kappa; 2]).unwrap();
                        unit.set_coeff(Coeff::C, &[c; 2]).unwrap();
                        unit.set_coeff(Coeff::Eps, &[eps; 2]).unwrap();
                        let grid = SpectralGrid::new(h, w, DType::F32, &Device::Cpu).unwrap();
                        let at = format!("κ {kappa:e}, c {c:e}, ε {eps:e}, τ {tau:e}, γ {gamma:e}");
                        for (p, g) in unit
                            .filters(&grid, &Live::from_config(&method), false)
                            .unwrap()
                            .iter()
                            .enumerate()
                        {
                            let g: Vec<f32> = g.flatten_all().unwrap().to_vec1().unwrap();
                            assert!(g.iter().all(|x| x.is_finite()), "model, prior {p}, {at}: {g:?}");
                        }
                        let record = record_of(&unit, &method, (h, w));
                        let header = SnapshotHeader::new(1, rank, (h, w), &method.priors);
                        let view = snapshot_view(&record, &header, Some(1)).unwrap();
                        let b = &view.blocks[0];
                        for g in b.filters_mean.iter().chain(&b.filters_channel).chain([&b.mix]) {
                            assert!(g.iter().all(|x| x.is_finite()), "view, {at}: {g:?}");
                        }
                    }
                }
            }
        }
    }
}
