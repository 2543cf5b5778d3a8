//! Procedural training scenes: one coloured shape on a plain background, with a caption in
//! the grammar the embedded model understands:
//! `a <colour> <shape> [on the left | on the right | at the top | at the bottom | in the center]
//! on a <colour> background`.

/// Colour names and their RGB values.
pub const COLOURS: [(&str, [u8; 3]); 8] = [
    ("red", [220, 30, 30]),
    ("green", [30, 180, 40]),
    ("blue", [30, 60, 220]),
    ("yellow", [240, 220, 30]),
    ("white", [245, 245, 245]),
    ("black", [15, 15, 15]),
    ("purple", [140, 40, 170]),
    ("orange", [245, 140, 20]),
];

/// Shape names.
pub const SHAPES: [&str; 3] = ["circle", "square", "triangle"];

/// Positions: caption phrase, name, and centre as a fraction of the image side.
pub const POSITIONS: [(&str, &str, [f32; 2]); 5] = [
    ("on the left", "left", [0.28, 0.5]),
    ("on the right", "right", [0.72, 0.5]),
    ("at the top", "top", [0.5, 0.28]),
    ("at the bottom", "bottom", [0.5, 0.72]),
    ("in the center", "center", [0.5, 0.5]),
];

/// SplitMix64: a small deterministic generator, so a seed reproduces the whole run.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator from a seed.
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    /// Next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)`.
    pub fn uniform(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }

    /// Uniform index below `n`.
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    /// Standard normal (Box-Muller).
    pub fn normal(&mut self) -> f32 {
        let u1 = self.uniform().max(1e-7);
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f32::consts::PI * u2).cos()
    }
}

/// One scene: its caption and its pixels `[3, size, size]` in `[-1, 1]`, channel-major.
#[derive(Debug, Clone)]
pub struct Scene {
    /// The caption.
    pub caption: String,
    /// Pixels, channel-major.
    pub pixels: Vec<f32>,
}

/// Whether pixel `(x, y)` (pixel centres, in pixels) lies in the shape centred at `(cx, cy)`
/// with half-size `r`.
fn inside(shape: &str, x: f32, y: f32, cx: f32, cy: f32, r: f32) -> bool {
    let (dx, dy) = (x - cx, y - cy);
    match shape {
        "circle" => dx * dx + dy * dy <= r * r,
        "square" => dx.abs() <= r * 0.85 && dy.abs() <= r * 0.85,
        // Upward triangle: apex at the top, base at the bottom.
        _ => dy >= -r && dy <= r * 0.8 && dx.abs() <= (dy + r) * 0.6,
    }
}

/// Renders a scene.
pub fn render(
    shape: &str,
    colour: [u8; 3],
    background: [u8; 3],
    centre: [f32; 2],
    r: f32,
    size: usize,
) -> Vec<f32> {
    let mut px = vec![0f32; 3 * size * size];
    let (cx, cy) = (centre[0] * size as f32, centre[1] * size as f32);
    for y in 0..size {
        for x in 0..size {
            let c = if inside(shape, x as f32 + 0.5, y as f32 + 0.5, cx, cy, r) {
                colour
            } else {
                background
            };
            for ch in 0..3 {
                px[ch * size * size + y * size + x] = f32::from(c[ch]) / 127.5 - 1.0;
            }
        }
    }
    px
}

/// A random scene; about one caption in five leaves the position out (it is then centred).
pub fn random_scene(rng: &mut Rng, size: usize) -> Scene {
    let (fg_name, fg) = COLOURS[rng.below(COLOURS.len())];
    let (bg_name, bg) = loop {
        let c = COLOURS[rng.below(COLOURS.len())];
        if c.0 != fg_name {
            break c;
        }
    };
    let shape = SHAPES[rng.below(SHAPES.len())];
    let omit_position = rng.below(5) == 0;
    let (phrase, _, centre) = if omit_position {
        POSITIONS[4]
    } else {
        POSITIONS[rng.below(POSITIONS.len())]
    };
    let jitter = |rng: &mut Rng| (rng.uniform() - 0.5) * 0.06;
    let centre = [centre[0] + jitter(rng), centre[1] + jitter(rng)];
    let r = size as f32 * (0.17 + rng.uniform() * 0.05);
    let caption = if omit_position {
        format!("a {fg_name} {shape} on a {bg_name} background")
    } else {
        format!("a {fg_name} {shape} {phrase} on a {bg_name} background")
    };
    Scene {
        caption,
        pixels: render(shape, fg, bg, centre, r, size),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn scenes_are_deterministic_and_follow_the_caption() {
        let a = random_scene(&mut Rng::new(7), 32);
        let b = random_scene(&mut Rng::new(7), 32);
        assert_eq!(a.caption, b.caption);
        assert_eq!(a.pixels, b.pixels);
        let px = render("circle", [220, 30, 30], [30, 60, 220], [0.28, 0.5], 6.0, 32);
        let at = |x: usize, y: usize, ch: usize| px[ch * 1024 + y * 32 + x];
        assert!(
            at(9, 16, 0) > 0.5 && at(9, 16, 2) < -0.5,
            "red at the left centre"
        );
        assert!(at(24, 16, 2) > 0.5, "blue background on the right");
        for _ in 0..100 {
            let s = random_scene(&mut Rng::new(1), 32);
            assert!(
                teaserve_denoiser::models::tiny_text::tokenize(&s.caption).is_ok(),
                "{}",
                s.caption
            );
        }
    }
}
