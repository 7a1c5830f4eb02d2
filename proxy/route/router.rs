//! What the server asks of whatever routes: a connection's [`FirstMessage`] in, a
//! [`Decision`] out, through the [`Router`] trait.
//!
//! A file of its own, apart from the route table because it is the whole contract: a program embedding the
//! library routes with its own closure through these types and needs nothing else here.

use std::net::SocketAddr;
use std::sync::Arc;

use crate::backend::Target;
use crate::proxy_protocol::ProxyProtocol;

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
    /// table does this for [`OnUnparsed::Reset`](crate::route::OnUnparsed::Reset)).
    Reset,
}

/// Where a forwarded connection goes: a route and its backends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Forward {
    /// The route's name, for logs and metrics.
    pub route: Arc<str>,
    /// Every backend of the route, in the order to try them. A route table's carry the
    /// state its proxy keeps for each; a custom router's are addresses
    /// (`Target::from(addr)`), which the proxy does not track.
    pub backends: Vec<Target>,
    /// The PROXY protocol header to write to the backend before the first message.
    pub send_proxy: Option<ProxyProtocol>,
}

/// Decides where a connection goes from its first message.
///
/// [`RouteTable`](crate::route::RouteTable) is the one built from routes.toml. A program
/// embedding the library can route with its own logic by passing a closure:
///
/// ```
/// use splice_proxy::route::{Decision, FirstMessage, Forward, Router};
///
/// let backend = std::net::SocketAddr::from(([127, 0, 0, 1], 6379));
/// let router = move |first: &FirstMessage<'_>| match first.bytes.first() {
///     Some(b'*') => Decision::Forward(Forward {
///         route: "redis".into(),
///         backends: vec![backend.into()],
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

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    const CLIENT: SocketAddr =
        SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 40000);

    pub(in crate::route) fn backend(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    pub(in crate::route) fn partial(bytes: &[u8]) -> FirstMessage<'_> {
        FirstMessage {
            bytes,
            complete: false,
            client: CLIENT,
        }
    }

    pub(in crate::route) fn complete(bytes: &[u8]) -> FirstMessage<'_> {
        FirstMessage {
            bytes,
            complete: true,
            client: CLIENT,
        }
    }

    /// The route a decision forwards to, or "NeedMore" / "Reject".
    pub(in crate::route) fn outcome(decision: Decision) -> String {
        match decision {
            Decision::Forward(forward) => forward.route.to_string(),
            Decision::NeedMore => "NeedMore".to_owned(),
            Decision::Reject => "Reject".to_owned(),
            Decision::Reset => "Reset".to_owned(),
        }
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
                    backends: vec![backend(9001).into()],
                    send_proxy: None,
                })
            } else {
                Decision::NeedMore
            }
        });
        assert_eq!(router.decide(&partial(b"abc")), Decision::NeedMore);
        assert_eq!(outcome(router.decide(&partial(b"abcd"))), "long");
    }
}
