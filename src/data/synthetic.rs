//! Deterministic synthetic review data with a known ceiling.
//!
//! Model (a biased latent-factor model over named attributes, as in
//! Koren et al., "Matrix factorization techniques", 2009):
//!
//!   s(u, i) = μ + b_u + b_i + τ/√k · Σ_{a ∈ A(i)} θ_{u,a}
//!   r(u, i) = clamp(round(s(u, i) + ε), 1, 5),   ε ~ N(0, σ²)
//!
//! with user bias b_u ~ N(0, user_bias²), item quality b_i ~ N(0, item_bias²),
//! user taste θ_{u,a} ~ N(0, 1) for each named attribute a, A(i) the k
//! attributes of item i. Every part of s is visible to a model reading a
//! prompt: b_u through the user's earlier ratings and average, b_i through
//! the item's earlier ratings by others and its average, θ through the
//! user's earlier ratings of items whose titles, categories and reviews
//! name the same attributes. Review text follows the rating (and names the
//! attributes), timestamps are day-level (ties happen, as in Amazon).
//!
//! The best achievable RMSE is the RMSE of the Bayes predictor E[r | s]
//! (computed exactly from the normal CDF over the rounding/clamping bins)
//! on the generated ratings; it is reported with σ in [`Facts`].
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::{Interaction, Item};

/// Generator settings (`with: synthetic:` of the ingest stage).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SyntheticConfig {
    pub users: usize,
    pub items: usize,
    /// Mean ratings per user (each user gets between half and 1.5× this).
    pub ratings_per_user: usize,
    /// σ of the rating noise ε.
    pub noise: f64,
    /// Global mean μ.
    pub mean: f64,
    /// σ of the user bias b_u.
    pub user_bias: f64,
    /// σ of the item quality b_i.
    pub item_bias: f64,
    /// τ, weight of the taste term.
    pub taste: f64,
    /// Named attributes (genres); items get `attributes_per_item` of them.
    pub attributes: Vec<String>,
    pub attributes_per_item: usize,
    pub seed: u64,
    /// First day (Unix seconds) and span in days of the timestamps.
    pub start: i64,
    pub days: i64,
}

impl Default for SyntheticConfig {
    fn default() -> Self {
        SyntheticConfig {
            users: 200,
            items: 120,
            ratings_per_user: 20,
            noise: 0.3,
            mean: 3.6,
            user_bias: 0.4,
            item_bias: 0.5,
            taste: 0.9,
            attributes: [
                "jazz",
                "rock",
                "classical",
                "hip-hop",
                "electronic",
                "folk",
                "metal",
                "soul",
            ]
            .map(String::from)
            .to_vec(),
            attributes_per_item: 2,
            seed: 0,
            start: 1_420_070_400, // 2015-01-01
            days: 730,
        }
    }
}

/// Facts about the generated data (recorded in the ingest report).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Facts {
    pub noise: f64,
    /// RMSE of the Bayes predictor E[r | s]: no model can do better in expectation.
    pub best_rmse: f64,
    /// RMSE of predicting the global mean rating of the data (for contrast).
    pub global_mean_rmse: f64,
    pub ratings: usize,
    pub seed: u64,
}

pub struct Generated {
    pub interactions: Vec<Interaction>,
    pub items: Vec<Item>,
    pub facts: Facts,
}

const ADJ: [&str; 20] = [
    "Velvet", "Midnight", "Golden", "Electric", "Silent", "Crimson", "Hollow", "Lucky", "Wild", "Paper", "Neon",
    "Quiet", "Broken", "Distant", "Amber", "Frozen", "Sunny", "Restless", "Marble", "Copper",
];
const NOUN: [&str; 20] = [
    "Horizon", "Echoes", "Harbor", "Garden", "Circuit", "Lanterns", "River", "Parade", "Signals", "Orchard", "Tides",
    "Avenue", "Mirrors", "Engines", "Meadow", "Static", "Carousel", "Letters", "Summit", "Voyage",
];

/// Standard normal via Box–Muller (rand 0.9 has no Normal without rand_distr).
pub(crate) fn normal(rng: &mut ChaCha8Rng) -> f64 {
    let u1: f64 = rng.random::<f64>().max(1e-300);
    let u2: f64 = rng.random();
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
}

/// erf by Abramowitz & Stegun 7.1.26 (|error| ≤ 1.5e-7).
fn erf(x: f64) -> f64 {
    let s = x.signum();
    let x = x.abs();
    let t = 1.0 / (1.0 + 0.327_591_1 * x);
    let y = 1.0
        - (((((1.061_405_429 * t - 1.453_152_027) * t) + 1.421_413_741) * t - 0.284_496_736) * t + 0.254_829_592)
            * t
            * (-x * x).exp();
    s * y
}

/// Standard normal CDF Φ.
fn phi(x: f64) -> f64 {
    0.5 * (1.0 + erf(x / std::f64::consts::SQRT_2))
}

/// E[clamp(round(s + ε), 1, 5)] for ε ~ N(0, σ²).
pub fn expected_rating(s: f64, sigma: f64) -> f64 {
    if sigma <= 0.0 {
        return s.round().clamp(1.0, 5.0);
    }
    // P(r ≤ k) = Φ((k + 0.5 − s)/σ) for k = 1..4.
    let cdf = |k: f64| phi((k + 0.5 - s) / sigma);
    let mut e = 0.0;
    let mut prev = 0.0;
    for k in 1..=5 {
        let c = if k == 5 { 1.0 } else { cdf(k as f64) };
        e += k as f64 * (c - prev);
        prev = c;
    }
    e
}

fn sentence(rating: i32, attrs: &[String], rng: &mut ChaCha8Rng) -> (String, String) {
    let a = attrs.join(" and ");
    let (titles, bodies): (&[&str], &[&str]) = match rating {
        5 => (
            &["Absolutely loved it", "A new favourite", "Five stars, no question"],
            &[
                "Absolutely loved it: the {a} sound is exactly my taste and I keep coming back to it.",
                "Stunning record. The {a} side of it is done perfectly; I play it every day.",
            ],
        ),
        4 => (
            &["Really good", "Very enjoyable", "Solid and satisfying"],
            &[
                "Really enjoyed this. The {a} elements work well for me, a few weaker moments aside.",
                "Very good overall; I like where it goes with {a}, though it is not perfect.",
            ],
        ),
        3 => (
            &["It's okay", "Mixed feelings", "Average"],
            &[
                "It's fine. The {a} parts are okay but nothing grabbed me.",
                "Mixed feelings: some of the {a} moments work, others fall flat.",
            ],
        ),
        2 => (
            &["Disappointing", "Not for me", "Meh"],
            &[
                "Disappointing. The {a} style mostly left me cold.",
                "Not really for me; the {a} approach felt tired and I lost interest.",
            ],
        ),
        _ => (
            &["Did not like it", "Waste of money", "Awful"],
            &[
                "Did not like this at all; {a} just isn't my thing and this was a chore.",
                "Awful for my taste. The {a} sound grated on me from start to finish.",
            ],
        ),
    };
    let t = titles[rng.random_range(0..titles.len())].to_string();
    let b = bodies[rng.random_range(0..bodies.len())].replace("{a}", &a);
    (t, b)
}

/// Generates the data; errors name the offending setting.
pub fn generate(cfg: &SyntheticConfig) -> Result<Generated, String> {
    if cfg.users == 0 || cfg.items == 0 || cfg.ratings_per_user == 0 {
        return Err("synthetic: users, items and ratings_per_user must be ≥ 1".into());
    }
    if cfg.attributes.is_empty() || cfg.attributes_per_item == 0 || cfg.attributes_per_item > cfg.attributes.len() {
        return Err(format!(
            "synthetic: attributes_per_item ({}) must be between 1 and the number of attributes ({})",
            cfg.attributes_per_item,
            cfg.attributes.len()
        ));
    }
    if !(cfg.noise >= 0.0 && cfg.noise.is_finite()) || cfg.days < 1 {
        return Err("synthetic: noise must be ≥ 0 and days ≥ 1".into());
    }
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
    let k = cfg.attributes_per_item;
    let na = cfg.attributes.len();

    // Items: name, k distinct attributes, quality b_i.
    let mut items = Vec::with_capacity(cfg.items);
    let mut item_attrs: Vec<Vec<usize>> = Vec::with_capacity(cfg.items);
    let mut item_bias = Vec::with_capacity(cfg.items);
    for i in 0..cfg.items {
        let mut attrs: Vec<usize> = rand::seq::index::sample(&mut rng, na, k).into_vec();
        attrs.sort();
        let names: Vec<String> = attrs.iter().map(|&a| cfg.attributes[a].clone()).collect();
        let base = format!("{} {}", ADJ[i % ADJ.len()], NOUN[(i / ADJ.len() + i * 7) % NOUN.len()]);
        let round = i / (ADJ.len() * NOUN.len());
        let title = if round == 0 {
            base
        } else {
            format!("{base} {}", round + 1)
        };
        items.push(Item {
            item_id: format!("i{i:05}"),
            title: Some(format!("{title} ({})", names.join(" / "))),
            categories: Some(names.clone()),
            description: Some(format!("An album blending {}.", names.join(" and "))),
            brand: Some(format!("{} Records", NOUN[(i * 3) % NOUN.len()])),
            price: Some((rng.random_range(500..3000) as f64) / 100.0),
        });
        item_attrs.push(attrs);
        item_bias.push(cfg.item_bias * normal(&mut rng));
    }

    // Users and their ratings.
    let scale = cfg.taste / (k as f64).sqrt();
    let mut rows = Vec::new();
    let mut se_best = 0.0;
    let lo = (cfg.ratings_per_user / 2).max(1);
    let hi = (cfg.ratings_per_user * 3 / 2).max(lo).min(cfg.items);
    for u in 0..cfg.users {
        let b_u = cfg.user_bias * normal(&mut rng);
        let theta: Vec<f64> = (0..na).map(|_| normal(&mut rng)).collect();
        let n = rng.random_range(lo.min(hi)..=hi);
        let chosen = rand::seq::index::sample(&mut rng, cfg.items, n).into_vec();
        let mut day = rng.random_range(0..(cfg.days / 2).max(1));
        let gap = (cfg.days / 2 / n as i64).max(1) * 2;
        for i in chosen {
            let s = cfg.mean + b_u + item_bias[i] + scale * item_attrs[i].iter().map(|&a| theta[a]).sum::<f64>();
            let r = (s + cfg.noise * normal(&mut rng)).round().clamp(1.0, 5.0);
            let e = expected_rating(s, cfg.noise);
            se_best += (r - e) * (r - e);
            let names: Vec<String> = item_attrs[i].iter().map(|&a| cfg.attributes[a].clone()).collect();
            let (title, text) = sentence(r as i32, &names, &mut rng);
            rows.push(Interaction {
                user_id: format!("u{u:05}"),
                item_id: items[i].item_id.clone(),
                rating: r as f32,
                timestamp: cfg.start + day.min(cfg.days - 1) * 86_400,
                review_title: Some(title),
                review_text: Some(text),
            });
            day += rng.random_range(0..=gap);
        }
    }
    let n = rows.len() as f64;
    let mean = rows.iter().map(|r| r.rating as f64).sum::<f64>() / n;
    let var = rows.iter().map(|r| (r.rating as f64 - mean).powi(2)).sum::<f64>() / n;
    let facts = Facts {
        noise: cfg.noise,
        best_rmse: (se_best / n).sqrt(),
        global_mean_rmse: var.sqrt(),
        ratings: rows.len(),
        seed: cfg.seed,
    };
    Ok(Generated {
        interactions: rows,
        items,
        facts,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_data_and_a_real_gap_to_the_mean() {
        let cfg = SyntheticConfig::default();
        let a = generate(&cfg).unwrap();
        let b = generate(&cfg).unwrap();
        assert_eq!(
            a.interactions, b.interactions,
            "the generator is deterministic per seed"
        );
        let c = generate(&SyntheticConfig { seed: 1, ..cfg.clone() }).unwrap();
        assert_ne!(a.interactions, c.interactions, "another seed gives other data");
        assert!(
            a.interactions.iter().all(|r| (1.0..=5.0).contains(&r.rating)),
            "ratings clamp to 1..5"
        );
        assert!(
            a.facts.best_rmse + 0.3 < a.facts.global_mean_rmse,
            "the signal must be learnable: best {} vs global mean {}",
            a.facts.best_rmse,
            a.facts.global_mean_rmse
        );
    }

    #[test]
    fn review_text_follows_the_rating() {
        let g = generate(&SyntheticConfig::default()).unwrap();
        for r in g.interactions.iter().take(200) {
            let t = r.review_text.as_deref().unwrap_or("");
            let positive =
                t.contains("loved") || t.contains("Stunning") || t.contains("enjoyed") || t.contains("Very good");
            assert_eq!(
                positive,
                r.rating >= 4.0,
                "positive text iff rating ≥ 4: {t} / {}",
                r.rating
            );
        }
    }

    #[test]
    fn expected_rating_matches_the_bins() {
        assert!((expected_rating(3.0, 1e-9) - 3.0).abs() < 1e-6);
        assert!((expected_rating(10.0, 0.5) - 5.0).abs() < 1e-6, "clamped at the top");
        assert!(
            (expected_rating(3.5, 0.3) - 3.5).abs() < 1e-6,
            "symmetric between 3 and 4"
        );
    }
}
