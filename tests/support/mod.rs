//! What the end-to-end tests share: a proxy running in this process with the real probe
//! loaded, the real `splice-proxy` binary, backends on 127.0.0.1, deterministic payloads
//! and their hashes, and the process's open fds. Every wait is bounded.
//!
//! Each file owns one thing a test needs; this one declares them and re-exports their
//! names, so that a test says `use support::*` (or names what it uses) without knowing the
//! files.
#![allow(dead_code)] // Each test file uses a different part of this module.

use std::time::Duration;

mod addrs;
mod backends;
mod fds;
mod netns;
mod payloads;
mod process;
mod programs;
mod proxy;
mod routes;
mod streams;

// A test file that uses nothing of one of these files would otherwise warn of an unused
// import.
#[allow(unused_imports)]
pub use self::{
    addrs::*, backends::*, fds::*, netns::*, payloads::*, process::*, programs::*, proxy::*,
    routes::*, streams::*,
};

/// Every blocking socket in the tests gives up after this long, so a bug hangs no test.
pub const IO_TIMEOUT: Duration = Duration::from_secs(20);
