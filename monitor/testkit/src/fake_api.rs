//! A fake Kubernetes API server for the pod watch: it records each request
//! (list or watch, resourceVersion, bearer token, when) and answers as the
//! test's script says, including the faults a real one shows after months:
//! refused tokens, watches that stall after their headers, 410 Gone.
//! Plain HTTP/1.1 on a loopback port inside the test's network namespace;
//! every connection is closed after one response.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::{TcpListener, TcpStream},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use crate::Netns;

/// Where the fake server listens, inside the daemon's namespace.
pub const ADDRESS: &str = "127.0.0.1:8443";
pub const URL: &str = "http://127.0.0.1:8443";
pub const NODE: &str = "node-a";

/// One request as the server saw it.
#[derive(Debug, Clone)]
pub struct ApiRequest {
    pub target: String,
    pub watch: bool,
    /// The `resourceVersion` query parameter, if any.
    pub resource_version: Option<String>,
    /// The bearer token, if any.
    pub token: Option<String>,
    pub at: Instant,
}

/// What to answer.
pub enum Reply {
    /// A JSON body with this status.
    Json(u16, String),
    /// A plain-text body with this status.
    Text(u16, String),
    /// A watch: these events, one per line, then the stream stays open for
    /// `hold` and ends.
    Watch(Vec<String>, Duration),
    /// Headers of a JSON response, then nothing, for as long as the test runs.
    Stall,
}

/// Answers `script(request, n)`, where `n` counts the requests of the same
/// kind (list or watch) before this one.
pub struct FakeApi {
    requests: Arc<Mutex<Vec<ApiRequest>>>,
    stop: Arc<AtomicBool>,
}

type Script = dyn Fn(&ApiRequest, usize) -> Reply + Send + Sync;

impl FakeApi {
    pub fn start(
        netns: &Netns,
        script: impl Fn(&ApiRequest, usize) -> Reply + Send + Sync + 'static,
    ) -> Self {
        let listener = netns.run(|| TcpListener::bind(ADDRESS).unwrap());
        listener.set_nonblocking(true).unwrap();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let script: Arc<Script> = Arc::new(script);
        let (shared, stopped) = (Arc::clone(&requests), Arc::clone(&stop));
        thread::spawn(move || {
            // Bounded: a test never runs this long.
            let deadline = Instant::now() + Duration::from_secs(300);
            while !stopped.load(Ordering::Relaxed) && Instant::now() < deadline {
                match listener.accept() {
                    Ok((stream, _)) => {
                        let (shared, stopped, script) = (
                            Arc::clone(&shared),
                            Arc::clone(&stopped),
                            Arc::clone(&script),
                        );
                        thread::spawn(move || serve(stream, &shared, &stopped, &*script));
                    }
                    Err(_) => thread::sleep(Duration::from_millis(20)),
                }
            }
        });
        Self { requests, stop }
    }

    pub fn requests(&self) -> Vec<ApiRequest> {
        self.requests.lock().unwrap().clone()
    }

    pub fn lists(&self) -> Vec<ApiRequest> {
        self.requests()
            .into_iter()
            .filter(|request| !request.watch)
            .collect()
    }

    pub fn watches(&self) -> Vec<ApiRequest> {
        self.requests()
            .into_iter()
            .filter(|request| request.watch)
            .collect()
    }
}

impl Drop for FakeApi {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn serve(stream: TcpStream, requests: &Mutex<Vec<ApiRequest>>, stop: &AtomicBool, script: &Script) {
    stream.set_nonblocking(false).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut head = Vec::new();
    loop {
        let mut line = String::new();
        match reader.read_line(&mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) if line == "\r\n" => break,
            Ok(_) => head.push(line.trim_end().to_owned()),
        }
    }
    let Some(target) = head.first().and_then(|line| line.split_whitespace().nth(1)) else {
        return;
    };
    let query = target.split_once('?').map_or("", |(_, query)| query);
    let parameter = |name: &str| {
        query.split('&').find_map(|pair| {
            let (key, value) = pair.split_once('=')?;
            (key == name).then(|| value.to_owned())
        })
    };
    // Every request is for this node's pods only.
    assert!(
        target.starts_with("/api/v1/pods?")
            && parameter("fieldSelector").as_deref() == Some(&format!("spec.nodeName%3D{NODE}")),
        "{target}"
    );
    let token = head.iter().find_map(|line| {
        let (name, value) = line.split_once(':')?;
        name.eq_ignore_ascii_case("authorization")
            .then(|| value.trim().strip_prefix("Bearer ").map(str::to_owned))
            .flatten()
    });
    let request = ApiRequest {
        target: target.to_owned(),
        watch: parameter("watch").is_some_and(|watch| watch == "true" || watch == "1"),
        resource_version: parameter("resourceVersion"),
        token,
        at: Instant::now(),
    };
    let earlier = {
        let mut requests = requests.lock().unwrap();
        let earlier = requests
            .iter()
            .filter(|seen| seen.watch == request.watch)
            .count();
        requests.push(request.clone());
        earlier
    };
    let mut stream = stream;
    match script(&request, earlier) {
        Reply::Json(status, body) => respond(&mut stream, status, "application/json", &body),
        Reply::Text(status, body) => respond(&mut stream, status, "text/plain", &body),
        Reply::Watch(events, hold) => {
            let _ = write!(
                stream,
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
            );
            for event in events {
                let line = format!("{}\n", event.replace('\n', ""));
                let _ = write!(stream, "{:x}\r\n{line}\r\n", line.len());
            }
            let _ = stream.flush();
            pause(hold, stop);
            let _ = write!(stream, "0\r\n\r\n");
        }
        Reply::Stall => {
            let _ = write!(
                stream,
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100000\r\nConnection: close\r\n\r\n"
            );
            let _ = stream.flush();
            pause(Duration::from_secs(120), stop);
        }
    }
}

fn respond(stream: &mut TcpStream, status: u16, content_type: &str, body: &str) {
    let _ = write!(
        stream,
        "HTTP/1.1 {status} Fake\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
}

/// Sleeps for `hold`, or until the test is over.
fn pause(hold: Duration, stop: &AtomicBool) {
    let until = Instant::now() + hold;
    while Instant::now() < until && !stop.load(Ordering::Relaxed) {
        thread::sleep(Duration::from_millis(50));
    }
}

/// A pod of this node as the API server sends it: a Deployment's pod with
/// one container.
pub fn pod(uid: &str, name: &str, version: &str, container_id: &str) -> String {
    let hash = "7d4b9c";
    let workload = name.split('-').next().unwrap_or(name);
    format!(
        r#"{{"metadata":{{"uid":"{uid}","name":"{name}","namespace":"shop","resourceVersion":"{version}",
            "labels":{{"pod-template-hash":"{hash}"}},
            "ownerReferences":[{{"apiVersion":"apps/v1","kind":"ReplicaSet","name":"{workload}-{hash}","uid":"rs-{uid}","controller":true}}]}},
          "spec":{{"nodeName":"{NODE}","containers":[{{"name":"app","image":"shop/app:1"}}]}},
          "status":{{"phase":"Running","containerStatuses":[{{"name":"app","containerID":"containerd://{container_id}",
            "image":"shop/app:1","imageID":"","ready":true,"restartCount":0}}]}}}}"#
    )
    .replace('\n', "")
}

/// A bare pod of this node in `namespace` with `labels`, without
/// containers (keepalive enforcement selects pods by their cgroup).
pub fn labelled_pod(
    uid: &str,
    name: &str,
    namespace: &str,
    labels: &[(&str, &str)],
    version: &str,
) -> String {
    let labels: Vec<String> = labels
        .iter()
        .map(|(key, value)| format!(r#""{key}":"{value}""#))
        .collect();
    format!(
        r#"{{"metadata":{{"uid":"{uid}","name":"{name}","namespace":"{namespace}","resourceVersion":"{version}",
            "labels":{{{}}}}},
          "spec":{{"nodeName":"{NODE}","containers":[{{"name":"app","image":"shop/app:1"}}]}},
          "status":{{"phase":"Running"}}}}"#,
        labels.join(",")
    )
    .replace('\n', "")
}

/// A pod list at `version`.
pub fn list(version: &str, pods: &[String]) -> Reply {
    Reply::Json(
        200,
        format!(
            r#"{{"kind":"PodList","apiVersion":"v1","metadata":{{"resourceVersion":"{version}"}},"items":[{}]}}"#,
            pods.join(",")
        ),
    )
}

/// A watch event line.
pub fn event(kind: &str, object: &str) -> String {
    format!(r#"{{"type":"{kind}","object":{object}}}"#)
}

/// A Kubernetes `Status` failure, as a body or an ERROR event's object.
pub fn status(code: u16, reason: &str, message: &str) -> String {
    format!(
        r#"{{"kind":"Status","apiVersion":"v1","metadata":{{}},"status":"Failure","message":"{message}","reason":"{reason}","code":{code}}}"#
    )
}
