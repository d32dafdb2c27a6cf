//! `fedsend_core::ServerName`: every destination the core queues for is one, so a name it
//! accepts must be one the HTTPS client can put in a URL (issue 14, item 8: names accepted
//! and then backed off forever).
//!
//! Checked for every string: `parse` and JSON deserialization agree; an accepted name keeps
//! its text, serializes back to itself, is a valid URI authority in an `https://` URL with the
//! same host and port, and its port (if any) is 1..=65535. `server_of` is fed the same text.
//!
//! The transport's own discovery parsing (`transport::discovery`: its server-name split,
//! `.well-known` bodies, `Cache-Control`) is `pub(crate)`, so it is not reachable from here;
//! the `transport` target covers what the transport makes public.
#![no_main]

use fedsend_core::{ServerName, server_of};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let _ = server_of(text);
    let parsed = ServerName::parse(text);
    let from_json = serde_json::from_value::<ServerName>(serde_json::Value::String(text.to_owned()));
    assert_eq!(parsed.is_ok(), from_json.is_ok(), "parse and deserialize disagree on {text:?}");
    let Ok(name) = parsed else { return };
    assert_eq!(name.as_str(), text);
    assert_eq!(name.to_string(), text);
    assert_eq!(serde_json::to_value(&name).unwrap(), serde_json::Value::String(text.to_owned()));

    let url = format!("https://{text}/_matrix/federation/v1/send/1");
    let uri: http::Uri = url.parse().unwrap_or_else(|e| panic!("accepted {text:?} is not a URL authority: {e}"));
    let authority = uri.authority().expect("an https URL has an authority");
    assert_eq!(authority.as_str(), text, "the URL's authority is not the name");
    let host = authority.host();
    assert!(!host.is_empty(), "empty host in {text:?}");
    let port_text = match text.strip_prefix('[') {
        Some(rest) => rest.split_once(']').and_then(|(_, after)| after.strip_prefix(':')),
        None => text.rsplit_once(':').map(|(_, port)| port),
    };
    let port = port_text.map(|p| p.parse::<u16>().unwrap_or_else(|_| panic!("port {p:?} accepted in {text:?}")));
    assert!(port != Some(0), "port 0 accepted in {text:?}");
    assert_eq!(authority.port_u16(), port, "the URL's port differs from the name's in {text:?}");
    if let Some(literal) = host.strip_prefix('[') {
        let literal = literal.strip_suffix(']').expect("a bracketed host closes");
        literal.parse::<std::net::Ipv6Addr>().unwrap_or_else(|_| panic!("bracketed non-IPv6 host in {text:?}"));
    }
});
