//! Minimal inline SVG plots for the report: line charts and the DAG. Output
//! is a pure function of the data (fixed number formatting, no ids from
//! time or randomness), so reports are byte-identical across reruns.

/// Escapes text for HTML/SVG.
pub fn esc(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '"' => o.push_str("&quot;"),
            '\'' => o.push_str("&#39;"),
            c => o.push(c),
        }
    }
    o
}

const COLORS: [&str; 6] = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf"];

/// Short tick label.
fn tick(v: f64) -> String {
    let a = v.abs();
    if a != 0.0 && !(1e-3..1e5).contains(&a) {
        format!("{v:.2e}")
    } else if a >= 100.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.3}")
    }
}

/// A line chart of named series of (x, y) points (non-finite points skipped).
pub fn line_chart(title: &str, x_label: &str, series: &[(String, Vec<(f64, f64)>)]) -> String {
    let (w, h, l, r, t, b) = (560.0, 260.0, 64.0, 16.0, 28.0, 40.0);
    let pts: Vec<(f64, f64)> = series.iter().flat_map(|s| s.1.iter().copied()).filter(|p| p.0.is_finite() && p.1.is_finite()).collect();
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" viewBox=\"0 0 {w} {h}\" role=\"img\"><title>{}</title>\
<text x=\"{}\" y=\"18\" font-size=\"14\" text-anchor=\"middle\">{}</text>",
        esc(title),
        w / 2.0,
        esc(title)
    );
    if pts.is_empty() {
        svg.push_str(&format!("<text x=\"{}\" y=\"{}\" font-size=\"12\" text-anchor=\"middle\" fill=\"#888\">no data</text></svg>", w / 2.0, h / 2.0));
        return svg;
    }
    let (mut x0, mut x1, mut y0, mut y1) = (f64::INFINITY, f64::NEG_INFINITY, f64::INFINITY, f64::NEG_INFINITY);
    for (x, y) in &pts {
        x0 = x0.min(*x);
        x1 = x1.max(*x);
        y0 = y0.min(*y);
        y1 = y1.max(*y);
    }
    if x1 == x0 {
        x1 = x0 + 1.0;
    }
    if y1 == y0 {
        y0 -= 0.5;
        y1 += 0.5;
    }
    let pw = w - l - r;
    let ph = h - t - b;
    let sx = |x: f64| l + (x - x0) / (x1 - x0) * pw;
    let sy = |y: f64| t + (1.0 - (y - y0) / (y1 - y0)) * ph;
    // Axes and ticks (5 per axis).
    svg.push_str(&format!(
        "<g stroke=\"#444\" stroke-width=\"1\"><line x1=\"{l}\" y1=\"{:.1}\" x2=\"{:.1}\" y2=\"{:.1}\"/><line x1=\"{l}\" y1=\"{t}\" x2=\"{l}\" y2=\"{:.1}\"/></g>",
        t + ph, l + pw, t + ph, t + ph
    ));
    for k in 0..5 {
        let fy = y0 + (y1 - y0) * k as f64 / 4.0;
        let fx = x0 + (x1 - x0) * k as f64 / 4.0;
        svg.push_str(&format!(
            "<text x=\"{:.1}\" y=\"{:.1}\" font-size=\"10\" text-anchor=\"end\">{}</text><line x1=\"{l}\" y1=\"{:.1}\" x2=\"{:.1}\" y2=\"{:.1}\" stroke=\"#eee\"/>",
            l - 4.0, sy(fy) + 3.0, tick(fy), sy(fy), l + pw, sy(fy)
        ));
        svg.push_str(&format!("<text x=\"{:.1}\" y=\"{:.1}\" font-size=\"10\" text-anchor=\"middle\">{}</text>", sx(fx), t + ph + 14.0, tick(fx)));
    }
    svg.push_str(&format!("<text x=\"{:.1}\" y=\"{:.1}\" font-size=\"11\" text-anchor=\"middle\">{}</text>", l + pw / 2.0, h - 6.0, esc(x_label)));
    for (k, (name, s)) in series.iter().enumerate() {
        let c = COLORS[k % COLORS.len()];
        let path: Vec<String> = s.iter().filter(|p| p.0.is_finite() && p.1.is_finite()).map(|(x, y)| format!("{:.1},{:.1}", sx(*x), sy(*y))).collect();
        if path.len() == 1 {
            svg.push_str(&format!("<circle cx=\"{}\" cy=\"{}\" r=\"3\" fill=\"{c}\"/>", path[0].split(',').next().unwrap_or("0"), path[0].split(',').nth(1).unwrap_or("0")));
        } else if !path.is_empty() {
            svg.push_str(&format!("<polyline fill=\"none\" stroke=\"{c}\" stroke-width=\"1.5\" points=\"{}\"/>", path.join(" ")));
        }
        svg.push_str(&format!(
            "<rect x=\"{:.1}\" y=\"{:.1}\" width=\"10\" height=\"3\" fill=\"{c}\"/><text x=\"{:.1}\" y=\"{:.1}\" font-size=\"10\">{}</text>",
            l + 8.0, t + 6.0 + 13.0 * k as f64, l + 22.0, t + 10.0 + 13.0 * k as f64, esc(name)
        ));
    }
    svg.push_str("</svg>");
    svg
}

/// A layered drawing of a DAG given as edges `(from, to)`: nodes placed by
/// longest-path depth (columns), in sorted order within a column.
pub fn dag(edges: &[(String, String)]) -> String {
    let mut nodes: Vec<String> = edges.iter().flat_map(|(a, b)| [a.clone(), b.clone()]).collect();
    nodes.sort();
    nodes.dedup();
    let idx = |n: &str| nodes.binary_search_by(|x| x.as_str().cmp(n)).unwrap_or(0);
    let mut depth = vec![0usize; nodes.len()];
    // Longest-path layering by relaxation (|V| rounds suffice for a DAG; a
    // cycle simply stops growing after |V| rounds).
    for _ in 0..nodes.len() {
        let mut changed = false;
        for (a, b) in edges {
            let (ia, ib) = (idx(a), idx(b));
            if depth[ib] < depth[ia] + 1 && depth[ia] < nodes.len() {
                depth[ib] = depth[ia] + 1;
                changed = true;
            }
        }
        if !changed {
            break;
        }
    }
    let cols = depth.iter().copied().max().map_or(0, |d| d + 1);
    let mut rows_in = vec![0usize; cols];
    let mut pos = vec![(0usize, 0usize); nodes.len()];
    for (i, d) in depth.iter().enumerate() {
        pos[i] = (*d, rows_in[*d]);
        rows_in[*d] += 1;
    }
    let (bw, bh, gx, gy) = (120.0, 26.0, 40.0, 14.0);
    let max_rows = rows_in.iter().copied().max().unwrap_or(1).max(1);
    let w = cols as f64 * (bw + gx) + 10.0;
    let h = max_rows as f64 * (bh + gy) + 10.0;
    let at = |i: usize| (5.0 + pos[i].0 as f64 * (bw + gx), 5.0 + pos[i].1 as f64 * (bh + gy));
    let mut svg = format!("<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w:.0}\" height=\"{h:.0}\" viewBox=\"0 0 {w:.0} {h:.0}\"><title>pipeline DAG</title>");
    for (a, b) in edges {
        let ((ax, ay), (bx, by)) = (at(idx(a)), at(idx(b)));
        svg.push_str(&format!(
            "<line x1=\"{:.1}\" y1=\"{:.1}\" x2=\"{:.1}\" y2=\"{:.1}\" stroke=\"#888\"/><circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"2.5\" fill=\"#888\"/>",
            ax + bw, ay + bh / 2.0, bx, by + bh / 2.0, bx, by + bh / 2.0
        ));
    }
    for (i, n) in nodes.iter().enumerate() {
        let (x, y) = at(i);
        let label: String = if n.chars().count() > 18 { n.chars().take(17).collect::<String>() + "…" } else { n.clone() };
        svg.push_str(&format!(
            "<rect x=\"{x:.1}\" y=\"{y:.1}\" width=\"{bw}\" height=\"{bh}\" rx=\"4\" fill=\"#f3f6fa\" stroke=\"#345\"/><text x=\"{:.1}\" y=\"{:.1}\" font-size=\"11\" text-anchor=\"middle\"><title>{}</title>{}</text>",
            x + bw / 2.0, y + bh / 2.0 + 4.0, esc(n), esc(&label)
        ));
    }
    svg.push_str("</svg>");
    svg
}

/// Parses edges from mermaid-like or plain text: lines `a --> b`, `a -> b`
/// (a chain `a --> b --> c` gives two edges); other lines (`graph TD`,
/// comments) are ignored. Node labels in brackets (`a[label]`) are dropped.
pub fn parse_edges(text: &str) -> Vec<(String, String)> {
    let clean = |s: &str| -> String {
        let s = s.trim().trim_matches(';').trim();
        let s = s.split(['[', '(', '{']).next().unwrap_or(s);
        s.trim().trim_matches('"').to_string()
    };
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with("%%") || line.starts_with('#') {
            continue;
        }
        let parts: Vec<String> = line.replace("-->", "->").split("->").map(clean).collect();
        if parts.len() < 2 || parts.iter().any(|p| p.is_empty()) {
            continue;
        }
        for w in parts.windows(2) {
            out.push((w[0].clone(), w[1].clone()));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_mermaid_and_plain_edges() {
        let e = parse_edges("graph TD\n  a[Ingest] --> b\n%% comment\nb -> c -> d;\nnot an edge\n");
        let want: Vec<(String, String)> = [("a", "b"), ("b", "c"), ("c", "d")].iter().map(|(x, y)| (x.to_string(), y.to_string())).collect();
        assert_eq!(e, want, "mermaid arrows, chains and labels");
        assert!(dag(&e).contains(">d</text>"), "every node is drawn");
    }

    #[test]
    fn chart_escapes_and_handles_empty() {
        let s = line_chart("a<b", "step", &[("r".into(), vec![(0.0, 1.0), (1.0, f64::NAN), (2.0, 2.0)])]);
        assert!(s.contains("a&lt;b") && !s.contains("a<b"), "titles are escaped");
        assert!(s.contains("<polyline"), "finite points are drawn");
        assert!(line_chart("x", "step", &[]).contains("no data"), "an empty chart says so");
    }
}
