//! `--human`: a trace (`docs/scenarios.md`, one JSON object per line) as aligned columns for
//! people: time since the scenario's start in seconds, kind, destination (or room), transaction,
//! PDU/EDU counts, and the outcome or other detail. Snapshots add indented lines below.
//!
//! Lines it does not understand are shown, not dropped: an unknown kind (including `x-…`) prints
//! its other fields, and a line that is not a JSON object prints as it is.

use std::io::{self, Write};

use serde_json::{Map, Value};

/// How many PDU ids / EDU types of one transaction are listed before "…".
const ITEMS_SHOWN_MAX: usize = 6;

const HEADER: [&str; 6] = ["TIME", "KIND", "DEST", "TXN", "ITEMS", "DETAIL"];

/// Collects trace lines and writes them as a table (columns are sized to the whole trace).
#[derive(Debug)]
pub struct HumanTrace {
    start_ms: Option<u64>,
    rows: Vec<Row>,
}

#[derive(Debug, Default)]
struct Row {
    cells: [String; 6],
    /// Indented lines printed below the row.
    details: Vec<String>,
}

impl HumanTrace {
    /// `start_ms`: the scenario's virtual start (times are shown relative to it); `None` uses the
    /// first line's time.
    pub fn new(start_ms: Option<u64>) -> Self {
        Self { start_ms, rows: Vec::new() }
    }

    /// Adds one trace line.
    pub fn push(&mut self, line: &str) {
        let row = match serde_json::from_str::<Value>(line) {
            Ok(Value::Object(fields)) => self.row(fields),
            _ => Row {
                cells: [String::new(), "?".into(), String::new(), String::new(), String::new(), line.into()],
                details: Vec::new(),
            },
        };
        self.rows.push(row);
    }

    /// Writes the table, with a header line.
    pub fn write_to(&self, out: &mut dyn Write) -> io::Result<()> {
        let header = Row { cells: HEADER.map(String::from), details: Vec::new() };
        let all = || std::iter::once(&header).chain(&self.rows);
        let mut widths = [0; 6];
        for row in all() {
            for (width, cell) in widths.iter_mut().zip(&row.cells) {
                *width = (*width).max(cell.chars().count());
            }
        }
        for row in all() {
            let mut line = String::new();
            for (column, (cell, width)) in row.cells.iter().zip(widths).enumerate() {
                let pad = width - cell.chars().count();
                match column {
                    0 => line.push_str(&format!("{}{cell}", " ".repeat(pad))), // times align right
                    _ => line.push_str(&format!("  {cell}{}", " ".repeat(pad))),
                }
            }
            writeln!(out, "{}", line.trim_end())?;
            for detail in &row.details {
                writeln!(out, "{}    {detail}", " ".repeat(widths[0]))?;
            }
        }
        Ok(())
    }

    fn row(&mut self, mut f: Map<String, Value>) -> Row {
        let t = f.remove("t").and_then(|t| t.as_u64());
        let start = *self.start_ms.get_or_insert(t.unwrap_or(0));
        let time = t.map(|t| seconds(i128::from(t) - i128::from(start))).unwrap_or_default();
        let kind = f.remove("kind").map(text).unwrap_or_default();
        let mut row = Row::default();
        let (dest, txn, items, detail) = match kind.as_str() {
            "persisted" => {
                let (event, room, stream, sender) =
                    (take(&mut f, "event"), take(&mut f, "room"), take(&mut f, "stream"), take(&mut f, "sender"));
                (room, String::new(), String::new(), format!("{event} (stream {stream}) from {sender}"))
            }
            "send" => {
                let pdus = list(f.remove("pdus"), |pdu| text(pdu.clone()));
                let edus = list(f.remove("edus"), |edu| edu.get("edu_type").cloned().map(text).unwrap_or_default());
                let items = format!("{} PDU {} EDU", pdus.len(), edus.len());
                let bytes = take(&mut f, "bytes");
                let listed: Vec<String> = pdus.into_iter().chain(edus).collect();
                (take(&mut f, "dest"), take(&mut f, "txn_id"), items, format!("{bytes} B: {}", shorten(&listed)))
            }
            "result" => (take(&mut f, "dest"), take(&mut f, "txn_id"), String::new(), take(&mut f, "outcome")),
            "dropped" => {
                let (dest, item, reason) = (take(&mut f, "dest"), take(&mut f, "item"), take(&mut f, "reason"));
                (dest, String::new(), String::new(), format!("{item}: {reason}"))
            }
            "snapshot" => {
                let destinations = list(f.remove("destinations"), Value::clone);
                let rooms = list(f.remove("destination_rooms"), Value::clone);
                let position = take(&mut f, "events_out_pos");
                for d in &destinations {
                    let field = |key: &str| d.get(key).cloned().map(text).unwrap_or_default();
                    row.details.push(format!(
                        "{}: last successful {}, retry interval {} ms, failure at {}, last retry at {}",
                        field("destination"),
                        field("last_successful_stream_ordering"),
                        field("retry_interval"),
                        field("failure_ts"),
                        field("retry_last_ts"),
                    ));
                }
                for r in &rooms {
                    let field = |key: &str| r.get(key).cloned().map(text).unwrap_or_default();
                    row.details.push(format!(
                        "{} in {} at stream {}",
                        field("destination"),
                        field("room"),
                        field("stream_ordering")
                    ));
                }
                let summary = format!(
                    "{} destinations, {} destination rooms, events out at {position}",
                    destinations.len(),
                    rooms.len()
                );
                (String::new(), String::new(), String::new(), summary)
            }
            _ => (String::new(), String::new(), String::new(), String::new()),
        };
        // Whatever was not shown above (all fields of an unknown kind) goes at the end.
        let rest: Vec<String> = f.into_iter().map(|(k, v)| format!("{k}={v}")).collect();
        let detail = [detail, rest.join(" ")].into_iter().filter(|s| !s.is_empty()).collect::<Vec<_>>().join(" ");
        row.cells = [time, kind, dest, txn, items, detail];
        row
    }
}

/// Removes `key` from a trace line's fields, as [`text`].
fn take(fields: &mut Map<String, Value>, key: &str) -> String {
    fields.remove(key).map(text).unwrap_or_default()
}

/// A JSON value as text: strings without quotes, `null` as `-`, anything else as JSON.
fn text(value: Value) -> String {
    match value {
        Value::String(s) => s,
        Value::Null => "-".into(),
        other => other.to_string(),
    }
}

fn list<T>(value: Option<Value>, each: impl Fn(&Value) -> T) -> Vec<T> {
    match value {
        Some(Value::Array(items)) => items.iter().map(each).collect(),
        _ => Vec::new(),
    }
}

fn shorten(items: &[String]) -> String {
    let mut shown = items.iter().take(ITEMS_SHOWN_MAX).cloned().collect::<Vec<_>>().join(" ");
    if items.len() > ITEMS_SHOWN_MAX {
        shown.push_str(&format!(" … (+{})", items.len() - ITEMS_SHOWN_MAX));
    }
    shown
}

/// `+12.345s` from milliseconds.
fn seconds(ms: i128) -> String {
    let sign = if ms < 0 { '-' } else { '+' };
    let ms = ms.unsigned_abs();
    format!("{sign}{}.{:03}s", ms / 1000, ms % 1000)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn render(start: Option<u64>, lines: &[&str]) -> String {
        let mut trace = HumanTrace::new(start);
        for line in lines {
            trace.push(line);
        }
        let mut out = Vec::new();
        trace.write_to(&mut out).unwrap();
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn renders_the_spec_example_as_aligned_columns() {
        let out = render(
            Some(1_000_000),
            &[
                r#"{"t":1000000,"kind":"persisted","event":"$3","room":"!r:test","stream":3,"sender":"@a:test"}"#,
                r#"{"t":1000000,"kind":"send","dest":"host2","txn_id":"17","pdus":["$3"],"edus":[{"edu_type":"m.receipt","content":{}}],"bytes":812}"#,
                r#"{"t":1000250,"kind":"result","dest":"host2","txn_id":"17","outcome":"status 500"}"#,
                r#"{"t":1005000,"kind":"snapshot","destinations":[{"destination":"host2","retry_last_ts":1000250,"retry_interval":600000,"failure_ts":1000250,"last_successful_stream_ordering":null}],"destination_rooms":[{"destination":"host2","room":"!r:test","stream_ordering":3}],"events_out_pos":3}"#,
                r#"{"t":1005000,"kind":"x-note","text":"hi"}"#,
                "not json",
                r#"{"t":1005000,"kind":"end"}"#,
            ],
        );
        let expected = [
            "   TIME  KIND       DEST     TXN  ITEMS        DETAIL",
            "+0.000s  persisted  !r:test                    $3 (stream 3) from @a:test",
            "+0.000s  send       host2    17   1 PDU 1 EDU  812 B: $3 m.receipt",
            "+0.250s  result     host2    17                status 500",
            "+5.000s  snapshot                              1 destinations, 1 destination rooms, events out at 3",
            "           host2: last successful -, retry interval 600000 ms, failure at 1000250, last retry at 1000250",
            "           host2 in !r:test at stream 3",
            "+5.000s  x-note                                text=\"hi\"",
            "         ?                                     not json",
            "+5.000s  end",
        ];
        assert_eq!(out, expected.map(|line| format!("{line}\n")).concat(), "got:\n{out}");
    }

    #[test]
    fn long_transactions_are_shortened_and_time_defaults_to_the_first_line() {
        let pdus: Vec<String> = (1..=8).map(|i| format!("\"${i}\"")).collect();
        let send = format!(
            r#"{{"t":2000,"kind":"send","dest":"h","txn_id":"1","pdus":[{}],"edus":[],"bytes":9}}"#,
            pdus.join(",")
        );
        let out = render(None, &[&send, r#"{"t":3500,"kind":"end"}"#]);
        assert!(out.contains("8 PDU 0 EDU  9 B: $1 $2 $3 $4 $5 $6 … (+2)"), "{out}");
        assert!(out.contains("+1.500s  end"), "{out}");
        assert_eq!(seconds(-1500), "-1.500s");
    }
}
