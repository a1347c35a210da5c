//! What every test of the binary needs: running it, and asserting success or a clean failure.
#![allow(dead_code)] // each test file uses its own part

use std::path::Path;
use std::process::Command;

/// Runs `recompose args` with `home` as $RECOMPOSE_HOME: (exit code, stdout, stderr).
pub fn recompose(home: &Path, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_recompose"))
        .args(args)
        .env("RECOMPOSE_HOME", home)
        .env("RAYON_NUM_THREADS", "1")
        .output()
        .expect("run recompose");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Asserts success; returns (stdout, stderr).
pub fn succeeds(home: &Path, args: &[&str]) -> (String, String) {
    let (code, out, err) = recompose(home, args);
    assert_eq!(code, 0, "{args:?}: {err}");
    (out, err)
}

/// Asserts a clean failure (non-zero, no panic, exactly one line starting "error: ") and
/// returns the error line.
pub fn fails(home: &Path, args: &[&str]) -> String {
    let (code, _out, err) = recompose(home, args);
    assert_ne!(code, 0, "expected failure for {args:?}");
    assert!(!err.contains("panicked"), "panic for {args:?}: {err}");
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "expected one line for {args:?}, got: {err}");
    assert!(lines[0].starts_with("error: "), "{err}");
    lines[0].to_string()
}
