//! Teacher throughput benchmark (driven by benches/teacher_throughput.sh).
//!
//! `teacher_bench server DELAY_MS [tokio]` — runs the fault-free test server
//! (Rust, answering after DELAY_MS; `tokio`: timed with tokio's millisecond
//! timer instead of the precise one, for comparison), prints its base URL,
//! serves until stdin closes, then prints to stderr how long it held the
//! answers and how many connections it accepted.
//! `teacher_bench client BASE_URL N CONCURRENCY DIR` — runs the real teacher
//! stage (openai backend, fresh response cache under DIR) over N samples and
//! prints one JSON line: wall seconds, client CPU seconds per request,
//! journal fsyncs per answer.
use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use recflow::stages::{EventSink, StageCtx, StageDef};
use recflow::data::io;
use recflow::data::{Interaction, Sample};
use recflow::teacher::testserver::{Plan, TestServer};
use recflow::teacher::Message;

struct Shared(Arc<Mutex<Vec<serde_json::Value>>>);

impl EventSink for Shared {
    fn emit(&mut self, event: serde_json::Value) {
        if let Ok(mut v) = self.0.lock() {
            v.push(event);
        }
    }
}

fn cpu_seconds() -> f64 {
    // SAFETY: getrusage fills the struct we pass and touches nothing else.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) };
    let t = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6;
    t(u.ru_utime) + t(u.ru_stime)
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("server") => {
            let delay: u64 = args.get(1).map_or(Ok(20), |s| s.parse())?;
            let tokio_timer = args.get(2).is_some_and(|a| a == "tokio");
            let server = TestServer::start(Plan { delay: Duration::from_millis(delay), tokio_timer, ..Default::default() })?;
            println!("{}", server.base_url());
            let mut sink = Vec::new();
            let _ = std::io::stdin().read_to_end(&mut sink);
            let mut holds: Vec<f64> = server.holds().iter().map(|d| d.as_secs_f64() * 1e3).collect();
            holds.sort_by(f64::total_cmp);
            if !holds.is_empty() {
                let q = |p: f64| holds[((holds.len() - 1) as f64 * p).round() as usize];
                eprintln!(
                    "server ({} timer): {} answers held median {:.3} ms, mean {:.3} ms, p99 {:.3} ms; {} connections accepted; server CPU {:.3} ms/answer",
                    if tokio_timer { "tokio" } else { "precise" },
                    holds.len(),
                    q(0.5),
                    holds.iter().sum::<f64>() / holds.len() as f64,
                    q(0.99),
                    server.connections(),
                    cpu_seconds() * 1e3 / holds.len() as f64
                );
            }
            drop(server);
            Ok(())
        }
        Some("client") => {
            let [_, url, n, conc, dir] = args.as_slice() else {
                anyhow::bail!("usage: teacher_bench client BASE_URL N CONCURRENCY DIR");
            };
            client(url, n.parse()?, conc.parse()?, Path::new(dir))
        }
        _ => anyhow::bail!("usage: teacher_bench server DELAY_MS | client BASE_URL N CONCURRENCY DIR"),
    }
}

fn client(url: &str, n: usize, concurrency: usize, dir: &Path) -> anyhow::Result<()> {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir)?;
    let samples: Vec<Sample> = (0..n)
        .map(|i| Sample {
            sample_id: format!("b{i:05}"),
            user_id: format!("u{}", i % 97),
            item_id: format!("i{}", i % 89),
            timestamp: i as i64,
            messages: vec![Message {
                role: "user".into(),
                content: format!(
                    "The user rated: Album A 5, Album B 4, Album C 2. Predict their rating of Album {i}. [test-target: {}] [test-mode: right]",
                    1 + i % 5
                ),
            }],
            target: (1 + i % 5) as f32,
            user_history_len: 3,
            item_history_len: 0,
        })
        .collect();
    io::write_samples(&dir.join("samples.parquet"), &samples)?;
    io::write_interactions(
        &dir.join("train.parquet"),
        &[Interaction {
            user_id: "u".into(),
            item_id: "i".into(),
            rating: 3.0,
            timestamp: 0,
            review_title: None,
            review_text: None,
        }],
    )?;
    io::write_items(&dir.join("items.parquet"), &[])?;
    let inputs: BTreeMap<String, Vec<PathBuf>> =
        ["samples", "train", "items"].iter().map(|k| (k.to_string(), vec![dir.join(format!("{k}.parquet"))])).collect();
    let cfg: recflow::stages::teacher::Config = serde_json::from_value(serde_json::json!({
        "backend": "openai", "base_url": url, "model": "bench", "max_tokens": 256,
        "concurrency": concurrency, "request_timeout_s": 30.0, "progress_interval_s": 60.0,
        "response_cache": dir.join("responses"),
    }))?;
    let events = Arc::new(Mutex::new(Vec::new()));
    let mut ctx = StageCtx {
        stage: "teacher".into(),
        inputs,
        outputs: recflow::stages::teacher::Teacher::outputs(&cfg),
        out_dir: dir.join("out"),
        work_dir: dir.join("work"),
        seed: 0,
        device: "cpu".into(),
        events: Box::new(Shared(events.clone())),
        cancel: Arc::new(AtomicBool::new(false)),
    };
    std::fs::create_dir_all(&ctx.out_dir)?;
    let cpu0 = cpu_seconds();
    let t0 = Instant::now();
    let m = recflow::stages::teacher::run_stage(&cfg, &mut ctx, &recflow::stages::teacher::default_backend)?;
    let wall = t0.elapsed().as_secs_f64();
    let cpu = cpu_seconds() - cpu0;
    let journal = events
        .lock()
        .map_err(|_| anyhow::anyhow!("events lock"))?
        .iter()
        .filter_map(|e| e["log"]["msg"].as_str().map(String::from))
        .find(|m| m.contains("fsyncs"))
        .unwrap_or_default();
    // The stage's own phase timing: "timing: setup X ms, requests Y ms, outputs Z ms".
    let timing = events
        .lock()
        .map_err(|_| anyhow::anyhow!("events lock"))?
        .iter()
        .filter_map(|e| e["log"]["msg"].as_str().map(String::from))
        .find(|m| m.starts_with("timing:"))
        .unwrap_or_default();
    let numbers = |s: &str| -> Vec<f64> {
        s.split(|c: char| !(c.is_ascii_digit() || c == '.')).filter_map(|s| s.parse().ok()).collect()
    };
    let phases = numbers(&timing);
    let phase = |i: usize| phases.get(i).copied().unwrap_or(f64::NAN);
    let nums = numbers(&journal);
    let (answers, fsyncs) = (nums.first().copied().unwrap_or(0.0), nums.get(1).copied().unwrap_or(0.0));
    println!(
        "{}",
        serde_json::json!({
            "n": n, "concurrency": concurrency, "accepted": m.get("accepted"),
            "wall_s": wall, "setup_ms": phase(0), "requests_ms": phase(1), "outputs_ms": phase(2),
            "cpu_ms_per_request": cpu * 1000.0 / n as f64,
            "answers_journaled": answers, "fsyncs": fsyncs,
            "fsyncs_per_answer": if answers > 0.0 { fsyncs / answers } else { f64::NAN },
        })
    );
    Ok(())
}
