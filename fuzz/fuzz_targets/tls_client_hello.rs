//! The ClientHello reader on arbitrary bytes: it must not panic, and once it has an
//! answer other than "incomplete", more bytes must not change it (routing takes a
//! NoMatch as final).
#![no_main]

use libfuzzer_sys::fuzz_target;
use splice_proxy::route::Parsed;
use splice_proxy::route::tls::parse_client_hello;

fuzz_target!(|data: &[u8]| {
    let whole = parse_client_hello(data);
    // A few cut points, chosen by the input so that the fuzzer can steer them.
    let cuts = [
        data.len() / 2,
        data.len().saturating_sub(1),
        usize::from(data.first().copied().unwrap_or(0)),
        usize::from(u16::from_be_bytes([
            data.get(1).copied().unwrap_or(0),
            data.get(2).copied().unwrap_or(0),
        ])),
    ];
    for cut in cuts {
        let Some(prefix) = data.get(..cut) else {
            continue;
        };
        let early = parse_client_hello(prefix);
        assert!(
            early == Parsed::Incomplete || early == whole,
            "{cut} of {} bytes: {early:?}, but all of them: {whole:?}",
            data.len()
        );
    }
});
