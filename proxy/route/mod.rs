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
//!
//! Each file owns one concept:
//! - router.rs: the interface, [`Router`]: a [`FirstMessage`] in, a [`Decision`] out.
//! - matcher.rs: one test on a first message, [`Matcher`], and its [`Verdict`].
//! - inspection.rs: one first message as the matchers see it, with the protocol parses
//!   they asked for ([`Parsed`]), whether it kept the protocol it claimed, and the log
//!   of what the parsers found.
//! - table.rs: [`RouteTable`], the router built from routes.toml, and [`OnUnparsed`].
//! - tls.rs, http.rs: the ClientHello and request head parsers; host.rs the host name
//!   patterns of `sni` and `http_host`; path.rs request path normalization; regex.rs
//!   the `regex` matcher.

pub mod host;
pub mod http;
mod inspection;
mod matcher;
pub mod path;
mod regex;
mod router;
mod table;
pub mod tls;

pub use self::host::{HostPattern, HostPatternError};
pub use self::inspection::Parsed;
pub use self::matcher::{Matcher, Verdict};
pub use self::path::PathForm;
pub use self::regex::{MessageRegex, RegexError};
pub use self::router::{Decision, FirstMessage, Forward, Router};
pub use self::table::{OnUnparsed, RouteTable};
