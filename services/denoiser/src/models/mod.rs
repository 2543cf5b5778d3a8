//! Diffusion transformer architectures and the pipeline components around them (text
//! encoders, tokenizers, VAE decoder), one file each, in candle's model-file style. They
//! depend only on candle and serde; serving code reaches them through `adapters/`.

pub mod autoencoder_kl;
pub mod clip_text;
pub mod flux;
pub mod layers;
pub mod qwen2_5_vl_text;
pub mod qwen_image;
pub mod qwen_vae;
pub mod t5_encoder;
pub mod text_tokenizers;
pub mod tiny_text;
