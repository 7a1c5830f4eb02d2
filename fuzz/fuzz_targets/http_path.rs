//! The path normalization `http_path_prefix` compares with, on arbitrary text: it must not
//! panic, must be idempotent (a normalized path is its own normal form, so a prefix that
//! is normalized can be compared with it), must stay within three times the path's
//! length, and must leave no repeated slash or dot segment in a path that starts with
//! "/".
#![no_main]

use libfuzzer_sys::fuzz_target;
use splice_proxy::route::path::normalize;

fuzz_target!(|data: &[u8]| {
    let Ok(path) = std::str::from_utf8(data) else {
        return;
    };
    let normalized = normalize(path);
    assert!(
        normalized.len() <= 3 * path.len().max(1),
        "{path:?} -> {normalized:?}"
    );
    assert_eq!(normalize(&normalized), normalized, "{path:?}");
    if path.starts_with('/') {
        let path_part = normalized.split('?').next().unwrap_or_default();
        assert!(path_part.starts_with('/'), "{path:?} -> {normalized:?}");
        for segment in path_part.split('/').skip(1) {
            assert!(!matches!(segment, "." | ".."), "{path:?} -> {normalized:?}");
        }
        assert!(!path_part.contains("//"), "{path:?} -> {normalized:?}");
    }
});
