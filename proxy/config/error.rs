//! Why routes.toml could not be used: [`ConfigError`], and for a file that was read,
//! where in it ([`Place`]) and what is wrong ([`Problem`]).
//!
//! A file of its own, apart from the checks that raise them so that every message the person editing the
//! file can get is in one place, worded alike.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;

use crate::balance::ParseBalanceError;
use crate::proxy_protocol::ParseProxyProtocolError;
use crate::route::{HostPatternError, RegexError};

/// Why routes.toml could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{}: {error}", file.display())]
    Read {
        /// The file.
        file: PathBuf,
        /// Why.
        error: io::Error,
    },
    /// The file says something wrong; its message names the line and the key.
    #[error(transparent)]
    Invalid(Box<Invalid>),
}

/// Where in which file what is wrong.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{}:{line}: {place}{problem}", file.display())]
pub struct Invalid {
    pub(crate) file: PathBuf,
    /// 1-based.
    pub(crate) line: usize,
    pub(crate) place: Place,
    pub(crate) problem: Problem,
}

/// The route and key an error is about, as far as they are known.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct Place {
    pub route: Option<RouteLabel>,
    pub key: Option<String>,
}

/// How an error refers to a route: by name, or by position when it has no usable name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum RouteLabel {
    Named(String),
    /// 1-based position among the `[[route]]` tables.
    Numbered(usize),
}

/// Renders as a prefix of the message: `route "web": key "backends": `.
impl fmt::Display for Place {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.route {
            Some(RouteLabel::Named(name)) => write!(f, "route {name:?}: ")?,
            Some(RouteLabel::Numbered(number)) => write!(f, "route #{number}: ")?,
            None => {}
        }
        if let Some(key) = &self.key {
            write!(f, "key {key:?}: ")?;
        }
        Ok(())
    }
}

/// What is wrong, in words for the person editing the file.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub(crate) enum Problem {
    #[error("TOML syntax: {0}")]
    Syntax(String),
    /// An unknown key, a missing key or a value of the wrong type, as serde put it.
    #[error("{0}")]
    Schema(String),
    #[error("{text:?} is not a duration such as \"250ms\", \"3s\" or \"1m\": {reason}")]
    NotADuration {
        text: String,
        reason: humantime::DurationError,
    },
    #[error("{text:?} is out of range: must be more than 0 and at most {max}")]
    DurationOutOfRange { text: String, max: &'static str },
    #[error("{value} is out of range: must be {min}..={max}")]
    OutOfRange { value: i64, min: usize, max: usize },
    #[error(
        "this needs the first {needed} bytes of the message but first_message_max is {max}, \
         so it could never match"
    )]
    BeyondFirstMessageMax { needed: usize, max: usize },
    #[error("an empty string matches everything; for a catch-all route use default = true")]
    EmptyBytes,
    #[error("\"at\" needs \"bytes\": the bytes expected at that offset")]
    AtWithoutBytes,
    #[error("\"bytes\" needs \"at\": the offset where they are expected")]
    BytesWithoutAt,
    #[error("min_length {min} is more than max_length {max}")]
    MinAboveMax { min: usize, max: usize },
    #[error(
        "the route has no matcher: give prefix, at + bytes, min_length/max_length, sni, \
         alpn, http_host, http_path_prefix or regex, or make it the catch-all with \
         default = true"
    )]
    NoMatcher,
    #[error("{text:?} is not a host name or \"*.\" and a host name: {reason}")]
    NotAHostPattern {
        text: String,
        reason: HostPatternError,
    },
    #[error("an empty list matches no client: give at least one protocol, e.g. alpn = [\"h2\"]")]
    EmptyAlpn,
    #[error("{text:?} is not an ALPN protocol name: those are 1 to 255 bytes")]
    NotAnAlpnName { text: String },
    #[error(
        "{text:?} is not the start of a request path: it must start with \"/\" and hold \
         no spaces or control characters"
    )]
    NotAPathPrefix { text: String },
    #[error(
        "{text:?} can never match: paths are compared normalized (escaped letters, digits \
         and -._~ decoded, other escapes in upper case, repeated slashes merged, dot \
         segments resolved), and it normalizes to {normalized:?}. Write that, or set \
         http_path_normalize = false to compare paths as sent"
    )]
    PathPrefixNotNormalized { text: String, normalized: String },
    #[error(
        "{text:?} is not what to do with a first message that claimed TLS or HTTP but could \
         not be parsed: \"default\" (the default route takes it) or \"reset\""
    )]
    NotAnOnUnparsed { text: String },
    #[error(transparent)]
    Regex(RegexError),
    #[error(
        "a first message cannot be both a TLS ClientHello ({tls:?}) and an HTTP request \
         ({http:?}): make them two routes"
    )]
    TlsAndHttp {
        tls: &'static str,
        http: &'static str,
    },
    #[error(
        "a default route takes what no other route matched, so it has no matchers: \
         remove this key or default = true"
    )]
    DefaultWithMatcher,
    #[error("route {first:?} on line {first_line} is already the default; only one route can be")]
    SecondDefault { first: String, first_line: usize },
    #[error("a route name cannot be empty")]
    EmptyName,
    #[error("route name already used on line {first_line}")]
    DuplicateName { first_line: usize },
    #[error("the route has no backends: give at least one, e.g. backends = [\"127.0.0.1:9001\"]")]
    NoBackends,
    #[error(
        "{text:?} is not an address (expected ip:port, e.g. 127.0.0.1:9001; \
         host names are not resolved)"
    )]
    NotAnAddress { text: String },
    #[error("{text:?}: port 0 cannot be connected to")]
    PortZero { text: String },
    #[error("{addr} is listed twice; give it one entry with a weight instead")]
    DuplicateBackend { addr: SocketAddr },
    #[error("{text:?} is out of range: must be \"0s\" (no health checks) or from 100ms to 1h")]
    HealthIntervalOutOfRange { text: String },
    #[error(
        "health_fails counts failed health checks, and there are none: set health_interval \
         too (e.g. \"2s\")"
    )]
    FailsWithoutInterval,
    #[error(
        "{addr} is also a backend of route {route:?} (line {line}), with {there}; here it \
         has {here}. An address has one health state: give both routes the same \
         health_interval and health_fails"
    )]
    HealthConflict {
        addr: SocketAddr,
        route: String,
        line: usize,
        /// As `--check` prints a [`HealthCheck`](crate::backend::HealthCheck).
        there: String,
        here: String,
    },
    #[error(transparent)]
    Balance(ParseBalanceError),
    #[error(transparent)]
    SendProxy(ParseProxyProtocolError),
    #[error("no routes: add at least one [[route]] with backends")]
    NoRoutes,
}

impl Place {
    pub(super) fn key(key: &str) -> Place {
        Place {
            route: None,
            key: Some(key.to_owned()),
        }
    }

    pub(super) fn route(route: RouteLabel) -> Place {
        Place {
            route: Some(route),
            key: None,
        }
    }

    pub(super) fn route_key(route: RouteLabel, key: &str) -> Place {
        Place {
            route: Some(route),
            key: Some(key.to_owned()),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use crate::config::Config;

    #[test]
    fn errors_name_the_file_given() {
        let message = Config::parse(
            "[[route]]\nname = 5\n",
            Path::new("examples/mplex-routes.toml"),
        )
        .unwrap_err()
        .to_string();
        assert!(
            message.starts_with("examples/mplex-routes.toml:2: "),
            "{message}"
        );
    }
}
