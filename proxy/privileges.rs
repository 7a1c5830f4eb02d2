//! Dropping root for good once what needs it is done (the probe loaded and attached, the
//! listeners bound): another user and group, no supplementary groups, and no
//! capability in any set, checked afterwards.
//!
//! Nothing the running proxy does needs a privilege, as measured on 6.18: map updates
//! and deletes go through the map fds opened while privileged, SIGHUP re-reads a routes
//! file the user can read, and the spliced sockets' 16 MiB send buffers fall back from
//! `SO_SNDBUFFORCE` (CAP_NET_ADMIN) to `SO_SNDBUF`, which the kernel caps at
//! `net.core.wmem_max`.

use std::{fs, io};

use caps::{CapSet, errors::CapsError};
use nix::unistd::{Gid, Group, Uid, User};

/// Why the switch failed. The causes are part of each message (not error sources), so
/// that a chain printed whole says each once.
#[derive(Debug, thiserror::Error)]
pub enum PrivilegeError {
    /// No user has this name.
    #[error("no user named {0:?}")]
    NoUser(String),
    /// No group has this name.
    #[error("no group named {0:?}")]
    NoGroup(String),
    /// Looking a name up failed.
    #[error("looking up {what} {name:?}: {cause}")]
    Lookup {
        /// "user" or "group".
        what: &'static str,
        /// The name looked up.
        name: String,
        /// The system's answer.
        cause: nix::Error,
    },
    /// Other threads run, which would keep their credentials; how many.
    #[error("privileges must be dropped before any thread starts, and {0} threads are running")]
    Threads(usize),
    /// A step of the switch failed.
    #[error("{step} failed: {cause}")]
    Step {
        /// The step, as its call is named.
        step: &'static str,
        /// Why it failed.
        cause: nix::Error,
    },
    /// Clearing a capability set failed.
    #[error("{step} failed: {cause}")]
    Capabilities {
        /// The step, as its call is named.
        step: &'static str,
        /// Why it failed.
        cause: CapsError,
    },
    /// The check afterwards could not read the process status.
    #[error("reading /proc/self/status: {0}")]
    Status(io::Error),
    /// The check afterwards found a capability set not empty; which.
    #[error("after the switch the process still has {0}")]
    Kept(String),
}

/// A user and group to run as.
#[derive(Debug, Clone)]
pub struct Identity {
    /// The user's name.
    pub user: String,
    /// The user's id.
    pub uid: Uid,
    /// The group's name.
    pub group: String,
    /// The group's id.
    pub gid: Gid,
}

impl Identity {
    /// `user`, with `group` or else the user's primary group.
    pub fn lookup(user: &str, group: Option<&str>) -> Result<Identity, PrivilegeError> {
        let found = User::from_name(user)
            .map_err(|cause| PrivilegeError::Lookup {
                what: "user",
                name: user.to_owned(),
                cause,
            })?
            .ok_or_else(|| PrivilegeError::NoUser(user.to_owned()))?;
        let (group, gid) = match group {
            Some(name) => {
                let group = Group::from_name(name)
                    .map_err(|cause| PrivilegeError::Lookup {
                        what: "group",
                        name: name.to_owned(),
                        cause,
                    })?
                    .ok_or_else(|| PrivilegeError::NoGroup(name.to_owned()))?;
                (group.name, group.gid)
            }
            None => {
                let name = Group::from_gid(found.gid)
                    .ok()
                    .flatten()
                    .map_or_else(|| found.gid.to_string(), |group| group.name);
                (name, found.gid)
            }
        };
        Ok(Identity {
            user: found.name,
            uid: found.uid,
            group,
            gid,
        })
    }
}

/// Becomes `identity` with no capabilities and no way back. Capability sets and the
/// no-new-privileges flag belong to a thread, so this must run before any other thread
/// starts: every thread started afterwards inherits them.
pub fn drop_to(identity: &Identity) -> Result<(), PrivilegeError> {
    let threads = status_field("Threads")?;
    if threads != "1" {
        return Err(PrivilegeError::Threads(threads.parse().unwrap_or(0)));
    }
    let step = |step| move |cause| PrivilegeError::Step { step, cause };
    let caps_step = |step| move |cause| PrivilegeError::Capabilities { step, cause };
    // The bounding set needs CAP_SETPCAP to shrink, so it goes while we are root.
    caps::clear(None, CapSet::Bounding).map_err(caps_step("clearing the bounding set"))?;
    caps::clear(None, CapSet::Inheritable).map_err(caps_step("clearing the inheritable set"))?;
    nix::unistd::setgroups(&[]).map_err(step("setgroups"))?;
    nix::unistd::setresgid(identity.gid, identity.gid, identity.gid).map_err(step("setresgid"))?;
    // Leaving uid 0 clears the permitted, effective and ambient sets (keep-caps is off).
    nix::unistd::setresuid(identity.uid, identity.uid, identity.uid).map_err(step("setresuid"))?;
    nix::sys::prctl::set_no_new_privs().map_err(step("PR_SET_NO_NEW_PRIVS"))?;
    check(identity)
}

/// Reads the result back from /proc/self/status, as an operator would.
fn check(identity: &Identity) -> Result<(), PrivilegeError> {
    let uid = identity.uid.to_string();
    let gid = identity.gid.to_string();
    let all = |id: &str| [id; 4].join("\t");
    let wanted = [
        ("Uid", all(&uid)),
        ("Gid", all(&gid)),
        ("Groups", String::new()),
        ("CapInh", "0000000000000000".to_owned()),
        ("CapPrm", "0000000000000000".to_owned()),
        ("CapEff", "0000000000000000".to_owned()),
        ("CapBnd", "0000000000000000".to_owned()),
        ("CapAmb", "0000000000000000".to_owned()),
        ("NoNewPrivs", "1".to_owned()),
    ];
    let mut kept = Vec::new();
    for (field, want) in wanted {
        let have = status_field(field)?;
        if have != want {
            kept.push(format!("{field} {have:?} (want {want:?})"));
        }
    }
    if kept.is_empty() {
        Ok(())
    } else {
        Err(PrivilegeError::Kept(kept.join(", ")))
    }
}

/// A field of /proc/self/status, trimmed.
fn status_field(field: &str) -> Result<String, PrivilegeError> {
    let status = fs::read_to_string("/proc/self/status").map_err(PrivilegeError::Status)?;
    let prefix = format!("{field}:");
    status
        .lines()
        .find_map(|line| line.strip_prefix(&prefix))
        .map(|value| value.trim().to_owned())
        .ok_or_else(|| PrivilegeError::Status(io::Error::other(format!("no {field} line"))))
}
