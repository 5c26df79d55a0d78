//! `resources:` of a stage — what it asks of the machine that runs it — and
//! the checks of each value, shared by the pipeline YAML and the Slurm
//! defaults of `recflow.toml` (one home for "what a valid `mem` is").
//!
//! ```yaml
//! resources:
//!   gpus: 1            # the local scheduler and Slurm (`--gres=gpu:1`)
//!   cpus: 8            # Slurm (`--cpus-per-task=8`); locally, cores held while it runs
//!   mem: 32G           # Slurm only (`--mem=32G`); a bare number is megabytes
//!   time: "4:00:00"    # Slurm only (`--time=4:00:00`); a bare number is minutes
//!   partition: gpu     # Slurm only (`--partition=gpu`)
//!   sbatch: ["--constraint=a100", "--qos=high"]   # Slurm only, passed as written
//! ```
//! How each field becomes an `sbatch` option is
//! [`crate::run::executor::slurm::resource_args`]. Resources are operational:
//! they never enter a stage's key (the same stage on a bigger node is the
//! same stage).
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::yaml::{Node, Val};
use super::PipelineError;

/// A stage's declared resources, checked.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resources {
    /// GPUs the stage needs (0: none).
    pub gpus: u32,
    /// CPU cores (Slurm `--cpus-per-task`; the local scheduler holds that
    /// many of this machine's cores while the stage runs).
    pub cpus: Option<u32>,
    /// Memory per node, in Slurm's form (`32G`, `512M`).
    pub mem: Option<String>,
    /// Wall-clock limit, in Slurm's form (`4:00:00`, `2-00:00:00`, `90`).
    pub time: Option<String>,
    /// Slurm partition (or a comma list of them).
    pub partition: Option<String>,
    /// Extra `sbatch` flags, each passed as one argument, after recflow's own.
    pub sbatch: Vec<String>,
}

/// The keys `resources:` accepts.
pub const KEYS: &[&str] = &["gpus", "cpus", "mem", "time", "partition", "sbatch"];

/// Flags recflow sets itself: a user's copy would break job names (which
/// carry the stage key), the submission's parsing, or the one-task job.
const RESERVED_FLAGS: &[&str] = &["--job-name", "-J", "--parsable", "--wrap", "--array", "-a", "--export-file"];

impl Resources {
    /// Parses and checks a `resources:` mapping; every error names the field
    /// with its `file:line:col` and says what to write instead.
    pub fn from_node(file: &Path, node: &Node) -> Result<Resources, PipelineError> {
        let err = |n: &Node, msg: String| PipelineError::new(file, n.pos, msg);
        let Val::Map(m) = &node.val else {
            return Err(err(node, format!("`resources` must be a mapping, got {}", node.type_name())));
        };
        let mut r = Resources::default();
        for (k, kp, v) in m {
            match k.as_str() {
                "gpus" => {
                    r.gpus = match v.val {
                        Val::Int(i) if (0..=64).contains(&i) => i as u32,
                        _ => return Err(err(v, "`resources.gpus` must be an integer between 0 and 64".into())),
                    }
                }
                "cpus" => {
                    r.cpus = Some(match v.val {
                        Val::Int(i) if (1..=4096).contains(&i) => i as u32,
                        _ => return Err(err(v, "`resources.cpus` must be an integer between 1 and 4096 (cores for the stage)".into())),
                    })
                }
                "mem" => {
                    let text = scalar(v).ok_or_else(|| err(v, format!("`resources.mem` must be an amount like 16G, got {}", v.type_name())))?;
                    r.mem = Some(check_mem(&text).map_err(|m| err(v, format!("`resources.mem`: {m}")))?);
                }
                "time" => {
                    let text = scalar(v).ok_or_else(|| err(v, format!("`resources.time` must be a duration like \"4:00:00\", got {}", v.type_name())))?;
                    r.time = Some(check_time(&text).map_err(|m| err(v, format!("`resources.time`: {m}")))?);
                }
                "partition" => {
                    let text = v.as_str().ok_or_else(|| err(v, format!("`resources.partition` must be a string, got {}", v.type_name())))?;
                    r.partition = Some(check_partition(text).map_err(|m| err(v, format!("`resources.partition`: {m}")))?);
                }
                "sbatch" => {
                    let Val::Seq(items) = &v.val else {
                        return Err(err(v, format!("`resources.sbatch` must be a list of flags like [\"--qos=high\"], got {}", v.type_name())));
                    };
                    for it in items {
                        let f = it.as_str().ok_or_else(|| err(it, format!("each `resources.sbatch` flag must be a string, got {}", it.type_name())))?;
                        check_sbatch_flag(f).map_err(|m| err(it, format!("`resources.sbatch`: {m}")))?;
                        r.sbatch.push(f.to_string());
                    }
                }
                other => {
                    return Err(PipelineError::new(file, *kp, format!("unknown key `{other}` in `resources` (allowed: {})", KEYS.join(", "))));
                }
            }
        }
        Ok(r)
    }
}

/// A scalar's text (`32G`, `90`, `4:00:00`).
fn scalar(n: &Node) -> Option<String> {
    match &n.val {
        Val::Str(s) => Some(s.clone()),
        Val::Int(i) => Some(i.to_string()),
        _ => None,
    }
}

/// Memory as Slurm's `--mem` takes it: an integer with an optional unit
/// K, M, G or T (no unit: megabytes). Returned with the unit upper-case.
pub fn check_mem(s: &str) -> Result<String, String> {
    let t = s.trim();
    let digits = t.chars().take_while(|c| c.is_ascii_digit()).count();
    let (num, unit) = t.split_at(digits);
    let unit = unit.to_ascii_uppercase();
    let ok_unit = matches!(unit.as_str(), "" | "K" | "M" | "G" | "T");
    match num.parse::<u64>() {
        Ok(n) if n > 0 && ok_unit => Ok(format!("{n}{unit}")),
        _ => Err(format!("`{s}` is not an amount Slurm accepts: write a whole number with an optional unit K, M, G or T (16G, 512M; a bare number is megabytes)")),
    }
}

/// A wall-clock limit in one of Slurm's forms: `M`, `M:S`, `H:M:S`, `D-H`,
/// `D-H:M`, `D-H:M:S` (all whole numbers), or `UNLIMITED`.
pub fn check_time(s: &str) -> Result<String, String> {
    let t = s.trim();
    let bad = || {
        format!("`{s}` is not a Slurm time limit: write minutes (90), H:MM:SS (4:00:00), D-HH (2-00) or D-HH:MM:SS (1-12:00:00)")
    };
    if t.eq_ignore_ascii_case("unlimited") || t.eq_ignore_ascii_case("infinite") {
        return Ok("UNLIMITED".into());
    }
    let num = |p: &str| !p.is_empty() && p.len() <= 6 && p.chars().all(|c| c.is_ascii_digit());
    let (days, rest) = match t.split_once('-') {
        Some((d, r)) => (Some(d), r),
        None => (None, t),
    };
    if let Some(d) = days {
        if !num(d) {
            return Err(bad());
        }
    }
    let parts: Vec<&str> = rest.split(':').collect();
    if parts.len() > 3 || !parts.iter().all(|p| num(p)) {
        return Err(bad());
    }
    // Minutes and seconds after the first field are clock fields (< 60).
    if parts.iter().skip(1).any(|p| p.parse::<u32>().map(|v| v >= 60).unwrap_or(true)) {
        return Err(bad());
    }
    if parts.iter().all(|p| p.parse::<u64>() == Ok(0)) && days.is_none_or(|d| d.parse::<u64>() == Ok(0)) {
        return Err(format!("`{s}`: a time limit of zero would never let the stage run"));
    }
    Ok(t.to_string())
}

/// A partition name, or a comma list of them (Slurm takes the first that can run the job).
pub fn check_partition(s: &str) -> Result<String, String> {
    let ok = !s.is_empty() && s.split(',').all(|p| !p.is_empty() && p.chars().all(|c| c.is_ascii_alphanumeric() || "_-.".contains(c)));
    if ok {
        Ok(s.to_string())
    } else {
        Err(format!("`{s}` is not a partition name (letters, digits, `_`, `-`, `.`; several separated by commas); `sinfo -s` lists them"))
    }
}

/// One extra `sbatch` flag: starts with `-`, one argument (`--qos=high`, not
/// `--qos high`), and not one recflow sets itself.
pub fn check_sbatch_flag(f: &str) -> Result<(), String> {
    if !f.starts_with('-') || f.len() < 2 {
        return Err(format!("`{f}` is not a flag: write each as one string starting with `-`, like \"--qos=high\""));
    }
    if f.contains(char::is_whitespace) && !f.contains('=') {
        return Err(format!("`{f}`: write a flag and its value as one string joined by `=` (\"--qos=high\"), each flag its own list entry"));
    }
    let name = f.split('=').next().unwrap_or(f);
    if RESERVED_FLAGS.contains(&name) {
        return Err(format!("`{name}` is set by recflow itself (the job name carries the stage key, one job per stage); remove it"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(yaml: &str) -> Result<Resources, String> {
        let n = crate::pipeline::yaml::parse(yaml).map_err(|e| e.msg)?;
        Resources::from_node(Path::new("p.yaml"), &n).map_err(|e| e.to_string())
    }

    #[test]
    fn every_field_is_read_and_normalised() {
        let r = parse("gpus: 2\ncpus: 8\nmem: 32g\ntime: \"1-12:00:00\"\npartition: gpu,gpu-long\nsbatch: [\"--qos=high\", \"--constraint=a100\"]\n").unwrap();
        assert_eq!(r.gpus, 2);
        assert_eq!(r.cpus, Some(8));
        assert_eq!(r.mem.as_deref(), Some("32G"), "the unit is written the way Slurm spells it");
        assert_eq!(r.time.as_deref(), Some("1-12:00:00"));
        assert_eq!(r.partition.as_deref(), Some("gpu,gpu-long"));
        assert_eq!(r.sbatch, vec!["--qos=high", "--constraint=a100"]);
        assert_eq!(parse("mem: 2048\ntime: 90\n").unwrap().mem.as_deref(), Some("2048"), "a bare number stays megabytes");
    }

    #[test]
    fn bad_values_name_the_field_line_and_fix() {
        let cases = [
            ("mem: 16 GB\n", "`resources.mem`", "16G"),
            ("mem: -1\n", "`resources.mem`", "16G"),
            ("time: 4h\n", "`resources.time`", "4:00:00"),
            ("time: \"1:75:00\"\n", "`resources.time`", "4:00:00"),
            ("time: 0\n", "`resources.time`", "zero"),
            ("cpus: 0\n", "`resources.cpus`", "between 1 and 4096"),
            ("gpus: x\n", "`resources.gpus`", "between 0 and 64"),
            ("partition: \"gpu long\"\n", "`resources.partition`", "sinfo"),
            ("sbatch: --qos=high\n", "`resources.sbatch`", "list"),
            ("sbatch: [\"qos=high\"]\n", "`resources.sbatch`", "starting with `-`"),
            ("sbatch: [\"--qos high\"]\n", "`resources.sbatch`", "joined by `=`"),
            ("sbatch: [\"--job-name=x\"]\n", "`resources.sbatch`", "set by recflow"),
            ("memory: 1G\n", "unknown key `memory`", "allowed: gpus, cpus, mem"),
        ];
        for (yaml, field, fix) in cases {
            let e = parse(yaml).expect_err(yaml);
            assert!(e.starts_with("p.yaml:1:"), "{yaml:?}: the error carries file:line:col: {e}");
            assert!(e.contains(field) && e.contains(fix), "{yaml:?}: names {field} and says {fix}: {e}");
        }
    }

    #[test]
    fn slurm_time_forms() {
        for ok in ["90", "30:00", "4:00:00", "2-00", "2-12:30", "1-00:00:00", "unlimited"] {
            assert!(check_time(ok).is_ok(), "{ok} is a Slurm time");
        }
        for bad in ["", "1:2:3:4", "a", "1-", "-5", "4h", "00:00"] {
            assert!(check_time(bad).is_err(), "{bad:?} is not a Slurm time");
        }
    }
}
