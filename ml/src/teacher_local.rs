//! The `local` teacher backend: a model directory run by recflow's own
//! generation engine ([`crate::llm`]), so a large local model can teach a
//! small one without any server.
//!
//! A dedicated thread owns the model (tch tensors never cross threads) and
//! micro-batches: it blocks for one request, takes whatever else is queued
//! (up to `concurrency` requests), and runs one batched
//! [`generate`](crate::llm::generate::generate) call. Sampling is
//! deterministic per request — the random stream is `U(seed, id, sample,
//! step)` with `id` derived from the request identity — so an answer does not
//! depend on which other requests shared its batch.
//!
//! Device: `device` in the stage config (`auto` = CUDA when libtorch sees
//! one, else CPU); dtype: `dtype`, default bf16 on CUDA and f32 on CPU.
//! The response-cache endpoint is `local:<fingerprint>`, a hash of the
//! model directory's `config.json` and its file names and sizes, so swapping
//! the weights in place does not reuse stale answers.
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::Arc;

use recflow::stages::teacher::{default_backend, run_stage, Backend, BackendInputs, Config};
use recflow::stages::{Metrics, StageCtx};
use recflow::teacher::{AskFuture, Reply, Request, TeacherBackend, TeacherError, Usage};
use sha2::{Digest, Sha256};

use crate::llm::generate::{generate, GenConfig, GenRequest};
use crate::llm::{parse_device, parse_kind, ChatMessage, Model, Tokenizer};

type Answer = tokio::sync::oneshot::Sender<Result<Reply, TeacherError>>;

/// The `local` backend.
pub struct LocalTeacher {
    name: String,
    endpoint: String,
    tx: std::sync::Mutex<Option<mpsc::Sender<(Request, Answer)>>>,
    thread: std::sync::Mutex<Option<std::thread::JoinHandle<()>>>,
}

/// Hash of `config.json` plus every file's name and size in the directory.
fn fingerprint(dir: &Path) -> Result<String, TeacherError> {
    let fatal = |e: std::io::Error| TeacherError::Fatal(format!("model_dir {}: {e}", dir.display()));
    let mut h = Sha256::new();
    h.update(std::fs::read(dir.join("config.json")).map_err(fatal)?);
    let mut files: Vec<(String, u64)> = std::fs::read_dir(dir)
        .map_err(fatal)?
        .filter_map(|e| e.ok())
        .filter_map(|e| Some((e.file_name().to_string_lossy().into_owned(), e.metadata().ok()?.len())))
        .collect();
    files.sort();
    for (n, len) in files {
        h.update(format!("{n}\0{len}\n").as_bytes());
    }
    Ok(hex::encode(&h.finalize()[..12]))
}

impl LocalTeacher {
    /// Loads the model on its own thread; returns once it is ready (or failed).
    pub fn start(cfg: &Config) -> Result<Self, TeacherError> {
        let dir = PathBuf::from(cfg.model_dir.clone().ok_or_else(|| {
            TeacherError::Fatal("backend: local needs `model_dir`".into())
        })?);
        let endpoint = format!("local:{}", fingerprint(&dir)?);
        let name = format!("local:{}", dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default());
        let device = parse_device(cfg.device.as_deref().unwrap_or("auto")).map_err(|e| TeacherError::Fatal(e.to_string()))?;
        let kind = match cfg.dtype.as_deref() {
            Some(d) => parse_kind(d).map_err(|e| TeacherError::Fatal(e.to_string()))?,
            None if device.is_cuda() => tch::Kind::BFloat16,
            None => tch::Kind::Float,
        };
        let max_batch = cfg.concurrency.max(1);
        let (tx, rx) = mpsc::channel::<(Request, Answer)>();
        let (ready_tx, ready_rx) = mpsc::channel::<Result<(), String>>();
        let thread = std::thread::Builder::new()
            .name("teacher-local".into())
            .spawn(move || {
                let loaded = Model::load(&dir, device, kind).and_then(|m| Ok((m, Tokenizer::load(&dir)?)));
                let (model, tok) = match loaded {
                    Ok(x) => {
                        let _ = ready_tx.send(Ok(()));
                        x
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(format!("cannot load model {}: {e}", dir.display())));
                        return;
                    }
                };
                serve(&model, &tok, rx, max_batch);
            })
            .map_err(|e| TeacherError::Fatal(format!("cannot start the local teacher thread: {e}")))?;
        match ready_rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(m)) => return Err(TeacherError::Fatal(m)),
            Err(_) => return Err(TeacherError::Fatal("the local teacher thread died while loading".into())),
        }
        Ok(LocalTeacher {
            name,
            endpoint,
            tx: std::sync::Mutex::new(Some(tx)),
            thread: std::sync::Mutex::new(Some(thread)),
        })
    }
}

impl Drop for LocalTeacher {
    fn drop(&mut self) {
        if let Ok(mut t) = self.tx.lock() {
            t.take();
        }
        if let Some(h) = self.thread.lock().ok().and_then(|mut t| t.take()) {
            let _ = h.join();
        }
    }
}

/// The model thread: micro-batch, generate, answer.
fn serve(model: &Model, tok: &Tokenizer, rx: mpsc::Receiver<(Request, Answer)>, max_batch: usize) {
    let _guard = tch::no_grad_guard();
    let mut carry: Vec<(Request, Answer)> = Vec::new();
    loop {
        if carry.is_empty() {
            match rx.recv() {
                Ok(j) => carry.push(j),
                Err(_) => return,
            }
        }
        while carry.len() < max_batch {
            match rx.try_recv() {
                Ok(j) => carry.push(j),
                Err(_) => break,
            }
        }
        // One batch = requests with the same sampling params (one stage's are all equal).
        let sampling = carry[0].0.sampling.clone();
        let (batch, rest): (Vec<_>, Vec<_>) = carry.drain(..).partition(|(r, _)| r.sampling == sampling);
        carry = rest;
        let mut reqs = Vec::with_capacity(batch.len());
        let mut answers = Vec::with_capacity(batch.len());
        for (r, ans) in batch {
            let msgs: Vec<ChatMessage> = r.messages.iter().map(|m| ChatMessage::new(&m.role, &m.content)).collect();
            let ids = tok.apply_chat_template(&msgs, true).and_then(|t| tok.encode(&t, false));
            match ids {
                Ok(ids) if !ids.is_empty() => {
                    let d = Sha256::digest(r.identity("local").as_bytes());
                    let id = u64::from_le_bytes([d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7]]);
                    reqs.push(GenRequest { prompt_ids: ids, num_samples: 1, id, sample_offset: 0 });
                    answers.push(ans);
                }
                Ok(_) => {
                    let _ = ans.send(Err(TeacherError::Fatal(format!("sample {}: empty prompt", r.sample_id))));
                }
                Err(e) => {
                    let _ = ans.send(Err(TeacherError::Fatal(format!("sample {}: chat template: {e}", r.sample_id))));
                }
            }
        }
        if reqs.is_empty() {
            continue;
        }
        let cfg = GenConfig {
            max_new_tokens: sampling.max_tokens as usize,
            temperature: sampling.temperature as f64,
            top_p: sampling.top_p.map_or(1.0, |p| p as f64),
            stop_ids: tok.stop_token_ids(),
            pad_id: tok.pad_token_id().unwrap_or(0),
            seed: sampling.seed.unwrap_or(0),
            max_batch_rows: max_batch,
            ..Default::default()
        };
        match generate(model, &reqs, &cfg) {
            Ok(outs) => {
                for ((req, out), ans) in reqs.iter().zip(outs).zip(answers) {
                    let Some(o) = out.into_iter().next() else {
                        let _ = ans.send(Err(TeacherError::Fatal("generation returned no sample".into())));
                        continue;
                    };
                    let reply = tok.decode(&o.token_ids, true).map(|content| Reply {
                        content,
                        reasoning_content: None,
                        usage: Usage {
                            prompt_tokens: req.prompt_ids.len() as u64,
                            completion_tokens: o.token_ids.len() as u64,
                        },
                    });
                    let _ = ans.send(reply.map_err(|e| TeacherError::Fatal(format!("decode: {e}"))));
                }
            }
            Err(e) => {
                for ans in answers {
                    let _ = ans.send(Err(TeacherError::Fatal(format!("generation failed: {e}"))));
                }
            }
        }
    }
}

impl TeacherBackend for LocalTeacher {
    fn name(&self) -> String {
        self.name.clone()
    }
    fn endpoint(&self) -> String {
        self.endpoint.clone()
    }
    fn ask<'a>(&'a self, req: &'a Request) -> AskFuture<'a> {
        Box::pin(async move {
            let (tx, rx) = tokio::sync::oneshot::channel();
            let sender = self.tx.lock().ok().and_then(|g| g.clone());
            let Some(sender) = sender else { return Err(TeacherError::Cancelled) };
            sender
                .send((req.clone(), tx))
                .map_err(|_| TeacherError::Fatal("the local teacher thread has stopped".into()))?;
            rx.await.map_err(|_| TeacherError::Fatal("the local teacher thread has stopped".into()))?
        })
    }
}

/// The teacher stage's run in `recflow-worker`: `local` here, the rest as in
/// the torch-free worker.
pub fn run(cfg: &Config, ctx: &mut StageCtx) -> anyhow::Result<Metrics> {
    run_stage(cfg, ctx, &|c: &Config, inp: &BackendInputs| match c.backend {
        Backend::Local => Ok(Arc::new(LocalTeacher::start(c)?) as Arc<dyn TeacherBackend>),
        _ => default_backend(c, inp),
    })
}
