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
