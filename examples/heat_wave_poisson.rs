// Prints how each physical prior filters a 14×14 token grid (ViT-B/16 at 224 px): the gain G
// against spatial frequency √Λ (1-D radial profile: heat decays like a Gaussian, wave follows a
// cosine that turns negative once c·τ·√Λ > π/2, Poisson falls off slowly like ε/Λ), then the width
// of each spatial impulse response (heat stays local, Poisson spreads over the whole grid).
//
//     cargo run --release --example heat_wave_poisson [-- KAPPA C EPS]
//
// Expected with the defaults (κ 0.1, c 0.5, ε 1): every gain is 1 at √Λ = 0; at the top frequency
// (√Λ ≈ 2.81) heat ≈ 0.454, wave ≈ 0.165, Poisson ≈ 0.112; impulse widths ≈ 0.63 (heat),
// 0.71 (wave) and 1.98 (Poisson) cells. With `-- 0.1 1.5 1` the wave gain reaches −0.48 and its
// impulse response rings.

use moppa_studio::physics::{FilterSet, Prior, PriorCoeffs, impulse_width, radial_profile};

fn main() -> anyhow::Result<()> {
    let args: Vec<f64> = std::env::args().skip(1).map(|a| a.parse()).collect::<Result<_, _>>()?;
    let mut coeffs = PriorCoeffs::default();
    if let [kappa, c, eps, ..] = args[..] {
        (coeffs.kappa, coeffs.c, coeffs.eps) = (kappa, c, eps);
    }
    let (h, w) = (14, 14);
    let set = FilterSet::new(h, w, coeffs)?;
    println!(
        "grid {h}×{w}, κ = {}, c = {}, ε = {}, τ = {}, γ = {}",
        coeffs.kappa, coeffs.c, coeffs.eps, coeffs.tau, coeffs.gamma
    );
    println!("{:>7} {:>9} {:>9} {:>9}", "√Λ", "heat", "wave", "poisson");
    let profiles: Vec<Vec<(f64, f64)>> = Prior::ALL
        .iter()
        .map(|&p| radial_profile(&set.lambda, set.gain(p)))
        .collect();
    // Every 8th distinct frequency keeps the table short.
    let n = profiles[0].len();
    for i in (0..n).step_by(8).chain(std::iter::once(n - 1)) {
        println!(
            "{:>7.3} {:>9.4} {:>9.4} {:>9.4}",
            profiles[0][i].0, profiles[0][i].1, profiles[1][i].1, profiles[2][i].1
        );
    }
    println!("impulse-response width (RMS distance of |response| from the impulse, in cells):");
    for p in Prior::ALL {
        println!("  {:<8} {:.3}", p.name(), impulse_width(h, w, set.impulse(p)));
    }
    Ok(())
}
