//! The validated internal model of a BuildRequest.
//!
//! Every wire dialect (see [`crate::wire`]) maps its request onto [`RawRequest`], a plain
//! mirror of the richest shape, which is then validated once by [`RawRequest::validate`]
//! into a [`BuildRequest`], which cannot hold an invalid value. Errors name the field and
//! index, as they reach the client as `INVALID_ARGUMENT`.

use crate::castore::directory::{Node, PathComponent};
use crate::proto::castore as castore_pb;
use bytes::Bytes;
use std::collections::BTreeMap;
use std::fmt;

/// Longest argument or environment value we pass to the guest; the kernel's own limit on
/// one execve string is 128 KiB (MAX_ARG_STRLEN).
const MAX_ARG_BYTES: usize = 128 * 1024;
/// Upper bound on the number of inputs, arguments, variables, outputs and files.
const MAX_LIST_LEN: usize = 65_536;
/// Upper bound on all additional files together.
const MAX_ADDITIONAL_FILES_BYTES: usize = 16 * 1024 * 1024;
/// Upper bound on one refscan needle. Needles are store path hashes (32 bytes in Nix); the
/// harvest keeps the longest one's length of every file in memory to find a needle split
/// across two reads, and builds one matcher of all of them.
const MAX_NEEDLE_BYTES: usize = 1024;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{field}: {reason}")]
pub struct ValidationError {
    /// The offending field, with an index where it is a list, e.g. `inputs[2]`.
    pub field: String,
    pub reason: String,
}

fn invalid(field: impl Into<String>, reason: impl fmt::Display) -> ValidationError {
    ValidationError {
        field: field.into(),
        reason: reason.to_string(),
    }
}

/// A clean relative path: no empty, `.` or `..` segments, no leading or trailing slash,
/// each segment a valid castore name.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub struct RelativePath(String);

impl RelativePath {
    pub fn parse(s: &str) -> Result<Self, String> {
        if s.is_empty() {
            return Err("path is empty".into());
        }
        for seg in s.split('/') {
            PathComponent::try_from(seg.as_bytes())
                .map_err(|e| format!("path {s:?} is not clean: segment {seg:?}: {e}"))?;
        }
        Ok(Self(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The last segment (the basename).
    pub fn file_name(&self) -> &str {
        self.0.rsplit('/').next().unwrap_or(&self.0)
    }

    /// Everything before the last segment, if there is more than one.
    pub fn parent(&self) -> Option<&str> {
        self.0.rsplit_once('/').map(|(parent, _)| parent)
    }

    /// Whether `self` lies strictly inside `dir`.
    pub fn is_inside(&self, dir: &RelativePath) -> bool {
        self.0
            .strip_prefix(dir.as_str())
            .is_some_and(|rest| rest.starts_with('/'))
    }

    /// The absolute path of this inside the guest's root.
    pub fn guest_path(&self) -> String {
        format!("/{}", self.0)
    }
}

impl fmt::Display for RelativePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// What a host must offer before the build may start.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Constraints {
    /// e.g. `x86_64-linux`; checked against the host's list when the build is admitted.
    pub system: String,
    /// Minimum guest memory in bytes (0: the host's default).
    pub min_memory: u64,
    /// Absolute, clean host paths the build needs read-only, e.g. `/dev/kvm`; sorted, unique.
    pub available_ro_paths: Vec<String>,
    pub network_access: bool,
    pub provide_bin_sh: bool,
}

/// The fields of a build request as they arrive, before validation. Every wire layout maps
/// onto this.
#[derive(Clone, Debug, Default)]
pub struct RawRequest {
    pub inputs: Vec<castore_pb::Node>,
    pub command_args: Vec<String>,
    pub working_dir: String,
    pub scratch_paths: Vec<String>,
    pub inputs_dir: String,
    pub outputs: Vec<String>,
    pub environment_vars: Vec<(String, Bytes)>,
    pub constraints: Constraints,
    pub additional_files: Vec<(String, Bytes)>,
    pub refscan_needles: Vec<String>,
}

/// A validated build request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BuildRequest {
    /// The input root nodes, by name (unique, sorted by construction).
    pub inputs: BTreeMap<PathComponent, Node>,
    /// argv; never empty.
    pub command_args: Vec<String>,
    pub working_dir: RelativePath,
    pub scratch_paths: Vec<RelativePath>,
    pub inputs_dir: RelativePath,
    /// Paths from the root, each inside a scratch path; in request order (sorted).
    pub outputs: Vec<RelativePath>,
    /// The build's whole environment, sorted by key, keys unique.
    pub environment_vars: Vec<(String, Bytes)>,
    pub constraints: Constraints,
    pub additional_files: Vec<(RelativePath, Bytes)>,
    pub refscan_needles: Vec<String>,
}

fn check_len<T>(field: &str, list: &[T]) -> Result<(), ValidationError> {
    if list.len() > MAX_LIST_LEN {
        return Err(invalid(
            field,
            format!("{} entries, at most {MAX_LIST_LEN} allowed", list.len()),
        ));
    }
    Ok(())
}

fn check_sorted<'a, T: Ord + fmt::Debug + ?Sized + 'a>(
    field: &str,
    items: impl Iterator<Item = &'a T>,
) -> Result<(), ValidationError> {
    let mut prev: Option<&T> = None;
    for (i, item) in items.enumerate() {
        if let Some(p) = prev {
            if p == item {
                return Err(invalid(
                    format!("{field}[{i}]"),
                    format!("{item:?} is a duplicate"),
                ));
            }
            if p > item {
                return Err(invalid(
                    format!("{field}[{i}]"),
                    format!("{item:?} is not sorted (comes after {p:?})"),
                ));
            }
        }
        prev = Some(item);
    }
    Ok(())
}

fn parse_path(field: String, s: &str) -> Result<RelativePath, ValidationError> {
    RelativePath::parse(s).map_err(|reason| invalid(field, reason))
}

impl RawRequest {
    pub fn validate(self) -> Result<BuildRequest, ValidationError> {
        check_len("inputs", &self.inputs)?;
        let mut inputs = BTreeMap::new();
        let mut prev_name: Option<PathComponent> = None;
        for (i, node) in self.inputs.into_iter().enumerate() {
            let field = format!("inputs[{i}]");
            let (name, node) = Node::from_proto(node).map_err(|e| invalid(&field, e))?;
            if let Some(prev) = &prev_name {
                if *prev >= name {
                    let why = if *prev == name {
                        "a duplicate"
                    } else {
                        "not sorted"
                    };
                    return Err(invalid(field, format!("name {name} is {why}")));
                }
            }
            prev_name = Some(name.clone());
            inputs.insert(name, node);
        }

        if self.command_args.is_empty() {
            return Err(invalid("command_args", "empty: there is nothing to run"));
        }
        check_len("command_args", &self.command_args)?;
        for (i, arg) in self.command_args.iter().enumerate() {
            check_exec_string(&format!("command_args[{i}]"), arg.as_bytes())?;
        }

        let working_dir = parse_path("working_dir".into(), &self.working_dir)?;
        let inputs_dir = parse_path("inputs_dir".into(), &self.inputs_dir)?;
        check_len("scratch_paths", &self.scratch_paths)?;
        check_sorted("scratch_paths", self.scratch_paths.iter())?;
        let scratch_paths = self
            .scratch_paths
            .iter()
            .enumerate()
            .map(|(i, p)| parse_path(format!("scratch_paths[{i}]"), p))
            .collect::<Result<Vec<_>, _>>()?;

        check_len("outputs", &self.outputs)?;
        check_sorted("outputs", self.outputs.iter())?;
        let mut outputs = Vec::with_capacity(self.outputs.len());
        for (i, o) in self.outputs.iter().enumerate() {
            let field = format!("outputs[{i}]");
            let path = parse_path(field.clone(), o)?;
            if !scratch_paths.iter().any(|s| path.is_inside(s)) {
                return Err(invalid(
                    field,
                    format!("{path} is not inside any scratch path"),
                ));
            }
            // An output that names an input would be "produced" by the overlay alone.
            if path.parent() == Some(inputs_dir.as_str())
                && inputs
                    .keys()
                    .any(|n| n.as_ref() == path.file_name().as_bytes())
            {
                return Err(invalid(field, format!("{path} is also an input")));
            }
            outputs.push(path);
        }

        check_len("environment_vars", &self.environment_vars)?;
        check_sorted(
            "environment_vars",
            self.environment_vars.iter().map(|(k, _)| k.as_str()),
        )?;
        for (i, (key, value)) in self.environment_vars.iter().enumerate() {
            let field = format!("environment_vars[{i}]");
            if key.is_empty() || key.contains('=') || key.contains('\0') {
                return Err(invalid(
                    field,
                    format!("key {key:?} is empty or has '=' or NUL"),
                ));
            }
            // The index alone would leave the caller counting: name the variable too.
            check_exec_string(&field, value).map_err(|e| ValidationError {
                reason: format!("value of {key:?}: {}", e.reason),
                ..e
            })?;
        }

        let mut constraints = self.constraints;
        if constraints.system.is_empty() {
            return Err(invalid(
                "constraints.system",
                "empty: a request must name the system it is built for, e.g. x86_64-linux",
            ));
        }
        check_len(
            "constraints.available_ro_paths",
            &constraints.available_ro_paths,
        )?;
        check_sorted(
            "constraints.available_ro_paths",
            constraints.available_ro_paths.iter(),
        )?;
        for (i, p) in constraints.available_ro_paths.iter().enumerate() {
            let field = format!("constraints.available_ro_paths[{i}]");
            let rel = p
                .strip_prefix('/')
                .ok_or_else(|| invalid(&field, format!("{p:?} is not absolute")))?;
            RelativePath::parse(rel).map_err(|reason| invalid(&field, reason))?;
        }
        constraints.available_ro_paths.dedup();

        check_len("additional_files", &self.additional_files)?;
        check_sorted(
            "additional_files",
            self.additional_files.iter().map(|(p, _)| p.as_str()),
        )?;
        let mut total = 0usize;
        let mut additional_files = Vec::with_capacity(self.additional_files.len());
        for (i, (p, contents)) in self.additional_files.into_iter().enumerate() {
            let field = format!("additional_files[{i}]");
            total = total.saturating_add(contents.len());
            if total > MAX_ADDITIONAL_FILES_BYTES {
                return Err(invalid(
                    field,
                    format!("additional files exceed {MAX_ADDITIONAL_FILES_BYTES} bytes in all"),
                ));
            }
            additional_files.push((parse_path(field, &p)?, contents));
        }

        check_len("refscan_needles", &self.refscan_needles)?;
        for (i, n) in self.refscan_needles.iter().enumerate() {
            let field = || format!("refscan_needles[{i}]");
            if n.is_empty() {
                return Err(invalid(field(), "empty needle"));
            }
            if n.len() > MAX_NEEDLE_BYTES {
                return Err(invalid(
                    field(),
                    format!("{} bytes, at most {MAX_NEEDLE_BYTES} allowed", n.len()),
                ));
            }
        }

        Ok(BuildRequest {
            inputs,
            command_args: self.command_args,
            working_dir,
            scratch_paths,
            inputs_dir,
            outputs,
            environment_vars: self.environment_vars,
            constraints,
            additional_files,
            refscan_needles: self.refscan_needles,
        })
    }
}

/// Strings that end up in the build's execve: no NUL, bounded.
fn check_exec_string(field: &str, s: &[u8]) -> Result<(), ValidationError> {
    if s.contains(&0) {
        return Err(invalid(field, "contains a NUL byte"));
    }
    if s.len() > MAX_ARG_BYTES {
        return Err(invalid(
            field,
            format!("{} bytes, at most {MAX_ARG_BYTES} allowed", s.len()),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests;
