//! `baselines` stage: classical rating predictors on the same split as the
//! LLM, so the report compares every method on the same rows.
//!
//! Inputs: `train`, `valid`, `test` (interactions schema); optional `samples`
//! (samples schema) — when given, exactly those sample ids are scored (their
//! user, item and target), so the rows match the `eval` stage's.
//! Outputs: `metrics` (JSON, `{"stage", "methods": [{method, n, rmse, mae,
//! invalid_rate, rmse_valid, mae_valid, exact, fallback, rmse_ci95,
//! mae_ci95, hyperparameters, confusion, by_history}]}`) and `predictions`
//! (Parquet: sample_id, user_id, item_id, target, user_history_len, method,
//! prediction).
//!
//! Methods: `global_mean` (μ), `bias` (μ + b_u + b_i, [`crate::cf::BiasModel`],
//! the estimator the `cf` teacher uses), `mf` (biased matrix factorisation,
//! [`crate::cf::MfModel`]). Hyperparameters of `bias` and `mf` are chosen by
//! grid search on `valid` (fit on `train`, lowest valid RMSE, ties → first in
//! grid order); the chosen model is then refit on `train` (+ `valid` when
//! `refit: train_valid`, the default, because the LLM's prompts may also use
//! every interaction earlier than the target) and scores the test rows.
//! Predictions are clamped to the rating scale.
//!
//! What each method can use: only the ratings of the fit set (no text, no
//! timestamps); unknown users/items fall back to μ plus the known side.
//!
//! Key: the whole config (all fields affect results) and the input hashes.
use std::collections::HashMap;

use arrow::array::{Float32Array, Int32Array, StringArray};
use serde::{Deserialize, Serialize};

use super::{InputSpec, Metrics, OutputSpec, Stage, StageCtx, StageDef};
use crate::cf::{BiasConfig, BiasModel, MfConfig, MfModel, Ratings};
use crate::data::io::{eval_writer_properties, write_batch_atomic};
use crate::report::io::{arc, read_interactions, read_sample_rows, SampleRow};
use crate::report::metrics::{summarize, Scored, SummaryConfig};

/// Which data the final model is fitted on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Refit {
    Train,
    TrainValid,
}

/// Grid of the bias model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BiasGrid {
    pub reg_user: Vec<f64>,
    pub reg_item: Vec<f64>,
    pub iterations: u32,
}

impl Default for BiasGrid {
    fn default() -> Self {
        BiasGrid { reg_user: vec![1.0, 5.0, 15.0, 25.0], reg_item: vec![1.0, 5.0, 10.0, 25.0], iterations: 10 }
    }
}

/// Grid of biased MF.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MfGrid {
    pub factors: Vec<u32>,
    pub reg: Vec<f64>,
    pub lr: Vec<f64>,
    pub epochs: u32,
    pub init_std: f64,
    pub shuffle: bool,
}

impl Default for MfGrid {
    fn default() -> Self {
        MfGrid { factors: vec![10, 50], reg: vec![0.02, 0.05, 0.1], lr: vec![0.005], epochs: 20, init_std: 0.1, shuffle: true }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Methods to run, in report order: `global_mean`, `bias`, `mf`.
    pub methods: Vec<String>,
    pub bias: BiasGrid,
    pub mf: MfGrid,
    /// `train` or `train_valid` (default): data of the final fit.
    pub refit: Refit,
    /// Inclusive rating scale; predictions are clamped into it.
    pub scale_min: f64,
    pub scale_max: f64,
    /// Bootstrap resamples of the 95% intervals (0: none).
    pub bootstrap: u32,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            methods: vec!["global_mean".into(), "bias".into(), "mf".into()],
            bias: BiasGrid::default(),
            mf: MfGrid::default(),
            refit: Refit::TrainValid,
            scale_min: 1.0,
            scale_max: 5.0,
            bootstrap: 1000,
        }
    }
}

pub const METHODS: [&str; 3] = ["global_mean", "bias", "mf"];

pub struct Baselines;

impl StageDef for Baselines {
    type Config = Config;
    const KIND: &'static str = "baselines";
    const VERSION: u32 = 2;
    fn inputs() -> Vec<InputSpec> {
        vec![InputSpec::one("train"), InputSpec::one("valid"), InputSpec::one("test"), InputSpec::optional("samples")]
    }
    fn outputs(_cfg: &Config) -> Vec<OutputSpec> {
        vec![OutputSpec::file("metrics", "json"), OutputSpec::file("predictions", "parquet")]
    }
    fn validate(cfg: &Config) -> Result<(), String> {
        if cfg.methods.is_empty() {
            return Err("`methods` is empty: list at least one of global_mean, bias, mf".into());
        }
        for m in &cfg.methods {
            if !METHODS.contains(&m.as_str()) {
                return Err(format!("`methods`: unknown method `{m}` (known: global_mean, bias, mf)"));
            }
        }
        if !(cfg.scale_min.is_finite() && cfg.scale_max.is_finite() && cfg.scale_min < cfg.scale_max) {
            return Err(format!("`scale_min` ({}) must be below `scale_max` ({})", cfg.scale_min, cfg.scale_max));
        }
        if cfg.bias.reg_user.is_empty() || cfg.bias.reg_item.is_empty() {
            return Err("`bias.reg_user` and `bias.reg_item` need at least one value".into());
        }
        if cfg.mf.factors.is_empty() || cfg.mf.reg.is_empty() || cfg.mf.lr.is_empty() {
            return Err("`mf.factors`, `mf.reg` and `mf.lr` need at least one value".into());
        }
        for (i, bc) in bias_grid(&cfg.bias).iter().enumerate() {
            bc.validate().map_err(|e| format!("`bias` grid point {i}: {e}"))?;
        }
        for (i, mc) in mf_grid(&cfg.mf).iter().enumerate() {
            mc.validate().map_err(|e| format!("`mf` grid point {i}: {e}"))?;
        }
        Ok(())
    }
}

fn bias_grid(g: &BiasGrid) -> Vec<BiasConfig> {
    let mut v = Vec::new();
    for &ru in &g.reg_user {
        for &ri in &g.reg_item {
            v.push(BiasConfig { reg_user: ru, reg_item: ri, iterations: g.iterations });
        }
    }
    v
}

fn mf_grid(g: &MfGrid) -> Vec<MfConfig> {
    let mut v = Vec::new();
    for &k in &g.factors {
        for &reg in &g.reg {
            for &lr in &g.lr {
                v.push(MfConfig { factors: k, epochs: g.epochs, lr, reg, init_std: g.init_std, shuffle: g.shuffle });
            }
        }
    }
    v
}

/// A fitted predictor.
enum Fitted {
    Mean(f64),
    Bias(BiasModel),
    Mf(MfModel),
}

impl Fitted {
    fn predict(&self, u: &str, i: &str) -> f64 {
        match self {
            Fitted::Mean(mu) => *mu,
            Fitted::Bias(m) => m.predict(u, i),
            Fitted::Mf(m) => m.predict(u, i),
        }
    }
}

type Rows = Vec<(String, String, f32, i64)>;

fn ratings_of(rows: &[&Rows]) -> anyhow::Result<Ratings> {
    Ok(Ratings::from_triples(rows.iter().flat_map(|r| r.iter()).map(|(u, i, r, _)| (u.as_str(), i.as_str(), *r)))?)
}

fn rmse_on(f: &Fitted, rows: &Rows, lo: f64, hi: f64) -> f64 {
    let se: f64 = rows.iter().map(|(u, i, r, _)| (f.predict(u, i).clamp(lo, hi) - *r as f64).powi(2)).sum();
    (se / rows.len().max(1) as f64).sqrt()
}

/// One method's result: name, chosen hyperparameters, valid RMSE, predictions on the scored rows.
struct MethodResult {
    method: String,
    hyper: serde_json::Value,
    valid_rmse: f64,
    predictions: Vec<f64>,
}

/// Fits every configured method and predicts the scored rows. Pure given
/// (config, data, seed) — unit-tested without files.
fn fit_and_predict(
    cfg: &Config,
    train: &Rows,
    valid: &Rows,
    rows: &[SampleRow],
    seed: u64,
    mut log: impl FnMut(String),
) -> anyhow::Result<Vec<MethodResult>> {
    let (lo, hi) = (cfg.scale_min, cfg.scale_max);
    let fit_set = ratings_of(&[train])?;
    let final_set = match cfg.refit {
        Refit::Train => fit_set.clone(),
        Refit::TrainValid => ratings_of(&[train, valid])?,
    };
    let mut out = Vec::new();
    for method in &cfg.methods {
        let (hyper, valid_rmse, fitted) = match method.as_str() {
            "global_mean" => {
                let f = Fitted::Mean(fit_set.global_mean()?);
                let v = rmse_on(&f, valid, lo, hi);
                (serde_json::json!({}), v, Fitted::Mean(final_set.global_mean()?))
            }
            "bias" => {
                let mut best: Option<(f64, BiasConfig)> = None;
                for bc in bias_grid(&cfg.bias) {
                    let v = rmse_on(&Fitted::Bias(BiasModel::fit(&fit_set, &bc)?), valid, lo, hi);
                    log(format!("bias reg_user={} reg_item={}: valid RMSE {v:.4}", bc.reg_user, bc.reg_item));
                    if best.is_none_or(|(b, _)| v < b) {
                        best = Some((v, bc));
                    }
                }
                let (v, bc) = best.ok_or_else(|| anyhow::anyhow!("`bias` grid is empty"))?;
                (serde_json::to_value(bc)?, v, Fitted::Bias(BiasModel::fit(&final_set, &bc)?))
            }
            "mf" => {
                let mut best: Option<(f64, MfConfig)> = None;
                for mc in mf_grid(&cfg.mf) {
                    let v = rmse_on(&Fitted::Mf(MfModel::fit(&fit_set, &mc, seed)?), valid, lo, hi);
                    log(format!("mf factors={} reg={} lr={}: valid RMSE {v:.4}", mc.factors, mc.reg, mc.lr));
                    if best.is_none_or(|(b, _)| v < b) {
                        best = Some((v, mc));
                    }
                }
                let (v, mc) = best.ok_or_else(|| anyhow::anyhow!("`mf` grid is empty"))?;
                (serde_json::to_value(mc)?, v, Fitted::Mf(MfModel::fit(&final_set, &mc, seed)?))
            }
            other => anyhow::bail!("unknown baseline method `{other}`"),
        };
        let predictions = rows.iter().map(|r| fitted.predict(&r.user_id, &r.item_id).clamp(lo, hi)).collect();
        out.push(MethodResult { method: method.clone(), hyper, valid_rmse, predictions });
    }
    Ok(out)
}

/// The test rows to score: the `samples` when given, else every test interaction
/// (history length = the user's ratings in the final fit set).
fn scored_rows(ctx: &StageCtx, test: &Rows, train: &Rows, valid: &Rows, refit: Refit) -> anyhow::Result<Vec<SampleRow>> {
    if let Some(p) = ctx.input_opt("samples") {
        return Ok(read_sample_rows(p)?);
    }
    let mut hist: HashMap<&str, i64> = HashMap::new();
    let sets: Vec<&Rows> = if refit == Refit::TrainValid { vec![train, valid] } else { vec![train] };
    for (u, _, _, _) in sets.into_iter().flatten() {
        *hist.entry(u.as_str()).or_default() += 1;
    }
    Ok(test
        .iter()
        .enumerate()
        .map(|(k, (u, i, r, _))| SampleRow {
            sample_id: format!("test-{k}"),
            user_id: u.clone(),
            item_id: i.clone(),
            target: *r as f64,
            user_history_len: hist.get(u.as_str()).copied().unwrap_or(0),
        })
        .collect())
}

impl Stage for Baselines {
    fn run(cfg: &Config, ctx: &mut StageCtx) -> anyhow::Result<Metrics> {
        // 1. Read the split.
        let train = read_interactions(ctx.input("train")?)?;
        let valid = read_interactions(ctx.input("valid")?)?;
        let test = read_interactions(ctx.input("test")?)?;
        if train.is_empty() {
            anyhow::bail!("stage `{}`: the `train` split is empty; baselines need training ratings", ctx.stage);
        }
        if valid.is_empty() {
            anyhow::bail!("stage `{}`: the `valid` split is empty; hyperparameters are chosen on it", ctx.stage);
        }
        let rows = scored_rows(ctx, &test, &train, &valid, cfg.refit)?;
        if rows.is_empty() {
            anyhow::bail!("stage `{}`: nothing to score (the test split / samples are empty)", ctx.stage);
        }
        ctx.log("info", format!("{} train, {} valid ratings; scoring {} rows", train.len(), valid.len(), rows.len()));

        // 2. Fit (grid search on valid) and predict.
        let mut logs = Vec::new();
        let results = fit_and_predict(cfg, &train, &valid, &rows, ctx.seed, |m| logs.push(m))?;
        for l in logs {
            ctx.log("info", l);
        }

        // 3. Metrics in the pinned shape.
        let scfg = SummaryConfig { scale_min: cfg.scale_min, scale_max: cfg.scale_max, bootstrap_resamples: cfg.bootstrap, seed: ctx.seed };
        let mut methods = Vec::new();
        let mut flat = Metrics::new();
        for res in &results {
            let scored: Vec<Scored> = rows
                .iter()
                .zip(&res.predictions)
                .map(|(r, &p)| Scored { target: r.target, prediction: p, valid: true, user_history_len: r.user_history_len })
                .collect();
            let s = summarize(&scored, &scfg);
            let mut m = s.to_json(&ctx.stage, &res.method, "none");
            m.insert("hyperparameters".into(), res.hyper.clone());
            m.insert("valid_split_rmse".into(), serde_json::json!(res.valid_rmse));
            methods.push(serde_json::Value::Object(m));
            flat.insert(format!("{}.rmse", res.method), serde_json::json!(s.rmse));
            flat.insert(format!("{}.mae", res.method), serde_json::json!(s.mae));
        }
        let metrics = serde_json::json!({"stage": ctx.stage, "methods": methods});
        crate::util::write_atomic(&ctx.output("metrics")?, serde_json::to_string_pretty(&metrics)?.as_bytes())?;

        // 4. Predictions, long format (one row per sample × method).
        let n = rows.len() * results.len();
        let (mut sid, mut uid, mut iid, mut tgt, mut hl, mut meth, mut pred) =
            (Vec::with_capacity(n), Vec::with_capacity(n), Vec::with_capacity(n), Vec::with_capacity(n), Vec::with_capacity(n), Vec::with_capacity(n), Vec::with_capacity(n));
        for res in &results {
            for (r, &p) in rows.iter().zip(&res.predictions) {
                sid.push(r.sample_id.clone());
                uid.push(r.user_id.clone());
                iid.push(r.item_id.clone());
                tgt.push(r.target as f32);
                hl.push(r.user_history_len.clamp(0, i32::MAX as i64) as i32);
                meth.push(res.method.clone());
                pred.push(p as f32);
            }
        }
        write_batch_atomic(
            &ctx.output("predictions")?,
            crate::data::schema::baseline_predictions(),
            vec![
                arc(StringArray::from(sid)),
                arc(StringArray::from(uid)),
                arc(StringArray::from(iid)),
                arc(Float32Array::from(tgt)),
                arc(Int32Array::from(hl)),
                arc(StringArray::from(meth)),
                arc(Float32Array::from(pred)),
            ],
            eval_writer_properties(),
        )?;
        Ok(flat)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::metrics::rmse;

    /// Users with strong personal offsets and items with quality offsets:
    /// r = clamp(3 + o_u + o_i + noise). Bias models must beat μ here.
    fn structured(seed: u64) -> (Rows, Rows, Rows) {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let (mut tr, mut va, mut te) = (Vec::new(), Vec::new(), Vec::new());
        for u in 0..40 {
            let ou = [-1.2, -0.4, 0.3, 1.0][u % 4];
            for i in 0..25 {
                if rng.random::<f64>() < 0.5 {
                    continue;
                }
                let oi = [-0.8, 0.0, 0.6][i % 3];
                let r = (3.0 + ou + oi + rng.random_range(-0.3..0.3f64)).round().clamp(1.0, 5.0) as f32;
                let row = (format!("u{u}"), format!("i{i}"), r, 0i64);
                match rng.random_range(0..10) {
                    0 => va.push(row),
                    1 => te.push(row),
                    _ => tr.push(row),
                }
            }
        }
        (tr, va, te)
    }

    #[test]
    fn bias_beats_global_mean_on_structured_data() {
        let (tr, va, te) = structured(3);
        let rows: Vec<SampleRow> = te
            .iter()
            .enumerate()
            .map(|(k, (u, i, r, _))| SampleRow { sample_id: k.to_string(), user_id: u.clone(), item_id: i.clone(), target: *r as f64, user_history_len: 0 })
            .collect();
        let cfg = Config { mf: MfGrid { factors: vec![4], epochs: 30, ..MfGrid::default() }, ..Config::default() };
        let res = fit_and_predict(&cfg, &tr, &va, &rows, 0, |_| {}).unwrap();
        let test_rmse = |k: usize| {
            let s: Vec<Scored> = rows.iter().zip(&res[k].predictions).map(|(r, &p)| Scored { target: r.target, prediction: p, valid: true, user_history_len: 0 }).collect();
            rmse(&s).unwrap()
        };
        let (gm, bias, mf) = (test_rmse(0), test_rmse(1), test_rmse(2));
        assert_eq!(res.iter().map(|r| r.method.as_str()).collect::<Vec<_>>(), ["global_mean", "bias", "mf"]);
        assert!(bias < 0.7 * gm, "bias ({bias}) must clearly beat the global mean ({gm}) on user/item-offset data");
        assert!(mf < gm, "MF ({mf}) must beat the global mean ({gm})");
        assert!(res[1].valid_rmse <= res[0].valid_rmse, "the chosen bias grid point beats μ on valid too");
        let again = fit_and_predict(&cfg, &tr, &va, &rows, 0, |_| {}).unwrap();
        assert_eq!(again[2].predictions, res[2].predictions, "seeded: same inputs → same MF predictions");
    }

    #[test]
    fn validate_rejects_unknown_method_and_bad_grid() {
        let bad = Config { methods: vec!["knn".into()], ..Config::default() };
        assert!(Baselines::validate(&bad).unwrap_err().contains("knn"), "message names the method");
        let bad = Config { bias: BiasGrid { reg_user: vec![-1.0], ..BiasGrid::default() }, ..Config::default() };
        assert!(Baselines::validate(&bad).unwrap_err().contains("reg_user"), "message names the field");
        assert!(Baselines::validate(&Config::default()).is_ok());
    }

    #[test]
    fn stage_writes_pinned_metrics_shape_for_exact_sample_ids() {
        use crate::data::schema;
        use arrow::array::{Int64Array, ListArray, StructArray};
        use arrow::datatypes::{DataType, Field};
        let dir = tempfile::tempdir().unwrap();
        let (tr, va, te) = structured(5);
        let write_inter = |name: &str, rows: &Rows| {
            let p = dir.path().join(name);
            write_batch_atomic(
                &p,
                schema::interactions(),
                vec![
                    arc(StringArray::from(rows.iter().map(|r| r.0.clone()).collect::<Vec<_>>())),
                    arc(StringArray::from(rows.iter().map(|r| r.1.clone()).collect::<Vec<_>>())),
                    arc(Float32Array::from(rows.iter().map(|r| r.2).collect::<Vec<_>>())),
                    arc(Int64Array::from(rows.iter().map(|r| r.3).collect::<Vec<_>>())),
                    arc(StringArray::from(vec![None::<&str>; rows.len()])),
                    arc(StringArray::from(vec![None::<&str>; rows.len()])),
                ],
                eval_writer_properties(),
            )
            .unwrap();
            p
        };
        let (ptr, pva, pte) = (write_inter("train.parquet", &tr), write_inter("valid.parquet", &va), write_inter("test.parquet", &te));
        // Samples: the first 3 test rows only, with their own ids.
        let k = 3;
        let msg_fields = match schema::message_type() {
            DataType::Struct(f) => f,
            _ => unreachable!(),
        };
        let empty_msgs = ListArray::new(
            std::sync::Arc::new(Field::new("item", schema::message_type(), true)),
            arrow::buffer::OffsetBuffer::new_zeroed(k),
            arc(StructArray::new(msg_fields, vec![arc(StringArray::from(Vec::<String>::new())), arc(StringArray::from(Vec::<String>::new()))], None)),
            None,
        );
        let psm = dir.path().join("samples.parquet");
        write_batch_atomic(
            &psm,
            schema::samples(),
            vec![
                arc(StringArray::from((0..k).map(|j| format!("s{j}")).collect::<Vec<_>>())),
                arc(StringArray::from(te[..k].iter().map(|r| r.0.clone()).collect::<Vec<_>>())),
                arc(StringArray::from(te[..k].iter().map(|r| r.1.clone()).collect::<Vec<_>>())),
                arc(Int64Array::from(vec![0i64; k])),
                arc(empty_msgs),
                arc(Float32Array::from(te[..k].iter().map(|r| r.2).collect::<Vec<_>>())),
                arc(Int32Array::from(vec![2; k])),
                arc(Int32Array::from(vec![2; k])),
            ],
            eval_writer_properties(),
        )
        .unwrap();
        let cfg = Config { bootstrap: 20, mf: MfGrid { factors: vec![2], reg: vec![0.05], epochs: 5, ..MfGrid::default() }, ..Config::default() };
        let mut inputs = std::collections::BTreeMap::new();
        for (n, p) in [("train", ptr), ("valid", pva), ("test", pte), ("samples", psm)] {
            inputs.insert(n.to_string(), vec![p]);
        }
        let mut ctx = StageCtx::for_test("baselines", dir.path(), inputs, Baselines::outputs(&cfg));
        Baselines::run(&cfg, &mut ctx).unwrap();
        let m: serde_json::Value = serde_json::from_slice(&std::fs::read(ctx.output("metrics").unwrap()).unwrap()).unwrap();
        assert_eq!(m["stage"], "baselines", "pinned: top-level stage");
        let methods = m["methods"].as_array().expect("pinned: methods list");
        assert_eq!(methods.len(), 3);
        for f in ["method", "n", "rmse", "mae", "invalid_rate", "rmse_valid", "mae_valid", "exact", "fallback", "rmse_ci95"] {
            assert!(methods[0].get(f).is_some(), "pinned per-method field `{f}` present");
        }
        assert_eq!(methods[0]["n"], k, "exactly the sample ids are scored");
        let preds = crate::report::io::Table::read(&ctx.output("predictions").unwrap()).unwrap();
        assert_eq!(preds.num_rows(), 3 * k, "one prediction per sample and method");
        assert_eq!(preds.strings("sample_id").unwrap()[..k], ["s0", "s1", "s2"], "sample ids carried through");
    }
}
