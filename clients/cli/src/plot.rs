//! A small line chart written as a PNG with the `image` crate and a built-in 5x7 bitmap
//! font: enough for the bench's speedup / PSNR against threshold plot, with no plotting or
//! font dependencies.

use std::path::Path;

use image::{Rgb, RgbImage};

/// One line of the chart, on the left or the right axis.
pub struct Series {
    label: &'static str,
    colour: [u8; 3],
    points: Vec<(f64, f64)>,
    right: bool,
    markers_only: bool,
}

impl Series {
    /// A series on the left axis.
    pub fn left(label: &'static str, colour: [u8; 3], points: Vec<(f64, f64)>) -> Self {
        Self {
            label,
            colour,
            points,
            right: false,
            markers_only: false,
        }
    }

    /// Points without lines, on the left axis.
    pub fn scatter(label: &'static str, colour: [u8; 3], points: Vec<(f64, f64)>) -> Self {
        Self {
            label,
            colour,
            points,
            right: false,
            markers_only: true,
        }
    }

    /// A series on the right axis.
    pub fn right(label: &'static str, colour: [u8; 3], points: Vec<(f64, f64)>) -> Self {
        Self {
            label,
            colour,
            points,
            right: true,
            markers_only: false,
        }
    }
}

/// 5x7 glyphs, one byte per row (low 5 bits, MSB left).
fn glyph(c: char) -> [u8; 7] {
    match c {
        '0' => [0x0E, 0x11, 0x13, 0x15, 0x19, 0x11, 0x0E],
        '1' => [0x04, 0x0C, 0x04, 0x04, 0x04, 0x04, 0x0E],
        '2' => [0x0E, 0x11, 0x01, 0x02, 0x04, 0x08, 0x1F],
        '3' => [0x1F, 0x02, 0x04, 0x02, 0x01, 0x11, 0x0E],
        '4' => [0x02, 0x06, 0x0A, 0x12, 0x1F, 0x02, 0x02],
        '5' => [0x1F, 0x10, 0x1E, 0x01, 0x01, 0x11, 0x0E],
        '6' => [0x06, 0x08, 0x10, 0x1E, 0x11, 0x11, 0x0E],
        '7' => [0x1F, 0x01, 0x02, 0x04, 0x08, 0x08, 0x08],
        '8' => [0x0E, 0x11, 0x11, 0x0E, 0x11, 0x11, 0x0E],
        '9' => [0x0E, 0x11, 0x11, 0x0F, 0x01, 0x02, 0x0C],
        '.' => [0, 0, 0, 0, 0, 0x0C, 0x0C],
        '-' => [0, 0, 0, 0x1F, 0, 0, 0],
        '(' => [0x02, 0x04, 0x08, 0x08, 0x08, 0x04, 0x02],
        ')' => [0x08, 0x04, 0x02, 0x02, 0x02, 0x04, 0x08],
        'x' => [0, 0, 0x11, 0x0A, 0x04, 0x0A, 0x11],
        'a' => [0, 0, 0x0E, 0x01, 0x0F, 0x11, 0x0F],
        'b' => [0x10, 0x10, 0x16, 0x19, 0x11, 0x11, 0x1E],
        'c' => [0, 0, 0x0E, 0x10, 0x10, 0x11, 0x0E],
        'd' => [0x01, 0x01, 0x0D, 0x13, 0x11, 0x11, 0x0F],
        'e' => [0, 0, 0x0E, 0x11, 0x1F, 0x10, 0x0E],
        'f' => [0x06, 0x09, 0x08, 0x1C, 0x08, 0x08, 0x08],
        'g' => [0, 0x0F, 0x11, 0x11, 0x0F, 0x01, 0x0E],
        'h' => [0x10, 0x10, 0x16, 0x19, 0x11, 0x11, 0x11],
        'i' => [0x04, 0, 0x0C, 0x04, 0x04, 0x04, 0x0E],
        'l' => [0x0C, 0x04, 0x04, 0x04, 0x04, 0x04, 0x0E],
        'm' => [0, 0, 0x1A, 0x15, 0x15, 0x11, 0x11],
        'n' => [0, 0, 0x16, 0x19, 0x11, 0x11, 0x11],
        'o' => [0, 0, 0x0E, 0x11, 0x11, 0x11, 0x0E],
        'p' => [0, 0, 0x1E, 0x11, 0x1E, 0x10, 0x10],
        'r' => [0, 0, 0x16, 0x19, 0x10, 0x10, 0x10],
        's' => [0, 0, 0x0E, 0x10, 0x0E, 0x01, 0x1E],
        't' => [0x08, 0x08, 0x1C, 0x08, 0x08, 0x09, 0x06],
        'u' => [0, 0, 0x11, 0x11, 0x11, 0x13, 0x0D],
        'v' => [0, 0, 0x11, 0x11, 0x11, 0x0A, 0x04],
        'w' => [0, 0, 0x11, 0x11, 0x15, 0x15, 0x0A],
        'y' => [0, 0, 0x11, 0x11, 0x0F, 0x01, 0x0E],
        'k' => [0x10, 0x10, 0x12, 0x14, 0x18, 0x14, 0x12],
        '^' => [0x04, 0x0A, 0x11, 0, 0, 0, 0],
        ':' => [0, 0x0C, 0x0C, 0, 0x0C, 0x0C, 0],
        'B' => [0x1E, 0x11, 0x11, 0x1E, 0x11, 0x11, 0x1E],
        'F' => [0x1F, 0x10, 0x10, 0x1E, 0x10, 0x10, 0x10],
        'I' => [0x0E, 0x04, 0x04, 0x04, 0x04, 0x04, 0x0E],
        'L' => [0x10, 0x10, 0x10, 0x10, 0x10, 0x10, 0x1F],
        'C' => [0x0E, 0x11, 0x10, 0x10, 0x10, 0x11, 0x0E],
        'M' => [0x11, 0x1B, 0x15, 0x15, 0x11, 0x11, 0x11],
        'N' => [0x11, 0x11, 0x19, 0x15, 0x13, 0x11, 0x11],
        'P' => [0x1E, 0x11, 0x11, 0x1E, 0x10, 0x10, 0x10],
        'R' => [0x1E, 0x11, 0x11, 0x1E, 0x14, 0x12, 0x11],
        'S' => [0x0F, 0x10, 0x10, 0x0E, 0x01, 0x01, 0x1E],
        'T' => [0x1F, 0x04, 0x04, 0x04, 0x04, 0x04, 0x04],
        ' ' => [0; 7],
        _ => [0x1F, 0x11, 0x11, 0x11, 0x11, 0x11, 0x1F],
    }
}

const SCALE: i64 = 2;
const BLACK: [u8; 3] = [30, 30, 30];

fn put(img: &mut RgbImage, x: i64, y: i64, c: [u8; 3]) {
    if x >= 0 && y >= 0 && (x as u32) < img.width() && (y as u32) < img.height() {
        img.put_pixel(x as u32, y as u32, Rgb(c));
    }
}

/// Width of `s` in pixels.
fn text_width(s: &str) -> i64 {
    s.chars().count() as i64 * 6 * SCALE
}

fn text(img: &mut RgbImage, x: i64, y: i64, s: &str, c: [u8; 3]) {
    for (i, ch) in s.chars().enumerate() {
        let g = glyph(ch);
        for (row, bits) in g.iter().enumerate() {
            for col in 0..5 {
                if bits & (0x10 >> col) != 0 {
                    for dy in 0..SCALE {
                        for dx in 0..SCALE {
                            put(
                                img,
                                x + (i as i64 * 6 + col) * SCALE + dx,
                                y + row as i64 * SCALE + dy,
                                c,
                            );
                        }
                    }
                }
            }
        }
    }
}

fn line(img: &mut RgbImage, (x0, y0): (i64, i64), (x1, y1): (i64, i64), c: [u8; 3], width: i64) {
    let n = (x1 - x0).abs().max((y1 - y0).abs()).max(1);
    for i in 0..=n {
        let x = x0 + (x1 - x0) * i / n;
        let y = y0 + (y1 - y0) * i / n;
        for d in 0..width {
            put(img, x, y + d, c);
            put(img, x + d, y, c);
        }
    }
}

fn range(values: impl Iterator<Item = f64>, floor_zero: bool, min_pad: f64) -> (f64, f64) {
    let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
    for v in values.filter(|v| v.is_finite()) {
        lo = lo.min(v);
        hi = hi.max(v);
    }
    if !lo.is_finite() {
        return (0.0, 1.0);
    }
    if floor_zero {
        lo = 0.0;
    }
    let pad = ((hi - lo) * 0.1).max(min_pad);
    let lo = if floor_zero { lo } else { lo - pad };
    (if floor_zero { lo } else { lo.max(0.0) }, hi + pad)
}

/// Draws `series` against a shared x axis and writes the PNG.
pub fn line_chart(
    path: &Path,
    title: &str,
    x_label: &str,
    series: &[Series],
) -> anyhow::Result<()> {
    let (w, h) = (760i64, 460i64);
    let (left, right, top, bottom) = (70i64, 70i64, 50i64, 60i64);
    let mut img = RgbImage::from_pixel(w as u32, h as u32, Rgb([255, 255, 255]));
    let xs = range(
        series.iter().flat_map(|s| s.points.iter().map(|p| p.0)),
        false,
        0.01,
    );
    let yl = range(
        series
            .iter()
            .filter(|s| !s.right)
            .flat_map(|s| s.points.iter().map(|p| p.1)),
        true,
        0.5,
    );
    let yr = range(
        series
            .iter()
            .filter(|s| s.right)
            .flat_map(|s| s.points.iter().map(|p| p.1)),
        false,
        0.5,
    );
    let px = |x: f64| left + ((x - xs.0) / (xs.1 - xs.0) * (w - left - right) as f64) as i64;
    let py = |y: f64, (lo, hi): (f64, f64)| {
        h - bottom - ((y - lo) / (hi - lo) * (h - top - bottom) as f64) as i64
    };
    // Frame, ticks and labels.
    line(&mut img, (left, top), (left, h - bottom), BLACK, 1);
    line(
        &mut img,
        (w - right, top),
        (w - right, h - bottom),
        BLACK,
        1,
    );
    line(
        &mut img,
        (left, h - bottom),
        (w - right, h - bottom),
        BLACK,
        1,
    );
    let mut xticks: Vec<f64> = series
        .first()
        .map(|s| s.points.iter().map(|p| p.0).collect())
        .unwrap_or_default();
    xticks.dedup();
    // Scatter points fall anywhere: evenly spaced ticks then.
    if xticks.len() > 8 || series.first().is_some_and(|s| s.markers_only) {
        xticks = (0..=4)
            .map(|i| {
                let x = xs.0 + (xs.1 - xs.0) * f64::from(i) / 4.0;
                (x * 1000.0).round() / 1000.0
            })
            .collect();
    }
    for x in xticks {
        let label = format!("{x}");
        line(
            &mut img,
            (px(x), h - bottom),
            (px(x), h - bottom + 5),
            BLACK,
            1,
        );
        text(
            &mut img,
            px(x) - text_width(&label) / 2,
            h - bottom + 10,
            &label,
            BLACK,
        );
    }
    for i in 0..=4 {
        let f = f64::from(i) / 4.0;
        let (vl, vr) = (yl.0 + f * (yl.1 - yl.0), yr.0 + f * (yr.1 - yr.0));
        let y = py(vl, yl);
        line(&mut img, (left - 5, y), (left, y), BLACK, 1);
        line(
            &mut img,
            (left + 1, y),
            (w - right - 1, y),
            [225, 225, 225],
            1,
        );
        let l = if yl.1 - yl.0 < 2.0 {
            format!("{vl:.2}")
        } else {
            format!("{vl:.1}")
        };
        text(&mut img, left - 8 - text_width(&l), y - 7, &l, BLACK);
        if series.iter().any(|s| s.right) {
            let r = format!("{vr:.0}");
            line(&mut img, (w - right, y), (w - right + 5, y), BLACK, 1);
            text(&mut img, w - right + 8, y - 7, &r, BLACK);
        }
    }
    text(
        &mut img,
        (w - text_width(x_label)) / 2,
        h - 24,
        x_label,
        BLACK,
    );
    text(&mut img, (w - text_width(title)) / 2, 12, title, BLACK);
    // Series and legend.
    for (k, s) in series.iter().enumerate() {
        let axis = if s.right { yr } else { yl };
        let pts: Vec<(i64, i64)> = s
            .points
            .iter()
            .map(|&(x, y)| (px(x), py(y, axis)))
            .collect();
        let size = match (s.markers_only, pts.len() > 12) {
            // Many samples: small dots; a few measured points: visible markers.
            (true, true) => 1,
            (true, false) => 3,
            (false, true) => 0,
            (false, false) => 3,
        };
        if !s.markers_only {
            for pair in pts.windows(2) {
                line(&mut img, pair[0], pair[1], s.colour, 2);
            }
        }
        for &(x, y) in &pts {
            for dy in -size..=size {
                for dx in -size..=size {
                    put(&mut img, x + dx, y + dy, s.colour);
                }
            }
        }
        let ly = top + 10 + k as i64 * 22;
        line(
            &mut img,
            (left + 12, ly + 6),
            (left + 40, ly + 6),
            s.colour,
            3,
        );
        let label = format!("{}{}", s.label, if s.right { " - right" } else { "" });
        text(&mut img, left + 48, ly, &label, BLACK);
    }
    img.save(path)?;
    Ok(())
}
