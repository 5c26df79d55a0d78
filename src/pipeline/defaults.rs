//! Stage defaults and overrides on YAML trees: `stages/KIND.yaml` and
//! `extends:` chains under a stage's `with:`, and the deep merge and dotted
//! `set_path` that `--params` / `--set` use. Nodes keep their positions, so a
//! mistake in a defaults file is reported in that file.
use std::path::Path;

use super::kinds::KindInfo;
use super::normalize;
use super::yaml::{self, Node, Pos, Val};
use super::PipelineError;

/// Loads `with:` defaults for a kind: `extends:` (relative to the pipeline,
/// else the project root) or `ROOT/stages/KIND.yaml`; a defaults file may
/// itself `extends:` another.
pub(super) fn load_defaults(
    file: &Path,
    dir: &Path,
    root: &Path,
    kind: &str,
    extends: Option<&(String, Pos)>,
    info: &KindInfo,
    depth: usize,
) -> Result<Node, PipelineError> {
    let empty = Node::new(Pos::default(), Val::Map(vec![]));
    if depth > 8 {
        return Err(PipelineError::new(file, Pos::default(), "`extends:` chain is too long (a loop?)"));
    }
    let path = match extends {
        Some((p, pos)) => {
            let a = normalize(&dir.join(p));
            let b = normalize(&root.join(p));
            if a.is_file() {
                a
            } else if b.is_file() {
                b
            } else {
                return Err(PipelineError::new(file, *pos, format!("defaults file `{p}` not found (looked in {} and {})", dir.display(), root.display())));
            }
        }
        None => {
            let p = root.join("stages").join(format!("{kind}.yaml"));
            if !p.is_file() {
                return Ok(empty);
            }
            p
        }
    };
    let mut n = yaml::load(&path).map_err(|(loc, msg)| PipelineError { loc, msg })?;
    if matches!(n.val, Val::Null) {
        return Ok(empty);
    }
    if !matches!(n.val, Val::Map(_)) {
        return Err(PipelineError::new(&path, n.pos, format!("a defaults file holds the `with:` mapping of kind `{kind}`")));
    }
    let fdir = path.parent().unwrap_or(root).to_path_buf();
    let mut base = empty;
    if let Val::Map(m) = &mut n.val {
        if let Some(i) = m.iter().position(|(k, _, _)| k == "extends") {
            let (_, _, e) = m.remove(i);
            let s = e.as_str().ok_or_else(|| PipelineError::new(&path, e.pos, "`extends` must be a path"))?;
            base = load_defaults(&path, &fdir, root, kind, Some(&(s.to_string(), e.pos)), info, depth + 1)?;
        }
        // Path fields in a defaults file are relative to that file.
        for pf in &info.path_fields {
            let parts: Vec<&str> = pf.split('.').collect();
            abs_field(m, &parts, &fdir);
        }
    }
    merge(&mut base, &n);
    Ok(base)
}

/// Makes the path-valued field at `parts` absolute relative to `fdir`.
fn abs_field(m: &mut [(String, Pos, Node)], parts: &[&str], fdir: &Path) {
    let Some((_, _, node)) = m.iter_mut().find(|(k, _, _)| k == parts[0]) else { return };
    if parts.len() > 1 {
        if let Val::Map(mm) = &mut node.val {
            abs_field(mm, &parts[1..], fdir);
        }
        return;
    }
    if let Val::Str(s) = &mut node.val {
        if !s.contains("${") && !s.is_empty() {
            *s = normalize(&fdir.join(&*s)).to_string_lossy().into_owned();
        }
    }
}


/// Deep-merges `over` into `base`: mappings key by key (new keys appended in
/// `over`'s order), anything else replaced whole.
pub(super) fn merge(base: &mut Node, over: &Node) {
    if let (Val::Map(b), Val::Map(o)) = (&mut base.val, &over.val) {
        for (k, p, v) in o {
            match b.iter_mut().find(|(bk, _, _)| bk == k) {
                Some((_, _, bv)) => merge(bv, v),
                None => b.push((k.clone(), *p, v.clone())),
            }
        }
    } else {
        *base = over.clone();
    }
}

/// Sets the dotted `path` under `node` to `value`, creating mappings on the
/// way (and replacing a non-mapping in the way): what `--set` does.
pub(super) fn set_path(node: &mut Node, path: &[&str], value: Node) {
    if !matches!(node.val, Val::Map(_)) {
        node.val = Val::Map(vec![]);
    }
    let Val::Map(m) = &mut node.val else { return };
    let (head, tail) = (path[0], &path[1..]);
    let idx = match m.iter().position(|(k, _, _)| k == head) {
        Some(i) => i,
        None => {
            m.push((head.to_string(), value.pos, Node::new(value.pos, Val::Null)));
            m.len() - 1
        }
    };
    if tail.is_empty() {
        m[idx].2 = value;
    } else {
        set_path(&mut m[idx].2, tail, value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(yaml_text: &str) -> Node {
        yaml::parse(yaml_text).expect("parses")
    }

    /// A kind whose `template` field is a path.
    fn kind() -> KindInfo {
        KindInfo::from_described(&serde_json::json!({"kind": "k", "version": 1, "path_fields": ["template"]})).unwrap()
    }

    #[test]
    fn merge_is_deep_and_set_path_builds_what_is_missing() {
        let mut base = node("a: {x: 1, y: 2}\nb: [1, 2]");
        merge(&mut base, &node("a: {y: 3, z: 4}\nb: [9]\nc: new"));
        assert_eq!(base.to_json(), serde_json::json!({"a": {"x": 1, "y": 3, "z": 4}, "b": [9], "c": "new"}), "maps merge, lists replace");
        let mut n = node("a: 1");
        set_path(&mut n, &["a", "b"], node("2"));
        set_path(&mut n, &["c", "d", "e"], node("[x]"));
        assert_eq!(n.to_json(), serde_json::json!({"a": {"b": 2}, "c": {"d": {"e": ["x"]}}}), "a scalar in the way becomes a mapping");
    }

    #[test]
    fn extends_chains_and_path_fields_are_relative_to_each_file() {
        let d = tempfile::tempdir().unwrap();
        let (root, dir) = (d.path(), d.path().join("sub"));
        std::fs::create_dir_all(root.join("shared")).unwrap();
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(root.join("shared/base.yaml"), "template: t.md\nlr: 1\ndepth: 3\n").unwrap();
        std::fs::write(dir.join("mine.yaml"), "extends: ../shared/base.yaml\nlr: 2\n").unwrap();
        let file = dir.join("p.yaml");
        let ext = |p: &str| Some((p.to_string(), Pos { line: 4, col: 14 }));
        let got = load_defaults(&file, &dir, root, "k", ext("mine.yaml").as_ref(), &kind(), 0).unwrap().to_json();
        let template = root.join("shared/t.md").to_string_lossy().into_owned();
        assert_eq!(got, serde_json::json!({"template": template, "lr": 2, "depth": 3}), "the nearer file wins; `extends` itself is gone");
        let from_root = load_defaults(&file, &dir, root, "k", ext("shared/base.yaml").as_ref(), &kind(), 0).unwrap();
        assert_eq!(from_root.to_json()["lr"], 1, "not beside the pipeline → looked up from the project root");
        let e = load_defaults(&file, &dir, root, "k", ext("nope.yaml").as_ref(), &kind(), 0).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!("{}:4:14: defaults file `nope.yaml` not found (looked in {} and {})", file.display(), dir.display(), root.display())
        );
    }

    #[test]
    fn kind_defaults_are_optional_and_an_extends_loop_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let file = d.path().join("p.yaml");
        let none = load_defaults(&file, d.path(), d.path(), "k", None, &kind(), 0).unwrap();
        assert_eq!(none.to_json(), serde_json::json!({}), "no stages/k.yaml → no defaults");
        std::fs::create_dir_all(d.path().join("stages")).unwrap();
        std::fs::write(d.path().join("stages/k.yaml"), "extends: k.yaml\n").unwrap();
        let e = load_defaults(&file, d.path(), d.path(), "k", None, &kind(), 0).unwrap_err();
        assert_eq!(e.msg, "`extends:` chain is too long (a loop?)");
    }
}
