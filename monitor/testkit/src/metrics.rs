//! The one Prometheus text parser of the tests, the vm harness and the
//! container test: idlemon's exposition, whose label values hold no quotes,
//! commas or escapes (hook, kind, reason, workload and path names).

use std::collections::BTreeMap;

/// One sample line: `name{label="value",...} value`.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample<'a> {
    pub name: &'a str,
    pub labels: BTreeMap<&'a str, &'a str>,
    pub value: f64,
}

impl<'a> Sample<'a> {
    /// Parses one sample line; None for comments, blank lines and lines
    /// that are not samples.
    pub fn parse(line: &'a str) -> Option<Self> {
        let line = line.trim();
        if line.starts_with('#') {
            return None;
        }
        let (series, value) = line.rsplit_once(' ')?;
        let value = value.parse().ok()?;
        let Some((name, rest)) = series.split_once('{') else {
            return Some(Self {
                name: series,
                labels: BTreeMap::new(),
                value,
            });
        };
        let mut labels = BTreeMap::new();
        let mut rest = rest.strip_suffix('}')?;
        while !rest.is_empty() {
            let (key, after) = rest.split_once("=\"")?;
            let (label, after) = after.split_once('"')?;
            labels.insert(key.trim(), label);
            rest = after.strip_prefix(',').unwrap_or(after);
        }
        Some(Self {
            name,
            labels,
            value,
        })
    }

    /// Whether every `key="value"` of `filter` (e.g. `reason="no_keepalive"`,
    /// or several joined by commas) is among this sample's labels.
    pub fn has_labels(&self, filter: &str) -> bool {
        let line = format!("x{{{filter}}} 0");
        let Some(wanted) = Sample::parse(&line) else {
            return false;
        };
        wanted
            .labels
            .iter()
            .all(|(key, value)| self.labels.get(key) == Some(value))
    }
}

/// Every sample of an exposition.
pub fn samples(text: &str) -> impl Iterator<Item = Sample<'_>> {
    text.lines().filter_map(Sample::parse)
}

/// The value of one series written as the exposition writes it, e.g.
/// `idlemon_tracked_sockets` or `idlemon_at_risk_sockets{reason="no_keepalive"}`.
pub fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|line| {
        line.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

/// The sum of every series of `name` whose labels contain `filter`
/// (`key="value"` pairs joined by commas; empty: all of them).
pub fn metric_sum(text: &str, name: &str, filter: &str) -> f64 {
    samples(text)
        .filter(|sample| sample.name == name && (filter.is_empty() || sample.has_labels(filter)))
        .map(|sample| sample.value)
        .sum()
}

/// `idlemon_probe_info`: each hook and the attach kind it got.
pub fn probe_info(text: &str) -> BTreeMap<String, String> {
    samples(text)
        .filter(|sample| sample.name == "idlemon_probe_info" && sample.value == 1.0)
        .filter_map(|sample| {
            Some((
                (*sample.labels.get("hook")?).to_owned(),
                (*sample.labels.get("kind")?).to_owned(),
            ))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "# HELP idlemon_probe_info x\n\
        idlemon_probe_info{hook=\"send\",kind=\"fentry\"} 1\n\
        idlemon_probe_info{hook=\"keepalive\",kind=\"none\"} 1\n\
        idlemon_at_risk_sockets{reason=\"no_keepalive\",workload=\"a\"} 2\n\
        idlemon_at_risk_sockets{reason=\"no_keepalive\",workload=\"b\"} 3\n\
        idlemon_at_risk_sockets{reason=\"keepalive_too_slow\",workload=\"a\"} 5\n\
        idlemon_tracked_sockets 7\n";

    #[test]
    fn series_sums_and_probe_info() {
        assert_eq!(metric(TEXT, "idlemon_tracked_sockets"), Some(7.0));
        assert_eq!(metric(TEXT, "idlemon_tracked"), None);
        assert_eq!(
            metric_sum(TEXT, "idlemon_at_risk_sockets", "reason=\"no_keepalive\""),
            5.0
        );
        assert_eq!(
            metric_sum(
                TEXT,
                "idlemon_at_risk_sockets",
                "reason=\"no_keepalive\",workload=\"b\""
            ),
            3.0
        );
        assert_eq!(metric_sum(TEXT, "idlemon_at_risk_sockets", ""), 10.0);
        let info = probe_info(TEXT);
        assert_eq!(info.get("send").map(String::as_str), Some("fentry"));
        assert_eq!(info.get("keepalive").map(String::as_str), Some("none"));
        assert_eq!(info.len(), 2);
    }
}
