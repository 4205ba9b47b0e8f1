//! `tvix-build-vm keygen --out FILE`: the host's Ed25519 signing key pair for provenance.

use crate::provenance::keys;
use std::path::PathBuf;

/// Generate an Ed25519 key pair for signing provenance.
#[derive(Debug, clap::Args)]
pub struct KeygenArgs {
    /// The private key (PKCS#8 PEM, mode 0600); the public key (SubjectPublicKeyInfo PEM)
    /// goes to FILE.pub. Neither may exist.
    #[arg(long, value_name = "FILE")]
    pub out: PathBuf,
}

pub fn run(args: KeygenArgs) -> anyhow::Result<()> {
    let public = keys::keygen(&args.out)?;
    println!(
        "wrote {} and {} (key id {})",
        args.out.display(),
        keys::public_path(&args.out).display(),
        keys::key_id(&public)
    );
    Ok(())
}
