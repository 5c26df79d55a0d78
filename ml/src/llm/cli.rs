//! The worker's `model ...` and `doctor` commands (the `recflow` runner
//! forwards them to `recflow-worker`).
//!
//! ```text
//! model import SRC OUT_DIR
//! model generate --model DIR --prompt TEXT [--chat] [--max-new-tokens N] [--min-new-tokens N]
//!                [--temperature T] [--top-p P] [--top-k K] [--seed S] [--num-samples G] [--json]
//!                [--device D] [--dtype T]
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
        #[arg(long)]
        prompt: String,
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
            let tok = Tokenizer::load(&model)?;
            let m = Model::load(&model, parse_device(&place.device)?, parse_kind(&place.dtype)?)?;
            let ids = if chat {
                let text = tok.apply_chat_template(&[ChatMessage::new("user", &prompt)], true)?;
                tok.encode(&text, false)?
            } else {
                tok.encode(&prompt, true)?
            };
            let cfg = GenConfig {
                max_new_tokens,
                min_new_tokens,
                temperature,
                top_p,
                top_k,
                stop_ids: tok.stop_token_ids(),
                pad_id: tok.pad_token_id().unwrap_or(0),
                seed,
                max_batch_rows: 64,
            };
            let out = generate(&m, &[GenRequest::new(ids.clone(), num_samples, 0)], &cfg)?;
            let mut samples = Vec::new();
            for o in &out[0] {
                let text = tok.decode(&o.token_ids, true)?;
                if json {
                    samples.push(serde_json::json!({
                        "text": text, "token_ids": o.token_ids, "logprobs": o.logprobs, "finish_reason": o.finish,
                    }));
                } else {
                    println!("{text}");
                    if num_samples > 1 {
                        println!("---");
                    }
                }
            }
            if json {
                println!("{}", serde_json::json!({"prompt_token_ids": ids, "samples": samples}));
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

/// The libtorch library this process loaded and its version (PyTorch's
/// `torch/version.py` next to `lib/`), from `/proc/self/maps`.
fn libtorch_info() -> Option<(PathBuf, String)> {
    let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
    let lib = maps.lines().filter_map(|l| l.split_whitespace().nth(5)).find(|p| p.contains("libtorch_cpu"))?;
    let lib = PathBuf::from(lib);
    let root = lib.parent()?.parent()?; // .../torch/lib/libtorch_cpu.so → .../torch
    let ver = std::fs::read_to_string(root.join("version.py"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("__version__"))
                .and_then(|l| l.split(['\'', '"']).nth(1).map(String::from))
        })
        .or_else(|| std::fs::read_to_string(root.join("build-version")).ok().map(|s| s.trim().to_string()))
        .unwrap_or_else(|| "unknown".into());
    Some((lib, ver))
}

/// `doctor [--json]`: libtorch version and path, CUDA availability,
/// devices, thread count. Exit 1 when libtorch cannot be identified.
pub fn doctor_main(args: &[String]) -> i32 {
    let json = args.iter().any(|a| a == "--json");
    // Touch libtorch so it is mapped, then inspect.
    let threads = tch::get_num_threads();
    let cuda = tch::Cuda::is_available();
    let n = tch::Cuda::device_count();
    let cudnn = tch::Cuda::cudnn_is_available();
    let info = libtorch_info();
    let torch_cuda_linked = std::fs::read_to_string("/proc/self/maps").map(|m| m.contains("libtorch_cuda")).unwrap_or(false);
    let (path, ver) = info.clone().map(|(p, v)| (p.display().to_string(), v)).unwrap_or_default();
    let devices: Vec<String> = std::iter::once("cpu".to_string()).chain((0..n).map(|i| format!("cuda:{i}"))).collect();
    if json {
        println!(
            "{}",
            serde_json::json!({"libtorch_version": ver, "libtorch_path": path, "cuda_available": cuda,
                "cuda_device_count": n, "cudnn_available": cudnn, "torch_cuda_linked": torch_cuda_linked,
                "devices": devices, "threads": threads})
        );
    } else {
        println!("libtorch: {ver} ({path})");
        println!("CUDA available: {cuda} ({n} devices; cuDNN {cudnn}; libtorch_cuda linked: {torch_cuda_linked})");
        println!("devices: {}", devices.join(", "));
        println!("threads: {threads} (OMP_NUM_THREADS / torch.set_num_threads)");
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
