//! The router built from routes.toml: [`RouteTable`] tries a [`Config`]'s routes in
//! file order, each with its own [`Balancer`], and [`OnUnparsed`] says what it does with
//! a first message that broke the protocol it claimed.
//!
//! A file of its own, apart from the matchers because the order of routes, the default route and what an
//! unparsed message gets are decisions between routes, not about any one of them.

use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;

use crate::backend::Backends;
use crate::balance::Balancer;
use crate::config::Config;
use crate::proxy_protocol::ProxyProtocol;

use super::inspection::{Claim, Inspection};
use super::matcher::{Matcher, Verdict};
use super::router::{Decision, FirstMessage, Forward, Router};

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
    /// Brings `backends` to the config's addresses and health checks
    /// ([`Backends::track`]), and routes to the states it keeps for them: the table a
    /// proxy builds from its set at start and at each reload.
    ///
    /// [`Config::parse`] allows one default route; should a hand-built `Config` hold
    /// several, the first is the default and the others are never used.
    pub fn new(config: &Config, backends: &Backends) -> RouteTable {
        backends.track(
            config.routes.iter().flat_map(|route| {
                (route.backends.iter()).map(|backend| (backend.addr, route.health))
            }),
        );
        let mut routes = Vec::with_capacity(config.routes.len());
        let mut default = None;
        for route in &config.routes {
            let table_route = TableRoute {
                name: Arc::from(route.name.as_str()),
                matchers: route.matchers.clone(),
                balancer: Balancer::new(route.balance, route.backends.clone(), backends),
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
pub(super) mod tests {
    use std::time::Duration;

    use super::*;
    use crate::backend::HealthCheck;
    use crate::balance::Balance;
    use crate::config::RouteConfig;
    use crate::route::matcher::tests::{
        alpn, at, http_host, path_prefix, path_prefix_as_sent, prefix, regex, sni,
    };
    use crate::route::router::tests::{backend, complete, outcome, partial};
    use crate::route::tls::tests::client_hello;

    pub(in crate::route) fn route(
        name: &str,
        matchers: Vec<Matcher>,
        ports: &[u16],
    ) -> RouteConfig {
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

    pub(in crate::route) fn default_route(name: &str, ports: &[u16]) -> RouteConfig {
        RouteConfig {
            default: true,
            ..route(name, Vec::new(), ports)
        }
    }

    pub(in crate::route) fn table(routes: Vec<RouteConfig>) -> RouteTable {
        table_on_unparsed(OnUnparsed::Default, routes)
    }

    fn table_on_unparsed(on_unparsed: OnUnparsed, routes: Vec<RouteConfig>) -> RouteTable {
        RouteTable::new(
            &Config {
                first_message_timeout: Duration::from_secs(3),
                first_message_max: 16384,
                connect_timeout: Duration::from_secs(2),
                health: HealthCheck::OFF,
                max_connections: None,
                idle_timeout: None,
                on_unparsed,
                splice_backlog_max: crate::config::DEFAULT_SPLICE_BACKLOG_MAX,
                splice_backlog_total: crate::config::DEFAULT_SPLICE_BACKLOG_TOTAL,
                routes,
            },
            &Backends::new(),
        )
    }

    /// What the server does: asks after every `step` bytes until the router decides,
    /// then once more with `complete` if it never did. Returns the outcome and the bytes
    /// it took.
    pub(in crate::route) fn fed_in_steps(
        routes: &RouteTable,
        message: &[u8],
        step: usize,
    ) -> (String, usize) {
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
