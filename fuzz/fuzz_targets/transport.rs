//! What the HTTPS transport makes public of its parsing: IP ranges of the config's
//! `ip_allowlist` (`IpNet`), `Retry-After` values (`parse_retry_after_ms`) and the txn-id path
//! segment (`percent_encode`). Its response mapping (`map_response`) and server discovery
//! (server-name split, `.well-known` bodies, `Cache-Control`) are private to the transport
//! module, so they are not reachable here.
//!
//! The input's first byte picks the function; the rest is the text.
#![no_main]

use std::net::IpAddr;
use std::time::{Duration, SystemTime};

use fedsend_host_native::transport::{IpNet, parse_retry_after_ms, percent_encode};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&selector, rest)) = data.split_first() else { return };
    let text = String::from_utf8_lossy(rest);
    match selector % 3 {
        0 => ip_range(&text),
        1 => retry_after(&text),
        _ => txn_segment(&text),
    }
});

/// A range that parses prints as one that parses to itself, and its range checks agree.
fn ip_range(text: &str) {
    let Ok(net) = text.parse::<IpNet>() else { return };
    let printed = net.to_string();
    assert_eq!(printed.parse::<IpNet>(), Ok(net), "{text:?} printed as {printed:?}");
    assert!(net.overlaps(&net));
    assert_eq!(IpNet::new(net.addr(), net.prefix_len()), Some(net));
    // IPv4-mapped IPv6 ranges (`::ffff:a.b.c.d/n`) are compared as IPv4 by `contains` and so
    // never contain their own address; reported in fuzz/README.md rather than asserted here.
    let mapped = matches!(net.addr(), IpAddr::V6(v6) if v6.to_ipv4_mapped().is_some());
    if !mapped {
        assert!(net.contains(net.addr()), "{net} does not contain its own address");
    }
}

/// Delay-seconds scale to milliseconds without overflow; dates never panic.
fn retry_after(text: &str) {
    let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
    let parsed = parse_retry_after_ms(text, now);
    if let Ok(secs) = text.trim().parse::<u64>() {
        assert_eq!(parsed, Some(secs.saturating_mul(1000)), "{text:?}");
    }
}

/// The encoding is one path segment of unreserved characters and `%XX`, and decodes back.
fn txn_segment(text: &str) {
    let encoded = percent_encode(text);
    let mut decoded = Vec::new();
    let bytes = encoded.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b == b'%' {
            let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).expect("ASCII");
            decoded.push(u8::from_str_radix(hex, 16).expect("two hex digits after %"));
            i += 3;
        } else {
            assert!(b.is_ascii_alphanumeric() || b"-._~".contains(&b), "{:?} left in {encoded:?}", char::from(b));
            decoded.push(b);
            i += 1;
        }
    }
    assert_eq!(decoded, text.as_bytes());
}
