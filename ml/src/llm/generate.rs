//! Batched sampling with a shared-prefill KV cache.
//!
//! For a chunk of requests: prompts are left-padded into one `[B, T]`
//! batch (HF position ids `cumsum(mask) − 1`, padding masked), prefilled
//! **once** into a preallocated [`KvCache`] of capacity `T + max_new_tokens`,
//! then each prompt's cache rows and last logits are repeated for its G
//! samples. Each decode step feeds one token per live row; rows that finish
//! (a stop id after `min_new_tokens`, or `max_new_tokens`) leave the batch.
//!
//! Sampling at temperature τ: `p = softmax(z/τ)`, restricted by top-k and
//! top-p (HF's `TopKLogitsWarper` / `TopPLogitsWarper` semantics) and
//! renormalised; the token is drawn by inverse CDF with one uniform number
//! `u = U(seed, request id, sample index, step)` (a SplitMix64 hash), so a
//! sample depends only on its own identity, never on which other requests
//! share its batch. The reported log-prob is `log softmax(z/τ)[token]` —
//! the temperature-scaled distribution *before* top-k/top-p/min-length
//! masking, which is what GRPO's ratio recomputes. τ = 0 is greedy and
//! reports `log softmax(z)[token]`.
use tch::{Device, Kind, Tensor};

use super::error::{LlmError, Result};
use super::model::{position_ids_from_mask, KvCache, Model};

/// Sampling options.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct GenConfig {
    /// At most this many new tokens per sample (> 0).
    pub max_new_tokens: usize,
    /// Stop ids are masked out until this many tokens were generated.
    pub min_new_tokens: usize,
    /// τ; 0 = greedy.
    pub temperature: f64,
    /// Nucleus mass in (0, 1]; 1 = off.
    pub top_p: f64,
    /// Keep the k most likely tokens; 0 = off.
    pub top_k: i64,
    /// Any of these ends a sample (it is included in the output).
    pub stop_ids: Vec<i64>,
    /// Padding id for left padding (never attended to; any valid id).
    pub pad_id: i64,
    pub seed: u64,
    /// Rows (samples) decoded together; requests are chunked to fit
    /// (a request's G samples always stay together). 0 = no limit.
    pub max_batch_rows: usize,
}

impl Default for GenConfig {
    fn default() -> Self {
        GenConfig {
            max_new_tokens: 64,
            min_new_tokens: 0,
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            stop_ids: vec![],
            pad_id: 0,
            seed: 0,
            max_batch_rows: 64,
        }
    }
}

impl GenConfig {
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(LlmError::Invalid(m));
        if self.max_new_tokens == 0 {
            return bad("max_new_tokens must be > 0".into());
        }
        if self.min_new_tokens > self.max_new_tokens {
            return bad(format!("min_new_tokens {} > max_new_tokens {}", self.min_new_tokens, self.max_new_tokens));
        }
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return bad(format!("temperature must be >= 0, got {}", self.temperature));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad(format!("top_p must be in (0, 1], got {}", self.top_p));
        }
        if self.top_k < 0 {
            return bad(format!("top_k must be >= 0, got {}", self.top_k));
        }
        Ok(())
    }
}

/// One prompt and how many samples to draw from it.
#[derive(Debug, Clone, PartialEq)]
pub struct GenRequest {
    /// Prompt token ids (non-empty; e.g. a rendered chat template encoded
    /// without special tokens).
    pub prompt_ids: Vec<i64>,
    /// G ≥ 1 samples sharing this prompt's prefill.
    pub num_samples: usize,
    /// Stable identity of the request: sample `j`'s random stream is
    /// `U(seed, id, sample_offset + j, step)`.
    pub id: u64,
    /// Index of this request's first sample (0 normally): drawing samples
    /// 4..8 of a prompt later reproduces exactly what one run of 8 would.
    pub sample_offset: usize,
}

impl GenRequest {
    /// `num_samples` samples of `prompt_ids`, identity `id`, offset 0.
    pub fn new(prompt_ids: Vec<i64>, num_samples: usize, id: u64) -> Self {
        GenRequest { prompt_ids, num_samples, id, sample_offset: 0 }
    }
}

/// Why a sample ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// Produced a stop id (the last token).
    Stop,
    /// Reached `max_new_tokens`.
    Length,
}

/// One sample.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct GenOutput {
    /// New tokens (the stop token included when `finish == Stop`).
    pub token_ids: Vec<i64>,
    /// `log p(token_t | prefix)` under the temperature-scaled distribution.
    pub logprobs: Vec<f32>,
    pub finish: FinishReason,
}

/// SplitMix64 (Steele et al. 2014) finaliser: a well-mixed 64-bit hash.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Uniform in [0, 1) as a pure function of (seed, request id, sample, step).
pub fn uniform(seed: u64, id: u64, sample: u64, step: u64) -> f64 {
    let h = mix(mix(mix(mix(seed) ^ id) ^ sample) ^ step);
    (h >> 11) as f64 / (1u64 << 53) as f64
}

/// Generates `num_samples` continuations for every request. Returns
/// `out[request][sample]`, in request order.
pub fn generate(model: &Model, requests: &[GenRequest], cfg: &GenConfig) -> Result<Vec<Vec<GenOutput>>> {
    cfg.validate()?;
    for (i, r) in requests.iter().enumerate() {
        if r.prompt_ids.is_empty() || r.num_samples == 0 {
            return Err(LlmError::Invalid(format!("request {i}: empty prompt or num_samples = 0")));
        }
        let v = model.config().vocab_size;
        if let Some(t) = r.prompt_ids.iter().find(|&&t| t < 0 || t >= v) {
            return Err(LlmError::Invalid(format!("request {i}: token id {t} outside the vocabulary (0..{v})")));
        }
        let need = (r.prompt_ids.len() + cfg.max_new_tokens) as i64;
        if need > model.config().max_position_embeddings {
            return Err(LlmError::ContextLength { len: need, max: model.config().max_position_embeddings });
        }
    }
    let _g = tch::no_grad_guard();
    // Longest prompts first: chunks hold similar lengths (less padding).
    let mut order: Vec<usize> = (0..requests.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(requests[i].prompt_ids.len()));
    let mut out: Vec<Option<Vec<GenOutput>>> = vec![None; requests.len()];
    let cap = if cfg.max_batch_rows == 0 { usize::MAX } else { cfg.max_batch_rows };
    let mut i = 0;
    while i < order.len() {
        let mut chunk = vec![order[i]];
        let mut rows = requests[order[i]].num_samples;
        i += 1;
        while i < order.len() && rows + requests[order[i]].num_samples <= cap {
            rows += requests[order[i]].num_samples;
            chunk.push(order[i]);
            i += 1;
        }
        let reqs: Vec<&GenRequest> = chunk.iter().map(|&j| &requests[j]).collect();
        for (j, o) in chunk.iter().zip(generate_chunk(model, &reqs, cfg)?) {
            out[*j] = Some(o);
        }
    }
    Ok(out.into_iter().map(|o| o.unwrap_or_default()).collect())
}

/// Phase split of generation for diagnosing per-step overhead, on when
/// `RECFLOW_GEN_PROFILE=1`: each phase ends with a device synchronisation
/// (CUDA kernels run asynchronously, so without it time lands in whichever
/// phase next waits), and the totals go to stderr as one JSON line per
/// chunk. Off by default: the synchronisations cost throughput.
struct Profile {
    on: Option<Device>,
    last: std::time::Instant,
    /// prefill, decode forward (layers + lm_head), sampling, bookkeeping.
    secs: [f64; 4],
    steps: usize,
}

impl Profile {
    fn new(dev: Device) -> Self {
        let on = std::env::var("RECFLOW_GEN_PROFILE").is_ok_and(|v| v == "1").then_some(dev);
        Profile { on, last: std::time::Instant::now(), secs: [0.0; 4], steps: 0 }
    }
    /// Ends the running phase, charging it to `phase`.
    fn lap(&mut self, phase: usize) {
        if let Some(dev) = self.on {
            if let Device::Cuda(i) = dev {
                tch::Cuda::synchronize(i as i64);
            }
            let now = std::time::Instant::now();
            self.secs[phase] += (now - self.last).as_secs_f64();
            self.last = now;
        }
    }
    fn report(&self, rows: i64, prompt_len: i64) {
        if self.on.is_some() {
            let per_step = |x: f64| 1e3 * x / self.steps.max(1) as f64;
            eprintln!(
                "{}",
                serde_json::json!({"profile": "generate_chunk", "rows": rows, "prompt_len": prompt_len, "decode_steps": self.steps,
                    "prefill_s": self.secs[0], "forward_ms_per_step": per_step(self.secs[1]),
                    "sample_ms_per_step": per_step(self.secs[2]), "bookkeeping_ms_per_step": per_step(self.secs[3])})
            );
        }
    }
}

/// One live row of the decode batch.
struct Row {
    req: usize,
    sample: usize,
    tokens: Vec<i64>,
    logprobs: Vec<f32>,
}

fn generate_chunk(model: &Model, reqs: &[&GenRequest], cfg: &GenConfig) -> Result<Vec<Vec<GenOutput>>> {
    let dev = model.device();
    let b = reqs.len() as i64;
    let tp = reqs.iter().map(|r| r.prompt_ids.len()).max().unwrap_or(0) as i64;
    let padded = reqs.iter().any(|r| r.prompt_ids.len() as i64 != tp);
    // ---- left-padded prompt batch ----
    let mut ids = vec![cfg.pad_id; (b * tp) as usize];
    let mut mask = vec![0i64; (b * tp) as usize];
    for (bi, r) in reqs.iter().enumerate() {
        let off = bi * tp as usize + (tp as usize - r.prompt_ids.len());
        ids[off..off + r.prompt_ids.len()].copy_from_slice(&r.prompt_ids);
        mask[off..off + r.prompt_ids.len()].iter_mut().for_each(|m| *m = 1);
    }
    let ids = Tensor::from_slice(&ids).view([b, tp]).to_device(dev); // [B, T]
    let mut mask = Tensor::from_slice(&mask).view([b, tp]).to_device(dev); // [B, T]
    let pos = position_ids_from_mask(&mask); // [B, T]
    let mut prof = Profile::new(dev);
    // ---- prefill once per prompt ----
    let mut cache = KvCache::new(model, b, tp + cfg.max_new_tokens as i64);
    let h = model.hidden_states(&ids, &pos, if padded { Some(&mask) } else { None }, Some(&mut cache))?;
    let mut logits = model.lm_head(&h.narrow(1, tp - 1, 1).squeeze_dim(1)).to_kind(Kind::Float); // [B, V]
    let mut last_pos = pos.narrow(1, tp - 1, 1); // [B, 1]
    // ---- share the prefill among the G samples of each request ----
    let mut rows: Vec<Row> = Vec::new();
    let mut rep: Vec<i64> = Vec::new();
    for (ri, r) in reqs.iter().enumerate() {
        for s in 0..r.num_samples {
            rows.push(Row { req: ri, sample: s, tokens: vec![], logprobs: vec![] });
            rep.push(ri as i64);
        }
    }
    if rep.len() as i64 != b {
        let idx = Tensor::from_slice(&rep).to_device(dev);
        cache.select_rows(&idx);
        logits = logits.index_select(0, &idx);
        last_pos = last_pos.index_select(0, &idx);
        mask = mask.index_select(0, &idx);
    }
    let mut done: Vec<Vec<Option<GenOutput>>> = reqs.iter().map(|r| vec![None; r.num_samples]).collect();
    let stop_t = Tensor::from_slice(&cfg.stop_ids).to_device(dev);
    prof.lap(0);
    // ---- decode ----
    for step in 0..cfg.max_new_tokens {
        let u: Vec<f64> = rows
            .iter()
            .map(|r| uniform(cfg.seed, reqs[r.req].id, (reqs[r.req].sample_offset + r.sample) as u64, step as u64))
            .collect();
        let block_stop = step < cfg.min_new_tokens && !cfg.stop_ids.is_empty();
        let (tok, lp) = sample(&logits, &u, cfg, if block_stop { Some(&stop_t) } else { None })?;
        prof.lap(2);
        let mut keep = Vec::with_capacity(rows.len());
        let mut next = Vec::with_capacity(rows.len());
        let mut finished_rows = Vec::new();
        for (k, row) in rows.iter_mut().enumerate() {
            row.tokens.push(tok[k]);
            row.logprobs.push(lp[k]);
            let n = row.tokens.len();
            let stop = n >= cfg.min_new_tokens && cfg.stop_ids.contains(&tok[k]);
            if stop || n >= cfg.max_new_tokens {
                finished_rows.push((k, if stop { FinishReason::Stop } else { FinishReason::Length }));
            } else {
                keep.push(k as i64);
                next.push(tok[k]);
            }
        }
        for &(k, reason) in finished_rows.iter().rev() {
            let row = rows.remove(k);
            done[row.req][row.sample] = Some(GenOutput { token_ids: row.tokens, logprobs: row.logprobs, finish: reason });
        }
        if rows.is_empty() {
            break;
        }
        // Finished rows leave the batch (cache, mask and positions alike).
        if !finished_rows.is_empty() {
            let idx = Tensor::from_slice(&keep).to_device(dev);
            cache.select_rows(&idx);
            last_pos = last_pos.index_select(0, &idx);
            mask = mask.index_select(0, &idx);
        }
        let n = rows.len() as i64;
        let input = Tensor::from_slice(&next).view([n, 1]).to_device(dev); // [N, 1]
        last_pos = last_pos + 1;
        mask = Tensor::cat(&[&mask, &Tensor::ones([n, 1], (Kind::Int64, dev))], 1); // [N, S+1]
        prof.lap(3);
        let h = model.hidden_states(&input, &last_pos, if padded { Some(&mask) } else { None }, Some(&mut cache))?;
        logits = model.lm_head(&h.squeeze_dim(1)).to_kind(Kind::Float); // [N, V]
        prof.lap(1);
        prof.steps += 1;
    }
    prof.report(b, tp);
    Ok(done.into_iter().map(|v| v.into_iter().map(|o| o.expect("every sample finishes by max_new_tokens")).collect()).collect())
}

/// Picks one token per row of `logits: [N, V]` (f32) with uniforms `u`.
/// Returns (tokens, log-probs of the temperature-scaled distribution).
fn sample(logits: &Tensor, u: &[f64], cfg: &GenConfig, block: Option<&Tensor>) -> Result<(Vec<i64>, Vec<f32>)> {
    let n = logits.size()[0];
    let v = logits.size()[1];
    let dev = logits.device();
    let tau = if cfg.temperature > 0.0 { cfg.temperature } else { 1.0 };
    let scaled = if tau != 1.0 { logits / tau } else { logits.shallow_clone() }; // [N, V]
    let logp = scaled.log_softmax(-1, Kind::Float); // [N, V]
    let mut z = scaled;
    if let Some(stop) = block {
        z = z.index_fill(1, stop, f64::NEG_INFINITY);
    }
    let tok = if cfg.temperature == 0.0 {
        z.argmax(-1, false) // [N]
    } else {
        if cfg.top_k > 0 && cfg.top_k < v {
            let (vals, _) = z.topk(cfg.top_k, -1, true, true);
            let kth = vals.narrow(1, cfg.top_k - 1, 1); // [N, 1]
            z = z.masked_fill(&z.lt_tensor(&kth), f64::NEG_INFINITY);
        }
        if cfg.top_p < 1.0 {
            // HF TopPLogitsWarper: drop the ascending-sorted prefix whose
            // cumulative mass ≤ 1 − p, always keeping the top token.
            let (sorted, idx) = z.sort(-1, false);
            let cum = sorted.softmax(-1, Kind::Float).cumsum(-1, Kind::Float);
            let remove = cum.le(1.0 - cfg.top_p);
            let remove = remove.index_fill(1, &Tensor::from_slice(&[v - 1]).to_device(dev), 0);
            let remove = remove.zeros_like().scatter(1, &idx, &remove);
            z = z.masked_fill(&remove, f64::NEG_INFINITY);
        }
        let probs = z.softmax(-1, Kind::Float); // [N, V]
        let cdf = probs.cumsum(-1, Kind::Float); // [N, V]
        let total = cdf.narrow(1, v - 1, 1); // [N, 1]
        let ut = Tensor::from_slice(u).to_kind(Kind::Float).to_device(dev).view([n, 1]) * &total;
        // First index with cdf > u·total (zero-probability tokens can't be hit).
        ut.searchsorted(&cdf, false, true, "right", None::<Tensor>).squeeze_dim(1).clamp(0, v - 1)
    };
    let lp = logp.gather(1, &tok.unsqueeze(1), false).squeeze_dim(1); // [N]
    let tok: Vec<i64> = Vec::<i64>::try_from(tok.to_device(tch::Device::Cpu))?;
    let lp: Vec<f32> = Vec::<f32>::try_from(lp.to_device(tch::Device::Cpu))?;
    Ok((tok, lp))
}

/// `log p(ids[t] | ids[<t])` for t = 1..T of one sequence (length T − 1),
/// computed in f32 from one full forward.
pub fn token_logprobs(model: &Model, ids: &[i64]) -> Result<Vec<f32>> {
    if ids.len() < 2 {
        return Ok(vec![]);
    }
    let _g = tch::no_grad_guard();
    let t = ids.len() as i64;
    let x = Tensor::from_slice(ids).view([1, t]).to_device(model.device());
    let pos = Tensor::arange(t, (Kind::Int64, model.device())).view([1, t]);
    let logits = model.forward(&x, &pos, None, None)?.to_kind(Kind::Float); // [1, T, V]
    let lp = logits.narrow(1, 0, t - 1).log_softmax(-1, Kind::Float); // [1, T-1, V]
    let tgt = x.narrow(1, 1, t - 1).unsqueeze(-1); // [1, T-1, 1]
    let got = lp.gather(2, &tgt, false).view([t - 1]);
    Ok(Vec::<f32>::try_from(got.to_device(tch::Device::Cpu))?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uniform_is_a_pure_function_of_its_identity() {
        assert_eq!(uniform(1, 2, 3, 4), uniform(1, 2, 3, 4), "same identity, same draw");
        assert_ne!(uniform(1, 2, 3, 4), uniform(1, 2, 3, 5), "another step draws anew");
        assert_ne!(uniform(1, 2, 3, 4), uniform(1, 2, 4, 4), "another sample draws anew");
        let mean: f64 = (0..10000).map(|i| uniform(7, 0, 0, i)).sum::<f64>() / 10000.0;
        assert!((mean - 0.5).abs() < 0.02, "roughly uniform: mean {mean}");
    }

    #[test]
    fn sampling_respects_top_k_and_min_length_masks() {
        let logits = Tensor::from_slice(&[0.0f32, 1.0, 2.0, 3.0]).view([1, 4]);
        let cfg = GenConfig { top_k: 1, ..Default::default() };
        for u in [0.0, 0.5, 0.999] {
            let (t, _) = sample(&logits, &[u], &cfg, None).unwrap();
            assert_eq!(t, vec![3], "top_k = 1 is greedy whatever u is");
        }
        let greedy = GenConfig { temperature: 0.0, ..Default::default() };
        let (t, lp) = sample(&logits, &[0.3], &greedy, Some(&Tensor::from_slice(&[3i64]))).unwrap();
        assert_eq!(t, vec![2], "a blocked stop id is never chosen");
        let expect = 2.0 - (0f64.exp() + 1f64.exp() + 2f64.exp() + 3f64.exp()).ln();
        assert!((lp[0] as f64 - expect).abs() < 1e-5, "logprob is of the unmasked distribution");
        let topp = GenConfig { top_p: 0.5, ..Default::default() };
        for u in [0.0, 0.99] {
            let (t, _) = sample(&logits, &[u], &topp, None).unwrap();
            assert_eq!(t, vec![3], "p(3) = 0.64 ≥ 0.5: the nucleus is {{3}}");
        }
    }
}
