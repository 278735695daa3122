//! Colormaps: a diverging blue–white–red map for signed values (wave gains go negative) and a
//! sequential map for shares in 0..1, as 8-bit RGB; one colour per prior.

use crate::config::Prior;

/// Blue (−1) – white (0) – red (+1), after ColorBrewer's RdBu.
const DIVERGING: [[u8; 3]; 9] = [
    [33, 102, 172],
    [67, 147, 195],
    [146, 197, 222],
    [209, 229, 240],
    [247, 247, 247],
    [253, 219, 199],
    [244, 165, 130],
    [214, 96, 77],
    [178, 24, 43],
];

/// Dark purple (0) to yellow (1), after viridis.
const SEQUENTIAL: [[u8; 3]; 9] = [
    [68, 1, 84],
    [71, 44, 122],
    [59, 81, 139],
    [44, 113, 142],
    [33, 144, 141],
    [39, 173, 129],
    [92, 200, 99],
    [170, 220, 50],
    [253, 231, 37],
];

fn lerp(stops: &[[u8; 3]], t: f32) -> [u8; 3] {
    let t = if t.is_finite() { t.clamp(0.0, 1.0) } else { 0.5 };
    let x = t * (stops.len() - 1) as f32;
    let i = (x.floor() as usize).min(stops.len() - 2);
    let f = x - i as f32;
    let (a, b) = (stops[i], stops[i + 1]);
    std::array::from_fn(|c| (f32::from(a[c]) + f * (f32::from(b[c]) - f32::from(a[c]))).round() as u8)
}

/// Colour of `v` in `[-limit, limit]` on the diverging map.
#[must_use]
pub fn diverging(v: f32, limit: f32) -> [u8; 3] {
    lerp(&DIVERGING, 0.5 + 0.5 * v / limit.max(1e-12))
}

/// Colour of `v` in `[0, 1]` on the sequential map.
#[must_use]
pub fn sequential(v: f32) -> [u8; 3] {
    lerp(&SEQUENTIAL, v)
}

/// One colour per prior (heat, wave, Poisson), also used for their curves.
pub const PRIOR_COLORS: [[u8; 3]; 3] = [[230, 85, 13], [49, 130, 189], [49, 163, 84]];

/// A prior's colour as RGB.
#[must_use]
pub fn prior_rgb(p: Prior) -> [u8; 3] {
    PRIOR_COLORS[p.index()]
}

/// A prior's colour for egui.
#[must_use]
pub fn prior_color(p: Prior) -> egui::Color32 {
    let [r, g, b] = prior_rgb(p);
    egui::Color32::from_rgb(r, g, b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_hit_their_ends_and_middle() {
        assert_eq!(diverging(-1.0, 1.0), DIVERGING[0]);
        assert_eq!(diverging(0.0, 1.0), DIVERGING[4]);
        assert_eq!(diverging(2.0, 1.0), DIVERGING[8], "clamped");
        assert_eq!(sequential(0.0), SEQUENTIAL[0]);
        assert_eq!(sequential(1.0), SEQUENTIAL[8]);
        assert_eq!(sequential(f32::NAN), sequential(0.5));
    }
}
