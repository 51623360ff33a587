//! Pod names and owners from the Kubernetes API: kube-rs's watcher lists,
//! then watches, the pods on this node only (`fieldSelector=spec.nodeName=NODE`),
//! with get, list and watch permissions and nothing else.
//!
//! A DaemonSet's watch runs for months. What that takes, and where it is done:
//! - bound service-account tokens rotate (EKS refuses tokens older than 90
//!   days): [`TokenFile`] reads the token file again every minute, as client-go
//!   does, and at once after the API server answered 401;
//! - a connection can die silently (an idle timeout on the way): the watch asks
//!   the server to end it after `watch_timeout`, and both the watcher's idle
//!   timeout and the connection's read timeout give up on it 5 s after that;
//! - 410 Gone (our resourceVersion is too old): the watcher relists after an
//!   ERROR event with code 410, and [`watch`] relists after a watch request
//!   answered 410 (kube would retry that same version forever);
//! - errors back off exponentially with jitter, and only a completed list or a
//!   watch event resets the backoff: a server that refuses every request is
//!   not asked again every second;
//! - log lines carry a summary of each error ([`describe`]), never a response
//!   body, which could hold pod specs and their environment. Pods are
//!   received as untyped objects and their status decoded here ([`read_pod`]):
//!   kube logs the whole response when it cannot decode one, and a single
//!   pod it cannot decode would fail the whole list.
//!
//! Only [`PodMeta`] is kept per pod, not the pod (a reflector's store would
//! hold every pod's spec and status).

use std::{
    collections::{BTreeMap, HashMap},
    hash::BuildHasher as _,
    path::{Path, PathBuf},
    pin::pin,
    sync::{Arc, Mutex, RwLock},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use futures_util::StreamExt as _;
use http::{HeaderValue, Request, header::AUTHORIZATION};
use k8s_openapi::{
    api::core::v1::{Pod, PodStatus},
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use kube::{
    Api, Client,
    api::{ApiResource, DynamicObject},
    client::{Body, ClientBuilder},
    core::Status,
    runtime::watcher::{self, Event, watcher},
};
use prometheus::{IntCounter, IntGauge};
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

/// What idlemon needs of a pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodMeta {
    pub namespace: String,
    pub name: String,
    /// `kind/name` of the owning workload: a Deployment for pods of its
    /// ReplicaSets, else the direct owner; `pod/name` for a bare pod.
    pub workload: String,
    /// Container id (without `containerd://`) -> container name.
    pub containers: HashMap<String, String>,
    /// The pod's labels, for `[enforce] pod_labels`.
    pub labels: BTreeMap<String, String>,
}

/// The labels that name a pod's application, most specific first: the
/// recommended `app.kubernetes.io/name`, then the older conventions.
pub const OWNER_LABELS: [&str; 3] = ["app.kubernetes.io/name", "app", "k8s-app"];

/// A pod's owner label: what every pod of its Deployment shares.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OwnerLabel {
    pub key: String,
    pub value: String,
}

impl PodMeta {
    /// The first of `OWNER_LABELS` the pod has.
    pub fn owner_label(&self) -> Option<OwnerLabel> {
        OWNER_LABELS.iter().find_map(|key| {
            self.labels.get(*key).map(|value| OwnerLabel {
                key: (*key).to_owned(),
                value: value.clone(),
            })
        })
    }
}

/// Pods of this node by UID, shared by the scanner, the event stream and
/// keepalive enforcement (which follows `changes`).
#[derive(Debug)]
pub struct PodCache {
    pods: RwLock<HashMap<String, PodMeta>>,
    /// Counts the changes, for those who follow them.
    changes: tokio::sync::watch::Sender<u64>,
}

impl Default for PodCache {
    fn default() -> Self {
        Self {
            pods: RwLock::default(),
            changes: tokio::sync::watch::channel(0).0,
        }
    }
}

impl PodCache {
    /// Wakes after each change of the pods (a list, an added, changed or
    /// deleted pod).
    pub fn changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changes.subscribe()
    }

    fn changed(&self) {
        self.changes
            .send_modify(|count| *count = count.wrapping_add(1));
    }

    /// Adds (or replaces) a pod, as the watch does; for tests of those who
    /// read the cache.
    #[cfg(test)]
    pub fn insert_for_test(&self, uid: &str, meta: PodMeta) {
        self.insert(uid.to_owned(), meta);
    }

    pub fn get(&self, uid: &str) -> Option<PodMeta> {
        self.pods.read().ok()?.get(uid).cloned()
    }

    pub fn len(&self) -> usize {
        self.pods.read().map_or(0, |pods| pods.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn replace(&self, pods: HashMap<String, PodMeta>) {
        if let Ok(mut current) = self.pods.write() {
            *current = pods;
        }
        self.changed();
    }

    fn insert(&self, uid: String, meta: PodMeta) {
        let changed = match self.pods.write() {
            Ok(mut pods) => pods.insert(uid, meta.clone()).as_ref() != Some(&meta),
            Err(_) => false,
        };
        // A resync or a status update that changed nothing idlemon keeps
        // wakes nobody.
        if changed {
            self.changed();
        }
    }

    fn remove(&self, uid: &str) {
        if let Ok(mut pods) = self.pods.write() {
            pods.remove(uid);
        }
        self.changed();
    }
}

/// A pod's UID and what idlemon keeps of it, and why its status did not
/// decode if it did not: such a pod (a field of a newer API version, say) is
/// kept with its names but without container names.
fn read_pod(mut object: DynamicObject) -> (Option<(String, PodMeta)>, Option<serde_json::Error>) {
    let status = match object.data.get_mut("status").map(serde_json::Value::take) {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(status) => serde_json::from_value::<PodStatus>(status).map(Some),
    };
    let (status, error) = match status {
        Ok(status) => (status, None),
        Err(error) => (None, Some(error)),
    };
    (pod_meta(&object.metadata, status.as_ref()), error)
}

fn pod_meta(metadata: &ObjectMeta, status: Option<&PodStatus>) -> Option<(String, PodMeta)> {
    let uid = metadata.uid.clone().filter(|uid| !uid.is_empty())?;
    let containers = status
        .iter()
        .flat_map(|status| {
            [
                &status.container_statuses,
                &status.init_container_statuses,
                &status.ephemeral_container_statuses,
            ]
        })
        .flatten()
        .flatten()
        .filter_map(|status| {
            let id = status.container_id.as_deref()?;
            let id = id.split_once("://").map_or(id, |(_, id)| id);
            (!id.is_empty()).then(|| (id.to_owned(), status.name.clone()))
        })
        .collect();
    Some((
        uid,
        PodMeta {
            namespace: metadata.namespace.clone().unwrap_or_default(),
            name: metadata.name.clone().unwrap_or_default(),
            workload: workload(metadata),
            containers,
            labels: metadata.labels.clone().unwrap_or_default(),
        },
    ))
}

/// The workload a pod belongs to, as an SRE names it.
fn workload(metadata: &ObjectMeta) -> String {
    let name = metadata.name.as_deref().unwrap_or_default();
    let owners = metadata.owner_references.as_deref().unwrap_or_default();
    let owner = owners
        .iter()
        .find(|owner| owner.controller == Some(true))
        .or(owners.first());
    match owner {
        None => format!("pod/{name}"),
        Some(owner) if owner.kind == "ReplicaSet" => {
            // A Deployment's ReplicaSet is `<deployment>-<pod-template-hash>`.
            let hash = metadata
                .labels
                .as_ref()
                .and_then(|labels| labels.get("pod-template-hash"));
            match hash.and_then(|hash| owner.name.strip_suffix(&format!("-{hash}"))) {
                Some(deployment) => format!("deployment/{deployment}"),
                None => format!("replicaset/{}", owner.name),
            }
        }
        Some(owner) => format!("{}/{}", owner.kind.to_lowercase(), owner.name),
    }
}

const SERVICE_ACCOUNT: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

/// Where and how to reach the API server.
#[derive(Debug, Clone)]
pub struct ApiConfig {
    /// `https://host:port` in a cluster; `http://` is accepted for tests.
    pub url: http::Uri,
    pub node: String,
    /// The bearer token's file, read again as it rotates.
    pub token_file: Option<PathBuf>,
    /// The API server's CA bundle (PEM), read again as it rotates.
    pub ca_file: Option<PathBuf>,
    /// The server ends each watch after this long; a watch or list silent
    /// 5 s longer is given up as dead.
    pub watch_timeout: Duration,
}

impl ApiConfig {
    /// In a pod: the service account and KUBERNETES_SERVICE_HOST/PORT.
    /// `url` overrides the address; then the service account is optional.
    /// `token_file` overrides the service account's token.
    pub fn discover(
        node: &str,
        url: Option<&str>,
        token_file: Option<&Path>,
        watch_timeout: Duration,
    ) -> anyhow::Result<Option<Self>> {
        let account = Path::new(SERVICE_ACCOUNT);
        let account_token = account.join("token");
        let account_ca = account.join("ca.crt");
        if let Some(path) = token_file {
            std::fs::metadata(path)
                .with_context(|| format!("cannot read the API token file {}", path.display()))?;
        }
        let (url, token_file, ca_file) = match url {
            Some(url) => {
                let url: http::Uri = url
                    .trim_end_matches('/')
                    .parse()
                    .with_context(|| format!("`{url}` is not a URL"))?;
                let token_file = token_file
                    .map(Path::to_owned)
                    .or_else(|| account_token.exists().then_some(account_token));
                let ca_file = (url.scheme() == Some(&http::uri::Scheme::HTTPS)
                    && account_ca.exists())
                .then_some(account_ca);
                (url, token_file, ca_file)
            }
            None => {
                let (Ok(host), Ok(port)) = (
                    std::env::var("KUBERNETES_SERVICE_HOST"),
                    std::env::var("KUBERNETES_SERVICE_PORT"),
                ) else {
                    return Ok(None);
                };
                let token_file = token_file.map_or(account_token, Path::to_owned);
                if !token_file.exists() {
                    bail!(
                        "in a Kubernetes pod but no service account token at {}",
                        token_file.display()
                    );
                }
                if !account_ca.exists() {
                    bail!(
                        "in a Kubernetes pod but no service account CA at {}",
                        account_ca.display()
                    );
                }
                let host = if host.contains(':') {
                    format!("[{host}]")
                } else {
                    host
                };
                let url = format!("https://{host}:{port}");
                let url = url
                    .parse()
                    .with_context(|| format!("KUBERNETES_SERVICE_HOST/PORT make `{url}`"))?;
                (url, Some(token_file), Some(account_ca))
            }
        };
        Ok(Some(Self {
            url,
            node: node.to_owned(),
            token_file,
            ca_file,
            watch_timeout,
        }))
    }

    /// kube's client for this server, with the token added to every request.
    fn client(&self) -> anyhow::Result<(Client, Option<Arc<TokenFile>>)> {
        let mut config = kube::Config::new(self.url.clone());
        if let Some(path) = &self.ca_file {
            let pem = std::fs::read(path)
                .with_context(|| format!("cannot read the API server's CA {}", path.display()))?;
            let certificates =
                pem::parse_many(&pem).with_context(|| format!("{} is not PEM", path.display()))?;
            config.root_cert = Some(
                certificates
                    .into_iter()
                    .map(|certificate| certificate.into_contents())
                    .collect(),
            );
            // kube re-reads this file to follow CA rotation.
            config.root_cert_file = Some(path.clone());
        }
        // A list that stalls after its headers ends here; a stalled watch
        // ends here or by the watcher's own idle timeout, whichever is first.
        config.read_timeout = Some(self.watch_timeout + IDLE_MARGIN);
        // ... counted from each request, not from when its pooled
        // connection last carried one.
        config.reset_reader_on_write = true;
        let builder = ClientBuilder::try_from(config).context("cannot set up the API client")?;
        let Some(path) = &self.token_file else {
            return Ok((builder.build(), None));
        };
        let token = Arc::new(TokenFile::new(path.clone(), TOKEN_REFRESH));
        let header = Arc::clone(&token);
        let client = builder
            .with_layer(&tower::util::MapRequestLayer::new(
                move |mut request: Request<Body>| {
                    if let Some(value) = header.header() {
                        request.headers_mut().insert(AUTHORIZATION, value);
                    }
                    request
                },
            ))
            .build();
        Ok((client, Some(token)))
    }
}

/// How much longer than the watch's own timeout a silent connection may stay
/// silent (kube's watcher uses the same margin).
const IDLE_MARGIN: Duration = Duration::from_secs(5);

/// How often the token file is read again: client-go's and kube's period.
/// The kubelet rewrites bound tokens well before they expire.
const TOKEN_REFRESH: Duration = Duration::from_secs(60);

/// A bearer token from a file, read again once `refresh` has passed and after
/// the API server refused it. If a later read fails, the last token stays in
/// use (kubernetes/kubernetes#68164: some clients remove the file after start).
struct TokenFile {
    path: PathBuf,
    refresh: Duration,
    /// The `Authorization` value and when it was read; None: read it next.
    current: Mutex<(Option<HeaderValue>, Option<Instant>)>,
}

impl TokenFile {
    fn new(path: PathBuf, refresh: Duration) -> Self {
        Self {
            path,
            refresh,
            current: Mutex::new((None, None)),
        }
    }

    fn header(&self) -> Option<HeaderValue> {
        let mut current = self.current.lock().ok()?;
        let (value, read_at) = &mut *current;
        if read_at.is_none_or(|at| at.elapsed() >= self.refresh) {
            // Once per period even when it fails: no read per request.
            *read_at = Some(Instant::now());
            match std::fs::read_to_string(&self.path) {
                Ok(token) => match HeaderValue::try_from(format!("Bearer {}", token.trim())) {
                    Ok(mut header) => {
                        header.set_sensitive(true);
                        *value = Some(header);
                    }
                    Err(_) => warn!(
                        path = %self.path.display(),
                        "the API token file holds characters a token cannot have; \
                         the last token read stays in use"
                    ),
                },
                Err(error) => warn!(
                    path = %self.path.display(),
                    %error,
                    "cannot read the API token file; the last token read stays in use"
                ),
            }
        }
        value.clone()
    }

    /// The API server refused the token: read the file again before the next request.
    fn expire(&self) {
        if let Ok(mut current) = self.current.lock() {
            current.1 = None;
        }
    }
}

/// Delays between failed requests: from 0.8 s, doubling, up to 30 s, each with
/// up to a quarter added at random so that the nodes of a cluster do not
/// return to a recovering API server at the same instant (client-go's values).
#[derive(Debug)]
struct Backoff {
    first: Duration,
    max: Duration,
    failures: u32,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            first: Duration::from_millis(800),
            max: Duration::from_secs(30),
            failures: 0,
        }
    }
}

impl Backoff {
    fn next_delay(&mut self) -> Duration {
        let base = self
            .first
            .saturating_mul(1 << self.failures.min(16))
            .min(self.max);
        self.failures = self.failures.saturating_add(1);
        // Any randomness will do; std's hasher keys are random per process.
        let random = std::collections::hash_map::RandomState::new().hash_one(self.failures);
        base + base.mul_f64((random % 1000) as f64 / 4000.0)
    }

    fn reset(&mut self) {
        self.failures = 0;
    }
}

/// Health of the watch, exported as metrics.
#[derive(Clone)]
pub struct WatchMetrics {
    pub pods: IntGauge,
    pub errors: IntCounter,
}

/// Keeps `cache` in step with the API server from a background task, for as
/// long as the runtime runs.
pub fn spawn_watch(
    config: ApiConfig,
    cache: Arc<PodCache>,
    metrics: WatchMetrics,
) -> anyhow::Result<()> {
    let (client, token) = config.client()?;
    tokio::spawn(watch(client, token, config, cache, metrics));
    Ok(())
}

async fn watch(
    client: Client,
    token: Option<Arc<TokenFile>>,
    config: ApiConfig,
    cache: Arc<PodCache>,
    metrics: WatchMetrics,
) {
    let api: Api<DynamicObject> = Api::all_with(client, &ApiResource::erase::<Pod>(&()));
    let settings = watcher::Config::default()
        .fields(&format!("spec.nodeName={}", config.node))
        .timeout(config.watch_timeout.as_secs().clamp(1, u64::from(u32::MAX)) as u32);
    let mut backoff = Backoff::default();
    // Each turn starts a fresh watcher, which starts with a list.
    loop {
        let mut events = pin!(watcher(api.clone(), settings.clone()));
        // Pods of a list in progress; the cache keeps the last complete one.
        let mut listing = HashMap::new();
        while let Some(event) = events.next().await {
            match event {
                Ok(Event::Init) => listing.clear(),
                Ok(Event::InitApply(pod)) => {
                    listing.extend(keep(pod, &metrics));
                }
                Ok(Event::InitDone) => {
                    let pods = std::mem::take(&mut listing);
                    info!(pods = pods.len(), node = %config.node, "pods of this node listed");
                    metrics.pods.set(pods.len() as i64);
                    cache.replace(pods);
                    backoff.reset();
                }
                Ok(Event::Apply(pod)) => {
                    if let Some((uid, meta)) = keep(pod, &metrics) {
                        cache.insert(uid, meta);
                    }
                    metrics.pods.set(cache.len() as i64);
                    backoff.reset();
                }
                Ok(Event::Delete(pod)) => {
                    if let Some(uid) = &pod.metadata.uid {
                        cache.remove(uid);
                    }
                    metrics.pods.set(cache.len() as i64);
                    backoff.reset();
                }
                Err(error) => {
                    metrics.errors.inc();
                    if status_code(&error) == Some(401)
                        && let Some(token) = &token
                    {
                        token.expire();
                    }
                    let delay = backoff.next_delay();
                    warn!(
                        error = %describe(&error),
                        retry_in = ?delay,
                        "pod watch failed; pods stay as last seen"
                    );
                    tokio::time::sleep(delay).await;
                    if matches!(&error, watcher::Error::WatchStartFailed(_))
                        && status_code(&error) == Some(410)
                    {
                        break;
                    }
                }
            }
        }
    }
}

/// What to keep of a pod; a status that does not decode is counted and logged.
fn keep(pod: DynamicObject, metrics: &WatchMetrics) -> Option<(String, PodMeta)> {
    let (kept, error) = read_pod(pod);
    if let Some(error) = error {
        metrics.errors.inc();
        warn!(
            pod = kept.as_ref().map(|(_, pod)| format!("{}/{}", pod.namespace, pod.name)),
            error = %describe_decoding(&error),
            "a pod's status does not decode; its containers stay unnamed"
        );
    }
    kept
}

/// The HTTP status the API server answered with, if it answered.
fn status_code(error: &watcher::Error) -> Option<u16> {
    match error {
        watcher::Error::InitialListFailed(kube::Error::Api(status))
        | watcher::Error::WatchStartFailed(kube::Error::Api(status))
        | watcher::Error::WatchFailed(kube::Error::Api(status))
        | watcher::Error::WatchError(status) => Some(status.code),
        _ => None,
    }
}

/// What went wrong, for the log: never a response body nor a piece of a pod,
/// which kube's own error messages can carry.
fn describe(error: &watcher::Error) -> String {
    let (what, cause) = match error {
        watcher::Error::InitialListFailed(error) => ("listing pods", describe_client(error)),
        watcher::Error::WatchStartFailed(error) => ("starting the watch", describe_client(error)),
        watcher::Error::WatchFailed(error) => ("watching", describe_client(error)),
        watcher::Error::WatchError(status) => ("the watch ended", describe_status(status)),
        watcher::Error::NoResourceVersion => ("watching", "no resourceVersion".to_owned()),
    };
    format!("{what}: {cause}")
}

fn describe_client(error: &kube::Error) -> String {
    match error {
        kube::Error::Api(status) => describe_status(status),
        kube::Error::SerdeError(error) => describe_decoding(error),
        kube::Error::FromUtf8(_) => "a response is not UTF-8".to_owned(),
        // Connection and protocol errors carry no response data.
        error => {
            let mut text = error.to_string();
            let mut source = std::error::Error::source(error);
            while let Some(cause) = source {
                text = format!("{text}: {cause}");
                source = cause.source();
            }
            text
        }
    }
}

/// Where decoding failed, without the value that failed it.
fn describe_decoding(error: &serde_json::Error) -> String {
    format!(
        "a response does not decode ({:?} error at line {} column {})",
        error.classify(),
        error.line(),
        error.column()
    )
}

/// kube's reason for an error body that is not a Kubernetes `Status`, whose
/// message is then the body itself.
const NOT_A_STATUS: &str = "Failed to parse error data";

fn describe_status(status: &Status) -> String {
    let hint = match status.code {
        401 => " (is the service account token valid?)",
        403 => " (does the ClusterRole allow get, list and watch on pods?)",
        _ => "",
    };
    if status.reason == NOT_A_STATUS {
        return format!("HTTP {}{hint}", status.code);
    }
    if status.code == 0 && status.message.is_empty() {
        // kube reads any JSON object that is not the expected one as an empty Status.
        return "an object that does not decode as the expected one".to_owned();
    }
    // A Status message names the request, not the objects; cut it short all
    // the same.
    let message: String = status.message.chars().take(200).collect();
    format!("HTTP {} {}: {message}{hint}", status.code, status.reason)
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "6f1e8d8a-2b0c-4a51-9d7f-3c4e5b6a7d8e";

    fn pod(json: &str) -> DynamicObject {
        serde_json::from_str(json).expect("an object")
    }

    fn decoded(json: &str) -> PodMeta {
        let (kept, error) = read_pod(pod(json));
        assert!(error.is_none(), "{error:?}");
        kept.expect("has a uid").1
    }

    #[test]
    fn workloads_are_named_as_sres_name_them() {
        let (kept, error) = read_pod(pod(&format!(
            r#"{{"metadata":{{"uid":"{UID}","name":"checkout-5d9c7b8f9-x2x4z","namespace":"shop",
                "labels":{{"pod-template-hash":"5d9c7b8f9"}},
                "ownerReferences":[{{"apiVersion":"apps/v1","kind":"ReplicaSet","name":"checkout-5d9c7b8f9","uid":"r","controller":true}}]}},
              "status":{{"containerStatuses":[{{"name":"app","containerID":"containerd://abc123","image":"i","imageID":"","ready":true,"restartCount":0}}],
                         "initContainerStatuses":[{{"name":"init","containerID":"containerd://def456"}}]}}}}"#
        )));
        assert!(error.is_none());
        let (uid, meta) = kept.expect("has a uid");
        assert_eq!(uid, UID);
        assert_eq!(meta.namespace, "shop");
        assert_eq!(meta.name, "checkout-5d9c7b8f9-x2x4z");
        assert_eq!(meta.workload, "deployment/checkout");
        assert_eq!(
            meta.containers.get("abc123").map(String::as_str),
            Some("app")
        );
        assert_eq!(
            meta.containers.get("def456").map(String::as_str),
            Some("init")
        );

        let owned = |kind: &str, name: &str| {
            decoded(&format!(
                r#"{{"metadata":{{"uid":"u","name":"p","ownerReferences":[{{"kind":"{kind}","name":"{name}","controller":true}}]}}}}"#
            ))
            .workload
        };
        assert_eq!(owned("StatefulSet", "db"), "statefulset/db");
        assert_eq!(owned("DaemonSet", "agent"), "daemonset/agent");
        assert_eq!(owned("Job", "nightly-29"), "job/nightly-29");
        // A ReplicaSet of its own (no pod-template-hash) is named as such.
        assert_eq!(owned("ReplicaSet", "rs"), "replicaset/rs");
        let bare = decoded(r#"{"metadata":{"uid":"u","name":"debug"}}"#);
        assert_eq!(bare.workload, "pod/debug");
        assert!(
            read_pod(pod(r#"{"metadata":{"name":"no-uid"}}"#))
                .0
                .is_none()
        );
    }

    #[test]
    fn a_pod_whose_status_does_not_decode_keeps_its_names() {
        let (kept, error) = read_pod(pod(
            r#"{"metadata":{"uid":"u","name":"web-0","namespace":"shop"},
                "status":{"containerStatuses":[{"name":"app","containerID":"containerd://a","ready":"secret"}]}}"#,
        ));
        let (uid, meta) = kept.expect("kept");
        assert_eq!((uid.as_str(), meta.name.as_str()), ("u", "web-0"));
        assert!(meta.containers.is_empty());
        let text = describe_decoding(&error.expect("ready is no boolean"));
        assert!(!text.contains("secret"), "{text}");
    }

    #[test]
    fn the_token_is_read_again_after_its_period_and_after_a_refusal() {
        let path = std::env::temp_dir().join(format!("idlemon-token-{}", std::process::id()));
        std::fs::write(&path, "first\n").expect("write");
        let token = TokenFile::new(path.clone(), Duration::from_millis(200));
        assert_eq!(token.header().expect("a token"), "Bearer first");
        std::fs::write(&path, "second").expect("write");
        assert_eq!(token.header().expect("a token"), "Bearer first", "cached");
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(token.header().expect("a token"), "Bearer second");
        std::fs::write(&path, "third").expect("write");
        token.expire();
        assert_eq!(token.header().expect("a token"), "Bearer third");
        // A file gone later: the last token stays.
        std::fs::remove_file(&path).expect("remove");
        token.expire();
        assert_eq!(token.header().expect("a token"), "Bearer third");
        assert!(token.header().expect("a token").is_sensitive());
    }

    #[test]
    fn backoff_doubles_to_its_cap_and_starts_over_after_a_reset() {
        let mut backoff = Backoff::default();
        let delays: Vec<Duration> = (0..8).map(|_| backoff.next_delay()).collect();
        for (delay, base) in delays
            .iter()
            .zip([0.8, 1.6, 3.2, 6.4, 12.8, 25.6, 30.0, 30.0])
        {
            let base = Duration::from_secs_f64(base);
            assert!(*delay >= base && *delay <= base.mul_f64(1.25), "{delays:?}");
        }
        backoff.reset();
        assert!(backoff.next_delay() <= Duration::from_secs(1));
    }

    #[test]
    fn error_summaries_leave_out_bodies() {
        let body =
            Status::failure(r#"{"metadata":{"name":"secret-pod"}}"#, NOT_A_STATUS).with_code(500);
        let error = watcher::Error::InitialListFailed(kube::Error::Api(body.boxed()));
        assert_eq!(describe(&error), "listing pods: HTTP 500");
        assert_eq!(status_code(&error), Some(500));

        let gone = Status::failure("too old resource version: 5 (10)", "Expired").with_code(410);
        let error = watcher::Error::WatchError(gone.boxed());
        assert_eq!(
            describe(&error),
            "the watch ended: HTTP 410 Expired: too old resource version: 5 (10)"
        );

        let decoding =
            serde_json::from_str::<Pod>(r#"{"metadata":{"name":"secret-pod","uid":123456789}}"#)
                .expect_err("uid is not a string");
        let text = describe(&watcher::Error::WatchFailed(kube::Error::SerdeError(
            decoding,
        )));
        assert!(
            !text.contains("secret-pod") && !text.contains("123456789"),
            "{text}"
        );
    }
}
