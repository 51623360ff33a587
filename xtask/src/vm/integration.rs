//! The integration tests themselves (`monitor/tests`), run once per attach
//! mode with what that mode should attach: `IDLEMON_DISABLE_ATTACH`, which
//! idlemon reads, and `IDLEMON_EXPECT_ATTACH`, which the test kit checks
//! every daemon it starts against (`idlemon_probe_info`, and not ready where
//! a required hook is expected missing). Results come from libtest's own
//! output: one row per kernel, mode and test.
//!
//! Today on this host's kernel (`--kernel native`); the VMs still run the
//! scenario driver (`vm/guest.rs`) until their initramfs carries the test
//! binaries and what they need (iproute2, nftables and the netfilter
//! modules of each kernel).

use std::{
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::{Context as _, bail};
use idlemon_testkit::attach::{Expected, VARIABLE};

use super::results::{HOOKS, Mode, Target, expected_kinds};

/// The tests each mode runs: the scenarios of the matrix, each proven by the
/// test that checks it on this host. `(test binary, test name, what it shows)`.
pub const SCENARIOS: &[(&str, &str, &str)] = &[
    (
        "tracking",
        "idle_client_without_keepalive_is_flagged_then_reset",
        "idle_at_risk",
    ),
    (
        "tracking",
        "socket_keepidle_below_the_timeout_is_not_flagged_and_survives",
        "keepalive_safe, timer_runs",
    ),
    (
        "resets",
        "reuse_after_the_nat_timeout_is_logged_then_the_reset_explained",
        "reset_classified",
    ),
    (
        "failures",
        "a_closed_port_is_a_refused_connect",
        "connect_refused",
    ),
    ("daemon", "sigterm_and_sigint_detach_everything", "exit"),
];

/// One compiled integration test binary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TestBinary {
    pub name: String,
    pub path: PathBuf,
}

/// Builds the integration tests of `names` (`cargo test --no-run`) and
/// returns their executables, from cargo's JSON messages.
pub fn build(root: &Path, names: &[&str]) -> anyhow::Result<Vec<TestBinary>> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let mut command = Command::new(&cargo);
    command
        .args(["test", "--package", "monitor", "--no-run"])
        .arg("--message-format=json-render-diagnostics")
        .current_dir(root)
        .env("PATH", crate::setup::path_with_cargo_bin())
        .stdout(Stdio::piped());
    for name in names {
        command.args(["--test", name]);
    }
    println!(
        "xtask vm-test: cargo test --package monitor --no-run ({})",
        names.join(", ")
    );
    let mut child = command
        .spawn()
        .with_context(|| format!("cannot run {cargo}"))?;
    let stdout = child.stdout.take().context("cargo's stdout")?;
    let mut binaries = Vec::new();
    for line in BufReader::new(stdout).lines() {
        if let Some(binary) = test_artifact(&line.context("reading cargo's output")?) {
            binaries.push(binary);
        }
    }
    let status = child.wait().context("waiting for cargo")?;
    if !status.success() {
        bail!("cargo test --no-run failed ({status})");
    }
    for name in names {
        if !binaries.iter().any(|binary| binary.name == *name) {
            bail!("cargo built no test binary named {name}");
        }
    }
    Ok(binaries)
}

/// An integration test's executable from one of cargo's JSON messages.
fn test_artifact(line: &str) -> Option<TestBinary> {
    let message: serde_json::Value = serde_json::from_str(line).ok()?;
    (message["reason"] == "compiler-artifact"
        && message["profile"]["test"] == true
        && message["target"]["kind"][0] == "test")
        .then_some(())?;
    Some(TestBinary {
        name: message["target"]["name"].as_str()?.to_owned(),
        path: PathBuf::from(message["executable"].as_str()?),
    })
}

/// `IDLEMON_EXPECT_ATTACH` for `target` in `mode`: every hook and the kinds
/// it may show (the matrix's expectations).
pub fn expectation(target: Target, mode: Mode) -> String {
    let hooks: Vec<(&str, &[&str])> = HOOKS
        .iter()
        .map(|hook| (*hook, expected_kinds(target, mode, hook)))
        .collect();
    Expected::render(&hooks)
}

/// Whether `test` can show anything in `mode` on `target`: a daemon
/// without its send hook (degraded) sees no sends after idle, so the
/// reset test, which starts from one, runs only where send attaches.
pub fn runs_in(target: Target, mode: Mode, test: &str) -> bool {
    let expected = Expected::parse(&expectation(target, mode)).is_ok_and(|e| e.ready());
    expected || !test.starts_with("reuse_after")
}

/// What libtest said about one test.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub test: String,
    pub passed: bool,
    /// SKIPPED lines the test printed: what the machine lacked.
    pub skipped: Option<String>,
    /// The end of the test's captured output, when it failed.
    pub tail: Vec<String>,
}

/// libtest's report: `test NAME ... ok|FAILED|ignored`, and each test's
/// `---- NAME stdout ----` section (`--show-output` gives those of passed
/// tests too, where a skip says why).
pub fn parse_libtest(output: &str) -> Vec<Outcome> {
    let mut outcomes: Vec<Outcome> = Vec::new();
    let mut section: Option<(String, Vec<String>)> = None;
    let close = |section: &mut Option<(String, Vec<String>)>, outcomes: &mut Vec<Outcome>| {
        if let Some((test, lines)) = section.take()
            && let Some(outcome) = outcomes.iter_mut().find(|outcome| outcome.test == test)
        {
            outcome.skipped = lines
                .iter()
                .find_map(|line| line.strip_prefix("SKIPPED: "))
                .map(str::to_owned);
            if !outcome.passed {
                outcome.tail = lines[lines.len().saturating_sub(TAIL)..].to_vec();
            }
        }
    };
    for line in output.lines() {
        if let Some(name) = line
            .strip_prefix("---- ")
            .and_then(|rest| rest.strip_suffix(" stdout ----"))
        {
            close(&mut section, &mut outcomes);
            section = Some((name.to_owned(), Vec::new()));
            continue;
        }
        if line == "failures:" || line == "successes:" || line.starts_with("test result:") {
            close(&mut section, &mut outcomes);
        }
        if let Some((_, lines)) = section.as_mut() {
            lines.push(line.to_owned());
            continue;
        }
        let Some((name, verdict)) = line
            .strip_prefix("test ")
            .and_then(|rest| rest.rsplit_once(" ... "))
        else {
            continue;
        };
        let passed = match verdict.trim() {
            "ok" => true,
            "FAILED" => false,
            _ => continue,
        };
        outcomes.push(Outcome {
            test: name.rsplit("::").next().unwrap_or(name).to_owned(),
            passed,
            skipped: None,
            tail: Vec::new(),
        });
    }
    outcomes
}

/// Lines of a failed test's output shown under the matrix.
const TAIL: usize = 30;

/// One mode's run of one test binary: its tests of `SCENARIOS`.
pub struct Run {
    pub target: Target,
    pub mode: Mode,
    pub outcomes: Vec<Outcome>,
    /// Tests that should have reported and did not (a crash, a timeout).
    pub missing: Vec<String>,
}

/// Runs every scenario test on this host's kernel in `mode`, each binary in
/// one process (`--test-threads=1`, `--exact` names).
pub fn run_native(
    binaries: &[TestBinary],
    idlemon: &Path,
    mode: Mode,
    timeout: Duration,
) -> anyhow::Result<Run> {
    let target = Target::Native;
    let mut outcomes = Vec::new();
    let mut missing = Vec::new();
    for binary in binaries {
        let tests: Vec<&str> = SCENARIOS
            .iter()
            .filter(|(file, test, _)| *file == binary.name && runs_in(target, mode, test))
            .map(|(_, test, _)| *test)
            .collect();
        if tests.is_empty() {
            continue;
        }
        let mut command = Command::new("timeout");
        command
            .arg(timeout.as_secs().to_string())
            .arg(&binary.path)
            .args([
                "--include-ignored",
                "--test-threads=1",
                "--exact",
                "--show-output",
            ])
            .args(&tests)
            .env("IDLEMON_BIN", idlemon)
            // The panic's message, not a backtrace, ends a failure's output.
            .env("RUST_BACKTRACE", "0")
            .env(VARIABLE, expectation(target, mode));
        // idlemon reads it itself; empty would be an attach kind named "".
        match mode.disable() {
            "" => command.env_remove("IDLEMON_DISABLE_ATTACH"),
            disable => command.env("IDLEMON_DISABLE_ATTACH", disable),
        };
        println!(
            "xtask vm-test: native {}: {} ({} tests)",
            mode.name(),
            binary.name,
            tests.len()
        );
        let output = command
            .output()
            .with_context(|| format!("cannot run {}", binary.path.display()))?;
        let text = String::from_utf8_lossy(&output.stdout);
        let found = parse_libtest(&text);
        for test in &tests {
            if !found.iter().any(|outcome| outcome.test == *test) {
                missing.push(format!(
                    "{}::{test}: no result ({}); stderr tail:\n{}",
                    binary.name,
                    output.status,
                    tail_of(&String::from_utf8_lossy(&output.stderr))
                ));
            }
        }
        outcomes.extend(found);
    }
    Ok(Run {
        target,
        mode,
        outcomes,
        missing,
    })
}

fn tail_of(text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(TAIL)..].join("\n")
}

/// The rows `kernel mode test result`, then each failure's tail; and
/// whether everything passed.
pub fn render(runs: &[Run]) -> (String, bool) {
    let named = |outcome: &Outcome| {
        let shows = SCENARIOS
            .iter()
            .find(|(_, test, _)| *test == outcome.test)
            .map_or("", |(_, _, shows)| *shows);
        format!("{} ({shows})", outcome.test)
    };
    let width = runs
        .iter()
        .flat_map(|run| &run.outcomes)
        .map(|outcome| named(outcome).len())
        .max()
        .unwrap_or(0)
        .max("test (shows)".len())
        + 2;
    let mut text = format!(
        "{:<7}{:<8}{:<18}{:<width$}{}\n",
        "arch", "kernel", "mode", "test (shows)", "result"
    );
    let mut passed = true;
    let mut failures = String::new();
    for run in runs {
        for outcome in &run.outcomes {
            text.push_str(&format!(
                "{:<7}{:<8}{:<18}{:<width$}{}\n",
                run.target.arch().name(),
                run.target.series(),
                run.mode.name(),
                named(outcome),
                match (&outcome.skipped, outcome.passed) {
                    (Some(reason), true) => format!("skipped: {reason}"),
                    (None, true) => "ok".to_owned(),
                    (_, false) => "FAIL".to_owned(),
                }
            ));
            if !outcome.passed {
                passed = false;
                failures.push_str(&format!(
                    "\n{} {} {}:\n{}\n",
                    run.target.label(),
                    run.mode.name(),
                    outcome.test,
                    outcome.tail.join("\n")
                ));
            }
        }
        for missing in &run.missing {
            passed = false;
            failures.push_str(&format!(
                "\n{} {}: {missing}\n",
                run.target.label(),
                run.mode.name()
            ));
        }
    }
    text.push_str(&failures);
    (text, passed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libtest_output_gives_each_test_and_the_tail_of_a_failure() {
        let output = "\nrunning 2 tests\n\
            test idle_client_without_keepalive_is_flagged_then_reset ... ok\n\
            test a_closed_port_is_a_refused_connect ... FAILED\n\
            test other ... ignored\n\n\
            failures:\n\n\
            ---- a_closed_port_is_a_refused_connect stdout ----\n\
            thread 'a_closed_port_is_a_refused_connect' panicked at monitor/tests/failures.rs:1:1:\n\
            no connect_failed event\n\n\
            failures:\n    a_closed_port_is_a_refused_connect\n\n\
            test result: FAILED. 1 passed; 1 failed; 1 ignored\n\
            successes:\n\n\
            ---- idle_client_without_keepalive_is_flagged_then_reset stdout ----\n\
            SKIPPED: no nft here\n\n\
            test result: FAILED.\n";
        let outcomes = parse_libtest(output);
        assert_eq!(outcomes.len(), 2);
        assert!(outcomes[0].passed && outcomes[0].tail.is_empty());
        assert_eq!(outcomes[0].skipped.as_deref(), Some("no nft here"));
        assert!(!outcomes[1].passed);
        assert!(
            outcomes[1]
                .tail
                .iter()
                .any(|line| line == "no connect_failed event"),
            "{:?}",
            outcomes[1].tail
        );
    }

    #[test]
    fn cargo_messages_name_the_test_executables() {
        let test = r#"{"reason":"compiler-artifact","target":{"kind":["test"],"name":"tracking"},"profile":{"test":true},"executable":"/t/debug/deps/tracking-1"}"#;
        assert_eq!(
            test_artifact(test),
            Some(TestBinary {
                name: "tracking".to_owned(),
                path: PathBuf::from("/t/debug/deps/tracking-1")
            })
        );
        let unit = r#"{"reason":"compiler-artifact","target":{"kind":["lib"],"name":"monitor"},"profile":{"test":true},"executable":"/t/debug/deps/monitor-1"}"#;
        assert_eq!(test_artifact(unit), None);
    }

    #[test]
    fn expectations_name_every_hook_and_degraded_modes_skip_the_reuse_test() {
        let text = expectation(Target::V6_1, Mode::NoFentryKprobe);
        let expected = Expected::parse(&text).expect("parses");
        assert!(!expected.ready(), "{text}");
        assert!(
            text.starts_with("send=none,receive=tp_btf|raw_tp,"),
            "{text}"
        );
        assert!(HOOKS.iter().all(|hook| text.contains(&format!("{hook}="))));
        assert!(
            Expected::parse(&expectation(Target::Native, Mode::Default)).is_ok_and(|e| e.ready())
        );
        let reuse = "reuse_after_the_nat_timeout_is_logged_then_the_reset_explained";
        assert!(!runs_in(Target::V6_1, Mode::NoFentryKprobe, reuse));
        assert!(runs_in(Target::V6_1, Mode::Default, reuse));
        assert!(runs_in(
            Target::V6_1,
            Mode::NoFentryKprobe,
            "a_closed_port_is_a_refused_connect"
        ));
    }
}
