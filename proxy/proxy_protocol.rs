//! The PROXY protocol header (HAProxy's proxy-protocol.txt) that a route with
//! `send_proxy` writes to its backend before the first message, so that the backend
//! sees the real client's address instead of the proxy's. The bytes are the `ppp`
//! crate's; this module chooses the version and the addresses.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::str::FromStr;

use ppp::{v1, v2};

/// Which header a route sends: `send_proxy = "v1" | "v2"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ProxyProtocol {
    /// The text header: `PROXY TCP4 client proxy client-port proxy-port\r\n`.
    V1,
    /// The binary header: PROXY command, STREAM over AF_INET or AF_INET6, no TLVs.
    V2,
}

impl ProxyProtocol {
    /// Its routes.toml name.
    pub fn name(self) -> &'static str {
        match self {
            ProxyProtocol::V1 => "v1",
            ProxyProtocol::V2 => "v2",
        }
    }

    /// The header for a TCP connection from `client` to `local`, the proxy's address
    /// that the client connected to. An IPv4 client of an IPv6 listener (both
    /// addresses v4-mapped) is described as the IPv4 connection it is.
    pub fn header(self, client: SocketAddr, local: SocketAddr) -> io::Result<Vec<u8>> {
        let (client, local) = match (unmap(client), unmap(local)) {
            (c @ SocketAddr::V4(_), l @ SocketAddr::V4(_)) => (c, l),
            _ => (client, local),
        };
        match self {
            ProxyProtocol::V1 => Ok(v1::Addresses::from((client, local))
                .to_string()
                .into_bytes()),
            ProxyProtocol::V2 => v2::Builder::with_addresses(
                v2::Version::Two | v2::Command::Proxy,
                v2::Protocol::Stream,
                (client, local),
            )
            .build(),
        }
    }
}

fn unmap(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

impl fmt::Display for ProxyProtocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Why a `send_proxy` value was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a PROXY protocol version (expected \"v1\" or \"v2\")")]
pub struct ParseProxyProtocolError(String);

impl FromStr for ProxyProtocol {
    type Err = ParseProxyProtocolError;

    fn from_str(name: &str) -> Result<Self, Self::Err> {
        match name {
            "v1" => Ok(ProxyProtocol::V1),
            "v2" => Ok(ProxyProtocol::V2),
            _ => Err(ParseProxyProtocolError(name.to_owned())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The v2 signature, section 2.2 of proxy-protocol.txt.
    const SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";

    #[test]
    fn v1_is_the_specification_text() {
        // Section 2.1's examples.
        let header = ProxyProtocol::V1
            .header(
                "192.168.0.1:56324".parse().unwrap(),
                "192.168.0.11:443".parse().unwrap(),
            )
            .unwrap();
        assert_eq!(header, b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n");
        let header = ProxyProtocol::V1
            .header(
                "[2001:db8::1]:56324".parse().unwrap(),
                "[::1]:443".parse().unwrap(),
            )
            .unwrap();
        assert_eq!(header, b"PROXY TCP6 2001:db8::1 ::1 56324 443\r\n");
    }

    #[test]
    fn v2_is_the_specification_layout_byte_for_byte() {
        let header = ProxyProtocol::V2
            .header(
                "192.168.0.1:56324".parse().unwrap(),
                "192.168.0.11:443".parse().unwrap(),
            )
            .unwrap();
        let mut expected = SIGNATURE.to_vec();
        expected.extend([
            0x21, // version 2, PROXY
            0x11, // AF_INET, STREAM
            0, 12, // address block length, network order
            192, 168, 0, 1, // source address
            192, 168, 0, 11, // destination address
            0xdc, 0x04, // source port 56324
            0x01, 0xbb, // destination port 443
        ]);
        assert_eq!(header, expected);

        let header = ProxyProtocol::V2
            .header(
                "[2001:db8::1]:56324".parse().unwrap(),
                "[::1]:443".parse().unwrap(),
            )
            .unwrap();
        let mut expected = SIGNATURE.to_vec();
        expected.extend([0x21, 0x21, 0, 36]); // AF_INET6, STREAM, 36 bytes
        expected.extend([0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
        expected.extend([0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
        expected.extend([0xdc, 0x04, 0x01, 0xbb]);
        assert_eq!(header, expected);
    }

    #[test]
    fn a_v4_client_of_a_v6_listener_is_described_as_ipv4() {
        let client = "[::ffff:10.0.0.1]:40000".parse().unwrap();
        let local = "[::ffff:10.0.0.2]:443".parse().unwrap();
        assert_eq!(
            ProxyProtocol::V1.header(client, local).unwrap(),
            b"PROXY TCP4 10.0.0.1 10.0.0.2 40000 443\r\n"
        );
        assert_eq!(ProxyProtocol::V2.header(client, local).unwrap()[13], 0x11);
    }

    #[test]
    fn names_round_trip_and_others_are_refused() {
        for version in [ProxyProtocol::V1, ProxyProtocol::V2] {
            assert_eq!(version.name().parse(), Ok(version));
        }
        let error = "2".parse::<ProxyProtocol>().unwrap_err();
        assert_eq!(
            error.to_string(),
            r#""2" is not a PROXY protocol version (expected "v1" or "v2")"#
        );
    }
}
