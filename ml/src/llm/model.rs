//! One decoder for the Llama and Qwen2/Qwen2.5 families, mirroring
//! transformers' `LlamaForCausalLM` / `Qwen2ForCausalLM` module by module
//! (parameter names identical to HF's):
//!
//! ```text
//! h₀ = embed_tokens[ids]
//! hₗ' = hₗ + o_proj(Attn(RoPE(q_proj(n)), RoPE(k_proj(n)), v_proj(n))),  n = RMSNorm(hₗ)
//! hₗ₊₁ = hₗ' + down_proj(silu(gate_proj(m)) ⊙ up_proj(m)),             m = RMSNorm(hₗ')
//! logits = lm_head(RMSNorm(h_L))          (lm_head = embed_tokensᵀ when tied)
//! ```
//! RMSNorm (Zhang & Sennrich 2019): `x / √(mean(x²) + ε) · w`, computed in f32.
//! RoPE (Su et al. 2021) in HF's rotate-half layout: `q·cos + rot(q)·sin`,
//! `rot([x₁, x₂]) = [−x₂, x₁]`, θᵢ = rope_theta^(−2i/d). Attention is
//! `scaled_dot_product_attention` with grouped-query heads (Ainslie et al. 2023).
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use tch::{Device, Kind, Tensor};

use super::config::ModelConfig;
use super::error::{LlmError, Result};
use super::linear::{Linear, LoraSwitch};
use super::config::LoraConfig;

/// RMSNorm weight `[H]`.
#[derive(Debug)]
pub struct RmsNorm {
    pub weight: Tensor,
    pub eps: f64,
}

impl RmsNorm {
    /// HF `LlamaRMSNorm`: normalise in f32, cast back, then scale.
    pub fn forward(&self, x: &Tensor) -> Tensor {
        let k = x.kind();
        let xf = if k == Kind::Float { x.shallow_clone() } else { x.to_kind(Kind::Float) };
        let var = xf.square().mean_dim(-1, true, Kind::Float); // [..., 1]
        let y = xf * (var + self.eps).rsqrt();
        &self.weight * y.to_kind(k)
    }
}

/// Self-attention projections of one layer.
#[derive(Debug)]
pub struct Attention {
    pub q_proj: Linear,
    pub k_proj: Linear,
    pub v_proj: Linear,
    pub o_proj: Linear,
    n_heads: i64,
    n_kv: i64,
    head_dim: i64,
}

/// SwiGLU MLP (Shazeer 2020): `down(silu(gate(x)) ⊙ up(x))`.
#[derive(Debug)]
pub struct Mlp {
    pub gate_proj: Linear,
    pub up_proj: Linear,
    pub down_proj: Linear,
}

impl Mlp {
    pub fn forward(&self, x: &Tensor) -> Tensor {
        self.down_proj.forward(&(self.gate_proj.forward(x).silu() * self.up_proj.forward(x)))
    }
}

/// Per-forward context shared by all layers: RoPE tables and the attention
/// mask, built once by [`Model::layer_ctx`].
#[derive(Debug)]
pub struct LayerCtx {
    /// `[B, 1, T, D]` in the model's dtype.
    pub cos: Tensor,
    pub sin: Tensor,
    /// `[B, 1, T, S]` bool (true = may attend) or `None` with `is_causal`.
    pub mask: Option<Tensor>,
    /// No mask, no past: plain causal attention (fast path).
    pub is_causal: bool,
}

/// One transformer block (`model.layers.N`).
#[derive(Debug)]
pub struct DecoderLayer {
    pub index: usize,
    pub input_layernorm: RmsNorm,
    pub self_attn: Attention,
    pub post_attention_layernorm: RmsNorm,
    pub mlp: Mlp,
}

fn rotate_half(x: &Tensor) -> Tensor {
    let d = x.size()[x.dim() - 1];
    let x1 = x.narrow(-1, 0, d / 2);
    let x2 = x.narrow(-1, d / 2, d / 2);
    Tensor::cat(&[x2.neg(), x1], -1)
}

impl DecoderLayer {
    /// `h: [B, T, H]` → `[B, T, H]`. With a cache, this layer's keys/values
    /// are appended to it and attention covers past + new tokens.
    pub fn forward(&self, h: &Tensor, ctx: &LayerCtx, cache: Option<&mut KvCache>) -> Tensor {
        let n = self.input_layernorm.forward(h);
        let a = self.attention(&n, ctx, cache);
        let h = h + a;
        let m = self.post_attention_layernorm.forward(&h);
        h + self.mlp.forward(&m)
    }

    /// Layer `i` over a batch whose rows continue shared prefixes: `hp:
    /// [P, Tp, H]` are the prefixes (right-padded, causal among themselves),
    /// `hc: [N, Tc, H]` the continuations, row r continuing prefix
    /// `row_prefix[r]`. A continuation attends to its prefix's keys/values
    /// (gathered, so gradients from all G rows sum into the one prefix) and
    /// causally to its own; `ctx_c.mask: [N, 1, Tc, Tp + Tc]` says which.
    /// The same function as [`DecoderLayer::forward`] on `prefix ++ row`
    /// rows, with each prefix computed once instead of once per row (GRPO:
    /// G completions of one prompt).
    pub fn forward_shared_prefix(
        &self,
        hp: &Tensor,
        ctx_p: &LayerCtx,
        hc: &Tensor,
        ctx_c: &LayerCtx,
        row_prefix: &Tensor,
    ) -> (Tensor, Tensor) {
        let np = self.input_layernorm.forward(hp);
        let (qp, kp, vp) = self.qkv(&np, ctx_p);
        let ap = self.attend(&qp, &kp, &vp, None, true);
        let nc = self.input_layernorm.forward(hc);
        let (qc, kc, vc) = self.qkv(&nc, ctx_c);
        let k = Tensor::cat(&[kp.index_select(0, row_prefix), kc], 2); // [N, Hkv, Tp + Tc, D]
        let v = Tensor::cat(&[vp.index_select(0, row_prefix), vc], 2);
        let ac = self.attend(&qc, &k, &v, ctx_c.mask.as_ref(), false);
        let hp = hp + ap;
        let hc = hc + ac;
        let mp = self.mlp.forward(&self.post_attention_layernorm.forward(&hp));
        let mc = self.mlp.forward(&self.post_attention_layernorm.forward(&hc));
        (hp + mp, hc + mc)
    }

    /// Projected, RoPE-rotated queries `[B, Hq, T, D]`, keys and values `[B, Hkv, T, D]`.
    fn qkv(&self, x: &Tensor, ctx: &LayerCtx) -> (Tensor, Tensor, Tensor) {
        let at = &self.self_attn;
        let (b, t) = (x.size()[0], x.size()[1]);
        let q = at.q_proj.forward(x).view([b, t, at.n_heads, at.head_dim]).transpose(1, 2);
        let k = at.k_proj.forward(x).view([b, t, at.n_kv, at.head_dim]).transpose(1, 2);
        let v = at.v_proj.forward(x).view([b, t, at.n_kv, at.head_dim]).transpose(1, 2);
        let q = &q * &ctx.cos + rotate_half(&q) * &ctx.sin;
        let k = &k * &ctx.cos + rotate_half(&k) * &ctx.sin;
        (q, k, v)
    }

    /// Scaled dot-product attention of `q` over `k, v` (GQA by SDPA's
    /// `enable_gqa`), then `o_proj`: `[B, T, H]`.
    fn attend(&self, q: &Tensor, k: &Tensor, v: &Tensor, mask: Option<&Tensor>, is_causal: bool) -> Tensor {
        let at = &self.self_attn;
        let (b, t) = (q.size()[0], q.size()[2]);
        let g = at.n_heads / at.n_kv;
        let o = Tensor::scaled_dot_product_attention(q, k, v, mask, 0.0, is_causal && t > 1, None, g > 1); // [B, Hq, T, D]
        at.o_proj.forward(&o.transpose(1, 2).reshape([b, t, at.n_heads * at.head_dim]))
    }

    fn attention(&self, x: &Tensor, ctx: &LayerCtx, cache: Option<&mut KvCache>) -> Tensor {
        let at = &self.self_attn;
        let (b, t) = (x.size()[0], x.size()[1]);
        let (q, k, v) = self.qkv(x, ctx);
        let (k, v) = match cache {
            Some(c) => c.append(self.index, &k, &v), // [B, Hkv, S, D]
            None => (k, v),
        };
        let g = at.n_heads / at.n_kv;
        if t == 1 && g > 1 {
            // Decode step with GQA: the G query heads sharing a KV head
            // (head h uses KV head h / G, HF's repeat_kv order) become G
            // query rows of that KV head, so K/V are never repeated — the
            // masked SDPA path would otherwise copy the whole cache G times
            // per layer and step. A [B, 1, 1, S] mask broadcasts over the rows.
            let qg = q.view([b, at.n_kv, g, at.head_dim]); // [B, Hkv, G, D]
            let o = Tensor::scaled_dot_product_attention(&qg, &k, &v, ctx.mask.as_ref(), 0.0, false, None, false)
                .view([b, at.n_heads, 1, at.head_dim]); // [B, Hq, 1, D]
            at.o_proj.forward(&o.transpose(1, 2).reshape([b, t, at.n_heads * at.head_dim]))
        } else {
            self.attend(&q, &k, &v, ctx.mask.as_ref(), ctx.is_causal)
        }
    }
}

/// Preallocated key/value cache: per layer `[B, Hkv, capacity, D]`, filled
/// left to right. Rows can be dropped, reordered or repeated
/// ([`KvCache::select_rows`]) — how generation shares one prompt prefill
/// among the G samples of a group and drops finished rows.
#[derive(Debug)]
pub struct KvCache {
    k: Vec<Tensor>,
    v: Vec<Tensor>,
    lens: Vec<i64>,
    capacity: i64,
}

impl KvCache {
    /// An empty cache for `batch` rows and up to `capacity` positions.
    pub fn new(model: &Model, batch: i64, capacity: i64) -> Self {
        let c = &model.cfg;
        let shape = [batch, c.num_kv_heads(), capacity, c.head_dim()];
        let opts = (model.kind, model.device);
        let n = c.num_hidden_layers as usize;
        KvCache {
            k: (0..n).map(|_| Tensor::zeros(shape, opts)).collect(),
            v: (0..n).map(|_| Tensor::zeros(shape, opts)).collect(),
            lens: vec![0; n],
            capacity,
        }
    }

    /// Positions stored (in layer 0; all layers agree after a full forward).
    pub fn len(&self) -> i64 {
        self.lens.first().copied().unwrap_or(0)
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    pub fn capacity(&self) -> i64 {
        self.capacity
    }
    pub fn batch_size(&self) -> i64 {
        self.k.first().map(|t| t.size()[0]).unwrap_or(0)
    }

    /// Keeps rows `idx` (i64 `[N]`, may repeat or reorder) of every layer.
    pub fn select_rows(&mut self, idx: &Tensor) {
        let idx = idx.to_device(self.k.first().map(|t| t.device()).unwrap_or(Device::Cpu));
        for t in self.k.iter_mut().chain(self.v.iter_mut()) {
            *t = t.index_select(0, &idx);
        }
    }

    /// Appends `k, v: [B, Hkv, T, D]` to `layer`; returns views of all
    /// stored positions `[B, Hkv, len, D]`.
    fn append(&mut self, layer: usize, k: &Tensor, v: &Tensor) -> (Tensor, Tensor) {
        let t = k.size()[2];
        let start = self.lens[layer];
        assert!(start + t <= self.capacity, "KvCache capacity {} exceeded ({} + {t}); Model::forward checks this", self.capacity, start);
        self.k[layer].narrow(2, start, t).copy_(k);
        self.v[layer].narrow(2, start, t).copy_(v);
        self.lens[layer] = start + t;
        (self.k[layer].narrow(2, 0, start + t), self.v[layer].narrow(2, 0, start + t))
    }
}

/// A Llama / Qwen2 causal LM. See the module docs for the math.
#[derive(Debug)]
pub struct Model {
    pub(super) cfg: ModelConfig,
    pub(super) device: Device,
    pub(super) kind: Kind,
    /// `model.embed_tokens.weight`: `[V, H]`.
    pub embed_tokens: Tensor,
    pub layers: Vec<DecoderLayer>,
    /// `model.norm`.
    pub norm: RmsNorm,
    /// `lm_head` (`None` when `tie_word_embeddings`: logits use `embed_tokens`).
    pub lm_head_linear: Option<Linear>,
    pub(super) inv_freq: Tensor,
    pub(super) switch: LoraSwitch,
    pub(super) lora: Option<LoraConfig>,
    pub(super) source_dir: Option<PathBuf>,
}

impl Model {
    /// Builds a model from HF-named tensors (already on `device`/`kind`).
    /// `origin` names the checkpoint in errors.
    pub fn from_tensors(
        cfg: ModelConfig,
        mut map: HashMap<String, Tensor>,
        device: Device,
        kind: Kind,
        origin: &Path,
    ) -> Result<Model> {
        if !matches!(kind, Kind::Float | Kind::BFloat16 | Kind::Half) {
            return Err(LlmError::Invalid(format!("unsupported model dtype {kind:?} (f32, bf16, f16)")));
        }
        let werr = |msg: String| LlmError::Weights { path: origin.into(), msg };
        let mut take = |name: &str, shape: &[i64]| -> Result<Tensor> {
            let t = map.remove(name).ok_or_else(|| werr(format!("missing tensor `{name}`")))?;
            if t.size() != shape {
                return Err(werr(format!("tensor `{name}` has shape {:?}, config.json implies {shape:?}", t.size())));
            }
            Ok(t)
        };
        let switch = LoraSwitch::new();
        let (h, i, v) = (cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size);
        let (nh, nkv, hd) = (cfg.num_attention_heads, cfg.num_kv_heads(), cfg.head_dim());
        let (qkv_b, o_b, mlp_b) = cfg.biases();
        let embed_tokens = take("model.embed_tokens.weight", &[v, h])?;
        let mut layers = Vec::new();
        for l in 0..cfg.num_hidden_layers {
            let p = format!("model.layers.{l}");
            let mut lin = |name: &str, out: i64, inp: i64, bias: bool| -> Result<Linear> {
                let w = take(&format!("{p}.{name}.weight"), &[out, inp])?;
                let b = if bias { Some(take(&format!("{p}.{name}.bias"), &[out])?) } else { None };
                Ok(Linear::new(w, b, switch.clone()))
            };
            let self_attn = Attention {
                q_proj: lin("self_attn.q_proj", nh * hd, h, qkv_b)?,
                k_proj: lin("self_attn.k_proj", nkv * hd, h, qkv_b)?,
                v_proj: lin("self_attn.v_proj", nkv * hd, h, qkv_b)?,
                o_proj: lin("self_attn.o_proj", h, nh * hd, o_b)?,
                n_heads: nh,
                n_kv: nkv,
                head_dim: hd,
            };
            let mlp = Mlp {
                gate_proj: lin("mlp.gate_proj", i, h, mlp_b)?,
                up_proj: lin("mlp.up_proj", i, h, mlp_b)?,
                down_proj: lin("mlp.down_proj", h, i, mlp_b)?,
            };
            let input_layernorm = RmsNorm { weight: take(&format!("{p}.input_layernorm.weight"), &[h])?, eps: cfg.rms_norm_eps };
            let post_attention_layernorm =
                RmsNorm { weight: take(&format!("{p}.post_attention_layernorm.weight"), &[h])?, eps: cfg.rms_norm_eps };
            layers.push(DecoderLayer { index: l as usize, input_layernorm, self_attn, post_attention_layernorm, mlp });
        }
        let norm = RmsNorm { weight: take("model.norm.weight", &[h])?, eps: cfg.rms_norm_eps };
        let lm_head_linear = if cfg.tie_word_embeddings {
            // Tied checkpoints may still store a copy; the embedding wins, as in HF.
            map.remove("lm_head.weight");
            None
        } else {
            Some(Linear::new(take("lm_head.weight", &[v, h])?, None, switch.clone()))
        };
        if let Some(extra) = map.keys().min() {
            return Err(werr(format!(
                "unexpected tensor `{extra}` ({} unexpected in all) for a {} config",
                map.len(),
                cfg.model_type
            )));
        }
        // θᵢ = base^(−2i/d), computed in f32 exactly as HF's default RoPE init.
        let exps = Tensor::arange_start_step(0, hd, 2, (Kind::Int64, device)).to_kind(Kind::Float) / hd as f64;
        let inv_freq = Tensor::f_pow_scalar(cfg.rope_theta, &exps)?.reciprocal(); // [D/2] f32
        Ok(Model { cfg, device, kind, embed_tokens, layers, norm, lm_head_linear, inv_freq, switch, lora: None, source_dir: None })
    }

    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }
    pub fn device(&self) -> Device {
        self.device
    }
    pub fn kind(&self) -> Kind {
        self.kind
    }
    /// The layers, for layer-wise forward passes (gradient checkpointing,
    /// chunked log-probs): `h = embed(ids)`; `ctx = layer_ctx(...)`;
    /// `for l in layers() { h = l.forward(&h, &ctx, None) }`; `lm_head(&final_hidden(&h))`.
    pub fn layers(&self) -> &[DecoderLayer] {
        &self.layers
    }

    /// Token embeddings: `ids: [B, T] i64 → [B, T, H]`.
    pub fn embed(&self, ids: &Tensor) -> Tensor {
        Tensor::embedding(&self.embed_tokens, ids, -1, false, false)
    }

    /// Final RMSNorm (`model.norm`).
    pub fn final_hidden(&self, h: &Tensor) -> Tensor {
        self.norm.forward(h)
    }

    /// `[..., H] → [..., V]` logits in the model's dtype.
    pub fn lm_head(&self, h: &Tensor) -> Tensor {
        match &self.lm_head_linear {
            Some(l) => l.forward(h),
            None => h.linear::<&Tensor>(&self.embed_tokens, None),
        }
    }

    /// The head's weight `W: [V, H]` (the embedding when tied) when the head
    /// is exactly `h Wᵀ` — no bias, no adapter — so its backward can be
    /// written by hand (`train::logprobs`); `None` otherwise.
    pub fn lm_head_weight(&self) -> Option<&Tensor> {
        match &self.lm_head_linear {
            None => Some(&self.embed_tokens),
            Some(l) if l.bias.is_none() && l.lora.is_none() => Some(&l.weight),
            Some(_) => None,
        }
    }

    /// Builds the per-forward layer context.
    ///
    /// * `position_ids: [B, T]` — RoPE positions of the new tokens (for left
    ///   padding: `cumsum(mask) − 1`, see [`position_ids_from_mask`]).
    /// * `attn_mask: [B, past + T]` (1/true = real token, 0 = padding) over
    ///   all key positions, HF's `attention_mask` convention; `None` = no padding.
    /// * `past`: tokens already in the cache.
    ///
    /// Causality is by cache index; a padding query attends only to itself
    /// (its output is never used) so no softmax row is empty.
    pub fn layer_ctx(&self, position_ids: &Tensor, attn_mask: Option<&Tensor>, past: i64) -> Result<LayerCtx> {
        let sz = position_ids.size();
        if sz.len() != 2 {
            return Err(LlmError::Invalid(format!("position_ids must be [B, T], got {sz:?}")));
        }
        let (b, t) = (sz[0], sz[1]);
        let s = past + t;
        if s > self.cfg.max_position_embeddings {
            return Err(LlmError::ContextLength { len: s, max: self.cfg.max_position_embeddings });
        }
        // freqs = pos ⊗ θ  [B, T, D/2]; emb = [freqs, freqs]  [B, T, D]
        let pos = position_ids.to_device(self.device).to_kind(Kind::Float);
        let freqs = pos.unsqueeze(-1) * self.inv_freq.view([1, 1, -1]);
        let emb = Tensor::cat(&[&freqs, &freqs], -1);
        let cos = emb.cos().to_kind(self.kind).unsqueeze(1); // [B, 1, T, D]
        let sin = emb.sin().to_kind(self.kind).unsqueeze(1);
        let mask = match attn_mask {
            None if past == 0 || t == 1 => None,
            m => {
                let am = match m {
                    Some(m) => {
                        if m.size() != [b, s] {
                            return Err(LlmError::Invalid(format!(
                                "attn_mask must be [B, past + T] = [{b}, {s}], got {:?}",
                                m.size()
                            )));
                        }
                        m.to_device(self.device).to_kind(Kind::Bool)
                    }
                    None => Tensor::ones([b, s], (Kind::Bool, self.device)),
                };
                // causal[i, j] = j ≤ past + i  [T, S]
                let qi = Tensor::arange_start(past, s, (Kind::Int64, self.device)).view([t, 1]);
                let kj = Tensor::arange(s, (Kind::Int64, self.device)).view([1, s]);
                let causal = kj.le_tensor(&qi);
                let diag = kj.eq_tensor(&qi); // [T, S]
                let m4 = causal.unsqueeze(0).logical_and(&am.unsqueeze(1)).logical_or(&diag.unsqueeze(0)); // [B, T, S]
                Some(m4.unsqueeze(1)) // [B, 1, T, S]
            }
        };
        let is_causal = mask.is_none() && past == 0;
        Ok(LayerCtx { cos, sin, mask, is_causal })
    }

    /// Full forward: `input_ids: [B, T] i64`, `position_ids: [B, T]`,
    /// optional padding mask `[B, past + T]`, optional cache (appended to).
    /// Returns logits `[B, T, V]` in the model's dtype. Fails on shape
    /// mismatches and when `past + T` exceeds `max_position_embeddings`.
    pub fn forward(
        &self,
        input_ids: &Tensor,
        position_ids: &Tensor,
        attn_mask: Option<&Tensor>,
        cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        let h = self.hidden_states(input_ids, position_ids, attn_mask, cache)?;
        Ok(self.lm_head(&h))
    }

    /// Like [`Model::forward`] but stops before `lm_head`: the final-normed
    /// hidden states `[B, T, H]` (apply `lm_head` to the rows you need).
    pub fn hidden_states(
        &self,
        input_ids: &Tensor,
        position_ids: &Tensor,
        attn_mask: Option<&Tensor>,
        mut cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        if input_ids.size() != position_ids.size() || input_ids.dim() != 2 {
            return Err(LlmError::Invalid(format!(
                "input_ids {:?} and position_ids {:?} must both be [B, T]",
                input_ids.size(),
                position_ids.size()
            )));
        }
        let past = cache.as_ref().map(|c| c.len()).unwrap_or(0);
        if let Some(c) = cache.as_ref() {
            let t = input_ids.size()[1];
            if c.batch_size() != input_ids.size()[0] {
                return Err(LlmError::Invalid(format!("cache holds {} rows, batch has {}", c.batch_size(), input_ids.size()[0])));
            }
            if past + t > c.capacity() {
                return Err(LlmError::Invalid(format!("KV cache capacity {} too small for {past} + {t} tokens", c.capacity())));
            }
        }
        let ctx = self.layer_ctx(position_ids, attn_mask, past)?;
        let mut h = self.embed(&input_ids.to_device(self.device));
        for l in &self.layers {
            h = l.forward(&h, &ctx, cache.as_deref_mut());
        }
        Ok(self.final_hidden(&h))
    }

    /// All parameters with HF names (`model.layers.0.self_attn.q_proj.weight`),
    /// sharing storage with the model (setting `requires_grad` on them or
    /// updating them in place changes the model). A tied `lm_head` is not
    /// listed (HF's saved state dict omits it too). LoRA adapters are not
    /// included: see [`Model::lora_parameters`].
    pub fn named_parameters(&self) -> Vec<(String, Tensor)> {
        let mut v = vec![("model.embed_tokens.weight".to_string(), self.embed_tokens.shallow_clone())];
        for l in &self.layers {
            let p = format!("model.layers.{}", l.index);
            for (name, lin) in l.linears() {
                v.push((format!("{p}.{name}.weight"), lin.weight.shallow_clone()));
                if let Some(b) = &lin.bias {
                    v.push((format!("{p}.{name}.bias"), b.shallow_clone()));
                }
            }
            v.push((format!("{p}.input_layernorm.weight"), l.input_layernorm.weight.shallow_clone()));
            v.push((format!("{p}.post_attention_layernorm.weight"), l.post_attention_layernorm.weight.shallow_clone()));
        }
        v.push(("model.norm.weight".to_string(), self.norm.weight.shallow_clone()));
        if let Some(l) = &self.lm_head_linear {
            v.push(("lm_head.weight".to_string(), l.weight.shallow_clone()));
        }
        v
    }

}

impl DecoderLayer {
    /// `(HF sub-name, layer)` of the seven linear layers.
    pub fn linears(&self) -> [(&'static str, &Linear); 7] {
        let (a, m) = (&self.self_attn, &self.mlp);
        [
            ("self_attn.q_proj", &a.q_proj),
            ("self_attn.k_proj", &a.k_proj),
            ("self_attn.v_proj", &a.v_proj),
            ("self_attn.o_proj", &a.o_proj),
            ("mlp.gate_proj", &m.gate_proj),
            ("mlp.up_proj", &m.up_proj),
            ("mlp.down_proj", &m.down_proj),
        ]
    }
    pub fn linears_mut(&mut self) -> [(&'static str, &mut Linear); 7] {
        let (a, m) = (&mut self.self_attn, &mut self.mlp);
        [
            ("self_attn.q_proj", &mut a.q_proj),
            ("self_attn.k_proj", &mut a.k_proj),
            ("self_attn.v_proj", &mut a.v_proj),
            ("self_attn.o_proj", &mut a.o_proj),
            ("mlp.gate_proj", &mut m.gate_proj),
            ("mlp.up_proj", &mut m.up_proj),
            ("mlp.down_proj", &mut m.down_proj),
        ]
    }
}

/// HF's position ids for a left-padded batch: `cumsum(mask) − 1`, padding
/// positions set to 1 (their value is irrelevant). `mask: [B, T]` → `[B, T]` i64.
pub fn position_ids_from_mask(mask: &Tensor) -> Tensor {
    let m = mask.to_kind(Kind::Int64);
    let pos = m.cumsum(-1, Kind::Int64) - 1;
    pos.masked_fill(&m.eq(0), 1)
}
