//! Writing output files and saying what was written: every command prints one
//! `wrote <path> <what>` line per file, with `, replacing the earlier file` when the path
//! existed before, so an earlier result is never overwritten silently.

use std::path::{Path, PathBuf};

use anyhow::Context as _;

/// An output path, remembering whether a file was there before this command wrote it.
#[derive(Debug, Clone)]
pub struct Output {
    path: PathBuf,
    existed: bool,
}

impl Output {
    /// Looks at `path` now (before anything is written to it).
    pub fn new(path: impl Into<PathBuf>) -> Self {
        let path = path.into();
        let existed = path.exists();
        Self { path, existed }
    }

    /// The path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes `bytes` to the path.
    pub fn write(&self, bytes: &[u8]) -> anyhow::Result<()> {
        std::fs::write(&self.path, bytes)
            .with_context(|| format!("writing {}", self.path.display()))
    }

    /// `wrote <path> <detail>` (`detail` may be empty), noting a replaced file.
    pub fn wrote(&self, detail: &str) -> String {
        let mut line = format!("wrote {}", self.path.display());
        if !detail.is_empty() {
            line.push(' ');
            line.push_str(detail);
        }
        if self.existed {
            line.push_str(", replacing the earlier file");
        }
        line
    }
}

/// Width and height from a PNG's header (its IHDR chunk), if `png` is one.
pub fn png_size(png: &[u8]) -> Option<(u32, u32)> {
    const SIGNATURE: &[u8] = b"\x89PNG\r\n\x1a\n";
    if png.len() < 24 || &png[..8] != SIGNATURE || &png[12..16] != b"IHDR" {
        return None;
    }
    let be = |b: &[u8]| u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
    Some((be(&png[16..20]), be(&png[20..24])))
}

/// `(WxH)` for a PNG, `(not a PNG)` otherwise.
pub fn png_detail(png: &[u8]) -> String {
    match png_size(png) {
        Some((w, h)) => format!("({w}x{h})"),
        None => "(not a PNG)".to_string(),
    }
}

/// [`png_detail`] of the PNG file at `path`.
pub fn png_file_detail(path: &Path) -> String {
    let mut head = [0u8; 24];
    let read = std::fs::File::open(path).and_then(|mut f| {
        use std::io::Read as _;
        f.read_exact(&mut head)
    });
    match read {
        Ok(()) => png_detail(&head),
        Err(_) => "(unreadable)".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn png(w: u32, h: u32) -> Vec<u8> {
        let mut buf = Vec::new();
        image::RgbImage::new(w, h)
            .write_to(&mut std::io::Cursor::new(&mut buf), image::ImageFormat::Png)
            .unwrap_or_default();
        buf
    }

    #[test]
    fn png_sizes_come_from_the_header() {
        assert_eq!(png_size(&png(32, 24)), Some((32, 24)));
        assert_eq!(png_detail(&png(5, 7)), "(5x7)");
        assert_eq!(png_size(b"not a png at all, not at all"), None);
        assert_eq!(png_size(&[]), None);
    }

    #[test]
    fn replaced_files_are_named() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let fresh = Output::new(dir.path().join("a.png"));
        fresh.write(&png(2, 3))?;
        assert_eq!(
            fresh.wrote(&png_file_detail(fresh.path())),
            format!("wrote {} (2x3)", dir.path().join("a.png").display())
        );
        let again = Output::new(dir.path().join("a.png"));
        again.write(&png(2, 3))?;
        assert!(
            again
                .wrote("(2x3)")
                .ends_with("(2x3), replacing the earlier file")
        );
        Ok(())
    }
}
