//! The stage DAG (petgraph): stable topological order, cycles named, and
//! `recflow dag` renderings (text, Graphviz dot, Mermaid).
use std::collections::BTreeMap;

use petgraph::graph::{DiGraph, NodeIndex};
use petgraph::Direction;

use super::resolved::{InputRef, Pipeline};

/// Topological order of `nodes` under `edges` (from → to), ties broken by
/// the order of `nodes` (the file's order). On a cycle, returns it as
/// `[a, b, …, a]`.
pub fn topo_or_cycle(nodes: &[String], edges: &[(String, String)]) -> Result<Vec<String>, Vec<String>> {
    let mut g: DiGraph<String, ()> = DiGraph::new();
    let idx: BTreeMap<&str, NodeIndex> = nodes.iter().map(|n| (n.as_str(), g.add_node(n.clone()))).collect();
    for (a, b) in edges {
        if let (Some(&x), Some(&y)) = (idx.get(a.as_str()), idx.get(b.as_str())) {
            g.update_edge(x, y, ());
        }
    }
    // Kahn with a stable "lowest file position first" choice.
    let mut indeg: Vec<usize> = g.node_indices().map(|n| g.neighbors_directed(n, Direction::Incoming).count()).collect();
    let mut ready: std::collections::BTreeSet<usize> = (0..nodes.len()).filter(|&i| indeg[i] == 0).collect();
    let mut order = Vec::new();
    while let Some(i) = ready.pop_first() {
        order.push(nodes[i].clone());
        for m in g.neighbors_directed(NodeIndex::new(i), Direction::Outgoing) {
            indeg[m.index()] -= 1;
            if indeg[m.index()] == 0 {
                ready.insert(m.index());
            }
        }
    }
    if order.len() == nodes.len() {
        return Ok(order);
    }
    // Name one cycle: an SCC with more than one node (or a self-loop), then walk it.
    for scc in petgraph::algo::tarjan_scc(&g) {
        let cyclic = scc.len() > 1 || g.find_edge(scc[0], scc[0]).is_some();
        if !cyclic {
            continue;
        }
        let start = *scc.iter().min_by_key(|n| n.index()).expect("non-empty scc");
        let in_scc = |n: NodeIndex| scc.contains(&n);
        let mut path = vec![start];
        let mut seen = std::collections::BTreeSet::from([start]);
        let mut cur = start;
        loop {
            let mut nexts: Vec<NodeIndex> = g.neighbors_directed(cur, Direction::Outgoing).filter(|n| in_scc(*n)).collect();
            nexts.sort_by_key(|n| n.index());
            if nexts.contains(&start) {
                path.push(start);
                break;
            }
            let Some(n) = nexts.into_iter().find(|n| !seen.contains(n)) else { break };
            seen.insert(n);
            path.push(n);
            cur = n;
        }
        return Err(path.into_iter().map(|n| g[n].clone()).collect());
    }
    Err(vec![])
}

/// Output format of `recflow dag`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DagFormat {
    Text,
    Dot,
    Mermaid,
}

/// Edges of a resolved pipeline: (upstream, downstream, output name).
pub fn edges(p: &Pipeline) -> Vec<(String, String, String)> {
    let mut v = Vec::new();
    for s in &p.stages {
        for refs in s.inputs.values() {
            for r in refs {
                if let InputRef::Output { stage, output } = r {
                    v.push((stage.clone(), s.name.clone(), output.clone()));
                }
            }
        }
    }
    v.sort();
    v.dedup();
    v
}

/// Renders the DAG.
pub fn render(p: &Pipeline, fmt: DagFormat) -> String {
    let es = edges(p);
    let mut out = String::new();
    match fmt {
        DagFormat::Text => {
            for s in &p.stages {
                let ups: Vec<String> = es.iter().filter(|e| e.1 == s.name).map(|e| format!("{}.{}", e.0, e.2)).collect();
                if ups.is_empty() {
                    out.push_str(&format!("{} ({})\n", s.name, s.kind()));
                } else {
                    out.push_str(&format!("{} ({}) <- {}\n", s.name, s.kind(), ups.join(", ")));
                }
            }
        }
        DagFormat::Dot => {
            out.push_str(&format!("digraph \"{}\" {{\n  rankdir=LR;\n", p.name));
            for s in &p.stages {
                out.push_str(&format!("  \"{}\" [label=\"{}\\n({})\"];\n", s.name, s.name, s.kind()));
            }
            for (a, b, o) in &es {
                out.push_str(&format!("  \"{a}\" -> \"{b}\" [label=\"{o}\"];\n"));
            }
            out.push_str("}\n");
        }
        DagFormat::Mermaid => {
            // Mermaid ids cannot hold `@`, `=` or `,`: number the nodes.
            let id: BTreeMap<&str, usize> = p.stages.iter().enumerate().map(|(i, s)| (s.name.as_str(), i)).collect();
            out.push_str("flowchart LR\n");
            for (i, s) in p.stages.iter().enumerate() {
                out.push_str(&format!("  s{i}[\"{} ({})\"]\n", s.name, s.kind()));
            }
            for (a, b, o) in &es {
                out.push_str(&format!("  s{} -->|{o}| s{}\n", id[a.as_str()], id[b.as_str()]));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn order_is_stable_and_cycles_are_named() {
        let nodes = s(&["c", "a", "b"]);
        let e = vec![("a".to_string(), "b".to_string())];
        assert_eq!(topo_or_cycle(&nodes, &e).unwrap(), s(&["c", "a", "b"]), "file order breaks ties");
        let e = vec![("a".into(), "b".into()), ("b".into(), "c".into()), ("c".into(), "a".into())];
        assert_eq!(topo_or_cycle(&nodes, &e).unwrap_err(), s(&["c", "a", "b", "c"]), "the cycle is named in order");
        let e = vec![("a".into(), "a".into())];
        assert_eq!(topo_or_cycle(&nodes, &e).unwrap_err(), s(&["a", "a"]), "self-loop is a cycle");
    }
}
