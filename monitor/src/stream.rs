//! Reads the kernel's event ring buffer as events arrive (AsyncFd, drain,
//! clear_ready: no polling), explains each event and hands it to the
//! history, the event log and the metrics.

use std::sync::Arc;

use aya::maps::{MapData, RingBuf};
use monitor_common::Event;
use tokio::{
    io::{Interest, unix::AsyncFd},
    sync::watch,
    task::JoinHandle,
};
use tracing::warn;

use crate::{
    attribution::Attributor,
    eventlog::EventLog,
    events::{Explainer, History, wall_clock},
    metrics::Metrics,
};

pub struct Sinks {
    pub attributor: Attributor,
    pub history: Arc<History>,
    pub log: EventLog,
    pub metrics: Arc<Metrics>,
}

pub fn spawn(
    ring: RingBuf<MapData>,
    mut explainer: Explainer,
    mut sinks: Sinks,
    mut shutdown: watch::Receiver<bool>,
) -> anyhow::Result<JoinHandle<()>> {
    // SAFETY: the ring buffer owns its fd, which stays open and unchanged
    // until the AsyncFd drops it.
    let mut ring =
        unsafe { AsyncFd::register_with_interest(ring, Interest::READABLE) }.map_err(|error| {
            anyhow::anyhow!(
                "cannot watch the event ring buffer: {}",
                error.into_parts().1
            )
        })?;
    Ok(tokio::spawn(async move {
        let mut log_failing = false;
        loop {
            let mut guard = tokio::select! {
                _ = shutdown.wait_for(|stop| *stop) => break,
                guard = ring.readable_mut() => match guard {
                    Ok(guard) => guard,
                    Err(error) => {
                        warn!(%error, "event ring buffer failed: events stop");
                        break;
                    }
                },
            };
            let buffer = guard.get_inner_mut();
            while let Some(item) = buffer.next() {
                let Some(event) = decode(&item) else {
                    sinks.metrics.malformed_events.inc();
                    continue;
                };
                let Some(mut record) = explainer.explain(&event, wall_clock(event.time_ns)) else {
                    sinks.metrics.malformed_events.inc();
                    continue;
                };
                if record.pid.is_some() || record.cgroup_id.is_some() {
                    record.attribution = sinks.attributor.attribute(record.pid, record.cgroup_id);
                    // The process's name, as ps shows it; the task's own name
                    // (a thread's) only when /proc no longer has the process.
                    if record.attribution.comm.is_some() {
                        record.comm.clone_from(&record.attribution.comm);
                    }
                    if let Some(socket) = &mut record.socket {
                        socket.attribution = record.attribution.clone();
                        if socket.pid.is_some() {
                            socket.comm.clone_from(&record.attribution.comm);
                        }
                    }
                }
                sinks.metrics.observe_event(&record);
                match sinks.log.write(&record) {
                    Ok(()) => log_failing = false,
                    Err(error) => {
                        sinks.metrics.event_log_errors.inc();
                        if !log_failing {
                            warn!(%error, "cannot write the event log");
                            log_failing = true;
                        }
                    }
                }
                sinks.history.push(Arc::new(record));
            }
            if sinks.log.flush().is_err() {
                sinks.metrics.event_log_errors.inc();
            }
            guard.clear_ready();
        }
        let _ = sinks.log.flush();
    }))
}

/// An event from ring buffer bytes; None for a record of the wrong size.
pub fn decode(bytes: &[u8]) -> Option<Event> {
    (bytes.len() == size_of::<Event>())
        // SAFETY: Event is plain integers, valid for any bytes of its size.
        .then(|| unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<Event>()) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decode_accepts_exactly_one_event() {
        let event = Event {
            kind: 3,
            jiffies: 42,
            ..Event::default()
        };
        // SAFETY: viewing a plain struct as bytes.
        let bytes = unsafe {
            std::slice::from_raw_parts((&raw const event).cast::<u8>(), size_of::<Event>())
        };
        assert_eq!(decode(bytes), Some(event));
        assert_eq!(decode(&bytes[1..]), None);
        assert_eq!(decode(&[]), None);
    }
}
