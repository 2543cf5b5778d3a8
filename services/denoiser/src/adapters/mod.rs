//! Model adapters: named wire tensors <-> each architecture's typed candle model.

pub mod flux;
pub mod flux_pipeline;
pub mod pipeline;
pub mod qwen_image;
pub mod qwen_image_pipeline;
pub mod tiny_flux;

/// One RGB image (`height x width`, row-major HWC bytes) as PNG.
pub(crate) fn png(
    rgb: Vec<u8>,
    height: usize,
    width: usize,
) -> Result<Vec<u8>, crate::error::DenoiserError> {
    let invalid =
        |m: String| crate::error::DenoiserError::from(crate::spec::InputError::Invalid(m));
    let img = image::RgbImage::from_raw(width as u32, height as u32, rgb)
        .ok_or_else(|| invalid("decoded pixel buffer has the wrong size".into()))?;
    let mut out = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut out), image::ImageFormat::Png)
        .map_err(|e| invalid(format!("PNG encoding failed: {e}")))?;
    Ok(out)
}
