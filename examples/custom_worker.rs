//! A custom worker: the built-in (torch-free) registry plus two stages of
//! our own. Build with `cargo build --example custom_worker`, then name the
//! binary in a pipeline's top-level `worker:` (see `custom_worker.yaml`).
//! The runner asks it `describe --json` once (cached by the binary's hash)
//! and runs its stages through the exec-stage protocol.
use recflow::stages::{InputSpec, Metrics, OutputSpec, Stage, StageCtx, StageDef};
use serde::{Deserialize, Serialize};

/// Repeats every line of `text` `factor` times.
struct ScaleLines;

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct ScaleConfig {
    /// How often each line is repeated (enters the key).
    #[serde(default = "one")]
    factor: u32,
    /// Progress interval in lines: operational, kept out of the key.
    #[serde(default = "one")]
    log_every: u32,
}

fn one() -> u32 {
    1
}

impl StageDef for ScaleLines {
    type Config = ScaleConfig;
    const KIND: &'static str = "scale_lines";
    const VERSION: u32 = 1;
    const OPERATIONAL: &'static [&'static str] = &["log_every"];
    fn inputs() -> Vec<InputSpec> {
        vec![InputSpec::one("text")]
    }
    fn outputs(_: &ScaleConfig) -> Vec<OutputSpec> {
        vec![OutputSpec::file("scaled", "txt")]
    }
    fn validate(cfg: &ScaleConfig) -> Result<(), String> {
        if cfg.factor == 0 || cfg.factor > 1000 {
            return Err("`factor` must be between 1 and 1000".into());
        }
        Ok(())
    }
    /// Described to the runner, which then rejects a bad `with:` when it
    /// plans (file:line:col, exit 2) instead of when the stage runs.
    fn config_schema() -> Option<serde_json::Value> {
        Some(serde_json::json!({
            "type": "object",
            "additionalProperties": false,
            "properties": {
                "factor": {"type": "integer", "minimum": 1, "maximum": 1000},
                "log_every": {"type": "integer", "minimum": 1}
            }
        }))
    }
}

impl Stage for ScaleLines {
    fn run(cfg: &ScaleConfig, ctx: &mut StageCtx) -> anyhow::Result<Metrics> {
        let text = std::fs::read_to_string(ctx.input("text")?)?;
        let lines: Vec<&str> = text.lines().collect();
        let mut out = String::new();
        for (i, l) in lines.iter().enumerate() {
            for _ in 0..cfg.factor {
                out.push_str(l);
                out.push('\n');
            }
            if (i as u32 + 1) % cfg.log_every.max(1) == 0 {
                ctx.progress(i as u64 + 1, Some(lines.len() as u64), "lines");
            }
        }
        recflow::util::write_atomic(&ctx.output("scaled")?, out.as_bytes())?;
        let mut m = Metrics::new();
        m.insert("lines_out".into(), serde_json::json!(lines.len() as u64 * cfg.factor as u64));
        Ok(m)
    }
}

/// Concatenates a list input (`all: ${stage.output}` gathers matrix expansions).
struct ConcatFiles;

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConcatConfig {}

impl StageDef for ConcatFiles {
    type Config = ConcatConfig;
    const KIND: &'static str = "concat_files";
    const VERSION: u32 = 1;
    fn inputs() -> Vec<InputSpec> {
        vec![InputSpec::many("parts")]
    }
    fn outputs(_: &ConcatConfig) -> Vec<OutputSpec> {
        vec![OutputSpec::file("joined", "txt")]
    }
}

impl Stage for ConcatFiles {
    fn run(_: &ConcatConfig, ctx: &mut StageCtx) -> anyhow::Result<Metrics> {
        let mut out = Vec::new();
        for p in ctx.input_list("parts").to_vec() {
            out.extend(std::fs::read(&p)?);
        }
        recflow::util::write_atomic(&ctx.output("joined")?, &out)?;
        Ok(Metrics::new())
    }
}

fn main() {
    let registry = recflow::stages::builtin_registry().with::<ScaleLines>().with::<ConcatFiles>();
    std::process::exit(recflow::worker::main(registry));
}
