//! `tvix-build-vm initrd`: write the initramfs the VMs boot (the agent as /init), e.g. for
//! packaging (default.nix) or for booting it by hand while debugging.

use crate::vm::initrd::Initrd;
use anyhow::Context;
use clap::Args;
use std::io::Write;
use std::path::PathBuf;

#[derive(Debug, Args)]
pub struct InitrdArgs {
    /// The static guest agent.
    #[arg(long, env = "TVIX_BUILD_VM_AGENT", value_name = "PATH")]
    pub agent: PathBuf,
    /// Where to write the cpio archive (newc, uncompressed, deterministic).
    #[arg(long, value_name = "PATH")]
    pub out: PathBuf,
}

pub fn run(args: InitrdArgs) -> anyhow::Result<()> {
    let initrd = Initrd::with_agent(&args.agent)
        .with_context(|| format!("reading the agent {}", args.agent.display()))?;
    let dir = args
        .out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(std::path::Path::new("."));
    let mut tmp = tempfile::NamedTempFile::new_in(dir)
        .with_context(|| format!("creating a temporary file in {}", dir.display()))?;
    tmp.write_all(&initrd.to_bytes())
        .and_then(|()| tmp.as_file().sync_all())
        .with_context(|| format!("writing {}", args.out.display()))?;
    tmp.persist(&args.out)
        .with_context(|| format!("moving the initrd to {}", args.out.display()))?;
    Ok(())
}
