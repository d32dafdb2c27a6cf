//! Matrix signing for JavaScript: canonical JSON, JSON signatures and the `X-Matrix`
//! `Authorization` header, from `fedsend-sign`, the code the native host signs with, so a
//! JavaScript homeserver needs no crypto of its own. Values cross as JSON text; the npm
//! package (`npm/src/signing.js`) wraps them in JavaScript values.

use fedsend_sign::SigningKey;
use serde_json::Value;
use wasm_bindgen::prelude::*;

fn parse(what: &str, json: &str) -> Result<Value, JsError> {
    serde_json::from_str(json).map_err(|e| JsError::new(&format!("{what} is not valid JSON: {e}")))
}

fn js_error(e: fedsend_sign::SignError) -> JsError {
    JsError::new(&e.to_string())
}

/// An ed25519 signing key with its Matrix key id. The seed never leaves the wasm instance
/// except through `toSynapseKeyFile`.
#[wasm_bindgen(js_name = WasmSigningKey)]
pub struct WasmSigningKey {
    inner: SigningKey,
}

#[wasm_bindgen(js_class = WasmSigningKey)]
impl WasmSigningKey {
    /// A key from a base64 seed and a key id `ed25519:<version>`.
    #[wasm_bindgen(js_name = fromSeedBase64)]
    pub fn from_seed_base64(
        #[wasm_bindgen(js_name = keyId)] key_id: &str,
        #[wasm_bindgen(js_name = seedBase64)] seed_base64: &str,
    ) -> Result<Self, JsError> {
        SigningKey::from_seed_base64(key_id, seed_base64).map(|inner| Self { inner }).map_err(js_error)
    }

    /// A key from 32 seed bytes (e.g. from `crypto.getRandomValues`).
    #[wasm_bindgen(js_name = fromSeedBytes)]
    pub fn from_seed_bytes(#[wasm_bindgen(js_name = keyId)] key_id: &str, seed: &[u8]) -> Result<Self, JsError> {
        let seed: [u8; 32] =
            seed.try_into().map_err(|_| JsError::new(&format!("a seed is 32 bytes, this one is {}", seed.len())))?;
        SigningKey::generate_from_seed_bytes(key_id, seed).map(|inner| Self { inner }).map_err(js_error)
    }

    /// The first key of a Synapse signing key file (`ed25519 <version> <seed>` lines).
    #[wasm_bindgen(js_name = fromSynapseKeyFile)]
    pub fn from_synapse_key_file(text: &str) -> Result<Self, JsError> {
        SigningKey::parse_synapse_key_file(text).map(|inner| Self { inner }).map_err(js_error)
    }

    /// `ed25519:<version>`.
    #[wasm_bindgen(getter, js_name = keyId)]
    pub fn key_id(&self) -> String {
        self.inner.key_id().to_owned()
    }

    /// The public key, unpadded base64, as published in `verify_keys`.
    #[wasm_bindgen(getter, js_name = publicKeyBase64)]
    pub fn public_key_base64(&self) -> String {
        self.inner.public_key_base64()
    }

    /// The key in Synapse's key file format.
    #[wasm_bindgen(js_name = toSynapseKeyFile)]
    pub fn to_synapse_key_file(&self) -> String {
        self.inner.to_synapse_key_file()
    }
}

/// Canonical JSON of JSON text.
#[wasm_bindgen(js_name = wasmCanonicalJson)]
pub fn canonical_json(json: &str) -> Result<String, JsError> {
    fedsend_sign::canonical_json(&parse("the value", json)?).map_err(js_error)
}

/// JSON text of the object with `signatures.{origin}.{key id}` added.
#[wasm_bindgen(js_name = wasmSignJson)]
pub fn sign_json(json: &str, origin: &str, key: &WasmSigningKey) -> Result<String, JsError> {
    let mut value = parse("the value", json)?;
    fedsend_sign::sign_json(&mut value, origin, &key.inner).map_err(js_error)?;
    fedsend_sign::canonical_json(&value).map_err(js_error)
}

/// Checks `signatures.{origin}.{keyId}` against a base64 public key; throws when it fails.
#[wasm_bindgen(js_name = wasmVerifyJson)]
pub fn verify_json(json: &str, origin: &str, key_id: &str, public_key_base64: &str) -> Result<(), JsError> {
    fedsend_sign::verify_json(&parse("the value", json)?, origin, key_id, public_key_base64).map_err(js_error)
}

/// The `Authorization` header value of a federation request; `content_json` is the body as
/// sent (or undefined for a request without one).
#[wasm_bindgen(js_name = wasmXMatrixAuthorization)]
pub fn x_matrix_authorization(
    origin: &str,
    destination: &str,
    method: &str,
    uri: &str,
    content_json: Option<String>,
    key: &WasmSigningKey,
) -> Result<String, JsError> {
    let content = content_json.as_deref().map(|json| parse("the content", json)).transpose()?;
    fedsend_sign::x_matrix_authorization(origin, destination, method, uri, content.as_ref(), &key.inner)
        .map_err(js_error)
}

#[cfg(test)]
mod tests {
    use super::*;

    // The Matrix spec's signing example key ("Signing JSON" appendix).
    const SEED: &str = "YJDBA9Xnr2sVqXD9Vj7XVUnmFZcZrlw8Md7kMW+3XA1";

    // Only success paths: natively, building a JsError calls into JavaScript and panics.
    #[test]
    fn the_bindings_give_what_fedsend_sign_gives() {
        let key = WasmSigningKey::from_seed_base64("ed25519:1", SEED).unwrap();
        assert_eq!(key.key_id(), "ed25519:1");
        assert_eq!(
            sign_json("{}", "domain", &key).unwrap(),
            r#"{"signatures":{"domain":{"ed25519:1":"K8280/U9SSy9IVtjBuVeLr+HpOB4BQFWbg+UZaADMtTdGYI7Geitb76LTrr5QV/7Xg4ahLwYGYZzuHGZKM5ZAQ"}}}"#
        );
        assert_eq!(canonical_json(r#"{ "b": 1, "a": "é" }"#).unwrap(), r#"{"a":"é","b":1}"#);
        let body = r#"{"origin":"a.test","pdus":[]}"#;
        let direct = fedsend_sign::x_matrix_authorization(
            "a.test",
            "b.test",
            "PUT",
            "/_matrix/federation/v1/send/1.1",
            Some(&serde_json::from_str(body).unwrap()),
            &SigningKey::from_seed_base64("ed25519:1", SEED).unwrap(),
        )
        .unwrap();
        let bound = x_matrix_authorization(
            "a.test",
            "b.test",
            "PUT",
            "/_matrix/federation/v1/send/1.1",
            Some(body.to_owned()),
            &key,
        )
        .unwrap();
        assert_eq!(bound, direct);
        let file = key.to_synapse_key_file();
        assert_eq!(WasmSigningKey::from_synapse_key_file(&file).unwrap().public_key_base64(), key.public_key_base64());
    }
}
