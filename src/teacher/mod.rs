//! The teacher: reasoning traces for RecOne's cold start (arXiv 2510.23077,
//! Sec. 4), bought once and kept.
//!
//! Brief overview:
//! * [`TeacherBackend`] — one request (messages, sampling params, sample id
//!   and attempt) → one [`Reply`] (content, optional `reasoning_content`,
//!   token usage). Backends: [`openai::OpenAi`] (any Chat Completions server),
//!   [`cf::CfTeacher`] (offline, deterministic) and `local` (recflow's own
//!   generation engine, registered by `recflow-ml`).
//! * [`cache::ResponseCache`] — every answer stored as soon as it arrives,
//!   keyed by the request's identity ([`Request::identity`]), in an
//!   append-only journal with group-commit fsync. Independent of the stage
//!   key, so neither a crash nor a config change pays twice.
//! * [`rationalize`] — the rationalization loop (STaR-style: a wrong answer
//!   is asked again with the true rating as a hint) with the [`leak`]
//!   filter; [`stats`] summarises its outcomes, [`preview`] replays cached
//!   answers through it for `--dry-run` (new requests, estimated tokens and
//!   cost). None of these sees the stage machinery: the stage's driver —
//!   inputs, backend choice, progress, outputs — is [`crate::stages::teacher`].
//! * [`testserver`] — a fault-injecting Chat Completions server used by the
//!   tests and the benchmark.
use std::future::Future;
use std::pin::Pin;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub mod cache;
pub mod cf;
pub mod leak;
pub mod openai;
pub mod preview;
pub mod rationalize;
pub mod stats;
pub mod testserver;

/// One chat message (`role`: system | user | assistant) — the data module's type.
pub use crate::data::Message;

/// Sampling parameters sent with every request (part of the request identity).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Sampling {
    pub temperature: f32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_p: Option<f32>,
    pub max_tokens: u32,
    /// Base seed; the request carries a seed derived from it, the sample id
    /// and the attempt, so hinted retries differ reproducibly.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
}

/// One request to a teacher.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Request {
    pub sample_id: String,
    /// 1 for the plain prompt, 2.. for hinted (rationalization) attempts.
    pub attempt: u32,
    /// What is sent: the original prompt, plus the hint on attempts ≥ 2.
    pub messages: Vec<Message>,
    pub sampling: Sampling,
    /// The true rating, known only to offline teachers that honour hints
    /// structurally (`cf`); never sent to a remote API and not part of the identity.
    #[serde(skip)]
    pub hint: Option<f32>,
    /// Index of the sample in the stage's sample table (offline teachers
    /// use it to look up the sample's evidence); not part of the identity.
    #[serde(skip)]
    pub row: usize,
}

impl Request {
    /// The request's identity: sha256 over the endpoint (backend kind and
    /// model), the messages, the sampling params, the sample id and the
    /// attempt number — canonical JSON, fields in a fixed order. This is the
    /// response cache key; nothing operational (concurrency, timeouts,
    /// prices, base_url, the API key) enters it.
    pub fn identity(&self, endpoint: &str) -> String {
        #[derive(Serialize)]
        struct Identity<'a> {
            v: u32,
            endpoint: &'a str,
            messages: &'a [Message],
            sampling: &'a Sampling,
            sample_id: &'a str,
            attempt: u32,
        }
        let id = Identity {
            v: 1,
            endpoint,
            messages: &self.messages,
            sampling: &self.sampling,
            sample_id: &self.sample_id,
            attempt: self.attempt,
        };
        // Serialising plain structs of strings and numbers cannot fail.
        let bytes = serde_json::to_vec(&id).unwrap_or_default();
        hex::encode(Sha256::digest(&bytes))
    }

    /// The seed sent to the API: the base seed mixed with sample id and attempt.
    pub fn request_seed(&self) -> Option<u64> {
        self.sampling.seed.map(|s| {
            let d = Sha256::digest(format!("{s}\0{}\0{}", self.sample_id, self.attempt).as_bytes());
            u64::from_le_bytes([d[0], d[1], d[2], d[3], d[4], d[5], d[6], 0]) // < 2^56: fits JSON integers everywhere
        })
    }
}

/// Token usage reported by the server (or counted by an offline teacher).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
}

/// A teacher's answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Reply {
    /// The answer text (parsed with [`crate::answer::parse`]).
    pub content: String,
    /// A separate reasoning channel (DeepSeek-R1's `reasoning_content`):
    /// kept in the record, never mistaken for the answer.
    #[serde(default)]
    pub reasoning_content: Option<String>,
    #[serde(default)]
    pub usage: Usage,
}

/// Why a request produced no answer.
#[derive(Debug, thiserror::Error)]
pub enum TeacherError {
    /// Retries exhausted (429/5xx/timeouts/resets/malformed bodies): the
    /// sample is recorded as rejected with this reason code.
    #[error("request failed after {attempts} tries ({code}): {message}")]
    Failed { code: &'static str, attempts: u32, message: String },
    /// The budget cap is reached: no new requests; everything done is kept.
    #[error("budget exhausted: {0}")]
    Budget(String),
    /// Configuration or authentication problem that every request would hit
    /// (401, 404 model, missing key variable): the stage stops.
    #[error("{0}")]
    Fatal(String),
    /// The stage was cancelled.
    #[error("cancelled")]
    Cancelled,
}

/// Boxed future returned by [`TeacherBackend::ask`].
pub type AskFuture<'a> = Pin<Box<dyn Future<Output = Result<Reply, TeacherError>> + Send + 'a>>;

/// A teacher: answers one request. Retries of transport faults are the
/// backend's business; rationalization (re-asking with a hint) is the
/// driver's ([`rationalize`]).
pub trait TeacherBackend: Send + Sync {
    /// The `teacher` column of the coldstart rows, e.g. `openai:deepseek-reasoner`.
    fn name(&self) -> String;
    /// Endpoint part of the request identity: backend kind and model.
    fn endpoint(&self) -> String;
    /// Whether answers are stored in the response cache (paid or slow
    /// backends: yes; the deterministic `cf` teacher: no).
    fn cacheable(&self) -> bool {
        true
    }
    fn ask<'a>(&'a self, req: &'a Request) -> AskFuture<'a>;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(attempt: u32) -> Request {
        Request {
            sample_id: "s1".into(),
            attempt,
            messages: vec![Message { role: "user".into(), content: "hi".into() }],
            sampling: Sampling { temperature: 0.6, top_p: None, max_tokens: 100, seed: None },
            hint: None,
            row: 0,
        }
    }

    #[test]
    fn identity_covers_attempt_model_and_sampling_but_not_row_or_hint() {
        let a = req(1);
        let base = a.identity("openai:m");
        assert_ne!(base, req(2).identity("openai:m"), "attempt must enter the identity");
        assert_ne!(base, a.identity("openai:other"), "model must enter the identity");
        let mut t = req(1);
        t.sampling.temperature = 0.7;
        assert_ne!(base, t.identity("openai:m"), "sampling params must enter the identity");
        let mut r = req(1);
        r.row = 9;
        r.hint = Some(4.0);
        assert_eq!(base, r.identity("openai:m"), "row index and structural hint are not identity");
    }

    #[test]
    fn request_seed_differs_per_attempt() {
        let mut a = req(1);
        a.sampling.seed = Some(7);
        let mut b = req(2);
        b.sampling.seed = Some(7);
        assert_ne!(a.request_seed(), b.request_seed(), "hinted retries must not replay the same seed");
        assert!(a.request_seed().unwrap() < 1 << 56);
    }
}
