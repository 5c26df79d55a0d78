//! Collaborative-filtering estimators: the user/item bias model (one module
//! shared by the `baselines` stage and the offline `cf` teacher) and matrix
//! factorisation with biases.
//!
//! * [`BiasModel`] — Koren's baseline predictor (Koren, "Factor in the
//!   Neighbors", TKDD 2010, Sec. 2.1): `r̂_ui = μ + b_u + b_i`, biases fitted
//!   by alternating closed-form regularised least squares:
//!   `b_u = Σ_{i∈R(u)} (r_ui − μ − b_i) / (λ_u + |R(u)|)`,
//!   `b_i = Σ_{u∈R(i)} (r_ui − μ − b_u) / (λ_i + |R(i)|)`, users first, for
//!   `iterations` rounds (the same order and defaults as scikit-surprise's
//!   `BaselineOnly(method="als")`: λ_u = 15, λ_i = 10, 10 rounds).
//! * [`predict_from_evidence`] — the same estimator in closed form over the
//!   leak-free evidence a prompt may use (only ratings strictly earlier than
//!   the target): one shrunk mean residual per side. The `cf` teacher calls it.
//! * [`MfModel`] — biased matrix factorisation trained by SGD (Koren, Bell &
//!   Volinsky, "Matrix Factorization Techniques for Recommender Systems",
//!   IEEE Computer 2009, Eq. 5): `r̂_ui = μ + b_u + b_i + q_iᵀ p_u`, minimising
//!   `Σ (r_ui − r̂_ui)² + λ (b_u² + b_i² + ‖p_u‖² + ‖q_i‖²)`; the update rules
//!   and defaults of scikit-surprise's `SVD`. Seeded (ChaCha8) for
//!   reproducible factors; epochs visit ratings in a seeded shuffled order.
//!
//! Unknown users and items get zero bias and zero factors (the prediction
//! falls back to μ plus whichever side is known).
use std::collections::HashMap;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

/// Errors of the estimators (all are bad input: empty or non-finite data,
/// out-of-range hyperparameters).
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum CfError {
    #[error("no training ratings: a collaborative-filtering model needs at least one rating")]
    Empty,
    #[error("rating {value} of user `{user}` on item `{item}` is not a finite number")]
    NonFinite { user: String, item: String, value: f32 },
    #[error("hyperparameter `{field}` = {value} is invalid: {why}")]
    Hyper { field: &'static str, value: f64, why: &'static str },
}

/// Dense ids for string keys, in first-seen order (deterministic for a
/// deterministic input order).
#[derive(Debug, Clone, Default)]
pub struct IdIndex {
    ids: HashMap<String, u32>,
    names: Vec<String>,
}

impl IdIndex {
    pub fn get(&self, name: &str) -> Option<u32> {
        self.ids.get(name).copied()
    }
    /// Id of `name`, inserting it when new.
    pub fn intern(&mut self, name: &str) -> u32 {
        if let Some(&i) = self.ids.get(name) {
            return i;
        }
        let i = self.names.len() as u32;
        self.ids.insert(name.to_string(), i);
        self.names.push(name.to_string());
        i
    }
    pub fn len(&self) -> usize {
        self.names.len()
    }
    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }
    pub fn name(&self, id: u32) -> &str {
        &self.names[id as usize]
    }
}

/// A training set: (user, item, rating) triples over dense ids.
#[derive(Debug, Clone, Default)]
pub struct Ratings {
    pub users: IdIndex,
    pub items: IdIndex,
    /// (user id, item id, rating).
    pub triples: Vec<(u32, u32, f32)>,
}

impl Ratings {
    /// Builds a training set from string-keyed ratings; rejects non-finite values.
    pub fn from_triples<'a>(rows: impl IntoIterator<Item = (&'a str, &'a str, f32)>) -> Result<Self, CfError> {
        let mut r = Ratings::default();
        for (u, i, v) in rows {
            if !v.is_finite() {
                return Err(CfError::NonFinite { user: u.into(), item: i.into(), value: v });
            }
            let (u, i) = (r.users.intern(u), r.items.intern(i));
            r.triples.push((u, i, v));
        }
        Ok(r)
    }

    pub fn len(&self) -> usize {
        self.triples.len()
    }
    pub fn is_empty(&self) -> bool {
        self.triples.is_empty()
    }

    /// μ, the global mean rating.
    pub fn global_mean(&self) -> Result<f64, CfError> {
        if self.triples.is_empty() {
            return Err(CfError::Empty);
        }
        Ok(self.triples.iter().map(|t| t.2 as f64).sum::<f64>() / self.triples.len() as f64)
    }
}

/// Hyperparameters of the bias model (defaults: scikit-surprise's ALS baseline).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BiasConfig {
    /// λ_u, shrinkage of user biases towards 0.
    pub reg_user: f64,
    /// λ_i, shrinkage of item biases towards 0.
    pub reg_item: f64,
    /// Alternating rounds (users, then items).
    pub iterations: u32,
}

impl Default for BiasConfig {
    fn default() -> Self {
        BiasConfig { reg_user: 15.0, reg_item: 10.0, iterations: 10 }
    }
}

impl BiasConfig {
    pub fn validate(&self) -> Result<(), CfError> {
        check_reg("reg_user", self.reg_user)?;
        check_reg("reg_item", self.reg_item)?;
        if self.iterations == 0 {
            return Err(CfError::Hyper { field: "iterations", value: 0.0, why: "needs at least one round" });
        }
        Ok(())
    }
}

fn check_reg(field: &'static str, value: f64) -> Result<(), CfError> {
    if !value.is_finite() || value < 0.0 {
        return Err(CfError::Hyper { field, value, why: "must be a finite number ≥ 0" });
    }
    Ok(())
}

/// Fitted baseline predictor `μ + b_u + b_i`.
#[derive(Debug, Clone)]
pub struct BiasModel {
    pub mu: f64,
    pub b_user: Vec<f64>,
    pub b_item: Vec<f64>,
    pub users: IdIndex,
    pub items: IdIndex,
}

impl BiasModel {
    /// Alternating closed-form fit (module doc). With λ = 0 on both sides and
    /// one round this is the plain "mean residual" estimator.
    pub fn fit(data: &Ratings, cfg: &BiasConfig) -> Result<Self, CfError> {
        cfg.validate()?;
        let mu = data.global_mean()?;
        let (nu, ni) = (data.users.len(), data.items.len());
        let mut b_user = vec![0.0f64; nu];
        let mut b_item = vec![0.0f64; ni];
        let mut count_u = vec![0.0f64; nu];
        let mut count_i = vec![0.0f64; ni];
        for &(u, i, _) in &data.triples {
            count_u[u as usize] += 1.0;
            count_i[i as usize] += 1.0;
        }
        let mut acc_u = vec![0.0f64; nu];
        let mut acc_i = vec![0.0f64; ni];
        for _ in 0..cfg.iterations {
            // b_u = Σ (r − μ − b_i) / (λ_u + |R(u)|)
            acc_u.iter_mut().for_each(|a| *a = 0.0);
            for &(u, i, r) in &data.triples {
                acc_u[u as usize] += r as f64 - mu - b_item[i as usize];
            }
            for u in 0..nu {
                b_user[u] = acc_u[u] / (cfg.reg_user + count_u[u]);
            }
            // b_i = Σ (r − μ − b_u) / (λ_i + |R(i)|)
            acc_i.iter_mut().for_each(|a| *a = 0.0);
            for &(u, i, r) in &data.triples {
                acc_i[i as usize] += r as f64 - mu - b_user[u as usize];
            }
            for i in 0..ni {
                b_item[i] = acc_i[i] / (cfg.reg_item + count_i[i]);
            }
        }
        Ok(BiasModel { mu, b_user, b_item, users: data.users.clone(), items: data.items.clone() })
    }

    pub fn user_bias(&self, user: &str) -> f64 {
        self.users.get(user).map_or(0.0, |u| self.b_user[u as usize])
    }
    pub fn item_bias(&self, item: &str) -> f64 {
        self.items.get(item).map_or(0.0, |i| self.b_item[i as usize])
    }

    /// `μ + b_u + b_i` (unclamped; unknown sides contribute 0).
    pub fn predict(&self, user: &str, item: &str) -> f64 {
        self.mu + self.user_bias(user) + self.item_bias(item)
    }
}

/// A bias prediction with its terms (for the `cf` teacher's rationale).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BiasEstimate {
    /// μ.
    pub global_mean: f64,
    /// b_u from the user's earlier ratings.
    pub user_bias: f64,
    /// b_i from the item's earlier ratings.
    pub item_bias: f64,
    /// Number of earlier ratings by the user / of the item.
    pub user_n: usize,
    pub item_n: usize,
}

impl BiasEstimate {
    /// `μ + b_u + b_i`, unclamped.
    pub fn prediction(&self) -> f64 {
        self.global_mean + self.user_bias + self.item_bias
    }
    /// The prediction clamped to `[min, max]` (the rating scale).
    pub fn clamped(&self, min: f64, max: f64) -> f64 {
        self.prediction().clamp(min, max)
    }
}

/// The bias estimator in closed form over leak-free evidence: the ratings the
/// user gave and the item received strictly before the target's timestamp.
///
/// `b_i = Σ_{r∈item} (r − μ) / (λ_i + n_i)` and, since the biases of the
/// items in the user's history are not part of that evidence,
/// `b_u = Σ_{r∈user} (r − μ) / (λ_u + n_u)` — the first alternating round of
/// [`BiasModel::fit`] from zero item biases. λ shrinks sparse histories
/// towards μ (with no evidence both biases are 0 and the prediction is μ).
pub fn predict_from_evidence(
    global_mean: f64,
    user_earlier_ratings: &[f32],
    item_earlier_ratings: &[f32],
    reg_user: f64,
    reg_item: f64,
) -> Result<BiasEstimate, CfError> {
    check_reg("reg_user", reg_user)?;
    check_reg("reg_item", reg_item)?;
    if !global_mean.is_finite() {
        return Err(CfError::Hyper { field: "global_mean", value: global_mean, why: "must be finite" });
    }
    let shrunk = |rs: &[f32], reg: f64| -> f64 {
        let denom = reg + rs.len() as f64;
        if denom == 0.0 {
            return 0.0; // no evidence and no shrinkage: no bias
        }
        rs.iter().map(|&r| r as f64 - global_mean).sum::<f64>() / denom
    };
    Ok(BiasEstimate {
        global_mean,
        user_bias: shrunk(user_earlier_ratings, reg_user),
        item_bias: shrunk(item_earlier_ratings, reg_item),
        user_n: user_earlier_ratings.len(),
        item_n: item_earlier_ratings.len(),
    })
}

/// Hyperparameters of biased MF (defaults: scikit-surprise's `SVD`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MfConfig {
    /// k, number of latent factors.
    pub factors: u32,
    /// SGD epochs over the training ratings.
    pub epochs: u32,
    /// γ, SGD learning rate.
    pub lr: f64,
    /// λ, L2 regularisation of biases and factors.
    pub reg: f64,
    /// Standard deviation of the N(0, σ²) initial factors.
    pub init_std: f64,
    /// Visit ratings in a seeded shuffled order each epoch (Surprise visits
    /// them in data order).
    pub shuffle: bool,
}

impl Default for MfConfig {
    fn default() -> Self {
        MfConfig { factors: 100, epochs: 20, lr: 0.005, reg: 0.02, init_std: 0.1, shuffle: true }
    }
}

impl MfConfig {
    pub fn validate(&self) -> Result<(), CfError> {
        if self.epochs == 0 {
            return Err(CfError::Hyper { field: "epochs", value: 0.0, why: "needs at least one epoch" });
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return Err(CfError::Hyper { field: "lr", value: self.lr, why: "must be a finite number > 0" });
        }
        check_reg("reg", self.reg)?;
        if !(self.init_std.is_finite() && self.init_std >= 0.0) {
            return Err(CfError::Hyper { field: "init_std", value: self.init_std, why: "must be a finite number ≥ 0" });
        }
        Ok(())
    }
}

/// Fitted biased matrix factorisation.
#[derive(Debug, Clone)]
pub struct MfModel {
    pub mu: f64,
    pub b_user: Vec<f64>,
    pub b_item: Vec<f64>,
    /// p_u, row-major [n_users, k].
    pub p: Vec<f64>,
    /// q_i, row-major [n_items, k].
    pub q: Vec<f64>,
    pub k: usize,
    pub users: IdIndex,
    pub items: IdIndex,
}

/// One N(0, 1) draw (Box–Muller; `rand` 0.9 without `rand_distr`).
fn standard_normal(rng: &mut ChaCha8Rng) -> f64 {
    let u1: f64 = 1.0 - rng.random::<f64>(); // (0, 1]: ln is finite
    let u2: f64 = rng.random::<f64>();
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
}

impl MfModel {
    /// SGD (Koren et al. 2009, Sec. "Learning algorithms"): for each rating,
    /// `e = r − r̂`; `b_u += γ(e − λ b_u)`; `b_i += γ(e − λ b_i)`;
    /// `p_u += γ(e q_i − λ p_u)`; `q_i += γ(e p_u − λ q_i)` (old p_u).
    pub fn fit(data: &Ratings, cfg: &MfConfig, seed: u64) -> Result<Self, CfError> {
        cfg.validate()?;
        let mu = data.global_mean()?;
        let k = cfg.factors as usize;
        let (nu, ni) = (data.users.len(), data.items.len());
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut p: Vec<f64> = (0..nu * k).map(|_| cfg.init_std * standard_normal(&mut rng)).collect();
        let mut q: Vec<f64> = (0..ni * k).map(|_| cfg.init_std * standard_normal(&mut rng)).collect();
        let mut b_user = vec![0.0f64; nu];
        let mut b_item = vec![0.0f64; ni];
        let mut order: Vec<usize> = (0..data.triples.len()).collect();
        let (lr, reg) = (cfg.lr, cfg.reg);
        for _ in 0..cfg.epochs {
            if cfg.shuffle {
                // Fisher–Yates with the seeded stream.
                for j in (1..order.len()).rev() {
                    let s = rng.random_range(0..=j);
                    order.swap(j, s);
                }
            }
            for &t in &order {
                let (u, i, r) = data.triples[t];
                let (u, i) = (u as usize, i as usize);
                let pu = &mut p[u * k..(u + 1) * k];
                let qi = &mut q[i * k..(i + 1) * k];
                let dot: f64 = pu.iter().zip(qi.iter()).map(|(a, b)| a * b).sum();
                let e = r as f64 - (mu + b_user[u] + b_item[i] + dot);
                b_user[u] += lr * (e - reg * b_user[u]);
                b_item[i] += lr * (e - reg * b_item[i]);
                for f in 0..k {
                    let (puf, qif) = (pu[f], qi[f]);
                    pu[f] += lr * (e * qif - reg * puf);
                    qi[f] += lr * (e * puf - reg * qif);
                }
            }
        }
        Ok(MfModel { mu, b_user, b_item, p, q, k, users: data.users.clone(), items: data.items.clone() })
    }

    /// `μ + b_u + b_i + q_iᵀ p_u` (unclamped; unknown sides contribute 0).
    pub fn predict(&self, user: &str, item: &str) -> f64 {
        let u = self.users.get(user).map(|u| u as usize);
        let i = self.items.get(item).map(|i| i as usize);
        let mut r = self.mu;
        if let Some(u) = u {
            r += self.b_user[u];
        }
        if let Some(i) = i {
            r += self.b_item[i];
        }
        if let (Some(u), Some(i)) = (u, i) {
            let k = self.k;
            r += self.p[u * k..(u + 1) * k].iter().zip(&self.q[i * k..(i + 1) * k]).map(|(a, b)| a * b).sum::<f64>();
        }
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn toy() -> Ratings {
        Ratings::from_triples([
            ("a", "x", 5.0),
            ("a", "y", 3.0),
            ("b", "x", 4.0),
            ("b", "z", 2.0),
            ("c", "y", 1.0),
        ])
        .unwrap()
    }

    #[test]
    fn bias_fit_matches_hand_computed_first_round() {
        // μ = 15/5 = 3. Round 1 with λ_u = 1, λ_i = 1, b_i = 0:
        // b_a = (2 + 0)/(1+2) = 2/3; b_b = (1 − 1)/(1+2) = 0; b_c = (−2)/(1+1) = −1.
        // b_x = ((5−3−2/3) + (4−3−0))/(1+2) = (4/3 + 1)/3 = 7/9;
        // b_y = ((3−3−2/3) + (1−3+1))/(1+2) = (−2/3 − 1)/3 = −5/9;
        // b_z = (2−3−0)/(1+1) = −1/2.
        let m = BiasModel::fit(&toy(), &BiasConfig { reg_user: 1.0, reg_item: 1.0, iterations: 1 }).unwrap();
        let close = |a: f64, b: f64| (a - b).abs() < 1e-12;
        assert!(close(m.mu, 3.0), "global mean");
        assert!(close(m.user_bias("a"), 2.0 / 3.0), "b_a");
        assert!(close(m.user_bias("b"), 0.0), "b_b");
        assert!(close(m.user_bias("c"), -1.0), "b_c");
        assert!(close(m.item_bias("x"), 7.0 / 9.0), "b_x");
        assert!(close(m.item_bias("y"), -5.0 / 9.0), "b_y");
        assert!(close(m.item_bias("z"), -0.5), "b_z");
        assert!(close(m.predict("a", "x"), 3.0 + 2.0 / 3.0 + 7.0 / 9.0), "prediction sums the terms");
        assert!(close(m.predict("nobody", "nothing"), 3.0), "unknown user and item fall back to μ");
    }

    #[test]
    fn evidence_estimate_matches_formula_and_fit() {
        // Item evidence [5, 4], μ = 3, λ_i = 1 → b_i = (2+1)/(1+2) = 1.
        // User evidence [1], λ_u = 3 → b_u = −2/4 = −0.5.
        let e = predict_from_evidence(3.0, &[1.0], &[5.0, 4.0], 3.0, 1.0).unwrap();
        assert!((e.item_bias - 1.0).abs() < 1e-12 && (e.user_bias + 0.5).abs() < 1e-12, "closed form: {e:?}");
        assert!((e.prediction() - 3.5).abs() < 1e-12, "μ + b_u + b_i");
        assert_eq!(e.clamped(1.0, 3.2), 3.2, "clamped to the scale");
        let none = predict_from_evidence(3.7, &[], &[], 0.0, 0.0).unwrap();
        assert_eq!(none.prediction(), 3.7, "no evidence and no shrinkage → μ, not NaN");
        // The user side equals one fit round when the user's items have zero bias.
        let d = Ratings::from_triples([("u", "i1", 5.0), ("u", "i2", 4.0)]).unwrap();
        let m = BiasModel::fit(&d, &BiasConfig { reg_user: 2.0, reg_item: 1.0, iterations: 1 }).unwrap();
        let e = predict_from_evidence(m.mu, &[5.0, 4.0], &[], 2.0, 1.0).unwrap();
        assert!((e.user_bias - m.user_bias("u")).abs() < 1e-12, "one module, one estimator");
        assert!(predict_from_evidence(3.0, &[], &[], -1.0, 0.0).is_err(), "negative λ rejected");
    }

    #[test]
    fn rejects_bad_input() {
        assert_eq!(BiasModel::fit(&Ratings::default(), &BiasConfig::default()).unwrap_err(), CfError::Empty);
        assert!(matches!(Ratings::from_triples([("a", "b", f32::NAN)]), Err(CfError::NonFinite { .. })));
        let bad = MfConfig { lr: 0.0, ..MfConfig::default() };
        assert!(matches!(MfModel::fit(&toy(), &bad, 0), Err(CfError::Hyper { field: "lr", .. })));
    }

    /// Ratings with a planted low-rank structure: r = 3 + a_u·c_i (+ biases).
    fn structured(n_users: usize, n_items: usize) -> Ratings {
        let mut rows = Vec::new();
        let names_u: Vec<String> = (0..n_users).map(|u| format!("u{u}")).collect();
        let names_i: Vec<String> = (0..n_items).map(|i| format!("i{i}")).collect();
        for u in 0..n_users {
            for i in 0..n_items {
                if (u * 7 + i * 3) % 4 == 0 {
                    continue; // leave holes
                }
                let a = if u % 2 == 0 { 1.0 } else { -1.0 };
                let c = if i % 2 == 0 { 1.0 } else { -1.0 };
                let r = (3.0 + a * c + 0.5 * ((u % 3) as f32 - 1.0)).clamp(1.0, 5.0);
                rows.push((names_u[u].clone(), names_i[i].clone(), r));
            }
        }
        Ratings::from_triples(rows.iter().map(|(u, i, r)| (u.as_str(), i.as_str(), *r))).unwrap()
    }

    #[test]
    fn mf_is_seeded_and_fits_interactions_biases_cannot() {
        let d = structured(30, 20);
        let cfg = MfConfig { factors: 4, epochs: 200, lr: 0.02, reg: 0.01, init_std: 0.1, shuffle: true };
        let a = MfModel::fit(&d, &cfg, 7).unwrap();
        let b = MfModel::fit(&d, &cfg, 7).unwrap();
        assert_eq!(a.p, b.p, "same seed → identical factors");
        let c = MfModel::fit(&d, &cfg, 8).unwrap();
        assert_ne!(a.p, c.p, "the seed reaches the initialisation");
        let bias = BiasModel::fit(&d, &BiasConfig::default()).unwrap();
        let rmse = |f: &dyn Fn(&str, &str) -> f64| {
            let se: f64 = d
                .triples
                .iter()
                .map(|&(u, i, r)| (f(d.users.name(u), d.items.name(i)) - r as f64).powi(2))
                .sum();
            (se / d.len() as f64).sqrt()
        };
        let (e_mf, e_bias) = (rmse(&|u, i| a.predict(u, i)), rmse(&|u, i| bias.predict(u, i)));
        assert!(e_mf < 0.5 * e_bias, "MF captures the planted user×item term: mf {e_mf} vs bias {e_bias}");
    }
}
