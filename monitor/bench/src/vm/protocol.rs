//! What the vm part's host (`vm.rs`) and its guest (`vm/guest.rs`, this
//! binary's `vm-guest` mode inside each VM) say to each other, in one place:
//! the guest's arguments, which carry the plan, and the result lines it
//! writes back, `TAG SIDE REST`, one per line.

use std::{fmt, path::PathBuf, str::FromStr, time::Duration};

use clap::Parser;
use idlemon_testkit::attach::Mode;

/// The bench binary's first argument in the VM: `idlemon-bench vm-guest ARGS`.
pub const GUEST_COMMAND: &str = "vm-guest";

/// One side of a round.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Side {
    /// No idlemon.
    A,
    /// idlemon, default attach kinds: fentry.
    B1,
    /// idlemon, `--disable-attach fentry`: kprobe.
    B2,
    /// No idlemon; a no-op fentry program on each of `FLOOR_FUNCTIONS`.
    F,
}

impl Side {
    pub const ALL: [Self; 4] = [Self::A, Self::B1, Self::B2, Self::F];

    pub fn label(self) -> &'static str {
        match self {
            Self::A => "A",
            Self::B1 => "B1",
            Self::B2 => "B2",
            Self::F => "F",
        }
    }

    /// idlemon's attach mode on a B side (vm-test's modes); `None` where
    /// no idlemon runs.
    pub fn mode(self) -> Option<Mode> {
        match self {
            Self::A | Self::F => None,
            Self::B1 => Some(Mode::Default),
            Self::B2 => Some(Mode::NoFentry),
        }
    }
}

impl fmt::Display for Side {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.label())
    }
}

impl FromStr for Side {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        Self::ALL
            .into_iter()
            .find(|side| side.label() == text)
            .ok_or_else(|| format!("no side {text:?}: A, B1, B2 or F"))
    }
}

/// The functions of idlemon's per-packet hooks (send, receive) where it
/// attaches by fentry, and where the F side's no-op programs go.
pub const FLOOR_FUNCTIONS: [&str; 2] = ["tcp_sendmsg", "tcp_rcv_established"];

/// One round: its sides in the order their windows run, `A,B1,F,B2`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Round(pub Vec<Side>);

impl FromStr for Round {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let sides = text
            .split(',')
            .map(str::parse)
            .collect::<Result<Vec<Side>, _>>()?;
        Ok(Self(sides))
    }
}

impl fmt::Display for Round {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let labels: Vec<&str> = self.0.iter().map(|side| side.label()).collect();
        f.write_str(&labels.join(","))
    }
}

/// `idlemon-bench vm-guest`: the plan of one boot.
#[derive(Debug, Clone, PartialEq, Parser)]
#[command(name = "idlemon-bench vm-guest")]
pub struct GuestArgs {
    /// Where the result lines go: a file (a serial port) or `-` for stdout.
    #[arg(long, default_value = "-")]
    pub out: PathBuf,
    /// The daemon of the B sides.
    #[arg(long)]
    pub idlemon: PathBuf,
    /// Seconds idlemon may take to get ready in one window.
    #[arg(long, default_value_t = 60)]
    pub ready_timeout: u64,
    /// Length of one window, in seconds of the guest's clock.
    #[arg(long, value_parser = positive_seconds)]
    pub bench_window: f64,
    /// One round, repeated for each: SIDE,SIDE,... in the order they run.
    #[arg(long = "bench-round", required = true)]
    pub rounds: Vec<Round>,
}

fn positive_seconds(text: &str) -> Result<f64, String> {
    text.parse()
        .ok()
        .filter(|seconds: &f64| seconds.is_finite() && *seconds > 0.0)
        .ok_or_else(|| format!("seconds above 0, got {text}"))
}

impl GuestArgs {
    pub fn window(&self) -> Duration {
        Duration::from_secs_f64(self.bench_window)
    }

    pub fn ready_timeout(&self) -> Duration {
        Duration::from_secs(self.ready_timeout)
    }

    /// The arguments that parse back into `self`, after `vm-guest`.
    pub fn to_args(&self) -> Vec<String> {
        let mut args = vec![
            "--out".to_owned(),
            self.out.display().to_string(),
            "--idlemon".to_owned(),
            self.idlemon.display().to_string(),
            "--ready-timeout".to_owned(),
            self.ready_timeout.to_string(),
            "--bench-window".to_owned(),
            self.bench_window.to_string(),
        ];
        for round in &self.rounds {
            args.extend(["--bench-round".to_owned(), round.to_string()]);
        }
        args
    }
}

/// The guest's kernel release: `KERNEL - RELEASE`.
pub const KERNEL: &str = "KERNEL";
/// How a B side's hooks attached: `HOOKS B1 send=fentry receive=fentry ...`,
/// from its `idlemon_probe_info`.
pub const HOOKS: &str = "HOOKS";
/// One measuring window: `WINDOW SIDE round=R seconds=S transactions=T
/// settled=S steady=0|1` (`Window`).
pub const WINDOW: &str = "WINDOW";
/// A step that failed: `FAIL SIDE|- STEP MESSAGE`.
pub const FAIL: &str = "FAIL";
/// A line of a failed daemon's log: `LOG SIDE LINE`.
pub const LOG: &str = "LOG";
/// The guest got to its end: without it, the host knows the run was cut short.
pub const DONE: &str = "DONE";
/// The SIDE of lines that belong to no side.
pub const NO_SIDE: &str = "-";

/// One result line; the rest is kept on one line whatever it holds.
pub fn line(tag: &str, side: Option<Side>, rest: &str) -> String {
    let side = side.map_or(NO_SIDE, Side::label);
    let rest: String = rest
        .chars()
        .map(|c| if c == '\n' || c == '\r' { ' ' } else { c })
        .collect();
    if rest.is_empty() {
        format!("{tag} {side}\n")
    } else {
        format!("{tag} {side} {rest}\n")
    }
}

/// One window as the guest measured it, in the guest's time.
#[derive(Debug, Clone, PartialEq)]
pub struct Window {
    pub side: Side,
    pub round: usize,
    pub seconds: f64,
    pub transactions: u64,
    /// How long the guest waited for the load to run steadily first.
    pub settled: f64,
    /// Whether it did within the guest's limit.
    pub steady: bool,
}

impl Window {
    /// The rest of its WINDOW line.
    pub fn rest(&self) -> String {
        format!(
            "round={} seconds={:.6} transactions={} settled={:.2} steady={}",
            self.round,
            self.seconds,
            self.transactions,
            self.settled,
            u8::from(self.steady)
        )
    }

    /// The rest of a WINDOW line back; `None` for anything malformed or a
    /// window without length.
    pub fn parse(side: Side, rest: &str) -> Option<Self> {
        let mut fields = std::collections::BTreeMap::new();
        for pair in rest.split_whitespace() {
            let (key, value) = pair.split_once('=')?;
            fields.insert(key, value);
        }
        let window = Self {
            side,
            round: fields.get("round")?.parse().ok()?,
            seconds: fields.get("seconds")?.parse().ok()?,
            transactions: fields.get("transactions")?.parse().ok()?,
            settled: fields.get("settled")?.parse().ok()?,
            steady: match *fields.get("steady")? {
                "1" => true,
                "0" => false,
                _ => return None,
            },
        };
        (window.seconds.is_finite() && window.seconds > 0.0).then_some(window)
    }

    /// Transactions per second of the guest's clock: never printed, only
    /// divided by another window's.
    pub fn rate(&self) -> f64 {
        self.transactions as f64 / self.seconds
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<GuestArgs, clap::Error> {
        GuestArgs::try_parse_from(std::iter::once("vm-guest").chain(args.iter().copied()))
    }

    #[test]
    fn the_guest_reads_its_plan_back() {
        let args = GuestArgs {
            out: "/dev/ttyS1".into(),
            idlemon: "/idlemon".into(),
            ready_timeout: 60,
            bench_window: 2.5,
            rounds: vec![
                Round(vec![Side::A, Side::B1, Side::F, Side::B2]),
                Round(vec![Side::B2, Side::F, Side::B1, Side::A]),
            ],
        };
        let text = args.to_args();
        assert!(text.contains(&"A,B1,F,B2".to_owned()), "{text:?}");
        let back = parse(&text.iter().map(String::as_str).collect::<Vec<_>>()).expect("parsed");
        assert_eq!(back, args);
        assert_eq!(back.window(), Duration::from_millis(2500));
    }

    #[test]
    fn bad_plans_are_refused() {
        let base = ["--idlemon", "/idlemon", "--bench-window", "2"];
        let with = |extra: &[&str]| parse(&[&base[..], extra].concat());
        assert!(with(&["--bench-round", "A,B1"]).is_ok());
        // A side nobody knows, no round, a window without length.
        assert!(with(&["--bench-round", "A,B3"]).is_err());
        assert!(with(&[]).is_err());
        assert!(
            parse(&[
                "--idlemon",
                "/i",
                "--bench-window",
                "0",
                "--bench-round",
                "A"
            ])
            .is_err()
        );
        assert!(
            parse(&[
                "--idlemon",
                "/i",
                "--bench-window",
                "NaN",
                "--bench-round",
                "A"
            ])
            .is_err()
        );
    }

    #[test]
    fn lines_stay_on_one_line() {
        assert_eq!(
            line(LOG, Some(Side::B1), "a\nb\r"),
            "LOG B1 a b \n".to_owned()
        );
        assert_eq!(line(DONE, None, ""), "DONE -\n");
    }

    #[test]
    fn windows_survive_their_line() {
        let window = Window {
            side: Side::B2,
            round: 3,
            seconds: 2.000_125,
            transactions: 41_234,
            settled: 1.5,
            steady: false,
        };
        assert_eq!(Window::parse(Side::B2, &window.rest()), Some(window));
        for bad in [
            "round=1 seconds=2.0 settled=1.00 steady=1",
            "round=x seconds=2.0 transactions=5 settled=1.00 steady=1",
            "round=1 seconds=0 transactions=5 settled=1.00 steady=1",
            "round=1 seconds=2.0 transactions=5 settled=1.00 steady=yes",
        ] {
            assert_eq!(Window::parse(Side::A, bad), None, "{bad}");
        }
    }
}
