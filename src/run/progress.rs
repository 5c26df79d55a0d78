//! Progress of a running stage as plain lines, for places without a
//! terminal: batch jobs, CI, `recflow run … > run.log`. There the progress
//! bars draw nothing, so every `--progress-interval` seconds the runner
//! prints one line per running stage (steps or items done, rate, ETA) and
//! appends the same line to the stage's log, so `tail -f` on a compute
//! node's log shows where a stage is. On a terminal the bars stay and only
//! the log gets the lines.
//!
//! [`StageProgress`] keeps what the stage's `{"progress": …}` events said;
//! the rate is measured from the first event of this attempt (a resumed
//! stage starts counting at its checkpoint, not at zero).
use std::time::{Duration, Instant};

/// Default seconds between two progress lines.
pub const DEFAULT_INTERVAL_S: f64 = 30.0;

/// What one stage's progress events said so far.
#[derive(Debug, Clone)]
pub struct StageProgress {
    started: Instant,
    /// The first event of this attempt: when, and how much was done then.
    first: Option<(Instant, u64)>,
    done: u64,
    total: Option<u64>,
    unit: String,
}

impl StageProgress {
    pub fn new(started: Instant) -> Self {
        StageProgress { started, first: None, done: 0, total: None, unit: String::new() }
    }

    /// Records a `{"progress": {"done", "total", "unit"}}` event.
    pub fn update(&mut self, now: Instant, done: u64, total: Option<u64>, unit: &str) {
        if self.first.is_none() {
            self.first = Some((now, done));
        }
        self.done = done;
        if total.is_some() {
            self.total = total;
        }
        if !unit.is_empty() {
            self.unit = unit.to_string();
        }
    }

    /// Units per second since the first event (None before two points in time).
    pub fn rate(&self, now: Instant) -> Option<f64> {
        let (t0, d0) = self.first?;
        let dt = now.duration_since(t0).as_secs_f64();
        (dt >= 0.5 && self.done > d0).then(|| (self.done - d0) as f64 / dt)
    }

    /// One line: `120/500 step (24%), 3.21 step/s, eta 1m58s, running 2m10s`.
    pub fn line(&self, now: Instant) -> String {
        let running = fmt_duration(now.duration_since(self.started));
        if self.first.is_none() {
            return format!("running {running} (no progress reported yet)");
        }
        let unit = if self.unit.is_empty() { "done" } else { self.unit.as_str() };
        let rate = self.rate(now);
        let mut s = match self.total {
            Some(t) if t > 0 => format!("{}/{t} {unit} ({:.0}%)", self.done, 100.0 * self.done as f64 / t as f64),
            _ => format!("{} {unit}", self.done),
        };
        match rate {
            Some(r) => {
                s.push_str(&format!(", {} {unit}/s", fmt_rate(r)));
                if let Some(t) = self.total.filter(|t| *t > self.done) {
                    s.push_str(&format!(", eta {}", fmt_duration(Duration::from_secs_f64((t - self.done) as f64 / r))));
                }
            }
            None => s.push_str(", rate not known yet"),
        }
        s.push_str(&format!(", running {running}"));
        s
    }
}

/// `0.012`, `3.21`, `45.2`, `1234` — about three significant digits.
pub fn fmt_rate(r: f64) -> String {
    if r >= 100.0 {
        format!("{r:.0}")
    } else if r >= 10.0 {
        format!("{r:.1}")
    } else if r >= 1.0 {
        format!("{r:.2}").trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        format!("{r:.3}").trim_end_matches('0').trim_end_matches('.').to_string()
    }
}

/// `42s`, `3m05s`, `2h07m`, `3d04h`.
pub fn fmt_duration(d: Duration) -> String {
    let s = d.as_secs();
    if s < 60 {
        format!("{s}s")
    } else if s < 3600 {
        format!("{}m{:02}s", s / 60, s % 60)
    } else if s < 86400 {
        format!("{}h{:02}m", s / 3600, (s % 3600) / 60)
    } else {
        format!("{}d{:02}h", s / 86400, (s % 86400) / 3600)
    }
}

/// The `--progress-interval` value: seconds, 0 turns the lines off.
pub fn interval(seconds: f64) -> Result<Option<Duration>, String> {
    if !seconds.is_finite() || seconds < 0.0 {
        return Err(format!("--progress-interval {seconds}: give seconds ≥ 0 (0 turns the progress lines off)"));
    }
    Ok((seconds > 0.0).then(|| Duration::from_secs_f64(seconds)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_says_done_rate_and_eta() {
        let t0 = Instant::now();
        let mut p = StageProgress::new(t0);
        assert_eq!(p.line(t0 + Duration::from_secs(5)), "running 5s (no progress reported yet)", "before any event: only the time");
        // A resumed stage: its first event says 100 were done already.
        p.update(t0 + Duration::from_secs(10), 100, Some(500), "step");
        p.update(t0 + Duration::from_secs(60), 200, None, "");
        let l = p.line(t0 + Duration::from_secs(60));
        // 100 steps in 50 s = 2 step/s; 300 left → 150 s.
        assert_eq!(l, "200/500 step (40%), 2 step/s, eta 2m30s, running 1m00s", "rate from this attempt's first event, total and unit kept");
    }

    #[test]
    fn without_total_no_eta() {
        let t0 = Instant::now();
        let mut p = StageProgress::new(t0);
        p.update(t0, 0, None, "item");
        p.update(t0 + Duration::from_secs(4), 1000, None, "item");
        assert_eq!(p.line(t0 + Duration::from_secs(4)), "1000 item, 250 item/s, running 4s");
        let mut q = StageProgress::new(t0);
        q.update(t0, 3, Some(10), "row");
        assert_eq!(q.line(t0), "3/10 row (30%), rate not known yet, running 0s", "one event: no rate yet");
    }

    #[test]
    fn formats() {
        assert_eq!(fmt_duration(Duration::from_secs(7325)), "2h02m");
        assert_eq!(fmt_duration(Duration::from_secs(90000)), "1d01h");
        assert_eq!(fmt_rate(3.2104), "3.21");
        assert_eq!(fmt_rate(2.0), "2");
        assert_eq!(fmt_rate(1.012), "1.01");
        assert_eq!(fmt_rate(0.0123), "0.012");
        assert_eq!(fmt_rate(45.27), "45.3");
        assert_eq!(fmt_rate(1234.4), "1234");
        assert!(interval(-1.0).is_err());
        assert_eq!(interval(0.0), Ok(None), "0 turns the lines off");
    }
}
