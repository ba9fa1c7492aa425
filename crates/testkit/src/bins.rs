//! Finding the workspace's binaries from a test: the example services are another package's
//! binaries, so cargo gives a test of the root package no `CARGO_BIN_EXE_` path for them.
//! They are built into the same target directory (`cargo build --workspace --bins`, which
//! `./dev test` runs first).

use std::path::PathBuf;

/// Why a binary cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum BinError {
    /// The running executable's location is unknown.
    #[error("cannot locate the running executable: {0}")]
    CurrentExe(std::io::Error),
    /// Not built.
    #[error("{name} is not built in {dir}: run `cargo build --workspace --bins` (./dev test does)")]
    Missing {
        /// The binary.
        name: String,
        /// Where it was looked for.
        dir: String,
    },
}

/// The path of the workspace binary `name` in the target directory of the running test (or
/// binary): the directory of the running executable, or its parent when that is `deps`.
pub fn workspace_bin(name: &str) -> Result<PathBuf, BinError> {
    let me = std::env::current_exe().map_err(BinError::CurrentExe)?;
    let mut dir = me.parent().map(PathBuf::from).unwrap_or_default();
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir.pop();
    }
    let path = dir.join(name);
    if path.is_file() {
        Ok(path)
    } else {
        Err(BinError::Missing {
            name: name.to_string(),
            dir: dir.display().to_string(),
        })
    }
}
