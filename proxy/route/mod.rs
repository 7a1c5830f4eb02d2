//! Matchers and the route table: which route a connection's first message belongs to.
//!
//! The server reads a connection's first message a piece at a time and asks a [`Router`]
//! after each read. The answer is a route with its backends in the order to try them,
//! "read more", or "close it". [`RouteTable`] is the router built from routes.toml; a
//! program embedding the library can pass its own function instead.
//!
//! Everything here runs on bytes a client chose, so nothing may panic: offsets are
//! checked, never trusted. The protocol matchers read the first message with the parsers
//! in [`tls`] (the ClientHello) and [`http`] (the request head), each run at most once per
//! decision however many routes ask, and [`regex`](MessageRegex) searches it. A message
//! that claims a protocol but breaks its rules, or stops short of a whole ClientHello or
//! request head, matches none of that protocol's matchers, and the route table logs why
//! with the client's address, once per connection, when it decides. Where such a
//! message goes then, the default route or a reset, is the table's [`OnUnparsed`].

pub mod host;
pub mod http;
pub mod path;
mod regex;
pub mod tls;

use std::borrow::Cow;
use std::cell::OnceCell;
use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;

use crate::balance::Balancer;
use crate::config::Config;
use crate::proxy_protocol::ProxyProtocol;

pub use self::host::{HostPattern, HostPatternError};
pub use self::path::PathForm;
pub use self::regex::{MessageRegex, RegexError};

/// One test on a first message. A route holds one or more; all must hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Matcher {
    /// The message starts with these bytes.
    Prefix(Vec<u8>),
    /// These bytes sit at this offset of the message.
    At {
        /// From the start of the message, 0-based.
        offset: usize,
        /// The bytes expected there.
        bytes: Vec<u8>,
    },
    /// The message is `min..=max` bytes long. "Long" means the bytes received when the
    /// route is decided: a client that sends its first message in one write is routed on
    /// that write's length, whatever it sends afterwards.
    Length {
        /// The fewest bytes.
        min: usize,
        /// The most bytes.
        max: usize,
    },
    /// The message is a TLS ClientHello whose server_name (SNI) fits the pattern.
    Sni(HostPattern),
    /// The message is a TLS ClientHello that offers at least one of these ALPN
    /// protocols.
    Alpn(Vec<Vec<u8>>),
    /// The message is an HTTP/1.x request for a host that fits the pattern: the
    /// authority of an absolute-form target, else the Host header, port ignored.
    HttpHost(HostPattern),
    /// The message is an HTTP/1.x request whose path (query included), read as `form`
    /// says, starts with `prefix`. Like `HttpHost`, decided once the whole head has
    /// arrived.
    HttpPathPrefix {
        /// What the path starts with, e.g. `/api/`.
        prefix: String,
        /// Normalized or as sent.
        form: PathForm,
    },
    /// The regex matches somewhere in the message (see [`MessageRegex`]).
    Regex(MessageRegex),
}

/// What a protocol parser made of the first message so far.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed<T> {
    /// Enough has arrived to tell what routing needs.
    Done(T),
    /// Agrees with the protocol so far; only more bytes can tell.
    Incomplete,
    /// Another protocol: the bytes so far already rule this one out.
    Other,
    /// Claims to be this protocol but breaks its rules.
    Malformed(&'static str),
}

/// What one matcher, or one route, makes of the bytes received so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Matches, whatever else arrives.
    Match,
    /// Can never match, whatever else arrives.
    NoMatch,
    /// Agrees so far; only more bytes can tell.
    NeedMore,
}

impl Verdict {
    /// Both must hold: a `NoMatch` settles it, otherwise a `NeedMore` waits.
    fn and(self, other: Verdict) -> Verdict {
        match (self, other) {
            (Verdict::NoMatch, _) | (_, Verdict::NoMatch) => Verdict::NoMatch,
            (Verdict::NeedMore, _) | (_, Verdict::NeedMore) => Verdict::NeedMore,
            (Verdict::Match, Verdict::Match) => Verdict::Match,
        }
    }
}

impl Matcher {
    /// What the first message so far, `first`, says about this matcher.
    pub fn check(&self, first: &[u8]) -> Verdict {
        self.verdict(&Inspection::new(first))
    }

    fn verdict(&self, inspection: &Inspection<'_>) -> Verdict {
        let first = inspection.bytes;
        match self {
            Matcher::Prefix(prefix) => window_verdict(first, 0, prefix),
            Matcher::At { offset, bytes } => window_verdict(first, *offset, bytes),
            Matcher::Length { min, max } => {
                if first.len() < *min {
                    Verdict::NeedMore
                } else if first.len() <= *max {
                    Verdict::Match
                } else {
                    Verdict::NoMatch
                }
            }
            Matcher::Sni(pattern) => inspection.tls().verdict(|hello| {
                (hello.server_name.as_deref()).is_some_and(|name| pattern.matches(name))
            }),
            Matcher::Alpn(wanted) => inspection
                .tls()
                .verdict(|hello| hello.alpn.iter().any(|offered| wanted.contains(offered))),
            Matcher::HttpHost(pattern) => inspection.http().verdict(|request| {
                (request.host).is_some_and(|host| pattern.matches(host.as_bytes()))
            }),
            Matcher::HttpPathPrefix { prefix, form } => inspection.http().verdict(|request| {
                match form {
                    PathForm::Normalized => inspection.normalized_path(request.path),
                    PathForm::AsSent => request.path,
                }
                .starts_with(prefix.as_str())
            }),
            Matcher::Regex(regex) => regex.check(first),
        }
    }
}

impl From<bool> for Verdict {
    fn from(matches: bool) -> Verdict {
        if matches {
            Verdict::Match
        } else {
            Verdict::NoMatch
        }
    }
}

impl<T> Parsed<T> {
    /// `Match` if what was parsed passes `test`; a message that is not (or not validly)
    /// this protocol never matches.
    fn verdict(&self, test: impl FnOnce(&T) -> bool) -> Verdict {
        match self {
            Parsed::Done(parsed) => Verdict::from(test(parsed)),
            Parsed::Incomplete => Verdict::NeedMore,
            Parsed::Other | Parsed::Malformed(_) => Verdict::NoMatch,
        }
    }
}

/// One first message, with the protocol parses the matchers asked for, each done at
/// most once.
struct Inspection<'a> {
    bytes: &'a [u8],
    tls: OnceCell<Parsed<tls::ClientHello>>,
    http: OnceCell<Parsed<http::Request<'a>>>,
    /// The HTTP request's path after [`path::normalize`].
    normalized_path: OnceCell<Cow<'a, str>>,
}

/// What became of the protocol a first message claimed by its first bytes, for
/// [`OnUnparsed::Reset`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Claim {
    /// It is neither TLS nor HTTP, or a whole and valid ClientHello or request head.
    Kept,
    /// It still reads as the start of one: only more bytes can tell.
    Pending,
    /// It started as TLS or HTTP and then broke the protocol's rules, or stopped short
    /// (at first_message_max, first_message_timeout or the client's FIN).
    Broken,
}

impl Claim {
    fn of<T>(parsed: &Parsed<T>, complete: bool) -> Claim {
        match parsed {
            Parsed::Done(_) | Parsed::Other => Claim::Kept,
            Parsed::Incomplete if !complete => Claim::Pending,
            Parsed::Incomplete | Parsed::Malformed(_) => Claim::Broken,
        }
    }

    /// The worse of the two: one broken protocol is enough.
    fn or(self, other: Claim) -> Claim {
        match (self, other) {
            (Claim::Broken, _) | (_, Claim::Broken) => Claim::Broken,
            (Claim::Pending, _) | (_, Claim::Pending) => Claim::Pending,
            (Claim::Kept, Claim::Kept) => Claim::Kept,
        }
    }
}

impl<'a> Inspection<'a> {
    fn new(bytes: &'a [u8]) -> Inspection<'a> {
        Inspection {
            bytes,
            tls: OnceCell::new(),
            http: OnceCell::new(),
            normalized_path: OnceCell::new(),
        }
    }

    fn tls(&self) -> &Parsed<tls::ClientHello> {
        self.tls.get_or_init(|| tls::parse_client_hello(self.bytes))
    }

    fn http(&self) -> &Parsed<http::Request<'a>> {
        self.http.get_or_init(|| http::parse_request(self.bytes))
    }

    /// `path` (the parsed request's) normalized, once however many routes compare it.
    fn normalized_path(&self, path: &'a str) -> &str {
        self.normalized_path.get_or_init(|| path::normalize(path))
    }

    /// Whether the message kept the TLS or HTTP it claimed. Runs both parsers, whether
    /// a route asked for them or not: a route table without TLS routes must still not
    /// hand a broken ClientHello to the default route in reset mode.
    fn claim(&self, complete: bool) -> Claim {
        Claim::of(self.tls(), complete).or(Claim::of(self.http(), complete))
    }

    /// Logs, once the route is decided, what the protocol parsers found: at info a
    /// message that claimed a protocol but was malformed, or stopped short of a whole
    /// ClientHello or request head; at debug what a good one asked for, and that a
    /// message no route took was not the protocol at all.
    fn log(&self, first: &FirstMessage<'_>, decision: &Decision, matched: bool) {
        let client = first.client;
        let bytes = first.bytes.len();
        let route = match decision {
            Decision::Forward(forward) => &*forward.route,
            Decision::Reject | Decision::Reset | Decision::NeedMore => "(none)",
        };
        let other = |protocol: &str| {
            if !matched {
                tracing::debug!(%client, %route, "first message is not {protocol}");
            }
        };
        match self.tls.get() {
            None | Some(Parsed::Incomplete) if !first.complete => {}
            None => {}
            Some(Parsed::Done(hello)) => {
                let server_name = (hello.server_name.as_deref()).map_or_else(
                    || "(none)".to_owned(),
                    |name| name.escape_ascii().to_string(),
                );
                let alpn: Vec<String> = (hello.alpn.iter())
                    .map(|name| name.escape_ascii().to_string())
                    .collect();
                tracing::debug!(
                    %client, %route, %server_name, alpn = %alpn.join(","),
                    "first message is a TLS ClientHello"
                );
            }
            Some(Parsed::Malformed(reason)) => tracing::info!(
                %client, %route, bytes, "first message is a malformed TLS ClientHello: {reason}"
            ),
            Some(Parsed::Incomplete) => tracing::info!(
                %client, %route, bytes, "first message is an incomplete TLS ClientHello"
            ),
            Some(Parsed::Other) => other("a TLS ClientHello"),
        }
        match self.http.get() {
            None | Some(Parsed::Incomplete) if !first.complete => {}
            None => {}
            Some(Parsed::Done(request)) => tracing::debug!(
                %client, %route, host = request.host.unwrap_or("(none)"), path = request.path,
                "first message is an HTTP/1.{} request", request.version
            ),
            Some(Parsed::Malformed(reason)) => tracing::info!(
                %client, %route, bytes, "first message is a malformed HTTP request: {reason}"
            ),
            Some(Parsed::Incomplete) => tracing::info!(
                %client, %route, bytes, "first message is an incomplete HTTP request head"
            ),
            Some(Parsed::Other) => other("an HTTP/1.x request"),
        }
    }
}

/// Whether `expected` sits at `offset` of `first`. A disagreeing byte is a `NoMatch` as soon
/// as it arrives, even before the whole window has, so that later routes need not wait
/// for bytes that cannot change the answer.
fn window_verdict(first: &[u8], offset: usize, expected: &[u8]) -> Verdict {
    if offset.checked_add(expected.len()).is_none() {
        // The window ends beyond any buffer that can exist.
        return Verdict::NoMatch;
    }
    let arrived = first.get(offset..).unwrap_or_default();
    if arrived
        .iter()
        .zip(expected)
        .any(|(got, wanted)| got != wanted)
    {
        Verdict::NoMatch
    } else if arrived.len() < expected.len() {
        Verdict::NeedMore
    } else {
        Verdict::Match
    }
}

/// Shows the matcher the way `splice-proxy --check` prints it, bytes escaped.
impl fmt::Display for Matcher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Matcher::Prefix(prefix) => write!(f, "prefix \"{}\"", prefix.escape_ascii()),
            Matcher::At { offset, bytes } => {
                write!(f, "at {offset} = \"{}\"", bytes.escape_ascii())
            }
            Matcher::Length { min, max } if min == max => write!(f, "length {min}"),
            Matcher::Length {
                min,
                max: usize::MAX,
            } => write!(f, "length >= {min}"),
            Matcher::Length { min: 0, max } => write!(f, "length <= {max}"),
            Matcher::Length { min, max } => write!(f, "length {min}..={max}"),
            Matcher::Sni(pattern) => write!(f, "sni \"{pattern}\""),
            Matcher::Alpn(protocols) => {
                let quoted: Vec<String> = protocols
                    .iter()
                    .map(|name| format!("\"{}\"", name.escape_ascii()))
                    .collect();
                write!(f, "alpn [{}]", quoted.join(", "))
            }
            Matcher::HttpHost(pattern) => write!(f, "http_host \"{pattern}\""),
            Matcher::HttpPathPrefix { prefix, form } => {
                write!(f, "http_path_prefix \"{}\"", prefix.escape_default())?;
                match form {
                    PathForm::Normalized => Ok(()),
                    PathForm::AsSent => write!(f, " ({form})"),
                }
            }
            Matcher::Regex(regex) => {
                let pattern = regex.as_str();
                if pattern.contains(|c: char| c == '\'' || c.is_control()) {
                    write!(f, "regex {pattern:?}")
                } else {
                    // As a TOML literal string, the way a regex is best written.
                    write!(f, "regex '{pattern}'")
                }
            }
        }
    }
}

/// A connection's first message as read so far.
#[derive(Debug, Clone, Copy)]
pub struct FirstMessage<'a> {
    /// The bytes read so far, from the first.
    pub bytes: &'a [u8],
    /// No more bytes will be read before routing: the read reached `first_message_max`,
    /// `first_message_timeout` passed, or the client half-closed. A router must then give
    /// a final answer, never [`Decision::NeedMore`].
    pub complete: bool,
    /// The client's address.
    pub client: SocketAddr,
}

/// Where a connection goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Connect to a backend of this route and forward the message.
    Forward(Forward),
    /// Read more of the first message and ask again.
    NeedMore,
    /// Close the connection.
    Reject,
    /// Reset the connection: its first message started as a protocol and then broke its
    /// rules or stopped short, so the router will not guess where it belongs (the route
    /// table does this for [`OnUnparsed::Reset`]).
    Reset,
}

/// What a [`RouteTable`] does with a first message that claimed TLS or HTTP by its first
/// bytes and then could not be parsed: garbled, or cut short by `first_message_max`,
/// `first_message_timeout` or the client's FIN. Such a message matches no TLS or HTTP
/// route, so without this it would take the default route, whatever the part that was
/// read (a request line for `/admin/`) says. One setting for the whole table, not per
/// route: the parts that would tell which route such a message belongs to (its Host,
/// its server name, the rest of its head) are exactly the parts that could not be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnUnparsed {
    /// The default route takes it (closed if there is none), as any unmatched message.
    #[default]
    Default,
    /// It is reset, and the table waits for a message that could still become a whole
    /// ClientHello or request head until it does or cannot.
    Reset,
}

/// As routes.toml writes it.
impl fmt::Display for OnUnparsed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            OnUnparsed::Default => "default",
            OnUnparsed::Reset => "reset",
        })
    }
}

/// Where a forwarded connection goes: a route and its backends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Forward {
    /// The route's name, for logs and metrics.
    pub route: Arc<str>,
    /// Every backend of the route, in the order to try them.
    pub backends: Vec<SocketAddr>,
    /// The PROXY protocol header to write to the backend before the first message.
    pub send_proxy: Option<ProxyProtocol>,
}

/// Decides where a connection goes from its first message.
///
/// [`RouteTable`] is the one built from routes.toml. A program embedding the library can
/// route with its own logic by passing a closure:
///
/// ```
/// use splice_proxy::route::{Decision, FirstMessage, Forward, Router};
///
/// let backend = std::net::SocketAddr::from(([127, 0, 0, 1], 6379));
/// let router = move |first: &FirstMessage<'_>| match first.bytes.first() {
///     Some(b'*') => Decision::Forward(Forward {
///         route: "redis".into(),
///         backends: vec![backend],
///         send_proxy: None,
///     }),
///     Some(_) => Decision::Reject,
///     None if first.complete => Decision::Reject,
///     None => Decision::NeedMore,
/// };
/// fn takes_router(_: impl Router) {}
/// takes_router(router);
/// ```
pub trait Router: Send + Sync + 'static {
    /// Where the connection whose first message is `first` goes, or
    /// [`Decision::NeedMore`] to be asked again when more has arrived (never when
    /// `first.complete`).
    fn decide(&self, first: &FirstMessage<'_>) -> Decision;
}

impl<F> Router for F
where
    F: Fn(&FirstMessage<'_>) -> Decision + Send + Sync + 'static,
{
    fn decide(&self, first: &FirstMessage<'_>) -> Decision {
        self(first)
    }
}

/// The routes of a [`Config`], ready to decide, each with its own [`Balancer`].
///
/// Routes are tried in file order and the first match wins, but file order is priority:
/// while an earlier route still needs more bytes to tell, a later match waits. When every
/// route has said no, the default route takes the connection, and without one it is
/// rejected. So does a client that sent nothing: a server-speaks-first protocol (SMTP,
/// MySQL) goes to the default route once `first_message_timeout` passes.
#[derive(Debug)]
pub struct RouteTable {
    /// The routes with matchers, in file order.
    routes: Vec<TableRoute>,
    default: Option<TableRoute>,
    on_unparsed: OnUnparsed,
}

#[derive(Debug)]
struct TableRoute {
    name: Arc<str>,
    matchers: Vec<Matcher>,
    balancer: Balancer,
    send_proxy: Option<ProxyProtocol>,
}

impl RouteTable {
    /// [`Config::parse`] allows one default route; should a hand-built `Config` hold
    /// several, the first is the default and the others are never used.
    pub fn new(config: &Config) -> RouteTable {
        let mut routes = Vec::with_capacity(config.routes.len());
        let mut default = None;
        for route in &config.routes {
            let table_route = TableRoute {
                name: Arc::from(route.name.as_str()),
                matchers: route.matchers.clone(),
                balancer: Balancer::new(route.balance, route.backends.clone(), route.health),
                send_proxy: route.send_proxy,
            };
            if !route.default {
                routes.push(table_route);
            } else if default.is_none() {
                default = Some(table_route);
            }
        }
        RouteTable {
            routes,
            default,
            on_unparsed: config.on_unparsed,
        }
    }

    fn fall_back(&self, client: SocketAddr) -> Decision {
        match &self.default {
            Some(route) => Decision::Forward(route.forward(client)),
            None => Decision::Reject,
        }
    }
}

impl TableRoute {
    fn verdict(&self, inspection: &Inspection<'_>, complete: bool) -> Verdict {
        let mut verdict = Verdict::Match;
        for matcher in &self.matchers {
            verdict = verdict.and(matcher.verdict(inspection));
            if verdict == Verdict::NoMatch {
                // The rest cannot change it, and may need a parse this one spared.
                return Verdict::NoMatch;
            }
        }
        match verdict {
            Verdict::NeedMore if complete => Verdict::NoMatch,
            verdict => verdict,
        }
    }

    fn forward(&self, client: SocketAddr) -> Forward {
        Forward {
            route: Arc::clone(&self.name),
            backends: self.balancer.order(client),
            send_proxy: self.send_proxy,
        }
    }
}

impl Router for RouteTable {
    fn decide(&self, first: &FirstMessage<'_>) -> Decision {
        if first.bytes.is_empty() {
            // No route matches on nothing (not even a length route that allows 0 bytes):
            // wait, and once nothing more will come it is the default route's connection.
            return if first.complete {
                self.fall_back(first.client)
            } else {
                Decision::NeedMore
            };
        }
        let inspection = Inspection::new(first.bytes);
        let mut matched = None;
        for route in &self.routes {
            match route.verdict(&inspection, first.complete) {
                Verdict::Match => {
                    matched = Some(Decision::Forward(route.forward(first.client)));
                    break;
                }
                // Not decided yet (never once `complete`), so nothing to log yet.
                Verdict::NeedMore => return Decision::NeedMore,
                Verdict::NoMatch => {}
            }
        }
        let was_matched = matched.is_some();
        let decision = match matched {
            Some(decision) => decision,
            None if self.on_unparsed == OnUnparsed::Default => self.fall_back(first.client),
            None => match inspection.claim(first.complete) {
                Claim::Kept => self.fall_back(first.client),
                Claim::Pending => return Decision::NeedMore,
                Claim::Broken => Decision::Reset,
            },
        };
        inspection.log(first, &decision, was_matched);
        decision
    }
}

#[cfg(test)]
mod tests {
    use super::tls::tests::client_hello;
    use super::*;
    use crate::backend::HealthCheck;
    use crate::balance::Balance;
    use crate::config::RouteConfig;
    use std::time::Duration;

    const CLIENT: SocketAddr =
        SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 40000);

    fn backend(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    fn prefix(bytes: &[u8]) -> Matcher {
        Matcher::Prefix(bytes.to_vec())
    }

    fn at(offset: usize, bytes: &[u8]) -> Matcher {
        Matcher::At {
            offset,
            bytes: bytes.to_vec(),
        }
    }

    fn route(name: &str, matchers: Vec<Matcher>, ports: &[u16]) -> RouteConfig {
        RouteConfig {
            name: name.to_owned(),
            matchers,
            default: false,
            backends: ports.iter().map(|&port| backend(port).into()).collect(),
            balance: Balance::RoundRobin,
            health: HealthCheck::OFF,
            send_proxy: None,
            max_connections: None,
        }
    }

    fn default_route(name: &str, ports: &[u16]) -> RouteConfig {
        RouteConfig {
            default: true,
            ..route(name, Vec::new(), ports)
        }
    }

    fn table(routes: Vec<RouteConfig>) -> RouteTable {
        table_on_unparsed(OnUnparsed::Default, routes)
    }

    fn table_on_unparsed(on_unparsed: OnUnparsed, routes: Vec<RouteConfig>) -> RouteTable {
        RouteTable::new(&Config {
            first_message_timeout: Duration::from_secs(3),
            first_message_max: 16384,
            connect_timeout: Duration::from_secs(2),
            health: HealthCheck::OFF,
            max_connections: None,
            idle_timeout: None,
            on_unparsed,
            splice_backlog_max: crate::config::DEFAULT_SPLICE_BACKLOG_MAX,
            routes,
        })
    }

    fn partial(bytes: &[u8]) -> FirstMessage<'_> {
        FirstMessage {
            bytes,
            complete: false,
            client: CLIENT,
        }
    }

    fn complete(bytes: &[u8]) -> FirstMessage<'_> {
        FirstMessage {
            bytes,
            complete: true,
            client: CLIENT,
        }
    }

    /// The route a decision forwards to, or "NeedMore" / "Reject".
    fn outcome(decision: Decision) -> String {
        match decision {
            Decision::Forward(forward) => forward.route.to_string(),
            Decision::NeedMore => "NeedMore".to_owned(),
            Decision::Reject => "Reject".to_owned(),
            Decision::Reset => "Reset".to_owned(),
        }
    }

    #[test]
    fn prefix_edges() {
        let matcher = prefix(b"GET ");
        assert_eq!(matcher.check(b""), Verdict::NeedMore);
        assert_eq!(matcher.check(b"GE"), Verdict::NeedMore);
        assert_eq!(matcher.check(b"GET "), Verdict::Match);
        assert_eq!(matcher.check(b"GET /index.html"), Verdict::Match);
        assert_eq!(matcher.check(b"P"), Verdict::NoMatch);
        assert_eq!(matcher.check(b"GEX"), Verdict::NoMatch);
        assert_eq!(matcher.check(b"POST /"), Verdict::NoMatch);
    }

    #[test]
    fn at_edges() {
        let matcher = at(4, b"600");
        assert_eq!(matcher.check(b""), Verdict::NeedMore);
        assert_eq!(matcher.check(b"xxxx"), Verdict::NeedMore);
        assert_eq!(matcher.check(b"xxxx60"), Verdict::NeedMore);
        assert_eq!(matcher.check(b"xxxx600"), Verdict::Match);
        assert_eq!(matcher.check(b"xxxx600 and more"), Verdict::Match);
        assert_eq!(matcher.check(b"xxxx601"), Verdict::NoMatch);
        // A disagreeing byte settles it before the window is complete.
        assert_eq!(matcher.check(b"xxxx7"), Verdict::NoMatch);
    }

    #[test]
    fn at_huge_offsets_do_not_panic() {
        assert_eq!(at(usize::MAX, b"x").check(b"abc"), Verdict::NoMatch);
        assert_eq!(at(usize::MAX - 1, b"x").check(b"abc"), Verdict::NeedMore);
        assert_eq!(at(usize::MAX, b"").check(b"abc"), Verdict::Match);
    }

    #[test]
    fn length_edges() {
        let matcher = Matcher::Length { min: 290, max: 294 };
        assert_eq!(matcher.check(&[0; 0]), Verdict::NeedMore);
        assert_eq!(matcher.check(&[0; 289]), Verdict::NeedMore);
        assert_eq!(matcher.check(&[0; 290]), Verdict::Match);
        assert_eq!(matcher.check(&[0; 294]), Verdict::Match);
        assert_eq!(matcher.check(&[0; 295]), Verdict::NoMatch);
        let at_most = Matcher::Length { min: 0, max: 3 };
        assert_eq!(at_most.check(b"abc"), Verdict::Match);
        assert_eq!(at_most.check(b"abcd"), Verdict::NoMatch);
        let at_least = Matcher::Length {
            min: 3,
            max: usize::MAX,
        };
        assert_eq!(at_least.check(b"ab"), Verdict::NeedMore);
        assert_eq!(at_least.check(&[0; 100_000]), Verdict::Match);
    }

    #[test]
    fn matchers_combine() {
        use Verdict::*;
        for (a, b, both) in [
            (Match, Match, Match),
            (Match, NeedMore, NeedMore),
            (NeedMore, Match, NeedMore),
            (NeedMore, NeedMore, NeedMore),
            (NoMatch, NeedMore, NoMatch),
            (NeedMore, NoMatch, NoMatch),
            (Match, NoMatch, NoMatch),
        ] {
            assert_eq!(a.and(b), both, "{a:?} and {b:?}");
        }

        let tag = table(vec![route(
            "tag-600",
            vec![at(2, b"600"), Matcher::Length { min: 6, max: 8 }],
            &[5600],
        )]);
        assert_eq!(outcome(tag.decide(&partial(b"xx600"))), "NeedMore");
        assert_eq!(outcome(tag.decide(&partial(b"xx600x"))), "tag-600");
        assert_eq!(outcome(tag.decide(&partial(b"xx601x"))), "Reject");
        assert_eq!(outcome(tag.decide(&partial(b"xx600xxxx"))), "Reject");
        assert_eq!(outcome(tag.decide(&complete(b"xx600"))), "Reject");
    }

    #[test]
    fn first_match_in_file_order_wins() {
        let routes = table(vec![
            route("get", vec![prefix(b"GET ")], &[9001]),
            route("any-g", vec![prefix(b"G")], &[9002]),
            default_route("fallback", &[9009]),
        ]);
        assert_eq!(outcome(routes.decide(&partial(b"GET /"))), "get");
        assert_eq!(outcome(routes.decide(&partial(b"GOT /"))), "any-g");
        assert_eq!(outcome(routes.decide(&partial(b"POST /"))), "fallback");
    }

    #[test]
    fn earlier_need_more_blocks_a_later_match() {
        let routes = table(vec![
            route("long", vec![prefix(b"HELLO WORLD")], &[9001]),
            route("short", vec![prefix(b"HE")], &[9002]),
        ]);
        assert_eq!(outcome(routes.decide(&partial(b"HELLO"))), "NeedMore");
        assert_eq!(outcome(routes.decide(&partial(b"HELLO WORLD"))), "long");
        assert_eq!(outcome(routes.decide(&partial(b"HELLO THERE"))), "short");
        // Nothing more will come, so "long" can no longer match.
        assert_eq!(outcome(routes.decide(&complete(b"HELLO"))), "short");
    }

    #[test]
    fn default_route_is_not_an_ordering_barrier() {
        let routes = table(vec![
            default_route("fallback", &[9009]),
            route("get", vec![prefix(b"GET ")], &[9001]),
        ]);
        assert_eq!(outcome(routes.decide(&partial(b"GET /"))), "get");
        assert_eq!(outcome(routes.decide(&partial(b"PUT /"))), "fallback");
    }

    #[test]
    fn complete_need_more_falls_back_to_default() {
        let routes = table(vec![
            route("get", vec![prefix(b"GET ")], &[9001]),
            default_route("fallback", &[9009]),
        ]);
        assert_eq!(outcome(routes.decide(&partial(b"GE"))), "NeedMore");
        assert_eq!(outcome(routes.decide(&complete(b"GE"))), "fallback");
    }

    #[test]
    fn zero_bytes() {
        let with_default = table(vec![
            route(
                "anything-short",
                vec![Matcher::Length { min: 0, max: 10 }],
                &[9001],
            ),
            default_route("smtp", &[25]),
        ]);
        assert_eq!(outcome(with_default.decide(&partial(b""))), "NeedMore");
        assert_eq!(outcome(with_default.decide(&complete(b""))), "smtp");

        let without_default = table(vec![route("get", vec![prefix(b"GET ")], &[9001])]);
        assert_eq!(outcome(without_default.decide(&partial(b""))), "NeedMore");
        assert_eq!(outcome(without_default.decide(&complete(b""))), "Reject");
    }

    #[test]
    fn no_match_without_default_is_rejected() {
        let routes = table(vec![route("get", vec![prefix(b"GET ")], &[9001])]);
        assert_eq!(routes.decide(&partial(b"PUT /")), Decision::Reject);
        assert_eq!(routes.decide(&complete(b"GE")), Decision::Reject);
    }

    #[test]
    fn forward_lists_the_backends_round_robin() {
        let routes = table(vec![route(
            "web",
            vec![prefix(b"GET ")],
            &[9001, 9002, 9003],
        )]);
        let orders: Vec<_> = (0..4)
            .map(|_| match routes.decide(&partial(b"GET /")) {
                Decision::Forward(forward) => forward.backends,
                other => panic!("{other:?}"),
            })
            .collect();
        let (a, b, c) = (backend(9001), backend(9002), backend(9003));
        assert_eq!(
            orders,
            [vec![a, b, c], vec![b, c, a], vec![c, a, b], vec![a, b, c]]
        );
    }

    #[test]
    fn a_closure_is_a_router() {
        fn boxed(router: impl Router) -> Box<dyn Router> {
            Box::new(router)
        }
        let router = boxed(|first: &FirstMessage<'_>| {
            if first.bytes.len() > 3 {
                Decision::Forward(Forward {
                    route: "long".into(),
                    backends: vec![backend(9001)],
                    send_proxy: None,
                })
            } else {
                Decision::NeedMore
            }
        });
        assert_eq!(router.decide(&partial(b"abc")), Decision::NeedMore);
        assert_eq!(outcome(router.decide(&partial(b"abcd"))), "long");
    }

    #[test]
    fn matchers_display_escaped() {
        assert_eq!(prefix(b"*").to_string(), r#"prefix "*""#);
        assert_eq!(at(20, b"600").to_string(), r#"at 20 = "600""#);
        assert_eq!(
            prefix(b"\x16\x03\"\\\n").to_string(),
            r#"prefix "\x16\x03\"\\\n""#
        );
        assert_eq!(
            Matcher::Length { min: 290, max: 294 }.to_string(),
            "length 290..=294"
        );
        assert_eq!(Matcher::Length { min: 5, max: 5 }.to_string(), "length 5");
        assert_eq!(
            Matcher::Length {
                min: 5,
                max: usize::MAX
            }
            .to_string(),
            "length >= 5"
        );
        assert_eq!(
            Matcher::Length { min: 0, max: 9 }.to_string(),
            "length <= 9"
        );
    }

    fn sni(pattern: &str) -> Matcher {
        Matcher::Sni(HostPattern::parse(pattern).unwrap())
    }

    fn alpn(protocols: &[&str]) -> Matcher {
        Matcher::Alpn(protocols.iter().map(|p| p.as_bytes().to_vec()).collect())
    }

    fn http_host(pattern: &str) -> Matcher {
        Matcher::HttpHost(HostPattern::parse(pattern).unwrap())
    }

    fn path_prefix(prefix: &str) -> Matcher {
        Matcher::HttpPathPrefix {
            prefix: prefix.to_owned(),
            form: PathForm::Normalized,
        }
    }

    fn path_prefix_as_sent(prefix: &str) -> Matcher {
        Matcher::HttpPathPrefix {
            prefix: prefix.to_owned(),
            form: PathForm::AsSent,
        }
    }

    fn regex(pattern: &str) -> Matcher {
        Matcher::Regex(MessageRegex::new(pattern).unwrap())
    }

    /// What the server does: asks after every `step` bytes until the router decides,
    /// then once more with `complete` if it never did. Returns the outcome and the bytes
    /// it took.
    fn fed_in_steps(routes: &RouteTable, message: &[u8], step: usize) -> (String, usize) {
        let mut len = 0;
        while len < message.len() {
            len = (len + step).min(message.len());
            let decision = routes.decide(&partial(&message[..len]));
            if decision != Decision::NeedMore {
                return (outcome(decision), len);
            }
        }
        (outcome(routes.decide(&complete(message))), len)
    }

    fn tls_table() -> RouteTable {
        table(vec![
            route("a", vec![sni("a.example.com")], &[9001]),
            route(
                "wild-h2",
                vec![sni("*.example.com"), alpn(&["h2"])],
                &[9002],
            ),
            route("h1", vec![alpn(&["http/1.1", "http/1.0"])], &[9003]),
            default_route("fallback", &[9009]),
        ])
    }

    #[test]
    fn sni_and_alpn_route_tls() {
        let routes = tls_table();
        for (server_name, protocols, expected) in [
            (Some("a.example.com"), &[][..], "a"),
            (Some("A.EXAMPLE.COM"), &["h2"][..], "a"),
            (Some("b.example.com"), &["http/1.1", "h2"][..], "wild-h2"),
            (Some("x.y.example.com"), &["h2"][..], "wild-h2"),
            (Some("b.example.com"), &["http/1.1"][..], "h1"),
            (Some("example.com"), &["h2"][..], "fallback"),
            (None, &["h2"][..], "fallback"),
            (None, &["http/1.0"][..], "h1"),
            (None, &[][..], "fallback"),
        ] {
            let hello = client_hello(server_name, protocols);
            let whole = hello.len();
            for step in [1, 3, whole] {
                assert_eq!(
                    fed_in_steps(&routes, &hello, step),
                    (expected.to_owned(), whole),
                    "{server_name:?} {protocols:?}, {step} bytes at a time"
                );
            }
        }
    }

    #[test]
    fn garbled_or_truncated_hellos_match_no_tls_route() {
        let routes = tls_table();
        let hello = client_hello(Some("a.example.com"), &["h2"]);
        // Truncated: waits, and once nothing more will come it is the default's.
        let truncated = &hello[..hello.len() - 1];
        assert_eq!(outcome(routes.decide(&partial(truncated))), "NeedMore");
        assert_eq!(outcome(routes.decide(&complete(truncated))), "fallback");
        // Garbled: decided as soon as it shows.
        let mut garbled = hello.clone();
        garbled[9] = 0x7f; // legacy_version's major
        assert_eq!(outcome(routes.decide(&partial(&garbled))), "fallback");
        // Not TLS at all: decided on the first byte.
        assert_eq!(
            fed_in_steps(&routes, b"GET / HTTP/1.1\r\n\r\n", 1),
            ("fallback".to_owned(), 1)
        );
        // Without a default route, rejected.
        let strict = table(vec![route("a", vec![sni("a.example.com")], &[9001])]);
        assert_eq!(strict.decide(&partial(&garbled)), Decision::Reject);
        assert_eq!(strict.decide(&complete(truncated)), Decision::Reject);
    }

    #[test]
    fn http_host_and_path_prefix() {
        let routes = table(vec![
            route(
                "api-b",
                vec![http_host("b.example.com"), path_prefix("/api/")],
                &[9001],
            ),
            route("b", vec![http_host("*.b.example.com")], &[9002]),
            route("static", vec![path_prefix("/static")], &[9003]),
            route("ssh", vec![prefix(b"SSH-")], &[9004]),
            default_route("fallback", &[9009]),
        ]);
        for (head, expected) in [
            (
                &b"GET /api/x HTTP/1.1\r\nHost: B.example.com:8080\r\n\r\n"[..],
                "api-b",
            ),
            (
                b"GET /api HTTP/1.1\r\nHost: b.example.com\r\n\r\n",
                "fallback",
            ),
            (b"GET /x HTTP/1.1\r\nHost: www.b.example.com\r\n\r\n", "b"),
            (b"GET http://b.example.com/api/y HTTP/1.1\r\n\r\n", "api-b"),
            (
                b"GET /static/a.css HTTP/1.1\r\nHost: c.example.com\r\n\r\n",
                "static",
            ),
            (b"GET /static/a.css HTTP/1.0\r\n\r\n", "static"),
            (b"GET /api/x HTTP/1.0\r\n\r\n", "fallback"),
            (b"SSH-2.0-OpenSSH_9.2\r\n", "ssh"),
            (b"\x16\x03\x01\x00\x05\x01\x00\x00\x01\x03", "fallback"),
        ] {
            for step in [1, 5, head.len()] {
                assert_eq!(
                    fed_in_steps(&routes, head, step).0,
                    expected,
                    "{}, {step} bytes at a time",
                    head.escape_ascii()
                );
            }
        }
        // "SSH-2.0-x" could still be an HTTP method; at the line end it cannot, and the
        // HTTP routes no longer hold up the prefix route.
        assert_eq!(outcome(routes.decide(&partial(b"SSH-2.0-x"))), "NeedMore");
        assert_eq!(outcome(routes.decide(&partial(b"SSH-2.0-x\r"))), "ssh");
        // Path and host wait for the whole head, so that how the head is split into
        // reads cannot change the answer.
        let path_only = table(vec![route("static", vec![path_prefix("/static")], &[9003])]);
        let line = b"GET /static HTTP/1.1\r\n";
        assert_eq!(outcome(path_only.decide(&partial(line))), "NeedMore");
        let head = b"GET /static HTTP/1.1\r\nBad Header: x\r\n\r\n";
        assert_eq!(outcome(path_only.decide(&partial(head))), "Reject");
        let host_only = table(vec![route("b", vec![http_host("b.example.com")], &[9001])]);
        let head = b"GET / HTTP/1.1\r\nHost: b.example.com\r\n";
        assert_eq!(outcome(host_only.decide(&partial(head))), "NeedMore");
        let head = b"GET / HTTP/1.1\r\nHost: b.example.com\r\n\r\n";
        assert_eq!(outcome(host_only.decide(&partial(head))), "b");
    }

    /// The access-control table of routes.toml's docs: the admin host's /admin/, a deny
    /// route for /admin/ from anyone else, TLS for one name, and a catch-all.
    fn admin_table(on_unparsed: OnUnparsed) -> RouteTable {
        table_on_unparsed(
            on_unparsed,
            vec![
                route(
                    "admin",
                    vec![http_host("admin.example.com"), path_prefix("/admin/")],
                    &[9001],
                ),
                route("deny", vec![path_prefix("/admin/")], &[9002]),
                route("ssh", vec![prefix(b"SSH-")], &[9003]),
                default_route("public", &[9009]),
            ],
        )
    }

    /// Heads whose request line asks for /admin/ and that the HTTP parser refuses or
    /// never finishes, with what is wrong.
    const UNPARSED_ADMIN_HEADS: [(&str, &[u8]); 8] = [
        (
            "duplicate Host",
            b"GET /admin/ HTTP/1.1\r\nHost: admin.example.com\r\nHost: public.example.com\r\n\r\n",
        ),
        (
            "obs-fold",
            b"GET /admin/ HTTP/1.1\r\nHost: public.example.com\r\nX-A: a\r\n folded\r\n\r\n",
        ),
        (
            "space before the colon",
            b"GET /admin/ HTTP/1.1\r\nHost : admin.example.com\r\n\r\n",
        ),
        (
            "bare CR",
            b"GET /admin/ HTTP/1.1\rHost: public.example.com\r\n\r\n",
        ),
        (
            "bare CR in a header",
            b"GET /admin/ HTTP/1.1\r\nHost: public.example.com\rX: y\r\n\r\n",
        ),
        (
            "two spaces in the request line",
            b"GET  /admin/ HTTP/1.1\r\nHost: public.example.com\r\n\r\n",
        ),
        ("HTTP/0.9", b"GET /admin/\r\n\r\n"),
        (
            "head cut short",
            b"GET /admin/ HTTP/1.1\r\nHost: public.example.com\r\n",
        ),
    ];

    #[test]
    fn normalized_paths_reach_the_routes_their_backend_would_serve() {
        let routes = admin_table(OnUnparsed::Default);
        for path in [
            "/admin/",
            "/%61dmin/",
            "//admin/",
            "/./admin/",
            "/api/../admin/",
            "/%2E%2e/admin/x",
            "/admin//x?y",
        ] {
            for (host, expected) in [("admin.example.com", "admin"), ("www.example.com", "deny")] {
                let head = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n");
                assert_eq!(
                    fed_in_steps(&routes, head.as_bytes(), 7).0,
                    expected,
                    "{head:?}"
                );
            }
        }
        for path in [
            "/",
            "/administrator",
            "/%2Fadmin/",
            "/admin%2F",
            "/x/admin/",
        ] {
            let head = format!("GET {path} HTTP/1.1\r\nHost: www.example.com\r\n\r\n");
            assert_eq!(outcome(routes.decide(&partial(head.as_bytes()))), "public");
        }
        // As sent: only the bytes count.
        let as_sent = table(vec![
            route("deny", vec![path_prefix_as_sent("/admin/")], &[9002]),
            default_route("public", &[9009]),
        ]);
        let head = b"GET /%61dmin/ HTTP/1.1\r\n\r\n";
        assert_eq!(outcome(as_sent.decide(&partial(head))), "public");
        let head = b"GET /admin/ HTTP/1.1\r\n\r\n";
        assert_eq!(outcome(as_sent.decide(&partial(head))), "deny");
    }

    #[test]
    fn unparsed_messages_take_the_default_route_unless_the_table_resets_them() {
        let lenient = admin_table(OnUnparsed::Default);
        let strict = admin_table(OnUnparsed::Reset);
        for (what, head) in UNPARSED_ADMIN_HEADS {
            assert_eq!(outcome(lenient.decide(&complete(head))), "public", "{what}");
            assert_eq!(outcome(strict.decide(&complete(head))), "Reset", "{what}");
            // Fed as a client sends it: the same answer, and no earlier than the
            // broken part shows (or the message ends).
            assert_eq!(fed_in_steps(&strict, head, 1).0, "Reset", "{what}");
        }

        let hello = client_hello(Some("a.example.com"), &["h2"]);
        let mut garbled = hello.clone();
        garbled[43] = 0xff; // the session id's length
        let truncated = &hello[..hello.len() - 1];
        // No route asks for TLS, and still a broken ClientHello is not the default's.
        assert_eq!(outcome(lenient.decide(&partial(&garbled))), "public");
        assert_eq!(outcome(strict.decide(&partial(&garbled))), "Reset");
        assert_eq!(outcome(strict.decide(&partial(truncated))), "NeedMore");
        assert_eq!(outcome(strict.decide(&complete(truncated))), "Reset");
        assert_eq!(fed_in_steps(&strict, &hello, 5).0, "public");

        // What did not claim TLS or HTTP, or kept to it, is served as before.
        for (message, expected) in [
            (
                &b"GET / HTTP/1.1\r\nHost: www.example.com\r\n\r\n"[..],
                "public",
            ),
            (
                b"GET /admin/ HTTP/1.1\r\nHost: admin.example.com\r\n\r\n",
                "admin",
            ),
            (b"hello\n", "public"),
            (b"SET key value\r\n", "public"),
            (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", "public"),
            (b"SSH-2.0-OpenSSH_9.2\r\n", "ssh"),
            (b"", "public"),
        ] {
            assert_eq!(
                outcome(strict.decide(&complete(message))),
                expected,
                "{}",
                message.escape_ascii()
            );
        }
        // A route whose own matchers take a message keeps it, parsed or not.
        let head = b"SSH-2.0 /admin/ HTTP/1.1\r\nHost : x\r\n\r\n";
        assert_eq!(outcome(strict.decide(&complete(head))), "ssh");
        // A message that could still become a request head waits for it, where the
        // lenient table would hand it to the default route at once.
        let lenient_tls = table_on_unparsed(
            OnUnparsed::Default,
            vec![
                route("a", vec![sni("a.example.com")], &[9001]),
                default_route("public", &[9009]),
            ],
        );
        let strict_tls = table_on_unparsed(
            OnUnparsed::Reset,
            vec![
                route("a", vec![sni("a.example.com")], &[9001]),
                default_route("public", &[9009]),
            ],
        );
        let line = b"GET /admin/ HTTP/1.1\r\n";
        assert_eq!(outcome(lenient_tls.decide(&partial(line))), "public");
        assert_eq!(outcome(strict_tls.decide(&partial(line))), "NeedMore");
        assert_eq!(outcome(strict_tls.decide(&complete(line))), "Reset");
        assert_eq!(outcome(strict_tls.decide(&complete(b"G"))), "Reset");

        // Without a default route: closed either way, reset when asked.
        let no_default = |on_unparsed| {
            table_on_unparsed(
                on_unparsed,
                vec![route("a", vec![sni("a.example.com")], &[9001])],
            )
        };
        let head = UNPARSED_ADMIN_HEADS[0].1;
        assert_eq!(
            outcome(no_default(OnUnparsed::Default).decide(&complete(head))),
            "Reject"
        );
        assert_eq!(
            outcome(no_default(OnUnparsed::Reset).decide(&complete(head))),
            "Reset"
        );
    }

    #[test]
    fn regex_routes() {
        let routes = table(vec![
            route("anchored", vec![regex(r"^HELLO v[0-9]+\n")], &[9001]),
            route("anywhere", vec![regex(r"(?i)user-agent: curl/")], &[9002]),
            route("tls", vec![sni("a.example.com")], &[9003]),
            default_route("fallback", &[9009]),
        ]);
        assert_eq!(outcome(routes.decide(&partial(b"HELLO v"))), "NeedMore");
        assert_eq!(
            outcome(routes.decide(&partial(b"HELLO v12\nrest"))),
            "anchored"
        );
        // The unanchored regex can still match later: it waits ...
        let line = b"GET / HTTP/1.1\r\n";
        assert_eq!(outcome(routes.decide(&partial(line))), "NeedMore");
        let head = b"GET / HTTP/1.1\r\nUser-Agent: curl/8\r\n";
        assert_eq!(outcome(routes.decide(&partial(head))), "anywhere");
        // ... until the message is complete.
        let head = b"GET / HTTP/1.1\r\n\r\n";
        assert_eq!(outcome(routes.decide(&complete(head))), "fallback");
        let hello = client_hello(Some("a.example.com"), &[]);
        assert_eq!(fed_in_steps(&routes, &hello, 7).0, "tls");
    }

    #[test]
    fn protocol_matchers_display() {
        assert_eq!(sni("*.Example.com").to_string(), r#"sni "*.example.com""#);
        assert_eq!(
            alpn(&["h2", "http/1.1"]).to_string(),
            r#"alpn ["h2", "http/1.1"]"#
        );
        assert_eq!(
            http_host("B.example.com").to_string(),
            r#"http_host "b.example.com""#
        );
        assert_eq!(
            path_prefix("/api").to_string(),
            r#"http_path_prefix "/api""#
        );
        assert_eq!(regex(r"^GET /\d+").to_string(), r"regex '^GET /\d+'");
        assert_eq!(regex(r"it's").to_string(), r#"regex "it's""#);
    }

    /// Collects what a tracing subscriber writes.
    #[derive(Clone, Default)]
    struct Captured(Arc<std::sync::Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// The log lines written while `run` runs, at debug level and up.
    fn logs_of(run: impl FnOnce()) -> Vec<String> {
        let captured = Captured::default();
        let writer = captured.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_max_level(tracing::Level::DEBUG)
            .with_ansi(false)
            .finish();
        tracing::subscriber::with_default(subscriber, run);
        let text = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
        text.lines().map(str::to_owned).collect()
    }

    fn at_info(lines: &[String]) -> Vec<&String> {
        lines.iter().filter(|line| line.contains("INFO")).collect()
    }

    #[test]
    fn logs_bad_first_messages_once_with_the_client() {
        let routes = table(vec![
            route("a", vec![sni("a.example.com")], &[9001]),
            route("web", vec![http_host("b.example.com")], &[9002]),
            default_route("fallback", &[9009]),
        ]);
        let hello = client_hello(Some("a.example.com"), &["h2"]);
        let mut garbled = hello.clone();
        garbled[43] = 0xff; // the session id's length
        let truncated = &hello[..hello.len() - 3];

        let lines = logs_of(|| assert_eq!(fed_in_steps(&routes, &garbled, 1).0, "fallback"));
        let info = at_info(&lines);
        assert_eq!(info.len(), 1, "{lines:#?}");
        assert!(info[0].contains("malformed TLS ClientHello"), "{}", info[0]);
        assert!(info[0].contains("client=127.0.0.1:40000"), "{}", info[0]);
        assert!(info[0].contains("fallback"), "{}", info[0]);

        let lines = logs_of(|| assert_eq!(fed_in_steps(&routes, truncated, 1).0, "fallback"));
        let info = at_info(&lines);
        assert_eq!(info.len(), 1, "{lines:#?}");
        assert!(
            info[0].contains("incomplete TLS ClientHello"),
            "{}",
            info[0]
        );

        let head = b"GET / HTTP/1.1\r\nHost: b.example.com\r\nBad Header: x\r\n\r\n";
        let lines = logs_of(|| assert_eq!(fed_in_steps(&routes, head, 1).0, "fallback"));
        let info = at_info(&lines);
        assert_eq!(info.len(), 1, "{lines:#?}");
        assert!(info[0].contains("malformed HTTP request"), "{}", info[0]);

        // Good messages and other protocols: debug only, once each, and that a message
        // is not TLS only when no route took it.
        let head = b"GET / HTTP/1.1\r\nHost: b.example.com\r\n\r\n";
        let lines = logs_of(|| {
            assert_eq!(fed_in_steps(&routes, &hello, 1).0, "a");
            assert_eq!(fed_in_steps(&routes, b"SSH-2.0-x\r\n", 1).0, "fallback");
            assert_eq!(fed_in_steps(&routes, head, 1).0, "web");
        });
        assert!(at_info(&lines).is_empty(), "{lines:#?}");
        let count = |needle: &str| lines.iter().filter(|l| l.contains(needle)).count();
        assert_eq!(count("is a TLS ClientHello"), 1, "{lines:#?}");
        assert_eq!(count("server_name=a.example.com alpn=h2"), 1, "{lines:#?}");
        assert_eq!(count("is an HTTP/1.1 request"), 1, "{lines:#?}");
        assert_eq!(count("not a TLS ClientHello"), 1, "{lines:#?}");
        assert_eq!(count("not an HTTP/1.x request"), 1, "{lines:#?}");
    }

    /// xorshift64: deterministic, so a failure reproduces.
    struct Garbage(u64);

    impl Garbage {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }

        fn bytes(&mut self, len: usize) -> Vec<u8> {
            // A small alphabet makes partial agreement with the matchers likely, so the
            // NeedMore and Match paths get exercised, not just NoMatch.
            const ALPHABET: &[u8] = b"GET 60\x00\xff*";
            (0..len)
                .map(|_| ALPHABET[(self.next() % ALPHABET.len() as u64) as usize])
                .collect()
        }
    }

    #[test]
    fn garbage_never_panics_and_complete_always_decides() {
        let with_default = table(vec![
            route("get", vec![prefix(b"GET ")], &[9001]),
            route(
                "tag",
                vec![at(20, b"600"), Matcher::Length { min: 290, max: 294 }],
                &[9002],
            ),
            route("far", vec![at(usize::MAX - 2, b"GET")], &[9003]),
            route("beyond", vec![at(usize::MAX, b"*")], &[9004]),
            route(
                "short",
                vec![Matcher::Length { min: 0, max: 2 }, prefix(b"*")],
                &[9005],
            ),
            route(
                "empty-prefix",
                vec![
                    prefix(b""),
                    Matcher::Length {
                        min: 1000,
                        max: 1000,
                    },
                ],
                &[9006],
            ),
            default_route("fallback", &[9009]),
        ]);
        let without_default = table(vec![
            route(
                "tag",
                vec![
                    at(3, b"60"),
                    Matcher::Length {
                        min: 5,
                        max: usize::MAX,
                    },
                ],
                &[9002],
            ),
            route("beyond", vec![at(usize::MAX, b"*")], &[9004]),
            route("tls", vec![sni("*.example.com"), alpn(&["h2"])], &[9005]),
            route("http", vec![http_host("b"), path_prefix("/a")], &[9006]),
            route("regex", vec![regex(r"^G[E ]+6")], &[9007]),
        ]);

        let mut garbage = Garbage(0x9e37_79b9_7f4a_7c15);
        for round in 0..20_000 {
            let len = match round % 4 {
                0 => (garbage.next() % 8) as usize,
                1 => (garbage.next() % 40) as usize,
                2 => 285 + (garbage.next() % 12) as usize,
                _ => (garbage.next() % 1100) as usize,
            };
            let bytes = garbage.bytes(len);
            for routes in [&with_default, &without_default] {
                routes.decide(&partial(&bytes));
                let decision = routes.decide(&complete(&bytes));
                assert_ne!(decision, Decision::NeedMore, "complete {bytes:?}");
            }
            assert!(matches!(
                with_default.decide(&complete(&bytes)),
                Decision::Forward(_)
            ));
        }
    }
}
