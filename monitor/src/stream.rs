//! Reads the kernel's event ring buffer as events arrive (AsyncFd, drain,
//! clear_ready: no polling), explains each event and hands it to the
//! history and the metrics, and queues it for the event log.
//!
//! The event log is written by a thread of its own: stdout (a pipe to the
//! container runtime) or a file may block, and the ring buffer must be
//! drained meanwhile or the kernel drops what comes next. The queue between
//! them is bounded; when it is full, ordinary events make way for evidence
//! (`events::Ranked`), and what is dropped is counted by kind.

use std::{
    sync::{Arc, Condvar, Mutex},
    thread,
};

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
    events::{EventRecord, Explainer, History, Ranked, wall_clock},
    liveness::Liveness,
    metrics::Metrics,
};

/// Events waiting for the event log, about 1 KiB each.
pub const LOG_QUEUE: usize = 8192;

pub struct Sinks {
    pub attributor: Attributor,
    pub history: Arc<History>,
    pub log: EventLog,
    pub metrics: Arc<Metrics>,
    pub liveness: Arc<Liveness>,
}

pub fn spawn(
    ring: RingBuf<MapData>,
    mut explainer: Explainer,
    sinks: Sinks,
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
    let Sinks {
        mut attributor,
        history,
        log,
        metrics,
        liveness,
    } = sinks;
    let queue = Arc::new(LogQueue::default());
    let writer = {
        let queue = Arc::clone(&queue);
        let metrics = Arc::clone(&metrics);
        thread::Builder::new()
            .name("idlemon-eventlog".into())
            .spawn(move || write_log(&queue, log, &metrics))?
    };
    Ok(tokio::spawn(async move {
        // The reader turns at least once a heartbeat, so that /healthz can
        // tell a quiet ring from a stuck reader.
        let mut heartbeat = tokio::time::interval(liveness.heartbeat());
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Drains every event in the ring: on a wakeup, and at each heartbeat
        // for events submitted without one (keepalive enforcement's audit).
        let mut drain = |buffer: &mut RingBuf<MapData>| {
            while let Some(item) = buffer.next() {
                let Some(event) = decode(&item) else {
                    metrics.malformed_events.inc();
                    continue;
                };
                let Some(mut record) = explainer.explain(&event, wall_clock(event.time_ns)) else {
                    metrics.malformed_events.inc();
                    continue;
                };
                attribute(&mut attributor, &mut record);
                metrics.observe_event(&record);
                let record = Arc::new(record);
                history.push(Arc::clone(&record));
                if let Some(dropped) = queue.push(record) {
                    metrics.event_log_dropped(dropped.kind);
                }
            }
        };
        loop {
            liveness.reader_turned();
            let mut guard = tokio::select! {
                _ = shutdown.wait_for(|stop| *stop) => break,
                _ = heartbeat.tick() => {
                    drain(ring.get_mut());
                    continue;
                }
                guard = ring.readable_mut() => match guard {
                    Ok(guard) => guard,
                    Err(error) => {
                        warn!(%error, "event ring buffer failed: events stop");
                        break;
                    }
                },
            };
            drain(guard.get_inner_mut());
            guard.clear_ready();
        }
        queue.close();
        if writer.join().is_err() {
            warn!("the event log writer panicked");
        }
    }))
}

/// Names the process, container and pod of the event's socket or task.
fn attribute(attributor: &mut Attributor, record: &mut EventRecord) {
    if record.pid.is_none() && record.cgroup_id.is_none() {
        return;
    }
    record.attribution = attributor.attribute(record.pid, record.cgroup_id);
    // The process's name, as ps shows it; the task's own name (a thread's)
    // only when /proc no longer has the process.
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

/// The events between the reader and the log writer.
#[derive(Default)]
struct LogQueue {
    state: Mutex<(Ranked, bool)>,
    ready: Condvar,
}

impl LogQueue {
    /// Queues `record`; returns the event dropped to stay within `LOG_QUEUE`.
    fn push(&self, record: Arc<EventRecord>) -> Option<Arc<EventRecord>> {
        let dropped = match self.state.lock() {
            Ok(mut state) => state.0.push(record, LOG_QUEUE),
            Err(_) => Some(record),
        };
        self.ready.notify_one();
        dropped
    }

    /// No more events: the writer drains what is queued and ends.
    fn close(&self) {
        if let Ok(mut state) = self.state.lock() {
            state.1 = true;
        }
        self.ready.notify_one();
    }

    /// The next events to write, oldest first; empty once closed and drained.
    fn take(&self, batch: &mut Vec<Arc<EventRecord>>) {
        let Ok(mut state) = self.state.lock() else {
            return;
        };
        while state.0.is_empty() && !state.1 {
            state = match self.ready.wait(state) {
                Ok(state) => state,
                Err(_) => return,
            };
        }
        while batch.len() < 256
            && let Some(record) = state.0.pop()
        {
            batch.push(record);
        }
    }
}

/// The log writer thread: writes what the reader queues, flushing whenever
/// the queue runs dry.
fn write_log(queue: &LogQueue, mut log: EventLog, metrics: &Metrics) {
    let mut failing = false;
    let mut batch = Vec::new();
    loop {
        queue.take(&mut batch);
        if batch.is_empty() {
            break;
        }
        for record in batch.drain(..) {
            match log.write(&record) {
                Ok(()) => failing = false,
                Err(error) => {
                    metrics.event_log_errors.inc();
                    if !failing {
                        warn!(%error, "cannot write the event log");
                        failing = true;
                    }
                }
            }
        }
        let drained = queue.state.lock().map_or(true, |state| state.0.is_empty());
        if drained && log.flush().is_err() {
            metrics.event_log_errors.inc();
        }
    }
    let _ = log.flush();
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
