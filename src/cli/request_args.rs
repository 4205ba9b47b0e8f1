//! Assembling a seed-layout BuildRequest from a proto3 JSON file and convenience flags.

use crate::castore::directory::proto_node_name;
use crate::proto::{build as pb, castore as castore_pb};
use crate::units::parse_size;
use bytes::Bytes;
use clap::Args;
use std::path::PathBuf;

/// Nix's sandbox defaults, which tvix fills in from a derivation; used when the request is
/// assembled from flags alone, each overridable with `--env`.
const NIX_DEFAULT_ENV: &[(&str, &str)] = &[
    ("HOME", "/homeless-shelter"),
    ("NIX_BUILD_CORES", "0"),
    ("NIX_BUILD_TOP", "/build"),
    ("NIX_LOG_FD", "2"),
    ("NIX_STORE", "/nix/store"),
    ("PATH", "/path-not-set"),
    ("PWD", "/build"),
    ("TEMP", "/build"),
    ("TEMPDIR", "/build"),
    ("TERM", "xterm-256color"),
    ("TMP", "/build"),
    ("TMPDIR", "/build"),
];

#[derive(Debug, Args)]
pub struct RequestArgs {
    /// A BuildRequest in proto3 JSON (the seed layout); `-` reads standard input. The flags
    /// below add to it.
    #[arg(long, value_name = "FILE")]
    pub request: Option<PathBuf>,
    /// Import a host path into the store and add it as an input, named by its basename
    /// (visible in the guest as /nix/store/<basename>).
    #[arg(long = "input", value_name = "PATH")]
    pub inputs: Vec<PathBuf>,
    /// Set an environment variable (overrides the request's and Nix's defaults).
    #[arg(long = "env", value_name = "KEY=VALUE", value_parser = parse_env)]
    pub env: Vec<(String, String)>,
    /// An output basename in /nix/store the build must produce.
    #[arg(long = "output", value_name = "NAME")]
    pub outputs: Vec<String>,
    /// constraints.system (default: x86_64-linux when no request file is given).
    #[arg(long)]
    pub system: Option<String>,
    /// constraints.min_memory, e.g. 512M or 2G.
    #[arg(long, value_parser = parse_size)]
    pub memory: Option<u64>,
    /// Add a host path to constraints.available_ro_paths (repeatable): the build gets it
    /// read-only at the same path if the host allows it (`--allow-ro-path`), and is refused
    /// otherwise.
    #[arg(long = "ro-path", value_name = "PATH")]
    pub ro_paths: Vec<String>,
    /// The command and its arguments (replaces the request's).
    #[arg(last = true, value_name = "ARGV")]
    pub argv: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum RequestArgsError {
    #[error("reading {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: not a BuildRequest in proto3 JSON: at {field}", path.display())]
    Json {
        path: PathBuf,
        /// Where in the document, e.g. `constraints.minMemory` (`.` for the whole).
        field: String,
        #[source]
        source: serde_json::Error,
    },
}

fn parse_env(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("{s:?} is not KEY=VALUE"))
}

impl RequestArgs {
    /// The request file, or Nix's default environment when there is none. Read before
    /// anything is imported, so a bad file costs nothing.
    pub fn load(&self) -> Result<pb::BuildRequest, RequestArgsError> {
        let Some(path) = &self.request else {
            return Ok(pb::BuildRequest {
                environment_vars: NIX_DEFAULT_ENV.iter().map(|(k, v)| env_var(k, v)).collect(),
                ..Default::default()
            });
        };
        let text = if path.as_os_str() == "-" {
            std::io::read_to_string(std::io::stdin())
        } else {
            std::fs::read_to_string(path)
        }
        .map_err(|source| RequestArgsError::Read {
            path: path.clone(),
            source,
        })?;
        // The path to the offending field (e.g. `constraints.minMemory`) is worth more than
        // serde's own words for some errors ("did not match any variant").
        let mut de = serde_json::Deserializer::from_str(&text);
        let req =
            serde_path_to_error::deserialize::<_, pb::BuildRequest>(&mut de).map_err(|e| {
                RequestArgsError::Json {
                    path: path.clone(),
                    field: e.path().to_string(),
                    source: e.into_inner(),
                }
            })?;
        de.end().map_err(|source| RequestArgsError::Json {
            path: path.clone(),
            field: ".".into(),
            source,
        })?;
        Ok(req)
    }

    /// `req` (from [`RequestArgs::load`]) with the flags applied; `imported` are the root
    /// nodes of `--input` paths, already named by their basenames. Lists are sorted as the
    /// wire contract requires; validation happens afterwards, once, like for any request.
    pub fn apply(
        &self,
        mut req: pb::BuildRequest,
        imported: Vec<castore_pb::Node>,
    ) -> pb::BuildRequest {
        if !self.argv.is_empty() {
            req.command_args = self.argv.clone();
        }
        if !imported.is_empty() {
            req.inputs.extend(imported);
            req.inputs
                .sort_by(|a, b| proto_node_name(a).cmp(proto_node_name(b)));
        }
        for (k, v) in &self.env {
            req.environment_vars.retain(|e| e.key != *k);
            req.environment_vars.push(env_var(k, v));
        }
        req.environment_vars.sort_by(|a, b| a.key.cmp(&b.key));
        if !self.outputs.is_empty() {
            req.outputs.extend(self.outputs.iter().cloned());
            req.outputs.sort();
        }
        let constraints = req.constraints.get_or_insert_with(Default::default);
        if let Some(system) = &self.system {
            constraints.system = system.clone();
        } else if self.request.is_none() {
            constraints.system = "x86_64-linux".into();
        }
        if let Some(m) = self.memory {
            constraints.min_memory = m;
        }
        if !self.ro_paths.is_empty() {
            constraints
                .available_ro_paths
                .extend(self.ro_paths.iter().cloned());
            constraints.available_ro_paths.sort();
            constraints.available_ro_paths.dedup();
        }
        req
    }
}

fn env_var(k: &str, v: &str) -> pb::build_request::EnvVar {
    pb::build_request::EnvVar {
        key: k.to_owned(),
        value: Bytes::copy_from_slice(v.as_bytes()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct T {
        #[command(flatten)]
        a: RequestArgs,
    }

    #[test]
    fn flags_alone_give_nix_defaults_sorted_with_overrides() {
        let t = T::parse_from([
            "t",
            "--env",
            "out=/nix/store/o",
            "--env",
            "PATH=/bin",
            "--output",
            "o",
            "--ro-path",
            "/srv/b",
            "--ro-path",
            "/srv/a",
            "--",
            "/bin/sh",
            "-c",
            "true",
        ]);
        let req = t.a.apply(t.a.load().unwrap(), Vec::new());
        assert_eq!(req.command_args, ["/bin/sh", "-c", "true"]);
        assert_eq!(req.outputs, ["o"]);
        let keys: Vec<_> = req
            .environment_vars
            .iter()
            .map(|e| e.key.as_str())
            .collect();
        let mut sorted = keys.clone();
        sorted.sort();
        assert_eq!(keys, sorted);
        let path = req
            .environment_vars
            .iter()
            .find(|e| e.key == "PATH")
            .unwrap();
        assert_eq!(&path.value[..], b"/bin");
        assert_eq!(req.environment_vars.len(), NIX_DEFAULT_ENV.len() + 1);
        let constraints = req.constraints.unwrap();
        assert_eq!(constraints.system, "x86_64-linux");
        assert_eq!(constraints.available_ro_paths, ["/srv/a", "/srv/b"]);
    }

    #[test]
    fn request_file_is_read_and_bad_json_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let good = dir.path().join("r.json");
        std::fs::write(
            &good,
            r#"{"commandArgs":[":"],"outputs":["x"],"constraints":{"system":":"}}"#,
        )
        .unwrap();
        let t = T::parse_from(["t", "--request", good.to_str().unwrap()]);
        let req = t.a.apply(t.a.load().unwrap(), Vec::new());
        assert_eq!(req.command_args, [":"]);
        assert_eq!(req.constraints.unwrap().system, ":");
        assert!(req.environment_vars.is_empty());

        let bad = dir.path().join("bad.json");
        std::fs::write(&bad, "{").unwrap();
        let t = T::parse_from(["t", "--request", bad.to_str().unwrap()]);
        let e = t.a.load().unwrap_err();
        assert!(e.to_string().contains("bad.json"), "{e}");
    }
}
