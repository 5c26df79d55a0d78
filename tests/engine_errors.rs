//! Every kind of bad pipeline gives one message with file:line:col, exit
//! code 2, and nothing written to the store.
mod engine_common;
use engine_common::*;

/// Runs `recflow run` on `yaml` and checks the error's location and text.
fn bad(yaml: &str, line_col: &str, needle: &str) {
    let p = Proj::new();
    p.write("in.txt", "x\n");
    p.write("p.yaml", yaml);
    let o = p.run(&["run", "p.yaml"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "bad input exits 2 ({needle}); stderr: {err}");
    assert!(err.contains(&format!("p.yaml:{line_col}")), "error carries p.yaml:{line_col}: {err}");
    assert!(err.contains(needle), "error says `{needle}`: {err}");
    assert!(!p.path("cache").exists(), "nothing is written to the store on bad input ({needle})");
    assert!(!p.path("p.lock").exists(), "no lock file on bad input");
}

#[test]
fn unknown_keys() {
    bad("nme: x\nstages:\n  a: {cmd: echo}\n", "1:1", "unknown key `nme`");
    bad("stages:\n  a:\n    cmd: echo\n    dpes: [in.txt]\n", "4:5", "unknown key `dpes`");
    bad("stages:\n  a:\n    uses: x\n    cmd: echo\n", "4:5", "both `uses:` and `cmd:`");
    bad("stages:\n  a:\n    outs: [x]\n", "2:3", "needs `uses: KIND`");
}

#[test]
fn wrong_types() {
    bad("stages:\n  a:\n    cmd: echo\n    deps: 5\n", "4:11", "`deps` must be a list");
    bad("stages:\n  a:\n    cmd: [echo]\n", "3:10", "`cmd` must be a string");
    bad("stages:\n  a:\n    cmd: echo\n    matrix: {seed: 3}\n", "4:20", "must be a list of values");
    bad("stages:\n  a:\n    cmd: echo\n    resources: {gpus: many}\n", "4:23", "`resources.gpus`");
    bad("stages:\n  a:\n    cmd: echo\n    seed: -1\n", "4:11", "non-negative integer");
}

#[test]
fn unknown_kind_and_references() {
    bad("stages:\n  a:\n    uses: nope\n", "3:11", "unknown stage kind `nope`");
    bad("stages:\n  a:\n    cmd: cat ${ghost.out}\n", "3:10", "unknown stage `ghost`");
    bad(
        "stages:\n  a:\n    cmd: echo > a.txt\n    outs: {o: a.txt}\n  b:\n    cmd: cat ${a.nope}\n",
        "6:10",
        "stage `a` has no output `nope`",
    );
    bad("stages:\n  a:\n    cmd: echo ${params.nope}\n", "3:10", "unknown param `nope`");
    bad("stages:\n  a:\n    cmd: echo ${what}\n", "3:10", "unknown reference");
    bad("stages:\n  a:\n    cmd: echo ${matrix.seed}\n", "3:10", "no matrix key `seed`");
    bad("stages:\n  a:\n    cmd: echo ${env:RF_SURELY_UNSET_VAR}\n", "3:10", "env var `RF_SURELY_UNSET_VAR` is not set");
}

#[test]
fn duplicate_and_reserved_names() {
    bad("stages:\n  a: {cmd: echo}\n  a: {cmd: echo}\n", "3:3", "duplicate key `a`");
    bad("stages:\n  params: {cmd: echo}\n", "2:3", "reserved");
    bad("stages:\n  a.b: {cmd: echo}\n", "2:3", "invalid stage name");
    bad(
        "stages:\n  a: {cmd: echo > x.txt, outs: [x.txt]}\n  b: {cmd: echo > x.txt, outs: [x.txt]}\n",
        "3:33",
        "also an output of stage `a`",
    );
    bad("stages:\n  a: {cmd: echo, outs: [../x.txt]}\n", "2:25", "inside the pipeline's directory");
}

/// Issue 14: `outs: [../../x]` once normalised to `x`, so the command ran
/// (writing outside the pipeline's directory) and only then failed with exit 1.
#[test]
fn issue14_outputs_climbing_two_levels_are_refused_before_running() {
    let p = Proj::new();
    p.write("a/b/p.yaml", "stages:\n  s: {cmd: \"echo hi > ../../x.txt\", outs: [../../x.txt]}\n");
    let o = p.run(&["run", "a/b/p.yaml"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "an escaping output is bad input: {err}");
    assert!(err.contains("p.yaml:2:44") && err.contains("inside the pipeline's directory"), "names the output: {err}");
    assert!(!p.path("x.txt").exists(), "the command never ran");
    assert!(!p.path("cache").exists(), "nothing is written to the store");
}

#[test]
fn cycles_are_named() {
    bad(
        "stages:\n  a:\n    cmd: cat ${b.o} > a.txt\n    outs: {o: a.txt}\n  b:\n    cmd: cat ${a.o} > b.txt\n    outs: {o: b.txt}\n",
        "2:3",
        "dependency cycle: a -> b -> a",
    );
    bad("stages:\n  a:\n    cmd: cat x.txt > x.txt\n    deps: [x.txt]\n    outs: [x.txt]\n", "4:12", "cannot depend on its own output");
}

#[test]
fn matrix_clash_with_inherited_key() {
    bad(
        "stages:\n  a:\n    matrix: {s: [1, 2]}\n    cmd: \"echo > a_${matrix.s}.txt\"\n    outs: {o: \"a_${matrix.s}.txt\"}\n  b:\n    matrix: {s: [3]}\n    cmd: \"cat ${a.o}\"\n",
        "7:14",
        "clashes with the matrix `s` inherited from `a`",
    );
    bad(
        "stages:\n  a:\n    matrix: {s: [x, x]}\n    cmd: echo\n",
        "3:14",
        "give the same stage name",
    );
}

#[test]
fn missing_input_and_syntax() {
    bad("stages:\n  a:\n    cmd: cat missing.txt\n    deps: [missing.txt]\n", "4:12", "does not exist");
    bad("stages:\n  a: [1, 2\n", "", "invalid YAML");
    bad("stages: {}\n", "1:9", "`stages` is empty");
}

#[test]
fn allow_missing_turns_absent_inputs_into_warnings() {
    let p = Proj::new();
    p.write("p.yaml", "stages:\n  a:\n    cmd: cat missing.txt ${env:RF_SURELY_UNSET_VAR}\n    deps: [missing.txt]\n");
    let o = p.run(&["run", "p.yaml", "--dry-run", "--allow-missing"]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert_eq!(o.status.code(), Some(0), "--dry-run --allow-missing validates without the data: {out}");
    assert!(out.contains("warning") && out.contains("missing.txt"), "absent input is a warning: {out}");
    assert!(out.contains("RF_SURELY_UNSET_VAR"), "unset env var is a warning: {out}");
    let o = p.run(&["run", "p.yaml", "--dry-run"]);
    assert_eq!(o.status.code(), Some(2), "without --allow-missing the dry-run fails on absent input");
}

#[test]
fn bad_flags_and_overrides() {
    let p = Proj::new();
    p.write("p.yaml", "stages:\n  a: {cmd: echo}\n");
    let o = p.run(&["run", "p.yaml", "--only", "zz"]);
    assert_eq!(o.status.code(), Some(2), "unknown stage in --only is bad input");
    let o = p.run(&["run", "p.yaml", "--set", "stages.zz.with.k=1"]);
    assert_eq!(o.status.code(), Some(2), "unknown stage in --set is bad input");
    assert!(String::from_utf8_lossy(&o.stderr).contains("no stage `zz`"), "names the stage");
    let o = p.run(&["run", "nope.yaml"]);
    assert_eq!(o.status.code(), Some(2), "missing pipeline file is bad input");
}

/// A minimal valid GGUF header (version 3, one tensor, one metadata entry).
fn gguf_bytes() -> Vec<u8> {
    let mut b = b"GGUF".to_vec();
    b.extend_from_slice(&3u32.to_le_bytes());
    b.extend_from_slice(&1u64.to_le_bytes());
    b.extend_from_slice(&1u64.to_le_bytes());
    b.extend(std::iter::repeat_n(0u8, 64));
    b
}

/// A minimal HF model dir: config.json + a one-tensor safetensors file.
fn write_hf_model(p: &Proj, dir: &str) {
    p.write(&format!("{dir}/config.json"), r#"{"model_type": "qwen2"}"#);
    let header = br#"{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#;
    let mut b = (header.len() as u64).to_le_bytes().to_vec();
    b.extend_from_slice(header);
    b.extend_from_slice(&[0, 0, 128, 63]);
    std::fs::write(p.path(&format!("{dir}/model.safetensors")), b).unwrap();
}

#[test]
fn dry_run_checks_that_models_are_readable() {
    let p = Proj::new();
    p.write("samples.parquet", "x");
    p.write("train.parquet", "x");
    let yaml = "stages:\n  imp:\n    uses: model_import\n    with:\n      source: m.gguf\n  ev:\n    uses: eval\n    inputs:\n      model: base\n      samples: samples.parquet\n      train: train.parquet\n";
    p.write("p.yaml", yaml);
    p.write("m.gguf", "this is text, not a model");
    write_hf_model(&p, "base");
    let o = p.run(&["run", "p.yaml", "--dry-run"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "an unreadable GGUF source is bad input: {err}");
    assert!(err.contains("p.yaml:5:7") && err.contains("neither a GGUF"), "names the field's position and what is wrong: {err}");
    std::fs::write(p.path("m.gguf"), gguf_bytes()).unwrap();
    let o = p.run(&["run", "p.yaml", "--dry-run"]);
    assert_eq!(o.status.code(), Some(0), "a readable GGUF and HF dir pass: {}", String::from_utf8_lossy(&o.stderr));
    // The eval model without weights: the dry run says so (and which input).
    std::fs::remove_file(p.path("base/model.safetensors")).unwrap();
    let o = p.run(&["run", "p.yaml", "--dry-run"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "a model dir without weights is bad input: {err}");
    assert!(err.contains("p.yaml:9:7") && err.contains("no model.safetensors"), "points at `model:` and names the missing file: {err}");
    std::fs::remove_file(p.path("base/config.json")).unwrap();
    let o = p.run(&["run", "p.yaml", "--dry-run", "--allow-missing"]);
    assert_eq!(o.status.code(), Some(2), "--allow-missing never excuses a present but unreadable model");
    // Absent models are external inputs: warnings with --allow-missing.
    std::fs::remove_dir_all(p.path("base")).unwrap();
    std::fs::remove_file(p.path("m.gguf")).unwrap();
    let o = p.run(&["run", "p.yaml", "--dry-run", "--allow-missing"]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert_eq!(o.status.code(), Some(0), "absent models are warnings with --allow-missing: {out}");
    assert!(out.contains("warning") && out.contains("m.gguf") && out.contains("base"), "both absent models are named: {out}");
    let o = p.run(&["run", "p.yaml", "--dry-run"]);
    assert_eq!(o.status.code(), Some(2), "absent models are errors without --allow-missing");
    assert!(!p.path("cache/records").exists() && !p.path("cache/objects").exists(), "a dry run stores nothing");
}

fn teacher_samples(n: usize) -> Vec<recflow::data::Sample> {
    (0..n)
        .map(|i| recflow::data::Sample {
            sample_id: format!("s{i}"),
            user_id: format!("u{i}"),
            item_id: format!("i{i}"),
            timestamp: i as i64,
            messages: vec![recflow::teacher::Message { role: "user".into(), content: "x".repeat(400 + 40 * i) }],
            target: 4.0,
            user_history_len: 1,
            item_history_len: 1,
        })
        .collect()
}

#[test]
fn dry_run_previews_the_teachers_cost_and_checks_its_key() {
    let server = recflow::teacher::testserver::TestServer::start(Default::default()).unwrap();
    let p = Proj::new();
    let samples = teacher_samples(3);
    recflow::data::io::write_samples(&p.path("samples.parquet"), &samples).unwrap();
    p.write("train.parquet", "x");
    p.write("items.parquet", "x");
    let yaml = format!(
        "stages:\n  t:\n    uses: teacher\n    inputs: {{samples: samples.parquet, train: train.parquet, items: items.parquet}}\n    with:\n      backend: openai\n      base_url: {}\n      model: m\n      api_key_env: RF_TEST_TEACHER_KEY\n      max_tokens: 100\n      max_rationalize: 1\n      price_in_per_mtok: 1.5\n      price_out_per_mtok: 6\n",
        server.base_url()
    );
    p.write("p.yaml", &yaml);
    let run = |extra: &[&str], key: Option<&str>| {
        let mut args = vec!["run", "p.yaml", "--dry-run"];
        args.extend_from_slice(extra);
        let mut c = p.cmd(&args);
        c.env_remove("RF_TEST_TEACHER_KEY");
        if let Some(k) = key {
            c.env("RF_TEST_TEACHER_KEY", k);
        }
        c.output().unwrap()
    };
    let o = run(&[], None);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "an unset API key variable is bad input: {err}");
    assert!(err.contains("p.yaml:9:7") && err.contains("RF_TEST_TEACHER_KEY"), "names the variable and where it is set: {err}");
    let o = run(&["--allow-missing"], None);
    assert_eq!(o.status.code(), Some(0), "an absent key is a warning with --allow-missing");
    assert!(String::from_utf8_lossy(&o.stdout).contains("warning"), "and is still reported");
    let o = run(&[], Some("sk-test"));
    let out = String::from_utf8_lossy(&o.stdout);
    assert_eq!(o.status.code(), Some(0), "with the key set the dry run passes: {}", String::from_utf8_lossy(&o.stderr));
    // The printed numbers are the teacher's own preview of this config.
    let cfg: recflow::stages::teacher::Config = serde_json::from_value(serde_json::json!({
        "backend": "openai", "base_url": server.base_url(), "model": "m", "api_key_env": "RF_TEST_TEACHER_KEY",
        "max_tokens": 100, "max_rationalize": 1, "price_in_per_mtok": 1.5, "price_out_per_mtok": 6.0
    }))
    .unwrap();
    let pv = recflow::stages::teacher::preview(&cfg, &samples);
    assert!(pv.paid && pv.est_cost_first_usd > 0.0, "the preview of a paid backend has a cost");
    let want = format!("3 samples → 3 requests (≤ 6 with rationalization), ~{} prompt tokens, ≤ 300 completion tokens", pv.est_tokens_in);
    assert!(out.contains(&want), "the dry run prints requests and tokens ({want}): {out}");
    assert!(out.contains(&format!("est. cost ${:.4}", pv.est_cost_first_usd)), "and the estimated cost: {out}");
    assert!(!out.contains("sk-test"), "the key never appears in the output");
    assert_eq!(server.total_requests(), 0, "nothing is bought by a dry run");
}
