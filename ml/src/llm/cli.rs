//! The worker's `model ...` and `doctor` commands (the `recflow` runner
//! forwards them to `recflow-worker`).
//!
//! ```text
//! model import SRC OUT_DIR
//! model generate --model DIR (--prompt TEXT | --prompts-file F.json) [--chat] [--max-new-tokens N] [--min-new-tokens N]
//!                [--temperature T] [--top-p P] [--top-k K] [--seed S] [--num-samples G] [--json]
//!                [--max-batch-rows N] [--threads N] [--timing] [--device D] [--dtype T]
//! model score --model DIR (--text TEXT | --token-ids 1,2,3) [--json] [--device D] [--dtype T]
//! doctor [--json]
//! ```
//! Exit codes: 0 success, 1 failure, 2 bad arguments or input.
use std::path::PathBuf;

use clap::{Parser, Subcommand};

use super::generate::{generate, token_logprobs, GenConfig, GenRequest};
use super::{parse_device, parse_kind, ChatMessage, LlmError, Model, Tokenizer};

#[derive(Parser, Debug)]
#[command(name = "recflow-worker model", about = "Import, sample from and score language models")]
struct ModelCli {
    #[command(subcommand)]
    cmd: ModelCmd,
}

#[derive(clap::Args, Debug, Clone)]
struct Placement {
    /// cpu, cuda, cuda:N or auto.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// f32, bf16 or f16.
    #[arg(long, default_value = "f32")]
    dtype: String,
}

#[derive(Subcommand, Debug)]
enum ModelCmd {
    /// Convert a GGUF file or copy+validate an HF directory into OUT_DIR (HF layout).
    Import { src: PathBuf, out_dir: PathBuf },
    /// Sample continuations of a prompt.
    Generate {
        #[arg(long)]
        model: PathBuf,
        /// The prompt (or use --prompts-file).
        #[arg(long, required_unless_present = "prompts_file", conflicts_with = "prompts_file")]
        prompt: Option<String>,
        /// JSON array of prompts: strings, or arrays of token ids (used as is).
        /// All are generated in one batched call; output lists them in order.
        #[arg(long)]
        prompts_file: Option<PathBuf>,
        /// Rows decoded together (requests chunked to fit; 0 = no limit).
        #[arg(long, default_value_t = 64)]
        max_batch_rows: usize,
        /// libtorch intra-op threads (default: libtorch's choice / OMP_NUM_THREADS).
        #[arg(long)]
        threads: Option<i32>,
        /// Print generation time and tokens/s to stderr as JSON.
        #[arg(long)]
        timing: bool,
        /// Wrap the prompt as one user message in the model's chat template.
        #[arg(long)]
        chat: bool,
        #[arg(long, default_value_t = 128)]
        max_new_tokens: usize,
        #[arg(long, default_value_t = 0)]
        min_new_tokens: usize,
        /// 0 = greedy.
        #[arg(long, default_value_t = 0.0)]
        temperature: f64,
        #[arg(long, default_value_t = 1.0)]
        top_p: f64,
        #[arg(long, default_value_t = 0)]
        top_k: i64,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        #[arg(long, default_value_t = 1)]
        num_samples: usize,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        place: Placement,
    },
    /// Per-token log-probabilities of a text or token sequence.
    Score {
        #[arg(long)]
        model: PathBuf,
        #[arg(long, conflicts_with = "token_ids", required_unless_present = "token_ids")]
        text: Option<String>,
        /// Comma-separated ids.
        #[arg(long, value_delimiter = ',')]
        token_ids: Option<Vec<i64>>,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        place: Placement,
    },
}

/// Runs `model ARGS...` (args after `model`). Returns the exit code.
pub fn model_main(args: &[String]) -> i32 {
    let cli = match ModelCli::try_parse_from(std::iter::once("model".to_string()).chain(args.iter().cloned())) {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() { 2 } else { 0 };
            let _ = e.print();
            return code;
        }
    };
    match run_model(cli.cmd) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("error: {e:#}");
            match e.downcast_ref::<LlmError>() {
                Some(LlmError::Invalid(_) | LlmError::Config { .. } | LlmError::ContextLength { .. }) => 2,
                _ => 1,
            }
        }
    }
}

fn run_model(cmd: ModelCmd) -> anyhow::Result<()> {
    match cmd {
        ModelCmd::Import { src, out_dir } => {
            let s = super::import::import_model(&src, &out_dir)?;
            println!("{}", serde_json::to_string(&s)?);
        }
        ModelCmd::Generate {
            model,
            prompt,
            prompts_file,
            max_batch_rows,
            threads,
            timing,
            chat,
            max_new_tokens,
            min_new_tokens,
            temperature,
            top_p,
            top_k,
            seed,
            num_samples,
            json,
            place,
        } => {
            if let Some(n) = threads {
                tch::set_num_threads(n);
            }
            let tok = Tokenizer::load(&model)?;
            let m = Model::load(&model, parse_device(&place.device)?, parse_kind(&place.dtype)?)?;
            let prompts: Vec<serde_json::Value> = match (&prompt, &prompts_file) {
                (Some(p), _) => vec![serde_json::Value::String(p.clone())],
                (None, Some(f)) => {
                    let text = std::fs::read_to_string(f).map_err(|e| anyhow::anyhow!("cannot read {}: {e}", f.display()))?;
                    serde_json::from_str(&text)
                        .map_err(|e| LlmError::Invalid(format!("{}: expected a JSON array of prompts: {e}", f.display())))?
                }
                (None, None) => anyhow::bail!(LlmError::Invalid("give --prompt or --prompts-file".into())),
            };
            let mut reqs = Vec::new();
            for (i, p) in prompts.iter().enumerate() {
                let ids = match p {
                    serde_json::Value::String(p) if chat => {
                        let text = tok.apply_chat_template(&[ChatMessage::new("user", p)], true)?;
                        tok.encode(&text, false)?
                    }
                    serde_json::Value::String(p) => tok.encode(p, true)?,
                    serde_json::Value::Array(a) => a
                        .iter()
                        .map(|x| x.as_i64().ok_or_else(|| LlmError::Invalid(format!("prompt {i}: token ids must be integers"))))
                        .collect::<Result<Vec<i64>, _>>()?,
                    _ => anyhow::bail!(LlmError::Invalid(format!("prompt {i}: a string or an array of token ids"))),
                };
                reqs.push(GenRequest::new(ids, num_samples, i as u64));
            }
            let cfg = GenConfig {
                max_new_tokens,
                min_new_tokens,
                temperature,
                top_p,
                top_k,
                stop_ids: tok.stop_token_ids(),
                pad_id: tok.pad_token_id().unwrap_or(0),
                seed,
                max_batch_rows,
            };
            let t0 = std::time::Instant::now();
            let out = generate(&m, &reqs, &cfg)?;
            let secs = t0.elapsed().as_secs_f64();
            let n_tok: usize = out.iter().flatten().map(|o| o.token_ids.len()).sum();
            if timing {
                eprintln!("{}", serde_json::json!({"generated_tokens": n_tok, "seconds": secs, "tokens_per_s": n_tok as f64 / secs,
                    "threads": tch::get_num_threads()}));
            }
            let mut all = Vec::new();
            for (req, outs) in reqs.iter().zip(&out) {
                let mut samples = Vec::new();
                for o in outs {
                    let text = tok.decode(&o.token_ids, true)?;
                    if json {
                        samples.push(serde_json::json!({
                            "text": text, "token_ids": o.token_ids, "logprobs": o.logprobs, "finish_reason": o.finish,
                        }));
                    } else {
                        println!("{text}");
                        if num_samples > 1 || reqs.len() > 1 {
                            println!("---");
                        }
                    }
                }
                all.push(serde_json::json!({"prompt_token_ids": req.prompt_ids, "samples": samples}));
            }
            if json {
                if prompt.is_some() {
                    println!("{}", all.pop().unwrap_or_default());
                } else {
                    println!("{}", serde_json::Value::Array(all));
                }
            }
        }
        ModelCmd::Score { model, text, token_ids, json, place } => {
            let ids = match (text, token_ids) {
                (Some(t), _) => Tokenizer::load(&model)?.encode(&t, true)?,
                (None, Some(ids)) => ids,
                (None, None) => anyhow::bail!(LlmError::Invalid("give --text or --token-ids".into())),
            };
            let m = Model::load(&model, parse_device(&place.device)?, parse_kind(&place.dtype)?)?;
            let v = m.config().vocab_size;
            if let Some(bad) = ids.iter().find(|&&i| i < 0 || i >= v) {
                anyhow::bail!(LlmError::Invalid(format!("token id {bad} outside the vocabulary (0..{v})")));
            }
            let lp = token_logprobs(&m, &ids)?;
            let lps: Vec<Option<f32>> = if ids.is_empty() { vec![] } else { std::iter::once(None).chain(lp.into_iter().map(Some)).collect() };
            if json {
                println!("{}", serde_json::json!({"tokens": ids, "logprobs": lps}));
            } else {
                for (t, l) in ids.iter().zip(&lps) {
                    println!("{t}\t{}", l.map(|x| x.to_string()).unwrap_or_else(|| "-".into()));
                }
            }
        }
    }
    Ok(())
}

/// `doctor [--json]`: libtorch version and path, CUDA availability,
/// devices, thread count, the numerics profile in force. Exit 1 when
/// libtorch cannot be identified or the requested profile is not in force.
pub fn doctor_main(args: &[String]) -> i32 {
    let json = args.iter().any(|a| a == "--json");
    // Touch libtorch so it is mapped, then inspect.
    let threads = tch::get_num_threads();
    let cuda = tch::Cuda::is_available();
    let n = tch::Cuda::device_count();
    let cudnn = tch::Cuda::cudnn_is_available();
    let info = crate::numerics::libtorch_info();
    let torch_cuda_linked = std::fs::read_to_string("/proc/self/maps").map(|m| m.contains("libtorch_cuda")).unwrap_or(false);
    let (path, ver) = info.clone().map(|(p, v)| (p.display().to_string(), v)).unwrap_or_default();
    let devices: Vec<String> = std::iter::once("cpu".to_string()).chain((0..n).map(|i| format!("cuda:{i}"))).collect();
    let (numerics, numerics_error) = match crate::numerics::check() {
        Ok((_, p)) => (p, None),
        Err(e) => (crate::numerics::observe(None), Some(e)),
    };
    // Data parallelism (c10d process groups) this worker was built with.
    let (gloo, nccl) = crate::dist::built_backends();
    if json {
        println!(
            "{}",
            serde_json::json!({"libtorch_version": ver, "libtorch_path": path, "cuda_available": cuda,
                "cuda_device_count": n, "cudnn_available": cudnn, "torch_cuda_linked": torch_cuda_linked,
                "devices": devices, "threads": threads, "numerics": numerics, "numerics_error": numerics_error,
                "collectives": {"gloo": gloo, "nccl": nccl}})
        );
    } else {
        println!("libtorch: {ver} ({path})");
        println!("CUDA available: {cuda} ({n} devices; cuDNN {cudnn}; libtorch_cuda linked: {torch_cuda_linked})");
        println!("devices: {}", devices.join(", "));
        println!("threads: {threads} (OMP_NUM_THREADS / torch.set_num_threads)");
        println!(
            "numerics in force: {} (requested: {})",
            numerics.summary(),
            if numerics.requested.is_empty() { "nothing; RECFLOW_NUMERICS unset" } else { numerics.requested.as_str() }
        );
        println!("data-parallel collectives (c10d): gloo {gloo}, nccl {nccl}");
    }
    if let Some(e) = &numerics_error {
        eprintln!("error: {e}");
        return 1;
    }
    if info.is_none() {
        eprintln!("error: libtorch was not found in this process; reinstall with scripts/setup.sh (torch==2.11.0 in .venv)");
        return 1;
    }
    if !cuda && std::path::Path::new("/dev/nvidiactl").exists() {
        eprintln!(
            "warning: an NVIDIA device node exists but libtorch sees no CUDA device{}",
            if torch_cuda_linked { " (check the driver / CUDA_VISIBLE_DEVICES)" } else { " (libtorch_cuda is not linked: rebuild with the CUDA wheel of torch)" }
        );
    }
    0
}
