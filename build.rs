//! Compiles the tvix castore and build protos (wire-identical to tvix) and snix's (the
//! successor's packages, served beside tvix's) with tonic, adds proto3 JSON (pbjson) for
//! the CLI and the provenance statements, and writes a file descriptor set for gRPC reflection. The 2024 tvix layout of
//! the build protos is compiled separately into `$OUT_DIR/tvix2024`.

use std::path::PathBuf;

const PROTOS: &[&str] = &[
    "protos/tvix/castore/protos/castore.proto",
    "protos/tvix/castore/protos/rpc_blobstore.proto",
    "protos/tvix/castore/protos/rpc_directory.proto",
    "protos/tvix/build/protos/build.proto",
    "protos/tvix/build/protos/rpc_build.proto",
    "protos/tvix/build/vm/v1/rpc_build_vm.proto",
    "protos/snix/castore/protos/castore.proto",
    "protos/snix/castore/protos/rpc_blobstore.proto",
    "protos/snix/castore/protos/rpc_directory.proto",
    "protos/snix/build/protos/build.proto",
    "protos/snix/build/protos/rpc_build.proto",
    "protos/tvixbuildvm/store/v1/rpc_pins.proto",
];

/// The 2024 tvix layout: the same package and message names as the seed layout with other
/// types, so it cannot share a compile (or a Rust module) with it.
const PROTOS_2024: &[&str] = &[
    "protos/tvix/build/layout2024/build.proto",
    "protos/tvix/build/layout2024/rpc_build.proto",
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
        .build(&[
            ".tvix.castore.v1",
            ".tvix.build.v1",
            ".tvix.build.vm.v1",
            ".snix.castore.v1",
            ".snix.build.v1",
        ])?;

    // Its castore types are the ones generated above.
    let out_2024 = out_dir.join("tvix2024");
    std::fs::create_dir_all(&out_2024)?;
    tonic_prost_build::configure()
        .out_dir(&out_2024)
        .file_descriptor_set_path(out_2024.join("descriptor.bin"))
        .extern_path(".tvix.castore.v1", "crate::proto::castore")
        .bytes(".")
        .compile_protos(PROTOS_2024, &["protos"])?;
    pbjson_build::Builder::new()
        .register_descriptors(&std::fs::read(out_2024.join("descriptor.bin"))?)?
        .out_dir(&out_2024)
        .extern_path(".tvix.castore.v1", "crate::proto::castore")
        .build(&[".tvix.build.v1"])?;

    println!("cargo:rerun-if-changed=protos");
    Ok(())
}
