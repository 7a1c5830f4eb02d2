//! routes.toml: parsed, validated, and described.
//!
//! This module owns the file format (README's "routes.toml" documents it) and every
//! check on it. A [`Config`] that comes out of [`Config::parse`] is consistent: every
//! route has a name no other route has, at least one backend, and either matchers or
//! `default = true`; at most one route is the default; every matcher can be decided within
//! `first_message_max` bytes. A typo must not silently change routing, so unknown keys
//! are errors, and every error names the file, the line and the key.
//!
//! Each file owns one step from text to [`Config`]:
//! - mod.rs: the public types a parse produces, and [`Config::load`] and
//!   [`Config::parse`], which run the steps below in order.
//! - raw.rs: the file as serde reads it, every value spanned, unknown keys refused.
//! - span.rs: where in the file a byte offset is (its line, route and key), for errors.
//! - validate.rs: the checks that turn the raw file into a [`Config`]: the top-level
//!   keys, each route's keys, and the checks across routes.
//! - matchers.rs: a route's matcher keys, checked and turned into [`Matcher`]s.
//! - error.rs: [`ConfigError`], and what it tells the person editing the file.
//! - display.rs: a [`Config`] as `splice-proxy --check` prints it.

mod display;
mod error;
mod matchers;
mod raw;
mod span;
mod validate;

use std::path::Path;
use std::time::Duration;

use serde::Deserialize;
use toml::de::DeTable;

use crate::backend::HealthCheck;
use crate::balance::{Balance, WeightedBackend};
use crate::proxy_protocol::ProxyProtocol;
use crate::route::{Matcher, OnUnparsed};

use self::error::Problem;
pub use self::error::{ConfigError, Invalid};
use self::raw::RawConfig;
use self::span::Source;

/// `splice_backlog_max` when the file has none; docs/flow-control.md, "What it costs",
/// has the measurements it was chosen from.
pub const DEFAULT_SPLICE_BACKLOG_MAX: u64 = 32 << 20;

/// `splice_backlog_total` when the file has none; docs/flow-control.md, "A bound on all
/// directions together", has the measurements it was chosen from.
pub const DEFAULT_SPLICE_BACKLOG_TOTAL: u64 = 512 << 20;

/// What the proxy does, from routes.toml.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// How long to wait for the client's first bytes before routing on what has arrived
    /// (the default route if nothing has).
    pub first_message_timeout: Duration,
    /// The most bytes read before routing.
    pub first_message_max: usize,
    /// How long one backend may take to accept before the next one is tried.
    pub connect_timeout: Duration,
    /// The top-level `health_interval` and `health_fails`: what routes that do not set
    /// their own get. Off unless `health_interval` is given.
    pub health: HealthCheck,
    /// Connections the proxy holds at once (accepted and not yet closed); beyond it new
    /// clients are refused. `None`: no limit.
    pub max_connections: Option<usize>,
    /// A connection handed to the splice engine that moves no byte either way for this
    /// long is reset. `None`: never.
    pub idle_timeout: Option<Duration>,
    /// What a first message that claimed TLS or HTTP but could not be parsed gets.
    pub on_unparsed: OnUnparsed,
    /// The most bytes the kernel holds for one spliced direction beyond its two sockets'
    /// buffers: redirected from the source and not yet in the destination's send queue.
    pub splice_backlog_max: u64,
    /// The most the kernel holds for every spliced direction together, in the same
    /// sense; a pair the rest of it cannot give a first credit is copied instead.
    pub splice_backlog_total: u64,
    /// In file order, which is the order they are tried in.
    pub routes: Vec<RouteConfig>,
}

/// One `[[route]]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteConfig {
    /// Unique in the file; names the route in logs and metrics.
    pub name: String,
    /// All must hold. Empty for the default route.
    pub matchers: Vec<Matcher>,
    /// Takes the connections no other route matched, and those that sent nothing.
    pub default: bool,
    /// In file order, each with its weight (1 unless given).
    pub backends: Vec<WeightedBackend>,
    /// The order its backends are tried in.
    pub balance: Balance,
    /// How its backends' health is checked: its own keys, else the top-level ones.
    pub health: HealthCheck,
    /// The PROXY protocol header written to the backend before the first message.
    pub send_proxy: Option<ProxyProtocol>,
    /// Connections this route holds at once; beyond it, clients routed here are refused.
    /// `None`: no limit but the proxy's.
    pub max_connections: Option<usize>,
}

impl Config {
    /// Reads and parses the routes file at `path`.
    ///
    /// # Errors
    ///
    /// [`ConfigError::Read`] if the file cannot be read, else as [`Config::parse`].
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Read {
            file: path.to_owned(),
            error,
        })?;
        Config::parse(&text, path)
    }

    /// Parses routes.toml text; `file` only names it in errors.
    ///
    /// # Errors
    ///
    /// [`ConfigError::Invalid`] for the first problem found.
    pub fn parse(text: &str, file: &Path) -> Result<Config, ConfigError> {
        let source = Source { text, file };
        // Parsed once into a spanned document, which both feeds serde and lets an error
        // at a byte offset be traced back to its route and key.
        let (document, syntax_errors) = DeTable::parse_recoverable(text);
        if let Some(error) = syntax_errors.first() {
            return Err(source.toml_error(error, &document, Problem::Syntax));
        }
        let raw = RawConfig::deserialize(toml::de::Deserializer::from(document.clone()))
            .map_err(|error| source.toml_error(&error, &document, Problem::Schema))?;
        source.validate(raw)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io;
    use std::net::SocketAddr;

    /// A file from its lines, so that a test can count lines by index.
    fn file(lines: &[&str]) -> String {
        lines.join("\n") + "\n"
    }

    pub(super) fn parse(lines: &[&str]) -> Result<Config, ConfigError> {
        Config::parse(&file(lines), Path::new("routes.toml"))
    }

    /// Asserts that the file is refused with a message that starts with the file name,
    /// `line` and `place` (the route and key), and goes on to say `says`.
    #[track_caller]
    pub(super) fn assert_refused(lines: &[&str], line: usize, place: &str, says: &str) {
        let message = parse(lines).unwrap_err().to_string();
        let expected_start = format!("routes.toml:{line}: {place}");
        assert!(
            message.starts_with(&expected_start),
            "{message:?} should start with {expected_start:?}"
        );
        assert!(message.contains(says), "{message:?} should say {says:?}");
    }

    pub(super) fn backend(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    #[test]
    fn every_key() {
        let config = parse(&[
            r#"first_message_timeout = "250ms""#,
            "first_message_max = 512",
            r#"connect_timeout = "1m""#,
            "max_connections = 10000",
            r#"idle_timeout = "5m""#,
            "",
            "[[route]]",
            r#"name = "tag-600""#,
            r#"prefix = "\u0016\u0003""#,
            "at = 20",
            r#"bytes = "600""#,
            "min_length = 290",
            "max_length = 294",
            r#"backends = ["127.0.0.1:5001", "[::1]:5002"]"#,
            r#"balance = "round-robin""#,
            "max_connections = 100",
            "",
            "[[route]]",
            r#"name = "fallback""#,
            "default = true",
            r#"backends = ["127.0.0.1:9009"]"#,
        ])
        .unwrap();
        assert_eq!(config.first_message_timeout, Duration::from_millis(250));
        assert_eq!(config.first_message_max, 512);
        assert_eq!(config.connect_timeout, Duration::from_secs(60));
        assert_eq!(config.max_connections, Some(10000));
        assert_eq!(config.idle_timeout, Some(Duration::from_secs(300)));
        assert_eq!(config.routes[0].max_connections, Some(100));
        assert_eq!(config.routes[1].max_connections, None);
        assert_eq!(
            config.routes[0].matchers,
            [
                Matcher::Prefix(vec![0x16, 0x03]),
                Matcher::At {
                    offset: 20,
                    bytes: b"600".to_vec()
                },
                Matcher::Length { min: 290, max: 294 },
            ]
        );
        assert_eq!(
            config.routes[0].backends,
            [
                backend(5001).into(),
                "[::1]:5002".parse::<SocketAddr>().unwrap().into()
            ]
        );
        assert!(!config.routes[0].default);
        assert!(config.routes[1].default);
        assert!(config.routes[1].matchers.is_empty());
    }

    #[test]
    fn load_reports_the_file_and_the_os_error() {
        let path = Path::new("/nonexistent/routes.toml");
        let error = Config::load(path).unwrap_err();
        assert!(
            matches!(&error, ConfigError::Read { error, .. } if error.kind() == io::ErrorKind::NotFound)
        );
        let message = error.to_string();
        assert!(
            message.starts_with("/nonexistent/routes.toml: "),
            "{message}"
        );
        assert!(message.contains("No such file or directory"), "{message}");
    }

    #[test]
    fn the_examples_are_valid() {
        let routes = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/routes.toml");
        let config = Config::load(&routes).unwrap();
        assert!(config.routes.iter().any(|route| route.default));

        let mplex = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/mplex-routes.toml");
        let config = Config::load(&mplex).unwrap();
        assert!(config.routes.iter().all(|route| !route.default));
        for (route, tag) in config.routes.iter().zip(["600", "601", "602"]) {
            assert_eq!(
                route.matchers,
                [
                    Matcher::At {
                        offset: 20,
                        bytes: tag.as_bytes().to_vec()
                    },
                    Matcher::Length { min: 290, max: 294 },
                ]
            );
        }
        let ports: Vec<_> = config
            .routes
            .iter()
            .flat_map(|route| route.backends.clone())
            .collect();
        assert_eq!(
            ports,
            [
                backend(5600).into(),
                backend(5601).into(),
                backend(5602).into()
            ]
        );
    }
}
