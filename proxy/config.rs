//! routes.toml: parsed, validated, and described.
//!
//! This module owns the file format (README's "routes.toml" documents it) and every
//! check on it. A [`Config`] that comes out of [`Config::parse`] is consistent: every
//! route has a name no other route has, at least one backend, and either matchers or
//! `default = true`; at most one route is the default; every matcher can be decided within
//! `first_message_max` bytes. A typo must not silently change routing, so unknown keys
//! are errors, and every error names the file, the line and the key.

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;
use toml::de::{DeString, DeTable, DeValue};

use crate::backend::HealthCheck;
use crate::balance::{Balance, MAX_WEIGHT, ParseBalanceError, WeightedBackend};
use crate::proxy_protocol::{ParseProxyProtocolError, ProxyProtocol};
use crate::route::path::normalize;
use crate::route::{
    HostPattern, HostPatternError, Matcher, MessageRegex, OnUnparsed, PathForm, RegexError,
};

const DEFAULT_FIRST_MESSAGE_TIMEOUT: Duration = Duration::from_secs(3);
const DEFAULT_FIRST_MESSAGE_MAX: usize = 16 * 1024;
const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// HAProxy's `fall` default: one refused connect is often a restart, three are an outage.
const DEFAULT_HEALTH_FAILS: u32 = 3;
const HEALTH_FAILS_LIMIT: usize = 100;
/// Shorter intervals hammer the backend with connects.
const HEALTH_INTERVAL_MIN: Duration = Duration::from_millis(100);

/// Every connection holds a buffer this large until it is routed.
const FIRST_MESSAGE_MAX_LIMIT: usize = 1024 * 1024;

/// `splice_backlog_max` when the file has none; docs/flow-control.md, "What it costs",
/// has the measurements it was chosen from.
pub const DEFAULT_SPLICE_BACKLOG_MAX: u64 = 16 << 20;

/// Below this a spliced direction would ask for credit every few packets; above it one
/// connection could hold a gigabyte of the host's memory.
const SPLICE_BACKLOG_MAX_RANGE: (usize, usize) = (64 * 1024, 1 << 30);

/// Longer timeouts let silent clients hold connections for hours: a typo, not a wish.
const TIMEOUT_LIMIT: Duration = Duration::from_hours(1);

/// An idle connection may legitimately sit for a day (a database pool, a push channel);
/// beyond a week the limit is a typo.
const IDLE_TIMEOUT_LIMIT: Duration = Duration::from_hours(7 * 24);

/// More connections than any one process can hold open (each is two sockets): a typo.
const MAX_CONNECTIONS_LIMIT: usize = 100_000_000;

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
        /// As `--check` prints a [`HealthCheck`].
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

/// The file as serde sees it: every field spanned so that a value found wrong after
/// parsing can still be reported at its line.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    first_message_timeout: Option<Spanned<DurationText>>,
    first_message_max: Option<Spanned<i64>>,
    connect_timeout: Option<Spanned<DurationText>>,
    health_interval: Option<Spanned<DurationText>>,
    health_fails: Option<Spanned<i64>>,
    max_connections: Option<Spanned<i64>>,
    idle_timeout: Option<Spanned<DurationText>>,
    on_unparsed: Option<Spanned<String>>,
    http_path_normalize: Option<Spanned<bool>>,
    splice_backlog_max: Option<Spanned<i64>>,
    #[serde(default)]
    route: Vec<RawRoute>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRoute {
    name: Spanned<String>,
    prefix: Option<Spanned<String>>,
    at: Option<Spanned<i64>>,
    bytes: Option<Spanned<String>>,
    min_length: Option<Spanned<i64>>,
    max_length: Option<Spanned<i64>>,
    sni: Option<Spanned<String>>,
    alpn: Option<Spanned<Vec<Spanned<String>>>>,
    http_host: Option<Spanned<String>>,
    http_path_prefix: Option<Spanned<String>>,
    regex: Option<Spanned<String>>,
    default: Option<Spanned<bool>>,
    backends: Option<Spanned<Vec<Spanned<RawBackend>>>>,
    balance: Option<Spanned<String>>,
    health_interval: Option<Spanned<DurationText>>,
    health_fails: Option<Spanned<i64>>,
    send_proxy: Option<Spanned<String>>,
    max_connections: Option<Spanned<i64>>,
}

/// One entry of `backends`: `"ip:port"` or `{ addr = "ip:port", weight = N }`.
enum RawBackend {
    Addr(String),
    Table { addr: String, weight: Option<i64> },
}

impl<'de> Deserialize<'de> for RawBackend {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;

        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = RawBackend;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a backend: \"ip:port\" or { addr = \"ip:port\", weight = N }")
            }

            fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<RawBackend, E> {
                Ok(RawBackend::Addr(text.to_owned()))
            }

            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<RawBackend, A::Error> {
                use serde::de::Error;
                const FIELDS: &[&str] = &["addr", "weight"];
                let (mut addr, mut weight) = (None, None);
                while let Some(key) = map.next_key::<String>()? {
                    match key.as_str() {
                        "addr" if addr.is_none() => addr = Some(map.next_value::<String>()?),
                        "weight" if weight.is_none() => weight = Some(map.next_value::<i64>()?),
                        "addr" => return Err(A::Error::duplicate_field("addr")),
                        "weight" => return Err(A::Error::duplicate_field("weight")),
                        _ => return Err(A::Error::unknown_field(&key, FIELDS)),
                    }
                }
                let addr = addr.ok_or_else(|| A::Error::missing_field("addr"))?;
                Ok(RawBackend::Table { addr, weight })
            }
        }

        deserializer.deserialize_any(Visitor)
    }
}

/// A duration as written. A string type of its own so that `connect_timeout = 2` is
/// answered with what a duration looks like rather than just "expected a string".
struct DurationText(String);

impl<'de> Deserialize<'de> for DurationText {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;

        impl serde::de::Visitor<'_> for Visitor {
            type Value = DurationText;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a duration string such as \"250ms\", \"3s\" or \"1m\"")
            }

            fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<DurationText, E> {
                Ok(DurationText(text.to_owned()))
            }
        }

        deserializer.deserialize_str(Visitor)
    }
}

/// The text being parsed and the file it came from, for errors.
struct Source<'a> {
    text: &'a str,
    file: &'a Path,
}

impl Source<'_> {
    fn invalid(&self, span: Range<usize>, place: Place, problem: Problem) -> ConfigError {
        let line = line_at(self.text, span.start);
        ConfigError::Invalid(Box::new(Invalid {
            file: self.file.to_owned(),
            line,
            place,
            problem,
        }))
    }

    /// A toml or serde error, placed by its span.
    fn toml_error(
        &self,
        error: &toml::de::Error,
        document: &Spanned<DeTable<'_>>,
        problem: fn(String) -> Problem,
    ) -> ConfigError {
        let span = error.span().unwrap_or(0..0);
        let mut place = place_of(self.text, document.get_ref(), span.start);
        // toml names a duplicate key only by its span.
        if place.key.is_none() && error.message() == "duplicate key" {
            place.key = self.text.get(span.clone()).map(str::to_owned);
        }
        self.invalid(span, place, problem(error.message().to_owned()))
    }

    fn validate(&self, raw: RawConfig) -> Result<Config, ConfigError> {
        let first_message_timeout = self.timeout(
            raw.first_message_timeout,
            "first_message_timeout",
            DEFAULT_FIRST_MESSAGE_TIMEOUT,
        )?;
        let connect_timeout = self.timeout(
            raw.connect_timeout,
            "connect_timeout",
            DEFAULT_CONNECT_TIMEOUT,
        )?;
        let idle_timeout = match raw.idle_timeout {
            // "0s" says "never" as plainly as leaving the key out.
            Some(value)
                if humantime::parse_duration(&value.get_ref().0).is_ok_and(|d| d.is_zero()) =>
            {
                None
            }
            value => value
                .map(|value| {
                    self.duration_within(value, "idle_timeout", IDLE_TIMEOUT_LIMIT, "168h")
                })
                .transpose()?,
        };
        let max_connections = raw
            .max_connections
            .map(|value| self.max_connections(&value, Place::key("max_connections")))
            .transpose()?;
        let first_message_max = match &raw.first_message_max {
            Some(value) => integer_in(value, 1, FIRST_MESSAGE_MAX_LIMIT).map_err(|problem| {
                self.invalid(value.span(), Place::key("first_message_max"), problem)
            })?,
            None => DEFAULT_FIRST_MESSAGE_MAX,
        };
        let splice_backlog_max = match &raw.splice_backlog_max {
            Some(value) => {
                let (min, max) = SPLICE_BACKLOG_MAX_RANGE;
                integer_in(value, min, max).map_err(|problem| {
                    self.invalid(value.span(), Place::key("splice_backlog_max"), problem)
                })? as u64
            }
            None => DEFAULT_SPLICE_BACKLOG_MAX,
        };

        let interval = (raw.health_interval)
            .map(|value| self.health_interval(value, Place::key("health_interval")))
            .transpose()?;
        let fails = match &raw.health_fails {
            Some(value) => {
                if interval.is_none_or(|interval| interval.is_zero()) {
                    let place = Place::key("health_fails");
                    return Err(self.invalid(value.span(), place, Problem::FailsWithoutInterval));
                }
                self.health_fails(value, Place::key("health_fails"))?
            }
            None => DEFAULT_HEALTH_FAILS,
        };
        let health = HealthDefaults {
            interval: interval.unwrap_or(Duration::ZERO),
            fails,
            timeout: connect_timeout,
        };

        let on_unparsed = match &raw.on_unparsed {
            None => OnUnparsed::default(),
            Some(value) => match value.get_ref().as_str() {
                "default" => OnUnparsed::Default,
                "reset" => OnUnparsed::Reset,
                text => {
                    let problem = Problem::NotAnOnUnparsed {
                        text: text.to_owned(),
                    };
                    return Err(self.invalid(value.span(), Place::key("on_unparsed"), problem));
                }
            },
        };
        let path_form = match raw.http_path_normalize.as_ref().map(Spanned::get_ref) {
            Some(false) => PathForm::AsSent,
            Some(true) | None => PathForm::Normalized,
        };

        if raw.route.is_empty() {
            return Err(self.invalid(0..0, Place::key("route"), Problem::NoRoutes));
        }
        let mut routes: Vec<RouteConfig> = Vec::with_capacity(raw.route.len());
        let mut name_lines: HashMap<String, usize> = HashMap::new();
        // The default route so far: its name and the line of its `default = true`.
        let mut default_route: Option<(String, usize)> = None;
        // Each address's health check, with the route and line that first set it.
        let mut checks: HashMap<SocketAddr, (HealthCheck, String, usize)> = HashMap::new();
        for (index, raw_route) in raw.route.into_iter().enumerate() {
            let table = TableSettings {
                first_message_max,
                health,
                path_form,
            };
            let (route, spans) = self.route(index + 1, raw_route, table)?;
            let place = |key: &str| Place::route_key(RouteLabel::Named(route.name.clone()), key);

            if let Some(&first_line) = name_lines.get(&route.name) {
                let problem = Problem::DuplicateName { first_line };
                return Err(self.invalid(spans.name, place("name"), problem));
            }
            name_lines.insert(route.name.clone(), line_at(self.text, spans.name.start));

            if let Some(default_span) = spans.default {
                if let Some((first, first_line)) = &default_route {
                    let problem = Problem::SecondDefault {
                        first: first.clone(),
                        first_line: *first_line,
                    };
                    return Err(self.invalid(default_span, place("default"), problem));
                }
                default_route = Some((route.name.clone(), line_at(self.text, default_span.start)));
            }
            for (backend, span) in route.backends.iter().zip(&spans.backends) {
                let line = line_at(self.text, span.start);
                let first = (route.health, route.name.clone(), line);
                let (there, first_route, first_line) = checks.entry(backend.addr).or_insert(first);
                if *there != route.health {
                    let problem = Problem::HealthConflict {
                        addr: backend.addr,
                        route: first_route.clone(),
                        line: *first_line,
                        there: there.to_string(),
                        here: route.health.to_string(),
                    };
                    return Err(self.invalid(span.clone(), place("backends"), problem));
                }
            }
            routes.push(route);
        }
        Ok(Config {
            first_message_timeout,
            first_message_max,
            connect_timeout,
            health: health.check(),
            max_connections,
            idle_timeout,
            on_unparsed,
            splice_backlog_max,
            routes,
        })
    }

    /// `health_interval`: "0s" turns checks off; otherwise 100ms to 1h.
    fn health_interval(
        &self,
        value: Spanned<DurationText>,
        place: Place,
    ) -> Result<Duration, ConfigError> {
        let span = value.span();
        let DurationText(text) = value.into_inner();
        match humantime::parse_duration(&text) {
            Ok(duration)
                if duration.is_zero()
                    || (HEALTH_INTERVAL_MIN..=TIMEOUT_LIMIT).contains(&duration) =>
            {
                Ok(duration)
            }
            Ok(_) => Err(self.invalid(span, place, Problem::HealthIntervalOutOfRange { text })),
            Err(reason) => Err(self.invalid(span, place, Problem::NotADuration { text, reason })),
        }
    }

    fn health_fails(&self, value: &Spanned<i64>, place: Place) -> Result<u32, ConfigError> {
        let fails = integer_in(value, 1, HEALTH_FAILS_LIMIT)
            .map_err(|problem| self.invalid(value.span(), place, problem))?;
        Ok(u32::try_from(fails).unwrap_or(u32::MAX))
    }

    fn max_connections(&self, value: &Spanned<i64>, place: Place) -> Result<usize, ConfigError> {
        integer_in(value, 1, MAX_CONNECTIONS_LIMIT)
            .map_err(|problem| self.invalid(value.span(), place, problem))
    }

    fn timeout(
        &self,
        value: Option<Spanned<DurationText>>,
        key: &str,
        default: Duration,
    ) -> Result<Duration, ConfigError> {
        let Some(value) = value else {
            return Ok(default);
        };
        self.duration_within(value, key, TIMEOUT_LIMIT, "1h")
    }

    /// A duration more than 0 and at most `limit` (`limit_text` in errors).
    fn duration_within(
        &self,
        value: Spanned<DurationText>,
        key: &str,
        limit: Duration,
        limit_text: &'static str,
    ) -> Result<Duration, ConfigError> {
        let span = value.span();
        let DurationText(text) = value.into_inner();
        match humantime::parse_duration(&text) {
            Ok(duration) if !duration.is_zero() && duration <= limit => Ok(duration),
            Ok(_) => Err(self.invalid(
                span,
                Place::key(key),
                Problem::DurationOutOfRange {
                    text,
                    max: limit_text,
                },
            )),
            Err(reason) => Err(self.invalid(
                span,
                Place::key(key),
                Problem::NotADuration { text, reason },
            )),
        }
    }

    /// One `[[route]]`, with where its `name` and `default = true` are for the checks
    /// across routes.
    fn route(
        &self,
        number: usize,
        raw: RawRoute,
        table: TableSettings,
    ) -> Result<(RouteConfig, RouteSpans), ConfigError> {
        let name_span = raw.name.span();
        let name = raw.name.get_ref().clone();
        if name.is_empty() {
            let place = Place::route_key(RouteLabel::Numbered(number), "name");
            return Err(self.invalid(name_span, place, Problem::EmptyName));
        }
        let check = RouteCheck {
            source: self,
            name: &name,
            first_message_max: table.first_message_max,
            path_form: table.path_form,
        };

        let matchers = check.matchers(&raw)?;
        let default = raw.default.as_ref().filter(|default| *default.get_ref());
        match (default, matchers.first()) {
            (Some(_), Some(first)) => {
                return Err(check.fail(first.span.clone(), first.key, Problem::DefaultWithMatcher));
            }
            (None, None) => {
                let place = Place::route(RouteLabel::Named(name.clone()));
                return Err(self.invalid(name_span, place, Problem::NoMatcher));
            }
            _ => {}
        }

        let (backends, backend_spans) = check.backends(raw.backends, &name_span)?;
        let health = check.health(raw.health_interval, raw.health_fails.as_ref(), table.health)?;
        let balance = match raw.balance {
            Some(balance) => balance
                .get_ref()
                .parse()
                .map_err(|error| check.fail(balance.span(), "balance", Problem::Balance(error)))?,
            None => Balance::default(),
        };
        let send_proxy = raw
            .send_proxy
            .map(|version| {
                (version.get_ref().parse()).map_err(|error| {
                    check.fail(version.span(), "send_proxy", Problem::SendProxy(error))
                })
            })
            .transpose()?;
        let max_connections = raw
            .max_connections
            .map(|value| {
                let place = Place::route_key(RouteLabel::Named(name.clone()), "max_connections");
                self.max_connections(&value, place)
            })
            .transpose()?;

        let spans = RouteSpans {
            name: name_span,
            default: default.map(Spanned::span),
            backends: backend_spans,
        };
        let route = RouteConfig {
            name,
            matchers: matchers.into_iter().map(|found| found.matcher).collect(),
            default: spans.default.is_some(),
            backends,
            balance,
            health,
            send_proxy,
            max_connections,
        };
        Ok((route, spans))
    }
}

/// What the top-level keys give every route.
#[derive(Clone, Copy)]
struct TableSettings {
    first_message_max: usize,
    health: HealthDefaults,
    path_form: PathForm,
}

/// The top-level health keys (or their defaults), which routes inherit key by key.
#[derive(Clone, Copy)]
struct HealthDefaults {
    /// Zero when checks are off.
    interval: Duration,
    fails: u32,
    timeout: Duration,
}

impl HealthDefaults {
    /// Off is one value, whatever the other keys say, so that routes compare equal.
    fn check(self) -> HealthCheck {
        if self.interval.is_zero() {
            return HealthCheck::OFF;
        }
        HealthCheck {
            interval: self.interval,
            fails: self.fails,
            timeout: self.timeout,
        }
    }
}

/// The byte ranges of a route's keys that the checks across routes report at.
struct RouteSpans {
    name: Range<usize>,
    /// Where `default = true` is, for a default route.
    default: Option<Range<usize>>,
    /// Each entry of `backends`, in order.
    backends: Vec<Range<usize>>,
}

/// The checks on one named `[[route]]`.
struct RouteCheck<'a> {
    source: &'a Source<'a>,
    name: &'a str,
    first_message_max: usize,
    path_form: PathForm,
}

/// A matcher with the key that gave it, so a default route can be told which key to drop.
struct FoundMatcher {
    matcher: Matcher,
    key: &'static str,
    span: Range<usize>,
}

impl RouteCheck<'_> {
    fn fail(&self, span: Range<usize>, key: &str, problem: Problem) -> ConfigError {
        let place = Place::route_key(RouteLabel::Named(self.name.to_owned()), key);
        self.source.invalid(span, place, problem)
    }

    fn matchers(&self, raw: &RawRoute) -> Result<Vec<FoundMatcher>, ConfigError> {
        let mut found = Vec::new();
        if let Some(prefix) = &raw.prefix {
            let bytes = self.nonempty_bytes(prefix, "prefix")?;
            self.within_first_message_max(bytes.len(), prefix.span(), "prefix")?;
            found.push(FoundMatcher {
                matcher: Matcher::Prefix(bytes),
                key: "prefix",
                span: prefix.span(),
            });
        }

        match (&raw.at, &raw.bytes) {
            (Some(at), Some(bytes)) => {
                let offset = self.integer_in(at, "at", 0, self.first_message_max)?;
                let bytes = self.nonempty_bytes(bytes, "bytes")?;
                self.within_first_message_max(offset.saturating_add(bytes.len()), at.span(), "at")?;
                found.push(FoundMatcher {
                    matcher: Matcher::At { offset, bytes },
                    key: "at",
                    span: at.span(),
                });
            }
            (Some(at), None) => return Err(self.fail(at.span(), "at", Problem::AtWithoutBytes)),
            (None, Some(bytes)) => {
                return Err(self.fail(bytes.span(), "bytes", Problem::BytesWithoutAt));
            }
            (None, None) => {}
        }

        found.extend(self.length(raw)?);
        found.extend(self.protocol_matchers(raw)?);
        Ok(found)
    }

    fn length(&self, raw: &RawRoute) -> Result<Option<FoundMatcher>, ConfigError> {
        let min = (raw.min_length.as_ref())
            .map(|min| self.integer_in(min, "min_length", 0, self.first_message_max))
            .transpose()?;
        let max = (raw.max_length.as_ref())
            .map(|max| self.integer_in(max, "max_length", 1, self.first_message_max))
            .transpose()?;
        let (key, given) = match (&raw.min_length, &raw.max_length) {
            (Some(min_length), _) => ("min_length", min_length),
            (None, Some(max_length)) => ("max_length", max_length),
            (None, None) => return Ok(None),
        };
        if let (Some(min), Some(max)) = (min, max)
            && min > max
        {
            return Err(self.fail(given.span(), key, Problem::MinAboveMax { min, max }));
        }
        Ok(Some(FoundMatcher {
            matcher: Matcher::Length {
                min: min.unwrap_or(0),
                max: max.unwrap_or(usize::MAX),
            },
            key,
            span: given.span(),
        }))
    }

    /// sni, alpn, http_host, http_path_prefix and regex, in that order: after the byte
    /// matchers, which are cheaper and so tried first.
    fn protocol_matchers(&self, raw: &RawRoute) -> Result<Vec<FoundMatcher>, ConfigError> {
        let mut found = Vec::new();
        let mut push = |matcher, key, span| found.push(FoundMatcher { matcher, key, span });
        if let Some(sni) = &raw.sni {
            push(
                Matcher::Sni(self.host_pattern(sni, "sni")?),
                "sni",
                sni.span(),
            );
        }
        if let Some(alpn) = &raw.alpn {
            push(Matcher::Alpn(self.alpn(alpn)?), "alpn", alpn.span());
        }
        if let Some(host) = &raw.http_host {
            let pattern = self.host_pattern(host, "http_host")?;
            push(Matcher::HttpHost(pattern), "http_host", host.span());
        }
        if let Some(prefix) = &raw.http_path_prefix {
            let text = prefix.get_ref();
            if !text.starts_with('/') || text.contains(|c: char| c == ' ' || c.is_control()) {
                let problem = Problem::NotAPathPrefix { text: text.clone() };
                return Err(self.fail(prefix.span(), "http_path_prefix", problem));
            }
            if self.path_form == PathForm::Normalized {
                let normalized = normalize(text);
                if normalized != text.as_str() {
                    let problem = Problem::PathPrefixNotNormalized {
                        text: text.clone(),
                        normalized: normalized.into_owned(),
                    };
                    return Err(self.fail(prefix.span(), "http_path_prefix", problem));
                }
            }
            let matcher = Matcher::HttpPathPrefix {
                prefix: text.clone(),
                form: self.path_form,
            };
            push(matcher, "http_path_prefix", prefix.span());
        }
        if let Some(regex) = &raw.regex {
            let compiled = MessageRegex::new(regex.get_ref())
                .map_err(|error| self.fail(regex.span(), "regex", Problem::Regex(error)))?;
            push(Matcher::Regex(compiled), "regex", regex.span());
        }

        let tls_key = found
            .iter()
            .map(|m| m.key)
            .find(|k| ["sni", "alpn"].contains(k));
        let http = (found.iter()).find(|m| ["http_host", "http_path_prefix"].contains(&m.key));
        if let (Some(tls), Some(http)) = (tls_key, http) {
            let problem = Problem::TlsAndHttp {
                tls,
                http: http.key,
            };
            return Err(self.fail(http.span.clone(), http.key, problem));
        }
        Ok(found)
    }

    fn host_pattern(&self, text: &Spanned<String>, key: &str) -> Result<HostPattern, ConfigError> {
        HostPattern::parse(text.get_ref()).map_err(|reason| {
            let text_value = text.get_ref().clone();
            let problem = Problem::NotAHostPattern {
                text: text_value,
                reason,
            };
            self.fail(text.span(), key, problem)
        })
    }

    fn alpn(&self, list: &Spanned<Vec<Spanned<String>>>) -> Result<Vec<Vec<u8>>, ConfigError> {
        if list.get_ref().is_empty() {
            return Err(self.fail(list.span(), "alpn", Problem::EmptyAlpn));
        }
        (list.get_ref().iter())
            .map(|name| {
                let bytes = name.get_ref().as_bytes();
                if (1..=255).contains(&bytes.len()) {
                    Ok(bytes.to_vec())
                } else {
                    let text = name.get_ref().clone();
                    Err(self.fail(name.span(), "alpn", Problem::NotAnAlpnName { text }))
                }
            })
            .collect()
    }

    fn integer_in(
        &self,
        value: &Spanned<i64>,
        key: &str,
        min: usize,
        max: usize,
    ) -> Result<usize, ConfigError> {
        integer_in(value, min, max).map_err(|problem| self.fail(value.span(), key, problem))
    }

    fn nonempty_bytes(&self, text: &Spanned<String>, key: &str) -> Result<Vec<u8>, ConfigError> {
        if text.get_ref().is_empty() {
            return Err(self.fail(text.span(), key, Problem::EmptyBytes));
        }
        Ok(text.get_ref().as_bytes().to_vec())
    }

    /// A matcher that needs more bytes than are ever read could never match.
    fn within_first_message_max(
        &self,
        needed: usize,
        span: Range<usize>,
        key: &str,
    ) -> Result<(), ConfigError> {
        if needed > self.first_message_max {
            let problem = Problem::BeyondFirstMessageMax {
                needed,
                max: self.first_message_max,
            };
            return Err(self.fail(span, key, problem));
        }
        Ok(())
    }

    /// The route's own `health_interval` and `health_fails`, over the top-level ones.
    fn health(
        &self,
        interval: Option<Spanned<DurationText>>,
        fails: Option<&Spanned<i64>>,
        top: HealthDefaults,
    ) -> Result<HealthCheck, ConfigError> {
        let place = |key: &str| Place::route_key(RouteLabel::Named(self.name.to_owned()), key);
        let interval = match interval {
            Some(value) => self
                .source
                .health_interval(value, place("health_interval"))?,
            None => top.interval,
        };
        let fails = match fails {
            Some(value) if interval.is_zero() => {
                return Err(self.fail(value.span(), "health_fails", Problem::FailsWithoutInterval));
            }
            Some(value) => self.source.health_fails(value, place("health_fails"))?,
            None => top.fails,
        };
        let health = HealthDefaults {
            interval,
            fails,
            timeout: top.timeout,
        };
        Ok(health.check())
    }

    fn backends(
        &self,
        raw: Option<Spanned<Vec<Spanned<RawBackend>>>>,
        name_span: &Range<usize>,
    ) -> Result<(Vec<WeightedBackend>, Vec<Range<usize>>), ConfigError> {
        let Some(raw) = raw else {
            return Err(self.fail(name_span.clone(), "backends", Problem::NoBackends));
        };
        if raw.get_ref().is_empty() {
            return Err(self.fail(raw.span(), "backends", Problem::NoBackends));
        }
        let mut backends: Vec<WeightedBackend> = Vec::with_capacity(raw.get_ref().len());
        let mut spans = Vec::with_capacity(raw.get_ref().len());
        for entry in raw.into_inner() {
            let span = entry.span();
            let (text, weight) = match entry.into_inner() {
                RawBackend::Addr(text) => (text, None),
                RawBackend::Table { addr, weight } => (addr, weight),
            };
            let addr = match text.parse::<SocketAddr>() {
                Ok(address) if address.port() == 0 => {
                    return Err(self.fail(span, "backends", Problem::PortZero { text }));
                }
                Ok(address) => address,
                Err(_) => {
                    return Err(self.fail(span, "backends", Problem::NotAnAddress { text }));
                }
            };
            let weight = match weight {
                None => 1,
                Some(value) => {
                    let spanned = Spanned::new(span.clone(), value);
                    let weight = self.integer_in(&spanned, "weight", 1, MAX_WEIGHT as usize)?;
                    u32::try_from(weight).unwrap_or(MAX_WEIGHT)
                }
            };
            if backends.iter().any(|b| b.addr == addr) {
                return Err(self.fail(span, "backends", Problem::DuplicateBackend { addr }));
            }
            backends.push(WeightedBackend { addr, weight });
            spans.push(span);
        }
        Ok((backends, spans))
    }
}

fn integer_in(value: &Spanned<i64>, min: usize, max: usize) -> Result<usize, Problem> {
    let number = *value.get_ref();
    usize::try_from(number)
        .ok()
        .filter(|number| (min..=max).contains(number))
        .ok_or(Problem::OutOfRange {
            value: number,
            min,
            max,
        })
}

/// The 1-based line that byte `offset` of `text` is on.
fn line_at(text: &str, offset: usize) -> usize {
    let before = text.as_bytes().get(..offset).unwrap_or(text.as_bytes());
    before.iter().filter(|&&byte| byte == b'\n').count() + 1
}

impl Place {
    fn key(key: &str) -> Place {
        Place {
            route: None,
            key: Some(key.to_owned()),
        }
    }

    fn route(route: RouteLabel) -> Place {
        Place {
            route: Some(route),
            key: None,
        }
    }

    fn route_key(route: RouteLabel, key: &str) -> Place {
        Place {
            route: Some(route),
            key: Some(key.to_owned()),
        }
    }
}

/// The route and key whose text holds byte `offset` of `text`, as far as its parsed
/// `document` tells (after a syntax error it is what toml could recover). A syntax error
/// may lie just past the value toml recovered, so a key also holds the rest of its line.
fn place_of(text: &str, document: &DeTable<'_>, offset: usize) -> Place {
    let holds = |key: &Spanned<DeString<'_>>, value: &Spanned<DeValue<'_>>| {
        let rest_of_key_line = text.get(key.span().start..offset);
        covers(&key.span(), offset)
            || covers(&value.span(), offset)
            || rest_of_key_line.is_some_and(|rest| !rest.contains('\n'))
    };
    let routes = match document.get("route").map(Spanned::get_ref) {
        Some(DeValue::Array(routes)) => &routes[..],
        _ => &[],
    };

    // The span of a `[[route]]` element is its header, so the route whose header last
    // precedes the offset is the one around it.
    let mut enclosing_route = None;
    for (index, route) in routes.iter().enumerate() {
        let label = route_label(route, index + 1);
        if let DeValue::Table(table) = route.get_ref()
            && let Some((key, _)) = table.iter().find(|(key, value)| holds(key, value))
        {
            return Place::route_key(label, key.get_ref());
        }
        if route.span().start <= offset {
            enclosing_route = Some(label);
        }
    }
    let top_level_key = |wanted: fn(&str) -> bool| {
        document
            .iter()
            .find(|(key, value)| wanted(key.get_ref()) && holds(key, value))
            .map(|(key, _)| Place::key(key.get_ref()))
    };
    top_level_key(|key| key != "route")
        .or_else(|| enclosing_route.map(Place::route))
        // Reached when `route` is there but not an array of tables.
        .or_else(|| top_level_key(|key| key == "route"))
        .unwrap_or_default()
}

/// A route by its name if it has a usable one, else by its position.
fn route_label(route: &Spanned<DeValue<'_>>, number: usize) -> RouteLabel {
    match route.get_ref().get("name").map(Spanned::get_ref) {
        Some(DeValue::String(name)) if !name.is_empty() => RouteLabel::Named(name.to_string()),
        _ => RouteLabel::Numbered(number),
    }
}

/// Whether `span` holds `offset`; an empty span holds its start, where toml reports
/// errors at the end of the input.
fn covers(span: &Range<usize>, offset: usize) -> bool {
    span.start <= offset && offset < span.end.max(span.start + 1)
}

/// What `splice-proxy --check` prints: the timeouts, then one line per route in file
/// order, every line ending in a newline.
impl fmt::Display for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "first_message_timeout {}, first_message_max {} bytes, connect_timeout {}, {}",
            humantime::format_duration(self.first_message_timeout),
            self.first_message_max,
            humantime::format_duration(self.connect_timeout),
            self.health,
        )?;
        if let Some(max) = self.max_connections {
            writeln!(f, "max_connections {max}")?;
        }
        if self.splice_backlog_max != DEFAULT_SPLICE_BACKLOG_MAX {
            writeln!(f, "splice_backlog_max {} bytes", self.splice_backlog_max)?;
        }
        if let Some(idle) = self.idle_timeout {
            writeln!(f, "idle_timeout {}", humantime::format_duration(idle))?;
        }
        writeln!(f, "on_unparsed {}", self.on_unparsed)?;
        for route in &self.routes {
            writeln!(f, "{route}")?;
        }
        Ok(())
    }
}

/// `route "tag-600": at 20 = "600", length 290..=294 -> 127.0.0.1:5001, 127.0.0.1:5002
/// weight 3 (round-robin; health_interval 2s, health_fails 3)`
impl fmt::Display for RouteConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "route {:?}: ", self.name)?;
        let mut tests = Vec::with_capacity(self.matchers.len() + 1);
        if self.default {
            tests.push("default".to_owned());
        }
        tests.extend(self.matchers.iter().map(Matcher::to_string));
        f.write_str(&tests.join(", "))?;
        let backends: Vec<String> = self.backends.iter().map(|b| b.to_string()).collect();
        write!(
            f,
            " -> {} ({}; {}",
            backends.join(", "),
            self.balance,
            self.health
        )?;
        match self.send_proxy {
            Some(version) => write!(f, "; send_proxy {version})"),
            None => f.write_str(")"),
        }?;
        if let Some(max) = self.max_connections {
            write!(f, ", max_connections {max}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A file from its lines, so that a test can count lines by index.
    fn file(lines: &[&str]) -> String {
        lines.join("\n") + "\n"
    }

    fn parse(lines: &[&str]) -> Result<Config, ConfigError> {
        Config::parse(&file(lines), Path::new("routes.toml"))
    }

    /// Asserts that the file is refused with a message that starts with the file name,
    /// `line` and `place` (the route and key), and goes on to say `says`.
    #[track_caller]
    fn assert_refused(lines: &[&str], line: usize, place: &str, says: &str) {
        let message = parse(lines).unwrap_err().to_string();
        let expected_start = format!("routes.toml:{line}: {place}");
        assert!(
            message.starts_with(&expected_start),
            "{message:?} should start with {expected_start:?}"
        );
        assert!(message.contains(says), "{message:?} should say {says:?}");
    }

    fn backend(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    #[test]
    fn defaults_when_keys_are_absent() {
        let config = parse(&[
            "[[route]]",
            r#"name = "web""#,
            r#"prefix = "GET ""#,
            r#"backends = ["127.0.0.1:9001"]"#,
        ])
        .unwrap();
        assert_eq!(config.first_message_timeout, Duration::from_secs(3));
        assert_eq!(config.first_message_max, 16384);
        assert_eq!(config.connect_timeout, Duration::from_secs(2));
        assert_eq!(config.max_connections, None);
        assert_eq!(config.idle_timeout, None);
        assert_eq!(
            config.routes,
            [RouteConfig {
                name: "web".to_owned(),
                matchers: vec![Matcher::Prefix(b"GET ".to_vec())],
                default: false,
                backends: vec![backend(9001).into()],
                balance: Balance::RoundRobin,
                health: HealthCheck::OFF,
                send_proxy: None,
                max_connections: None,
            }]
        );
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
    fn duration_forms() {
        for (text, duration) in [
            ("250ms", Duration::from_millis(250)),
            ("3s", Duration::from_secs(3)),
            ("1m", Duration::from_secs(60)),
            ("1m 30s", Duration::from_secs(90)),
            ("1h", Duration::from_secs(3600)),
        ] {
            let config = parse(&[
                &format!("first_message_timeout = {text:?}"),
                &format!("connect_timeout = {text:?}"),
                "[[route]]",
                r#"name = "web""#,
                r#"prefix = "GET ""#,
                r#"backends = ["127.0.0.1:9001"]"#,
            ])
            .unwrap();
            assert_eq!(config.first_message_timeout, duration, "{text}");
            assert_eq!(config.connect_timeout, duration, "{text}");
        }
    }

    #[test]
    fn length_alone() {
        let route = |length: &str| {
            parse(&[
                "[[route]]",
                r#"name = "short""#,
                length,
                r#"backends = ["127.0.0.1:9001"]"#,
            ])
            .unwrap()
            .routes
            .remove(0)
            .matchers
        };
        assert_eq!(
            route("min_length = 3"),
            [Matcher::Length {
                min: 3,
                max: usize::MAX
            }]
        );
        assert_eq!(
            route("max_length = 3"),
            [Matcher::Length { min: 0, max: 3 }]
        );
    }

    #[test]
    fn refuses_toml_syntax_errors() {
        assert_refused(
            &[
                "[[route]]",
                r#"name = "web""#,
                "prefix = GET",
                r#"backends = ["127.0.0.1:9001"]"#,
            ],
            3,
            r#"route "web": key "prefix": "#,
            "TOML syntax: ",
        );
        assert_refused(
            &[r#"connect_timeout = "2s""#, "[[route]", r#"name = "web""#],
            2,
            "",
            "TOML syntax: ",
        );
        assert_refused(
            &[
                "[[route]]",
                r#"name = "web"#,
                r#"backends = ["127.0.0.1:9001"]"#,
            ],
            2,
            r#"route "web": key "name": "#,
            "TOML syntax: ",
        );
        assert_refused(
            &["[[route]]", r#"name = "web""#, r#"name = "api""#],
            3,
            r#"route "web": key "name": "#,
            "TOML syntax: duplicate key",
        );
    }

    #[test]
    fn refuses_unknown_keys() {
        assert_refused(
            &["first_mesage_max = 10", "[[route]]"],
            1,
            r#"key "first_mesage_max": "#,
            "unknown field `first_mesage_max`",
        );
        // The route's name is found even when the typo comes before it.
        assert_refused(
            &[
                "[[route]]",
                r#"prefx = "GET ""#,
                r#"name = "web""#,
                r#"backends = ["127.0.0.1:9001"]"#,
            ],
            2,
            r#"route "web": key "prefx": "#,
            "unknown field `prefx`",
        );
        assert_refused(
            &[
                "[[route]]",
                r#"name = "web""#,
                "[route.matcher]",
                r#"prefix = "x""#,
            ],
            3,
            r#"route "web": key "matcher": "#,
            "unknown field `matcher`",
        );
    }

    #[test]
    fn refuses_wrong_types() {
        assert_refused(
            &[r#"first_message_max = "16k""#],
            1,
            r#"key "first_message_max": "#,
            "invalid type: string \"16k\"",
        );
        assert_refused(
            &["[[route]]", r#"name = "web""#, r#"default = "yes""#],
            3,
            r#"route "web": key "default": "#,
            "expected a boolean",
        );
        assert_refused(
            &[
                "[[route]]",
                r#"name = "web""#,
                r#"backends = "127.0.0.1:9001""#,
            ],
            3,
            r#"route "web": key "backends": "#,
            "expected a sequence",
        );
        assert_refused(
            &[
                "[[route]]",
                r#"name = "web""#,
                "backends = [",
                r#"  "127.0.0.1:9001","#,
                "  9002,",
                "]",
            ],
            5,
            r#"route "web": key "backends": "#,
            "invalid type: integer `9002`",
        );
        assert_refused(
            &["[[route]]", "name = 5"],
            2,
            r#"route #1: key "name": "#,
            "expected a string",
        );
        assert_refused(
            &["[route]", r#"name = "web""#],
            1,
            r#"key "route": "#,
            "expected a sequence",
        );
        assert_refused(
            &["connect_timeout = 2"],
            1,
            r#"key "connect_timeout": "#,
            r#"expected a duration string such as "250ms""#,
        );
    }

    #[test]
    fn refuses_a_route_without_a_name() {
        assert_refused(
            &[
                "[[route]]",
                r#"name = "web""#,
                r#"prefix = "GET ""#,
                r#"backends = ["127.0.0.1:9001"]"#,
                "[[route]]",
                r#"prefix = "PUT ""#,
                r#"backends = ["127.0.0.1:9001"]"#,
            ],
            5,
            "route #2: ",
            "missing field `name`",
        );
        assert_refused(
            &[
                "[[route]]",
                r#"prefix = "GET ""#,
                r#"backends = ["127.0.0.1:9001"]"#,
            ],
            1,
            "route #1: ",
            "missing field `name`",
        );
        assert_refused(
            &["[[route]]", r#"name = """#],
            2,
            r#"route #1: key "name": "#,
            "cannot be empty",
        );
    }

    #[test]
    fn refuses_bad_durations() {
        for (text, says) in [
            (
                "3x",
                r#""3x" is not a duration such as "250ms", "3s" or "1m": unknown time unit "x""#,
            ),
            ("3", "time unit needed"),
            ("", "value was empty"),
            (
                "0s",
                r#""0s" is out of range: must be more than 0 and at most 1h"#,
            ),
            ("2h", "out of range"),
        ] {
            assert_refused(
                &[
                    r#"connect_timeout = "1s""#,
                    &format!("first_message_timeout = {text:?}"),
                ],
                2,
                r#"key "first_message_timeout": "#,
                says,
            );
        }
    }

    #[test]
    fn idle_timeout_zero_is_off_and_long_ones_are_refused() {
        let idle = |text: &str| {
            parse(&[
                &format!("idle_timeout = {text:?}"),
                "[[route]]",
                r#"name = "web""#,
                r#"prefix = "GET ""#,
                r#"backends = ["127.0.0.1:9001"]"#,
            ])
            .map(|config| config.idle_timeout)
        };
        assert_eq!(idle("0s").unwrap(), None);
        assert_eq!(idle("24h").unwrap(), Some(Duration::from_hours(24)));
        assert_refused(
            &[r#"idle_timeout = "169h""#],
            1,
            r#"key "idle_timeout": "#,
            r#""169h" is out of range: must be more than 0 and at most 168h"#,
        );
        assert_refused(
            &[r#"idle_timeout = "soon""#],
            1,
            r#"key "idle_timeout": "#,
            "is not a duration",
        );
    }

    #[test]
    fn splice_backlog_max_is_bytes_within_its_range() {
        let route = "[[route]]\nname = \"all\"\ndefault = true\nbackends = [\"127.0.0.1:9001\"]\n";
        let default = Config::parse(route, Path::new("routes.toml")).unwrap();
        assert_eq!(default.splice_backlog_max, DEFAULT_SPLICE_BACKLOG_MAX);
        let text = format!("splice_backlog_max = 262144\n{route}");
        let set = Config::parse(&text, Path::new("routes.toml")).unwrap();
        assert_eq!(set.splice_backlog_max, 262_144);
        assert!(
            set.to_string()
                .contains("splice_backlog_max 262144 bytes\n")
        );
        for value in ["65535", "1073741825", "-1"] {
            assert_refused(
                &[&format!("splice_backlog_max = {value}")],
                1,
                r#"key "splice_backlog_max": "#,
                &format!("{value} is out of range: must be 65536..=1073741824"),
            );
        }
    }

    #[test]
    fn refuses_max_connections_out_of_range() {
        for value in ["0", "-1", "100000001"] {
            assert_refused(
                &[&format!("max_connections = {value}")],
                1,
                r#"key "max_connections": "#,
                &format!("{value} is out of range: must be 1..=100000000"),
            );
            assert_refused(
                &[
                    "[[route]]",
                    r#"name = "web""#,
                    r#"prefix = "GET ""#,
                    &format!("max_connections = {value}"),
                    r#"backends = ["127.0.0.1:9001"]"#,
                ],
                4,
                r#"route "web": key "max_connections": "#,
                "is out of range",
            );
        }
    }

    #[test]
    fn refuses_first_message_max_out_of_range() {
        for value in ["0", "1048577", "-1"] {
            assert_refused(
                &[&format!("first_message_max = {value}")],
                1,
                r#"key "first_message_max": "#,
                &format!("{value} is out of range: must be 1..=1048576"),
            );
        }
    }

    #[test]
    fn refuses_missing_or_empty_backends() {
        assert_refused(
            &["[[route]]", r#"name = "web""#, r#"prefix = "GET ""#],
            2,
            r#"route "web": key "backends": "#,
            "no backends",
        );
        assert_refused(
            &[
                "[[route]]",
                r#"name = "web""#,
                r#"prefix = "GET ""#,
                "backends = []",
            ],
            4,
            r#"route "web": key "backends": "#,
            "no backends",
        );
    }

    #[test]
    fn refuses_bad_backend_addresses() {
        let route = |backends: &str| {
            [
                "[[route]]",
                r#"name = "web""#,
                r#"prefix = "GET ""#,
                backends,
            ]
            .map(str::to_owned)
        };
        let message = parse(
            &route(r#"backends = ["127.0.0.1"]"#)
                .each_ref()
                .map(String::as_str),
        )
        .unwrap_err()
        .to_string();
        assert_eq!(
            message,
            r#"routes.toml:4: route "web": key "backends": "127.0.0.1" is not an address (expected ip:port, e.g. 127.0.0.1:9001; host names are not resolved)"#
        );
        assert_refused(
            &route(r#"backends = ["localhost:9001"]"#)
                .each_ref()
                .map(String::as_str),
            4,
            r#"route "web": key "backends": "#,
            r#""localhost:9001" is not an address"#,
        );
        assert_refused(
            &route(r#"backends = ["127.0.0.1:0"]"#)
                .each_ref()
                .map(String::as_str),
            4,
            r#"route "web": key "backends": "#,
            "port 0",
        );
    }

    #[test]
    fn refuses_duplicate_route_names() {
        assert_refused(
            &[
                "[[route]]",
                r#"name = "web""#,
                r#"prefix = "GET ""#,
                r#"backends = ["127.0.0.1:9001"]"#,
                "[[route]]",
                r#"name = "web""#,
                r#"prefix = "PUT ""#,
                r#"backends = ["127.0.0.1:9002"]"#,
            ],
            6,
            r#"route "web": key "name": "#,
            "already used on line 2",
        );
    }

    #[test]
    fn refuses_a_route_without_matcher_unless_default() {
        for default in [&[][..], &["default = false"][..]] {
            let mut lines = vec!["[[route]]", r#"name = "web""#];
            lines.extend_from_slice(default);
            lines.push(r#"backends = ["127.0.0.1:9001"]"#);
            assert_refused(
                &lines,
                2,
                r#"route "web": "#,
                "no matcher: give prefix, at + bytes",
            );
        }
    }

    #[test]
    fn refuses_a_default_route_with_matchers() {
        assert_refused(
            &[
                "[[route]]",
                r#"name = "fallback""#,
                "default = true",
                "min_length = 4",
                r#"backends = ["127.0.0.1:9009"]"#,
            ],
            4,
            r#"route "fallback": key "min_length": "#,
            "a default route takes what no other route matched",
        );
    }

    #[test]
    fn refuses_a_second_default_route() {
        assert_refused(
            &[
                "[[route]]",
                r#"name = "a""#,
                "default = true",
                r#"backends = ["127.0.0.1:9001"]"#,
                "[[route]]",
                r#"name = "b""#,
                r#"backends = ["127.0.0.1:9002"]"#,
                "default = true",
            ],
            8,
            r#"route "b": key "default": "#,
            r#"route "a" on line 3 is already the default"#,
        );
    }

    #[test]
    fn refuses_at_and_bytes_apart() {
        let route = |matcher: &'static str| {
            [
                "[[route]]",
                r#"name = "tag""#,
                matcher,
                r#"backends = ["127.0.0.1:9001"]"#,
            ]
        };
        assert_refused(
            &route("at = 20"),
            3,
            r#"route "tag": key "at": "#,
            r#""at" needs "bytes""#,
        );
        assert_refused(
            &route(r#"bytes = "600""#),
            3,
            r#"route "tag": key "bytes": "#,
            r#""bytes" needs "at""#,
        );
    }

    #[test]
    fn refuses_empty_prefix_and_bytes() {
        let route = |matcher: &'static str| {
            [
                "[[route]]",
                r#"name = "web""#,
                matcher,
                r#"backends = ["127.0.0.1:9001"]"#,
            ]
        };
        assert_refused(
            &route(r#"prefix = """#),
            3,
            r#"route "web": key "prefix": "#,
            "empty string",
        );
        assert_refused(
            &[
                "[[route]]",
                r#"name = "web""#,
                "at = 2",
                r#"bytes = """#,
                r#"backends = ["127.0.0.1:9001"]"#,
            ],
            4,
            r#"route "web": key "bytes": "#,
            "empty string",
        );
    }

    #[test]
    fn refuses_matchers_that_could_never_match() {
        assert_refused(
            &[
                "first_message_max = 4",
                "[[route]]",
                r#"name = "hello""#,
                r#"prefix = "HELLO""#,
                r#"backends = ["127.0.0.1:9001"]"#,
            ],
            4,
            r#"route "hello": key "prefix": "#,
            "needs the first 5 bytes of the message but first_message_max is 4",
        );
        assert_refused(
            &[
                "[[route]]",
                r#"name = "tag""#,
                "at = 16383",
                r#"bytes = "60""#,
                r#"backends = ["127.0.0.1:9001"]"#,
            ],
            3,
            r#"route "tag": key "at": "#,
            "needs the first 16385 bytes",
        );
        assert_refused(
            &[
                "[[route]]",
                r#"name = "tag""#,
                "at = -1",
                r#"bytes = "60""#,
                r#"backends = ["127.0.0.1:9001"]"#,
            ],
            3,
            r#"route "tag": key "at": "#,
            "-1 is out of range: must be 0..=16384",
        );
        assert_refused(
            &[
                "[[route]]",
                r#"name = "long""#,
                "min_length = 20000",
                r#"backends = ["127.0.0.1:9001"]"#,
            ],
            3,
            r#"route "long": key "min_length": "#,
            "20000 is out of range: must be 0..=16384",
        );
        assert_refused(
            &[
                "[[route]]",
                r#"name = "none""#,
                "max_length = 0",
                r#"backends = ["127.0.0.1:9001"]"#,
            ],
            3,
            r#"route "none": key "max_length": "#,
            "0 is out of range: must be 1..=16384",
        );
        assert_refused(
            &[
                "[[route]]",
                r#"name = "tag""#,
                "min_length = 294",
                "max_length = 290",
                r#"backends = ["127.0.0.1:9001"]"#,
            ],
            3,
            r#"route "tag": key "min_length": "#,
            "min_length 294 is more than max_length 290",
        );
    }

    #[test]
    fn refuses_unknown_balance() {
        let route = |balance: &'static str| {
            [
                "[[route]]",
                r#"name = "web""#,
                r#"prefix = "GET ""#,
                r#"backends = ["127.0.0.1:9001", "127.0.0.1:9002"]"#,
                balance,
            ]
        };
        assert_refused(
            &route(r#"balance = "roundrobin""#),
            5,
            r#"route "web": key "balance": "#,
            r#""roundrobin" is not a balance policy"#,
        );
        for (text, policy) in [
            ("round-robin", Balance::RoundRobin),
            ("least-conn", Balance::LeastConn),
            ("source-hash", Balance::SourceHash),
        ] {
            let balance = format!("balance = {text:?}");
            let mut lines = route("").to_vec();
            lines[4] = &balance;
            assert_eq!(parse(&lines).unwrap().routes[0].balance, policy);
        }
    }

    #[test]
    fn backends_take_weights_in_either_form() {
        let config = parse(&[
            "[[route]]",
            r#"name = "web""#,
            r#"prefix = "GET ""#,
            r#"backends = ["127.0.0.1:9001", { addr = "127.0.0.1:9002", weight = 3 },"#,
            r#"    { addr = "[::1]:9003" }, { weight = 1000, addr = "127.0.0.1:9004" }]"#,
        ])
        .unwrap();
        let weights: Vec<(u16, u32)> = (config.routes[0].backends.iter())
            .map(|b| (b.addr.port(), b.weight))
            .collect();
        assert_eq!(weights, [(9001, 1), (9002, 3), (9003, 1), (9004, 1000)]);
        assert!(
            config.to_string().contains(
                "127.0.0.1:9001, 127.0.0.1:9002 weight 3, [::1]:9003, 127.0.0.1:9004 weight 1000 (round-robin; health off)"
            ),
            "{config}"
        );
    }

    #[test]
    fn health_keys_at_the_top_and_per_route() {
        let config = parse(&[
            r#"health_interval = "2s""#,
            "health_fails = 2",
            r#"connect_timeout = "500ms""#,
            "[[route]]",
            r#"name = "inherits""#,
            r#"prefix = "a""#,
            r#"backends = ["127.0.0.1:9001"]"#,
            "[[route]]",
            r#"name = "own""#,
            r#"prefix = "b""#,
            r#"health_interval = "250ms""#,
            r#"backends = ["127.0.0.1:9002"]"#,
            "[[route]]",
            r#"name = "off""#,
            r#"prefix = "c""#,
            r#"health_interval = "0s""#,
            r#"backends = ["127.0.0.1:9003"]"#,
        ])
        .unwrap();
        let check = |ms, fails| HealthCheck {
            interval: Duration::from_millis(ms),
            fails,
            timeout: Duration::from_millis(500),
        };
        assert_eq!(config.health, check(2000, 2));
        assert_eq!(config.routes[0].health, check(2000, 2));
        assert_eq!(config.routes[1].health, check(250, 2));
        assert_eq!(config.routes[2].health, HealthCheck::OFF);
        let shown = config.to_string();
        assert!(
            shown.contains("connect_timeout 500ms, health_interval 2s, health_fails 2\n"),
            "{shown}"
        );
        assert!(
            shown.contains("127.0.0.1:9002 (round-robin; health_interval 250ms, health_fails 2)"),
            "{shown}"
        );
        assert!(
            shown.contains("127.0.0.1:9003 (round-robin; health off)"),
            "{shown}"
        );

        // Without a top-level interval, a route's own turns checks on, 3 fails by default.
        let config = parse(&[
            "[[route]]",
            r#"name = "own""#,
            r#"prefix = "b""#,
            r#"health_interval = "1s""#,
            r#"backends = ["127.0.0.1:9002"]"#,
        ])
        .unwrap();
        assert_eq!(config.health, HealthCheck::OFF);
        assert_eq!(config.routes[0].health.fails, 3);
        assert_eq!(config.routes[0].health.interval, Duration::from_secs(1));
    }

    #[test]
    fn send_proxy_takes_v1_or_v2() {
        let route = |value: &str| {
            let line = format!("send_proxy = {value}");
            parse(&[
                "[[route]]",
                r#"name = "web""#,
                r#"prefix = "GET ""#,
                &line,
                r#"backends = ["127.0.0.1:9001"]"#,
            ])
        };
        assert_eq!(
            route("\"v1\"").unwrap().routes[0].send_proxy,
            Some(ProxyProtocol::V1)
        );
        let config = route("\"v2\"").unwrap();
        assert_eq!(config.routes[0].send_proxy, Some(ProxyProtocol::V2));
        assert!(
            config
                .to_string()
                .contains("(round-robin; health off; send_proxy v2)\n"),
            "{config}"
        );
        for (value, says) in [
            (
                "\"V2\"",
                r#""V2" is not a PROXY protocol version (expected "v1" or "v2")"#,
            ),
            ("2", "invalid type: integer `2`, expected a string"),
        ] {
            let message = route(value).unwrap_err().to_string();
            assert!(
                message.starts_with(r#"routes.toml:4: route "web": key "send_proxy": "#),
                "{message}"
            );
            assert!(message.contains(says), "{message}");
        }
    }

    #[test]
    fn refuses_bad_health_keys() {
        let route = [
            "[[route]]",
            r#"name = "web""#,
            r#"prefix = "GET ""#,
            r#"backends = ["127.0.0.1:9001"]"#,
        ];
        for (text, says) in [
            (
                "50ms",
                r#""50ms" is out of range: must be "0s" (no health checks) or from 100ms"#,
            ),
            ("2h", r#""2h" is out of range"#),
            ("often", r#""often" is not a duration"#),
        ] {
            let top = format!("health_interval = {text:?}");
            let mut lines = vec![top.as_str()];
            lines.extend(route);
            assert_refused(&lines, 1, r#"key "health_interval": "#, says);
            let mut lines = route.to_vec();
            lines.insert(3, &top);
            assert_refused(&lines, 4, r#"route "web": key "health_interval": "#, says);
        }
        for fails in ["0", "101"] {
            let top = format!("health_fails = {fails}");
            let mut lines = vec![r#"health_interval = "1s""#, top.as_str()];
            lines.extend(route);
            let says = format!("{fails} is out of range: must be 1..=100");
            assert_refused(&lines, 2, r#"key "health_fails": "#, &says);
        }
        let mut lines = vec!["health_fails = 2"];
        lines.extend(route);
        assert_refused(
            &lines,
            1,
            r#"key "health_fails": "#,
            "health_fails counts failed health checks, and there are none",
        );
        let mut lines = route.to_vec();
        lines.insert(3, "health_fails = 2");
        assert_refused(
            &lines,
            4,
            r#"route "web": key "health_fails": "#,
            "set health_interval too",
        );
        assert_refused(
            &[
                r#"health_interval = "1s""#,
                "[[route]]",
                r#"name = "a""#,
                r#"prefix = "a""#,
                r#"backends = ["127.0.0.1:9001", "127.0.0.1:9002"]"#,
                "[[route]]",
                r#"name = "b""#,
                r#"prefix = "b""#,
                "health_fails = 5",
                r#"backends = ["127.0.0.1:9003","#,
                r#"  "127.0.0.1:9002"]"#,
            ],
            11,
            r#"route "b": key "backends": "#,
            "127.0.0.1:9002 is also a backend of route \"a\" (line 5), with health_interval \
             1s, health_fails 3; here it has health_interval 1s, health_fails 5",
        );
    }

    #[test]
    fn refuses_bad_weights_and_backend_tables() {
        let route = |backends: &'static str| {
            [
                "[[route]]",
                r#"name = "web""#,
                r#"prefix = "GET ""#,
                r#"backends = ["127.0.0.1:9001","#,
                backends,
            ]
        };
        for weight in ["0", "1001", "-1"] {
            let line = format!(r#"  {{ addr = "127.0.0.1:9002", weight = {weight} }}]"#);
            let mut lines = route("").to_vec();
            lines[4] = &line;
            assert_refused(
                &lines,
                5,
                r#"route "web": key "weight": "#,
                &format!("{weight} is out of range: must be 1..=1000"),
            );
        }
        assert_refused(
            &route(r#"  { addr = "127.0.0.1:9002", weight = "3" }]"#),
            5,
            r#"route "web": key "backends": "#,
            "invalid type: string \"3\", expected i64",
        );
        assert_refused(
            &route(r#"  { adr = "127.0.0.1:9002" }]"#),
            5,
            r#"route "web": key "backends": "#,
            "unknown field `adr`, expected `addr` or `weight`",
        );
        assert_refused(
            &route(r#"  { weight = 2 }]"#),
            5,
            r#"route "web": key "backends": "#,
            "missing field `addr`",
        );
        assert_refused(
            &route(r#"  { addr = "localhost:9002" }]"#),
            5,
            r#"route "web": key "backends": "#,
            "is not an address",
        );
        assert_refused(
            &route(r#"  { addr = "127.0.0.1:9001", weight = 2 }]"#),
            5,
            r#"route "web": key "backends": "#,
            "127.0.0.1:9001 is listed twice",
        );
        assert_refused(
            &route("  5]"),
            5,
            r#"route "web": key "backends": "#,
            "expected a backend",
        );
    }

    #[test]
    fn accepts_the_protocol_matchers() {
        let config = parse(&[
            "[[route]]",
            r#"name = "tls-a""#,
            r#"sni = "A.Example.com""#,
            r#"alpn = ["h2", "http/1.1"]"#,
            r#"backends = ["127.0.0.1:9001"]"#,
            "[[route]]",
            r#"name = "web""#,
            r#"http_host = "*.example.com""#,
            r#"http_path_prefix = "/api/""#,
            r#"backends = ["127.0.0.1:9002"]"#,
            "[[route]]",
            r#"name = "hello""#,
            r#"prefix = "HELLO ""#,
            r#"regex = '^HELLO v\d+\r\n'"#,
            r#"backends = ["127.0.0.1:9003"]"#,
        ])
        .unwrap();
        let matchers: Vec<Vec<String>> = (config.routes.iter())
            .map(|route| route.matchers.iter().map(Matcher::to_string).collect())
            .collect();
        assert_eq!(
            matchers,
            [
                vec![r#"sni "a.example.com""#, r#"alpn ["h2", "http/1.1"]"#],
                vec![
                    r#"http_host "*.example.com""#,
                    r#"http_path_prefix "/api/""#
                ],
                vec![r#"prefix "HELLO ""#, r"regex '^HELLO v\d+\r\n'"],
            ]
        );
        assert_eq!(
            config.to_string().lines().nth(2),
            Some(
                r#"route "tls-a": sni "a.example.com", alpn ["h2", "http/1.1"] -> 127.0.0.1:9001 (round-robin; health off)"#
            )
        );
    }

    /// A one-route file with `lines` between the name and the backends.
    fn route_with(lines: &[&str]) -> Vec<String> {
        let mut file = vec!["[[route]]".to_owned(), r#"name = "r""#.to_owned()];
        file.extend(lines.iter().map(|line| (*line).to_owned()));
        file.push(r#"backends = ["127.0.0.1:9001"]"#.to_owned());
        file
    }

    #[track_caller]
    fn assert_route_refused(lines: &[&str], line: usize, key: &str, says: &str) {
        let file = route_with(lines);
        let file: Vec<&str> = file.iter().map(String::as_str).collect();
        assert_refused(&file, line, &format!(r#"route "r": key "{key}": "#), says);
    }

    #[test]
    fn refuses_bad_host_patterns() {
        for key in ["sni", "http_host"] {
            for (pattern, says) in [
                ("", "a host name cannot be empty"),
                ("*", "a wildcard is only allowed as the whole first label"),
                ("a.*.com", "a wildcard is only allowed"),
                (
                    "a..com",
                    r#"label "" is empty or longer than 63 characters"#,
                ),
                (
                    "a.example.com:443",
                    r#"label "com:443" has a character other than"#,
                ),
                ("-a.com", r#"label "-a" has a character"#),
            ] {
                let line = format!("{key} = {pattern:?}");
                assert_route_refused(
                    &[&line],
                    3,
                    key,
                    &format!("{pattern:?} is not a host name or \"*.\" and a host name: {says}"),
                );
            }
        }
    }

    #[test]
    fn refuses_bad_alpn_lists() {
        assert_route_refused(&["alpn = []"], 3, "alpn", "an empty list matches no client");
        assert_route_refused(
            &[r#"alpn = ["h2", ""]"#],
            3,
            "alpn",
            r#""" is not an ALPN protocol name: those are 1 to 255 bytes"#,
        );
        let long = format!("alpn = [{:?}]", "x".repeat(256));
        assert_route_refused(&[&long], 3, "alpn", "is not an ALPN protocol name");
        assert_route_refused(&[r#"alpn = "h2""#], 3, "alpn", "expected a sequence");
    }

    #[test]
    fn refuses_bad_path_prefixes() {
        for prefix in ["api", "", "*", "/a b", "/a\\n"] {
            let line = format!("http_path_prefix = \"{prefix}\"");
            assert_route_refused(
                &[&line],
                3,
                "http_path_prefix",
                r#"is not the start of a request path: it must start with "/""#,
            );
        }
    }

    #[test]
    fn refuses_bad_regexes() {
        let file = route_with(&["regex = 'a('"]);
        let file: Vec<&str> = file.iter().map(String::as_str).collect();
        let message = parse(&file).unwrap_err().to_string();
        assert!(
            message.starts_with(r#"routes.toml:3: route "r": key "regex": not a valid regex: "#),
            "{message}"
        );
        // The regex crate's own words, which point at the spot.
        assert!(message.contains("unclosed group"), "{message}");
        assert_route_refused(
            &["regex = 'x*'"],
            3,
            "regex",
            "matches every first message; for a catch-all route use default = true",
        );
    }

    #[test]
    fn refuses_tls_and_http_in_one_route() {
        assert_route_refused(
            &[r#"sni = "a.example.com""#, r#"http_path_prefix = "/""#],
            4,
            "http_path_prefix",
            r#"a first message cannot be both a TLS ClientHello ("sni") and an HTTP request ("http_path_prefix")"#,
        );
        assert_route_refused(
            &[r#"http_host = "a.example.com""#, r#"alpn = ["h2"]"#],
            3,
            "http_host",
            r#"("alpn") and an HTTP request ("http_host")"#,
        );
    }

    #[test]
    fn refuses_a_default_route_with_protocol_matchers() {
        for line in [
            r#"sni = "a.example.com""#,
            r#"alpn = ["h2"]"#,
            r#"http_host = "a.example.com""#,
            r#"http_path_prefix = "/""#,
            "regex = '^a'",
        ] {
            let key = line.split(' ').next().unwrap();
            assert_route_refused(
                &["default = true", line],
                4,
                key,
                "a default route takes what no other route matched",
            );
        }
    }

    #[test]
    fn refuses_a_file_without_routes() {
        assert_refused(&[""], 1, r#"key "route": "#, "no routes");
        assert_refused(
            &[r#"connect_timeout = "1s""#],
            1,
            r#"key "route": "#,
            "no routes",
        );
    }

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

    #[test]
    fn path_prefixes_compare_normalized_paths_unless_told_not_to() {
        let route = [
            "[[route]]",
            r#"name = "deny""#,
            r#"http_path_prefix = "/admin/""#,
            r#"backends = ["127.0.0.1:9001"]"#,
        ];
        let normalized = parse(&route).unwrap();
        let matcher = &normalized.routes[0].matchers[0];
        let expected = Matcher::HttpPathPrefix {
            prefix: "/admin/".to_owned(),
            form: PathForm::Normalized,
        };
        assert_eq!(*matcher, expected);
        assert_eq!(matcher.to_string(), r#"http_path_prefix "/admin/""#);

        let as_sent = parse(&[&["http_path_normalize = false"][..], &route].concat()).unwrap();
        let matcher = &as_sent.routes[0].matchers[0];
        let expected = Matcher::HttpPathPrefix {
            prefix: "/admin/".to_owned(),
            form: PathForm::AsSent,
        };
        assert_eq!(*matcher, expected);
        assert_eq!(
            matcher.to_string(),
            r#"http_path_prefix "/admin/" (as sent)"#
        );
        // As sent, a prefix is compared as it is written, however it is written.
        let dotted = [
            "http_path_normalize = false",
            "[[route]]",
            r#"name = "deny""#,
            r#"http_path_prefix = "/a/../%61dmin/""#,
            r#"backends = ["127.0.0.1:9001"]"#,
        ];
        assert!(parse(&dotted).is_ok());
    }

    #[test]
    fn refuses_prefixes_no_normalized_path_can_start_with() {
        assert_refused(
            &[
                r#"http_path_normalize = "yes""#,
                "[[route]]",
                r#"name = "web""#,
                r#"prefix = "GET ""#,
                r#"backends = ["127.0.0.1:9001"]"#,
            ],
            1,
            r#"key "http_path_normalize": "#,
            "invalid type",
        );
        for (prefix, normalized) in [
            ("/%61dmin/", "/admin/"),
            ("//admin/", "/admin/"),
            ("/api/../admin/", "/admin/"),
            ("/admin/.", "/admin/"),
            ("/a%2fb", "/a%2Fb"),
        ] {
            let lines = [
                "[[route]]",
                r#"name = "deny""#,
                &format!("http_path_prefix = {prefix:?}"),
                r#"backends = ["127.0.0.1:9001"]"#,
            ];
            assert_refused(
                &lines,
                3,
                r#"route "deny": key "http_path_prefix": "#,
                &format!("{prefix:?} can never match: paths are compared normalized"),
            );
            let message = parse(&lines).unwrap_err().to_string();
            assert!(
                message.contains(&format!("normalizes to {normalized:?}")),
                "{message}"
            );
        }
    }

    #[test]
    fn on_unparsed_defaults_to_the_default_route() {
        let route = [
            "[[route]]",
            r#"name = "deny""#,
            r#"http_path_prefix = "/admin/""#,
            r#"backends = ["127.0.0.1:9001"]"#,
        ];
        assert_eq!(parse(&route).unwrap().on_unparsed, OnUnparsed::Default);
        let lenient = parse(&[&[r#"on_unparsed = "default""#][..], &route].concat()).unwrap();
        assert_eq!(lenient.on_unparsed, OnUnparsed::Default);
        assert!(
            lenient.to_string().contains("\non_unparsed default\n"),
            "{lenient}"
        );
        let strict = parse(&[&[r#"on_unparsed = "reset""#][..], &route].concat()).unwrap();
        assert_eq!(strict.on_unparsed, OnUnparsed::Reset);
        assert!(
            strict.to_string().contains("\non_unparsed reset\n"),
            "{strict}"
        );
    }

    #[test]
    fn refuses_what_on_unparsed_cannot_be() {
        assert_refused(
            &[
                "first_message_max = 512",
                r#"on_unparsed = "drop""#,
                "[[route]]",
                r#"name = "web""#,
                r#"prefix = "GET ""#,
                r#"backends = ["127.0.0.1:9001"]"#,
            ],
            2,
            r#"key "on_unparsed": "#,
            r#""drop" is not what to do with a first message that claimed TLS or HTTP"#,
        );
        assert_refused(
            &[
                "on_unparsed = true",
                "[[route]]",
                r#"name = "web""#,
                r#"prefix = "GET ""#,
                r#"backends = ["127.0.0.1:9001"]"#,
            ],
            1,
            r#"key "on_unparsed": "#,
            "invalid type",
        );
    }

    #[test]
    fn describes_itself_for_check() {
        let config = parse(&[
            "first_message_max = 512",
            "max_connections = 1000",
            r#"idle_timeout = "10m""#,
            "[[route]]",
            r#"name = "tag-600""#,
            "at = 20",
            r#"bytes = "600""#,
            "min_length = 290",
            "max_length = 294",
            "max_connections = 10",
            r#"backends = ["127.0.0.1:5001"]"#,
            "[[route]]",
            r#"name = "tls""#,
            r#"prefix = "\u0016\u0003\"""#,
            r#"backends = ["127.0.0.1:9001", "127.0.0.1:9002"]"#,
            "[[route]]",
            r#"name = "fallback""#,
            "default = true",
            r#"backends = ["127.0.0.1:9009"]"#,
        ])
        .unwrap();
        assert_eq!(
            config.to_string(),
            [
                "first_message_timeout 3s, first_message_max 512 bytes, connect_timeout 2s, health off",
                "max_connections 1000",
                "idle_timeout 10m",
                "on_unparsed default",
                r#"route "tag-600": at 20 = "600", length 290..=294 -> 127.0.0.1:5001 (round-robin; health off), max_connections 10"#,
                r#"route "tls": prefix "\x16\x03\"" -> 127.0.0.1:9001, 127.0.0.1:9002 (round-robin; health off)"#,
                r#"route "fallback": default -> 127.0.0.1:9009 (round-robin; health off)"#,
                "",
            ]
            .join("\n")
        );
    }
}
