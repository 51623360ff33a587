//! Entry points shared by the fuzz targets (`monitor/fuzz`) and the corpus
//! regression test, so both exercise exactly the same code.

use std::{num::NonZeroU32, sync::Arc, time::Duration};

use crate::{
    config::{IdleTimeout, PathConfig},
    events::Explainer,
    sockets::Classifier,
    stream::decode,
};

/// Parses a config; an error must name `file:line:`.
pub fn config(text: &str) {
    match PathConfig::parse(text, "fuzz.toml") {
        Ok(config) => {
            let _ = config.timeout_for(
                std::net::IpAddr::from([10, 0, 0, 1]),
                443,
                IdleTimeout::After(NonZeroU32::MIN),
            );
        }
        Err(error) => {
            let message = error.to_string();
            assert!(
                message.starts_with("fuzz.toml:"),
                "error without a line: {message}"
            );
        }
    }
}

/// Decodes and explains an event, as the stream does.
pub fn event(bytes: &[u8]) {
    let Some(event) = decode(bytes) else {
        return;
    };
    let classifier = Classifier {
        hz: 250,
        idle_threshold: Duration::from_secs(300),
        default_timeout: IdleTimeout::After(NonZeroU32::new(350).unwrap_or(NonZeroU32::MIN)),
        paths: PathConfig::default(),
        keepalive_timer_seen: true,
        weakened: Default::default(),
    };
    let mut explainer = Explainer::new(Arc::new(classifier));
    if let Some(record) = explainer.explain(&event, 1_700_000_000.0) {
        let _ = serde_json::to_string(&record);
    }
}
