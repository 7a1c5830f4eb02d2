//! Routes for the proxy under test: the text of a routes.toml, and a file holding it for
//! the binary.

use std::{net::SocketAddr, path::PathBuf};

/// `backends = ["a", "b"]` for a routes file.
pub fn backends_toml(backends: &[SocketAddr]) -> String {
    let list: Vec<String> = backends.iter().map(|b| format!("\"{b}\"")).collect();
    format!("backends = [{}]", list.join(", "))
}

/// A routes file with one route, taking first messages that start with `prefix`.
pub fn prefix_routes(prefix: &str, backends: &[SocketAddr]) -> String {
    format!(
        "[[route]]\nname = \"prefix\"\nprefix = \"{prefix}\"\n{}\n",
        backends_toml(backends)
    )
}

/// A routes file whose only route is the default, with the given first-message timeout
/// (e.g. "200ms").
pub fn default_routes(first_message_timeout: &str, backends: &[SocketAddr]) -> String {
    format!(
        "first_message_timeout = \"{first_message_timeout}\"\n\n\
         [[route]]\nname = \"default\"\ndefault = true\n{}\n",
        backends_toml(backends)
    )
}

/// Writes a routes file into a fresh temporary directory and returns its path.
pub fn routes_file(name: &str, text: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("splice-proxy-test-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("routes.toml");
    std::fs::write(&path, text).unwrap();
    path
}
