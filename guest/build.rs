//! Compiles the agent protocol, which the guest agent and the host both use from this crate.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    if std::env::var_os("PROTOC").is_none() {
        std::env::set_var("PROTOC", protoc_bin_vendored::protoc_bin_path()?);
    }
    prost_build::Config::new().compile_protos(
        &["../protos/tvix/build/vm/agent/v1/agent.proto"],
        &["../protos"],
    )?;
    println!("cargo:rerun-if-changed=../protos/tvix/build/vm/agent");
    Ok(())
}
