//! Finding the external programs the backends run (QEMU, vhost-device-vsock,
//! cloud-hypervisor): an explicit path the operator named, or a search.

use std::path::{Path, PathBuf};

/// `explicit` if it is an executable file, else the first executable `name` on PATH and then
/// in `extra_dirs`. The error says where it looked, for the caller's own error message.
pub fn locate(
    explicit: Option<&Path>,
    name: &str,
    extra_dirs: &[PathBuf],
) -> Result<PathBuf, String> {
    if let Some(path) = explicit {
        return if is_executable(path) {
            Ok(path.to_owned())
        } else {
            Err(format!("at {}", path.display()))
        };
    }
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    dirs.extend(extra_dirs.iter().cloned());
    dirs.iter()
        .map(|d| d.join(name))
        .find(|p| is_executable(p))
        .ok_or_else(|| {
            if extra_dirs.is_empty() {
                "on PATH".to_owned()
            } else {
                let extra: Vec<_> = extra_dirs.iter().map(|d| d.display().to_string()).collect();
                format!("on PATH or in {}", extra.join(", "))
            }
        })
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn explicit_search_and_errors() {
        assert_eq!(
            locate(Some(Path::new("/bin/sh")), "x", &[]),
            Ok(PathBuf::from("/bin/sh"))
        );
        assert_eq!(
            locate(Some(Path::new("/etc/passwd")), "x", &[]),
            Err("at /etc/passwd".to_owned())
        );
        assert!(locate(None, "sh", &[]).is_ok_and(|p| p.ends_with("sh")));
        let dir = tempfile::tempdir().unwrap();
        let prog = dir.path().join("only-here");
        std::fs::write(&prog, "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(&prog, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        assert_eq!(
            locate(None, "only-here", &[dir.path().to_owned()]),
            Ok(prog)
        );
        let err = locate(None, "nowhere-at-all", &[dir.path().to_owned()]).unwrap_err();
        assert!(err.starts_with("on PATH or in "), "{err}");
    }
}
