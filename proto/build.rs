//! Compiles proto/teaserve/v1/*.proto without a system protoc (protox), writes the file
//! descriptor set for server reflection, and generates prost messages + tonic services.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?);
    let files = ["tensor.proto", "denoiser.proto", "controller.proto"]
        .map(|f| root.join("teaserve").join("v1").join(f));
    for f in &files {
        println!("cargo:rerun-if-changed={}", f.display());
    }

    let fds = protox::compile(&files, [&root])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    let fds_path = out.join("teaserve_descriptor.bin");
    std::fs::write(&fds_path, prost::Message::encode_to_vec(&fds))?;

    tonic_prost_build::configure()
        .file_descriptor_set_path(&fds_path)
        .skip_protoc_run()
        // Tensor payloads decode into `bytes::Bytes`: no copy out of the receive buffer.
        .bytes(".")
        .compile_protos(&files, &[root])?;
    Ok(())
}
