//! Heatmaps of small grids (token-grid filters, router maps) drawn as nearest-neighbour textures,
//! with a colour bar and a hover read-out; textures are cached and re-uploaded only on change.

use super::colormap::{diverging, sequential};
use egui::{Color32, Pos2, Rect, Sense, TextureHandle, TextureOptions, Vec2, pos2, vec2};
use std::collections::HashMap;

/// How values map to colours.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Scale {
    /// Signed values in `[-limit, limit]` (blue–white–red).
    Diverging(f32),
    /// Values in `[0, 1]` (viridis-like).
    Unit,
}

impl Scale {
    /// RGB of a value.
    #[must_use]
    pub fn color(self, v: f32) -> [u8; 3] {
        match self {
            Self::Diverging(limit) => diverging(v, limit),
            Self::Unit => sequential(v),
        }
    }

    /// The value range shown on the colour bar.
    #[must_use]
    pub fn range(self) -> (f32, f32) {
        match self {
            Self::Diverging(l) => (-l, l),
            Self::Unit => (0.0, 1.0),
        }
    }
}

/// Cached textures by name.
#[derive(Default)]
pub struct Textures {
    cache: HashMap<String, (Vec<u8>, TextureHandle)>,
}

impl Textures {
    /// The texture `name` holding `rgba` (`w × h`), uploaded only when the pixels changed.
    pub fn get(&mut self, ctx: &egui::Context, name: &str, rgba: Vec<u8>, (w, h): (usize, usize)) -> egui::TextureId {
        let make = || egui::ColorImage::from_rgba_unmultiplied([w, h], &rgba);
        match self.cache.get_mut(name) {
            Some((old, tex)) if *old == rgba => tex.id(),
            Some((old, tex)) => {
                tex.set(make(), TextureOptions::NEAREST);
                *old = rgba;
                tex.id()
            }
            None => {
                let tex = ctx.load_texture(name, make(), TextureOptions::NEAREST);
                let id = tex.id();
                self.cache.insert(name.to_owned(), (rgba, tex));
                id
            }
        }
    }
}

/// RGBA pixels of a grid of values.
#[must_use]
pub fn rgba(values: &[f32], scale: Scale) -> Vec<u8> {
    values
        .iter()
        .flat_map(|v| {
            let [r, g, b] = scale.color(*v);
            [r, g, b, 255]
        })
        .collect()
}

/// Draws `values` (row-major `h × w`) as a `side`-wide heatmap with a caption; hovering shows
/// the cell and its value. Returns the hovered cell.
pub fn heatmap(
    ui: &mut egui::Ui,
    textures: &mut Textures,
    name: &str,
    values: &[f32],
    (h, w): (usize, usize),
    scale: Scale,
    side: f32,
) -> Option<(usize, usize)> {
    if values.len() != h * w || h == 0 || w == 0 {
        ui.label(format!("{name}: no data"));
        return None;
    }
    let id = textures.get(ui.ctx(), name, rgba(values, scale), (w, h));
    let size = vec2(side, side * h as f32 / w as f32);
    let (resp, painter) = ui.allocate_painter(size, Sense::hover());
    let rect = resp.rect;
    painter.image(
        id,
        rect,
        Rect::from_min_max(pos2(0.0, 0.0), pos2(1.0, 1.0)),
        Color32::WHITE,
    );
    let mut hovered = None;
    if let Some(p) = resp.hover_pos() {
        let col = (((p.x - rect.min.x) / rect.width()) * w as f32).floor() as usize;
        let row = (((p.y - rect.min.y) / rect.height()) * h as f32).floor() as usize;
        if col < w && row < h {
            hovered = Some((row, col));
            let cell = Rect::from_min_size(
                Pos2::new(
                    rect.min.x + col as f32 * rect.width() / w as f32,
                    rect.min.y + row as f32 * rect.height() / h as f32,
                ),
                vec2(rect.width() / w as f32, rect.height() / h as f32),
            );
            painter.rect_stroke(cell, 0.0, (1.5, Color32::BLACK), egui::StrokeKind::Inside);
            resp.on_hover_text_at_pointer(format!("{name}\n[{row}, {col}] = {:.4}", values[row * w + col]));
        }
    }
    hovered
}

/// A vertical colour bar with its range.
pub fn colorbar(ui: &mut egui::Ui, scale: Scale, height: f32) {
    let (lo, hi) = scale.range();
    let (resp, painter) = ui.allocate_painter(Vec2::new(46.0, height), Sense::hover());
    let bar = Rect::from_min_size(resp.rect.min, vec2(12.0, height));
    let steps = 48;
    for i in 0..steps {
        let t = 1.0 - (i as f32 + 0.5) / steps as f32;
        let [r, g, b] = scale.color(lo + t * (hi - lo));
        let y0 = bar.min.y + i as f32 * height / steps as f32;
        painter.rect_filled(
            Rect::from_min_max(pos2(bar.min.x, y0), pos2(bar.max.x, y0 + height / steps as f32 + 0.5)),
            0.0,
            Color32::from_rgb(r, g, b),
        );
    }
    let text = ui.visuals().text_color();
    let font = egui::FontId::proportional(10.0);
    painter.text(
        pos2(bar.max.x + 3.0, bar.min.y),
        egui::Align2::LEFT_TOP,
        format!("{hi:.2}"),
        font.clone(),
        text,
    );
    painter.text(
        pos2(bar.max.x + 3.0, bar.center().y),
        egui::Align2::LEFT_CENTER,
        format!("{:.2}", 0.5 * (lo + hi)),
        font.clone(),
        text,
    );
    painter.text(
        pos2(bar.max.x + 3.0, bar.max.y),
        egui::Align2::LEFT_BOTTOM,
        format!("{lo:.2}"),
        font,
        text,
    );
}
