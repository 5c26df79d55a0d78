//! Run functions of the `model_init` and `model_import` stages (their
//! metadata lives in `recflow::stages::{model_init, model_import}`).
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::Context;
use rand::{Rng, SeedableRng};
use recflow::stages::model_import::Config as ImportConfig;
use recflow::stages::model_init::Config as InitConfig;
use recflow::stages::{Metrics, StageCtx};
use tch::{Kind, Tensor};

use super::{Model, ModelConfig, Tokenizer};

/// `model_import`: GGUF file or HF dir → `model` output.
pub fn run_model_import(cfg: &ImportConfig, ctx: &mut StageCtx) -> anyhow::Result<Metrics> {
    let out = ctx.output("model")?;
    ctx.log("info", format!("importing {}", cfg.source));
    let s = super::import::import_model(Path::new(&cfg.source), &out)
        .with_context(|| format!("stage `{}`: importing `source: {}`", ctx.stage, cfg.source))?;
    let mut m = Metrics::new();
    m.insert("num_parameters".into(), s.num_parameters.into());
    m.insert("vocab_size".into(), s.vocab_size.into());
    m.insert("num_hidden_layers".into(), s.num_hidden_layers.into());
    m.insert("source_format".into(), s.source_format.into());
    Ok(m)
}

/// Every string of a Parquet table: Utf8 columns and `messages[].content`.
pub fn corpus_texts(path: &Path) -> anyhow::Result<Vec<String>> {
    use arrow::array::{Array, AsArray, StructArray};
    use arrow::datatypes::DataType;
    let f = std::fs::File::open(path).with_context(|| format!("cannot open corpus {}", path.display()))?;
    let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(f)
        .with_context(|| format!("corpus {} is not a Parquet file", path.display()))?
        .build()?;
    let mut texts = Vec::new();
    for batch in reader {
        let batch = batch.with_context(|| format!("reading corpus {}", path.display()))?;
        for col in batch.columns() {
            match col.data_type() {
                DataType::Utf8 => texts.extend(col.as_string::<i32>().iter().flatten().map(String::from)),
                DataType::LargeUtf8 => texts.extend(col.as_string::<i64>().iter().flatten().map(String::from)),
                DataType::List(_) => {
                    let list = col.as_list::<i32>();
                    let vals = list.values();
                    if let Some(st) = vals.as_any().downcast_ref::<StructArray>() {
                        if let Some(c) = st.column_by_name("content") {
                            if c.data_type() == &DataType::Utf8 {
                                texts.extend(c.as_string::<i32>().iter().flatten().map(String::from));
                            }
                        }
                    }
                }
                _ => {}
            }
        }
    }
    Ok(texts)
}

/// Special tokens of initialised models (ids 0, 1, 2).
pub const INIT_SPECIALS: [&str; 3] = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];

/// Trains a byte-level BPE tokenizer on `texts` and writes `tokenizer.json`
/// into `dir`; `extra` are added (non-special) tokens appended after the
/// merges, each kept whole by the pre-tokenizer. Returns the vocabulary size.
pub fn train_bpe(texts: &[String], vocab_size: usize, min_frequency: u64, extra: &[&str], dir: &Path) -> anyhow::Result<usize> {
    use tokenizers::models::bpe::{BpeTrainer, BPE};
    use tokenizers::models::{ModelWrapper, TrainerWrapper};
    use tokenizers::pre_tokenizers::byte_level::ByteLevel;
    use tokenizers::{AddedToken, DecoderWrapper, NormalizerWrapper, PostProcessorWrapper, PreTokenizerWrapper, TokenizerImpl};
    let mut tok: TokenizerImpl<ModelWrapper, NormalizerWrapper, PreTokenizerWrapper, PostProcessorWrapper, DecoderWrapper> =
        TokenizerImpl::new(ModelWrapper::BPE(BPE::default()));
    tok.with_pre_tokenizer(Some(PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, true, true))));
    tok.with_post_processor(Some(PostProcessorWrapper::ByteLevel(ByteLevel::new(false, false, true))));
    tok.with_decoder(Some(DecoderWrapper::ByteLevel(ByteLevel::default())));
    let specials: Vec<AddedToken> = INIT_SPECIALS.iter().map(|s| AddedToken::from(s.to_string(), true)).collect();
    let mut trainer = TrainerWrapper::BpeTrainer(
        BpeTrainer::builder()
            .vocab_size(vocab_size)
            .min_frequency(min_frequency)
            .show_progress(false)
            .special_tokens(specials.clone())
            .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
            .build(),
    );
    tok.train(&mut trainer, texts.iter()).map_err(|e| anyhow::anyhow!("BPE training failed: {e}"))?;
    tok.add_special_tokens(&specials);
    let extra: Vec<AddedToken> = extra.iter().map(|t| AddedToken::from(t.to_string(), false).normalized(false)).collect();
    tok.add_tokens(&extra);
    let path = dir.join("tokenizer.json");
    tok.save(&path, true).map_err(|e| anyhow::anyhow!("cannot write {}: {e}", path.display()))?;
    Ok(tok.get_vocab_size(true))
}

/// N(0, σ²) tensor from a ChaCha stream (Box–Muller), independent of libtorch's RNG.
fn normal(rng: &mut rand_chacha::ChaCha8Rng, shape: &[i64], std: f64) -> Tensor {
    let n: i64 = shape.iter().product();
    let mut v = Vec::with_capacity(n as usize);
    while (v.len() as i64) < n {
        let u1: f64 = 1.0 - rng.random::<f64>(); // (0, 1]
        let u2: f64 = rng.random::<f64>();
        let r = (-2.0 * u1.ln()).sqrt();
        v.push((r * (std::f64::consts::TAU * u2).cos() * std) as f32);
        v.push((r * (std::f64::consts::TAU * u2).sin() * std) as f32);
    }
    v.truncate(n as usize);
    Tensor::from_slice(&v).view(shape)
}

/// Writes a randomly initialised model + trained tokenizer into `out`.
pub fn init_model(cfg: &InitConfig, texts: &[String], seed: u64, out: &Path) -> anyhow::Result<ModelConfig> {
    std::fs::create_dir_all(out)?;
    let mut extra: Vec<String> = Vec::new();
    if cfg.answer_tokens {
        extra.extend(recflow::answer::TAGS.iter().flat_map(|(_, open, close)| [open.to_string(), close.to_string()]));
    }
    if cfg.decimal_tokens {
        extra.extend(recflow::stages::model_init::decimal_tokens());
    }
    let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
    let vocab = train_bpe(texts, cfg.vocab_size, cfg.min_frequency, &extra, out)?;
    let arch = if cfg.architecture == "llama" { "LlamaForCausalLM" } else { "Qwen2ForCausalLM" };
    let mut j = serde_json::json!({
        "architectures": [arch], "model_type": cfg.architecture, "vocab_size": vocab,
        "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers, "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads, "hidden_act": "silu",
        "max_position_embeddings": cfg.max_position_embeddings, "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta, "rope_scaling": null, "tie_word_embeddings": cfg.tie_word_embeddings,
        "initializer_range": cfg.initializer_range, "bos_token_id": null, "eos_token_id": 2, "pad_token_id": 0,
        "torch_dtype": cfg.dtype,
    });
    if cfg.architecture == "qwen2" {
        j["use_sliding_window"] = false.into();
    } else {
        j["attention_bias"] = false.into();
        j["mlp_bias"] = false.into();
    }
    j.as_object_mut().map(|o| o.remove("bos_token_id"));
    let mc = ModelConfig::from_json(j, &out.join("config.json"))?;
    // HF _init_weights: Linear/Embedding ~ N(0, initializer_range²), biases 0, norms 1.
    let names = param_shapes(&mc);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let mut map = HashMap::new();
    for (name, shape) in names {
        let t = if name.ends_with("norm.weight") {
            Tensor::ones(shape.as_slice(), (Kind::Float, tch::Device::Cpu))
        } else if name.ends_with(".bias") {
            Tensor::zeros(shape.as_slice(), (Kind::Float, tch::Device::Cpu))
        } else {
            normal(&mut rng, &shape, cfg.initializer_range)
        };
        map.insert(name, t);
    }
    let kind = if cfg.dtype == "bfloat16" { Kind::BFloat16 } else { Kind::Float };
    let map = map.into_iter().map(|(k, v)| (k, v.to_kind(kind))).collect();
    let model = Model::from_tensors(mc.clone(), map, tch::Device::Cpu, kind, out)?;
    model.save(out)?;
    let tc = serde_json::json!({
        "bos_token": null, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "unk_token": null,
        "chat_template": super::tokenizer::CHATML_TEMPLATE, "clean_up_tokenization_spaces": false,
        "model_max_length": cfg.max_position_embeddings, "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": false,
    });
    std::fs::write(out.join("tokenizer_config.json"), serde_json::to_string_pretty(&tc)?)?;
    std::fs::write(
        out.join("generation_config.json"),
        serde_json::to_string_pretty(&serde_json::json!({"eos_token_id": 2, "pad_token_id": 0}))?,
    )?;
    Tokenizer::load(out)?; // proves the written tokenizer + template load
    Ok(mc)
}

/// HF parameter names and shapes of a config, in a fixed (sorted) order.
pub fn param_shapes(c: &ModelConfig) -> Vec<(String, Vec<i64>)> {
    let (h, i, v) = (c.hidden_size, c.intermediate_size, c.vocab_size);
    let (q, kv) = (c.num_attention_heads * c.head_dim(), c.num_kv_heads() * c.head_dim());
    let (qkvb, ob, mb) = c.biases();
    let mut out = vec![("model.embed_tokens.weight".to_string(), vec![v, h]), ("model.norm.weight".into(), vec![h])];
    if !c.tie_word_embeddings {
        out.push(("lm_head.weight".into(), vec![v, h]));
    }
    for l in 0..c.num_hidden_layers {
        let p = format!("model.layers.{l}");
        for (n, o, inp, b) in [
            ("self_attn.q_proj", q, h, qkvb),
            ("self_attn.k_proj", kv, h, qkvb),
            ("self_attn.v_proj", kv, h, qkvb),
            ("self_attn.o_proj", h, q, ob),
            ("mlp.gate_proj", i, h, mb),
            ("mlp.up_proj", i, h, mb),
            ("mlp.down_proj", h, i, mb),
        ] {
            out.push((format!("{p}.{n}.weight"), vec![o, inp]));
            if b {
                out.push((format!("{p}.{n}.bias"), vec![o]));
            }
        }
        out.push((format!("{p}.input_layernorm.weight"), vec![h]));
        out.push((format!("{p}.post_attention_layernorm.weight"), vec![h]));
    }
    out.sort();
    out
}

/// `model_init`: corpus → random-init model + trained tokenizer.
pub fn run_model_init(cfg: &InitConfig, ctx: &mut StageCtx) -> anyhow::Result<Metrics> {
    let corpus: PathBuf = ctx.input("corpus")?.to_path_buf();
    let texts = corpus_texts(&corpus)?;
    if texts.is_empty() {
        anyhow::bail!("stage `{}`: corpus {} holds no text to train a tokenizer on", ctx.stage, corpus.display());
    }
    ctx.log("info", format!("training a {}-token BPE on {} texts", cfg.vocab_size, texts.len()));
    let out = ctx.output("model")?;
    let mc = init_model(cfg, &texts, ctx.seed, &out)?;
    let mut m = Metrics::new();
    m.insert("num_parameters".into(), mc.num_parameters().into());
    m.insert("vocab_size".into(), mc.vocab_size.into());
    m.insert("corpus_texts".into(), (texts.len() as u64).into());
    Ok(m)
}
