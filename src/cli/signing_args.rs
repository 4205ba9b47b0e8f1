//! `--signing-key` and `--builder-id`: the host's provenance key, shared by `build` and
//! `serve`.

use crate::assembly::Assembled;
use crate::provenance::attest::Attestor;
use crate::provenance::keys::load_signing_key;
use anyhow::Context;
use clap::Args;
use ed25519_dalek::SigningKey;
use std::path::PathBuf;

#[derive(Debug, Clone, Args)]
pub struct SigningArgs {
    /// Sign every successful build's provenance (an in-toto/SLSA statement in a DSSE
    /// envelope, stored in the castore) with this Ed25519 key, a PKCS#8 PEM file as
    /// `keygen` writes it. The key stays in this process.
    #[arg(long, env = "TVIX_BUILD_VM_SIGNING_KEY", value_name = "FILE")]
    pub signing_key: Option<PathBuf>,
    /// The builder id written into signed provenance: a URI naming this host
    /// [default: tvix-build-vm://<hostname>].
    #[arg(long, value_name = "URI", requires = "signing_key")]
    pub builder_id: Option<String>,
}

/// A key loaded and a builder id chosen, before anything is started.
pub struct Signing {
    key: SigningKey,
    builder_id: String,
}

impl SigningArgs {
    /// The key, if signing was asked for; a key that cannot be used is an error now, not at
    /// the first build.
    pub fn load(&self) -> anyhow::Result<Option<Signing>> {
        let Some(path) = &self.signing_key else {
            return Ok(None);
        };
        let key =
            load_signing_key(path).with_context(|| format!("--signing-key {}", path.display()))?;
        let builder_id = match &self.builder_id {
            Some(id) => {
                anyhow::ensure!(
                    id.contains(':') && !id.chars().any(char::is_whitespace),
                    "--builder-id {id:?}: not a URI (e.g. https://builds.example.org/host-1)"
                );
                id.clone()
            }
            None => {
                let host = nix::unistd::gethostname().context("reading the hostname")?;
                format!("tvix-build-vm://{}", host.to_string_lossy())
            }
        };
        Ok(Some(Signing { key, builder_id }))
    }
}

impl Signing {
    /// The attestor of builds run by `assembled`.
    pub fn attestor(self, assembled: &Assembled) -> anyhow::Result<Attestor> {
        let facts = assembled
            .host_facts()
            .context("reading the VM's kernel, initrd and agent for provenance")?;
        Ok(Attestor::new(self.key, self.builder_id, facts))
    }
}
