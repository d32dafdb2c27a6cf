//! Helpers shared by the integration tests.

// Each test crate compiles its own copy and uses only some of these.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use fedsend_host_native::wasm_engine::{GUEST_ENV, GUEST_FILE_NAME};

/// The workspace root: every runner's working directory, and where `tests/scenarios` lives.
pub(crate) fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("host-native is inside the workspace").to_owned()
}

/// The guest module the tests use: `$FEDSEND_WASM`, else `target/fedsend_guest.wasm` of the
/// workspace (where `scripts/build-wasm.sh` puts it). Not checked for existence.
pub(crate) fn guest_path() -> PathBuf {
    std::env::var_os(GUEST_ENV)
        .filter(|p| !p.is_empty())
        .map_or_else(|| workspace_root().join("target").join(GUEST_FILE_NAME), PathBuf::from)
}

/// The guest module, or a test failure saying how to build it.
pub(crate) fn existing_guest_path() -> PathBuf {
    let path = guest_path();
    assert!(path.is_file(), "missing the wasm guest {}. Run scripts/build-wasm.sh first (CI does).", path.display());
    path
}

/// When a build product is older than a source it is built from, a hint to rebuild it: a
/// stale module is the usual reason why only the wasm engines disagree.
pub(crate) fn staleness_hint(product: &Path) -> Option<String> {
    let built = product.metadata().and_then(|m| m.modified()).ok()?;
    let root = workspace_root();
    let (source, changed) = ["core/src", "sim/src", "host-wasm/src", "host-wasm/guest/src"]
        .iter()
        .flat_map(|dir| newest_file(&root.join(dir)))
        .max_by_key(|(_, time)| *time)?;
    (changed > built).then(|| {
        format!(
            "hint: {} is older than {}; if only the wasm engines differ, rerun scripts/build-wasm.sh",
            product.display(),
            source.strip_prefix(&root).unwrap_or(&source).display()
        )
    })
}

fn newest_file(dir: &Path) -> Option<(PathBuf, SystemTime)> {
    std::fs::read_dir(dir)
        .ok()?
        .flatten()
        .filter_map(|entry| {
            let path = entry.path();
            if path.is_dir() {
                return newest_file(&path);
            }
            Some((path, entry.metadata().ok()?.modified().ok()?))
        })
        .max_by_key(|(_, time)| *time)
}
