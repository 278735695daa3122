//! Seeds of one setting, drawn as one: runs whose configurations differ only in `seed` (and in
//! where or how they ran: folder, threads, device, evaluation cadence) form a group, drawn as
//! its mean with a ± one standard deviation band. Each run's series is decimated with its own
//! stride and evaluated at its own cadence, so the runs are aligned on steps (each interpolated
//! linearly at common steps), never zipped by index.

use serde_json::Value;

/// Keys that do not make two runs different settings: the seed, and where or how they ran.
pub const NOT_A_SETTING: [&str; 11] = [
    "seed",
    "out",
    "resume",
    "threads",
    "device",
    "eval_every",
    "snapshot_every",
    "data_given",
    "backbone_given",
    "backbone_sha256",
    "auto_resume",
];

/// What makes a run's setting: its configuration without [`NOT_A_SETTING`] (`None` when its
/// configuration is not known yet).
#[must_use]
pub fn setting_key(config: &Value) -> Option<String> {
    let mut o = config.as_object()?.clone();
    for k in NOT_A_SETTING {
        o.remove(k);
    }
    Some(Value::Object(o).to_string())
}

/// Groups of run indices with the same setting key ([`setting_key`]), in the order of their
/// first run; runs whose configuration is unknown are groups of one.
#[must_use]
pub fn groups(settings: &[Option<&str>]) -> Vec<Vec<usize>> {
    let mut keys: Vec<Option<&str>> = Vec::new();
    let mut out: Vec<Vec<usize>> = Vec::new();
    for (i, &key) in settings.iter().enumerate() {
        if let Some(g) = key.and_then(|k| keys.iter().position(|q| *q == Some(k))) {
            out[g].push(i);
        } else {
            keys.push(key);
            out.push(vec![i]);
        }
    }
    out
}

/// `series` (points `[x, y]` sorted by x) at `x`, linearly interpolated; `None` outside it.
fn at(series: &[[f64; 2]], x: f64) -> Option<f64> {
    let i = series.partition_point(|p| p[0] < x);
    let hi = series.get(i)?;
    if hi[0] <= x {
        // x is on a point of the series.
        return Some(hi[1]);
    }
    let lo = series.get(i.checked_sub(1)?)?;
    let t = (x - lo[0]) / (hi[0] - lo[0]);
    Some(lo[1] + t * (hi[1] - lo[1]))
}

/// Mean and sample standard deviation of several runs' series at common steps: `points` steps
/// spread evenly over the steps every series covers (plus every series' own steps there when
/// fewer), each series interpolated linearly. `[x, mean, std]`; empty with fewer than two
/// series or no common step.
#[must_use]
pub fn band(series: &[Vec<[f64; 2]>], points: usize) -> Vec<[f64; 3]> {
    if series.len() < 2 || series.iter().any(Vec::is_empty) {
        return Vec::new();
    }
    let lo = series.iter().map(|s| s[0][0]).fold(f64::NEG_INFINITY, f64::max);
    let hi = series.iter().map(|s| s[s.len() - 1][0]).fold(f64::INFINITY, f64::min);
    if lo.is_nan() || hi.is_nan() || lo > hi {
        return Vec::new();
    }
    // The steps: those of the sparsest series inside the common range, or an even grid.
    let sparsest = series.iter().min_by_key(|s| s.len()).map_or(&[][..], Vec::as_slice);
    let mut xs: Vec<f64> = sparsest
        .iter()
        .map(|p| p[0])
        .filter(|x| (lo..=hi).contains(x))
        .collect();
    if xs.len() > points || xs.len() < 2 {
        let n = points.max(2);
        xs = (0..n).map(|k| lo + (hi - lo) * k as f64 / (n - 1) as f64).collect();
        xs.dedup();
    }
    let n = series.len() as f64;
    xs.into_iter()
        .filter_map(|x| {
            let ys: Vec<f64> = series.iter().map(|s| at(s, x)).collect::<Option<_>>()?;
            let mean = ys.iter().sum::<f64>() / n;
            let var = ys.iter().map(|y| (y - mean).powi(2)).sum::<f64>() / (n - 1.0);
            Some([x, mean, var.sqrt()])
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeds_of_different_lengths_and_cadences_are_aligned_on_steps() {
        // Seed A every 2 steps to 100 (y = step), seed B every 3 steps to 90 (y = step + 10):
        // at every common step the mean is step + 5 and the sample std sqrt(50) (two values 10
        // apart). Zipping by index would pair step 2k with step 3k and get neither.
        let a: Vec<[f64; 2]> = (0..=50).map(|k| [2.0 * f64::from(k), 2.0 * f64::from(k)]).collect();
        let b: Vec<[f64; 2]> = (0..=30)
            .map(|k| [3.0 * f64::from(k), 3.0 * f64::from(k) + 10.0])
            .collect();
        let out = band(&[a, b], 200);
        assert_eq!(out.len(), 31, "B's steps inside the common range 0..=90");
        assert_eq!(out.last().map(|p| p[0]), Some(90.0), "ends where the shorter seed ends");
        for [x, mean, std] in out {
            assert!((mean - (x + 5.0)).abs() < 1e-9, "{x}: {mean}");
            assert!((std - 50f64.sqrt()).abs() < 1e-9, "{x}: {std}");
        }
        assert!(band(&[vec![[0.0, 1.0]]], 10).is_empty(), "one seed has no band");
        assert!(
            band(&[vec![[0.0, 1.0]], vec![[5.0, 1.0]]], 10).is_empty(),
            "no common step"
        );
    }

    #[test]
    fn runs_group_by_everything_but_the_seed_and_where_they_ran() {
        let cfg = |method: &str, seed: u64, out: &str| serde_json::json!({"method": method, "seed": seed, "out": out, "threads": seed, "lr": 0.01});
        let cs = [
            cfg("moppa", 0, "a"),
            cfg("lora", 0, "b"),
            cfg("moppa", 1, "c"),
            cfg("lora", 1, "d"),
            cfg("moppa", 2, "e"),
        ];
        let keys: Vec<Option<String>> = cs.iter().map(setting_key).chain([None]).collect();
        let keys: Vec<Option<&str>> = keys.iter().map(Option::as_deref).collect();
        assert_eq!(groups(&keys), vec![vec![0, 2, 4], vec![1, 3], vec![5]]);
    }
}
