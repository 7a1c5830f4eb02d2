//! Matchers and the route table: which route a connection's first message belongs to.
//!
//! The server reads a connection's first message a piece at a time and asks a [`Router`]
//! after each read. The answer is a route with its backends in the order to try them,
//! "read more", or "close it". [`RouteTable`] is the router built from routes.toml; a
//! program embedding the library can pass its own function instead.
//!
//! Everything here runs on bytes a client chose, so nothing may panic: offsets are
//! checked, never trusted.

use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;

use crate::balance::Balancer;
use crate::config::Config;

/// One test on a first message. A route holds one or more; all must hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Matcher {
    /// The message starts with these bytes.
    Prefix(Vec<u8>),
    /// These bytes sit at this offset of the message.
    At { offset: usize, bytes: Vec<u8> },
    /// The message is `min..=max` bytes long. "Long" means the bytes received when the
    /// route is decided: a client that sends its first message in one write is routed on
    /// that write's length, whatever it sends afterwards.
    Length { min: usize, max: usize },
}

/// What one matcher, or one route, makes of the bytes received so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
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
        }
    }
}

/// A connection's first message as read so far.
#[derive(Debug, Clone, Copy)]
pub struct FirstMessage<'a> {
    pub bytes: &'a [u8],
    /// No more bytes will be read before routing: the read reached `first_message_max`,
    /// `first_message_timeout` passed, or the client half-closed. A router must then give
    /// a final answer, never [`Decision::NeedMore`].
    pub complete: bool,
    pub client: SocketAddr,
}

/// Where a connection goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Forward(Forward),
    /// Read more of the first message and ask again.
    NeedMore,
    /// Close the connection.
    Reject,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Forward {
    /// The route's name, for logs and metrics.
    pub route: Arc<str>,
    /// Every backend of the route, in the order to try them.
    pub backends: Vec<SocketAddr>,
}

/// Decides where a connection goes from its first message.
///
/// [`RouteTable`] is the one built from routes.toml. A program embedding the library can
/// route with its own logic by passing a closure:
///
/// ```
/// use splice_proxy::route::{Decision, FirstMessage, Forward, Router};
///
/// let backend = "127.0.0.1:6379".parse().unwrap();
/// let router = move |first: &FirstMessage<'_>| match first.bytes.first() {
///     Some(b'*') => Decision::Forward(Forward { route: "redis".into(), backends: vec![backend] }),
///     Some(_) => Decision::Reject,
///     None if first.complete => Decision::Reject,
///     None => Decision::NeedMore,
/// };
/// fn takes_router(_: impl Router) {}
/// takes_router(router);
/// ```
pub trait Router: Send + Sync + 'static {
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
}

#[derive(Debug)]
struct TableRoute {
    name: Arc<str>,
    matchers: Vec<Matcher>,
    balancer: Balancer,
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
                balancer: Balancer::new(route.balance, route.backends.clone()),
            };
            if !route.default {
                routes.push(table_route);
            } else if default.is_none() {
                default = Some(table_route);
            }
        }
        RouteTable { routes, default }
    }

    fn fall_back(&self, client: SocketAddr) -> Decision {
        match &self.default {
            Some(route) => Decision::Forward(route.forward(client)),
            None => Decision::Reject,
        }
    }
}

impl TableRoute {
    fn verdict(&self, first: &FirstMessage<'_>) -> Verdict {
        let verdict = self
            .matchers
            .iter()
            .map(|matcher| matcher.check(first.bytes))
            .fold(Verdict::Match, Verdict::and);
        match verdict {
            Verdict::NeedMore if first.complete => Verdict::NoMatch,
            verdict => verdict,
        }
    }

    fn forward(&self, client: SocketAddr) -> Forward {
        Forward {
            route: Arc::clone(&self.name),
            backends: self.balancer.order(client),
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
        for route in &self.routes {
            match route.verdict(first) {
                Verdict::Match => return Decision::Forward(route.forward(first.client)),
                Verdict::NeedMore => return Decision::NeedMore,
                Verdict::NoMatch => {}
            }
        }
        self.fall_back(first.client)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
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
            backends: ports.iter().map(|&port| backend(port)).collect(),
            balance: Balance::RoundRobin,
        }
    }

    fn default_route(name: &str, ports: &[u16]) -> RouteConfig {
        RouteConfig {
            default: true,
            ..route(name, Vec::new(), ports)
        }
    }

    fn table(routes: Vec<RouteConfig>) -> RouteTable {
        RouteTable::new(&Config {
            first_message_timeout: Duration::from_secs(3),
            first_message_max: 16384,
            connect_timeout: Duration::from_secs(2),
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
