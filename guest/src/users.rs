//! The sandbox's /etc files: the users and groups a build may look up, and the hosts file.

/// The build user's name (Nix's).
pub const BUILD_USER: &str = "nixbld";
const NOBODY: u32 = 65534;

/// `/etc/passwd`: root, the build user (home = the working directory, as in Nix) and nobody.
/// An id that is root's or nobody's is not listed twice.
pub fn passwd(uid: u32, gid: u32, home: &str) -> String {
    let mut s = String::from("root:x:0:0:root:/root:/noshell\n");
    if uid != 0 && uid != NOBODY {
        s.push_str(&format!(
            "{BUILD_USER}:x:{uid}:{gid}:Build user:{home}:/noshell\n"
        ));
    }
    s.push_str(&format!("nobody:x:{NOBODY}:{NOBODY}:Nobody:/:/noshell\n"));
    s
}

/// `/etc/group`: root, the build group and nogroup.
pub fn group(gid: u32) -> String {
    let mut s = String::from("root:x:0:\n");
    if gid != 0 && gid != NOBODY {
        s.push_str(&format!("{BUILD_USER}:!:{gid}:\n"));
    }
    s.push_str(&format!("nogroup:x:{NOBODY}:\n"));
    s
}

/// `/etc/hosts`: only localhost.
pub const HOSTS: &str = "127.0.0.1 localhost\n::1 localhost\n";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nix_defaults() {
        assert_eq!(
            passwd(1000, 100, "/build"),
            "root:x:0:0:root:/root:/noshell\n\
             nixbld:x:1000:100:Build user:/build:/noshell\n\
             nobody:x:65534:65534:Nobody:/:/noshell\n"
        );
        assert_eq!(group(100), "root:x:0:\nnixbld:!:100:\nnogroup:x:65534:\n");
    }

    #[test]
    fn root_build_user_is_listed_once() {
        let p = passwd(0, 0, "/build");
        assert_eq!(p.lines().filter(|l| l.contains(":x:0:")).count(), 1);
        assert!(!p.contains(BUILD_USER));
        assert_eq!(group(0).lines().count(), 2);
    }
}
