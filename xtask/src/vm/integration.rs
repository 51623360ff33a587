//! The integration tests themselves (`monitor/tests`), run once per attach
//! mode with what that mode should attach: `IDLEMON_DISABLE_ATTACH`, which
//! idlemon reads, and `IDLEMON_EXPECT_ATTACH`, which the test kit checks
//! every daemon it starts against (`idlemon_probe_info`, and not ready where
//! a required hook is expected missing), printing what attached
//! (`ATTACHED:`). Inside the VMs a generated script runs them; on this
//! host's kernel, this module does. Results come from libtest's own output:
//! one row per kernel, mode and test.

use std::{
    fmt::Write as _,
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::{Context as _, bail};
use idlemon_testkit::{
    attach::{HOOKS, Mode, Target, VARIABLE, expectation},
    vm::{Arch, Booted, Kernel, Series, shell_quote as quote, tail},
};

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

/// The test binaries of `SCENARIOS`.
fn names() -> Vec<&'static str> {
    let mut names: Vec<&str> = SCENARIOS.iter().map(|(file, _, _)| *file).collect();
    names.dedup();
    names
}

/// Builds the integration tests of `SCENARIOS` for `arch` (`cargo test
/// --no-run`, which for this host's architecture `cargo xtask test` has
/// just done; arm64 cross-compiled with the linker `cargo xtask setup`
/// installs) and returns their executables, from cargo's JSON messages.
pub fn build(root: &Path, arch: Arch) -> anyhow::Result<Vec<TestBinary>> {
    let names = names();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let mut command = Command::new(&cargo);
    command
        .args(["test", "--no-run"])
        .arg("--message-format=json-render-diagnostics")
        .current_dir(root)
        .env("PATH", crate::setup::path_with_cargo_bin())
        .stdout(Stdio::piped());
    if arch == Arch::host() {
        // The default members, as `cargo xtask test`'s `cargo test` just
        // before: the same features for every dependency, so nothing is
        // built again.
    } else {
        // monitor alone and release, as the arm64 image's build (`cargo
        // xtask image`, just before): its dependencies are reused, not
        // built a second time.
        command
            .args([
                "--package",
                "monitor",
                "--release",
                "--target",
                arch.rust_target(),
            ])
            .env(
                "CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER",
                "aarch64-linux-gnu-gcc",
            );
    }
    for name in &names {
        command.args(["--test", name]);
    }
    println!(
        "xtask vm-test: cargo test --no-run for {} ({})",
        arch.name(),
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
        bail!("cargo test --no-run for {} failed ({status})", arch.name());
    }
    for name in &names {
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

/// What libtest said about one test.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub test: String,
    pub passed: bool,
    /// SKIPPED lines the test printed: what the machine lacked.
    pub skipped: Option<String>,
    /// What its daemons attached (the kit's `ATTACHED:` line), if it said.
    pub attached: Option<String>,
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
            outcome.attached = lines
                .iter()
                .find_map(|line| line.strip_prefix("ATTACHED: "))
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
            attached: None,
            tail: Vec::new(),
        });
    }
    outcomes
}

/// Lines of a failed test's output shown under the matrix.
const TAIL: usize = 30;

/// One kernel's run of the tests in one mode.
pub struct Run {
    pub target: Target,
    pub mode: Mode,
    pub outcomes: Vec<Outcome>,
    /// Tests that should have reported and did not (a crash, a timeout).
    pub missing: Vec<String>,
}

impl Run {
    fn new(target: Target, mode: Mode) -> Self {
        Self {
            target,
            mode,
            outcomes: Vec::new(),
            missing: Vec::new(),
        }
    }

    /// Takes one binary's libtest output; `why` says what became of a
    /// process whose tests did not all report.
    fn judge(&mut self, binary: &str, tests: &[&str], output: &str, why: impl Fn() -> String) {
        let found = parse_libtest(output);
        for test in tests {
            if !found.iter().any(|outcome| outcome.test == *test) {
                self.missing
                    .push(format!("{binary}::{test}: no result; {}", why()));
            }
        }
        self.outcomes.extend(found);
    }
}

/// The scenario tests of `binary`, which run on every target in every
/// mode. Without the send hook (6.1 and 6.12 without fentry and
/// kprobes) the reuse test still runs: idlemon judges the reset by the
/// peer's silence before the send it answered, and the test skips only the
/// `send_after_idle` that the missing hook would have seen.
fn tests_of(binary: &str) -> Vec<&'static str> {
    SCENARIOS
        .iter()
        .filter(|(file, _, _)| *file == binary)
        .map(|(_, test, _)| *test)
        .collect()
}

/// libtest's arguments: one process per binary (`--test-threads=1`,
/// `--exact` names), passed tests' output shown (skips and attach kinds).
const LIBTEST: [&str; 4] = [
    "--include-ignored",
    "--test-threads=1",
    "--exact",
    "--show-output",
];

/// Runs every scenario test on this host's kernel in `mode`.
pub fn run_native(
    binaries: &[TestBinary],
    idlemon: &Path,
    mode: Mode,
    timeout: Duration,
) -> anyhow::Result<Run> {
    let mut run = Run::new(Target::Native, mode);
    for binary in binaries {
        let tests = tests_of(&binary.name);
        if tests.is_empty() {
            continue;
        }
        let mut command = Command::new("timeout");
        command
            .arg(timeout.as_secs().to_string())
            .arg(&binary.path)
            .args(LIBTEST)
            .args(&tests)
            .env("IDLEMON_BIN", idlemon)
            // The panic's message, not a backtrace, ends a failure's output.
            .env("RUST_BACKTRACE", "0")
            .env(VARIABLE, expectation(Target::Native, mode));
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
        run.judge(
            &binary.name,
            &tests,
            &String::from_utf8_lossy(&output.stdout),
            || {
                format!(
                    "{}; stderr tail:\n{}",
                    output.status,
                    tail_of(&String::from_utf8_lossy(&output.stderr))
                )
            },
        );
    }
    Ok(run)
}

/// What a VM's /init runs: for the kernel it booted (one initramfs serves
/// every kernel of an architecture), each mode's tests, binary by binary,
/// between `@@ run MODE BINARY` and `@@ end MODE BINARY STATUS` lines.
pub fn script(
    series: &[Series],
    arch: Arch,
    binaries: &[TestBinary],
    idlemon: &str,
    timeout: Duration,
) -> String {
    let mut script = String::from("case \"$(uname -r)\" in\n");
    for series in series {
        let target = Target::Vm(arch, *series);
        let _ = writeln!(script, "{})", series.release_pattern());
        for mode in Mode::ALL {
            for binary in binaries {
                let tests = tests_of(&binary.name);
                if tests.is_empty() {
                    continue;
                }
                let disable = match mode.disable() {
                    "" => String::new(),
                    disable => format!("IDLEMON_DISABLE_ATTACH={} ", quote(disable)),
                };
                let name = &binary.name;
                let mode_name = mode.name();
                let _ = writeln!(
                    script,
                    "    echo \"vm-guest: {mode_name}: {name} ({} tests)\" >&2\n    \
                     echo \"@@ run {mode_name} {name}\"\n    \
                     IDLEMON_BIN={idlemon} RUST_BACKTRACE=0 {VARIABLE}={} {disable}\
                     timeout {} {} {} {} 2>&1\n    \
                     echo \"@@ end {mode_name} {name} $?\"",
                    tests.len(),
                    quote(&expectation(target, mode)),
                    timeout.as_secs(),
                    super::inside(name),
                    LIBTEST.join(" "),
                    tests.join(" "),
                );
            }
        }
        script.push_str("    ;;\n");
    }
    script.push_str("*) echo \"vm-guest: no tests for kernel $(uname -r)\" >&2 ;;\nesac");
    script
}

/// The runs a VM's results hold, one per mode its kernel should have run;
/// what did not report is missing, with the boot's problem and console.
pub fn judge_vm(kernel: &Kernel, booted: &Booted, binaries: &[TestBinary]) -> Vec<Run> {
    let target = Target::Vm(kernel.arch, kernel.series);
    let sections = sections(&booted.results);
    let why = |section: Option<&Section>| {
        let problem = booted.problem.as_deref().unwrap_or("the guest went on");
        let mut why = match section.map(|section| section.status.as_deref()) {
            Some(Some(status)) => format!("the test binary exited with {status}"),
            Some(None) => format!("cut short: {problem}"),
            None => format!("never ran: {problem}"),
        };
        let _ = write!(
            why,
            "; console ({}) tail:\n{}",
            booted.console_log.display(),
            tail(&booted.console, TAIL).join("\n")
        );
        why
    };
    Mode::ALL
        .iter()
        .map(|mode| {
            let mut run = Run::new(target, *mode);
            for binary in binaries {
                let tests = tests_of(&binary.name);
                if tests.is_empty() {
                    continue;
                }
                let section = sections
                    .iter()
                    .find(|section| section.mode == mode.name() && section.binary == binary.name);
                let output = section.map_or("", |section| section.output.as_str());
                run.judge(&binary.name, &tests, output, || why(section));
            }
            run
        })
        .collect()
}

/// One binary's output in one mode, from a VM's results.
#[derive(Debug, PartialEq, Eq)]
pub struct Section {
    pub mode: String,
    pub binary: String,
    pub output: String,
    /// The exit status, when the script got to the end line.
    pub status: Option<String>,
}

/// Splits a VM's results at the script's `@@` lines.
pub fn sections(results: &str) -> Vec<Section> {
    let mut sections: Vec<Section> = Vec::new();
    for line in results.lines() {
        let line = line.trim_end_matches('\r');
        if let Some(rest) = line.strip_prefix("@@ run ") {
            let (mode, binary) = rest.split_once(' ').unwrap_or((rest, ""));
            sections.push(Section {
                mode: mode.to_owned(),
                binary: binary.to_owned(),
                output: String::new(),
                status: None,
            });
        } else if let Some(rest) = line.strip_prefix("@@ end ") {
            if let Some(section) = sections.last_mut() {
                section.status = rest.rsplit(' ').next().map(str::to_owned);
            }
        } else if let Some(section) = sections.last_mut() {
            section.output.push_str(line);
            section.output.push('\n');
        }
    }
    sections
}

fn tail_of(text: &str) -> String {
    let lines: Vec<String> = text.lines().map(str::to_owned).collect();
    tail(&lines, TAIL).join("\n")
}

/// The rows `arch kernel mode test result`; under them, what attached in
/// each kernel and mode (send receive keepalive ...: the kinds its tests'
/// daemons showed), then each failure's tail; and whether everything passed.
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
    let mut attached = format!("\n{:<7}{:<8}{:<18}", "arch", "kernel", "mode");
    for hook in HOOKS {
        let _ = write!(attached, "{hook:<16}");
    }
    attached.truncate(attached.trim_end().len());
    attached.push('\n');
    let mut passed = true;
    let mut failures = String::new();
    for run in runs {
        let row = format!(
            "{:<7}{:<8}{:<18}",
            run.target.arch().name(),
            run.target.series(),
            run.mode.name()
        );
        for outcome in &run.outcomes {
            let _ = writeln!(
                text,
                "{row}{:<width$}{}",
                named(outcome),
                match (&outcome.skipped, outcome.passed) {
                    (Some(reason), true) => format!("skipped: {reason}"),
                    (None, true) => "ok".to_owned(),
                    (_, false) => "FAIL".to_owned(),
                }
            );
            if !outcome.passed {
                passed = false;
                let _ = write!(
                    failures,
                    "\n{} {} {}:\n{}\n",
                    run.target.label(),
                    run.mode.name(),
                    outcome.test,
                    outcome.tail.join("\n")
                );
            }
        }
        for missing in &run.missing {
            passed = false;
            let _ = write!(
                failures,
                "\n{} {}: {missing}\n",
                run.target.label(),
                run.mode.name()
            );
        }
        // `send=fentry,receive=...`: the first test that said.
        let shown = run
            .outcomes
            .iter()
            .find_map(|outcome| outcome.attached.as_deref())
            .unwrap_or_default();
        attached.push_str(&row);
        for hook in HOOKS {
            let kind = shown
                .split(',')
                .find_map(|entry| entry.strip_prefix(hook)?.strip_prefix('='))
                .unwrap_or("?");
            let _ = write!(attached, "{kind:<16}");
        }
        attached.truncate(attached.trim_end().len());
        attached.push('\n');
    }
    text.push_str(&attached);
    text.push_str("\nnone: a hook running degraded, as that kernel and mode must (the tests assert each kind).\n");
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

    /// Without the send hook idlemon still explains the reset after idle:
    /// every kernel runs the reuse test in every mode.
    #[test]
    fn every_mode_runs_the_reuse_test() {
        let reuse = "reuse_after_the_nat_timeout_is_logged_then_the_reset_explained";
        assert!(tests_of("resets").contains(&reuse));
        assert_eq!(tests_of("failures").len(), 1);
        let binaries = [TestBinary {
            name: "resets".to_owned(),
            path: PathBuf::from("/t/resets-1"),
        }];
        for arch in [Arch::Amd64, Arch::Arm64] {
            let script = script(
                &[Series::V6_1, Series::V6_12],
                arch,
                &binaries,
                "/usr/bin/idlemon",
                Duration::from_secs(300),
            );
            // Two kernels, three modes each.
            assert_eq!(script.matches(&format!("{reuse} 2>&1")).count(), 6);
            let without_the_send_hook = format!(
                "IDLEMON_DISABLE_ATTACH='fentry,kprobe' timeout 300 /tests/resets \
                 --include-ignored --test-threads=1 --exact --show-output {reuse} 2>&1"
            );
            assert_eq!(
                script.matches(&without_the_send_hook).count(),
                2,
                "{script}"
            );
        }
    }

    /// The script's sections come back per mode and binary, and a binary
    /// that never reported fails its tests as missing.
    #[test]
    fn a_vms_script_runs_each_mode_and_its_sections_are_judged() {
        let binaries = [TestBinary {
            name: "failures".to_owned(),
            path: PathBuf::from("/t/failures-1"),
        }];
        let script = script(
            &[Series::V6_1, Series::V6_12],
            Arch::Arm64,
            &binaries,
            "/usr/bin/idlemon",
            Duration::from_secs(300),
        );
        assert!(
            script.starts_with("case \"$(uname -r)\" in\n6.1.0-*)\n"),
            "{script}"
        );
        assert!(script.contains("\n6.12.*)\n"), "{script}");
        // arm64 6.1 falls back to kprobes by default; each mode says what it disables.
        assert!(
            script.contains("IDLEMON_EXPECT_ATTACH='send=kprobe,"),
            "{script}"
        );
        assert!(script.contains("IDLEMON_DISABLE_ATTACH='fentry,kprobe' timeout 300 /tests/failures --include-ignored --test-threads=1 --exact --show-output a_closed_port_is_a_refused_connect 2>&1"), "{script}");
        assert_eq!(
            script.matches("echo \"@@ run no-fentry failures\"").count(),
            2
        );

        let results = "@@ run default failures\n\
            test a_closed_port_is_a_refused_connect ... ok\n\
            successes:\n\n---- a_closed_port_is_a_refused_connect stdout ----\n\
            ATTACHED: send=kprobe,receive=kprobe\n\n\
            test result: ok.\n\
            @@ end default failures 0\n\
            @@ run no-fentry failures\n\
            thread 'main' panicked\n";
        let parsed = sections(results);
        assert_eq!(parsed.len(), 2);
        assert_eq!(parsed[0].status.as_deref(), Some("0"));
        assert_eq!(parsed[1].status, None);
        let kernel = Kernel {
            arch: Arch::Arm64,
            series: Series::V6_1,
            package: "linux-image-6.1.0-57-cloud-arm64-unsigned".to_owned(),
            vmlinuz: PathBuf::from("/k/vmlinuz"),
            release: "6.1.0-57-cloud-arm64".to_owned(),
            modules: Vec::new(),
        };
        let booted = Booted {
            results: results.to_owned(),
            console: vec!["vm-guest: init reached".to_owned()],
            console_log: PathBuf::from("/k/console.log"),
            boot_seconds: Some(6.0),
            elapsed: Duration::from_secs(90),
            problem: Some("timed out after 300 s".to_owned()),
        };
        let runs = judge_vm(&kernel, &booted, &binaries);
        assert_eq!(runs.len(), 3);
        assert!(runs[0].missing.is_empty() && runs[0].outcomes[0].passed);
        assert_eq!(
            runs[0].outcomes[0].attached.as_deref(),
            Some("send=kprobe,receive=kprobe")
        );
        assert!(
            runs[1].missing[0].contains("cut short: timed out"),
            "{:?}",
            runs[1].missing
        );
        assert!(
            runs[2].missing[0].contains("never ran: timed out"),
            "{:?}",
            runs[2].missing
        );
        let (text, passed) = render(&runs);
        assert!(!passed);
        assert!(text.contains("arm64  6.1     default           a_closed_port_is_a_refused_connect (connect_refused)"), "{text}");
        assert!(text.contains("kprobe          kprobe          ?"), "{text}");
    }
}
