//! Synapse's replication protocol as fedsend's worker mode reads it off Redis:
//! `parse_command`, `parse_row` and `ReplicationState::handle_line`, which promise never to
//! panic on any line (a Redis channel is shared with every Synapse worker).
//!
//! The input is a sequence of lines; a line holding only U+0001 stands for a dropped Redis
//! connection (`connection_lost`). Beyond "no panic", the target checks the promises the
//! worker's catch-up logic builds on:
//! - a command that parses re-parses to itself from `Command::to_line`;
//! - the position of a persistent stream never moves back, whatever arrives;
//! - every update's token is the position the state holds afterwards, a `Gap` is a non-empty
//!   range starting at the old position, and `Rows` only ever move a position forward.
#![no_main]

use std::collections::BTreeMap;

use fedsend_synapse::replication::{Command, ReplicationState, Stream, Update, parse_command, parse_row};
use libfuzzer_sys::fuzz_target;

const OWN_INSTANCE: &str = "fedsend1";
const CONNECTION_LOST: &str = "\u{1}";

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let mut state = ReplicationState::new(OWN_INSTANCE);
    // Every (stream, instance) pair named so far, with its position before the current line.
    let mut seen: BTreeMap<(Stream, String), i64> = BTreeMap::new();
    for line in text.split('\n') {
        if line == CONNECTION_LOST {
            state.connection_lost();
            continue;
        }
        let command = parse_command(line);
        if let Ok(command) = &command {
            let again = parse_command(&command.to_line());
            if has_float(command) {
                // serde_json (without its float_roundtrip feature, as everywhere here) may read
                // a printed float back one ulp off; Synapse's rows carry no floats that matter.
                assert!(again.is_ok(), "{line:?} does not survive to_line: {again:?}");
            } else {
                assert_eq!(again.as_ref(), Ok(command), "{line:?} does not survive to_line");
            }
            note_pairs(&state, command, &mut seen);
            if let Command::Rdata { row, .. } = command {
                // Rows of every shape against every stream's parser, not only the one named.
                for stream in Stream::ALL {
                    let _ = parse_row(stream, row);
                }
            }
        }
        let before = seen.clone();
        let update = state.handle_line(line);
        for ((stream, instance), old) in &before {
            let now = state.position(*stream, instance);
            if stream.is_persistent() {
                assert!(now >= *old, "{stream} position of {instance} went back from {old} to {now} on {line:?}");
            }
            seen.insert((*stream, instance.clone()), now);
        }
        let Ok(Some(update)) = update else { continue };
        match update {
            Update::Rows { stream, instance, token, rows } => {
                assert!(!rows.is_empty());
                let old = before.get(&(stream, instance.clone())).copied();
                assert!(old.is_none_or(|old| token > old), "rows at {token} behind {old:?} on {line:?}");
                assert_eq!(state.position(stream, &instance), token, "{line:?}");
            }
            Update::Position { stream, instance, token } => {
                assert_eq!(state.position(stream, &instance), token, "{line:?}");
            }
            Update::Gap { stream, instance, from, to } => {
                assert!(from < to, "an empty or reversed gap ({from}, {to}] on {line:?}");
                let old = before.get(&(stream, instance.clone())).copied();
                assert_eq!(old, Some(from), "a gap that does not start at the old position on {line:?}");
                assert_eq!(state.position(stream, &instance), to, "{line:?}");
            }
            Update::Reset { stream, instance, token } => {
                assert!(!stream.is_persistent(), "a persistent stream was reset on {line:?}");
                assert_eq!(state.position(stream, &instance), token, "{line:?}");
            }
            Update::Replicate | Update::RemoteServerUp { .. } | Update::FederationAck { .. } | Update::Other { .. } => {
            }
        }
    }
});

/// Records the position of the (stream, instance) pair a command names, before it applies.
fn note_pairs(state: &ReplicationState, command: &Command, seen: &mut BTreeMap<(Stream, String), i64>) {
    let (Command::Rdata { stream, instance, .. } | Command::Position { stream, instance, .. }) = command else {
        return;
    };
    if let Some(stream) = Stream::from_name(stream) {
        seen.entry((stream, instance.clone())).or_insert_with(|| state.position(stream, instance));
    }
}

fn has_float(command: &Command) -> bool {
    fn value_has_float(value: &serde_json::Value) -> bool {
        match value {
            serde_json::Value::Number(n) => n.is_f64(),
            serde_json::Value::Array(items) => items.iter().any(value_has_float),
            serde_json::Value::Object(members) => members.values().any(value_has_float),
            _ => false,
        }
    }
    matches!(command, Command::Rdata { row, .. } if value_has_float(row))
}
