//! The Job from the host, validated once into a type the rest of the agent can trust.

use std::ffi::CString;

use tvix_build_vm_agent::proto;

/// The longest virtio-fs tag (the device's config space field).
const MAX_TAG_BYTES: usize = 36;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum JobError {
    #[error("argv is empty")]
    NoArgv,
    #[error("argv[{index}] contains a NUL byte")]
    ArgvNul { index: usize },
    #[error("env[{index}]: key {key:?} is empty or contains '=' or NUL")]
    EnvKey { index: usize, key: String },
    #[error("env[{index}] ({key}): value contains a NUL byte")]
    EnvValue { index: usize, key: String },
    #[error("env[{index}]: key {key:?} given twice")]
    EnvDuplicate { index: usize, key: String },
    #[error("{field}: {path:?} is not a clean absolute path below /")]
    Path { field: String, path: String },
    #[error("{field}: {tag:?} is not a virtio-fs tag (1 to {MAX_TAG_BYTES} bytes, no NUL)")]
    Tag { field: String, tag: String },
    #[error("scratch_device: {0:?} is not a path below /dev")]
    ScratchDevice(String),
}

/// An absolute guest path with at least one component and no empty, `.` or `..` component.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct GuestPath(String);

impl GuestPath {
    pub fn parse(field: impl Into<String>, path: &str) -> Result<Self, JobError> {
        let ok = path.len() > 1
            && path.starts_with('/')
            && !path.contains('\0')
            && path[1..]
                .split('/')
                .all(|c| !c.is_empty() && c != "." && c != "..");
        if ok {
            Ok(Self(path.to_owned()))
        } else {
            Err(JobError::Path {
                field: field.into(),
                path: path.to_owned(),
            })
        }
    }

    /// The path as the build sees it, e.g. `/nix/store`.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The path without its leading slash, for resolving below a root.
    pub fn rel(&self) -> &str {
        &self.0[1..]
    }

    /// The number of components.
    pub fn depth(&self) -> usize {
        self.rel().split('/').count()
    }
}

/// A validated Job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobSpec {
    pub argv: Vec<CString>,
    /// `KEY=value` strings, the command's whole environment.
    pub env: Vec<CString>,
    pub working_dir: GuestPath,
    pub inputs_dir: GuestPath,
    /// Writable scratch paths other than `inputs_dir`.
    pub scratch_dirs: Vec<GuestPath>,
    /// Whether `inputs_dir` is writable (an overlay over the inputs).
    pub inputs_writable: bool,
    pub outputs: Vec<GuestPath>,
    pub uid: u32,
    pub gid: u32,
    pub additional_files: Vec<(GuestPath, Vec<u8>)>,
    pub bin_sh: Option<GuestPath>,
    pub clock_unix_ns: i64,
    pub inputs_tag: Option<String>,
    pub scratch_device: Option<GuestPath>,
    pub network: bool,
    pub memory_bytes: u64,
    pub max_processes: u64,
    pub tmpfs_bytes: u64,
    /// Read-only virtio-fs shares: (tag, path), shallowest path first.
    pub extra_mounts: Vec<(String, GuestPath)>,
}

fn tag(field: impl Into<String>, tag: &str) -> Result<String, JobError> {
    if tag.is_empty() || tag.len() > MAX_TAG_BYTES || tag.contains('\0') {
        return Err(JobError::Tag {
            field: field.into(),
            tag: tag.to_owned(),
        });
    }
    Ok(tag.to_owned())
}

fn opt_path(field: &str, path: &str) -> Result<Option<GuestPath>, JobError> {
    if path.is_empty() {
        Ok(None)
    } else {
        GuestPath::parse(field, path).map(Some)
    }
}

impl TryFrom<proto::Job> for JobSpec {
    type Error = JobError;

    fn try_from(job: proto::Job) -> Result<Self, JobError> {
        if job.argv.is_empty() {
            return Err(JobError::NoArgv);
        }
        let argv = job
            .argv
            .into_iter()
            .enumerate()
            .map(|(index, a)| CString::new(a).map_err(|_| JobError::ArgvNul { index }))
            .collect::<Result<Vec<_>, _>>()?;

        let mut env = Vec::with_capacity(job.env.len());
        let mut seen = std::collections::HashSet::new();
        for (index, var) in job.env.into_iter().enumerate() {
            let key_text = String::from_utf8_lossy(&var.key).into_owned();
            if var.key.is_empty() || var.key.contains(&b'=') || var.key.contains(&0) {
                return Err(JobError::EnvKey {
                    index,
                    key: key_text,
                });
            }
            if !seen.insert(var.key.clone()) {
                return Err(JobError::EnvDuplicate {
                    index,
                    key: key_text,
                });
            }
            let mut kv = var.key;
            kv.push(b'=');
            kv.extend_from_slice(&var.value);
            env.push(CString::new(kv).map_err(|_| JobError::EnvValue {
                index,
                key: key_text,
            })?);
        }

        let working_dir = GuestPath::parse("working_dir", &job.working_dir)?;
        let inputs_dir = GuestPath::parse("inputs_dir", &job.inputs_dir)?;
        let mut scratch_dirs = Vec::new();
        let mut inputs_writable = false;
        for (i, p) in job.scratch_paths.iter().enumerate() {
            let p = GuestPath::parse(format!("scratch_paths[{i}]"), p)?;
            if p == inputs_dir {
                inputs_writable = true;
            } else {
                scratch_dirs.push(p);
            }
        }
        let outputs = job
            .outputs
            .iter()
            .enumerate()
            .map(|(i, p)| GuestPath::parse(format!("outputs[{i}]"), p))
            .collect::<Result<Vec<_>, _>>()?;
        let additional_files = job
            .additional_files
            .into_iter()
            .enumerate()
            .map(|(i, f)| {
                Ok((
                    GuestPath::parse(format!("additional_files[{i}]"), &f.path)?,
                    f.contents,
                ))
            })
            .collect::<Result<Vec<_>, JobError>>()?;
        let mut extra_mounts = job
            .extra_mounts
            .iter()
            .enumerate()
            .map(|(i, m)| {
                Ok((
                    tag(format!("extra_mounts[{i}].tag"), &m.tag)?,
                    GuestPath::parse(format!("extra_mounts[{i}].path"), &m.path)?,
                ))
            })
            .collect::<Result<Vec<_>, JobError>>()?;
        // A parent must be mounted before anything below it.
        extra_mounts.sort_by_key(|(_, p)| p.depth());

        let scratch_device = opt_path("scratch_device", &job.scratch_device)?;
        if let Some(dev) = &scratch_device {
            if !dev.as_str().starts_with("/dev/") {
                return Err(JobError::ScratchDevice(dev.as_str().to_owned()));
            }
        }
        let inputs_tag = if job.inputs_tag.is_empty() {
            None
        } else {
            Some(tag("inputs_tag", &job.inputs_tag)?)
        };
        let limits = job.limits.unwrap_or_default();
        Ok(Self {
            argv,
            env,
            working_dir,
            inputs_dir,
            scratch_dirs,
            inputs_writable,
            outputs,
            uid: job.uid,
            gid: job.gid,
            additional_files,
            bin_sh: opt_path("bin_sh", &job.bin_sh)?,
            clock_unix_ns: job.clock_unix_ns,
            inputs_tag,
            scratch_device,
            network: job.network,
            memory_bytes: limits.memory_bytes,
            max_processes: limits.max_processes,
            tmpfs_bytes: limits.tmpfs_bytes,
            extra_mounts,
        })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proto::{EnvVar, Job};

    pub fn nix_job() -> Job {
        Job {
            argv: vec![
                b"/bin/sh".to_vec(),
                b"-c".to_vec(),
                b"echo hi > $out".to_vec(),
            ],
            env: vec![
                EnvVar {
                    key: b"HOME".to_vec(),
                    value: b"/homeless-shelter".to_vec(),
                },
                EnvVar {
                    key: b"out".to_vec(),
                    value: b"/nix/store/aaa-hello".to_vec(),
                },
            ],
            working_dir: "/build".into(),
            inputs_dir: "/nix/store".into(),
            scratch_paths: vec!["/build".into(), "/nix/store".into()],
            outputs: vec!["/nix/store/aaa-hello".into()],
            uid: 1000,
            gid: 100,
            inputs_tag: "inputs".into(),
            ..Default::default()
        }
    }

    #[test]
    fn accepts_a_nix_job() {
        let spec = JobSpec::try_from(nix_job()).unwrap();
        assert_eq!(spec.env[0].as_bytes(), b"HOME=/homeless-shelter");
        assert!(spec.inputs_writable);
        assert_eq!(
            spec.scratch_dirs,
            vec![GuestPath::parse("x", "/build").unwrap()]
        );
        assert_eq!(spec.inputs_tag.as_deref(), Some("inputs"));
        assert_eq!(spec.bin_sh, None);
    }

    #[test]
    fn rejects_bad_env() {
        for (key, value) in [
            (&b""[..], &b"v"[..]),
            (b"A=B", b"v"),
            (b"A\0", b"v"),
            (b"A", b"v\0"),
        ] {
            let mut job = nix_job();
            job.env.push(EnvVar {
                key: key.to_vec(),
                value: value.to_vec(),
            });
            assert!(
                JobSpec::try_from(job).is_err(),
                "{key:?}={value:?} accepted"
            );
        }
        let mut job = nix_job();
        job.env.push(job.env[0].clone());
        assert!(matches!(
            JobSpec::try_from(job),
            Err(JobError::EnvDuplicate { index: 2, .. })
        ));
    }

    #[test]
    fn rejects_unclean_paths() {
        for p in [
            "", "/", "build", "/build/", "/a//b", "/a/./b", "/a/../b", "/a\0",
        ] {
            let mut job = nix_job();
            job.outputs = vec![p.into()];
            assert_eq!(
                JobSpec::try_from(job),
                Err(JobError::Path {
                    field: "outputs[0]".into(),
                    path: p.into()
                })
            );
        }
    }

    #[test]
    fn rejects_empty_argv_and_nul() {
        let mut job = nix_job();
        job.argv.clear();
        assert_eq!(JobSpec::try_from(job), Err(JobError::NoArgv));
        let mut job = nix_job();
        job.argv.push(b"a\0b".to_vec());
        assert_eq!(JobSpec::try_from(job), Err(JobError::ArgvNul { index: 3 }));
    }

    #[test]
    fn scratch_device_must_be_under_dev() {
        let mut job = nix_job();
        job.scratch_device = "/etc/vda".into();
        assert!(matches!(
            JobSpec::try_from(job),
            Err(JobError::ScratchDevice(_))
        ));
    }

    #[test]
    fn guest_path_parts() {
        let p = |s| GuestPath::parse("x", s).unwrap();
        assert_eq!(p("/nix/store").rel(), "nix/store");
        assert_eq!(p("/nix/store").depth(), 2);
    }
}
