//! Prometheus's own tools judging what Tessera exposes: `promtool check metrics` on a
//! `/metrics` answer. Debian's `prometheus` package has it; `.ci/run` installs it.

use std::io::Write;
use std::process::{Command, Stdio};

/// Whether `promtool` runs here; outside CI its absence skips (with a printed reason),
/// under `CI=true` it fails the test.
pub fn promtool() -> Option<&'static str> {
    let found = Command::new("promtool")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if found {
        return Some("promtool");
    }
    if std::env::var_os("CI").is_some() {
        panic!("promtool is not installed (apt-get install prometheus); .ci/run installs it");
    }
    eprintln!("skipped: promtool is not installed (apt-get install prometheus)");
    None
}

/// Panics with promtool's words unless `text` passes `promtool check metrics` (format
/// and lint: HELP on every family, `_total` counters, base units).
pub fn check_metrics(text: &str) {
    let Some(promtool) = promtool() else { return };
    let mut child = Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start promtool");
    child
        .stdin
        .take()
        .expect("piped stdin")
        .write_all(text.as_bytes())
        .expect("write to promtool");
    let out = child.wait_with_output().expect("promtool ran");
    assert!(
        out.status.success(),
        "promtool check metrics failed:\n{}{}\n--- the metrics:\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
}
