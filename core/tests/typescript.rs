//! `npm/types.d.ts`, the npm package's declarations of the wire types, is generated from the
//! Rust types: this test renders it and fails when the committed file differs.
//! `FEDSEND_BLESS=1` writes the file instead.
//!
//! `cargo test -p fedsend-core --features ts --test typescript` (scripts/test.sh runs it in the
//! native-test stage).
//!
//! The declarations come from ts-rs rather than tsify. ts-rs hands back each declaration as
//! text in a plain native test, so the package ships one committed file that this test can
//! regenerate and compare, and the core gains one optional dependency and no wasm-bindgen.
//! tsify emits its declarations into wasm-bindgen's custom sections, so they would surface
//! only in a wasm build's glue, and it cannot be built without wasm-bindgen. ts-rs reads the
//! serde attributes the types already carry (tags, `rename_all`, `default` with
//! `skip_serializing_if` as `?:`) and turns the doc comments into JSDoc.
//!
//! Mapping conventions (the attributes are in core/src):
//! - u64 is `number`: the package exchanges plain JSON numbers, exact up to 2^53 - 1.
//! - `serde_json::Value` fields carry `ts(type = "Json")`; `Json` is declared here.
//! - A field with a serde default that is always serialized carries `ts(optional = nullable)`,
//!   which keeps its type and marks it `?:` (ts-rs does that by itself only for fields that
//!   are also skipped when serializing).

use std::fmt::Write as _;
use std::path::PathBuf;

use fedsend_core::{
    CatchUpRoom, Changes, Config, DestinationPhase, DestinationRoom, DestinationState, DestinationStats,
    DeviceListPoke, DeviceListPokeKey, DeviceListPosition, Event, Extremity, Input, OutboxKey, OutboxRow,
    OutgoingTransaction, Output, PduInfo, PresenceState, Receipt, ReceiptedEvent, Recovered, RequestId, ServerName,
    TransactionResult,
};
use ts_rs::TS;

const FILE: &str = "npm/types.d.ts";
const BLESS_ENV: &str = "FEDSEND_BLESS";

const HEADER: &str = "\
// Generated from the wire types of fedsend-core (core/src) by ts-rs. Do not edit: change the
// Rust types, then run
//   FEDSEND_BLESS=1 cargo test -p fedsend-core --features ts --test typescript
// Times are whole Unix milliseconds; every integer is a JSON number (exact up to 2^53 - 1).

/** Any JSON value. */
export type Json = null | boolean | number | string | Json[] | { [key: string]: Json };

/** A JSON object. */
export type JsonObject = { [key: string]: Json };
";

/// One exported type: its TypeScript name, its declaration and the declared types it uses.
struct Declaration {
    name: String,
    text: String,
    uses: Vec<String>,
}

fn declaration<T: TS + 'static>(cfg: &ts_rs::Config) -> Declaration {
    let decl = T::decl(cfg);
    let (name, ty) =
        decl.strip_prefix("type ").and_then(|rest| rest.split_once(" = ")).expect("ts-rs declares `type NAME = TYPE;`");
    let ty = ty.strip_suffix(';').expect("a declaration ends with `;`");
    let mut text = T::docs().map(|docs| render_doc(&docs, 0)).unwrap_or_default();
    let body = render(&Parser::new(ty).union(), 0);
    let space = if body.starts_with('\n') { "" } else { " " };
    let _ = writeln!(text, "export type {name} ={space}{body};");
    Declaration { name: name.to_owned(), text, uses: T::dependencies(cfg).into_iter().map(|d| d.ts_name).collect() }
}

/// Every type the package exposes, in the order of the file.
fn declarations() -> Vec<Declaration> {
    let cfg = ts_rs::Config::new().with_large_int("number");
    vec![
        declaration::<ServerName>(&cfg),
        declaration::<RequestId>(&cfg),
        declaration::<Receipt>(&cfg),
        declaration::<PresenceState>(&cfg),
        declaration::<ReceiptedEvent>(&cfg),
        declaration::<PduInfo>(&cfg),
        declaration::<Extremity>(&cfg),
        declaration::<CatchUpRoom>(&cfg),
        declaration::<DestinationState>(&cfg),
        declaration::<DestinationRoom>(&cfg),
        declaration::<OutboxRow>(&cfg),
        declaration::<OutboxKey>(&cfg),
        declaration::<DeviceListPoke>(&cfg),
        declaration::<DeviceListPokeKey>(&cfg),
        declaration::<DeviceListPosition>(&cfg),
        declaration::<Changes>(&cfg),
        declaration::<Recovered>(&cfg),
        declaration::<OutgoingTransaction>(&cfg),
        declaration::<DestinationPhase>(&cfg),
        declaration::<DestinationStats>(&cfg),
        declaration::<TransactionResult>(&cfg),
        declaration::<Event>(&cfg),
        declaration::<Input>(&cfg),
        declaration::<Output>(&cfg),
        declaration::<Config>(&cfg),
    ]
}

fn generate() -> String {
    let declarations = declarations();
    let names: Vec<&str> = declarations.iter().map(|d| d.name.as_str()).collect();
    for d in &declarations {
        assert_eq!(names.iter().filter(|n| **n == d.name).count(), 1, "{} is declared twice", d.name);
        for used in &d.uses {
            assert!(
                names.contains(&used.as_str()),
                "{} uses {used}, which is not declared: add it to declarations() in {}",
                d.name,
                file!()
            );
        }
    }
    let mut out = String::from(HEADER);
    for d in &declarations {
        out.push('\n');
        out.push_str(&d.text);
    }
    out
}

#[test]
fn types_d_ts_is_generated_from_the_rust_types() {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..").join(FILE);
    let generated = generate();
    if std::env::var(BLESS_ENV).is_ok_and(|v| v == "1") {
        std::fs::write(&path, &generated).unwrap_or_else(|e| panic!("writing {FILE}: {e}"));
        return;
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {FILE}: {e}"));
    if committed != generated {
        let line = committed
            .lines()
            .zip(generated.lines())
            .position(|(a, b)| a != b)
            .unwrap_or_else(|| committed.lines().count().min(generated.lines().count()))
            + 1;
        panic!(
            "{FILE} is not what the Rust types generate (first difference at line {line}:\n  committed: {:?}\n  generated: {:?}); \
             it is never edited by hand: regenerate it with {BLESS_ENV}=1 and commit it",
            committed.lines().nth(line - 1).unwrap_or("<end of file>"),
            generated.lines().nth(line - 1).unwrap_or("<end of file>"),
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Layout. ts-rs writes each declaration on one line, with field docs inline; this reads back
// the small subset of TypeScript it emits (unions, intersections, object literals, doc
// comments, opaque names) and prints it one member per line. It only moves whitespace and
// separators, so the types stay exactly as ts-rs made them.

enum Ty {
    Union(Vec<Self>),
    Intersection(Vec<Self>),
    Object(Vec<Member>),
    Name(String),
}

struct Member {
    doc: Option<String>,
    key: String,
    ty: Ty,
}

struct Parser<'a> {
    text: &'a str,
    at: usize,
}

impl<'a> Parser<'a> {
    fn new(text: &'a str) -> Self {
        Self { text, at: 0 }
    }

    fn rest(&self) -> &'a str {
        &self.text[self.at..]
    }

    fn skip_space(&mut self) {
        self.at = self.text.len() - self.rest().trim_start().len();
    }

    fn eat(&mut self, token: &str) -> bool {
        self.skip_space();
        let found = self.rest().starts_with(token);
        if found {
            self.at += token.len();
        }
        found
    }

    fn union(&mut self) -> Ty {
        let mut parts = vec![self.intersection()];
        while self.eat("|") {
            parts.push(self.intersection());
        }
        if parts.len() == 1 { parts.pop().expect("one part") } else { Ty::Union(parts) }
    }

    fn intersection(&mut self) -> Ty {
        let mut parts = vec![self.primary()];
        while self.eat("&") {
            parts.push(self.primary());
        }
        if parts.len() == 1 { parts.pop().expect("one part") } else { Ty::Intersection(parts) }
    }

    fn primary(&mut self) -> Ty {
        if self.eat("{") {
            let mut members = Vec::new();
            while !self.eat("}") {
                let doc = self.eat("/**").then(|| {
                    let end = self.rest().find("*/").expect("a doc comment ends");
                    let doc = format!("/**{}*/", &self.rest()[..end]);
                    self.at += end + 2;
                    doc
                });
                self.skip_space();
                let key = self.scan(|c| c == ':').trim().to_owned();
                assert!(self.eat(":"), "a member has a type: {}", self.rest());
                let ty = self.union();
                let _ = self.eat(",") || self.eat(";");
                members.push(Member { doc, key, ty });
            }
            Ty::Object(members)
        } else {
            self.skip_space();
            Ty::Name(self.scan(|c| matches!(c, '|' | '&' | ',' | ';' | '}')).trim().to_owned())
        }
    }

    /// Advances to the first `stop` character outside brackets and strings; returns what it passed.
    fn scan(&mut self, stop: impl Fn(char) -> bool) -> &'a str {
        let start = self.at;
        let (mut depth, mut in_string) = (0_usize, false);
        for (offset, c) in self.rest().char_indices() {
            match c {
                '"' => in_string = !in_string,
                _ if in_string => {}
                '<' | '[' | '(' => depth += 1,
                '>' | ']' | ')' => depth -= 1,
                _ if depth == 0 && stop(c) => {
                    self.at += offset;
                    return &self.text[start..self.at];
                }
                _ => {}
            }
        }
        self.at = self.text.len();
        &self.text[start..]
    }
}

/// The widest object kept on one line.
const INLINE_MAX: usize = 72;

/// `ty` as it appears at `indent`: a multi-line object closes at `indent`; a multi-line union
/// starts on a new line, one member per line.
fn render(ty: &Ty, indent: usize) -> String {
    match ty {
        Ty::Name(name) => name.clone(),
        Ty::Intersection(parts) => parts.iter().map(|p| render(p, indent)).collect::<Vec<_>>().join(" & "),
        Ty::Union(parts) => {
            let inline: Vec<String> = parts.iter().map(|p| render(p, indent)).collect();
            if inline.iter().all(|p| !p.contains('\n'))
                && inline.iter().map(|p| p.len() + 3).sum::<usize>() <= INLINE_MAX
            {
                return inline.join(" | ");
            }
            parts.iter().map(|p| format!("\n{}| {}", " ".repeat(indent + 2), render(p, indent + 4))).collect()
        }
        Ty::Object(members) => {
            let inline = members
                .iter()
                .map(|m| m.doc.is_none().then(|| format!("{}: {}", m.key, render(&m.ty, indent))))
                .collect::<Option<Vec<_>>>()
                .map(|members| format!("{{ {} }}", members.join("; ")));
            if let Some(inline) = inline.filter(|i| !i.contains('\n') && i.len() <= INLINE_MAX) {
                return inline;
            }
            let pad = " ".repeat(indent + 2);
            let mut out = String::from("{\n");
            for m in members {
                if let Some(doc) = &m.doc {
                    out.push_str(&render_doc(doc, indent + 2));
                }
                let _ = writeln!(out, "{pad}{}: {};", m.key, render(&m.ty, indent + 2));
            }
            out + &" ".repeat(indent) + "}"
        }
    }
}

/// A `/** … */` comment at `indent`, on one line when its text is one line.
fn render_doc(doc: &str, indent: usize) -> String {
    let body = doc.trim().trim_start_matches("/**").trim_end_matches("*/");
    let lines: Vec<&str> = body
        .lines()
        .map(|line| {
            let line = line.trim_start();
            line.strip_prefix("* ").or_else(|| line.strip_prefix('*')).unwrap_or(line).trim_end()
        })
        .skip_while(|line| line.is_empty())
        .collect();
    let lines = &lines[..lines.iter().rposition(|line| !line.is_empty()).map_or(0, |last| last + 1)];
    let pad = " ".repeat(indent);
    match lines {
        [] => String::new(),
        [line] => format!("{pad}/** {line} */\n"),
        lines => {
            let mut out = format!("{pad}/**\n");
            for line in lines {
                let _ = writeln!(out, "{pad} *{}{line}", if line.is_empty() { "" } else { " " });
            }
            out + &pad + " */\n"
        }
    }
}
