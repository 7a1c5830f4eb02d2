//! The checks that turn the raw file into a [`Config`]: the top-level keys with their
//! defaults and limits, each route's keys, and what must hold across routes (one name
//! each, one default, one health check per backend address).
//!
//! A file of its own, apart from the schema (raw.rs) because serde only knows a value's type; whether it is
//! in range, what it defaults to and what it means for other keys are decided here. The
//! matcher keys, the bulk of what a route can say, are checked in matchers.rs.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::ops::Range;
use std::time::Duration;

use toml::Spanned;

use crate::backend::HealthCheck;
use crate::balance::{Balance, MAX_WEIGHT, WeightedBackend};
use crate::route::{OnUnparsed, PathForm};

use super::error::{ConfigError, Place, Problem, RouteLabel};
use super::raw::{DurationText, RawBackend, RawConfig, RawRoute};
use super::span::{Source, line_at};
use super::{Config, DEFAULT_SPLICE_BACKLOG_MAX, DEFAULT_SPLICE_BACKLOG_TOTAL, RouteConfig};

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

/// Below this a spliced direction would ask for credit every few packets; above it one
/// connection could hold a gigabyte of the host's memory.
const SPLICE_BACKLOG_MAX_RANGE: (usize, usize) = (64 * 1024, 1 << 30);

/// `splice_backlog_total`: at least a few pairs' first credits; at most 1 TiB, beyond any
/// machine this runs on, so a larger value is a typo.
const SPLICE_BACKLOG_TOTAL_RANGE: (usize, usize) = (1 << 20, 1 << 40);

/// Longer timeouts let silent clients hold connections for hours: a typo, not a wish.
const TIMEOUT_LIMIT: Duration = Duration::from_hours(1);

/// An idle connection may legitimately sit for a day (a database pool, a push channel);
/// beyond a week the limit is a typo.
const IDLE_TIMEOUT_LIMIT: Duration = Duration::from_hours(7 * 24);

/// More connections than any one process can hold open (each is two sockets): a typo.
const MAX_CONNECTIONS_LIMIT: usize = 100_000_000;

// The checks are the source's so that each error is placed by the text it is about.
impl Source<'_> {
    pub(super) fn validate(&self, raw: RawConfig) -> Result<Config, ConfigError> {
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
        let splice_backlog_total = match &raw.splice_backlog_total {
            Some(value) => {
                let (min, max) = SPLICE_BACKLOG_TOTAL_RANGE;
                integer_in(value, min, max).map_err(|problem| {
                    self.invalid(value.span(), Place::key("splice_backlog_total"), problem)
                })? as u64
            }
            None => DEFAULT_SPLICE_BACKLOG_TOTAL,
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
            splice_backlog_total,
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
pub(super) struct RouteCheck<'a> {
    source: &'a Source<'a>,
    name: &'a str,
    pub(super) first_message_max: usize,
    pub(super) path_form: PathForm,
}

impl RouteCheck<'_> {
    pub(super) fn fail(&self, span: Range<usize>, key: &str, problem: Problem) -> ConfigError {
        let place = Place::route_key(RouteLabel::Named(self.name.to_owned()), key);
        self.source.invalid(span, place, problem)
    }

    pub(super) fn integer_in(
        &self,
        value: &Spanned<i64>,
        key: &str,
        min: usize,
        max: usize,
    ) -> Result<usize, ConfigError> {
        integer_in(value, min, max).map_err(|problem| self.fail(value.span(), key, problem))
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

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::time::Duration;

    use crate::backend::HealthCheck;
    use crate::balance::Balance;
    use crate::config::tests::{assert_refused, backend, parse};
    use crate::config::{
        Config, DEFAULT_SPLICE_BACKLOG_MAX, DEFAULT_SPLICE_BACKLOG_TOTAL, RouteConfig,
    };
    use crate::proxy_protocol::ProxyProtocol;
    use crate::route::{Matcher, OnUnparsed};

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
    fn splice_backlog_total_is_bytes_within_its_range() {
        let route = "[[route]]\nname = \"all\"\ndefault = true\nbackends = [\"127.0.0.1:9001\"]\n";
        let default = Config::parse(route, Path::new("routes.toml")).unwrap();
        assert_eq!(default.splice_backlog_total, DEFAULT_SPLICE_BACKLOG_TOTAL);
        let text = format!("splice_backlog_total = 67108864\n{route}");
        let set = Config::parse(&text, Path::new("routes.toml")).unwrap();
        assert_eq!(set.splice_backlog_total, 64 << 20);
        assert!(
            set.to_string()
                .contains("splice_backlog_total 67108864 bytes\n")
        );
        for value in ["1048575", "1099511627777", "-1"] {
            assert_refused(
                &[&format!("splice_backlog_total = {value}")],
                1,
                r#"key "splice_backlog_total": "#,
                &format!("{value} is out of range: must be 1048576..=1099511627776"),
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
}
