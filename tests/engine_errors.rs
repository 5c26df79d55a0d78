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
