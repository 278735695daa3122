//! Tables whose cells are coloured by their value (a confusion matrix, classes × priors) and
//! horizontal bars centred on zero; the numbers stay text, so they can be read and selected.

use egui::{Color32, RichText, Sense, pos2, vec2};

/// A table cell: its text, fill and hover text.
pub type Cell = (String, Color32, String);
/// A table row: its name and cells.
pub type Row = (String, Vec<Cell>);

/// Text colour readable on `fill`.
#[must_use]
pub fn contrast(fill: Color32) -> Color32 {
    let l = 0.299 * f32::from(fill.r()) + 0.587 * f32::from(fill.g()) + 0.114 * f32::from(fill.b());
    if l > 140.0 { Color32::BLACK } else { Color32::WHITE }
}

/// An RGB triple as a colour.
#[must_use]
pub fn rgb(c: [u8; 3]) -> Color32 {
    Color32::from_rgb(c[0], c[1], c[2])
}

/// One cell: `text` on `fill`, `width` wide; `hover` shown on hovering.
pub fn cell(ui: &mut egui::Ui, text: &str, fill: Color32, width: f32, hover: &str) -> egui::Response {
    egui::Frame::new()
        .fill(fill)
        .inner_margin(egui::Margin::symmetric(2, 1))
        .show(ui, |ui| {
            ui.set_width(width);
            ui.vertical_centered(|ui| {
                ui.label(RichText::new(text).color(contrast(fill)).monospace().size(11.0));
            });
        })
        .response
        .on_hover_text(hover)
}

/// A table of coloured cells: `cols` names across, one row per `(name, cells)`, each cell its
/// text, fill and hover text.
pub fn table(ui: &mut egui::Ui, id: &str, corner: &str, cols: &[String], rows: &[Row], width: f32) {
    egui::Grid::new(id)
        .spacing(vec2(2.0, 2.0))
        .min_col_width(width)
        .show(ui, |ui| {
            ui.label(RichText::new(corner).small());
            for c in cols {
                // Centred over the cells beneath.
                egui::Frame::new()
                    .inner_margin(egui::Margin::symmetric(2, 1))
                    .show(ui, |ui| {
                        ui.set_width(width);
                        ui.vertical_centered(|ui| ui.label(RichText::new(c).small().strong()));
                    });
            }
            ui.end_row();
            for (name, cells) in rows {
                ui.label(RichText::new(name).small());
                for (text, fill, hover) in cells {
                    cell(ui, text, *fill, width, hover);
                }
                ui.end_row();
            }
        });
}

/// A horizontal bar for `v` on an axis from `-limit` to `limit` (or `0..limit` when `signed` is
/// false), `width` wide, zero marked.
pub fn bar(ui: &mut egui::Ui, v: f64, limit: f64, signed: bool, width: f32, color: Color32) -> egui::Response {
    let (rect, resp) = ui.allocate_exact_size(vec2(width, 12.0), Sense::hover());
    let painter = ui.painter_at(rect);
    let zero = if signed { rect.center().x } else { rect.min.x };
    let half = if signed { rect.width() / 2.0 } else { rect.width() };
    painter.rect_filled(rect, 1.0, ui.visuals().faint_bg_color);
    if v.is_finite() && limit > 0.0 {
        let len = ((v / limit).clamp(-1.0, 1.0) as f32) * half;
        let (x0, x1) = if len < 0.0 {
            (zero + len, zero)
        } else {
            (zero, zero + len)
        };
        painter.rect_filled(
            egui::Rect::from_min_max(pos2(x0, rect.min.y + 2.0), pos2(x1, rect.max.y - 2.0)),
            0.0,
            color,
        );
    }
    painter.line_segment(
        [pos2(zero, rect.min.y), pos2(zero, rect.max.y)],
        (1.0, ui.visuals().text_color()),
    );
    resp
}

/// Pearson correlation of two equally long series (NaN when either is constant or they are
/// shorter than 2).
#[must_use]
pub fn pearson(x: &[f64], y: &[f64]) -> f64 {
    let n = x.len().min(y.len());
    if n < 2 {
        return f64::NAN;
    }
    let nf = n as f64;
    let (mx, my) = (x[..n].iter().sum::<f64>() / nf, y[..n].iter().sum::<f64>() / nf);
    let (mut sxy, mut sxx, mut syy) = (0.0, 0.0, 0.0);
    for (a, b) in x.iter().zip(y) {
        sxy += (a - mx) * (b - my);
        sxx += (a - mx) * (a - mx);
        syy += (b - my) * (b - my);
    }
    if sxx <= 1e-12 * nf || syy <= 1e-12 * nf {
        f64::NAN
    } else {
        sxy / (sxx * syy).sqrt()
    }
}

/// A correlation as text (`-` where undefined).
#[must_use]
pub fn corr_text(r: f64) -> String {
    if r.is_finite() {
        format!("{r:+.2}")
    } else {
        "-".to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pearson_of_a_line_is_one_and_of_a_constant_undefined() {
        let x = [0.0, 0.25, 0.5, 1.0];
        let y: Vec<f64> = x.iter().map(|v| 2.0 * v + 1.0).collect();
        assert!((pearson(&x, &y) - 1.0).abs() < 1e-12);
        let neg: Vec<f64> = x.iter().map(|v| -v).collect();
        assert!((pearson(&x, &neg) + 1.0).abs() < 1e-12);
        assert!(pearson(&x, &[0.3; 4]).is_nan());
        assert_eq!(corr_text(f64::NAN), "-");
    }
}
