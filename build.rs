//! Compiles the tvix castore and build protos (wire-identical to tvix) with tonic, adds
//! proto3 JSON (pbjson) for the CLI, and writes a file descriptor set for gRPC reflection.

use std::path::PathBuf;

const PROTOS: &[&str] = &[
    "protos/tvix/castore/protos/castore.proto",
    "protos/tvix/castore/protos/rpc_blobstore.proto",
    "protos/tvix/castore/protos/rpc_directory.proto",
    "protos/tvix/build/protos/build.proto",
    "protos/tvix/build/protos/rpc_build.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // A vendored protoc, so a fresh machine needs no protobuf-compiler package.
    if std::env::var_os("PROTOC").is_none() {
        std::env::set_var("PROTOC", protoc_bin_vendored::protoc_bin_path()?);
    }
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    let descriptor_path = out_dir.join("tvix_build_vm_descriptor.bin");

    tonic_prost_build::configure()
        .file_descriptor_set_path(&descriptor_path)
        .bytes(".")
        .compile_protos(PROTOS, &["protos"])?;

    let descriptors = std::fs::read(&descriptor_path)?;
    pbjson_build::Builder::new()
        .register_descriptors(&descriptors)?
        .build(&[".tvix.castore.v1", ".tvix.build.v1"])?;

    println!("cargo:rerun-if-changed=protos");
    Ok(())
}
