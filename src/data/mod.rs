//! Data: the pinned tables, raw-format readers, Parquet IO and the leak-free
//! evidence index.
//!
//! * [`schema`] — Arrow schemas of interactions, items, samples, coldstart (pinned).
//! * [`Interaction`], [`Item`], [`Sample`], [`ColdRow`] — row types of those tables;
//!   [`io`] reads and writes them as deterministic Parquet (snappy).
//! * [`raw`] — streaming record readers (plain or `.gz`, JSON lines,
//!   concatenated/pretty-printed objects, Python-dict literals).
//! * [`ingest`] — raw dumps (Amazon 2014/2018/2023, Yelp, MovieLens) →
//!   interactions + items + an audit report; [`synthetic`] generates data.
//! * [`filter`] (k-core), [`split`] (leave-last / chronological / random).
//! * [`history`] — for (user, item, t): the evidence strictly earlier than t
//!   (used by [`prompts`] and by the `cf` teacher).
//! * [`prompts`] — Think-before-Recommendation samples (RecZero, arXiv 2510.23077).
pub mod filter;
pub mod history;
pub mod ingest;
pub mod io;
pub mod prompts;
pub mod raw;
pub mod recbole;
pub mod schema;
pub mod split;
pub mod synthetic;

use serde::{Deserialize, Serialize};

/// One row of the `interactions` table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Interaction {
    pub user_id: String,
    pub item_id: String,
    pub rating: f32,
    /// Seconds since the Unix epoch (UTC).
    pub timestamp: i64,
    pub review_title: Option<String>,
    pub review_text: Option<String>,
}

/// One row of the `items` table.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Item {
    pub item_id: String,
    pub title: Option<String>,
    pub categories: Option<Vec<String>>,
    pub description: Option<String>,
    pub brand: Option<String>,
    pub price: Option<f64>,
}

/// One chat message of a sample's prompt.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

/// One row of the `samples` table (a Think-before-Recommendation prompt).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    pub sample_id: String,
    pub user_id: String,
    pub item_id: String,
    pub timestamp: i64,
    pub messages: Vec<Message>,
    /// The rating the user gave (never shown in the prompt).
    pub target: f32,
    /// User history entries shown in the prompt (after truncation).
    pub user_history_len: i32,
    /// Earlier ratings of the item by others shown in the prompt.
    pub item_history_len: i32,
}

/// One row of the `coldstart` table: the sample (its original prompt,
/// never the hint) plus the teacher's outcome.
#[derive(Debug, Clone, PartialEq)]
pub struct ColdRow {
    pub sample: Sample,
    /// The accepted answer; for a rejected row, the last answer received.
    pub completion: Option<String>,
    pub accepted: bool,
    /// `CODE: detail` when rejected.
    pub reason: Option<String>,
    pub attempts: i32,
    pub teacher: String,
    pub reasoning_content: Option<String>,
}

/// The total order used everywhere a user's interactions are put in time
/// order: timestamp, then item_id, then rating, then review text. Amazon
/// times are day-level, so ties are common; breaking them by item_id makes
/// every order (and thus leave-last-out) independent of file order.
pub fn time_order(a: &Interaction, b: &Interaction) -> std::cmp::Ordering {
    a.timestamp
        .cmp(&b.timestamp)
        .then_with(|| a.item_id.cmp(&b.item_id))
        .then_with(|| a.user_id.cmp(&b.user_id))
        .then_with(|| a.rating.total_cmp(&b.rating))
        .then_with(|| a.review_text.cmp(&b.review_text))
        .then_with(|| a.review_title.cmp(&b.review_title))
}

/// Days since 1970-01-01 → (year, month, day) (H. Hinnant's `civil_from_days`).
pub fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// (year, month, day) → days since 1970-01-01 (H. Hinnant's `days_from_civil`).
pub fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let m = m as i64;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + d as i64 - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// `YYYY-MM-DD` of a Unix timestamp (UTC).
pub fn format_date(ts: i64) -> String {
    let (y, m, d) = civil_from_days(ts.div_euclid(86_400));
    format!("{y:04}-{m:02}-{d:02}")
}

/// Parses `YYYY-MM-DD[ HH:MM[:SS]]` (also `T` as separator) as UTC seconds.
pub fn parse_datetime(s: &str) -> Option<i64> {
    let s = s.trim();
    let (date, time) = match s.find([' ', 'T']) {
        Some(i) => (&s[..i], Some(s[i + 1..].trim_end_matches('Z'))),
        None => (s, None),
    };
    let mut dp = date.split('-');
    let y: i64 = dp.next()?.parse().ok()?;
    let m: u32 = dp.next()?.parse().ok()?;
    let d: u32 = dp.next()?.parse().ok()?;
    if dp.next().is_some() || !(1..=12).contains(&m) || !(1..=31).contains(&d) {
        return None;
    }
    let mut secs = 0i64;
    if let Some(t) = time {
        let mut tp = t.split(':');
        let h: i64 = tp.next()?.parse().ok()?;
        let mi: i64 = tp.next().map(|x| x.parse().ok()).unwrap_or(Some(0))?;
        let se: f64 = tp.next().map(|x| x.parse().ok()).unwrap_or(Some(0.0))?;
        if !(0..24).contains(&h) || !(0..60).contains(&mi) || !(0.0..61.0).contains(&se) {
            return None;
        }
        secs = h * 3600 + mi * 60 + se as i64;
    }
    Some(days_from_civil(y, m, d) * 86_400 + secs)
}

/// A rating as shown to people and models: `4`, `4.5`.
pub fn format_rating(r: f32) -> String {
    if (r - r.round()).abs() < 1e-6 {
        format!("{}", r.round() as i64)
    } else {
        let s = format!("{r:.2}");
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_round_trip() {
        for days in [-1000i64, 0, 1, 16_000, 19_000, 20_500] {
            let (y, m, d) = civil_from_days(days);
            assert_eq!(days_from_civil(y, m, d), days, "civil date conversion must round-trip");
        }
        assert_eq!(
            parse_datetime("2014-10-11 03:34:02"),
            Some(1_412_998_442),
            "Yelp dates are UTC seconds"
        );
        assert_eq!(format_date(1_393_545_600), "2014-02-28");
        assert_eq!(parse_datetime("2014-13-01"), None, "month 13 is not a date");
    }

    #[test]
    fn ratings_format_compactly() {
        assert_eq!(format_rating(4.0), "4");
        assert_eq!(format_rating(4.5), "4.5");
    }
}
