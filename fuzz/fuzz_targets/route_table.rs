//! A route table with every kind of matcher, asked the way the server asks: after each
//! read of a first message split into reads by the input, then once more when nothing
//! more will come; once with `on_unparsed = "default"` and once with `"reset"`. It must
//! not panic, must decide once the message is complete (forward, or reset when the
//! table resets unparsed messages), and every matcher whose answer is monotone (all but
//! min/max_length, and regexes without end anchors) must keep an answer once it has
//! given one.
#![no_main]

use std::net::SocketAddr;
use std::path::Path;
use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;
use splice_proxy::backend::Backends;
use splice_proxy::config::Config;
use splice_proxy::route::{
    Decision, FirstMessage, Matcher, OnUnparsed, RouteTable, Router, Verdict,
};

const ROUTES: &str = r#"
first_message_max = 4096

[[route]]
name = "tls-a"
sni = "a.example.com"
backends = ["127.0.0.1:9001"]
[[route]]
name = "tls-wild-h2"
sni = "*.example.com"
alpn = ["h2"]
backends = ["127.0.0.1:9002"]
[[route]]
name = "web"
http_host = "*.b.example.com"
http_path_prefix = "/api/"
backends = ["127.0.0.1:9003"]
[[route]]
name = "get"
regex = '^(GET|HEAD) /[a-z]+ '
backends = ["127.0.0.1:9004"]
[[route]]
name = "tagged"
at = 3
bytes = "\u0001"
min_length = 8
backends = ["127.0.0.1:9005"]
[[route]]
name = "fallback"
default = true
backends = ["127.0.0.1:9009"]
"#;

static CONFIG: LazyLock<Config> = LazyLock::new(|| {
    Config::parse(ROUTES, Path::new("fuzz-routes.toml")).expect("the fuzz routes parse")
});
// One set for both tables, as one proxy has: a target is equal to another only if it
// carries the same backend's state.
static BACKENDS: LazyLock<Backends> = LazyLock::new(Backends::new);
static TABLE: LazyLock<RouteTable> = LazyLock::new(|| RouteTable::new(&CONFIG, &BACKENDS));
static RESETTING: LazyLock<RouteTable> = LazyLock::new(|| {
    RouteTable::new(
        &Config {
            on_unparsed: OnUnparsed::Reset,
            ..CONFIG.clone()
        },
        &BACKENDS,
    )
});
const CLIENT: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 1);

fuzz_target!(|input: &[u8]| {
    // The first byte says how long the reads are; the rest is the message.
    let Some((&step, message)) = input.split_first() else {
        return;
    };
    let step = usize::from(step % 64) + 1;
    let lenient = decide_in_steps(&TABLE, message, step);
    assert!(matches!(lenient, Decision::Forward(_)), "{lenient:?}");
    let strict = decide_in_steps(&RESETTING, message, step);
    assert!(
        matches!(strict, Decision::Forward(_) | Decision::Reset),
        "{strict:?}"
    );
    // Resetting only ever takes from the default route what it would have had.
    if let Decision::Forward(forward) = &strict {
        assert_eq!(strict, lenient, "{}", forward.route);
    }

    for route in &CONFIG.routes {
        for matcher in &route.matchers {
            if matches!(matcher, Matcher::Length { .. }) {
                continue;
            }
            let whole = matcher.check(message);
            let early = matcher.check(&message[..message.len() / 2]);
            assert!(
                early == Verdict::NeedMore || early == whole,
                "{matcher}: {early:?} on half of the message, {whole:?} on all of it"
            );
        }
    }
});

/// What the server ends up with: asks after every `step` bytes, then once more with the
/// message complete if nothing was decided.
fn decide_in_steps(table: &RouteTable, message: &[u8], step: usize) -> Decision {
    let mut len = 0;
    while len < message.len() {
        len = (len + step).min(message.len());
        let decision = table.decide(&FirstMessage {
            bytes: &message[..len],
            complete: false,
            client: CLIENT,
        });
        if decision != Decision::NeedMore {
            return decision;
        }
    }
    table.decide(&FirstMessage {
        bytes: message,
        complete: true,
        client: CLIENT,
    })
}
