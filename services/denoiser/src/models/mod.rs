//! Diffusion transformer architectures, one file each, in candle's model-file style. They
//! depend only on candle and serde; serving code reaches them through `adapters/`.

pub mod flux;
pub mod layers;
pub mod qwen_image;
pub mod tiny_text;
