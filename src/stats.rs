//! How far an accuracy can be trusted: the 95% Wilson interval of one run's accuracy on n
//! images, and the 95% Student-t interval of a mean over seeds (INTERFACES.md "Comparisons").
//! Plain arithmetic, used by `moppa compare`, `moppa eval` and the app's runs table alike.

/// The standard normal's 97.5% quantile (a two-sided 95% interval).
pub const Z_975: f64 = 1.959_963_984_540_054;

/// Student t's 97.5% quantile for 1..=30 degrees of freedom, from SciPy
/// (`[scipy.stats.t.ppf(0.975, df) for df in range(1, 31)]`).
const T_975: [f64; 30] = [
    12.706_204_736_175,
    4.302_652_729_749,
    3.182_446_305_284,
    2.776_445_105_198,
    2.570_581_835_636,
    2.446_911_851_145,
    2.364_624_251_593,
    2.306_004_135_204,
    2.262_157_162_798,
    2.228_138_851_986,
    2.200_985_160_092,
    2.178_812_829_667,
    2.160_368_656_463,
    2.144_786_687_918,
    2.131_449_545_560,
    2.119_905_299_221,
    2.109_815_577_833,
    2.100_922_040_241,
    2.093_024_054_408,
    2.085_963_447_266,
    2.079_613_844_728,
    2.073_873_067_904,
    2.068_657_610_419,
    2.063_898_561_628,
    2.059_538_552_753,
    2.055_529_438_643,
    2.051_830_516_480,
    2.048_407_141_795,
    2.045_229_642_133,
    2.042_272_456_301,
];

/// Student t's 97.5% quantile for `df` ≥ 1 degrees of freedom: SciPy's values up to 30, then the
/// Cornish-Fisher expansion around the normal quantile (error below 1e-7 from 31 on).
#[must_use]
pub fn t_975(df: u64) -> f64 {
    if df == 0 {
        return f64::INFINITY;
    }
    if let Some(t) = usize::try_from(df - 1).ok().and_then(|i| T_975.get(i)) {
        return *t;
    }
    let (z, v) = (Z_975, df as f64);
    let (z3, z5, z7, z9) = (z.powi(3), z.powi(5), z.powi(7), z.powi(9));
    z + (z3 + z) / (4.0 * v)
        + (5.0 * z5 + 16.0 * z3 + 3.0 * z) / (96.0 * v * v)
        + (3.0 * z7 + 19.0 * z5 + 17.0 * z3 - 15.0 * z) / (384.0 * v.powi(3))
        + (79.0 * z9 + 776.0 * z7 + 1482.0 * z5 - 1920.0 * z3 - 945.0 * z) / (92_160.0 * v.powi(4))
}

/// The 95% Wilson score interval of `correct` successes in `n` trials, as fractions; `None` for
/// `n` = 0.
#[must_use]
pub fn wilson(correct: u64, n: u64) -> Option<(f64, f64)> {
    if n == 0 {
        return None;
    }
    let (k, n) = (correct.min(n) as f64, n as f64);
    let p = k / n;
    let z2 = Z_975 * Z_975;
    let denom = 1.0 + z2 / n;
    let centre = (p + z2 / (2.0 * n)) / denom;
    let half = Z_975 * (p * (1.0 - p) / n + z2 / (4.0 * n * n)).sqrt() / denom;
    Some(((centre - half).max(0.0), (centre + half).min(1.0)))
}

/// An accuracy measured on `n` images: the Wilson interval of the correct count it implies.
#[must_use]
pub fn wilson_acc(acc: f64, n: u64) -> Option<(f64, f64)> {
    if !acc.is_finite() {
        return None;
    }
    let correct = (acc.clamp(0.0, 1.0) * n as f64).round() as u64;
    wilson(correct, n)
}

/// Mean, sample standard deviation and the 95% t-interval of the mean of `x` (at least two
/// finite values; `None` otherwise).
#[must_use]
pub fn t_interval(x: &[f64]) -> Option<MeanInterval> {
    if x.len() < 2 || x.iter().any(|v| !v.is_finite()) {
        return None;
    }
    let m = x.len() as f64;
    let mean = x.iter().sum::<f64>() / m;
    let std = (x.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (m - 1.0)).sqrt();
    let half = t_975(x.len() as u64 - 1) * std / m.sqrt();
    Some(MeanInterval {
        mean,
        std,
        low: mean - half,
        high: mean + half,
    })
}

/// A mean over seeds with its spread.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MeanInterval {
    /// The mean.
    pub mean: f64,
    /// The sample standard deviation (n − 1).
    pub std: f64,
    /// The 95% interval's lower end.
    pub low: f64,
    /// Its upper end.
    pub high: f64,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reference (SciPy 1.17):
    /// ```python
    /// from scipy import stats
    /// for df in [31, 40, 60, 100, 120, 1000]: print(df, stats.t.ppf(0.975, df))
    /// ```
    #[test]
    fn t_quantiles_match_scipy() {
        for (df, want) in [
            (1, 12.706_204_736_175),
            (2, 4.302_652_729_749),
            (30, 2.042_272_456_301),
            (31, 2.039_513_446_396_408),
            (40, 2.021_075_390_306_273),
            (60, 2.000_297_822_014_260_4),
            (100, 1.983_971_518_523_551_8),
            (120, 1.979_930_405_082_440_2),
            (1000, 1.962_339_080_826_408_3),
        ] {
            assert!((t_975(df) - want).abs() < 1e-7, "df {df}: {} vs {want}", t_975(df));
        }
        assert!(t_975(0).is_infinite());
    }

    /// Reference (SciPy 1.17):
    /// ```python
    /// from scipy import stats
    /// for k, n in [(0,12),(12,12),(83,100),(450,500),(1,3)]:
    ///     ci = stats.binomtest(k, n).proportion_ci(0.95, method='wilson'); print(k, n, ci.low, ci.high)
    /// ```
    #[test]
    fn wilson_matches_scipy() {
        for (k, n, lo, hi) in [
            (0, 12, 0.0, 0.242_494_006_655_240_85),
            (12, 12, 0.757_505_993_344_759_2, 1.0),
            (83, 100, 0.744_519_952_323_988_7, 0.891_064_338_859_400_6),
            (450, 500, 0.870_578_090_368_059_9, 0.923_322_437_262_698_4),
            (1, 3, 0.061_491_944_720_396_26, 0.792_340_399_197_952_3),
        ] {
            let (l, h) = wilson(k, n).unwrap();
            assert!((l - lo).abs() < 1e-12 && (h - hi).abs() < 1e-12, "{k}/{n}: [{l}, {h}]");
        }
        assert_eq!(wilson(1, 0), None);
        assert_eq!(wilson_acc(0.83, 100), wilson(83, 100));
        assert_eq!(wilson_acc(f64::NAN, 100), None);
    }

    /// Reference (SciPy 1.17):
    /// ```python
    /// import numpy as np; from scipy import stats
    /// x = np.array([0.81, 0.85, 0.78]); m = x.mean(); s = x.std(ddof=1)
    /// print(m, s, stats.t.interval(0.95, 2, loc=m, scale=stats.sem(x)))
    /// ```
    #[test]
    fn t_interval_matches_scipy() {
        let r = t_interval(&[0.81, 0.85, 0.78]).unwrap();
        assert!((r.mean - 0.813_333_333_333_333_5).abs() < 1e-12);
        assert!((r.std - 0.035_118_845_842_842_44).abs() < 1e-12);
        assert!((r.low - 0.726_093_283_981_982_3).abs() < 1e-9, "{r:?}");
        assert!((r.high - 0.900_573_382_684_684_7).abs() < 1e-9, "{r:?}");
        assert_eq!(t_interval(&[0.5]), None);
        assert_eq!(t_interval(&[0.5, f64::NAN]), None);
    }
}
