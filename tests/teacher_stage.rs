//! Integration tests of the teacher stage against the fault-injecting Chat
//! Completions server (`recflow::teacher::testserver`).
//!
//! One test binary on purpose (linking is the slow part on 2 cores). The
//! kill -9 and secret tests run the stage in a child process: this same test
//! binary re-executed with `--ignored --exact child_exec_stage`, which runs
//! `recflow::worker::run_args(exec-stage SPEC)` like a real worker.
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use recflow::data::io::read_coldstart;
use recflow::data::{ColdRow, Interaction, Item, Sample};
use recflow::teacher::cache::ResponseCache;
use recflow::teacher::stats::Stats;
use recflow::teacher::testserver::{Fault, Plan, TestServer};
use recflow::teacher::Message;
use recflow::worker::ExecSpec;
use serde_json::json;

const CHILD_SPEC_ENV: &str = "RECFLOW_TEACHER_TEST_CHILD_SPEC";

fn sample(i: usize, mode: &str) -> Sample {
    let target = (1 + i % 5) as f32;
    Sample {
        sample_id: format!("s{i:03}"),
        user_id: format!("u{}", i % 6),
        item_id: format!("i{}", i % 7),
        timestamp: 10_000 + i as i64,
        messages: vec![
            Message { role: "system".into(), content: "You are a recommender.".into() },
            Message {
                role: "user".into(),
                content: format!("Predict the rating. [test-target: {target}] [test-mode: {mode}]"),
            },
        ],
        target,
        user_history_len: 3,
        item_history_len: 2,
    }
}

/// Writes samples/train/items into `dir`; returns input map.
fn write_inputs(dir: &Path, samples: &[Sample]) -> BTreeMap<String, Vec<PathBuf>> {
    std::fs::create_dir_all(dir).unwrap();
    recflow::data::io::write_samples(&dir.join("samples.parquet"), samples).unwrap();
    // Train: each user rated a few items long before the samples, and one
    // interaction *after* every sample (must never be used by cf).
    let mut train = Vec::new();
    for u in 0..6 {
        for j in 0..7 {
            if (u + j) % 2 == 0 {
                train.push(Interaction {
                    user_id: format!("u{u}"),
                    item_id: format!("i{j}"),
                    rating: (1 + (u * 3 + j) % 5) as f32,
                    timestamp: 100 + (u * 7 + j) as i64,
                    review_title: None,
                    review_text: None,
                });
            }
        }
        train.push(Interaction {
            user_id: format!("u{u}"),
            item_id: "i_late".into(),
            rating: 1.0,
            timestamp: 99_999,
            review_title: None,
            review_text: None,
        });
    }
    recflow::data::io::write_interactions(&dir.join("train.parquet"), &train).unwrap();
    let items: Vec<Item> = (0..7)
        .map(|j| Item {
            item_id: format!("i{j}"),
            title: Some(format!("Album {j}")),
            categories: Some(vec!["Music".into(), if j % 2 == 0 { "Rock".into() } else { "Jazz".into() }]),
            ..Default::default()
        })
        .chain([Item { item_id: "i_late".into(), title: Some("Late Album".into()), ..Default::default() }])
        .collect();
    recflow::data::io::write_items(&dir.join("items.parquet"), &items).unwrap();
    ["samples", "train", "items"].iter().map(|n| (n.to_string(), vec![dir.join(format!("{n}.parquet"))])).collect()
}

fn spec(root: &Path, run: &str, inputs: &BTreeMap<String, Vec<PathBuf>>, config: serde_json::Value) -> ExecSpec {
    ExecSpec {
        kind: "teacher".into(),
        stage: "teacher".into(),
        config,
        inputs: inputs.clone(),
        out_dir: root.join(run).join("out"),
        work_dir: root.join(run).join("work"),
        seed: 42,
        device: "cpu".into(),
    }
}

fn openai_config(server: &TestServer, cache: &Path) -> serde_json::Value {
    json!({
        "backend": "openai",
        "base_url": server.base_url(),
        "model": "test-teacher",
        "max_rationalize": 2,
        "concurrency": 8,
        "request_timeout_s": 0.5,
        "backoff_base_s": 0.02,
        "backoff_max_s": 0.1,
        "progress_interval_s": 0.2,
        "response_cache": cache,
    })
}

fn exec(spec: &ExecSpec) -> anyhow::Result<()> {
    recflow::worker::exec(&recflow::stages::builtin_registry(), spec, Arc::new(AtomicBool::new(false)))
}

fn outputs(spec: &ExecSpec) -> (Vec<ColdRow>, Stats) {
    let rows = read_coldstart(&spec.out_dir.join("coldstart.parquet")).expect("coldstart written");
    let stats: Stats =
        serde_json::from_str(&std::fs::read_to_string(spec.out_dir.join("stats.json")).unwrap()).expect("stats parse");
    (rows, stats)
}

/// The child half of the subprocess tests (ignored unless re-executed).
#[test]
#[ignore = "entry point of child processes spawned by other tests"]
fn child_exec_stage() {
    let Ok(path) = std::env::var(CHILD_SPEC_ENV) else { return };
    let code = recflow::worker::run_args(&recflow::stages::builtin_registry(), &["exec-stage".into(), path]);
    std::process::exit(code);
}

fn spawn_child(spec: &ExecSpec, root: &Path, env: &[(&str, &str)]) -> std::process::Child {
    let path = root.join(format!("spec-{}.json", spec.out_dir.parent().unwrap().file_name().unwrap().to_string_lossy()));
    std::fs::write(&path, serde_json::to_vec(spec).unwrap()).unwrap();
    let mut cmd = std::process::Command::new(std::env::current_exe().unwrap());
    cmd.args(["--ignored", "--exact", "child_exec_stage", "--nocapture", "--test-threads=1"])
        .env(CHILD_SPEC_ENV, &path)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.spawn().expect("spawn child worker")
}

/// Every file under `dir`, recursively.
fn all_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out
}

#[test]
fn faults_every_sample_accounted_for_stats_and_retry_after() {
    let tmp = tempfile::tempdir().unwrap();
    let modes = ["right", "wrong", "always_wrong", "leak", "format", "right", "wrong", "right"];
    let mut samples: Vec<Sample> = (0..40).map(|i| sample(i, modes[i % modes.len()])).collect();
    samples.push(sample(40, "broken"));
    let inputs = write_inputs(&tmp.path().join("in"), &samples);
    let server = TestServer::start(Plan {
        delay: Duration::from_millis(2),
        faults: vec![
            Fault::RateLimit { retry_after_s: 1 },
            Fault::ServerError,
            Fault::Slow(Duration::from_secs(2)),
            Fault::TruncatedJson,
            Fault::Garbage,
            Fault::EmptyChoices,
            Fault::CutBody,
            Fault::Reset,
        ],
        fault_one_in: 2,
        ..Default::default()
    })
    .unwrap();
    let cache = tmp.path().join("responses");
    // `record`: the always-broken sample becomes a rejected row (the default,
    // `fail`, is covered by request_failures_fail_the_stage_and_rerun_retries_only_them).
    let mut cfg = openai_config(&server, &cache);
    cfg["on_request_failure"] = json!("record");
    let s1 = spec(tmp.path(), "run1", &inputs, cfg.clone());
    exec(&s1).expect("stage succeeds despite faults");
    let (rows, stats) = outputs(&s1);

    // Every sample accounted for, exactly once, in table order.
    let ids: Vec<&str> = rows.iter().map(|r| r.sample.sample_id.as_str()).collect();
    let want: Vec<&str> = samples.iter().map(|s| s.sample_id.as_str()).collect();
    assert_eq!(ids, want, "each sample must appear exactly once, in input order");

    // Per-mode outcomes.
    let mut expect_reasons: BTreeMap<String, u64> = BTreeMap::new();
    let mut expect_hist: BTreeMap<String, u64> = BTreeMap::new();
    let (mut acc, mut first) = (0u64, 0u64);
    for (r, s) in rows.iter().zip(&samples) {
        assert_eq!(r.sample.messages, s.messages, "{}: coldstart keeps the original prompt, never the hint", s.sample_id);
        assert!(!r.sample.messages.iter().any(|m| m.content.contains("For this attempt only")));
        let mode = s.messages[1].content.split("[test-mode: ").nth(1).unwrap().trim_end_matches(']');
        let (accepted, attempts, reason) = match mode {
            "right" => (true, 1, None),
            "wrong" => (true, 2, None),
            "always_wrong" => (false, 3, Some("wrong_rating")),
            "leak" => (false, 3, Some("hint_leak")),
            "format" => (false, 3, Some("format_missing_tag")),
            "broken" => (false, 1, Some("request_failed")),
            m => panic!("unknown mode {m}"),
        };
        assert_eq!((r.accepted, r.attempts), (accepted, attempts), "{} ({mode}): accepted/attempts", s.sample_id);
        assert_eq!(
            r.reason.as_deref().map(|x| x.split(':').next().unwrap()),
            reason,
            "{} ({mode}): reason code",
            s.sample_id
        );
        assert_eq!(r.teacher, "openai:test-teacher");
        if accepted {
            acc += 1;
            let c = r.completion.as_deref().expect("accepted rows carry the completion");
            assert!(recflow::answer::parse(c, Default::default()).is_ok(), "accepted completions parse");
            assert_eq!(r.reasoning_content.as_deref(), Some("thinking..."), "reasoning_content is kept apart");
        } else {
            *expect_reasons.entry(reason.unwrap().to_string()).or_default() += 1;
        }
        first += (mode == "right") as u64;
        *expect_hist.entry(attempts.to_string()).or_default() += 1;
    }
    assert_eq!(stats.n_samples, 41);
    assert_eq!(stats.accepted, acc, "stats.accepted counts accepted rows");
    assert_eq!(stats.rejected, 41 - acc);
    assert_eq!(stats.reasons, expect_reasons, "stats.reasons histogram of rejection codes");
    assert_eq!(stats.attempts_hist, expect_hist, "stats.attempts_hist");
    assert!((stats.first_try_accuracy - first as f64 / 41.0).abs() < 1e-12, "first-try accuracy");
    assert!(stats.tokens_in > 0 && stats.tokens_out > 0, "token usage is summed");

    // The faults really happened, and Retry-After was honoured.
    let visits = server.visits();
    for code in [429u16, 500, 0] {
        assert!(visits.iter().any(|v| v.status == code), "fault with status {code} must have been injected");
    }
    let mut by_id: HashMap<&str, Vec<&recflow::teacher::testserver::Visit>> = HashMap::new();
    for v in &visits {
        by_id.entry(v.identity.as_str()).or_default().push(v);
    }
    let mut checked = 0;
    for vs in by_id.values() {
        for w in vs.windows(2) {
            if let Some(ra) = w[0].retry_after_s {
                let gap = w[1].at.duration_since(w[0].at);
                assert!(gap >= Duration::from_secs(ra), "retry after a 429 came {gap:?} later, Retry-After was {ra}s");
                checked += 1;
            }
        }
    }
    assert!(checked > 0, "at least one 429 was retried");

    // A rerun (new out dir, same cache) buys nothing and writes the same outputs.
    let before = server.total_requests();
    let s2 = spec(tmp.path(), "run2", &inputs, cfg);
    exec(&s2).expect("rerun from cache");
    // Only the sample whose request failed (never answered, so never stored) is asked again.
    let broken = recflow::teacher::Request {
        sample_id: "s040".into(),
        attempt: 1,
        messages: samples[40].messages.clone(),
        sampling: recflow::teacher::Sampling { temperature: 0.6, top_p: None, max_tokens: 4096, seed: None },
        hint: None,
        row: 40,
    }
    .identity("openai:test-teacher");
    let new_visits = &server.visits()[before..];
    assert!(!new_visits.is_empty(), "the failed sample is retried on rerun");
    assert!(new_visits.iter().all(|v| v.identity == broken), "a rerun must not pay twice for answered requests");
    let (rows2, stats2) = outputs(&s2);
    assert_eq!(rows2, rows, "outputs from cached answers equal the original outputs");
    assert_eq!(stats2, stats);
}

#[test]
fn request_failures_fail_the_stage_and_rerun_retries_only_them() {
    let tmp = tempfile::tempdir().unwrap();
    let samples: Vec<Sample> = (0..24).map(|i| sample(i, "right")).collect();
    let inputs = write_inputs(&tmp.path().join("in"), &samples);
    // A third of the identities fail on their first visit; with no retries
    // allowed those samples end as request failures in the first run.
    let server = TestServer::start(Plan {
        faults: vec![Fault::Garbage, Fault::ServerError],
        fault_one_in: 3,
        ..Default::default()
    })
    .unwrap();
    let cache = tmp.path().join("responses");
    let mut cfg = openai_config(&server, &cache);
    cfg["max_retries"] = json!(0);
    cfg["max_malformed_retries"] = json!(0);
    let s1 = spec(tmp.path(), "a", &inputs, cfg.clone());
    let msg = format!("{:#}", exec(&s1).expect_err("unanswered samples must fail the stage by default"));
    assert!(!s1.out_dir.join("coldstart.parquet").exists(), "no output is committed as if complete");
    let first: HashMap<String, u64> = server.counts();
    assert_eq!(first.len(), 24, "every sample was asked once");
    // The message names how many failed, why, and what to do.
    let n_failed: usize = msg
        .split(" of 24 samples got no answer")
        .next()
        .and_then(|p| p.rsplit(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("the error says how many samples failed: {msg}"));
    assert!(n_failed > 0 && n_failed < 24, "some but not all samples failed ({n_failed}): {msg}");
    assert!(msg.contains("server_error") || msg.contains("malformed_json"), "the error names the failure codes: {msg}");
    assert!(msg.contains("on_request_failure: record"), "the error names the alternative: {msg}");
    assert_eq!(ResponseCache::open(&cache).unwrap().len(), 24 - n_failed, "every answer bought is kept");

    // The server has recovered: the rerun asks exactly the failed samples again.
    let s2 = spec(tmp.path(), "b", &inputs, cfg.clone());
    exec(&s2).expect("the rerun completes once the server answers");
    let counts = server.counts();
    let resent = counts.values().filter(|&&c| c == 2).count();
    assert_eq!(resent, n_failed, "only the failed samples are asked again");
    assert!(counts.values().all(|&c| c <= 2), "nothing answered is bought twice");
    let (rows, stats) = outputs(&s2);
    assert_eq!(rows.len(), 24);
    assert!(rows.iter().all(|r| r.accepted), "the rerun's output is complete");
    assert!(!stats.reasons.contains_key("request_failed"), "no failure rows in a committed default output");

    // `record` is the explicit opt-in to committing failure rows.
    let server2 = TestServer::start(Plan { faults: vec![Fault::ServerError], fault_one_in: 3, ..Default::default() }).unwrap();
    let mut rec = openai_config(&server2, &tmp.path().join("responses2"));
    rec["max_retries"] = json!(0);
    rec["on_request_failure"] = json!("record");
    let s3 = spec(tmp.path(), "c", &inputs, rec);
    exec(&s3).expect("record mode commits");
    let (_, st3) = outputs(&s3);
    assert!(st3.reasons.get("request_failed").is_some_and(|&n| n > 0), "record keeps failures as rejected rows");
}

#[test]
fn raising_max_samples_or_max_rationalize_reuses_answers() {
    let tmp = tempfile::tempdir().unwrap();
    let samples: Vec<Sample> =
        (0..30).map(|i| sample(i, if i % 3 == 0 { "always_wrong" } else { "right" })).collect();
    let inputs = write_inputs(&tmp.path().join("in"), &samples);
    let server = TestServer::start(Plan::default()).unwrap();
    let cache = tmp.path().join("responses");
    let mut cfg = openai_config(&server, &cache);
    cfg["max_samples"] = json!(10);
    cfg["max_rationalize"] = json!(1);
    exec(&spec(tmp.path(), "a", &inputs, cfg.clone())).unwrap();
    let first: HashSet<String> = server.counts().keys().cloned().collect();

    // Raise max_samples and change operational fields: only new samples are asked.
    cfg["max_samples"] = json!(20);
    cfg["concurrency"] = json!(3);
    cfg["price_in_per_mtok"] = json!(1.0);
    let sb = spec(tmp.path(), "b", &inputs, cfg.clone());
    exec(&sb).unwrap();
    let counts = server.counts();
    assert!(counts.values().all(|&c| c == 1), "no request identity may be sent twice: {counts:?}");
    assert!(first.iter().all(|id| counts[id] == 1), "the first 10 samples' answers are reused");
    let (rows_b, _) = outputs(&sb);
    assert_eq!(rows_b.len(), 20);

    // Raise max_rationalize: only the extra (third) attempts are new requests.
    let before = server.total_requests();
    cfg["max_rationalize"] = json!(2);
    let sc = spec(tmp.path(), "c", &inputs, cfg);
    exec(&sc).unwrap();
    let (rows_c, _) = outputs(&sc);
    let wrong = rows_c.iter().filter(|r| !r.accepted).count();
    assert!(wrong > 0, "the test needs rejected samples");
    assert_eq!(server.total_requests() - before, wrong, "one new (third-attempt) request per rejected sample");
    assert!(server.counts().values().all(|&c| c == 1), "still nothing asked twice");
}

#[test]
fn budget_cap_stops_cleanly_and_rerun_continues_without_repeats() {
    let tmp = tempfile::tempdir().unwrap();
    let samples: Vec<Sample> = (0..30).map(|i| sample(i, "right")).collect();
    let inputs = write_inputs(&tmp.path().join("in"), &samples);
    let server = TestServer::start(Plan::default()).unwrap();
    let cache = tmp.path().join("responses");
    let mut cfg = openai_config(&server, &cache);
    cfg["concurrency"] = json!(1);
    cfg["budget_tokens"] = json!(1500);
    let s1 = spec(tmp.path(), "a", &inputs, cfg.clone());
    let err = exec(&s1).expect_err("the budget cap must stop the stage");
    let msg = format!("{err:#}");
    assert!(msg.contains("budget"), "the error says why it stopped: {msg}");
    assert!(!s1.out_dir.join("coldstart.parquet").exists(), "no partial output is committed");
    let bought = server.total_requests();
    assert!(bought > 0 && bought < 30, "it stopped part-way ({bought} requests)");
    let stored = ResponseCache::open(&cache).unwrap().len();
    assert_eq!(stored, bought, "every answer bought before the stop is kept");

    // The budget caps the dataset's total: rerunning with the same budget
    // counts the cached answers and buys (almost) nothing more. A per-run
    // budget would buy another ~budget's worth here.
    let s_same = spec(tmp.path(), "same", &inputs, cfg.clone());
    let msg = format!("{:#}", exec(&s_same).expect_err("the same budget is still exhausted"));
    assert!(msg.contains("reused from the response cache"), "the error says the cache counts: {msg}");
    let again = server.total_requests() - bought;
    // Two sample tasks per network slot may each pass the check before the
    // other's cached tokens are counted.
    assert!(again <= 2, "rerunning with an exhausted budget bought {again} more answers");

    cfg.as_object_mut().unwrap().remove("budget_tokens");
    let s2 = spec(tmp.path(), "b", &inputs, cfg);
    exec(&s2).expect("rerun without the cap completes");
    assert_eq!(server.total_requests(), 30, "the rerun asks only what was not bought");
    assert!(server.counts().values().all(|&c| c == 1));
    assert_eq!(outputs(&s2).1.accepted, 30);
}

#[test]
fn kill9_rerun_repeats_only_in_flight_and_key_appears_nowhere() {
    const KEY: &str = "sk-test-SECRET-0f9a8b7c6d";
    let tmp = tempfile::tempdir().unwrap();
    let samples: Vec<Sample> = (0..60).map(|i| sample(i, if i % 4 == 0 { "wrong" } else { "right" })).collect();
    let inputs = write_inputs(&tmp.path().join("in"), &samples);
    let server = TestServer::start(Plan { delay: Duration::from_millis(25), api_key: Some(KEY.into()), ..Default::default() })
        .unwrap();
    let store = tmp.path().join("store");
    let cache = store.join("responses");
    let mut cfg = openai_config(&server, &cache);
    cfg["api_key_env"] = json!("RECFLOW_TEST_TEACHER_KEY");
    cfg["concurrency"] = json!(4);
    cfg["request_timeout_s"] = json!(10.0);
    let s1 = spec(&store, "run1", &inputs, cfg.clone());
    let child = spawn_child(&s1, tmp.path(), &[("RECFLOW_TEST_TEACHER_KEY", KEY)]);
    let t0 = Instant::now();
    while server.total_requests() < 20 {
        assert!(t0.elapsed() < Duration::from_secs(120), "child made no progress");
        std::thread::sleep(Duration::from_millis(5));
    }
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
    let out1 = child.wait_with_output().unwrap();
    let seen_before: HashSet<String> = server.counts().keys().cloned().collect();
    let stored: HashSet<String> = {
        let c = ResponseCache::open(&cache).unwrap();
        seen_before.iter().filter(|id| c.get(id).is_some()).cloned().collect()
    };
    assert!(!stored.is_empty(), "answers acknowledged before the kill are in the journal");

    let s2 = spec(&store, "run2", &inputs, cfg.clone());
    let out2 = spawn_child(&s2, tmp.path(), &[("RECFLOW_TEST_TEACHER_KEY", KEY)]).wait_with_output().unwrap();
    assert!(out2.status.success(), "rerun succeeds: {}", String::from_utf8_lossy(&out2.stderr));
    let counts = server.counts();
    for id in &stored {
        assert_eq!(counts[id], 1, "an answer stored before the kill must never be bought again");
    }
    let repeated: Vec<&String> = counts.iter().filter(|(_, &c)| c > 1).map(|(id, _)| id).collect();
    assert!(repeated.iter().all(|id| seen_before.contains(*id) && !stored.contains(*id)), "only in-flight requests repeat");
    assert!(repeated.len() <= 2 * 4, "at most 2 × concurrency requests can be in flight, got {}", repeated.len());

    // The resumed output equals an uninterrupted run's (fresh cache, same answers).
    let mut clean_cfg = cfg.clone();
    clean_cfg["response_cache"] = json!(tmp.path().join("clean-responses"));
    let s3 = spec(&tmp.path().join("clean"), "run", &inputs, clean_cfg);
    std::env::set_var("RECFLOW_TEST_TEACHER_KEY", KEY);
    exec(&s3).unwrap();
    assert_eq!(outputs(&s2).0, outputs(&s3).0, "kill -9 + rerun gives the uninterrupted output");

    // A wrong key: the server echoes it back in its 401 body; it must not reach our error.
    let wrong = "sk-wrong-SECRET-123456789";
    let mut cfg4 = cfg;
    cfg4["response_cache"] = json!(store.join("responses-401"));
    let s4 = spec(&store, "run4", &inputs, cfg4);
    let out4 = spawn_child(&s4, tmp.path(), &[("RECFLOW_TEST_TEACHER_KEY", wrong)]).wait_with_output().unwrap();
    assert!(!out4.status.success(), "a 401 stops the stage");
    let err4 = String::from_utf8_lossy(&out4.stderr);
    assert!(err4.contains("401"), "the error names the HTTP status: {err4}");

    // The key appears nowhere: store (cache, outputs, work dirs, specs), logs, progress.
    let mut texts: Vec<(String, Vec<u8>)> = vec![
        ("run1 stdout".into(), out1.stdout),
        ("run1 stderr".into(), out1.stderr),
        ("run2 stdout".into(), out2.stdout),
        ("run2 stderr".into(), out2.stderr),
        ("run4 stdout".into(), out4.stdout),
        ("run4 stderr".into(), out4.stderr),
    ];
    for f in all_files(tmp.path()) {
        texts.push((f.display().to_string(), std::fs::read(&f).unwrap()));
    }
    for secret in [KEY, wrong] {
        for (name, bytes) in &texts {
            let hit = bytes.windows(secret.len()).any(|w| w == secret.as_bytes());
            assert!(!hit, "the API key leaked into {name}");
        }
    }
    // ...while it did reach the server, as a bearer header only.
    let (heads, bodies) = server.raw_seen();
    assert!(heads.iter().any(|h| h.contains(KEY)), "the key is sent in the Authorization header");
    assert!(!bodies.iter().any(|b| b.contains(KEY)), "never in the request body");
}

#[test]
fn cf_teacher_uses_only_earlier_evidence_and_honours_hints() {
    let tmp = tempfile::tempdir().unwrap();
    let samples: Vec<Sample> = (0..20).map(|i| sample(i, "right")).collect();
    let inputs = write_inputs(&tmp.path().join("in"), &samples);
    let s = spec(tmp.path(), "cf", &inputs, json!({"backend": "cf"}));
    exec(&s).expect("cf teacher runs offline");
    let (rows, stats) = outputs(&s);
    assert_eq!(rows.len(), 20);
    assert_eq!(stats.teacher, "cf");
    for r in &rows {
        let c = r.completion.as_deref().unwrap();
        let a = recflow::answer::parse(c, Default::default()).expect("cf traces follow the grammar");
        assert!(recflow::teacher::leak::find_leak(c).is_none(), "cf traces never leak the hint: {c}");
        assert!(!c.contains("Late Album"), "interactions after the sample's time are never evidence");
        // With a hint it argues for the target, so every sample is accepted by attempt 2.
        assert!(r.accepted && r.attempts <= 2, "{}: cf honours the hint ({c})", r.sample.sample_id);
        assert_eq!(a.rating, r.sample.target.round());
    }
    assert!(stats.rationalized > 0 && stats.first_try_accuracy < 1.0, "some samples needed the hint");
    // Deterministic: a second run gives identical outputs.
    let s2 = spec(tmp.path(), "cf2", &inputs, json!({"backend": "cf"}));
    exec(&s2).unwrap();
    assert_eq!(outputs(&s2), (rows, stats), "cf is deterministic");
}

#[test]
fn local_backend_in_the_torch_free_worker_is_a_clear_error_and_preview_counts() {
    let tmp = tempfile::tempdir().unwrap();
    let samples: Vec<Sample> = (0..10).map(|i| sample(i, "right")).collect();
    let inputs = write_inputs(&tmp.path().join("in"), &samples);
    let s = spec(tmp.path(), "local", &inputs, json!({"backend": "local", "model_dir": "/nonexistent"}));
    let err = format!("{:#}", exec(&s).unwrap_err());
    assert!(err.contains("recflow-worker"), "the error says where local runs: {err}");

    let cfg: recflow::stages::teacher::Config = serde_json::from_value(json!({
        "backend": "openai", "base_url": "http://x/v1", "model": "m", "max_samples": 4,
        "max_rationalize": 2, "max_tokens": 100, "price_in_per_mtok": 1.0, "price_out_per_mtok": 2.0
    }))
    .unwrap();
    let p = recflow::stages::teacher::preview(&cfg, &samples);
    assert_eq!((p.n_samples, p.requests_min, p.requests_max), (4, 4, 12), "preview request counts");
    assert_eq!(p.est_tokens_out_max, 400);
    assert!(p.est_cost_first_usd > 0.0 && p.est_cost_max_usd > p.est_cost_first_usd);
}

#[test]
fn through_the_runner_the_key_reaches_no_lock_store_log_or_output_and_stats_keys_are_pinned() {
    const KEY: &str = "sk-runner-SECRET-77aa55cc33";
    let bin = Path::new(env!("CARGO_BIN_EXE_recflow"));
    let worker = bin.parent().unwrap().join("examples/torch_free_worker");
    assert!(worker.is_file(), "the torch_free_worker example must be built first (`cargo build --example torch_free_worker`)");
    let proj = tempfile::tempdir().unwrap();
    std::fs::write(proj.path().join("recflow.toml"), "").unwrap();
    let samples: Vec<Sample> = (0..12).map(|i| sample(i, if i % 3 == 0 { "wrong" } else { "right" })).collect();
    write_inputs(&proj.path().join("in"), &samples);
    let server = TestServer::start(Plan { api_key: Some(KEY.into()), ..Default::default() }).unwrap();
    let yaml = format!(
        "worker: {}\nstages:\n  teacher:\n    uses: teacher\n    inputs: {{samples: in/samples.parquet, train: in/train.parquet, items: in/items.parquet}}\n    with:\n      backend: openai\n      base_url: {}\n      model: t\n      api_key_env: RECFLOW_TEST_TEACHER_KEY\n      max_rationalize: 1\n      price_in_per_mtok: 1.0\n",
        worker.display(),
        server.base_url()
    );
    std::fs::write(proj.path().join("p.yaml"), yaml).unwrap();
    let recflow = |args: &[&str]| {
        std::process::Command::new(bin)
            .args(args)
            .current_dir(proj.path())
            .env_remove("RECFLOW_CACHE")
            .env_remove("RECFLOW_WORKER")
            .env("RECFLOW_TEST_TEACHER_KEY", KEY)
            .output()
            .unwrap()
    };
    let mut texts: Vec<(String, Vec<u8>)> = Vec::new();
    for args in [&["run", "p.yaml", "--dry-run"][..], &["run", "p.yaml"], &["status", "p.yaml"], &["show", "p.yaml"], &["run", "p.yaml"]] {
        let o = recflow(args);
        assert!(o.status.success(), "`recflow {}` succeeds: {}", args.join(" "), String::from_utf8_lossy(&o.stderr));
        texts.push((format!("`{}` stdout", args.join(" ")), o.stdout));
        texts.push((format!("`{}` stderr", args.join(" ")), o.stderr));
    }
    assert!(proj.path().join("p.lock").is_file(), "the run wrote its lock file");
    let shown = String::from_utf8_lossy(&recflow(&["show", "p.yaml"]).stdout).into_owned();
    assert!(shown.contains("teacher cost") && shown.contains("$0.0"), "`recflow show` reports the teacher's cost: {shown}");
    for f in all_files(proj.path()) {
        texts.push((f.display().to_string(), std::fs::read(&f).unwrap()));
    }
    for (name, bytes) in &texts {
        assert!(!bytes.windows(KEY.len()).any(|w| w == KEY.as_bytes()), "the API key leaked into {name}");
    }
    assert!(server.raw_seen().0.iter().any(|h| h.contains(KEY)), "the key did reach the server, as a header");

    // The stats output carries the pinned keys (ARCHITECTURE.md, Teacher `stats`).
    let stats: serde_json::Value =
        serde_json::from_slice(&std::fs::read(proj.path().join("runs/p/teacher/stats.json")).unwrap()).unwrap();
    for k in ["n_samples", "accepted", "rejected", "first_try_accuracy", "attempts_hist", "reasons", "tokens_in", "tokens_out"] {
        assert!(stats.get(k).is_some(), "stats.json lacks the pinned key `{k}`: {stats}");
    }
    assert_eq!(stats["n_samples"], 12);
    assert_eq!(stats["attempts_hist"], json!({"1": 8, "2": 4}), "4 samples needed the hint");
}

/// A whitespace/punctuation word-level tokenizer.json: every word or run of
/// punctuation is one token, so trace lengths are easy to count.
const WORD_TOKENIZER: &str = r#"{"version":"1.0","truncation":null,"padding":null,"added_tokens":[],"normalizer":null,
"pre_tokenizer":{"type":"Whitespace"},"post_processor":null,"decoder":null,
"model":{"type":"WordLevel","vocab":{"[UNK]":0},"unk_token":"[UNK]"}}"#;

/// Issue 18: the teacher records its traces' token lengths in the student's
/// tokenizer, and the runner refuses, before SFT starts, a pipeline whose
/// SFT validation, GRPO or eval completion budget is below the longest
/// trace plus the margin — naming both numbers and the field; the dry run
/// says the same once the teacher is in the store; `allow_truncation: true`
/// turns the refusal into a warning.
#[test]
fn issue18_completion_budgets_below_the_traces_are_refused_before_sft() {
    let bin = Path::new(env!("CARGO_BIN_EXE_recflow"));
    let worker = bin.parent().unwrap().join("examples/torch_free_worker");
    assert!(worker.is_file(), "the torch_free_worker example must be built first (`cargo build --example torch_free_worker`)");
    let proj = tempfile::tempdir().unwrap();
    std::fs::write(proj.path().join("recflow.toml"), "").unwrap();
    let samples: Vec<Sample> = (0..12).map(|i| sample(i, "right")).collect();
    let dir = proj.path().join("in");
    write_inputs(&dir, &samples);
    // A model dir the dry run accepts (config + a one-tensor safetensors), holding the tokenizer.
    std::fs::create_dir_all(dir.join("model")).unwrap();
    std::fs::write(dir.join("model/config.json"), r#"{"model_type": "llama"}"#).unwrap();
    let header = br#"{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#;
    let mut st = (header.len() as u64).to_le_bytes().to_vec();
    st.extend_from_slice(header);
    st.extend_from_slice(&[0, 0, 128, 63]);
    std::fs::write(dir.join("model/model.safetensors"), st).unwrap();
    std::fs::write(dir.join("model/tokenizer.json"), WORD_TOKENIZER).unwrap();
    let yaml = |allow: bool| {
        let a = if allow { "\n      allow_truncation: true" } else { "" };
        format!(
            "worker: {}\nstages:\n  teacher:\n    uses: teacher\n    inputs: {{samples: in/samples.parquet, train: in/train.parquet, items: in/items.parquet, tokenizer: in/model}}\n    with:\n      backend: cf\n      cf_style: concise\n  sft:\n    uses: sft\n    inputs: {{model: in/model, data: \"${{teacher.coldstart}}\", valid: in/samples.parquet}}\n    with:\n      device: cpu\n      eval_max_new_tokens: 8{a}\n  ev:\n    uses: eval\n    inputs: {{model: \"${{sft.model}}\", samples: in/samples.parquet, train: in/train.parquet}}\n    with:\n      device: cpu\n      max_new_tokens: 4096\n  ev_short:\n    uses: eval\n    inputs: {{model: \"${{sft.model}}\", samples: in/samples.parquet, train: in/train.parquet}}\n    with:\n      device: cpu\n      max_new_tokens: 20{a}\n",
            worker.display()
        )
    };
    std::fs::write(proj.path().join("p.yaml"), yaml(false)).unwrap();
    let recflow = |args: &[&str]| {
        std::process::Command::new(bin).args(args).current_dir(proj.path()).env_remove("RECFLOW_CACHE").env_remove("RECFLOW_WORKER").output().unwrap()
    };
    let o = recflow(&["run", "p.yaml", "--dry-run"]);
    assert_eq!(o.status.code(), Some(0), "before the teacher ran, nothing is known: {}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stdout).contains("checked against the traces' token lengths when the teacher has run"));

    let o = recflow(&["run", "p.yaml"]);
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert_eq!(o.status.code(), Some(2), "a budget below the traces is bad input: {err}");
    // The longest accepted trace in this tokenizer, counted here.
    let cold = recflow::data::io::read_coldstart(&proj.path().join("runs/p/teacher/coldstart.parquet")).unwrap();
    let tok = recflow::util::load_tokenizer(&dir.join("model")).unwrap();
    let max = cold.iter().filter(|r| r.accepted).map(|r| tok.encode(r.completion.as_deref().unwrap(), false).unwrap().len() as u64).max().unwrap();
    let need = recflow::run::budget::required(max);
    assert!(max > 8 && need > 20 && need < 4096, "the fixture's traces ({max} tokens) sit between the budgets");
    for (stage, field) in [("sft", "eval_max_new_tokens: 8"), ("ev_short", "max_new_tokens: 20")] {
        assert!(
            err.contains(&format!("stage `{stage}`: `{field}`")) && err.contains(&format!("traces up to {max} tokens")) && err.contains(&format!("at least {need}")),
            "names stage `{stage}`, its field, the traces' longest and the least budget: {err}"
        );
    }
    assert!(!err.contains("stage `ev`:"), "a budget that holds the traces passes: {err}");
    let lock: serde_json::Value = serde_json::from_slice(&std::fs::read(proj.path().join("p.lock")).unwrap()).unwrap();
    assert!(lock["stages"].get("teacher").is_some() && lock["stages"].get("sft").is_none(), "the teacher is recorded, SFT never started");
    assert_eq!(lock["stages"]["teacher"]["metrics"]["trace_tokens_max"], max, "the lock carries the traces' token lengths");

    let o = recflow(&["run", "p.yaml", "--dry-run"]);
    let (out, err) = (String::from_utf8_lossy(&o.stdout).into_owned(), String::from_utf8_lossy(&o.stderr).into_owned());
    assert_eq!(o.status.code(), Some(2), "the dry run refuses it too, from the recorded teacher: {err}");
    assert!(out.contains(&format!("{max} max; completion budgets need ≥ {need}")) && err.contains("eval_max_new_tokens"), "{out}\n{err}");

    std::fs::write(proj.path().join("p.yaml"), yaml(true)).unwrap();
    let o = recflow(&["run", "p.yaml", "--dry-run"]);
    assert_eq!(o.status.code(), Some(0), "allow_truncation accepts it: {}", String::from_utf8_lossy(&o.stderr));
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(out.contains("allowed by `allow_truncation: true`"), "and still warns: {out}");
    // The dry run's plan of each training and eval stage, from the teacher's
    // rows and the model's tokenizer.
    let acc: Vec<&ColdRow> = cold.iter().filter(|r| r.accepted).collect();
    let held = acc.iter().filter(|r| recflow::stages::sft::is_held_out(&r.sample.sample_id, 0.05)).count();
    let steps = (acc.len() - held).div_ceil(4);
    assert!(
        out.contains(&format!("plan: {steps} steps × 4 examples = {} examples", steps * 4)) && out.contains(&format!("{held} held out")),
        "sft: steps of the default batch over the accepted rows: {out}"
    );
    assert!(out.contains("tokens per example (prompt + trace, cut at max_length 1024): p50 "), "sft token lengths: {out}");
    assert!(out.contains("plan: 12 samples × 1 completion(s) of ≤ 20 new tokens (greedy)") && out.contains("prompt tokens over 12 samples: p50 "), "eval: {out}");
}
