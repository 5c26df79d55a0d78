//! A fault-injecting Chat Completions server on 127.0.0.1 (random port) for
//! the teacher's tests and benchmark. Hand-written HTTP/1.1 with keep-alive
//! on tokio, running on its own runtime thread, so a test can drive the
//! (blocking) stage while the server answers.
//!
//! Answers are driven by markers in the last user message, which test
//! prompts carry: `[test-target: 4]` (the true rating) and `[test-mode: M]`
//! with M one of
//! * `right` — always the target rating;
//! * `wrong` — a wrong rating unless the hint is present (then the target);
//! * `always_wrong` — always a wrong rating;
//! * `leak` — wrong first; with the hint, the target but saying "the actual
//!   rating is …" (the leak filter must reject it);
//! * `format` — an answer without the tags;
//! * `broken` — always a garbage body (retries exhausted → recorded failure).
//!
//! The hint is recognised by [`HINT_MARKER`] (part of the default hint).
//! On top, [`Plan::faults`] are injected on the *first* visit of a share of
//! request identities (`x-recflow-request-id`), chosen by hashing the
//! identity: 429 + Retry-After, 500, slow answers past the client timeout,
//! truncated or garbage JSON, empty choices, bodies cut mid-transfer and
//! connection resets. Every request is logged per identity with its arrival
//! time, so tests can count repeats and check Retry-After.
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Text every default hint contains.
pub const HINT_MARKER: &str = "For this attempt only";

/// One injected fault.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Fault {
    /// 429 with `Retry-After: secs`.
    RateLimit { retry_after_s: u64 },
    /// 500 Internal Server Error.
    ServerError,
    /// Answer only after this long (past the client's timeout).
    Slow(Duration),
    /// A 200 whose JSON is cut in half (HTTP framing intact).
    TruncatedJson,
    /// A 200 with an HTML body.
    Garbage,
    /// A 200 with `"choices": []`.
    EmptyChoices,
    /// Headers promise more body bytes than are sent, then the connection closes.
    CutBody,
    /// The connection is reset (RST) without an answer.
    Reset,
}

/// What the server does.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Latency of every normal answer.
    pub delay: Duration,
    /// Faults cycled over the identities picked for a first-visit fault.
    pub faults: Vec<Fault>,
    /// One identity in `fault_one_in` gets a first-visit fault (0 = none).
    pub fault_one_in: u64,
    /// Expected bearer key; a mismatch answers 401 echoing the key it got
    /// (as some real APIs do), to test that clients redact it.
    pub api_key: Option<String>,
    /// Time `delay` with tokio's millisecond timer instead of
    /// [`sleep_precise`] (only to show the difference in the benchmark).
    pub tokio_timer: bool,
}

impl Default for Plan {
    fn default() -> Self {
        Plan { delay: Duration::from_millis(0), faults: Vec::new(), fault_one_in: 0, api_key: None, tokio_timer: false }
    }
}

/// One request as the server saw it.
#[derive(Debug, Clone)]
pub struct Visit {
    pub identity: String,
    pub at: Instant,
    /// Status sent (0 for resets and cut bodies).
    pub status: u16,
    pub retry_after_s: Option<u64>,
}

#[derive(Default)]
struct State {
    /// Connections accepted (a client that pools well opens ~concurrency).
    connections: u64,
    /// How long each normal answer was held, request read → response written.
    holds: Vec<Duration>,
    visits: Vec<Visit>,
    seen: HashMap<String, u64>,
    headers_seen: Vec<String>,
    bodies_seen: Vec<String>,
}

/// A running server; stops when dropped.
pub struct TestServer {
    pub addr: SocketAddr,
    state: Arc<Mutex<State>>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl TestServer {
    /// Starts on 127.0.0.1 with a random port.
    pub fn start(plan: Plan) -> std::io::Result<TestServer> {
        let std_listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        std_listener.set_nonblocking(true)?;
        let addr = std_listener.local_addr()?;
        let state = Arc::new(Mutex::new(State::default()));
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let st = state.clone();
        let plan = Arc::new(plan);
        let thread = std::thread::Builder::new().name("teacher-testserver".into()).spawn(move || {
            let rt = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("test server runtime: {e}");
                    return;
                }
            };
            rt.block_on(async move {
                let Ok(listener) = TcpListener::from_std(std_listener) else { return };
                let accept = async {
                    while let Ok((sock, _)) = listener.accept().await {
                        let _ = sock.set_nodelay(true);
                        if let Ok(mut s) = st.lock() {
                            s.connections += 1;
                        }
                        tokio::spawn(serve_conn(sock, plan.clone(), st.clone()));
                    }
                };
                tokio::select! {
                    _ = accept => {}
                    _ = rx => {}
                }
            });
        })?;
        Ok(TestServer { addr, state, shutdown: Some(tx), thread: Some(thread) })
    }

    /// `http://127.0.0.1:PORT/v1`
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    /// Requests per identity.
    pub fn counts(&self) -> HashMap<String, u64> {
        self.state.lock().map(|s| s.seen.clone()).unwrap_or_default()
    }

    /// Every request in arrival order.
    pub fn visits(&self) -> Vec<Visit> {
        self.state.lock().map(|s| s.visits.clone()).unwrap_or_default()
    }

    /// Raw request heads and bodies received (for the key-leak test).
    pub fn raw_seen(&self) -> (Vec<String>, Vec<String>) {
        self.state.lock().map(|s| (s.headers_seen.clone(), s.bodies_seen.clone())).unwrap_or_default()
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> u64 {
        self.state.lock().map(|s| s.connections).unwrap_or(0)
    }

    /// How long each normal (fault-free) answer was held by the server,
    /// from the request read to the response written, in arrival order.
    pub fn holds(&self) -> Vec<Duration> {
        self.state.lock().map(|s| s.holds.clone()).unwrap_or_default()
    }

    pub fn total_requests(&self) -> usize {
        self.state.lock().map(|s| s.visits.len()).unwrap_or(0)
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn fnv(s: &str) -> u64 {
    let mut h: u64 = 0xcbf29ce484222325;
    for b in s.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    h
}

async fn serve_conn(mut sock: TcpStream, plan: Arc<Plan>, st: Arc<Mutex<State>>) {
    let mut buf: Vec<u8> = Vec::with_capacity(8192);
    loop {
        // Read the head.
        let head_end = loop {
            if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break p + 4;
            }
            let mut chunk = [0u8; 8192];
            match sock.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
        let mut content_length = 0usize;
        let mut identity = String::new();
        let mut auth = None;
        for line in head.lines().skip(1) {
            if let Some((k, v)) = line.split_once(':') {
                let v = v.trim();
                match k.trim().to_ascii_lowercase().as_str() {
                    "content-length" => content_length = v.parse().unwrap_or(0),
                    "x-recflow-request-id" => identity = v.to_string(),
                    "authorization" => auth = Some(v.trim_start_matches("Bearer ").to_string()),
                    _ => {}
                }
            }
        }
        while buf.len() < head_end + content_length {
            let mut chunk = [0u8; 8192];
            match sock.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        let arrived = Instant::now();
        let body = String::from_utf8_lossy(&buf[head_end..head_end + content_length]).to_string();
        buf.drain(..head_end + content_length);

        let visit_no = {
            let mut s = match st.lock() {
                Ok(s) => s,
                Err(_) => return,
            };
            s.headers_seen.push(head.clone());
            s.bodies_seen.push(body.clone());
            let c = s.seen.entry(identity.clone()).or_default();
            *c += 1;
            *c
        };
        let log = |status: u16, retry_after_s: Option<u64>| {
            if let Ok(mut s) = st.lock() {
                s.visits.push(Visit { identity: identity.clone(), at: Instant::now(), status, retry_after_s });
            }
        };

        if let Some(expected) = &plan.api_key {
            if auth.as_deref() != Some(expected.as_str()) {
                log(401, None);
                let got = auth.unwrap_or_default();
                let msg = format!(r#"{{"error":{{"message":"Incorrect API key provided: {got}"}}}}"#);
                if write_response(&mut sock, 401, &[], msg.as_bytes()).await.is_err() {
                    return;
                }
                continue;
            }
        }

        // First-visit faults on a hashed share of identities.
        let h = fnv(&identity);
        let fault = (visit_no == 1 && plan.fault_one_in > 0 && !plan.faults.is_empty() && h % plan.fault_one_in == 0)
            .then(|| plan.faults[((h / plan.fault_one_in) % plan.faults.len() as u64) as usize]);
        let answer = make_answer(&body);
        match fault {
            Some(Fault::RateLimit { retry_after_s }) => {
                log(429, Some(retry_after_s));
                let ra = retry_after_s.to_string();
                if write_response(&mut sock, 429, &[("retry-after", &ra)], br#"{"error":{"message":"rate limited"}}"#)
                    .await
                    .is_err()
                {
                    return;
                }
            }
            Some(Fault::ServerError) => {
                log(500, None);
                if write_response(&mut sock, 500, &[], b"internal error").await.is_err() {
                    return;
                }
            }
            Some(Fault::Slow(d)) => {
                log(200, None);
                tokio::time::sleep(d).await;
                if write_response(&mut sock, 200, &[], answer.as_bytes()).await.is_err() {
                    return;
                }
            }
            Some(Fault::TruncatedJson) => {
                log(200, None);
                let cut = &answer.as_bytes()[..answer.len() / 2];
                if write_response(&mut sock, 200, &[], cut).await.is_err() {
                    return;
                }
            }
            Some(Fault::Garbage) => {
                log(200, None);
                if write_response(&mut sock, 200, &[], b"<html><body>Bad Gateway</body></html>").await.is_err() {
                    return;
                }
            }
            Some(Fault::EmptyChoices) => {
                log(200, None);
                let b = br#"{"id":"x","object":"chat.completion","choices":[],"usage":{"prompt_tokens":1,"completion_tokens":0}}"#;
                if write_response(&mut sock, 200, &[], b).await.is_err() {
                    return;
                }
            }
            Some(Fault::CutBody) => {
                log(0, None);
                let head = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
                    answer.len() + 100
                );
                let _ = sock.write_all(head.as_bytes()).await;
                let _ = sock.write_all(&answer.as_bytes()[..answer.len() / 2]).await;
                let _ = sock.flush().await;
                return;
            }
            Some(Fault::Reset) => {
                log(0, None);
                // Zero linger makes close send RST; it cannot block (no data to flush).
                #[allow(deprecated)]
                let _ = sock.set_linger(Some(Duration::from_secs(0)));
                return;
            }
            None => {
                if plan.tokio_timer {
                    tokio::time::sleep_until((arrived + plan.delay).into()).await;
                } else if !plan.delay.is_zero() {
                    sleep_precise(arrived + plan.delay).await;
                }
                log(200, None);
                if write_response(&mut sock, 200, &[], answer.as_bytes()).await.is_err() {
                    return;
                }
                if let Ok(mut s) = st.lock() {
                    s.holds.push(arrived.elapsed());
                }
            }
        }
    }
}

/// Sleeps until `deadline` with sub-millisecond precision.
///
/// tokio's timer wheel has 1 ms ticks and rounds deadlines up, so
/// `tokio::time::sleep(20 ms)` holds an answer 20–22 ms (measured: see
/// docs/teacher.md), which would charge the client for the server's timer
/// and make "answers after 20 ms" untrue. So the coarse timer covers all
/// but the last 2 ms and one shared timer thread (a condvar wait: hrtimer
/// precision) wakes the answer at the deadline.
async fn sleep_precise(deadline: Instant) {
    const COARSE_MARGIN: Duration = Duration::from_millis(2);
    if let Some(early) = deadline.checked_sub(COARSE_MARGIN) {
        if early > Instant::now() {
            tokio::time::sleep_until(early.into()).await;
        }
    }
    if deadline <= Instant::now() {
        return;
    }
    let (tx, rx) = tokio::sync::oneshot::channel();
    precise_timer().add(deadline, tx);
    let _ = rx.await;
}

/// The timer thread behind [`sleep_precise`]: a heap of deadlines.
struct PreciseTimer {
    heap: Mutex<std::collections::BinaryHeap<TimerEntry>>,
    cv: std::sync::Condvar,
}

struct TimerEntry(Instant, u64, tokio::sync::oneshot::Sender<()>);

impl PartialEq for TimerEntry {
    fn eq(&self, o: &Self) -> bool {
        (self.0, self.1) == (o.0, o.1)
    }
}
impl Eq for TimerEntry {}
impl PartialOrd for TimerEntry {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for TimerEntry {
    // Reversed: BinaryHeap is a max-heap, the earliest deadline must be on top.
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        (o.0, o.1).cmp(&(self.0, self.1))
    }
}

fn precise_timer() -> &'static PreciseTimer {
    static TIMER: std::sync::OnceLock<&'static PreciseTimer> = std::sync::OnceLock::new();
    TIMER.get_or_init(|| {
        let t: &'static PreciseTimer =
            Box::leak(Box::new(PreciseTimer { heap: Mutex::new(Default::default()), cv: std::sync::Condvar::new() }));
        // Lives for the process, like tokio's own timer; if it cannot start,
        // answers wake at once (too early), which tests tolerate.
        let _ = std::thread::Builder::new().name("testserver-timer".into()).spawn(move || t.run());
        t
    })
}

impl PreciseTimer {
    fn add(&self, deadline: Instant, tx: tokio::sync::oneshot::Sender<()>) {
        static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if let Ok(mut h) = self.heap.lock() {
            h.push(TimerEntry(deadline, seq, tx));
            self.cv.notify_one();
        }
    }

    fn run(&self) {
        let Ok(mut h) = self.heap.lock() else { return };
        loop {
            let now = Instant::now();
            while h.peek().is_some_and(|e| e.0 <= now) {
                if let Some(e) = h.pop() {
                    let _ = e.2.send(());
                }
            }
            h = match h.peek().map(|e| e.0 - now) {
                None => match self.cv.wait(h) {
                    Ok(g) => g,
                    Err(_) => return,
                },
                Some(d) => match self.cv.wait_timeout(h, d) {
                    Ok((g, _)) => g,
                    Err(_) => return,
                },
            };
        }
    }
}

async fn write_response(sock: &mut TcpStream, status: u16, headers: &[(&str, &str)], body: &[u8]) -> std::io::Result<()> {
    let reason = match status {
        200 => "OK",
        401 => "Unauthorized",
        429 => "Too Many Requests",
        _ => "Internal Server Error",
    };
    let mut head = format!(
        "HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    let mut out = head.into_bytes();
    out.extend_from_slice(body);
    sock.write_all(&out).await?;
    sock.flush().await
}

/// The answer body for a request, from the markers in its last user message.
fn make_answer(body: &str) -> String {
    let v: serde_json::Value = serde_json::from_str(body).unwrap_or(serde_json::Value::Null);
    let last_user = v["messages"]
        .as_array()
        .and_then(|m| m.iter().rev().find(|x| x["role"] == "user"))
        .and_then(|x| x["content"].as_str())
        .unwrap_or("")
        .to_string();
    let marker = |name: &str| -> Option<String> {
        let tag = format!("[test-{name}: ");
        let s = last_user.find(&tag)? + tag.len();
        let e = last_user[s..].find(']')? + s;
        Some(last_user[s..e].to_string())
    };
    let target: f32 = marker("target").and_then(|t| t.parse().ok()).unwrap_or(3.0);
    let mode = marker("mode").unwrap_or_else(|| "right".into());
    let hinted = last_user.contains(HINT_MARKER);
    let wrong = if target >= 3.0 { target - 2.0 } else { target + 2.0 };
    let r = |x: f32| format!("{}", x as i64);
    let tags = |rating: f32, extra: &str| {
        format!(
            "<analyze user>The user rated earlier albums 5, 4 and 2.{extra}</analyze user>\n<analyze item>A well reviewed record.</analyze item>\n<match>Fits the user's taste.</match>\n<rate>{}</rate>",
            r(rating)
        )
    };
    let content = match mode.as_str() {
        "right" => tags(target, ""),
        "wrong" => tags(if hinted { target } else { wrong }, ""),
        "always_wrong" => tags(wrong, ""),
        "leak" => {
            if hinted {
                tags(target, &format!(" The actual rating is {}.", r(target)))
            } else {
                tags(wrong, "")
            }
        }
        "format" => "I think the user would rate it 4.".to_string(),
        "broken" => return "<html>oops".to_string(),
        _ => tags(target, ""),
    };
    let prompt_tokens = (body.len() / 4) as u64;
    let completion_tokens = content.split_whitespace().count() as u64;
    serde_json::json!({
        "id": "chatcmpl-test",
        "object": "chat.completion",
        "model": v["model"],
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content, "reasoning_content": "thinking..."}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens}
    })
    .to_string()
}
