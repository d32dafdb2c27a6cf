//! `cargo run -p fedsend-sim --example trace -- FILE`: the native trace without the CLI.
fn main() {
    let path = std::env::args().nth(1).expect("usage: trace FILE");
    let text = std::fs::read_to_string(&path).expect("readable scenario");
    let mut engine = fedsend_sim::NativeEngine::default();
    let result = fedsend_sim::run_scenario(&text, &mut engine, &mut |line| println!("{line}"));
    if let Err(error) = result {
        eprintln!("trace: {path}: {error}");
        std::process::exit(1);
    }
}
