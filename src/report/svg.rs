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

/// "Nice" tick positions covering `[lo, hi]`: multiples of 1, 2 or 5 × 10^k,
/// at most `max_n` of them; with `integer` the step is a whole number (step
/// axes). Returns (ticks, step).
pub fn nice_ticks(lo: f64, hi: f64, max_n: usize, integer: bool) -> (Vec<f64>, f64) {
    let span = (hi - lo).abs().max(f64::MIN_POSITIVE);
    let raw = span / (max_n.max(2) - 1) as f64;
    let mag = 10f64.powf(raw.log10().floor());
    let mut step = [1.0, 2.0, 5.0, 10.0].iter().map(|m| m * mag).find(|st| *st >= raw).unwrap_or(10.0 * mag);
    if integer {
        step = step.max(1.0).round();
    }
    let first = (lo / step).ceil();
    let ticks = (0..=max_n * 2)
        .map(|k| (first + k as f64) * step)
        .take_while(|t| *t <= hi + step * 1e-9)
        .map(|t| if t.abs() < step * 1e-9 { 0.0 } else { t })
        .collect();
    (ticks, step)
}

/// Tick label with as many decimals as the tick step needs.
fn tick(v: f64, step: f64) -> String {
    let a = v.abs();
    if a != 0.0 && !(1e-3..1e5).contains(&a) {
        return format!("{v:.2e}");
    }
    let d = if step >= 1.0 { 0 } else { (-step.log10().floor()) as usize };
    format!("{v:.d$}")
}

/// Value label of a single point (3 significant decimals at most).
fn value_label(v: f64) -> String {
    let a = v.abs();
    if a != 0.0 && !(1e-3..1e5).contains(&a) {
        format!("{v:.2e}")
    } else if a >= 100.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.3}")
    }
}

/// A line chart of named series of (x, y) points (non-finite points
/// skipped). `x_label` "step" gives integer x ticks. The legend sits above
/// the plot area (never on the curves); a series with a single point is
/// drawn as a dot labelled with its value (and, when it is the chart's only
/// x, the axis spans one step either side of it).
pub fn line_chart(title: &str, x_label: &str, series: &[(String, Vec<(f64, f64)>)]) -> String {
    let integer_x = x_label == "step";
    let (w, h, l, r, t, b) = (560.0, 270.0, 64.0, 16.0, 44.0, 40.0);
    let finite = |p: &&(f64, f64)| p.0.is_finite() && p.1.is_finite();
    let pts: Vec<(f64, f64)> = series.iter().flat_map(|s| s.1.iter().filter(finite).copied()).collect();
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
        x0 -= 1.0;
        x1 += 1.0;
    }
    if y1 == y0 {
        let pad = if y0 == 0.0 { 0.5 } else { y0.abs() * 0.05 };
        y0 -= pad;
        y1 += pad;
    }
    let pw = w - l - r;
    let ph = h - t - b;
    let sx = |x: f64| l + (x - x0) / (x1 - x0) * pw;
    let sy = |y: f64| t + (1.0 - (y - y0) / (y1 - y0)) * ph;
    svg.push_str(&format!(
        "<g stroke=\"#444\" stroke-width=\"1\"><line x1=\"{l}\" y1=\"{:.1}\" x2=\"{:.1}\" y2=\"{:.1}\"/><line x1=\"{l}\" y1=\"{t}\" x2=\"{l}\" y2=\"{:.1}\"/></g>",
        t + ph, l + pw, t + ph, t + ph
    ));
    let (yt, ys) = nice_ticks(y0, y1, 5, false);
    for fy in yt {
        svg.push_str(&format!(
            "<text x=\"{:.1}\" y=\"{:.1}\" font-size=\"10\" text-anchor=\"end\">{}</text><line x1=\"{l}\" y1=\"{:.1}\" x2=\"{:.1}\" y2=\"{:.1}\" stroke=\"#eee\"/>",
            l - 4.0, sy(fy) + 3.0, tick(fy, ys), sy(fy), l + pw, sy(fy)
        ));
    }
    let (xt, xs) = nice_ticks(x0, x1, 7, integer_x);
    for fx in xt {
        svg.push_str(&format!(
            "<text x=\"{:.1}\" y=\"{:.1}\" font-size=\"10\" text-anchor=\"middle\">{}</text><line x1=\"{:.1}\" y1=\"{:.1}\" x2=\"{:.1}\" y2=\"{:.1}\" stroke=\"#444\"/>",
            sx(fx), t + ph + 14.0, tick(fx, xs), sx(fx), t + ph, sx(fx), t + ph + 3.0
        ));
    }
    svg.push_str(&format!("<text x=\"{:.1}\" y=\"{:.1}\" font-size=\"11\" text-anchor=\"middle\">{}</text>", l + pw / 2.0, h - 6.0, esc(x_label)));
    // Legend: one row between the title and the plot area.
    let mut lx = l;
    for (k, (name, _)) in series.iter().enumerate() {
        let c = COLORS[k % COLORS.len()];
        svg.push_str(&format!(
            "<rect x=\"{lx:.1}\" y=\"29\" width=\"12\" height=\"3\" fill=\"{c}\"/><text x=\"{:.1}\" y=\"34\" font-size=\"10\">{}</text>",
            lx + 16.0, esc(name)
        ));
        lx += 16.0 + 6.0 * name.chars().count() as f64 + 18.0;
    }
    for (k, (name, s)) in series.iter().enumerate() {
        let c = COLORS[k % COLORS.len()];
        let p: Vec<(f64, f64)> = s.iter().filter(finite).map(|(x, y)| (sx(*x), sy(*y))).collect();
        if p.len() == 1 {
            let ((cx, cy), (x, y)) = (p[0], s.iter().find(finite).copied().unwrap_or((0.0, 0.0)));
            let xs = if integer_x { format!("step {x:.0}") } else { value_label(x) };
            // Label left of the dot when it sits in the right half.
            let (anchor, dx) = if cx > l + pw / 2.0 { ("end", -7.0) } else { ("start", 7.0) };
            svg.push_str(&format!(
                "<circle cx=\"{cx:.1}\" cy=\"{cy:.1}\" r=\"4\" fill=\"{c}\"><title>{}</title></circle><text x=\"{:.1}\" y=\"{:.1}\" font-size=\"10\" text-anchor=\"{anchor}\" fill=\"{c}\">{} {} ({xs})</text>",
                esc(name), cx + dx, cy - 6.0, esc(name), value_label(y)
            ));
        } else if !p.is_empty() {
            let pts: Vec<String> = p.iter().map(|(x, y)| format!("{x:.1},{y:.1}")).collect();
            svg.push_str(&format!("<polyline fill=\"none\" stroke=\"{c}\" stroke-width=\"1.5\" points=\"{}\"/>", pts.join(" ")));
        }
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

    #[test]
    fn step_axes_have_integer_ticks_and_single_points_are_labelled() {
        let (t, st) = nice_ticks(1.0, 30.0, 7, true);
        assert_eq!(st, 5.0, "30 steps: a tick every 5");
        assert_eq!(t, vec![5.0, 10.0, 15.0, 20.0, 25.0, 30.0]);
        let (t, _) = nice_ticks(29.0, 31.0, 7, true);
        assert_eq!(t, vec![29.0, 30.0, 31.0], "never a fractional step");
        let (t, st) = nice_ticks(0.94, 1.21, 5, false);
        assert!((st - 0.1).abs() < 1e-12 && t.len() == 3, "1.0, 1.1, 1.2: {t:?} {st}");
        let s = line_chart("reward", "step", &[("reward_mean".into(), (1..=30).map(|i| (i as f64, i as f64 / 30.0)).collect())]);
        for bad in [">1.000<", ">8.250<", ">15.500<"] {
            assert!(!s.contains(bad), "no fractional step tick {bad}");
        }
        assert!(s.contains(">15</text>") && s.contains(">30</text>"), "integer step ticks");
        let one = line_chart("validation RMSE", "step", &[("val_rmse".into(), vec![(30.0, 1.1989)])]);
        assert!(one.contains("<circle") && one.contains("val_rmse 1.199 (step 30)"), "a single evaluation is a labelled point: {one}");
        assert!(!one.contains("30.000") && !one.contains("31.000"), "no 30.000–31.000 axis");
        assert!(one.contains(">30</text>"), "its step is a tick");
    }
}
