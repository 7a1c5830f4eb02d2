//! The TLS ClientHello: the server name (SNI) and application protocols (ALPN) a client
//! asks for, read from the first message without terminating TLS.
//!
//! Written by hand rather than with a TLS library: reading two extensions out of one
//! handshake message needs record reassembly and a few length-prefixed fields, and the
//! libraries that parse ClientHellos either bring a crypto provider (rustls) or a parser
//! framework with proc macros and build-time code generation (tls-parser), and leave
//! reassembly across records to the caller anyway. Here an incomplete message is told
//! apart from a malformed one at every step, which is what routing needs.
//!
//! TLS 1.0 to 1.3 share this layout (RFC 5246 section 7.4.1.2, RFC 8446 section 4.1.2):
//! records of type 22 (handshake) carry the handshake messages, and the first one a
//! client sends is the ClientHello, which may span several records (and so several TCP
//! segments). The old SSLv2-compatible hello cannot carry extensions, so it is not TLS
//! here.

use super::Parsed;

/// What routing reads from a ClientHello.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ClientHello {
    /// `legacy_version`: 0x0301 for TLS 1.0 ... 0x0303 for TLS 1.2 and 1.3.
    pub legacy_version: u16,
    /// The `supported_versions` extension (TLS 1.3 clients), empty without it.
    pub supported_versions: Vec<u16>,
    /// The `server_name` extension's host_name, as sent (RFC 6066 says ASCII, no
    /// trailing dot; nothing here relies on either).
    pub server_name: Option<Vec<u8>>,
    /// The `application_layer_protocol_negotiation` extension's protocol names, in the
    /// client's order; empty without it.
    pub alpn: Vec<Vec<u8>>,
}

const CONTENT_TYPE_HANDSHAKE: u8 = 22;
const HANDSHAKE_CLIENT_HELLO: u8 = 1;
const RECORD_HEADER_LEN: usize = 5;
const HANDSHAKE_HEADER_LEN: usize = 4;
/// A TLSPlaintext fragment is at most 2^14 bytes (RFC 8446 section 5.1).
const MAX_RECORD_LEN: usize = 1 << 14;
/// The largest body any ClientHello can have: version, random, the longest session id,
/// cipher suite list, compression list and extension block.
const MAX_CLIENT_HELLO_LEN: usize = 2 + 32 + (1 + 32) + (2 + 0xfffe) + (1 + 0xff) + (2 + 0xffff);

const EXTENSION_SERVER_NAME: u16 = 0;
const EXTENSION_ALPN: u16 = 16;
const EXTENSION_SUPPORTED_VERSIONS: u16 = 43;
const SERVER_NAME_TYPE_HOST_NAME: u8 = 0;

/// Reads the ClientHello at the start of `first`, which may hold only part of it.
///
/// [`Parsed::Incomplete`] until the whole handshake message has arrived (bytes after it
/// are not looked at); [`Parsed::Other`] as soon as the first record header says this is
/// not TLS; [`Parsed::Malformed`] when it claims to be TLS but is not a well-formed
/// ClientHello. Never panics, whatever the bytes.
pub fn parse_client_hello(first: &[u8]) -> Parsed<ClientHello> {
    // The handshake message, put back together from the records' payloads.
    let mut handshake: Vec<u8> = Vec::new();
    let mut rest = first;
    let mut record_index = 0;
    loop {
        if let Some(not_tls) = check_record_start(rest, record_index) {
            return not_tls;
        }
        if rest.len() < RECORD_HEADER_LEN {
            return Parsed::Incomplete;
        }
        let length = usize::from(u16::from_be_bytes([rest[3], rest[4]]));
        if length == 0 {
            return Parsed::Malformed("empty handshake record");
        }
        if length > MAX_RECORD_LEN {
            return Parsed::Malformed("record longer than 2^14 bytes");
        }
        let fragment = &rest[RECORD_HEADER_LEN..];
        let (payload, record_complete) = match fragment.get(..length) {
            Some(payload) => (payload, true),
            None => (fragment, false),
        };
        handshake.extend_from_slice(payload);

        if let Some(&message_type) = handshake.first()
            && message_type != HANDSHAKE_CLIENT_HELLO
        {
            return Parsed::Malformed("the first handshake message is not a ClientHello");
        }
        if let Some(header) = handshake.get(..HANDSHAKE_HEADER_LEN) {
            let body_len =
                usize::from(header[1]) << 16 | usize::from(header[2]) << 8 | usize::from(header[3]);
            if body_len > MAX_CLIENT_HELLO_LEN {
                return Parsed::Malformed("ClientHello longer than any valid one");
            }
            if let Some(body) = handshake.get(HANDSHAKE_HEADER_LEN..HANDSHAKE_HEADER_LEN + body_len)
            {
                return match parse_body(body) {
                    Ok(hello) => Parsed::Done(hello),
                    Err(reason) => Parsed::Malformed(reason),
                };
            }
        }
        if !record_complete {
            return Parsed::Incomplete;
        }
        rest = &rest[RECORD_HEADER_LEN + length..];
        record_index += 1;
    }
}

/// Checks the bytes of a record header that have arrived: `Other` if the very first
/// record is not a TLS handshake record, `Malformed` if a later one is not.
fn check_record_start(record: &[u8], index: usize) -> Option<Parsed<ClientHello>> {
    let is_handshake = record.first().is_none_or(|&t| t == CONTENT_TYPE_HANDSHAKE);
    // Every TLS version's record layer says major version 3.
    let is_tls = record.get(1).is_none_or(|&major| major == 3);
    match (is_handshake && is_tls, index) {
        (true, _) => None,
        (false, 0) => Some(Parsed::Other),
        (false, _) => Some(Parsed::Malformed(
            "a record that is not a TLS handshake record before the ClientHello ended",
        )),
    }
}

/// The ClientHello body (after the 4-byte handshake header), complete.
fn parse_body(body: &[u8]) -> Result<ClientHello, &'static str> {
    let mut reader = Reader(body);
    let legacy_version = reader
        .u16()
        .ok_or("ClientHello too short for its version")?;
    if legacy_version >> 8 != 3 {
        return Err("ClientHello version is not TLS");
    }
    reader
        .take(32)
        .ok_or("ClientHello too short for its random")?;
    let session_id = reader.vec8().ok_or("truncated session id")?;
    if session_id.len() > 32 {
        return Err("session id longer than 32 bytes");
    }
    let cipher_suites = reader.vec16().ok_or("truncated cipher suites")?;
    if cipher_suites.is_empty() || cipher_suites.len() % 2 != 0 {
        return Err("cipher suite list empty or of odd length");
    }
    let compression = reader.vec8().ok_or("truncated compression methods")?;
    if compression.is_empty() {
        return Err("no compression methods");
    }
    let mut hello = ClientHello {
        legacy_version,
        ..ClientHello::default()
    };
    if reader.0.is_empty() {
        // Before TLS 1.3 the extension block may be left out altogether.
        return Ok(hello);
    }
    let mut extensions = Reader(reader.vec16().ok_or("truncated extension block")?);
    if !reader.0.is_empty() {
        return Err("bytes after the extension block");
    }
    let mut seen: Vec<u16> = Vec::new();
    while !extensions.0.is_empty() {
        let kind = extensions.u16().ok_or("truncated extension header")?;
        let data = extensions.vec16().ok_or("truncated extension")?;
        seen.push(kind);
        match kind {
            EXTENSION_SERVER_NAME => hello.server_name = Some(server_name(data)?),
            EXTENSION_ALPN => hello.alpn = alpn(data)?,
            EXTENSION_SUPPORTED_VERSIONS => hello.supported_versions = supported_versions(data)?,
            _ => {}
        }
    }
    seen.sort_unstable();
    if seen.windows(2).any(|pair| pair[0] == pair[1]) {
        // RFC 8446 section 4.2, and so that no two names can be read from one hello.
        return Err("an extension appears twice");
    }
    Ok(hello)
}

/// RFC 6066 section 3: a list of (name_type, name); the one host_name is the name.
fn server_name(data: &[u8]) -> Result<Vec<u8>, &'static str> {
    let mut whole = Reader(data);
    let mut list = Reader(whole.vec16().ok_or("truncated server_name list")?);
    if !whole.0.is_empty() {
        return Err("bytes after the server_name list");
    }
    let mut host_name = None;
    while !list.0.is_empty() {
        let name_type = list.u8().ok_or("truncated server_name entry")?;
        let name = list.vec16().ok_or("truncated server_name entry")?;
        if name_type != SERVER_NAME_TYPE_HOST_NAME {
            continue;
        }
        if name.is_empty() {
            return Err("empty server_name host_name");
        }
        if host_name.replace(name).is_some() {
            return Err("more than one server_name host_name");
        }
    }
    host_name
        .map(<[u8]>::to_vec)
        .ok_or("server_name extension without a host_name")
}

/// RFC 7301 section 3.1: a non-empty list of non-empty protocol names.
fn alpn(data: &[u8]) -> Result<Vec<Vec<u8>>, &'static str> {
    let mut whole = Reader(data);
    let mut list = Reader(whole.vec16().ok_or("truncated ALPN list")?);
    if !whole.0.is_empty() || list.0.is_empty() {
        return Err("ALPN list empty or followed by other bytes");
    }
    let mut protocols = Vec::new();
    while !list.0.is_empty() {
        let name = list.vec8().ok_or("truncated ALPN protocol name")?;
        if name.is_empty() {
            return Err("empty ALPN protocol name");
        }
        protocols.push(name.to_vec());
    }
    Ok(protocols)
}

/// RFC 8446 section 4.2.1: a non-empty list of 2-byte versions.
fn supported_versions(data: &[u8]) -> Result<Vec<u16>, &'static str> {
    let mut whole = Reader(data);
    let list = whole.vec8().ok_or("truncated supported_versions")?;
    if !whole.0.is_empty() || list.is_empty() || list.len() % 2 != 0 {
        return Err("supported_versions list empty, of odd length or followed by other bytes");
    }
    Ok(list
        .chunks_exact(2)
        .map(|pair| u16::from_be_bytes([pair[0], pair[1]]))
        .collect())
}

/// Reads big-endian fields off the front of a complete structure; `None` when it is
/// shorter than a field says.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, len: usize) -> Option<&'a [u8]> {
        let taken = self.0.get(..len)?;
        self.0 = &self.0[len..];
        Some(taken)
    }

    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|bytes| bytes[0])
    }

    fn u16(&mut self) -> Option<u16> {
        self.take(2)
            .map(|bytes| u16::from_be_bytes([bytes[0], bytes[1]]))
    }

    /// A field with a 1-byte length prefix.
    fn vec8(&mut self) -> Option<&'a [u8]> {
        let len = self.u8()?;
        self.take(usize::from(len))
    }

    /// A field with a 2-byte length prefix.
    fn vec16(&mut self) -> Option<&'a [u8]> {
        let len = self.u16()?;
        self.take(usize::from(len))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Captured from `openssl s_client -servername a.example.com -alpn h2,http/1.1` with
    /// `-tls1`, `-tls1_2` and `-tls1_3` (OpenSSL 3.0), as it reached the socket.
    const OPENSSL_TLS1_0: &str = "\
        160301008b010000870301ef96205992888b45a5a5e2b5ba3e9f95c108da5362eecdfffd3caf1bf73de628000012c00a\
        c0140039c009c01300330035002f00ff0100004c00000012001000000d612e6578616d706c652e636f6d000b00040300\
        0102000a000c000a001d0017001e00190018002300000010000e000c02683208687474702f312e310016000000170000";
    const OPENSSL_TLS1_2: &str = "\
        16030100df010000db03030aaa8baaf2d671a6195c7eb01390fd35d90c84e5196ab06036e8ac79d1554216000038c02c\
        c030009fcca9cca8ccaac02bc02f009ec024c028006bc023c0270067c00ac0140039c009c0130033009d009c003d003c\
        0035002f00ff0100007a00000012001000000d612e6578616d706c652e636f6d000b000403000102000a000c000a001d\
        0017001e00190018002300000010000e000c02683208687474702f312e310016000000170000000d002a002804030503\
        0603080708080809080a080b080408050806040105010601030303010302040205020602";
    const OPENSSL_TLS1_3: &str = "\
        1603010104010001000303a68d89c0df361b43fc8661971a40b78137beb5f69153d73011a9e501f60b4e032053e0b84c\
        6374b4108b2e623bd452637be3bbbd430398fbe1302c1c48772129ae000813021303130100ff010000af000000120010\
        00000d612e6578616d706c652e636f6d000b000403000102000a00160014001d0017001e001900180100010101020103\
        0104002300000010000e000c02683208687474702f312e310016000000170000000d001e001c04030503060308070808\
        0809080a080b080408050806040105010601002b0003020304002d00020101003300260024001d0020b4a0db1b3388c0\
        351c835702370edae5081a2252f2ca936f6d1a1b73c0e42072";

    fn hex(text: &str) -> Vec<u8> {
        (0..text.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&text[i..i + 2], 16).unwrap())
            .collect()
    }

    fn done(first: &[u8]) -> ClientHello {
        match parse_client_hello(first) {
            Parsed::Done(hello) => hello,
            other => panic!("{other:?}"),
        }
    }

    fn malformed(first: &[u8]) -> &'static str {
        match parse_client_hello(first) {
            Parsed::Malformed(reason) => reason,
            other => panic!("{other:?}"),
        }
    }

    /// A ClientHello body: `legacy_version`, a fixed random, no session id, one cipher
    /// suite, null compression, and the extensions (the block left out if `None`).
    fn body(legacy_version: u16, extensions: Option<&[(u16, Vec<u8>)]>) -> Vec<u8> {
        let mut body = legacy_version.to_be_bytes().to_vec();
        body.extend([7; 32]);
        body.extend([0, 0, 2, 0x13, 0x01, 1, 0]);
        if let Some(extensions) = extensions {
            let mut block = Vec::new();
            for (kind, data) in extensions {
                block.extend(kind.to_be_bytes());
                block.extend(u16::try_from(data.len()).unwrap().to_be_bytes());
                block.extend(data);
            }
            body.extend(u16::try_from(block.len()).unwrap().to_be_bytes());
            body.extend(block);
        }
        body
    }

    fn with_len16(data: &[u8]) -> Vec<u8> {
        let mut out = u16::try_from(data.len()).unwrap().to_be_bytes().to_vec();
        out.extend(data);
        out
    }

    fn sni(names: &[(u8, &[u8])]) -> (u16, Vec<u8>) {
        let mut list = Vec::new();
        for (kind, name) in names {
            list.push(*kind);
            list.extend(with_len16(name));
        }
        (EXTENSION_SERVER_NAME, with_len16(&list))
    }

    fn alpn_ext(names: &[&[u8]]) -> (u16, Vec<u8>) {
        let mut list = Vec::new();
        for name in names {
            list.push(u8::try_from(name.len()).unwrap());
            list.extend(*name);
        }
        (EXTENSION_ALPN, with_len16(&list))
    }

    /// The handshake message around a body.
    fn handshake(body: &[u8]) -> Vec<u8> {
        let len = u32::try_from(body.len()).unwrap().to_be_bytes();
        let mut message = vec![HANDSHAKE_CLIENT_HELLO, len[1], len[2], len[3]];
        message.extend(body);
        message
    }

    /// `message` cut into handshake records of at most `fragment` bytes.
    fn records(message: &[u8], record_version: u16, fragment: usize) -> Vec<u8> {
        let mut out = Vec::new();
        for chunk in message.chunks(fragment) {
            out.push(CONTENT_TYPE_HANDSHAKE);
            out.extend(record_version.to_be_bytes());
            out.extend(with_len16(chunk));
        }
        out
    }

    fn hello(extensions: &[(u16, Vec<u8>)]) -> Vec<u8> {
        records(&handshake(&body(0x0303, Some(extensions))), 0x0301, 1 << 14)
    }

    /// A TLS 1.2-style ClientHello in one record, with these server name and ALPN
    /// protocols (each extension left out when `None` or empty).
    pub(crate) fn client_hello(server_name: Option<&str>, alpn: &[&str]) -> Vec<u8> {
        let mut extensions = Vec::new();
        if let Some(name) = server_name {
            extensions.push(sni(&[(0, name.as_bytes())]));
        }
        if !alpn.is_empty() {
            let names: Vec<&[u8]> = alpn.iter().map(|name| name.as_bytes()).collect();
            extensions.push(alpn_ext(&names));
        }
        hello(&extensions)
    }

    #[test]
    fn reads_openssl_hellos_for_tls_1_0_1_2_and_1_3() {
        for (capture, version, supported) in [
            (OPENSSL_TLS1_0, 0x0301, &[][..]),
            (OPENSSL_TLS1_2, 0x0303, &[][..]),
            (OPENSSL_TLS1_3, 0x0303, &[0x0304][..]),
        ] {
            let hello = done(&hex(capture));
            assert_eq!(hello.legacy_version, version);
            assert_eq!(hello.supported_versions, supported);
            assert_eq!(hello.server_name.as_deref(), Some(&b"a.example.com"[..]));
            assert_eq!(hello.alpn, [b"h2".to_vec(), b"http/1.1".to_vec()]);
        }
    }

    #[test]
    fn byte_by_byte_is_incomplete_until_the_last_byte() {
        for capture in [OPENSSL_TLS1_0, OPENSSL_TLS1_2, OPENSSL_TLS1_3] {
            let bytes = hex(capture);
            for len in 0..bytes.len() {
                assert_eq!(
                    parse_client_hello(&bytes[..len]),
                    Parsed::Incomplete,
                    "{len}"
                );
            }
            let whole = done(&bytes);
            // What follows the ClientHello (early data, a second flight) is not read.
            let mut more = bytes.clone();
            more.extend(b"\x17\x03\x03\x00\x05hello");
            assert_eq!(done(&more), whole);
        }
    }

    #[test]
    fn reassembles_a_hello_split_across_records() {
        let message = handshake(&body(
            0x0303,
            Some(&[sni(&[(0, b"b.example.com")]), alpn_ext(&[b"h2"])]),
        ));
        for fragment in [1, 2, 3, 4, 5, 7, 50, message.len() - 1, message.len()] {
            let split = records(&message, 0x0303, fragment);
            for len in 0..split.len() {
                assert_eq!(
                    parse_client_hello(&split[..len]),
                    Parsed::Incomplete,
                    "fragment {fragment}, {len} bytes"
                );
            }
            let hello = done(&split);
            assert_eq!(hello.server_name.as_deref(), Some(&b"b.example.com"[..]));
            assert_eq!(hello.alpn, [b"h2".to_vec()]);
        }
        // The captured TLS 1.3 hello, re-recorded 10 bytes at a time.
        let captured = hex(OPENSSL_TLS1_3);
        let split = records(&captured[5..], 0x0301, 10);
        assert_eq!(done(&split), done(&captured));
    }

    #[test]
    fn every_record_version_of_tls_and_ssl3() {
        for record_version in [0x0300, 0x0301, 0x0302, 0x0303] {
            for legacy_version in [0x0300, 0x0301, 0x0302, 0x0303] {
                let message = handshake(&body(legacy_version, Some(&[sni(&[(0, b"x")])])));
                let hello = done(&records(&message, record_version, 1 << 14));
                assert_eq!(hello.legacy_version, legacy_version);
                assert_eq!(hello.server_name.as_deref(), Some(&b"x"[..]));
            }
        }
    }

    #[test]
    fn hellos_without_sni_alpn_or_any_extension() {
        assert_eq!(
            done(&hello(&[])),
            ClientHello {
                legacy_version: 0x0303,
                ..ClientHello::default()
            }
        );
        let no_block = records(&handshake(&body(0x0301, None)), 0x0301, 100);
        assert_eq!(done(&no_block).server_name, None);
        // A server_name extension must carry a host_name.
        assert_eq!(
            malformed(&hello(&[sni(&[(7, b"opaque")])])),
            "server_name extension without a host_name"
        );
        let alpn_only = done(&hello(&[alpn_ext(&[b"h2", b"acme-tls/1"])]));
        assert_eq!(alpn_only.server_name, None);
        assert_eq!(alpn_only.alpn, [b"h2".to_vec(), b"acme-tls/1".to_vec()]);
    }

    #[test]
    fn other_protocols_are_told_at_the_first_bytes() {
        for other in [
            &b"GET / HTTP/1.1\r\n"[..],
            b"G",
            b"\x15\x03\x03\x00\x02\x02\x28", // an alert record
            b"\x16\x02",                     // not major version 3
            b"\x80\x2e\x01\x00\x02",         // SSLv2-compatible hello
            b"\x00",
        ] {
            assert_eq!(parse_client_hello(other), Parsed::Other, "{other:?}");
        }
        for so_far in [&b""[..], b"\x16", b"\x16\x03", b"\x16\x03\x01\x02"] {
            assert_eq!(parse_client_hello(so_far), Parsed::Incomplete, "{so_far:?}");
        }
    }

    #[test]
    fn malformed_hellos_are_told_apart_from_incomplete_ones() {
        let good = hello(&[sni(&[(0, b"a.example.com")])]);
        let garbled = |offset: usize, byte: u8| {
            let mut bytes = good.clone();
            bytes[offset] = byte;
            bytes
        };
        assert_eq!(malformed(b"\x16\x03\x01\x00\x00"), "empty handshake record");
        assert_eq!(
            malformed(b"\x16\x03\x01\x40\x01"),
            "record longer than 2^14 bytes"
        );
        assert_eq!(
            malformed(&garbled(5, 2)),
            "the first handshake message is not a ClientHello"
        );
        assert_eq!(malformed(&garbled(9, 4)), "ClientHello version is not TLS");
        assert_eq!(
            malformed(&garbled(6, 0xff)),
            "ClientHello longer than any valid one"
        );
        // A session id that claims more bytes than the message has.
        assert_eq!(malformed(&garbled(43, 200)), "truncated session id");
        // A record of another type before the hello is complete.
        let message = handshake(&body(0x0303, Some(&[sni(&[(0, b"a")])])));
        let mut interleaved = records(&message[..10], 0x0303, 100);
        interleaved.extend(b"\x17\x03\x03\x00\x01x");
        interleaved.extend(records(&message[10..], 0x0303, 100));
        assert_eq!(
            malformed(&interleaved),
            "a record that is not a TLS handshake record before the ClientHello ended"
        );
        assert_eq!(
            malformed(&hello(&[sni(&[(0, b"a"), (0, b"b")])])),
            "more than one server_name host_name"
        );
        assert_eq!(
            malformed(&hello(&[sni(&[(0, b"a")]), sni(&[(0, b"b")])])),
            "an extension appears twice"
        );
        assert_eq!(
            malformed(&hello(&[sni(&[(0, b"")])])),
            "empty server_name host_name"
        );
        assert_eq!(
            malformed(&hello(&[(EXTENSION_SERVER_NAME, vec![])])),
            "truncated server_name list"
        );
        assert_eq!(
            malformed(&hello(&[(EXTENSION_ALPN, with_len16(&[]))])),
            "ALPN list empty or followed by other bytes"
        );
        assert_eq!(
            malformed(&hello(&[alpn_ext(&[b""])])),
            "empty ALPN protocol name"
        );
        assert_eq!(
            malformed(&hello(&[(EXTENSION_SUPPORTED_VERSIONS, vec![3, 3, 4, 3])])),
            "supported_versions list empty, of odd length or followed by other bytes"
        );
        // The handshake length covers less than the body holds.
        let mut short = handshake(&body(0x0303, Some(&[sni(&[(0, b"a")])])));
        short[3] -= 1;
        assert_eq!(
            malformed(&records(&short, 0x0303, 1000)),
            "truncated extension block"
        );
    }

    /// xorshift64: deterministic, so a failure reproduces.
    fn next(state: &mut u64) -> u64 {
        *state ^= *state << 13;
        *state ^= *state >> 7;
        *state ^= *state << 17;
        *state
    }

    #[test]
    fn mutated_hellos_never_panic() {
        let mut state = 0x2545_f491_4f6c_dd1d;
        let seeds: Vec<Vec<u8>> = [OPENSSL_TLS1_0, OPENSSL_TLS1_2, OPENSSL_TLS1_3]
            .iter()
            .map(|capture| hex(capture))
            .collect();
        for round in 0..30_000 {
            let mut bytes = seeds[round % seeds.len()].clone();
            for _ in 0..=(next(&mut state) % 4) {
                let at = (next(&mut state) as usize) % bytes.len();
                bytes[at] = next(&mut state) as u8;
            }
            let cut = (next(&mut state) as usize) % (bytes.len() + 1);
            let _ = parse_client_hello(&bytes[..cut]);
            let _ = parse_client_hello(&bytes);
        }
    }
}
