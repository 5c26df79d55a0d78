//! The pure planning step (DVC's lesson: decide what runs in a function
//! that touches nothing, test it on its own). Given the stages, their
//! upstream edges and the selection flags, it says which stages are
//! *considered* (run when their key has no record) and which are *forced*
//! (run even when cached). Stages outside the selection that a selected
//! stage needs (its ancestors) are only reused; the rest are not touched.
use std::collections::{BTreeMap, BTreeSet};

/// `--only`, `--from`, `--force` (each may name a base stage, covering all its expansions).
#[derive(Debug, Clone, Default)]
pub struct Selection {
    pub only: Vec<String>,
    pub from: Vec<String>,
    pub force: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct Plan {
    /// Stages in order, each with its mode.
    pub stages: Vec<(String, Mode)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Run if its key has no usable record.
    Consider,
    /// Run even when cached.
    Force,
    /// Outside the selection but upstream of it: must already be cached.
    ReuseOnly,
    /// Outside the selection and not needed by it: neither run nor required.
    Skip,
}

/// One stage for planning: name, base name, upstream stage names.
#[derive(Debug, Clone)]
pub struct Node {
    pub name: String,
    pub base: String,
    pub deps: Vec<String>,
}

/// Plans. Errors name a flag's unknown stage.
pub fn plan(nodes: &[Node], sel: &Selection) -> Result<Plan, String> {
    let matches = |pat: &str| -> Result<BTreeSet<String>, String> {
        let m: BTreeSet<String> = nodes.iter().filter(|n| n.name == pat || n.base == pat).map(|n| n.name.clone()).collect();
        if m.is_empty() {
            let names: Vec<&str> = nodes.iter().map(|n| n.base.as_str()).collect::<BTreeSet<_>>().into_iter().collect();
            return Err(format!("no stage `{pat}` in this pipeline (stages: {})", names.join(", ")));
        }
        Ok(m)
    };
    let mut down: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    let mut up: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for n in nodes {
        for d in &n.deps {
            down.entry(d.as_str()).or_default().push(n.name.as_str());
            up.entry(n.name.as_str()).or_default().push(d.as_str());
        }
    }
    // The closure of `start` under `edges` (start included).
    let closure = |start: &BTreeSet<String>, edges: &BTreeMap<&str, Vec<&str>>| -> BTreeSet<String> {
        let mut seen: BTreeSet<String> = start.clone();
        let mut stack: Vec<String> = start.iter().cloned().collect();
        while let Some(s) = stack.pop() {
            for d in edges.get(s.as_str()).into_iter().flatten() {
                if seen.insert(d.to_string()) {
                    stack.push(d.to_string());
                }
            }
        }
        seen
    };
    let descendants = |start: &BTreeSet<String>| closure(start, &down);
    let mut only = BTreeSet::new();
    for o in &sel.only {
        only.extend(matches(o)?);
    }
    let mut forced = BTreeSet::new();
    for f in &sel.force {
        forced.extend(matches(f)?);
    }
    let mut from = BTreeSet::new();
    for f in &sel.from {
        from.extend(matches(f)?);
    }
    // `--from S`: S and everything downstream of it rerun.
    let from_set = descendants(&from);
    forced.extend(from_set.iter().cloned());
    let selected: Option<BTreeSet<String>> = if !only.is_empty() {
        Some(only)
    } else if !from_set.is_empty() {
        Some(from_set)
    } else {
        None
    };
    // What the selection needs: itself and everything upstream of it.
    let needed = selected.as_ref().map(|s| closure(s, &up));
    let stages = nodes
        .iter()
        .map(|n| {
            let in_sel = selected.as_ref().is_none_or(|s| s.contains(&n.name));
            let mode = if needed.as_ref().is_some_and(|nd| !nd.contains(&n.name)) {
                Mode::Skip
            } else if !in_sel {
                Mode::ReuseOnly
            } else if forced.contains(&n.name) {
                Mode::Force
            } else {
                Mode::Consider
            };
            (n.name.clone(), mode)
        })
        .collect();
    Ok(Plan { stages })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chain() -> Vec<Node> {
        let n = |name: &str, base: &str, deps: &[&str]| Node {
            name: name.into(),
            base: base.into(),
            deps: deps.iter().map(|s| s.to_string()).collect(),
        };
        vec![n("a", "a", &[]), n("b@k=1", "b", &["a"]), n("b@k=2", "b", &["a"]), n("c", "c", &["b@k=1", "b@k=2"])]
    }

    fn modes(p: &Plan) -> Vec<Mode> {
        p.stages.iter().map(|s| s.1).collect()
    }

    #[test]
    fn default_considers_everything() {
        let p = plan(&chain(), &Selection::default()).unwrap();
        assert!(modes(&p).iter().all(|m| *m == Mode::Consider), "no flags: every stage is considered");
    }

    #[test]
    fn only_restricts_and_from_forces_descendants() {
        let p = plan(&chain(), &Selection { only: vec!["b".into()], ..Default::default() }).unwrap();
        assert_eq!(
            modes(&p),
            vec![Mode::ReuseOnly, Mode::Consider, Mode::Consider, Mode::Skip],
            "--only b covers its expansions only, reuses what they need, leaves the rest alone"
        );
        let p = plan(&chain(), &Selection { from: vec!["b@k=1".into()], ..Default::default() }).unwrap();
        assert_eq!(
            modes(&p),
            vec![Mode::ReuseOnly, Mode::Force, Mode::ReuseOnly, Mode::Force],
            "--from forces the stage and its descendants; b@k=2 feeds c, so it is reused"
        );
        let p = plan(&chain(), &Selection { only: vec!["b@k=2".into()], ..Default::default() }).unwrap();
        assert_eq!(modes(&p), vec![Mode::ReuseOnly, Mode::Skip, Mode::Consider, Mode::Skip], "a sibling expansion is not needed");
        let p = plan(&chain(), &Selection { force: vec!["a".into()], ..Default::default() }).unwrap();
        assert_eq!(p.stages[0].1, Mode::Force, "--force forces only the named stage");
        assert_eq!(p.stages[3].1, Mode::Consider, "downstream of a forced stage still uses early cutoff");
        assert!(plan(&chain(), &Selection { only: vec!["zz".into()], ..Default::default() }).is_err(), "unknown stage in a flag is an error");
    }
}
