//! Data-parallel SFT and GRPO on c10d (issue 17) through the real worker:
//! * two Gloo ranks (CPU processes started by the worker) against one
//!   process running the same shares in the same shapes and thread count
//!   (`distributed.backend: serial`): logs and weights bit-identical, and
//!   close to the plain one-process run (the update is the global batch's);
//! * `kill -9` of a rank fails the stage at once, naming the rank, leaves no
//!   rank alive, and the rerun resumes to the uninterrupted run's bytes;
//!   `kill -9` of the launcher takes its ranks with it;
//! * through the runner: rank 0's outputs and the lock entry have the shape
//!   of a one-process run, the profile records the ranks and their threads,
//!   `world_size` and the per-rank threads enter the key, a world size that
//!   does not divide the batch is bad input (exit 2), and `world_size: 1`
//!   leaves the key where it was;
//! * the Gloo header route is sound: the class sizes the shim compiled
//!   against are the ones libtorch allocates, and the worker carries no Gloo
//!   code of its own;
//! * on CUDA (skipped, saying so, without a GPU): NCCL with world_size 1,
//!   Gloo on CUDA tensors with 2 ranks, NCCL with 2 ranks when 2 GPUs exist.
mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::*;

const WORKER: &str = env!("CARGO_BIN_EXE_recflow-worker");

fn text(o: &Output) -> String {
    format!("stdout:\n{}\nstderr:\n{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

/// An exec-stage spec in `dir/NAME/` (own output dir; work dir `dir/NAME/work`
/// unless `work` is given).
fn spec(dir: &Path, name: &str, kind: &str, config: &serde_json::Value, inputs: &[(&str, &Path)], device: &str, work: Option<&Path>) -> PathBuf {
    let d = dir.join(name);
    std::fs::create_dir_all(&d).unwrap();
    let inputs: serde_json::Map<String, serde_json::Value> = inputs.iter().map(|(k, p)| (k.to_string(), serde_json::json!([p]))).collect();
    let work = work.map(Path::to_path_buf).unwrap_or_else(|| d.join("work"));
    let s = serde_json::json!({
        "kind": kind, "stage": kind, "config": config, "inputs": inputs,
        "out_dir": d.join("out"), "work_dir": work, "seed": 7, "device": device,
    });
    let p = d.join("spec.json");
    std::fs::write(&p, serde_json::to_vec_pretty(&s).unwrap()).unwrap();
    p
}

fn worker(spec: &Path, numerics: &str) -> Command {
    let mut c = Command::new(WORKER);
    recflow::numerics::Request::parse(numerics).unwrap().resolve().apply(&mut c);
    c.arg("exec-stage").arg(spec);
    c
}

/// Runs a spec to its end; returns (metrics, the event lines).
fn run_ok(spec: &Path, numerics: &str) -> (serde_json::Value, String) {
    let o = worker(spec, numerics).output().expect("start recflow-worker");
    assert!(o.status.success(), "worker failed: {}", text(&o));
    let m = spec.parent().unwrap().join("out/metrics.json");
    (serde_json::from_slice(&std::fs::read(&m).unwrap()).unwrap(), String::from_utf8_lossy(&o.stdout).into_owned())
}

fn read(p: PathBuf) -> Vec<u8> {
    std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// Every file under `dir`, relative, sorted.
fn files(dir: &Path) -> Vec<String> {
    fn walk(root: &Path, d: &Path, out: &mut Vec<String>) {
        for e in std::fs::read_dir(d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(root, &p, out);
            } else {
                out.push(p.strip_prefix(root).unwrap().display().to_string());
            }
        }
    }
    let mut v = Vec::new();
    walk(dir, dir, &mut v);
    v.sort();
    v
}

/// The outputs that must agree bit for bit: log, model (and adapter).
fn same_bytes(a: &Path, b: &Path, lora: bool, what: &str) {
    let mut names = vec!["log.parquet", "model/model.safetensors"];
    if lora {
        names.push("adapter/adapter_model.safetensors");
    }
    for n in names {
        assert!(read(a.join("out").join(n)) == read(b.join("out").join(n)), "{what}: `{n}` differs");
    }
}

fn sft_config(world: usize, backend: &str, extra: serde_json::Value) -> serde_json::Value {
    let mut c = serde_json::json!({"learning_rate": 1e-3, "max_steps": 6, "per_device_train_batch_size": 2,
        "gradient_accumulation_steps": 2, "warmup_steps": 1, "eval_steps": 3, "eval_max_samples": 3,
        "eval_max_new_tokens": 8, "weight_decay": 0.01, "world_size": world, "distributed": {"backend": backend}});
    for (k, v) in extra.as_object().unwrap() {
        c[k] = v.clone();
    }
    c
}

fn require_gloo() {
    assert!(
        recflow_ml::dist::built_backends().0,
        "the worker was built without c10d's Gloo: run scripts/setup.sh (it installs libgloo-dev) and rebuild"
    );
}

/// The machine's numerics profile with 2 threads: 1 per rank of 2.
const TWO: &str = "aten=avx2,mkl=compatible,threads=2";
const ONE: &str = "aten=avx2,mkl=compatible,threads=1";

#[test]
fn sft_two_gloo_ranks_equal_the_serial_emulation_bit_for_bit() {
    require_gloo();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let base = small_toy_model(d, 3);
    let (data, valid) = sft_data(d, 24, 4);
    let inputs = [("model", base.as_path()), ("data", data.as_path()), ("valid", valid.as_path())];
    // Packed by tokens too, so shares get micro-batches of their own shapes.
    let extra = serde_json::json!({"max_tokens_per_microbatch": 64});
    let (ranks, events) = run_ok(&spec(d, "gloo", "sft", &sft_config(2, "gloo", extra.clone()), &inputs, "cpu", None), TWO);
    let (serial, _) = run_ok(&spec(d, "serial", "sft", &sft_config(2, "serial", extra.clone()), &inputs, "cpu", None), TWO);
    same_bytes(&d.join("gloo"), &d.join("serial"), false, "2 Gloo ranks vs the serial emulation");
    for m in [&ranks, &serial] {
        assert_eq!((m["world_size"].as_u64(), m["rank_threads"].as_u64()), (Some(2), Some(1)), "2 ranks × 1 thread: {m}");
    }
    assert!(ranks["collective_s"].as_f64().is_some_and(|s| s > 0.0), "the ranks' collectives are timed: {ranks}");
    // Rank 0 spoke for the stage: its profile says 2 ranks of 1 thread.
    let prof = events.lines().filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()).filter(|v| v.get("numerics").is_some()).last().unwrap();
    assert_eq!((prof["numerics"]["threads"].as_u64(), prof["numerics"]["world_size"].as_u64()), (Some(1), Some(2)), "{prof}");

    // One process, one thread, no shares: the same update up to float
    // summation order (a bug that averaged instead of summing, or dropped
    // a share, would be far off).
    let (single, _) = run_ok(&spec(d, "single", "sft", &sft_config(1, "auto", extra), &inputs, "cpu", None), ONE);
    let a = log_column(&d.join("gloo/out/log.parquet"), "loss");
    let b = log_column(&d.join("single/out/log.parquet"), "loss");
    assert_eq!(a.len(), b.len());
    for (s, (x, y)) in a.iter().zip(&b).enumerate() {
        let (x, y) = (x.unwrap(), y.unwrap());
        assert!((x - y).abs() <= 1e-5 * y.abs().max(1.0), "step {}: loss {x} with 2 ranks vs {y} in one process", s + 1);
    }
    assert_eq!(files(&d.join("gloo/out")), files(&d.join("single/out")), "rank 0 writes what one process writes");
    assert!(single.get("world_size").is_none(), "one process reports no ranks");
}

#[test]
fn grpo_two_gloo_ranks_equal_the_serial_emulation_bit_for_bit() {
    require_gloo();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let base = small_toy_model(d, 4);
    let (samples, valid) = grpo_data(d, 8, 3);
    let inputs = [("model", base.as_path()), ("samples", samples.as_path()), ("valid", valid.as_path())];
    // LoRA with dropout (drawn per share), β > 0 (reference = adapters
    // off), μ = 2 (old log-probs), group scaling, DAPO's global token count.
    let cfg = |backend: &str| {
        serde_json::json!({"learning_rate": 1e-3, "max_steps": 4, "prompts_per_step": 4, "num_generations": 3,
            "max_completion_length": 6, "max_prompt_length": 32, "use_peft": true, "lora_r": 4, "lora_dropout": 0.1,
            "beta": 0.04, "num_iterations": 2, "eval_steps": 2, "eval_max_samples": 3, "world_size": 2,
            "distributed": {"backend": backend}, "skip_zero_advantage": false})
    };
    let (ranks, _) = run_ok(&spec(d, "gloo", "grpo", &cfg("auto"), &inputs, "cpu", None), TWO);
    let (serial, _) = run_ok(&spec(d, "serial", "grpo", &cfg("serial"), &inputs, "cpu", None), TWO);
    same_bytes(&d.join("gloo"), &d.join("serial"), true, "GRPO: 2 Gloo ranks vs the serial emulation");
    assert_eq!(ranks["world_size"].as_u64(), Some(2));
    assert_eq!(ranks["reward_first_decile"], serial["reward_first_decile"]);
    assert!(log_column(&d.join("gloo/out/log.parquet"), "val_reward").iter().any(Option::is_some), "evaluation ran on the ranks");
}

/// Pids of the processes whose parent is `pid`, with their `RECFLOW_RANK`.
fn ranks_of(pid: u32) -> Vec<(u32, usize)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(p) = e.file_name().to_string_lossy().parse::<u32>() else { continue };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{p}/stat")) else { continue };
        let rest = &stat[stat.rfind(')').unwrap() + 2..];
        let ppid: u32 = rest.split_whitespace().nth(1).unwrap().parse().unwrap();
        if ppid != pid {
            continue;
        }
        let env = std::fs::read(format!("/proc/{p}/environ")).unwrap_or_default();
        let rank = env.split(|&b| b == 0).find_map(|kv| std::str::from_utf8(kv).ok()?.strip_prefix("RECFLOW_RANK=")?.parse().ok());
        if let Some(r) = rank {
            out.push((p, r));
        }
    }
    out.sort_by_key(|x| x.1);
    out
}

fn alive(pid: u32) -> bool {
    // A zombie (exited, not yet reaped) counts as gone.
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| !s[s.rfind(')').unwrap() + 2..].starts_with('Z'))
}

fn checkpoint_step(work: &Path) -> Option<u64> {
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(work.join("checkpoint/state.json")).ok()?).ok()?;
    v["step"].as_u64()
}

#[test]
fn a_killed_rank_fails_the_stage_at_once_and_the_rerun_resumes() {
    require_gloo();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let base = small_toy_model(d, 3);
    let (data, valid) = sft_data(d, 24, 2);
    let inputs = [("model", base.as_path()), ("data", data.as_path()), ("valid", valid.as_path())];
    let total = 80u64;
    let cfg = |save: u64| {
        sft_config(2, "auto", serde_json::json!({"max_steps": total, "save_steps": save, "eval_steps": 20, "eval_max_samples": 2, "ddp_timeout": 300}))
    };
    run_ok(&spec(d, "ref", "sft", &cfg(1000), &inputs, "cpu", None), TWO);

    // kill -9 of rank 1 once a checkpoint is on disk.
    let work = d.join("work");
    let mut launcher = worker(&spec(d, "a1", "sft", &cfg(2), &inputs, "cpu", Some(&work)), TWO).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
    let t0 = Instant::now();
    let ranks = loop {
        let r = ranks_of(launcher.id());
        if r.len() == 2 {
            break r;
        }
        assert!(launcher.try_wait().unwrap().is_none(), "the launcher ended before starting its ranks");
        assert!(t0.elapsed() < Duration::from_secs(120), "ranks did not start");
        std::thread::sleep(Duration::from_millis(5));
    };
    assert_eq!(ranks.iter().map(|r| r.1).collect::<Vec<_>>(), [0, 1], "the launcher runs ranks 0 and 1");
    while checkpoint_step(&work).is_none() {
        assert!(launcher.try_wait().unwrap().is_none(), "the stage ended before its first checkpoint");
        assert!(t0.elapsed() < Duration::from_secs(300), "no checkpoint after 300 s");
        std::thread::sleep(Duration::from_millis(5));
    }
    Command::new("kill").args(["-9", &ranks[1].0.to_string()]).status().unwrap();
    let killed = Instant::now();
    let o = launcher.wait_with_output().unwrap();
    let took = killed.elapsed();
    let err = String::from_utf8_lossy(&o.stderr);
    eprintln!("stage failed {took:?} after kill -9 of rank 1: {}", err.lines().filter(|l| !l.starts_with("[rank")).collect::<Vec<_>>().join("\n"));
    assert_eq!(o.status.code(), Some(1), "a dead rank fails the stage: {err}");
    assert!(err.contains("rank 1 of 2") && err.contains("killed by signal 9"), "the message names the rank and the signal: {err}");
    // Well inside ddp_timeout (300 s): the launcher noticed the death, no
    // collective timed out (that would take the full 300 s).
    assert!(took < Duration::from_secs(120), "failing took {took:?}");
    assert!(ranks.iter().all(|r| !alive(r.0)), "no rank outlives the failed stage");
    assert!(!d.join("a1/out/metrics.json").exists(), "a failed attempt finished nothing");

    // The rerun continues from rank 0's checkpoint to the uninterrupted bytes.
    let (m, _) = run_ok(&spec(d, "a2", "sft", &cfg(2), &inputs, "cpu", Some(&work)), TWO);
    let from = m["resumed_from_step"].as_u64().unwrap();
    assert!(from > 0 && from < total, "resumed from step {from}");
    same_bytes(&d.join("ref"), &d.join("a2"), false, "2 ranks after kill -9 of rank 1 and a rerun");

    // kill -9 of the launcher: its ranks die with it (PR_SET_PDEATHSIG).
    let work2 = d.join("work2");
    let mut launcher = worker(&spec(d, "b1", "sft", &cfg(1000), &inputs, "cpu", Some(&work2)), TWO).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    let t0 = Instant::now();
    let ranks = loop {
        let r = ranks_of(launcher.id());
        if r.len() == 2 {
            break r;
        }
        assert!(t0.elapsed() < Duration::from_secs(120), "ranks did not start");
        std::thread::sleep(Duration::from_millis(5));
    };
    launcher.kill().unwrap();
    launcher.wait().unwrap();
    let t0 = Instant::now();
    while ranks.iter().any(|r| alive(r.0)) {
        assert!(t0.elapsed() < Duration::from_secs(30), "ranks outlived their launcher");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The sizes libtorch's own code allocates for a class: the operand of the
/// `mov $SIZE,%edi` before the first `operator new` call in `symbol`.
fn allocated_size(lib: &Path, symbol: &str) -> i64 {
    let nm = Command::new("nm").arg("-D").arg("--defined-only").arg(lib).output().expect("nm (binutils)");
    let syms = String::from_utf8_lossy(&nm.stdout);
    let addr = syms.lines().find(|l| l.ends_with(&format!(" {symbol}"))).unwrap_or_else(|| panic!("{symbol} not exported by {}", lib.display()));
    let start = u64::from_str_radix(addr.split_whitespace().next().unwrap(), 16).unwrap();
    let dis = Command::new("objdump")
        .args(["-d", "--no-show-raw-insn", &format!("--start-address={start:#x}"), &format!("--stop-address={:#x}", start + 0x1000)])
        .arg(lib)
        .output()
        .expect("objdump (binutils)");
    let dis = String::from_utf8_lossy(&dis.stdout);
    let lines: Vec<&str> = dis.lines().collect();
    let call = lines.iter().position(|l| l.contains("call") && l.contains("<_Znwm@plt>")).expect("an operator new call");
    lines[..call]
        .iter()
        .rev()
        .find_map(|l| l.split("mov    $0x").nth(1).filter(|x| x.ends_with(",%edi")).map(|x| i64::from_str_radix(x.trim_end_matches(",%edi"), 16).unwrap()))
        .expect("the size operand")
}

fn torch_lib() -> PathBuf {
    let (lib, _) = recflow_ml::numerics::libtorch_info().expect("libtorch loaded");
    lib.parent().unwrap().to_path_buf()
}

#[test]
fn gloo_headers_route_matches_libtorchs_layout_and_links_no_gloo_of_its_own() {
    require_gloo();
    let _ = tch::Tensor::zeros([1], (tch::Kind::Float, tch::Device::Cpu)); // load libtorch
    let cpu = torch_lib().join("libtorch_cpu.so");
    let (pg, opts) = recflow_ml::dist::gloo_sizes_seen_by_shim().unwrap();
    // Options::create_default allocates Options; split() allocates a ProcessGroupGloo.
    assert_eq!(allocated_size(&cpu, "_ZN4c10d16ProcessGroupGloo7Options14create_defaultENSt6chrono8durationIlSt5ratioILl1ELl1000EEEE"), opts, "Options size");
    let split = String::from_utf8_lossy(&Command::new("nm").args(["-D", "--defined-only"]).arg(&cpu).output().unwrap().stdout)
        .lines()
        .find(|l| l.contains("_ZN4c10d16ProcessGroupGloo5splitE"))
        .map(|l| l.split_whitespace().last().unwrap().to_string())
        .expect("ProcessGroupGloo::split exported");
    assert_eq!(allocated_size(&cpu, &split), pg, "ProcessGroupGloo size");
    // No Gloo code compiled into the worker from the (older) system headers.
    let nm = Command::new("nm").args(["-C", "--defined-only"]).arg(WORKER).output().unwrap();
    let own: Vec<String> = String::from_utf8_lossy(&nm.stdout).lines().filter(|l| l.contains(" gloo::")).map(String::from).collect();
    assert!(own.is_empty(), "the worker defines Gloo symbols of its own: {own:?}");
    if let Some((pg, opts)) = recflow_ml::dist::nccl_sizes_seen_by_shim() {
        let cuda = torch_lib().join("libtorch_cuda.so");
        let sym = |part: &str| {
            String::from_utf8_lossy(&Command::new("nm").args(["-D", "--defined-only"]).arg(&cuda).output().unwrap().stdout)
                .lines()
                .find(|l| l.contains(part))
                .map(|l| l.split_whitespace().last().unwrap().to_string())
                .unwrap_or_else(|| panic!("{part} exported"))
        };
        assert_eq!(allocated_size(&cuda, &sym("_ZN4c10d16ProcessGroupNCCL5splitE")), pg, "ProcessGroupNCCL size");
        let _ = opts;
    }
}

// --- through the runner ---------------------------------------------------------

fn runner() -> PathBuf {
    let p = Path::new(WORKER).with_file_name("recflow");
    assert!(p.is_file(), "{} missing: build the workspace first", p.display());
    p
}

fn project(dir: &Path, with: &str) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("recflow.toml"), "").unwrap();
    small_toy_model(dir, 3);
    sft_data(dir, 12, 2);
    std::fs::write(
        dir.join("p.yaml"),
        format!("name: ddp\nstages:\n  sft:\n    uses: sft\n    seed: 7\n    inputs:\n      model: base\n      data: coldstart.parquet\n      valid: valid.parquet\n    with:\n      device: cpu\n      learning_rate: 0.001\n      max_steps: 3\n      per_device_train_batch_size: 2\n      gradient_accumulation_steps: 2\n      eval_steps: 3\n      eval_max_samples: 2\n      eval_max_new_tokens: 6\n{with}"),
    )
    .unwrap();
}

fn recflow(dir: &Path, args: &[&str]) -> Output {
    Command::new(runner())
        .args(args)
        .current_dir(dir)
        .env_remove("RECFLOW_CACHE")
        .env("RECFLOW_WORKER", WORKER)
        .env(recflow::numerics::ENV, TWO)
        .output()
        .expect("start recflow")
}

fn lock(dir: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(dir.join("p.lock")).unwrap()).unwrap()
}

#[test]
fn through_the_runner_rank_zero_writes_what_one_process_writes() {
    require_gloo();
    let tmp = tempfile::tempdir().unwrap();
    let (one, two, explicit, bad) = (tmp.path().join("one"), tmp.path().join("two"), tmp.path().join("explicit"), tmp.path().join("bad"));
    project(&one, "");
    project(&two, "      world_size: 2\n");
    // world_size 1 and an operational timeout: the key of the plain stage.
    project(&explicit, "      world_size: 1\n      ddp_timeout: 30\n");
    project(&bad, "      world_size: 3\n");
    for d in [&one, &two, &explicit] {
        let o = recflow(d, &["run", "p.yaml", "-q"]);
        assert!(o.status.success(), "{}: {}", d.display(), text(&o));
    }
    let (l1, l2, le) = (lock(&one), lock(&two), lock(&explicit));
    let (s1, s2) = (&l1["stages"]["sft"], &l2["stages"]["sft"]);
    assert_eq!(le["stages"]["sft"]["key"], s1["key"], "world_size 1 and ddp_timeout leave the key where it was");
    assert_ne!(s2["key"], s1["key"], "2 ranks are another computation");
    assert_eq!(s2["key_inputs"]["config"]["world_size"], 2);
    assert_eq!(s2["key_inputs"]["rank_threads"], 1, "threads 2 ÷ 2 ranks enter the key");
    assert!(s1["key_inputs"].get("rank_threads").is_none() && s1["key_inputs"]["config"].get("world_size").is_none());
    let keys = |v: &serde_json::Value| v.as_object().unwrap().keys().cloned().collect::<Vec<_>>();
    assert_eq!(keys(s2), keys(s1), "the lock entry has one process's shape");
    assert_eq!(keys(&s2["outputs"]), keys(&s1["outputs"]), "the same outputs");
    let n = &s2["numerics"];
    assert_eq!((n["threads"].as_u64(), n["world_size"].as_u64()), (Some(1), Some(2)), "the profile records 2 ranks of 1 thread: {n}");
    assert!(s1["numerics"].get("world_size").is_none());

    let o = recflow(&bad, &["run", "p.yaml", "-q"]);
    assert_eq!(o.status.code(), Some(2), "a world size that does not divide the batch is bad input: {}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("world_size 3") && err.contains("= 4"), "names the field and the batch: {err}");
}

// --- CUDA (run where a GPU is present) ----------------------------------------

fn cuda_devices() -> i64 {
    if tch::Cuda::is_available() {
        tch::Cuda::device_count()
    } else {
        0
    }
}

/// A short SFT on CUDA with `world` ranks over `backend`; returns the loss column.
fn cuda_sft(d: &Path, name: &str, world: usize, backend: &str) -> Vec<f64> {
    let (base, data, valid) = (d.join("base"), d.join("coldstart.parquet"), d.join("valid.parquet"));
    if !base.exists() {
        small_toy_model(d, 3);
        sft_data(d, 24, 2);
    }
    let inputs = [("model", base.as_path()), ("data", data.as_path()), ("valid", valid.as_path())];
    let cfg = sft_config(world, backend, serde_json::json!({"device": "cuda", "dtype": "float32", "eval_max_samples": 2}));
    let (m, _) = run_ok(&spec(d, name, "sft", &cfg, &inputs, "cuda", None), TWO);
    if backend != "auto" {
        assert!(m["collective_s"].as_f64().is_some(), "{name}: collectives ran: {m}");
    }
    log_column(&d.join(name).join("out/log.parquet"), "loss").into_iter().map(Option::unwrap).collect()
}

fn close(a: &[f64], b: &[f64], tol: f64, what: &str) {
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(b) {
        assert!((x - y).abs() <= tol * y.abs().max(1.0), "{what}: {a:?} vs {b:?}");
    }
}

#[test]
fn cuda_nccl_world_size_one_and_gloo_on_cuda_tensors_with_two_ranks() {
    if cuda_devices() < 1 {
        eprintln!("skipped: no CUDA device (NCCL world_size 1 and Gloo on CUDA tensors need one GPU)");
        return;
    }
    assert!(recflow_ml::dist::built_backends().1, "a CUDA machine's worker must be built with NCCL (scripts/setup.sh installs the headers)");
    let dir = tempfile::tempdir().unwrap();
    let plain = cuda_sft(dir.path(), "plain", 1, "auto");
    let nccl1 = cuda_sft(dir.path(), "nccl1", 1, "nccl");
    close(&nccl1, &plain, 1e-5, "NCCL group of one vs no group");
    let gloo2 = cuda_sft(dir.path(), "gloo2", 2, "gloo");
    let serial2 = cuda_sft(dir.path(), "serial2", 2, "serial");
    close(&gloo2, &serial2, 1e-5, "2 Gloo ranks on CUDA tensors vs the serial emulation");
}

#[test]
fn cuda_nccl_two_ranks_on_two_gpus() {
    if cuda_devices() < 2 {
        eprintln!("skipped: {} CUDA device(s); NCCL with 2 ranks needs 2 GPUs", cuda_devices());
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let nccl2 = cuda_sft(dir.path(), "nccl2", 2, "nccl");
    let serial2 = cuda_sft(dir.path(), "serial2", 2, "serial");
    close(&nccl2, &serial2, 1e-5, "2 NCCL ranks vs the serial emulation");
}
