//! The HTTP request head reader on arbitrary bytes: it must not panic, and once it has
//! an answer other than "incomplete", more bytes must not change it (routing takes a
//! NoMatch as final).
#![no_main]

use libfuzzer_sys::fuzz_target;
use splice_proxy::route::Parsed;
use splice_proxy::route::http::parse_request;

fuzz_target!(|data: &[u8]| {
    let whole = parse_request(data);
    if let Parsed::Done(request) = &whole {
        // What it returns are slices of the input.
        assert!(request.path.len() <= data.len());
        if let Some(host) = request.host {
            assert!(!host.is_empty() && host.len() <= data.len());
        }
    }
    let cuts = [
        data.len() / 2,
        data.len().saturating_sub(1),
        usize::from(data.first().copied().unwrap_or(0)),
        data.iter().position(|&b| b == b'\n').unwrap_or(0),
    ];
    for cut in cuts {
        let Some(prefix) = data.get(..cut) else {
            continue;
        };
        let early = parse_request(prefix);
        assert!(
            early == Parsed::Incomplete || early == whole,
            "{cut} of {} bytes: {early:?}, but all of them: {whole:?}",
            data.len()
        );
    }
});
