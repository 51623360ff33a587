//! `idlemon sockets`: the running daemon's socket table, printed like `ss`.

use std::fmt::Write as _;

use anyhow::{Context as _, bail};
use serde_json::Value;

use crate::cli::{EventsArgs, SocketsArgs};

pub fn sockets(args: &SocketsArgs) -> anyhow::Result<()> {
    let mut url = format!("{}/sockets", args.url.trim_end_matches('/'));
    let mut query = Vec::new();
    if args.at_risk {
        query.push("at_risk=true".to_owned());
    }
    if let Some(min_idle) = args.min_idle {
        query.push(format!("min_idle={}", min_idle.as_secs_f64()));
    }
    if !query.is_empty() {
        url = format!("{url}?{}", query.join("&"));
    }
    let body = get(&url)?;
    if args.json {
        println!("{body}");
        return Ok(());
    }
    let sockets: Vec<Value> = serde_json::from_str(&body)
        .with_context(|| format!("{url} did not return a JSON array"))?;
    print!("{}", table(&sockets));
    Ok(())
}

/// Prints events as JSON lines; with --follow, long-polls for new ones. An
/// answer cut short by the daemon's size bound is continued from its last
/// event until `--limit` events are printed.
pub fn events(args: &EventsArgs) -> anyhow::Result<()> {
    let base = format!("{}/events", args.url.trim_end_matches('/'));
    let mut query = format!("limit={}", args.limit);
    if let Some(since) = &args.since {
        query.push_str(&format!("&since={}", encode(since)));
    }
    let mut after: Option<u64> = None;
    let mut printed = 0;
    loop {
        let url = match after {
            Some(after) if args.follow && printed >= args.limit => {
                format!("{base}?after={after}&limit=1000&wait=30")
            }
            Some(after) => format!("{base}?after={after}&limit={}", args.limit - printed),
            None => format!("{base}?{query}"),
        };
        let (body, more) = get_events(&url)?;
        let events: Vec<Value> = serde_json::from_str(&body)
            .with_context(|| format!("{url} did not return a JSON array"))?;
        for event in &events {
            println!("{event}");
            after = event["id"].as_u64().or(after);
        }
        printed += events.len();
        if more && printed < args.limit {
            continue;
        }
        if !args.follow {
            return Ok(());
        }
        printed = printed.max(args.limit);
        after = after.or(Some(0));
    }
}

/// Percent-encodes a query value (RFC 3339 times carry `:` and `+`).
fn encode(value: &str) -> String {
    value
        .bytes()
        .map(|byte| match byte {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (byte as char).to_string()
            }
            other => format!("%{other:02X}"),
        })
        .collect()
}

pub(crate) fn get(url: &str) -> anyhow::Result<String> {
    get_events(url).map(|(body, _)| body)
}

/// The body of a GET, and whether the daemon said that more follows
/// (`X-Idlemon-More`).
fn get_events(url: &str) -> anyhow::Result<(String, bool)> {
    let response = ureq::get(url).call().with_context(|| {
        format!("cannot reach the idlemon daemon at {url} (is it running? --url)")
    })?;
    if response.status() != 200 {
        bail!("{url} answered {}", response.status());
    }
    let more = response
        .headers()
        .get(crate::http::MORE_HEADER)
        .is_some_and(|value| value == "true");
    let body = response
        .into_body()
        .read_to_string()
        .with_context(|| format!("cannot read the answer from {url}"))?;
    Ok((body, more))
}

/// The table: one line per socket, columns sized to their content.
pub fn table(sockets: &[Value]) -> String {
    let header = [
        "Local",
        "Remote",
        "Idle",
        "Keepalive",
        "Timeout",
        "Left",
        "Risk",
        "Process",
        "Fix",
    ];
    let rows: Vec<[String; 9]> = sockets.iter().map(row).collect();
    let mut widths = header.map(str::len);
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.len());
        }
    }
    let mut out = String::new();
    let mut line = |cells: &[&str]| {
        let mut text = String::new();
        for (cell, width) in cells.iter().zip(widths) {
            let _ = write!(text, "{cell:<width$}  ");
        }
        out.push_str(text.trim_end());
        out.push('\n');
    };
    line(&header);
    for row in &rows {
        line(&row.each_ref().map(String::as_str));
    }
    out
}

fn row(socket: &Value) -> [String; 9] {
    let text = |key: &str| socket[key].as_str().unwrap_or("-").to_owned();
    let seconds = |value: &Value| {
        value
            .as_f64()
            .map_or("-".to_owned(), |s| format!("{s:.0}s"))
    };
    let keepalive = &socket["keepalive"];
    let keepalive = if keepalive["enabled"].as_bool() == Some(true) {
        let from = if keepalive["idle_from"] == "socket" {
            "sock"
        } else {
            "ns"
        };
        format!("{}({from})", seconds(&keepalive["idle_seconds"]))
    } else {
        "off".to_owned()
    };
    let timeout = match socket["path_idle_timeout_seconds"].as_u64() {
        Some(timeout) => format!("{timeout}s"),
        None => "none".to_owned(),
    };
    let process = match (socket["comm"].as_str(), socket["pid"].as_u64()) {
        (Some(comm), Some(pid)) => format!("{comm}/{pid}"),
        _ => "-".to_owned(),
    };
    [
        text("local"),
        text("remote"),
        seconds(&socket["idle_seconds"]),
        keepalive,
        timeout,
        seconds(&socket["time_left_seconds"]),
        socket["risk"].as_str().unwrap_or("-").to_owned(),
        process,
        fix_cell(&socket["fix"]),
    ]
}

/// A socket's `fix` in a few words: the sysctls to set, or the keepalive
/// the application must set (else enforcement). `/sockets` has the rest.
pub fn fix_cell(fix: &Value) -> String {
    match fix["kind"].as_str() {
        Some("sysctl") => {
            let settings: Vec<String> = fix["sysctls"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|sysctl| {
                    let name = sysctl["name"].as_str().unwrap_or("?");
                    let name = name.rsplit('.').next().unwrap_or(name);
                    format!("{name}={}", sysctl["value"])
                })
                .collect();
            format!("sysctl {}", settings.join(","))
        }
        Some("application") => format!(
            "app keepalive {}s, or [enforce]",
            fix["idle_seconds"].as_u64().unwrap_or(0)
        ),
        _ => "-".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_shows_risk_keepalive_and_process() {
        let sockets: Vec<Value> = serde_json::from_str(
            r#"[{"local":"10.0.0.5:40000","remote":"52.1.2.3:443","idle_seconds":401.2,
                "keepalive":{"enabled":true,"idle_seconds":7200.0,"idle_from":"namespace"},
                "path_idle_timeout_seconds":350,"time_left_seconds":-51.2,
                "risk":"keepalive_too_slow","comm":"python3","pid":4242,
                "fix":{"kind":"sysctl","sysctls":[{"name":"net.ipv4.tcp_keepalive_time","value":60},
                                                  {"name":"net.ipv4.tcp_keepalive_intvl","value":30}]}},
               {"local":"10.0.0.5:40002","remote":"52.1.2.4:443","idle_seconds":500.0,
                "keepalive":{"enabled":false},"path_idle_timeout_seconds":350,
                "time_left_seconds":-150.0,"risk":"no_keepalive","comm":"node","pid":77,
                "fix":{"kind":"application","idle_seconds":60}},
               {"local":"10.0.0.5:40001","remote":"10.1.2.3:5432","idle_seconds":3.0,
                "keepalive":{"enabled":false},"path_idle_timeout_seconds":null,
                "time_left_seconds":null,"risk":null,"comm":null,"pid":null,"fix":null}]"#,
        )
        .expect("valid JSON");
        let table = table(&sockets);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 4);
        assert!(lines[0].starts_with("Local") && lines[0].ends_with("Fix"));
        assert!(lines[1].contains("7200s(ns)") && lines[1].contains("keepalive_too_slow"));
        assert!(lines[1].contains("python3/4242") && lines[1].contains("-51s"));
        assert!(
            lines[1].ends_with("sysctl tcp_keepalive_time=60,tcp_keepalive_intvl=30"),
            "{table}"
        );
        assert!(
            lines[2].ends_with("app keepalive 60s, or [enforce]"),
            "{table}"
        );
        assert!(lines[3].contains("off") && lines[3].contains("none"));
        assert!(lines[3].ends_with(" -"), "{table}");
    }
}
