//! `fedsend scenario`: runs a scenario file (`docs/scenarios.md`) through one engine and prints
//! its trace.
//!
//! stdout carries the trace and nothing else (one JSON object per line, or the `--human` table),
//! so that traces of different engines can be compared byte for byte. Problems go to stderr as
//! one line, `fedsend: FILE: message`.

use std::io::{self, Write};
use std::path::PathBuf;

use fedsend_sim::{Engine, NativeEngine};

use crate::human::HumanTrace;
use crate::wasm_engine::{self, WasmEngine};

/// Arguments of `fedsend scenario`.
#[derive(Debug, clap::Args)]
pub struct ScenarioArgs {
    /// Which build of the core runs the scenario.
    #[arg(long, value_enum, default_value_t = EngineKind::Native)]
    pub engine: EngineKind,
    /// The guest module for `--engine wasm` [default: $FEDSEND_WASM, else target/fedsend_guest.wasm]
    #[arg(long, value_name = "PATH")]
    pub wasm: Option<PathBuf>,
    /// Print the trace as aligned columns for people instead of JSON lines.
    #[arg(long)]
    pub human: bool,
    /// The scenario file (JSON).
    pub file: PathBuf,
}

/// The engines a scenario can run on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum EngineKind {
    /// The core linked into this binary.
    Native,
    /// The core compiled to wasm (fedsend-guest), run by wasmtime.
    Wasm,
}

/// Why `fedsend scenario` failed.
#[derive(Debug)]
pub struct Failure {
    /// The process exit code: 1 for a scenario error (malformed scenario, engine error), 2 when
    /// the run could not begin (unreadable file, no wasm module) or stdout failed.
    pub exit_code: u8,
    /// One line, without the program name.
    pub message: String,
}

/// Runs the command, writing the trace to `out`.
pub fn run(args: &ScenarioArgs, out: &mut dyn Write) -> Result<(), Failure> {
    let file = args.file.display();
    let setup = |message: String| Failure { exit_code: 2, message };
    let scenario = std::fs::read_to_string(&args.file).map_err(|e| setup(format!("{file}: cannot read: {e}")))?;
    let mut engine: Box<dyn Engine> = match args.engine {
        EngineKind::Native => Box::new(NativeEngine::default()),
        EngineKind::Wasm => {
            let path = wasm_engine::locate_guest(args.wasm.as_deref()).map_err(|e| setup(e.to_string()))?;
            Box::new(WasmEngine::from_file(&path).map_err(|e| setup(e.to_string()))?)
        }
    };

    let mut sink = Sink::new(out, args.human.then(|| HumanTrace::new(start_ms(&scenario))));
    let result = fedsend_sim::run_scenario(&scenario, engine.as_mut(), &mut |line| sink.line(line));
    // The trace so far is printed even when the scenario failed part-way: it shows where.
    sink.finish().map_err(|e| setup(format!("writing the trace: {e}")))?;
    result.map_err(|e| Failure { exit_code: 1, message: format!("{file}: {e}") })
}

/// Where trace lines go: straight out, or into the `--human` table.
struct Sink<'a> {
    out: &'a mut dyn Write,
    human: Option<HumanTrace>,
    /// The first write error; later lines are not attempted.
    error: Option<io::Error>,
}

impl<'a> Sink<'a> {
    fn new(out: &'a mut dyn Write, human: Option<HumanTrace>) -> Self {
        Self { out, human, error: None }
    }

    fn line(&mut self, line: &str) {
        match &mut self.human {
            Some(table) => table.push(line),
            None if self.error.is_none() => {
                if let Err(e) = writeln!(self.out, "{line}") {
                    self.error = Some(e);
                }
            }
            None => {}
        }
    }

    fn finish(self) -> io::Result<()> {
        if let Some(e) = self.error {
            return Err(e);
        }
        if let Some(table) = &self.human {
            table.write_to(self.out)?;
        }
        self.out.flush()
    }
}

/// The scenario's `start_ms` (default 1 000 000, `docs/scenarios.md`), for `--human` times. A file
/// that does not parse gets `None`; the scenario runner reports what is wrong with it.
fn start_ms(scenario: &str) -> Option<u64> {
    const START_MS_DEFAULT: u64 = 1_000_000;
    match serde_json::from_str::<serde_json::Value>(scenario).ok()? {
        serde_json::Value::Object(fields) => match fields.get("start_ms") {
            None => Some(START_MS_DEFAULT),
            Some(value) => value.as_u64(),
        },
        _ => None,
    }
}
