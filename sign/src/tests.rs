use super::*;
use alloc::string::ToString;
use serde_json::json;

/// The Matrix spec's signing example (appendices, "Signing JSON"): this seed, key id
/// `ed25519:1`, origin `domain`. The expected values were cross-checked with Python
/// `signedjson` 1.1.4, an independent implementation.
const SPEC_SEED: &str = "YJDBA9Xnr2sVqXD9Vj7XVUnmFZcZrlw8Md7kMW+3XA1";
const SPEC_PUBLIC: &str = "XGX0JRS2Af3be3knz2fBiRbApjm2Dh61gXDJA8kcJNI";
const SPEC_SIG_EMPTY: &str = "K8280/U9SSy9IVtjBuVeLr+HpOB4BQFWbg+UZaADMtTdGYI7Geitb76LTrr5QV/7Xg4ahLwYGYZzuHGZKM5ZAQ";
const SPEC_SIG_ONE_TWO: &str = "KqmLSbO39/Bzb0QIYE82zqLwsA+PDzYIpIRA2sRQ4sL53+sN6/fpNSoqE7BP7vBZhG6kYdD13EIMJpvhJI+6Bw";

fn spec_key() -> SigningKey {
    SigningKey::from_seed_base64("ed25519:1", SPEC_SEED).unwrap()
}

#[test]
fn spec_example_signs_empty_object() {
    let key = spec_key();
    assert_eq!(key.public_key_base64(), SPEC_PUBLIC);
    let mut value = json!({});
    sign_json(&mut value, "domain", &key).unwrap();
    assert_eq!(value, json!({"signatures": {"domain": {"ed25519:1": SPEC_SIG_EMPTY}}}));
    verify_json(&value, "domain", "ed25519:1", SPEC_PUBLIC).unwrap();
}

#[test]
fn spec_example_signs_object_with_content_and_ignores_unsigned() {
    let key = spec_key();
    let mut value = json!({"one": 1, "two": "Two", "unsigned": {"age_ts": 1_000_000}});
    sign_json(&mut value, "domain", &key).unwrap();
    assert_eq!(value["signatures"]["domain"]["ed25519:1"], SPEC_SIG_ONE_TWO);
    assert_eq!(value["unsigned"]["age_ts"], 1_000_000, "unsigned is kept, only not signed");
    // Changing `unsigned` must not break the signature; changing content must.
    value["unsigned"] = json!({"other": true});
    verify_json(&value, "domain", "ed25519:1", SPEC_PUBLIC).unwrap();
    value["two"] = json!("three");
    assert_eq!(verify_json(&value, "domain", "ed25519:1", SPEC_PUBLIC), Err(SignError::BadSignature));
}

#[test]
fn existing_signatures_are_preserved_and_not_signed_over() {
    let key = spec_key();
    let other = SigningKey::generate_from_seed_bytes("ed25519:b", [7; 32]).unwrap();
    let mut value = json!({"one": 1, "two": "Two"});
    sign_json(&mut value, "other.example", &other).unwrap();
    sign_json(&mut value, "domain", &key).unwrap();
    // Our signature is the same as without the other server's: `signatures` is excluded.
    assert_eq!(value["signatures"]["domain"]["ed25519:1"], SPEC_SIG_ONE_TWO);
    verify_json(&value, "other.example", "ed25519:b", &other.public_key_base64()).unwrap();
    verify_json(&value, "domain", "ed25519:1", SPEC_PUBLIC).unwrap();
    assert_eq!(
        verify_json(&value, "domain", "ed25519:2", SPEC_PUBLIC),
        Err(SignError::MissingSignature { origin: "domain".into(), key_id: "ed25519:2".into() })
    );
    assert_eq!(verify_json(&value, "domain", "ed25519:1", &other.public_key_base64()), Err(SignError::BadSignature));
}

#[test]
fn canonical_json_sorts_compacts_and_keeps_utf8() {
    let value: Value = serde_json::from_str(
        r#"{ "b": [1, {"z": null, "a": true}], "a": "h\u00e9\u65e5\"\\\n\u0001\u007f\u2028", "\u00e9": -5, "B": false }"#,
    )
    .unwrap();
    assert_eq!(
        canonical_json(&value).unwrap(),
        "{\"B\":false,\"a\":\"h\u{e9}\u{65e5}\\\"\\\\\\n\\u0001\u{7f}\u{2028}\",\"b\":[1,{\"a\":true,\"z\":null}],\"\u{e9}\":-5}"
    );
    // The spec's own canonical JSON examples.
    let value = json!({"auth": {"success": true, "mxid": "@john.doe:example.com", "profile": {
        "display_name": "John Doe", "three_pids": [
            {"medium": "email", "address": "john.doe@example.org"},
            {"medium": "msisdn", "address": "123456789"}]}}});
    assert_eq!(
        canonical_json(&value).unwrap(),
        r#"{"auth":{"mxid":"@john.doe:example.com","profile":{"display_name":"John Doe","three_pids":[{"address":"john.doe@example.org","medium":"email"},{"address":"123456789","medium":"msisdn"}]},"success":true}}"#
    );
    assert_eq!(canonical_json(&json!({"a": "日本語"})).unwrap(), r#"{"a":"日本語"}"#);
    assert_eq!(canonical_json(&json!({"本": 2, "日": 1})).unwrap(), r#"{"日":1,"本":2}"#);
}

#[test]
fn canonical_json_rejects_floats_and_big_integers() {
    for bad in [
        json!(1.5),
        json!({"a": [1.0]}),
        json!(9_007_199_254_740_992_u64),
        json!(-9_007_199_254_740_992_i64),
        json!(u64::MAX),
    ] {
        let err = canonical_json(&bad).unwrap_err();
        assert!(matches!(err, SignError::InvalidNumber(_)), "{bad}: {err}");
    }
    assert_eq!(canonical_json(&json!(9_007_199_254_740_991_u64)).unwrap(), "9007199254740991");
    assert_eq!(canonical_json(&json!(-9_007_199_254_740_991_i64)).unwrap(), "-9007199254740991");
    // A float anywhere in the object makes signing fail and leaves the value untouched.
    let mut value = json!({"a": 0.5});
    assert!(sign_json(&mut value, "domain", &spec_key()).is_err());
    assert_eq!(value, json!({"a": 0.5}));
}

#[test]
fn synapse_key_file_round_trip() {
    let key = SigningKey::parse_synapse_key_file(&format!("ed25519 1 {SPEC_SEED}\n")).unwrap();
    assert_eq!(key, spec_key());
    assert_eq!(key.key_id(), "ed25519:1");
    let generated = SigningKey::generate_from_seed_bytes("ed25519:a_AbCd", [42; 32]).unwrap();
    let file = generated.to_synapse_key_file();
    assert!(file.starts_with("ed25519 a_AbCd ") && file.ends_with('\n'), "{file}");
    let parsed = SigningKey::parse_synapse_key_file(&file).unwrap();
    assert_eq!(parsed, generated);
    assert_eq!(parsed.public_key_base64(), generated.public_key_base64());
    // Padded seeds and leading blank lines are accepted; extra keys after the first are ignored.
    let padded = format!("\n\ned25519 x {}=\ned25519 y {SPEC_SEED}\n", &file[15..file.len() - 1]);
    assert_eq!(SigningKey::parse_synapse_key_file(&padded).unwrap().key_id(), "ed25519:x");
}

#[test]
fn bad_keys_are_clear_errors() {
    let cases = [
        ("", "no key"),
        ("ed25519 1\n", "found 2 fields"),
        ("rsa 1 AAAA\n", "unsupported algorithm"),
        ("ed25519 1 AAAA\n", "32 bytes"),
        ("ed25519 1 !!!!\n", "base64"),
        ("ed25519 a:b AAAA\n", "key id"),
    ];
    for (file, needle) in cases {
        let err = SigningKey::parse_synapse_key_file(file).unwrap_err().to_string();
        assert!(err.contains(needle), "{file:?}: {err}");
    }
    assert!(matches!(SigningKey::generate_from_seed_bytes("curve25519:1", [0; 32]), Err(SignError::InvalidKeyId(_))));
    assert!(verify_json(&json!({}), "d", "ed25519:1", "short").is_err());
    assert_eq!(verify_json(&json!([]), "d", "ed25519:1", SPEC_PUBLIC), Err(SignError::NotAnObject));
    assert!(!format!("{:?}", spec_key()).contains(SPEC_SEED), "Debug must not leak the seed");
}

#[test]
fn x_matrix_header_signs_request_object() {
    let key = spec_key();
    let content = json!({"pdus": [], "edus": [], "origin": "origin.example", "origin_server_ts": 5});
    let uri = "/_matrix/federation/v1/send/abc%2Fdef?x=1";
    let header =
        x_matrix_authorization("origin.example", "dest.example:8448", "PUT", uri, Some(&content), &key).unwrap();
    let prefix = "X-Matrix origin=\"origin.example\",destination=\"dest.example:8448\",key=\"ed25519:1\",sig=\"";
    assert!(header.starts_with(prefix) && header.ends_with('"'), "{header}");
    let sig = &header[prefix.len()..header.len() - 1];
    // Rebuild the request object as a receiver does and verify it as a signed JSON object.
    let mut request = json!({"method": "PUT", "uri": uri, "origin": "origin.example",
        "destination": "dest.example:8448", "content": content});
    request["signatures"] = json!({"origin.example": {"ed25519:1": sig}});
    verify_json(&request, "origin.example", "ed25519:1", SPEC_PUBLIC).unwrap();
    // Without content (a GET), `content` is absent from the signed object, not null.
    let get = x_matrix_authorization("o", "d", "GET", "/k", None, &key).unwrap();
    let sig = get.rsplit("sig=\"").next().unwrap().trim_end_matches('"');
    let request = json!({"method": "GET", "uri": "/k", "origin": "o", "destination": "d",
        "signatures": {"o": {"ed25519:1": sig}}});
    verify_json(&request, "o", "ed25519:1", SPEC_PUBLIC).unwrap();
    assert!(x_matrix_authorization("o", "d", "PUT", "/", Some(&json!({"f": 1.5})), &key).is_err());
}

#[test]
fn server_keys_are_self_signed() {
    let key = spec_key();
    let body = server_keys_json("origin.example", &key, 1_700_000_000_000).unwrap();
    assert_eq!(body["server_name"], "origin.example");
    assert_eq!(body["valid_until_ts"], 1_700_000_000_000_u64);
    assert_eq!(body["verify_keys"]["ed25519:1"]["key"], SPEC_PUBLIC);
    assert_eq!(body["old_verify_keys"], json!({}));
    verify_json(&body, "origin.example", "ed25519:1", SPEC_PUBLIC).unwrap();
}

/// A small deterministic generator, so the property tests need no dependency and repeat.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Strings that exercise every escape and ordering question: quotes, backslashes, control
/// characters with and without short forms, DEL, non-ASCII and astral characters.
const PIECES: &[&str] =
    &["a", "b", "z", "A", "é", "\u{1F600}", "\"", "\\", "\n", "\u{1}", "\u{1f}", "\u{7f}", "/", " "];

fn random_string(rng: &mut Rng) -> String {
    (0..rng.below(4)).map(|_| PIECES[rng.below(PIECES.len() as u64) as usize]).collect()
}

fn random_value(rng: &mut Rng, depth: u32) -> Value {
    match rng.below(if depth > 3 { 5 } else { 8 }) {
        0 => Value::Null,
        1 => Value::Bool(rng.below(2) == 0),
        2 => {
            let edges = [0, 1, -1, CANONICAL_INT_MAX, -CANONICAL_INT_MAX, CANONICAL_INT_MAX + 1, 10, 1_000_000];
            json!(edges[rng.below(edges.len() as u64) as usize])
        }
        3 => {
            if rng.below(8) == 0 {
                json!(0.5)
            } else {
                json!(rng.next() as i64 >> rng.below(64))
            }
        }
        4 => Value::String(random_string(rng)),
        5 | 6 => Value::Object((0..rng.below(5)).map(|_| (random_string(rng), random_value(rng, depth + 1))).collect()),
        _ => Value::Array((0..rng.below(4)).map(|_| random_value(rng, depth + 1)).collect()),
    }
}

/// What `is_canonical_json` promises: a text it accepts is exactly what canonical_json
/// writes for the value the text holds.
fn assert_accepted_only_if_canonical(text: &str) {
    if is_canonical_json(text) {
        let value: Value = serde_json::from_str(text).unwrap_or_else(|e| panic!("accepted non-JSON {text:?}: {e}"));
        assert_eq!(canonical_json(&value).as_deref(), Ok(text), "accepted a non-canonical text");
    }
}

#[test]
fn canonical_text_is_recognised_exactly() {
    let mut rng = Rng(0x5eed_1234_abcd_0001);
    let mut recognised = 0;
    for _ in 0..20_000 {
        let value = random_value(&mut rng, 0);
        let Ok(text) = canonical_json(&value) else { continue };
        // Keys with escapes are refused on purpose (the scanner does not decode them).
        let escaped_key = text.contains("\\");
        assert!(is_canonical_json(&text) || escaped_key, "refused canonical {text:?}");
        recognised += usize::from(is_canonical_json(&text));
        assert_accepted_only_if_canonical(&text);
        // One-byte edits at every kind of place: most break canonical form, and none may be
        // accepted unless it is still canonical.
        for edit in [" ", ",", "0", "-", ".5", "\\", "\"", "}", "]", "e1", "\\u0041", "\\/"] {
            let mut at = rng.below(text.len() as u64 + 1) as usize;
            while !text.is_char_boundary(at) {
                at -= 1;
            }
            let mut edited = text.clone();
            edited.insert_str(at, edit);
            assert_accepted_only_if_canonical(&edited);
            let mut removed = text.clone();
            if at < removed.len() {
                removed.remove(at);
                assert_accepted_only_if_canonical(&removed);
            }
        }
    }
    assert!(recognised > 10_000, "only {recognised} canonical texts recognised");
}

#[test]
fn canonical_text_edge_cases() {
    for text in [
        "{}",
        "[]",
        "0",
        "-1",
        "9007199254740991",
        "-9007199254740991",
        r#""\u001f\b\t\n\f\r\"\\é😀/""#,
        r#"{"a":[1,{"b":null}],"b":true,"é":false}"#,
    ] {
        assert!(is_canonical_json(text), "{text}");
        assert_accepted_only_if_canonical(text);
    }
    for text in [
        "",
        " {}",
        "{} ",
        r#"{"a": 1}"#,
        r#"{"b":1,"a":2}"#,
        r#"{"a":1,"a":2}"#,
        "1.0",
        "1e3",
        "-0",
        "01",
        "9007199254740992",
        "-9007199254740992",
        "99999999999999999999",
        r#""\/""#,
        r#""\u0041""#,
        r#""\u001F""#,
        r#""\u000a""#,
        "\"\u{1}\"",
        r#"{"\n":1}"#,
        "[1,]",
        "{\"a\":1,}",
        "tru",
        "\"open",
    ] {
        assert!(!is_canonical_json(text), "{text}");
    }
    let deep = format!("{}{}", "[".repeat(200), "]".repeat(200));
    assert!(!is_canonical_json(&deep), "nesting past the scanner's limit goes to the full path");
}

#[test]
fn x_matrix_header_for_text_equals_the_tree_path() {
    let key = spec_key();
    let uri = "/_matrix/federation/v1/send/1.2";
    let sign_tree = |content: Option<&Value>| x_matrix_authorization("o.test", "d.test", "PUT", uri, content, &key);
    let sign_text = |body: Option<&str>| x_matrix_authorization_for_text("o.test", "d.test", "PUT", uri, body, &key);
    let canonical =
        r#"{"edus":[],"origin":"o.test","origin_server_ts":1,"pdus":[{"content":{"body":"é \"q\" \n"},"depth":3}]}"#;
    assert!(is_canonical_json(canonical));
    for body in [
        canonical,
        // Not canonical: whitespace, unsorted keys, an escaped key. Same signature all the same.
        r#"{ "pdus": [], "origin": "o.test" }"#,
        r#"{"\n":"x","a":"\u0041"}"#,
    ] {
        let content: Value = serde_json::from_str(body).unwrap();
        assert_eq!(sign_text(Some(body)), sign_tree(Some(&content)), "{body}");
    }
    assert_eq!(sign_text(None), sign_tree(None));
    assert!(matches!(sign_text(Some("{not json")), Err(SignError::NotJson(_))));
    assert!(matches!(sign_text(Some(r#"{"a":1.5}"#)), Err(SignError::InvalidNumber(_))));
    let mut rng = Rng(77);
    for _ in 0..2_000 {
        let value = random_value(&mut rng, 0);
        let Ok(text) = canonical_json(&value) else { continue };
        assert_eq!(sign_text(Some(&text)), sign_tree(Some(&value)), "{text}");
    }
}
