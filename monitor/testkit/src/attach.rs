//! The attach kinds a run expects, from `IDLEMON_EXPECT_ATTACH`.
//!
//! On this host's kernel no variable is set and the tests assert what the
//! host offers. `cargo xtask vm-test` runs the same tests inside VMs, once
//! per attach mode: it sets `IDLEMON_DISABLE_ATTACH` (which idlemon reads
//! itself) and `IDLEMON_EXPECT_ATTACH`, a comma-separated list of
//! `hook=kind|kind...`, e.g. `send=fentry,receive=fentry,state=tp_btf|raw_tp`.
//! Every daemon the kit starts is then checked against it: each listed hook
//! must show one of its kinds in `idlemon_probe_info`, and a daemon with
//! a required hook expected `none` must run degraded, not ready.

use std::collections::BTreeMap;

pub const VARIABLE: &str = "IDLEMON_EXPECT_ATTACH";

/// Hooks whose absence leaves idlemon running but not ready; keepalive only
/// adds detail (`IfNoneFits::Optional` in the daemon's hook table).
const OPTIONAL: &[&str] = &["keepalive"];

/// The kinds each hook may show.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expected(BTreeMap<String, Vec<String>>);

impl Expected {
    /// The expectation of this run, if any; panics on a malformed variable.
    pub fn from_env() -> Option<Self> {
        let text = std::env::var(VARIABLE).ok()?;
        Some(Self::parse(&text).unwrap_or_else(|error| panic!("{VARIABLE}={text:?}: {error}")))
    }

    pub fn parse(text: &str) -> Result<Self, String> {
        let mut hooks = BTreeMap::new();
        for entry in text.split(',').filter(|entry| !entry.trim().is_empty()) {
            let (hook, kinds) = entry
                .split_once('=')
                .ok_or_else(|| format!("{entry:?} is not hook=kind|kind"))?;
            let kinds: Vec<String> = kinds
                .split('|')
                .map(|kind| kind.trim().to_owned())
                .collect();
            if kinds.iter().any(String::is_empty) {
                return Err(format!("{entry:?} names an empty kind"));
            }
            hooks.insert(hook.trim().to_owned(), kinds);
        }
        Ok(Self(hooks))
    }

    /// The variable's text for these expectations.
    pub fn render(hooks: &[(&str, &[&str])]) -> String {
        hooks
            .iter()
            .map(|(hook, kinds)| format!("{hook}={}", kinds.join("|")))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Whether idlemon should become ready: no required hook expected missing.
    pub fn ready(&self) -> bool {
        !self.0.iter().any(|(hook, kinds)| {
            !OPTIONAL.contains(&hook.as_str()) && kinds.iter().all(|kind| kind == "none")
        })
    }

    /// What differs between `probe_info` (hook -> kind) and the expectation.
    pub fn mismatches(&self, probe_info: &BTreeMap<String, String>) -> Vec<String> {
        self.0
            .iter()
            .filter_map(|(hook, kinds)| {
                let shown = probe_info
                    .get(hook)
                    .map_or("(not exported)", String::as_str);
                (!kinds.iter().any(|kind| kind == shown))
                    .then(|| format!("{hook}: {shown}, expected {}", kinds.join(" or ")))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_variable_round_trips_and_judges() {
        let text = Expected::render(&[("send", &["none"]), ("receive", &["tp_btf", "raw_tp"])]);
        assert_eq!(text, "send=none,receive=tp_btf|raw_tp");
        let expected = Expected::parse(&text).expect("parses");
        assert!(!expected.ready());
        let info: BTreeMap<String, String> = [("send", "none"), ("receive", "kprobe")]
            .into_iter()
            .map(|(hook, kind)| (hook.to_owned(), kind.to_owned()))
            .collect();
        assert_eq!(
            expected.mismatches(&info),
            ["receive: kprobe, expected tp_btf or raw_tp"]
        );
        assert!(Expected::parse("keepalive=none").expect("parses").ready());
        assert!(Expected::parse("send").is_err());
        assert!(Expected::parse("send=fentry|").is_err());
    }
}
