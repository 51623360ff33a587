//! Liveness that means something: /healthz fails when the socket walk or the
//! event reader has stopped making progress, so that the kubelet restarts an
//! agent that is up but no longer watching.

use std::{
    fmt,
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, Instant},
};

/// Never fail sooner than this, whatever the scan interval: a walk of a
/// large node's sockets on a loaded machine can take seconds.
const STALL_FLOOR: Duration = Duration::from_secs(10);

/// When each of the two loops last made progress.
pub struct Liveness {
    started: Instant,
    /// Milliseconds since `started` of the last walk published.
    walk: AtomicU64,
    /// Milliseconds since `started` of the event reader's last turn (it turns
    /// at least once per `heartbeat` even when no event comes).
    reader: AtomicU64,
    stall_after: Duration,
    heartbeat: Duration,
}

/// A loop that has stalled, and for how long.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stalled {
    pub what: &'static str,
    pub for_: Duration,
    pub limit: Duration,
}

impl fmt::Display for Stalled {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "the {} made no progress for {:.0} s (limit {:.0} s)",
            self.what,
            self.for_.as_secs_f64(),
            self.limit.as_secs_f64()
        )
    }
}

impl Liveness {
    /// Both loops are expected to turn once per `scan_interval`; a loop that
    /// has not for `intervals` of them (and at least 10 s) has stalled.
    pub fn new(scan_interval: Duration, intervals: u32) -> Self {
        Self {
            started: Instant::now(),
            walk: AtomicU64::new(0),
            reader: AtomicU64::new(0),
            stall_after: (scan_interval * intervals).max(STALL_FLOOR),
            heartbeat: scan_interval,
        }
    }

    /// How often the event reader must turn even without events.
    pub fn heartbeat(&self) -> Duration {
        self.heartbeat
    }

    pub fn walked(&self) {
        self.walk.store(self.now(), Ordering::Relaxed);
    }

    pub fn reader_turned(&self) {
        self.reader.store(self.now(), Ordering::Relaxed);
    }

    /// Ok while both loops turn; else the first that stalled.
    pub fn check(&self) -> Result<(), Stalled> {
        let now = self.now();
        for (what, last) in [("socket walk", &self.walk), ("event reader", &self.reader)] {
            stalled(what, last.load(Ordering::Relaxed), now, self.stall_after)?;
        }
        Ok(())
    }

    fn now(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }
}

/// Whether a loop whose last progress was at `last_ms` has stalled at `now_ms`.
fn stalled(what: &'static str, last_ms: u64, now_ms: u64, limit: Duration) -> Result<(), Stalled> {
    let quiet = Duration::from_millis(now_ms.saturating_sub(last_ms));
    if quiet > limit {
        return Err(Stalled {
            what,
            for_: quiet,
            limit,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_loop_is_stalled_only_past_its_limit() {
        let limit = Duration::from_secs(30);
        assert_eq!(stalled("socket walk", 1_000, 31_000, limit), Ok(()));
        let stalled = stalled("socket walk", 1_000, 31_001, limit).unwrap_err();
        assert_eq!(stalled.for_, Duration::from_millis(30_001));
        assert_eq!(
            stalled.to_string(),
            "the socket walk made no progress for 30 s (limit 30 s)"
        );
    }

    #[test]
    fn the_limit_is_intervals_but_never_below_the_floor() {
        assert_eq!(
            Liveness::new(Duration::from_secs(5), 6).stall_after,
            Duration::from_secs(30)
        );
        assert_eq!(
            Liveness::new(Duration::from_millis(500), 6).stall_after,
            STALL_FLOOR
        );
    }

    #[test]
    fn fresh_loops_are_healthy_and_a_silent_one_is_named() {
        let liveness = Liveness::new(Duration::from_secs(5), 6);
        assert_eq!(liveness.check(), Ok(()));
        // As if the reader last turned 40 s ago while walks went on.
        liveness.walk.store(40_000, Ordering::Relaxed);
        let now = 40_000;
        assert_eq!(
            stalled(
                "event reader",
                liveness.reader.load(Ordering::Relaxed),
                now,
                liveness.stall_after
            )
            .unwrap_err()
            .what,
            "event reader"
        );
        assert!(
            stalled(
                "socket walk",
                liveness.walk.load(Ordering::Relaxed),
                now,
                liveness.stall_after
            )
            .is_ok()
        );
    }
}
