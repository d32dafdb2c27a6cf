//! Inputs drawn the way a fuzzer draws them, for the seeded simulator: JSON nested around and
//! beyond the core's limit (`fedsend_core::nesting`), values around the transaction and
//! to-device size limits, server names that are valid but unusual, unicode in ids and
//! content, empty objects and nulls where a value is optional.
//!
//! They have a PRNG of their own, so a seed whose odd-input rate is zero draws exactly the
//! workload it drew before odd inputs existed.

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

use fedsend_core::nesting::{DOCUMENT_DEPTH_MAX, VALUE_DEPTH_MAX};
use fedsend_core::{Prng, TO_DEVICE_EDU_BYTES_MAX};
use serde_json::{Map, Value, json};

/// Text that trips up careless encoders: escapes, a NUL, byte-order and direction marks,
/// combining characters, characters outside the basic plane.
const AWKWARD_TEXT: [&str; 8] =
    ["ünïcødé", "ユーザー", "🙂🚀", "a\u{0}b", "q\"uo\\te\n", "\u{FEFF}bom", "\u{202E}rtl", "e\u{301}\u{301}"];

/// Server names the grammar accepts that few tests use: ports, IP literals (IPv6 bracketed,
/// IPv4-mapped), punycode, the longest label. `{}` is replaced by a number that keeps names
/// drawn for different remotes apart.
const ODD_SERVER_NAMES: [&str; 7] = [
    "[::1]:{}",
    "[2001:db8::{}]",
    "[::ffff:192.0.2.{}]:8448",
    "127.0.0.{}:8448",
    "xn--bcher-kva.example{}:1",
    "host-{}.example:65535",
    "localhost:{}",
];

/// Names the core must refuse wherever they arrive as plain text (a to-device recipient).
const INVALID_SERVER_NAMES: [&str; 7] =
    ["[::1", "exa_mple.org", "host:0", "host:65536", "-bad.example", "bad-.example", "[not-ipv6]:80"];

/// Draws odd inputs for a fraction of the actions.
pub(crate) struct OddInputs {
    prng: Prng,
    permille: u64,
    /// The sender's `transaction_bytes_max`: sizes are drawn around it.
    transaction_bytes_max: u64,
}

impl OddInputs {
    pub(crate) fn new(seed: u64, permille: u64, transaction_bytes_max: u64) -> Self {
        Self { prng: Prng::from_seed(seed ^ 0x0DD_1A9_u64), permille, transaction_bytes_max }
    }

    /// Whether this action gets an odd input. Draws nothing when the rate is zero.
    pub(crate) fn strike(&mut self) -> bool {
        self.permille > 0 && self.prng.range_inclusive(0, 999) < self.permille
    }

    pub(crate) fn pick(&mut self, count: usize) -> usize {
        self.prng.range_inclusive(0, count as u64 - 1) as usize
    }

    fn chance(&mut self, permille: u64) -> bool {
        self.prng.range_inclusive(0, 999) < permille
    }

    /// A valid, unusual server name, distinct for each `index`.
    pub(crate) fn server_name(&mut self, index: u32) -> String {
        // Octets and ports must stay in range: 1..=254 suits every pattern.
        let number = format!("{}", index % 254 + 1);
        let choice = self.pick(ODD_SERVER_NAMES.len() + 1);
        match ODD_SERVER_NAMES.get(choice) {
            Some(pattern) => pattern.replace("{}", &number),
            None => {
                // Labels may be 63 characters long, and the whole name 255.
                let label: String = core::iter::repeat_n('a', 63 - number.len()).collect();
                format!("{number}{label}.{label}.{label}.example")
            }
        }
    }

    /// A server name the core's grammar refuses.
    pub(crate) fn invalid_server_name(&mut self) -> String {
        String::from(INVALID_SERVER_NAMES[self.pick(INVALID_SERVER_NAMES.len())])
    }

    /// Awkward text for a localpart, device id, thread or display name.
    pub(crate) fn text(&mut self) -> String {
        String::from(AWKWARD_TEXT[self.pick(AWKWARD_TEXT.len())])
    }

    /// A user localpart that is awkward but carries no `:` (the server part follows it).
    pub(crate) fn localpart(&mut self, n: u64) -> String {
        let text = self.text().replace(':', "");
        format!("{text}{n}")
    }

    /// A string of about the sizes that matter: just under and over `transaction_bytes_max`
    /// and the 64 KiB to-device EDU size, or far beyond both.
    pub(crate) fn huge_string(&mut self) -> String {
        let around = match self.pick(3) {
            0 => self.transaction_bytes_max,
            1 => TO_DEVICE_EDU_BYTES_MAX as u64,
            _ => 3 * TO_DEVICE_EDU_BYTES_MAX as u64,
        };
        let size = around.saturating_sub(400) + self.prng.range_inclusive(0, 800);
        core::iter::repeat_n('h', size as usize).collect()
    }

    /// A nesting depth around the core's limit: well within it, at it, just past it, or past
    /// what the JSON parsers between the world and the engine accept (when `deepest` allows).
    pub(crate) fn depth(&mut self, deepest: usize) -> usize {
        let depth = match self.pick(5) {
            0 => self.pick(4) + 1,
            1 => VALUE_DEPTH_MAX - 2 + self.pick(3),
            2 => VALUE_DEPTH_MAX + 1 + self.pick(6),
            3 => VALUE_DEPTH_MAX + 40 + self.pick(20),
            _ => DOCUMENT_DEPTH_MAX + self.pick(20),
        };
        depth.min(deepest)
    }

    /// Arrays and objects alternating, `depth` levels, with awkward text at the bottom.
    pub(crate) fn nested(&mut self, depth: usize) -> Value {
        let mut value = Value::String(self.text());
        for level in 0..depth {
            value = if level % 2 == 0 {
                Value::Array(Vec::from([value]))
            } else {
                let mut object = Map::new();
                object.insert(self.text(), value);
                Value::Object(object)
            };
        }
        value
    }

    /// A JSON value as a fuzzer would write it, nested at most `deepest` levels.
    pub(crate) fn value(&mut self, deepest: usize) -> Value {
        match self.pick(8) {
            0 => Value::Null,
            1 => json!({}),
            2 => json!([]),
            3 => {
                let depth = self.depth(deepest);
                self.nested(depth)
            }
            4 => json!({ "blob": self.huge_string() }),
            5 => {
                // Many small items: size from the count, not from one long string.
                let count = self.transaction_bytes_max / 4 + self.prng.range_inclusive(0, 2_000);
                Value::Array((0..count).map(|n| Value::from(n % 10)).collect())
            }
            6 => json!({ "body": self.text(), "optional": null, "empty": {}, "list": [null, [], {}] }),
            _ => {
                let mut object = Map::new();
                object.insert(self.text(), Value::String(self.text()));
                object.insert(String::from("n"), Value::from(u64::MAX));
                object.insert(String::from("neg"), Value::from(i64::MIN));
                object.insert(String::from("t"), Value::Bool(true));
                Value::Object(object)
            }
        }
    }

    /// An object (what event content and device keys must be), possibly odd inside.
    pub(crate) fn object(&mut self, deepest: usize) -> Value {
        match self.value(deepest.saturating_sub(1)) {
            Value::Object(object) => Value::Object(object),
            other => {
                let mut object = Map::new();
                object.insert(self.text(), other);
                Value::Object(object)
            }
        }
    }

    /// A 1-in-`1000 / permille` yes, for sub-choices within an odd input.
    pub(crate) fn sometimes(&mut self, permille: u64) -> bool {
        self.chance(permille)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fedsend_core::ServerName;
    use fedsend_core::nesting::value_depth;

    #[test]
    fn odd_server_names_are_valid_and_invalid_ones_are_not() {
        let mut odd = OddInputs::new(1, 1000, 4096);
        for index in 0..500 {
            let name = odd.server_name(index);
            assert!(ServerName::parse(&name).is_ok(), "{name}");
            let bad = odd.invalid_server_name();
            assert!(ServerName::parse(&bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn nesting_is_exact_and_the_same_for_the_same_seed() {
        let mut odd = OddInputs::new(7, 1000, 4096);
        assert_eq!(value_depth(&odd.nested(VALUE_DEPTH_MAX + 1)), VALUE_DEPTH_MAX + 1);
        let draw = |seed| {
            let mut odd = OddInputs::new(seed, 1000, 4096);
            (0..50).map(|_| serde_json::to_string(&odd.value(200)).unwrap()).collect::<Vec<_>>()
        };
        assert_eq!(draw(3), draw(3));
    }

    #[test]
    fn a_zero_rate_draws_nothing() {
        let mut odd = OddInputs::new(5, 0, 4096);
        assert!((0..1000).all(|_| !odd.strike()));
    }
}
