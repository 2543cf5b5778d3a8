//! Model adapters: named wire tensors <-> each architecture's typed candle model.

pub mod flux;
pub mod qwen_image;
pub mod tiny_flux;
