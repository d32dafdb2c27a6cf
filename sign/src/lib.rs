//! Matrix signing for every fedsend host: canonical JSON, ed25519 JSON signatures, the
//! `X-Matrix` federation `Authorization` header, and the signed `/_matrix/key/v2/server` body.
//!
//! The crate is `no_std` + `alloc` so the native host, the wasm guest and the JavaScript
//! bindings all sign with the same code. Keys are only ever loaded from 32-byte seeds (Synapse
//! key files, base64 seeds, or bytes the host drew itself), so no random number source is
//! needed on any target.
//!
//! Wire formats follow the Matrix specification's appendices ("Canonical JSON", "Signing
//! JSON") and the server-server API ("Request Authentication", "Publishing Keys").

#![no_std]
#![forbid(unsafe_code)]
#![warn(missing_docs)]

extern crate alloc;
#[cfg(test)]
extern crate std;

use alloc::borrow::ToOwned;
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use core::fmt;
use core::fmt::Write as _;

use base64::Engine as _;
use base64::alphabet;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use ed25519_dalek::{Signer as _, Verifier as _};
use serde_json::{Map, Value};

/// Matrix encodes keys and signatures as unpadded standard base64. Decoding also accepts
/// padding and non-zero trailing bits, as Synapse (`unpaddedbase64`) does: the spec's own
/// example seed has trailing bits set, and keys in the wild were produced by such encoders.
const BASE64_ENCODE: GeneralPurpose =
    GeneralPurpose::new(&alphabet::STANDARD, GeneralPurposeConfig::new().with_encode_padding(false));
const BASE64_DECODE: GeneralPurpose = GeneralPurpose::new(
    &alphabet::STANDARD,
    GeneralPurposeConfig::new()
        .with_encode_padding(false)
        .with_decode_padding_mode(DecodePaddingMode::Indifferent)
        .with_decode_allow_trailing_bits(true),
);

/// The largest integer canonical JSON allows (2^53 - 1); the smallest is its negation.
pub const CANONICAL_INT_MAX: i64 = (1 << 53) - 1;

/// Encodes bytes as unpadded standard base64, the encoding Matrix uses for keys and signatures.
pub fn encode_base64(bytes: &[u8]) -> String {
    BASE64_ENCODE.encode(bytes)
}

/// Decodes standard base64, padded or not.
pub fn decode_base64(text: &str) -> Result<Vec<u8>, SignError> {
    BASE64_DECODE.decode(text.trim()).map_err(|e| SignError::Base64(format!("{e}")))
}

/// Everything that can go wrong while encoding, signing or verifying.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum SignError {
    /// A JSON number is a float or an integer outside ±(2^53 - 1); the payload names it.
    InvalidNumber(String),
    /// The value to sign or verify is not a JSON object.
    NotAnObject,
    /// The existing `signatures` member is not shaped as `{server: {key_id: sig}}`.
    Malformed(String),
    /// A key, seed or signature is not valid base64.
    Base64(String),
    /// A seed, public key or signature has the wrong length or is not a valid ed25519 value.
    InvalidKey(String),
    /// A key id is not `ed25519:<version>` with a version of `[A-Za-z0-9_]` characters.
    InvalidKeyId(String),
    /// A Synapse signing key file could not be parsed; the payload says which line and why.
    KeyFile(String),
    /// `signatures.{origin}.{key_id}` is absent (or not a string).
    MissingSignature {
        /// The server name looked up.
        origin: String,
        /// The key id looked up.
        key_id: String,
    },
    /// The signature does not match the content and key.
    BadSignature,
    /// A request body to sign is not JSON; the payload says why.
    NotJson(String),
}

impl fmt::Display for SignError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::InvalidNumber(n) => {
                write!(f, "canonical JSON allows only integers in [-(2^53)+1, 2^53-1], found {n}")
            }
            Self::NotAnObject => f.write_str("only JSON objects can be signed or verified"),
            Self::Malformed(e) => write!(f, "cannot add a signature: {e}"),
            Self::Base64(e) => write!(f, "invalid base64: {e}"),
            Self::InvalidKey(e) => write!(f, "invalid ed25519 key or signature: {e}"),
            Self::InvalidKeyId(id) => write!(
                f,
                "invalid key id {id:?}: expected \"ed25519:<version>\" with a version of letters, digits and '_'"
            ),
            Self::KeyFile(e) => write!(f, "invalid signing key file: {e}"),
            Self::MissingSignature { origin, key_id } => {
                write!(f, "no signature by {origin} with key {key_id}")
            }
            Self::BadSignature => f.write_str("signature does not match"),
            Self::NotJson(e) => write!(f, "not JSON: {e}"),
        }
    }
}

impl core::error::Error for SignError {}

// ----- canonical JSON -----

/// Encodes `value` as Matrix canonical JSON: object keys sorted by Unicode codepoint, no
/// insignificant whitespace, non-ASCII characters as raw UTF-8 (only `"`, `\` and control
/// characters are escaped), and numbers restricted to integers in ±(2^53 - 1).
///
/// Floats (even integral ones such as `1.0`, which `serde_json` keeps as floats) are an error
/// rather than being rounded, because two servers would disagree on their encoding.
pub fn canonical_json(value: &Value) -> Result<String, SignError> {
    let mut out = String::new();
    write_canonical(value, &mut out)?;
    Ok(out)
}

fn write_canonical(value: &Value, out: &mut String) -> Result<(), SignError> {
    match value {
        Value::Null => out.push_str("null"),
        Value::Bool(true) => out.push_str("true"),
        Value::Bool(false) => out.push_str("false"),
        Value::Number(n) => {
            let in_range = if let Some(i) = n.as_i64() {
                (-CANONICAL_INT_MAX..=CANONICAL_INT_MAX).contains(&i)
            } else if let Some(u) = n.as_u64() {
                u <= CANONICAL_INT_MAX as u64
            } else {
                false
            };
            if !in_range {
                return Err(SignError::InvalidNumber(format!("{n}")));
            }
            // Infallible: writing into a String never fails.
            let _ = write!(out, "{n}");
        }
        Value::String(s) => write_string(s, out),
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical(item, out)?;
            }
            out.push(']');
        }
        Value::Object(map) => {
            // Sorting here rather than trusting the map's order keeps the encoding canonical
            // even if some crate in the build turns on serde_json's `preserve_order`. Rust's
            // `str` ordering is byte order, which for UTF-8 is codepoint order.
            let mut entries: Vec<(&String, &Value)> = map.iter().collect();
            entries.sort_unstable_by(|a, b| a.0.cmp(b.0));
            out.push('{');
            for (i, (key, item)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_string(key, out);
                out.push(':');
                write_canonical(item, out)?;
            }
            out.push('}');
        }
    }
    Ok(())
}

/// Escapes exactly what JSON requires, with the short forms where JSON has them and
/// lowercase `\u00xx` otherwise (the spec's and Python's `json` choice).
fn write_string(s: &str, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\u{08}' => out.push_str("\\b"),
            '\u{0c}' => out.push_str("\\f"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// Whether `text` is already Matrix canonical JSON, exactly as [`canonical_json`] would write
/// the value it holds: no whitespace between tokens, object keys strictly increasing, integers
/// within ±(2^53 - 1) without a sign on zero, strings escaped only where canonical JSON
/// escapes, in its forms. One pass, no allocation: a signer can then sign the text as it is
/// instead of parsing it into a tree and writing it back out.
///
/// Conservative: `false` for a key holding an escape (comparing escaped keys would need them
/// decoded) and beyond 128 levels of nesting, where callers fall back to the full path.
pub fn is_canonical_json(text: &str) -> bool {
    let mut scanner = CanonicalScanner { bytes: text.as_bytes(), at: 0 };
    scanner.value(0) && scanner.at == scanner.bytes.len()
}

/// Nesting beyond this is left to the full parser (serde_json refuses past 128 anyway).
const CANONICAL_SCAN_DEPTH_MAX: usize = 128;

struct CanonicalScanner<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> CanonicalScanner<'a> {
    fn peek(&self) -> Option<u8> {
        self.bytes.get(self.at).copied()
    }

    fn eat(&mut self, literal: &[u8]) -> bool {
        if self.bytes[self.at..].starts_with(literal) {
            self.at += literal.len();
            true
        } else {
            false
        }
    }

    fn value(&mut self, depth: usize) -> bool {
        match self.peek() {
            Some(b'{') => depth < CANONICAL_SCAN_DEPTH_MAX && self.object(depth + 1),
            Some(b'[') => depth < CANONICAL_SCAN_DEPTH_MAX && self.array(depth + 1),
            Some(b'"') => self.string().is_some(),
            Some(b'-' | b'0'..=b'9') => self.integer(),
            Some(b't') => self.eat(b"true"),
            Some(b'f') => self.eat(b"false"),
            Some(b'n') => self.eat(b"null"),
            _ => false,
        }
    }

    fn object(&mut self, depth: usize) -> bool {
        self.at += 1;
        if self.eat(b"}") {
            return true;
        }
        let mut previous: Option<&'a [u8]> = None;
        loop {
            let Some((key, escaped)) = self.string() else { return false };
            // Unescaped UTF-8 compares bytewise in codepoint order, the order canonical JSON
            // sorts by; equal keys would be a duplicate, which parsing would collapse.
            if escaped || previous.is_some_and(|p| p >= key) {
                return false;
            }
            previous = Some(key);
            if !self.eat(b":") || !self.value(depth) {
                return false;
            }
            if self.eat(b"}") {
                return true;
            }
            if !self.eat(b",") {
                return false;
            }
        }
    }

    fn array(&mut self, depth: usize) -> bool {
        self.at += 1;
        if self.eat(b"]") {
            return true;
        }
        loop {
            if !self.value(depth) {
                return false;
            }
            if self.eat(b"]") {
                return true;
            }
            if !self.eat(b",") {
                return false;
            }
        }
    }

    /// The raw contents of a string and whether it held an escape, if it is written as
    /// [`write_string`] writes it.
    fn string(&mut self) -> Option<(&'a [u8], bool)> {
        if !self.eat(b"\"") {
            return None;
        }
        let start = self.at;
        let mut escaped = false;
        loop {
            match self.peek()? {
                b'"' => {
                    let contents = &self.bytes[start..self.at];
                    self.at += 1;
                    return Some((contents, escaped));
                }
                b'\\' => {
                    escaped = true;
                    self.at += 1;
                    match self.peek()? {
                        b'"' | b'\\' | b'b' | b'f' | b'n' | b'r' | b't' => self.at += 1,
                        b'u' => {
                            // Only control characters without a short form, lowercase hex.
                            let hex = self.bytes.get(self.at + 1..self.at + 5)?;
                            let code = core::str::from_utf8(hex).ok()?;
                            let is_lower_hex = code.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
                            let code = u32::from_str_radix(code, 16).ok()?;
                            if !is_lower_hex || code >= 0x20 || matches!(code, 0x08 | 0x09 | 0x0a | 0x0c | 0x0d) {
                                return None;
                            }
                            self.at += 5;
                        }
                        _ => return None,
                    }
                }
                0x00..=0x1f => return None,
                _ => self.at += 1,
            }
        }
    }

    fn integer(&mut self) -> bool {
        let negative = self.eat(b"-");
        let start = self.at;
        while matches!(self.peek(), Some(b'0'..=b'9')) {
            self.at += 1;
        }
        let digits = &self.bytes[start..self.at];
        let well_formed = match digits {
            [] => false,
            [b'0'] => !negative,
            [b'0', ..] => false,
            _ => digits.len() <= 16,
        };
        if !well_formed || matches!(self.peek(), Some(b'.' | b'e' | b'E')) {
            return false;
        }
        let magnitude = digits.iter().fold(0i64, |n, d| n * 10 + i64::from(d - b'0'));
        magnitude <= CANONICAL_INT_MAX
    }
}

// ----- keys -----

/// An ed25519 signing key with its Matrix key id (`ed25519:<version>`).
#[derive(Clone)]
pub struct SigningKey {
    key_id: String,
    key: ed25519_dalek::SigningKey,
}

impl fmt::Debug for SigningKey {
    /// Shows the key id and public key only: the seed must never reach a log.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SigningKey")
            .field("key_id", &self.key_id)
            .field("public_key", &self.public_key_base64())
            .finish()
    }
}

impl PartialEq for SigningKey {
    fn eq(&self, other: &Self) -> bool {
        self.key_id == other.key_id && self.key.to_bytes() == other.key.to_bytes()
    }
}

impl Eq for SigningKey {}

fn check_key_id(key_id: &str) -> Result<(), SignError> {
    let valid = key_id
        .strip_prefix("ed25519:")
        .is_some_and(|version| !version.is_empty() && version.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_'));
    if valid { Ok(()) } else { Err(SignError::InvalidKeyId(key_id.to_owned())) }
}

impl SigningKey {
    /// A key from its 32-byte seed, e.g. bytes the host drew from its OS random source.
    /// Fails only if `key_id` is not `ed25519:<version>`.
    pub fn generate_from_seed_bytes(key_id: &str, seed: [u8; 32]) -> Result<Self, SignError> {
        check_key_id(key_id)?;
        Ok(Self { key_id: key_id.to_owned(), key: ed25519_dalek::SigningKey::from_bytes(&seed) })
    }

    /// A key from its base64 seed (the third field of a Synapse key file).
    pub fn from_seed_base64(key_id: &str, seed_base64: &str) -> Result<Self, SignError> {
        check_key_id(key_id)?;
        let bytes = decode_base64(seed_base64)?;
        let seed: [u8; 32] = bytes
            .as_slice()
            .try_into()
            .map_err(|_| SignError::InvalidKey(format!("a seed is 32 bytes, this one is {}", bytes.len())))?;
        Self::generate_from_seed_bytes(key_id, seed)
    }

    /// Parses a Synapse signing key file: one key per line, `ed25519 <version> <seed>`. The
    /// first key is the one we sign with (Synapse's choice too); blank lines are skipped.
    pub fn parse_synapse_key_file(text: &str) -> Result<Self, SignError> {
        for (index, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() {
                continue;
            }
            let line_no = index + 1;
            let fields: Vec<&str> = line.split_whitespace().collect();
            let [algorithm, version, seed] = fields.as_slice() else {
                return Err(SignError::KeyFile(format!(
                    "line {line_no}: expected \"ed25519 <version> <base64 seed>\", found {} fields",
                    fields.len()
                )));
            };
            if *algorithm != "ed25519" {
                return Err(SignError::KeyFile(format!(
                    "line {line_no}: unsupported algorithm {algorithm:?} (only ed25519)"
                )));
            }
            return Self::from_seed_base64(&format!("ed25519:{version}"), seed)
                .map_err(|e| SignError::KeyFile(format!("line {line_no}: {e}")));
        }
        Err(SignError::KeyFile("no key in the file".to_owned()))
    }

    /// The key in Synapse's key file format (one line, newline-terminated), which
    /// [`parse_synapse_key_file`](Self::parse_synapse_key_file) reads back.
    pub fn to_synapse_key_file(&self) -> String {
        format!("ed25519 {} {}\n", self.version(), encode_base64(&self.key.to_bytes()))
    }

    /// The key id, `ed25519:<version>`.
    pub fn key_id(&self) -> &str {
        &self.key_id
    }

    /// The part of the key id after `ed25519:`.
    pub fn version(&self) -> &str {
        // The constructor checked the prefix.
        &self.key_id["ed25519:".len()..]
    }

    /// The public (verify) key as unpadded base64, as published in `verify_keys`.
    pub fn public_key_base64(&self) -> String {
        encode_base64(self.key.verifying_key().as_bytes())
    }

    /// Signs raw bytes; returns the unpadded base64 signature.
    pub fn sign_bytes_base64(&self, message: &[u8]) -> String {
        encode_base64(&self.key.sign(message).to_bytes())
    }
}

// ----- JSON signatures -----

/// Signs a JSON object in place as `signatures.{origin}.{key_id}`.
///
/// The signature covers the canonical JSON of the object without its `signatures` and
/// `unsigned` members; both are put back afterwards, and existing signatures (other servers',
/// or ours with other keys) are kept.
pub fn sign_json(value: &mut Value, origin: &str, key: &SigningKey) -> Result<(), SignError> {
    let object = value.as_object_mut().ok_or(SignError::NotAnObject)?;
    // Everything is checked before the value is touched, so an error leaves it as it was.
    let signed_part = canonical_json(&Value::Object(
        object
            .iter()
            .filter(|(k, _)| *k != "signatures" && *k != "unsigned")
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
    ))?;
    let signatures = object.entry("signatures").or_insert_with(|| Value::Object(Map::new()));
    let Value::Object(signatures) = signatures else {
        return Err(SignError::Malformed("`signatures` is not an object".to_owned()));
    };
    let by_origin = signatures.entry(origin).or_insert_with(|| Value::Object(Map::new()));
    let Value::Object(by_origin) = by_origin else {
        return Err(SignError::Malformed(format!("`signatures.{origin}` is not an object")));
    };
    let signature = key.sign_bytes_base64(signed_part.as_bytes());
    by_origin.insert(key.key_id().to_owned(), Value::String(signature));
    Ok(())
}

/// Verifies `signatures.{origin}.{key_id}` of a JSON object against a base64 public key.
pub fn verify_json(value: &Value, origin: &str, key_id: &str, public_key_base64: &str) -> Result<(), SignError> {
    let object = value.as_object().ok_or(SignError::NotAnObject)?;
    let missing = || SignError::MissingSignature { origin: origin.to_owned(), key_id: key_id.to_owned() };
    let signature = object
        .get("signatures")
        .and_then(|s| s.get(origin))
        .and_then(|s| s.get(key_id))
        .and_then(Value::as_str)
        .ok_or_else(missing)?;
    let mut stripped = object.clone();
    stripped.remove("signatures");
    stripped.remove("unsigned");
    let canonical = canonical_json(&Value::Object(stripped))?;
    verify_bytes(canonical.as_bytes(), signature, public_key_base64)
}

/// Verifies an ed25519 signature (base64) over raw bytes with a base64 public key.
pub fn verify_bytes(message: &[u8], signature_base64: &str, public_key_base64: &str) -> Result<(), SignError> {
    let public = decode_base64(public_key_base64)?;
    let public: [u8; 32] = public
        .as_slice()
        .try_into()
        .map_err(|_| SignError::InvalidKey(format!("a public key is 32 bytes, this one is {}", public.len())))?;
    let public = ed25519_dalek::VerifyingKey::from_bytes(&public).map_err(|e| SignError::InvalidKey(format!("{e}")))?;
    let signature = decode_base64(signature_base64)?;
    let signature =
        ed25519_dalek::Signature::from_slice(&signature).map_err(|e| SignError::InvalidKey(format!("{e}")))?;
    public.verify(message, &signature).map_err(|_| SignError::BadSignature)
}

// ----- federation requests -----

/// The value of the `Authorization` header of a federation request:
/// `X-Matrix origin="…",destination="…",key="…",sig="…"`.
///
/// The signature covers `{method, uri, origin, destination, content?}`; `uri` must be exactly
/// the path and query that go on the wire (percent-encoded as sent), because the receiver
/// rebuilds the object from the request line. `content` is the parsed JSON body, if any.
/// Fails only if `content` holds a number canonical JSON forbids.
pub fn x_matrix_authorization(
    origin: &str,
    destination: &str,
    method: &str,
    uri: &str,
    content: Option<&Value>,
    key: &SigningKey,
) -> Result<String, SignError> {
    let mut request = Map::new();
    request.insert("method".to_owned(), Value::String(method.to_owned()));
    request.insert("uri".to_owned(), Value::String(uri.to_owned()));
    request.insert("origin".to_owned(), Value::String(origin.to_owned()));
    request.insert("destination".to_owned(), Value::String(destination.to_owned()));
    if let Some(content) = content {
        request.insert("content".to_owned(), content.clone());
    }
    let canonical = canonical_json(&Value::Object(request))?;
    Ok(authorization_header(origin, destination, key, &key.sign_bytes_base64(canonical.as_bytes())))
}

/// [`x_matrix_authorization`] for a body given as JSON text. When the text is already
/// canonical JSON ([`is_canonical_json`]; fedsend's transaction bodies are), the signed
/// object is written around it as it is, since its canonical form is the text itself:
/// no parse into a tree, no copy of the tree, no second encoding. Any other text is parsed
/// and takes the general path. Fails if the body is not JSON or holds a number canonical
/// JSON forbids.
pub fn x_matrix_authorization_for_text(
    origin: &str,
    destination: &str,
    method: &str,
    uri: &str,
    body: Option<&str>,
    key: &SigningKey,
) -> Result<String, SignError> {
    let Some(body) = body else {
        return x_matrix_authorization(origin, destination, method, uri, None, key);
    };
    if !is_canonical_json(body) {
        let content: Value = serde_json::from_str(body).map_err(|e| SignError::NotJson(format!("{e}")))?;
        return x_matrix_authorization(origin, destination, method, uri, Some(&content), key);
    }
    // The members in canonical order: content, destination, method, origin, uri.
    let mut signed = String::with_capacity(body.len() + origin.len() + destination.len() + uri.len() + 64);
    signed.push_str("{\"content\":");
    signed.push_str(body);
    for (name, value) in [("destination", destination), ("method", method), ("origin", origin), ("uri", uri)] {
        signed.push(',');
        write_string(name, &mut signed);
        signed.push(':');
        write_string(value, &mut signed);
    }
    signed.push('}');
    Ok(authorization_header(origin, destination, key, &key.sign_bytes_base64(signed.as_bytes())))
}

fn authorization_header(origin: &str, destination: &str, key: &SigningKey, sig: &str) -> String {
    format!(
        "X-Matrix origin=\"{}\",destination=\"{}\",key=\"{}\",sig=\"{}\"",
        header_quote(origin),
        header_quote(destination),
        key.key_id(),
        sig
    )
}

/// Server names cannot contain `"` or `\` (they are hostnames with an optional port), but a
/// caller may pass anything: escaping keeps the header well-formed instead of injectable.
fn header_quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if c == '"' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// The signed body of `GET /_matrix/key/v2/server` for `origin`: its current verify key,
/// no old keys, valid until `valid_until_ms` (Unix ms).
pub fn server_keys_json(origin: &str, key: &SigningKey, valid_until_ms: u64) -> Result<Value, SignError> {
    let mut verify_key = Map::new();
    verify_key.insert("key".to_owned(), Value::String(key.public_key_base64()));
    let mut verify_keys = Map::new();
    verify_keys.insert(key.key_id().to_owned(), Value::Object(verify_key));
    let mut body = Map::new();
    body.insert("server_name".to_owned(), Value::String(origin.to_owned()));
    body.insert("valid_until_ts".to_owned(), Value::from(valid_until_ms));
    body.insert("verify_keys".to_owned(), Value::Object(verify_keys));
    body.insert("old_verify_keys".to_owned(), Value::Object(Map::new()));
    let mut body = Value::Object(body);
    sign_json(&mut body, origin, key)?;
    Ok(body)
}

#[cfg(test)]
mod tests;
