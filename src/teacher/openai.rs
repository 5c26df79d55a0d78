//! The OpenAI-compatible Chat Completions client (OpenAI, DeepSeek, vLLM,
//! Ollama, llama.cpp server).
//!
//! One call of [`OpenAi::ask`] = one logical request, retried until it yields
//! an answer or its retries are spent:
//! * **429, 408, 5xx, timeouts, connection errors/resets** → retry up to
//!   `max_retries`, waiting `max(Retry-After, backoff)` where backoff is
//!   exponential (`backoff_base_s · 2^k`, capped at `backoff_max_s`) with
//!   jitter (uniform in [½, 1] of it). `Retry-After` (seconds, or
//!   `retry-after-ms`) is always honoured as a lower bound.
//! * **malformed or truncated JSON, empty `choices`** → retry up to
//!   `max_malformed_retries`, then a recorded failure.
//! * **other 4xx** (401, 403, 404, 400) → [`TeacherError::Fatal`]: every
//!   request would fail the same way, so the stage stops.
//!
//! Bounded concurrency (a semaphore of `concurrency` permits) and token-bucket
//! rate limits in requests/min and tokens/min (tokens estimated before
//! sending as prompt chars / 4 + `max_tokens`). The key is read once from the
//! variable named by `api_key_env`, kept in memory only, and redacted from
//! any server text we surface.
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Deserialize;
use tokio::sync::{Mutex, Semaphore};

use super::{AskFuture, Reply, Request, TeacherBackend, TeacherError, Usage};

/// Client settings (resolved from the stage config).
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// e.g. `https://api.deepseek.com/v1`; `/chat/completions` is appended.
    pub base_url: String,
    pub model: String,
    /// Name of the environment variable holding the key; `None` sends no
    /// `Authorization` header (local servers).
    pub api_key_env: Option<String>,
    pub concurrency: usize,
    pub request_timeout: Duration,
    pub connect_timeout: Duration,
    pub max_retries: u32,
    pub max_malformed_retries: u32,
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    pub requests_per_min: Option<f64>,
    pub tokens_per_min: Option<f64>,
}

/// The Chat Completions backend.
pub struct OpenAi {
    cfg: ClientConfig,
    url: String,
    key: Option<Secret>,
    http: reqwest::Client,
    permits: Arc<Semaphore>,
    limiter: RateLimiter,
}

/// The API key: never printed (Debug is redacted), only put in a header.
struct Secret(String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl OpenAi {
    pub fn new(cfg: ClientConfig) -> Result<Self, TeacherError> {
        let key = match &cfg.api_key_env {
            None => None,
            Some(var) => match std::env::var(var) {
                Ok(v) if !v.trim().is_empty() => Some(Secret(v.trim().to_string())),
                _ => {
                    return Err(TeacherError::Fatal(format!(
                        "the API key variable `{var}` (api_key_env) is not set or empty; export it, or remove api_key_env for a server without authentication"
                    )))
                }
            },
        };
        let http = reqwest::Client::builder()
            .connect_timeout(cfg.connect_timeout)
            .pool_max_idle_per_host(cfg.concurrency.max(1))
            .tcp_nodelay(true)
            .build()
            .map_err(|e| TeacherError::Fatal(format!("cannot build the HTTP client: {e}")))?;
        let url = format!("{}/chat/completions", cfg.base_url.trim_end_matches('/'));
        Ok(OpenAi {
            permits: Arc::new(Semaphore::new(cfg.concurrency.max(1))),
            limiter: RateLimiter::new(cfg.requests_per_min, cfg.tokens_per_min),
            url,
            key,
            http,
            cfg,
        })
    }

    /// Replaces the key (if any) in text we surface (server error bodies
    /// sometimes echo it back).
    fn redact(&self, text: &str) -> String {
        let mut t: String = text.chars().take(300).collect();
        if let Some(k) = &self.key {
            t = t.replace(&k.0, "***");
        }
        t
    }

    async fn ask_inner(&self, req: &Request) -> Result<Reply, TeacherError> {
        let mut body = serde_json::json!({
            "model": self.cfg.model,
            "messages": req.messages,
            "temperature": req.sampling.temperature,
            "max_tokens": req.sampling.max_tokens,
            "stream": false,
        });
        if let Some(p) = req.sampling.top_p {
            body["top_p"] = serde_json::json!(p);
        }
        if let Some(s) = req.request_seed() {
            body["seed"] = serde_json::json!(s);
        }
        let body = serde_json::to_vec(&body).map_err(|e| TeacherError::Fatal(e.to_string()))?;
        let identity = req.identity(&self.endpoint());
        let est_tokens = req.messages.iter().map(|m| m.content.len() as f64 / 4.0 + 4.0).sum::<f64>()
            + req.sampling.max_tokens as f64;

        let mut transient = 0u32; // 429/5xx/timeouts/resets so far
        let mut malformed = 0u32; // bad bodies so far
        let mut tries = 0u32;
        loop {
            tries += 1;
            self.limiter.acquire(est_tokens).await;
            let outcome = {
                let _permit = self.permits.acquire().await.map_err(|_| TeacherError::Cancelled)?;
                self.send_once(&body, &identity).await
            };
            let (wait, code, message) = match outcome {
                Attempt::Ok(reply) => return Ok(reply),
                Attempt::Fatal(m) => return Err(TeacherError::Fatal(m)),
                Attempt::Transient { code, message, retry_after } => {
                    transient += 1;
                    if transient > self.cfg.max_retries {
                        return Err(TeacherError::Failed { code, attempts: tries, message });
                    }
                    let backoff = self.backoff(transient);
                    (retry_after.map_or(backoff, |ra| ra.max(backoff.min(ra + ra / 10))), code, message)
                }
                Attempt::Malformed { code, message } => {
                    malformed += 1;
                    if malformed > self.cfg.max_malformed_retries {
                        return Err(TeacherError::Failed { code, attempts: tries, message });
                    }
                    (self.backoff(malformed), code, message)
                }
            };
            tracing::debug!(code, message, wait_ms = wait.as_millis() as u64, "teacher request retry");
            tokio::time::sleep(wait).await;
        }
    }

    /// Exponential backoff with jitter: uniform in [½, 1] · min(max, base · 2^(k−1)).
    fn backoff(&self, k: u32) -> Duration {
        let exp = self.cfg.backoff_base.as_secs_f64() * 2f64.powi(k.saturating_sub(1).min(30) as i32);
        let capped = exp.min(self.cfg.backoff_max.as_secs_f64());
        let jitter: f64 = 0.5 + 0.5 * rand::random::<f64>();
        Duration::from_secs_f64(capped * jitter)
    }

    async fn send_once(&self, body: &[u8], identity: &str) -> Attempt {
        let mut rb = self
            .http
            .post(&self.url)
            .timeout(self.cfg.request_timeout)
            .header("content-type", "application/json")
            // Lets a server (and our fault-injecting test server) count
            // requests per identity; harmless to real APIs.
            .header("x-recflow-request-id", identity)
            .body(body.to_vec());
        if let Some(k) = &self.key {
            rb = rb.bearer_auth(&k.0);
        }
        let resp = match rb.send().await {
            Ok(r) => r,
            Err(e) => return self.transport_error(e, None),
        };
        let status = resp.status();
        let retry_after = retry_after(resp.headers());
        let bytes = match resp.bytes().await {
            Ok(b) => b,
            // A body cut off mid-transfer (reset, timeout) is a transport fault.
            Err(e) => return self.transport_error(e, retry_after),
        };
        if status.as_u16() == 429 || status.as_u16() == 408 || status.is_server_error() {
            return Attempt::Transient {
                code: if status.as_u16() == 429 { "rate_limited" } else { "server_error" },
                message: format!("HTTP {status}: {}", self.redact(&String::from_utf8_lossy(&bytes))),
                retry_after,
            };
        }
        if !status.is_success() {
            return Attempt::Fatal(format!(
                "{} answered HTTP {status} for model `{}`: {}",
                self.url,
                self.cfg.model,
                self.redact(&String::from_utf8_lossy(&bytes))
            ));
        }
        parse_completion(&bytes)
    }

    fn transport_error(&self, e: reqwest::Error, retry_after: Option<Duration>) -> Attempt {
        let code = if e.is_timeout() {
            "timeout"
        } else if e.is_connect() {
            "connect_error"
        } else if e.is_decode() || e.is_body() {
            "truncated_body"
        } else {
            "connection_error"
        };
        // reqwest's Display never includes headers, so the key cannot appear.
        Attempt::Transient { code, message: self.redact(&format!("{e:#}")), retry_after }
    }
}

/// Endpoint part of the request identity of an OpenAI-compatible model
/// (`base_url` is not in it: a mirror serving the same model reuses answers).
pub fn endpoint(model: &str) -> String {
    format!("openai:{model}")
}

/// Outcome of one HTTP exchange.
enum Attempt {
    Ok(Reply),
    Transient { code: &'static str, message: String, retry_after: Option<Duration> },
    Malformed { code: &'static str, message: String },
    Fatal(String),
}

/// `Retry-After: <seconds>` or `retry-after-ms: <ms>` (OpenAI sends both).
fn retry_after(h: &reqwest::header::HeaderMap) -> Option<Duration> {
    if let Some(ms) = h.get("retry-after-ms").and_then(|v| v.to_str().ok()).and_then(|s| s.trim().parse::<f64>().ok()) {
        if ms.is_finite() && ms >= 0.0 {
            return Some(Duration::from_secs_f64(ms / 1000.0));
        }
    }
    h.get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|s| s.trim().parse::<f64>().ok())
        .filter(|s| s.is_finite() && *s >= 0.0)
        .map(|s| Duration::from_secs_f64(s.min(3600.0)))
}

#[derive(Deserialize)]
struct Completion {
    #[serde(default)]
    choices: Vec<Choice>,
    #[serde(default)]
    usage: Option<ApiUsage>,
}

#[derive(Deserialize)]
struct Choice {
    message: ChoiceMessage,
}

#[derive(Deserialize)]
struct ChoiceMessage {
    #[serde(default)]
    content: Option<String>,
    #[serde(default)]
    reasoning_content: Option<String>,
}

#[derive(Deserialize)]
struct ApiUsage {
    #[serde(default)]
    prompt_tokens: u64,
    #[serde(default)]
    completion_tokens: u64,
}

/// Parses a 200 body. Malformed JSON and empty `choices` are retryable.
fn parse_completion(bytes: &[u8]) -> Attempt {
    let c: Completion = match serde_json::from_slice(bytes) {
        Ok(c) => c,
        Err(e) => {
            let code = if e.is_eof() { "truncated_json" } else { "malformed_json" };
            return Attempt::Malformed { code, message: format!("unparseable response body ({} bytes): {e}", bytes.len()) };
        }
    };
    let Some(choice) = c.choices.into_iter().next() else {
        return Attempt::Malformed { code: "empty_choices", message: "response has no choices".into() };
    };
    let usage = c.usage.map(|u| Usage { prompt_tokens: u.prompt_tokens, completion_tokens: u.completion_tokens });
    Attempt::Ok(Reply {
        // A null content (reasoning only, cut by max_tokens) is an empty
        // answer: a format failure for the loop, not a transport fault.
        content: choice.message.content.unwrap_or_default(),
        reasoning_content: choice.message.reasoning_content.filter(|r| !r.is_empty()),
        usage: usage.unwrap_or_default(),
    })
}

impl TeacherBackend for OpenAi {
    fn name(&self) -> String {
        format!("openai:{}", self.cfg.model)
    }
    fn endpoint(&self) -> String {
        endpoint(&self.cfg.model)
    }
    fn ask<'a>(&'a self, req: &'a Request) -> AskFuture<'a> {
        Box::pin(self.ask_inner(req))
    }
}

/// Token buckets for requests/min and tokens/min. Capacity is ten seconds'
/// worth (at least one request), so a fresh client does not burst a whole
/// minute's quota at once.
struct RateLimiter {
    rpm: Option<f64>,
    tpm: Option<f64>,
    state: Mutex<(f64, f64, Instant)>,
}

impl RateLimiter {
    fn new(rpm: Option<f64>, tpm: Option<f64>) -> Self {
        let cap = |r: Option<f64>| r.map_or(0.0, |r| (r / 6.0).max(1.0));
        RateLimiter { rpm, tpm, state: Mutex::new((cap(rpm), cap(tpm), Instant::now())) }
    }

    async fn acquire(&self, tokens: f64) {
        if self.rpm.is_none() && self.tpm.is_none() {
            return;
        }
        loop {
            let wait = {
                let mut s = self.state.lock().await;
                let now = Instant::now();
                let dt = now.duration_since(s.2).as_secs_f64();
                s.2 = now;
                let mut wait: f64 = 0.0;
                if let Some(r) = self.rpm {
                    let cap = (r / 6.0).max(1.0);
                    s.0 = (s.0 + dt * r / 60.0).min(cap);
                    if s.0 < 1.0 {
                        wait = wait.max((1.0 - s.0) * 60.0 / r);
                    }
                }
                if let Some(t) = self.tpm {
                    let cap = (t / 6.0).max(1.0);
                    s.1 = (s.1 + dt * t / 60.0).min(cap);
                    // A request larger than the bucket goes once the bucket is full.
                    let need = tokens.min(cap);
                    if s.1 < need {
                        wait = wait.max((need - s.1) * 60.0 / t);
                    }
                }
                if wait == 0.0 {
                    if self.rpm.is_some() {
                        s.0 -= 1.0;
                    }
                    if let Some(t) = self.tpm {
                        s.1 -= tokens.min((t / 6.0).max(1.0));
                    }
                    return;
                }
                wait
            };
            tokio::time::sleep(Duration::from_secs_f64(wait)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_reasoning_content_separately() {
        let body = br#"{"choices":[{"message":{"role":"assistant","content":"<rate>4</rate>","reasoning_content":"think"}}],"usage":{"prompt_tokens":10,"completion_tokens":5}}"#;
        match parse_completion(body) {
            Attempt::Ok(r) => {
                assert_eq!(r.content, "<rate>4</rate>", "the answer is content, never reasoning_content");
                assert_eq!(r.reasoning_content.as_deref(), Some("think"));
                assert_eq!(r.usage, Usage { prompt_tokens: 10, completion_tokens: 5 });
            }
            _ => panic!("valid body must parse"),
        }
    }

    #[test]
    fn bad_bodies_are_classified() {
        assert!(matches!(parse_completion(br#"{"choices":[{"mess"#), Attempt::Malformed { code: "truncated_json", .. }));
        assert!(matches!(parse_completion(b"<html>oops"), Attempt::Malformed { code: "malformed_json", .. }));
        assert!(matches!(parse_completion(br#"{"choices":[]}"#), Attempt::Malformed { code: "empty_choices", .. }));
    }

    /// Acquires `n` requests of `tokens` each; returns the times (s since start).
    fn acquire_times(l: RateLimiter, n: usize, tokens: f64) -> Vec<f64> {
        let rt = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
        rt.block_on(async {
            let t0 = Instant::now();
            let mut at = Vec::new();
            for _ in 0..n {
                l.acquire(tokens).await;
                at.push(t0.elapsed().as_secs_f64());
            }
            at
        })
    }

    #[test]
    fn tokens_per_min_bucket_never_exceeds_its_rate() {
        // 1.2M tokens/min = 20k/s; capacity 10 s = 200k; requests of 10k
        // tokens: 20 go at once, then one per 0.5 s.
        let tpm = 1_200_000.0;
        let at = acquire_times(RateLimiter::new(None, Some(tpm)), 23, 10_000.0);
        for (i, t) in at.iter().enumerate() {
            let allowed = tpm / 6.0 + tpm / 60.0 * t + 1.0;
            let used = (i + 1) as f64 * 10_000.0;
            assert!(used <= allowed, "request {i} at {t:.3}s: {used} tokens > {allowed} allowed by tokens_per_min");
        }
        assert!(at[22] >= 1.4, "3 requests past the burst wait ~0.5 s each, got {:.3}s", at[22]);
        assert!(at[19] < at[22], "the burst is the bucket capacity");
    }

    #[test]
    fn requests_per_min_bucket_spaces_requests() {
        // 240/min = 4/s; capacity 10 s = 40 requests, then one per 0.25 s.
        let at = acquire_times(RateLimiter::new(Some(240.0), None), 44, 0.0);
        for (i, t) in at.iter().enumerate() {
            let allowed = 40.0 + 4.0 * t + 1e-6;
            assert!((i + 1) as f64 <= allowed, "request {i} at {t:.3}s exceeds requests_per_min");
        }
        assert!(at[43] >= 0.9, "4 requests past the burst wait ~0.25 s each, got {:.3}s", at[43]);
    }

    #[test]
    fn retry_after_forms() {
        let mut h = reqwest::header::HeaderMap::new();
        h.insert("retry-after", "2".parse().unwrap());
        assert_eq!(retry_after(&h), Some(Duration::from_secs(2)));
        h.insert("retry-after-ms", "1500".parse().unwrap());
        assert_eq!(retry_after(&h), Some(Duration::from_millis(1500)), "the finer header wins");
    }
}
