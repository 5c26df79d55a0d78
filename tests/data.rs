//! Data stages end to end: the real public samples (figures of
//! ../shared/data/README.md), per-format fixtures written here, k-core,
//! splits, the leakage proof and byte-identical outputs.
use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};

use recflow::data::history::HistoryIndex;
use recflow::data::prompts::{PromptBuilder, PromptOptions};
use recflow::data::{io, synthetic, Interaction};
use recflow::stages::{filter::Filter, ingest::Ingest, prompts::Prompts, split::Split, Metrics, Stage, StageCtx};
use serde_json::{json, Value};

/// Runs a stage in-process in `root`; returns its metrics and output dir.
fn run<S: Stage>(root: &Path, cfg: Value, inputs: &[(&str, &Path)]) -> anyhow::Result<(Metrics, PathBuf)> {
    let cfg: S::Config = serde_json::from_value(cfg)?;
    S::validate(&cfg).map_err(anyhow::Error::msg)?;
    let inputs: BTreeMap<String, Vec<PathBuf>> = inputs
        .iter()
        .map(|(n, p)| (n.to_string(), vec![p.to_path_buf()]))
        .collect();
    std::fs::create_dir_all(root)?;
    let mut ctx = StageCtx::for_test("t", root, inputs, S::outputs(&cfg));
    let m = S::run(&cfg, &mut ctx)?;
    Ok((m, ctx.out_dir.clone()))
}

fn report(out: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(out.join("report.json")).unwrap()).unwrap()
}

fn template() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("stages/think_before_rec.md")
}

fn gz(path: &Path, text: &str) {
    let f = std::fs::File::create(path).unwrap();
    let mut e = flate2::write::GzEncoder::new(f, flate2::Compression::default());
    e.write_all(text.as_bytes()).unwrap();
    e.finish().unwrap();
}

// ------------------------------------------------------------- real samples

struct Expect {
    file: &'static str,
    format: &'static str,
    raw: u64,
    pairs: u64,
    users: u64,
    items: u64,
    repeat_pairs: u64,
    extra: u64,
    missing_text: u64,
    hist: [u64; 5],
    kcore: [u64; 3],
}

const REAL: [Expect; 3] = [
    Expect {
        file: "amazon_musical_instruments/reviews_Musical_Instruments_5.partial.json.gz",
        format: "amazon2014",
        raw: 5050,
        pairs: 5050,
        users: 1381,
        items: 392,
        repeat_pairs: 0,
        extra: 0,
        missing_text: 2,
        hist: [98, 101, 355, 1039, 3457],
        kcore: [4886, 4296, 0],
    },
    Expect {
        file: "amazon_fashion/AMAZON_FASHION_5.json.gz",
        format: "amazon2018",
        raw: 3176,
        pairs: 3042,
        users: 406,
        items: 31,
        repeat_pairs: 81,
        extra: 134,
        missing_text: 16,
        hist: [117, 93, 337, 471, 2158],
        kcore: [3028, 2977, 2962],
    },
    Expect {
        file: "yelp_sample/yelp_academic_dataset_review.head.json.gz",
        format: "yelp",
        raw: 3610,
        pairs: 3609,
        users: 3494,
        items: 2219,
        repeat_pairs: 1,
        extra: 1,
        missing_text: 0,
        hist: [442, 320, 432, 924, 1492],
        kcore: [0, 0, 0],
    },
];

#[test]
fn real_samples_match_the_published_figures() {
    let Some(data) = recflow::util::shared_data_dir() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    for (n, e) in REAL.iter().enumerate() {
        let root = tmp.path().join(format!("r{n}"));
        let (m, out) = run::<Ingest>(
            &root.join("ingest"),
            json!({"format": e.format, "reviews": data.join(e.file)}),
            &[],
        )
        .unwrap();
        let r = report(&out);
        let f = e.file;
        assert_eq!(r["raw_records"], e.raw, "{f}: raw records");
        assert_eq!(r["bad_records"], 0, "{f}: the public samples have no bad record");
        assert_eq!(r["distinct_pairs"], e.pairs, "{f}: distinct user-item pairs");
        assert_eq!(r["kept"], e.pairs, "{f}: duplicates resolved to one row per pair");
        assert_eq!(
            (r["users"].clone(), r["items"].clone()),
            (json!(e.users), json!(e.items)),
            "{f}: users, items"
        );
        assert_eq!(
            r["duplicates"]["pairs_with_repeats"], e.repeat_pairs,
            "{f}: pairs with repeats"
        );
        assert_eq!(r["duplicates"]["extra_records"], e.extra, "{f}: extra records");
        assert_eq!(r["missing_text"], e.missing_text, "{f}: records without review text");
        let hist: Vec<u64> = ["1", "2", "3", "4", "5"]
            .iter()
            .map(|k| r["rating_histogram"][k].as_u64().unwrap_or(0))
            .collect();
        assert_eq!(hist, e.hist, "{f}: rating histogram 1..5");
        assert_eq!(m["kept"], e.pairs, "{f}: metrics carry the kept count");
        let rows = io::read_interactions(&out.join("interactions.parquet")).unwrap();
        assert_eq!(rows.len() as u64, e.pairs, "{f}: Parquet rows = distinct pairs");
        assert_eq!(
            rows.iter().filter(|x| x.review_text.is_none()).count() as u64,
            e.missing_text.min(e.pairs),
            "{f}: null review text in Parquet (none of the missing-text records is a dropped repeat)"
        );
        assert_eq!(
            io::read_items(&out.join("items.parquet")).unwrap().len() as u64,
            e.items,
            "{f}: one item row per item"
        );

        for (k, want) in [2usize, 3, 5].iter().zip(e.kcore) {
            let res = run::<Filter>(
                &root.join(format!("k{k}")),
                json!({"k_core": k}),
                &[
                    ("interactions", &out.join("interactions.parquet")),
                    ("items", &out.join("items.parquet")),
                ],
            );
            match res {
                Ok((m, _)) => assert_eq!(m["interactions_after"], want, "{f}: {k}-core pairs"),
                Err(err) => {
                    assert_eq!(want, 0, "{f}: {k}-core must not fail: {err:#}");
                    let msg = format!("{err:#}");
                    assert!(
                        msg.contains("left no interactions") && msg.contains("removed"),
                        "{f}: empty k-core explains itself: {msg}"
                    );
                }
            }
        }
    }
}

/// MovieLens-100K as RecBole ships it (`format: recbole`), fetched by
/// scripts/setup.sh into datasets/ml-100k: its published figures, the item
/// table from `ml-100k.item`, the dataset folder read like the two files,
/// and a leave-last split with real second-level timestamps.
#[test]
fn ml100k_recbole_atomic_files_match_the_published_figures() {
    let dir = recflow::util::ml100k_dir();
    assert!(
        dir.join("ml-100k.inter").is_file() && dir.join("ml-100k.item").is_file(),
        "MovieLens-100K not at {}: run scripts/setup.sh (it extracts it from PyPI's recbole==1.2.1)",
        dir.display()
    );
    let tmp = tempfile::tempdir().unwrap();
    let files = json!({"format": "recbole", "reviews": dir.join("ml-100k.inter"), "meta": dir.join("ml-100k.item")});
    let (m, out) = run::<Ingest>(&tmp.path().join("files"), files, &[]).unwrap();
    let r = report(&out);
    assert_eq!(
        (r["raw_records"].clone(), r["bad_records"].clone(), r["kept"].clone()),
        (json!(100_000), json!(0), json!(100_000)),
        "100,000 ratings, none bad, no repeated pair (the header is not a record)"
    );
    assert_eq!((r["users"].clone(), r["items"].clone()), (json!(943), json!(1682)), "943 users, 1,682 movies");
    let hist: Vec<u64> = ["1", "2", "3", "4", "5"].iter().map(|k| r["rating_histogram"][k].as_u64().unwrap_or(0)).collect();
    assert_eq!(hist, [6110, 11370, 27145, 34174, 21201], "rating histogram 1..5");
    assert_eq!(r["items_with_metadata"], 1682, "every movie has its .item row");
    assert_eq!(r["files"][1]["role"], "meta");
    assert_eq!(r["files"][1]["raw_records"], 1682, "the .item header is not a record");
    assert_eq!(m["kept"], 100_000);
    let items = io::read_items(&out.join("items.parquet")).unwrap();
    let toy = items.iter().find(|i| i.item_id == "1").unwrap();
    assert_eq!(toy.title.as_deref(), Some("Toy Story (1995)"), "title + release year, as MovieLens spells it");
    assert_eq!(
        toy.categories.as_deref(),
        Some(&["Animation".to_string(), "Children's".into(), "Comedy".into()][..]),
        "RecBole's token_seq genres"
    );
    let rows = io::read_interactions(&out.join("interactions.parquet")).unwrap();
    let first = rows.iter().find(|x| x.user_id == "196" && x.item_id == "242").unwrap();
    assert_eq!((first.rating, first.timestamp), (3.0, 881_250_949), "the first .inter line, seconds kept");

    // A RecBole dataset folder: NAME.inter and NAME.item found; same bytes.
    let (_, out_dir) = run::<Ingest>(&tmp.path().join("dir"), json!({"format": "recbole", "reviews": dir}), &[]).unwrap();
    for f in ["interactions.parquet", "items.parquet", "report.json"] {
        assert_eq!(std::fs::read(out.join(f)).unwrap(), std::fs::read(out_dir.join(f)).unwrap(), "{f}: folder = files");
    }

    // Leave-last on real second-level times: few ties at the end of a history.
    let inter = out.join("interactions.parquet");
    let (m, _) = run::<Split>(&tmp.path().join("s"), json!({}), &[("interactions", &inter)]).unwrap();
    assert_eq!(m["test_users"], 943, "every user has ≥ 20 ratings, so each holds one out");
    assert!(m["tie_users"].as_u64().unwrap() < 943 / 2, "ties are a minority: {}", m["tie_users"]);
}

/// Bad `.inter` / `.item` records follow the rules of every format: counted
/// under a reason with `file:line`, `on_error: fail` stops at the first, a
/// header without types or roles fails naming the file and the fix.
#[test]
fn recbole_bad_records_and_headers() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let mut text = String::from("user_id:token\titem_id:token\trating:float\ttimestamp:float\n");
    for k in 0..200 {
        text.push_str(&format!("u{}\ti{k}\t4\t{}\n", k % 7, 1000 + k));
    }
    for b in ["u1\ti1\t4", "u1\ti2\tfour\t5", "u1\ti3\t9\t5", "u1\ti4\t4\tmonday", "\ti5\t4\t5"] {
        text.push_str(b);
        text.push('\n');
    }
    std::fs::write(d.join("x.inter"), &text).unwrap();
    std::fs::write(d.join("x.item"), "item_id:token\ttitle:token_seq\ni0\n").unwrap();
    std::fs::write(d.join("y.item"), "item_id:token\ttitle:token_seq\nnope\ni0\tA film\n").unwrap();
    let cfg = json!({"format": "recbole", "reviews": d.join("x.inter"), "meta": d.join("y.item"), "max_bad_fraction": 0.5});
    let (_, out) = run::<Ingest>(&d.join("skip"), cfg.clone(), &[]).unwrap();
    let r = report(&out);
    assert_eq!((r["raw_records"].clone(), r["bad_records"].clone(), r["kept"].clone()), (json!(205), json!(5), json!(200)));
    let drops = &r["files"][0]["drops"];
    for (reason, line) in [
        ("malformed", 202),
        ("mistyped_rating", 203),
        ("rating_out_of_range", 204),
        ("bad_timestamp", 205),
        ("missing_user_id", 206),
    ] {
        assert_eq!(drops[reason]["count"], 1, "reason {reason} counted: {drops}");
        let ex = drops[reason]["examples"][0].as_str().unwrap();
        assert!(ex.starts_with(&format!("x.inter:{line}:")), "first example names file:line (header = line 1): {ex}");
    }
    assert_eq!(r["files"][1]["drops"]["malformed"]["examples"][0].as_str().unwrap().split(':').take(2).collect::<Vec<_>>(), ["y.item", "2"]);
    assert_eq!(r["items_with_metadata"], 1);

    let mut fail = cfg.clone();
    fail["on_error"] = json!("fail");
    let err = format!("{:#}", run::<Ingest>(&d.join("fail"), fail, &[]).unwrap_err());
    assert!(err.contains("x.inter:202") && err.contains("malformed"), "on_error: fail names the first bad line: {err}");

    std::fs::write(d.join("z.inter"), "user_id\titem_id\trating\ttimestamp\nu\ti\t4\t5\n").unwrap();
    let err = format!("{:#}", run::<Ingest>(&d.join("h"), json!({"format": "recbole", "reviews": d.join("z.inter")}), &[]).unwrap_err());
    assert!(err.contains("z.inter:1") && err.contains("typed header"), "an untyped header says what RecBole expects: {err}");
    std::fs::write(d.join("w.inter"), "user_id:token\tbook:token\trating:float\ttimestamp:float\nu\ti\t4\t5\n").unwrap();
    let err = format!("{:#}", run::<Ingest>(&d.join("w"), json!({"format": "recbole", "reviews": d.join("w.inter")}), &[]).unwrap_err());
    assert!(err.contains("no item column") && err.contains("recbole: {item: COLUMN}"), "a missing role names the field to set: {err}");
    let ok = json!({"format": "recbole", "reviews": d.join("w.inter"), "recbole": {"item": "book"}});
    let (m, _) = run::<Ingest>(&d.join("w2"), ok, &[]).unwrap();
    assert_eq!(m["kept"], 1, "the role named in with.recbole is used");
    let err = format!("{:#}", run::<Ingest>(&d.join("x"), json!({"format": "recbole", "reviews": d.join("x.inter"), "meta": d.join("x.item"), "max_bad_fraction": 0.5}), &[]).unwrap_err());
    assert!(err.contains("x.item") && err.contains("max_bad_fraction"), "a broken .item counts against its own file: {err}");
    let err = format!("{:#}", run::<Ingest>(&d.join("v"), json!({"format": "yelp", "reviews": d.join("x.inter"), "recbole": {"item": "b"}}), &[]).unwrap_err());
    assert!(err.contains("format `recbole` only"), "{err}");
}

#[test]
fn fashion_leave_last_with_ties() {
    let Some(data) = recflow::util::shared_data_dir() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let (_, out) = run::<Ingest>(
        &tmp.path().join("i"),
        json!({"format": "amazon2018", "reviews": data.join(REAL[1].file)}),
        &[],
    )
    .unwrap();
    let inter = out.join("interactions.parquet");
    let (m, sp) = run::<Split>(&tmp.path().join("s"), json!({}), &[("interactions", &inter)]).unwrap();
    // 401 of the 406 users end on a tie in the raw records; after keeping the
    // latest record per pair, 396 users' last two interactions share a day,
    // 382 of the 388 users with ≥ 3 interactions (those leave_last holds out).
    assert_eq!(
        m["tie_users"], 382,
        "ties at the end of Fashion histories are resolved by the pinned rule"
    );
    let (train, valid, test) = (
        io::read_interactions(&sp.join("train.parquet")).unwrap(),
        io::read_interactions(&sp.join("valid.parquet")).unwrap(),
        io::read_interactions(&sp.join("test.parquet")).unwrap(),
    );
    assert_eq!(train.len() + valid.len() + test.len(), 3042, "a split is a partition");
    let key = |x: &Interaction| (x.timestamp, x.item_id.clone());
    let mut last: HashMap<&str, (i64, String)> = HashMap::new();
    for x in train.iter().chain(&valid) {
        let e = last.entry(&x.user_id).or_insert((i64::MIN, String::new()));
        if key(x) > *e {
            *e = key(x);
        }
    }
    for t in &test {
        if let Some(prev) = last.get(t.user_id.as_str()) {
            assert!(
                key(t) > *prev,
                "no test interaction precedes (timestamp, item_id) a train/valid one of its user"
            );
        }
    }
    for v in &valid {
        let t = test
            .iter()
            .find(|t| t.user_id == v.user_id)
            .expect("a valid user has a test row");
        assert!(key(v) < key(t), "valid precedes test");
    }
}

// ------------------------------------------------------------------ formats

#[test]
fn formats_from_fixtures() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    // Amazon 2014 reviews + Python-dict metadata (gz).
    std::fs::write(
        d.join("r14.json"),
        "{\"reviewerID\":\"u1\",\"asin\":\"A1\",\"overall\":5.0,\"reviewText\":\"great\",\"summary\":\"s\",\"unixReviewTime\":100}\n\
         {\"reviewerID\":\"u2\",\"asin\":\"A2\",\"overall\":3.0,\"reviewText\":\"ok\",\"summary\":\"s\",\"unixReviewTime\":200}\n",
    )
    .unwrap();
    gz(&d.join("meta14.json.gz"), "{'asin': 'A1', 'title': \"Bob's Tutu\", 'categories': [['Music', 'Jazz']], 'price': 3.5}\n{'asin': 'ZZ', 'title': 'unused'}\n");
    let (_, out) = run::<Ingest>(
        &d.join("a14"),
        json!({"format": "amazon2014", "reviews": d.join("r14.json"), "meta": d.join("meta14.json.gz")}),
        &[],
    )
    .unwrap();
    let items = io::read_items(&out.join("items.parquet")).unwrap();
    assert_eq!(items.len(), 2, "one row per reviewed item");
    assert_eq!(
        items[0].title.as_deref(),
        Some("Bob's Tutu"),
        "dict-literal metadata joined"
    );
    assert_eq!(
        items[1].title, None,
        "no metadata: null title (prompts fall back to the id)"
    );
    assert_eq!(
        report(&out)["meta_unused"],
        1,
        "metadata of unreviewed items is counted"
    );

    // Amazon 2018, pretty-printed concatenated objects.
    std::fs::write(
        d.join("r18.json"),
        "{\n  \"reviewerID\": \"u1\",\n  \"asin\": \"B1\",\n  \"overall\": 4.0,\n  \"style\": {\"Size:\": \" L\"},\n  \"unixReviewTime\": 10\n}\n{\n  \"reviewerID\": \"u1\", \"asin\": \"B2\", \"overall\": 2.0, \"unixReviewTime\": 11\n}\n",
    )
    .unwrap();
    let (_, out) = run::<Ingest>(
        &d.join("a18"),
        json!({"format": "amazon2018", "reviews": d.join("r18.json")}),
        &[],
    )
    .unwrap();
    assert_eq!(report(&out)["kept"], 2, "pretty-printed objects are read");

    // Amazon 2023 with metadata.
    std::fs::write(d.join("r23.jsonl"), "{\"user_id\":\"u\",\"asin\":\"c\",\"parent_asin\":\"P\",\"rating\":4.0,\"title\":\"t\",\"text\":\"x\",\"timestamp\":1588615855070}\n").unwrap();
    std::fs::write(d.join("m23.jsonl"), "{\"parent_asin\":\"P\",\"title\":\"Thing\",\"main_category\":\"Music\",\"categories\":[],\"description\":[\"d\"],\"price\":null,\"store\":\"S\"}\n").unwrap();
    let (_, out) = run::<Ingest>(
        &d.join("a23"),
        json!({"format": "amazon2023", "reviews": d.join("r23.jsonl"), "meta": d.join("m23.jsonl")}),
        &[],
    )
    .unwrap();
    let rows = io::read_interactions(&out.join("interactions.parquet")).unwrap();
    assert_eq!(
        (rows[0].item_id.as_str(), rows[0].timestamp),
        ("P", 1588615855),
        "2023: parent_asin, ms → s"
    );
    assert_eq!(
        io::read_items(&out.join("items.parquet")).unwrap()[0].brand.as_deref(),
        Some("S")
    );

    // Yelp with business.json.
    std::fs::write(
        d.join("yr.json"),
        "{\"user_id\":\"u\",\"business_id\":\"b\",\"stars\":4,\"text\":\"t\",\"date\":\"2014-10-11 03:34:02\"}\n",
    )
    .unwrap();
    std::fs::write(
        d.join("yb.json"),
        "{\"business_id\":\"b\",\"name\":\"Cafe\",\"categories\":\"Food, Coffee\",\"city\":\"Boston\"}\n",
    )
    .unwrap();
    let (_, out) = run::<Ingest>(
        &d.join("y"),
        json!({"format": "yelp", "reviews": d.join("yr.json"), "business": d.join("yb.json")}),
        &[],
    )
    .unwrap();
    let yi = &io::read_items(&out.join("items.parquet")).unwrap()[0];
    assert_eq!(
        (yi.title.as_deref(), yi.categories.clone(), yi.description.as_deref()),
        (
            Some("Cafe"),
            Some(vec!["Food".to_string(), "Coffee".to_string()]),
            Some("Located in Boston")
        ),
        "business.json: name → title, \"A, B\" categories → list, city → description"
    );
    assert_eq!(
        io::read_interactions(&out.join("interactions.parquet")).unwrap()[0].timestamp,
        1_412_998_442,
        "Yelp dates are UTC"
    );

    // MovieLens 100K and 1M.
    std::fs::write(d.join("u.data"), "1\t10\t3\t881250949\n2\t10\t5\t881250950\n").unwrap();
    std::fs::write(
        d.join("u.item"),
        b"10|Caf\xe9 (1995)|01-Jan-1995||http://x|0|0|0|0|0|1|0|0|0|0|0|0|0|0|0|0|0|0|0\n",
    )
    .unwrap();
    let (_, out) = run::<Ingest>(
        &d.join("ml"),
        json!({"format": "movielens", "reviews": d.join("u.data"), "meta": d.join("u.item")}),
        &[],
    )
    .unwrap();
    let it = io::read_items(&out.join("items.parquet")).unwrap();
    assert_eq!(
        (it[0].title.as_deref(), it[0].categories.clone()),
        (Some("Café (1995)"), Some(vec!["Comedy".to_string()])),
        "100K items, Latin-1"
    );
    std::fs::write(d.join("ratings.dat"), "1::1193::5::978300760\n").unwrap();
    std::fs::write(d.join("movies.dat"), "1193::One Flew (1975)::Drama\n").unwrap();
    let (_, out) = run::<Ingest>(
        &d.join("ml1m"),
        json!({"format": "movielens", "reviews": d.join("ratings.dat"), "meta": d.join("movies.dat")}),
        &[],
    )
    .unwrap();
    assert_eq!(report(&out)["kept"], 1, "1M ratings read");
    let it = io::read_items(&out.join("items.parquet")).unwrap();
    assert_eq!(
        (it[0].item_id.as_str(), it[0].title.as_deref(), it[0].categories.clone()),
        ("1193", Some("One Flew (1975)"), Some(vec!["Drama".to_string()])),
        "1M movies.dat joined"
    );
}

fn good(k: usize) -> String {
    format!("{{\"reviewerID\":\"u{}\",\"asin\":\"a{}\",\"overall\":4.0,\"reviewText\":\"text {k}\",\"unixReviewTime\":{}}}\n", k % 7, k, 1000 + k)
}

#[test]
fn bad_lines_are_counted_with_file_and_line() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let mut text = String::new();
    for k in 0..200 {
        text.push_str(&good(k));
    }
    let bad = [
        "{\"reviewerID\":\"u\",\"asin\":\"x\",\"overall\":4.0", // malformed
        "[1, 2]",                                               // not an object
        "{\"asin\":\"x\",\"overall\":4.0,\"unixReviewTime\":1}", // missing user
        "{\"reviewerID\":\"u\",\"asin\":\"x\",\"overall\":\"4\",\"unixReviewTime\":1}", // mistyped rating
        "{\"reviewerID\":\"u\",\"asin\":\"x\",\"overall\":7.0,\"unixReviewTime\":1}", // out of range
        "{\"reviewerID\":\"u\",\"asin\":\"x\",\"overall\":4.0,\"reviewTime\":\"yesterday\"}", // bad timestamp
    ];
    for b in bad {
        text.push_str(b);
        text.push('\n');
    }
    let mut bytes = text.into_bytes();
    bytes.extend_from_slice(b"{\"reviewerID\":\"\xff\",\"asin\":\"x\",\"overall\":4.0,\"unixReviewTime\":1}\n"); // encoding
    std::fs::write(d.join("bad.json"), &bytes).unwrap();
    let cfg = json!({"format": "amazon2014", "reviews": d.join("bad.json"), "max_bad_fraction": 0.05});
    let (_, out) = run::<Ingest>(&d.join("skip"), cfg.clone(), &[]).unwrap();
    let r = report(&out);
    assert_eq!(
        (r["raw_records"].clone(), r["bad_records"].clone(), r["kept"].clone()),
        (json!(207), json!(7), json!(200))
    );
    let drops = &r["files"][0]["drops"];
    for (reason, line) in [
        ("malformed", 201),
        ("not_an_object", 202),
        ("missing_reviewerID", 203),
        ("mistyped_overall", 204),
        ("rating_out_of_range", 205),
        ("bad_timestamp", 206),
        ("invalid_encoding", 207),
    ] {
        assert_eq!(drops[reason]["count"], 1, "reason {reason} counted: {drops}");
        let ex = drops[reason]["examples"][0].as_str().unwrap();
        assert!(
            ex.starts_with(&format!("bad.json:{line}:")),
            "first example names file:line: {ex}"
        );
    }
    let mut fail = cfg.clone();
    fail["on_error"] = json!("fail");
    let err = format!("{:#}", run::<Ingest>(&d.join("fail"), fail, &[]).unwrap_err());
    assert!(
        err.contains("bad.json:201") && err.contains("malformed"),
        "on_error: fail names the first bad line: {err}"
    );
    let mut strict = cfg;
    strict["max_bad_fraction"] = json!(0.01);
    let err = format!("{:#}", run::<Ingest>(&d.join("strict"), strict, &[]).unwrap_err());
    assert!(
        err.contains("max_bad_fraction") && err.contains("7 of 207"),
        "too many bad records fail clearly: {err}"
    );
}

#[test]
fn truncated_gzip_keeps_complete_records_and_reports_the_cut() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let text: String = (0..3000).map(good).collect();
    gz(&d.join("full.json.gz"), &text);
    let bytes = std::fs::read(d.join("full.json.gz")).unwrap();
    std::fs::write(d.join("cut.json.gz"), &bytes[..bytes.len() * 2 / 3]).unwrap();
    let (_, out) = run::<Ingest>(
        &d.join("c"),
        json!({"format": "amazon2014", "reviews": d.join("cut.json.gz")}),
        &[],
    )
    .unwrap();
    let r = report(&out);
    let cut = &r["files"][0]["truncated"];
    assert!(cut.is_object(), "the cut is reported: {r}");
    let after = cut["after_line"].as_u64().unwrap();
    assert!(after > 1000 && after < 3000, "most complete lines survive: {after}");
    let kept = r["kept"].as_u64().unwrap();
    assert!(
        kept + 1 >= after && kept <= after,
        "every complete record before the cut is kept: kept {kept}, cut after {after}"
    );
    assert_eq!(r["files"][0]["drops"]["truncated_input"]["count"], 1);
    let err = run::<Ingest>(
        &d.join("f"),
        json!({"format": "amazon2014", "reviews": d.join("cut.json.gz"), "on_error": "fail"}),
        &[],
    );
    assert!(
        format!("{:#}", err.unwrap_err()).contains("truncated_input"),
        "on_error: fail stops at the cut"
    );
}

#[test]
fn identical_inputs_give_byte_identical_outputs() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let mut text: String = (0..500).map(good).collect();
    text.push_str(&good(3)); // a repeat → second pass
    std::fs::write(d.join("r.json"), text).unwrap();
    let cfg = json!({"format": "amazon2014", "reviews": d.join("r.json")});
    let (_, a) = run::<Ingest>(&d.join("a"), cfg.clone(), &[]).unwrap();
    let (_, b) = run::<Ingest>(&d.join("b"), cfg, &[]).unwrap();
    for f in ["interactions.parquet", "items.parquet", "report.json"] {
        assert_eq!(
            std::fs::read(a.join(f)).unwrap(),
            std::fs::read(b.join(f)).unwrap(),
            "{f} is byte-identical across runs"
        );
    }
    assert_eq!(report(&a)["duplicates"]["extra_records"], 1);
    let (_, s1) = run::<Ingest>(&d.join("s1"), json!({"format": "synthetic"}), &[]).unwrap();
    let (_, s2) = run::<Ingest>(&d.join("s2"), json!({"format": "synthetic"}), &[]).unwrap();
    assert_eq!(
        std::fs::read(s1.join("interactions.parquet")).unwrap(),
        std::fs::read(s2.join("interactions.parquet")).unwrap()
    );
}

/// Pass 1 parses on several threads and encodes row groups on several
/// more; everything order-dependent (duplicate resolution by file position,
/// the first examples per drop reason, row-group cuts) must come out as a
/// sequential read gives it.
#[test]
fn outputs_do_not_depend_on_the_thread_count() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    // > 2 row groups and many 1 MiB parse chunks, with bad lines and
    // repeats spread over the whole file.
    let mut text = String::new();
    for k in 0..150_000usize {
        match k % 9973 {
            5 => text.push_str("{\"reviewerID\":\"u\",\"asin\":\"x\",\"overall\":4.0\n"),
            7 => text.push_str("{\"reviewerID\":\"u\",\"asin\":\"x\",\"overall\":9,\"unixReviewTime\":1}\n"),
            _ => text.push_str(&format!(
                "{{\"reviewerID\":\"u{}\",\"asin\":\"a{}\",\"overall\":{}.0,\"summary\":\"s{}\",\"reviewText\":\"text {k} \\u00e9\",\"unixReviewTime\":{}}}\n",
                k % 5000,
                k % 40_000, // the pair repeats every 40,000 lines
                1 + k % 5,
                k % 3,
                1000 + k % 777
            )),
        }
    }
    std::fs::write(d.join("r.json"), text).unwrap();
    let cfg = |t: usize| json!({"format": "amazon2014", "reviews": d.join("r.json"), "threads": t});
    let (_, one) = run::<Ingest>(&d.join("t1"), cfg(1), &[]).unwrap();
    let r = report(&one);
    assert!(
        r["duplicates"]["extra_records"].as_u64().unwrap() > 1000,
        "the fixture has repeats, so pass 2 runs: {}",
        r["duplicates"]
    );
    assert_eq!(r["bad_records"], 32, "16 malformed + 16 out of range");
    let ex = r["files"][0]["drops"]["malformed"]["examples"][0].as_str().unwrap();
    assert!(
        ex.starts_with("r.json:6: invalid JSON: EOF while parsing"),
        "the first example is the first bad line of the file: {ex}"
    );
    let rows = io::read_interactions(&one.join("interactions.parquet")).unwrap();
    assert_eq!(rows.len() as u64, r["kept"].as_u64().unwrap());
    for t in [2, 5] {
        let (_, many) = run::<Ingest>(&d.join(format!("t{t}")), cfg(t), &[]).unwrap();
        for f in ["interactions.parquet", "items.parquet", "report.json"] {
            assert!(
                std::fs::read(one.join(f)).unwrap() == std::fs::read(many.join(f)).unwrap(),
                "{f}: {t} threads give the same bytes as 1"
            );
        }
    }
}

#[test]
fn an_object_left_open_at_the_end_is_reported_not_lost() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    // Pretty-printed objects (concatenated mode), the last one never closed.
    let text = "{\n \"reviewerID\": \"u1\", \"asin\": \"a\",\n \"overall\": 5.0, \"unixReviewTime\": 10\n}\n\
                {\n \"reviewerID\": \"u2\", \"asin\": \"a\",\n \"overall\": 4.0, \"unixReviewTime\": 11\n}\n\
                {\n \"reviewerID\": \"u3\", \"asin\": \"a\",\n";
    std::fs::write(d.join("open.json"), text).unwrap();
    let (_, out) = run::<Ingest>(
        &d.join("o"),
        json!({"format": "amazon2014", "reviews": d.join("open.json"), "max_bad_fraction": 0.5}),
        &[],
    )
    .unwrap();
    let r = report(&out);
    assert_eq!(
        (r["raw_records"].clone(), r["kept"].clone()),
        (json!(3), json!(2)),
        "the open object counts as a record read: {r}"
    );
    let ex = r["files"][0]["drops"]["malformed"]["examples"][0].as_str().unwrap();
    assert!(ex.starts_with("open.json:9:"), "named by the line it starts on: {ex}");
}

// ------------------------------------------------------- synthetic pipeline

#[test]
fn synthetic_pipeline_and_leakage_proof() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let (m, ing) = run::<Ingest>(
        &d.join("i"),
        json!({"format": "synthetic", "synthetic": {"users": 60, "items": 40, "ratings_per_user": 12, "seed": 3}}),
        &[],
    )
    .unwrap();
    assert!(
        m["synthetic_best_rmse"].as_f64().unwrap() < m["synthetic_global_mean_rmse"].as_f64().unwrap(),
        "report records the ceiling"
    );
    // Tag every review with its row so a prompt's evidence can be traced.
    let mut rows = io::read_interactions(&ing.join("interactions.parquet")).unwrap();
    for (k, r) in rows.iter_mut().enumerate() {
        r.review_text = Some(format!("{} <<{k}>>", r.review_text.as_deref().unwrap_or("")));
    }
    let tagged = d.join("tagged.parquet");
    io::write_interactions(&tagged, &rows).unwrap();
    let items = ing.join("items.parquet");
    let (_, sp) = run::<Split>(&d.join("s"), json!({}), &[("interactions", &tagged)]).unwrap();
    let cfg = json!({"template": template(), "max_samples": {"train": 150}, "seed": 5});
    let inputs = |sp: &Path| -> Vec<(&'static str, PathBuf)> {
        vec![
            ("train", sp.join("train.parquet")),
            ("valid", sp.join("valid.parquet")),
            ("test", sp.join("test.parquet")),
            ("items", items.clone()),
            ("interactions", tagged.clone()),
        ]
    };
    let ins = inputs(&sp);
    let ins: Vec<(&str, &Path)> = ins.iter().map(|(n, p)| (*n, p.as_path())).collect();
    let (pm, pr) = run::<Prompts>(&d.join("p"), cfg.clone(), &ins).unwrap();
    assert_eq!(pm["train_samples"], 150, "max_samples caps train");
    let (_, pr2) = run::<Prompts>(&d.join("p2"), cfg, &ins).unwrap();
    assert_eq!(
        std::fs::read(pr.join("train.parquet")).unwrap(),
        std::fs::read(pr2.join("train.parquet")).unwrap(),
        "seeded subset reproduces"
    );

    // Leakage, part 1: every review quoted in a prompt is strictly earlier than the target.
    let mut checked = 0;
    for s in ["train", "valid", "test"] {
        for smp in io::read_samples(&pr.join(format!("{s}.parquet"))).unwrap() {
            let text = &smp.messages[1].content;
            for part in text.split("<<").skip(1) {
                let k: usize = part.split(">>").next().unwrap().parse().unwrap();
                let ev = &rows[k];
                assert!(
                    ev.timestamp < smp.timestamp,
                    "{s} sample {} quotes row {k} at {} ≥ target {}",
                    smp.sample_id,
                    ev.timestamp,
                    smp.timestamp
                );
                assert!(
                    !(ev.user_id == smp.user_id && ev.item_id == smp.item_id),
                    "the target itself is never quoted"
                );
                checked += 1;
            }
            assert!(
                smp.messages[0].content.contains("<rate>"),
                "system prompt asks for the answer format"
            );
        }
    }
    assert!(checked > 1000, "the check saw real evidence: {checked}");

    // Leakage, part 2: perturb the target's rating and everything at or after
    // its time; the prompt must not change by a single byte.
    let items_v = io::read_items(&items).unwrap();
    let builder = PromptBuilder::new(&template(), None, items_v, PromptOptions::default()).unwrap();
    let index = HistoryIndex::new(rows.clone());
    let test = io::read_interactions(&sp.join("test.parquet")).unwrap();
    for t in test.iter().take(25) {
        let a = builder.build(&index, t).unwrap();
        let perturbed: Vec<Interaction> = rows
            .iter()
            .map(|r| {
                let mut r = r.clone();
                if r.timestamp >= t.timestamp {
                    r.rating = 6.0 - r.rating;
                    r.review_text = Some("CHANGED".into());
                }
                r
            })
            .collect();
        let mut t2 = t.clone();
        t2.rating = 6.0 - t.rating;
        let b = builder.build(&HistoryIndex::new(perturbed), &t2).unwrap();
        match (a, b) {
            (Ok(a), Ok(b)) => assert_eq!(
                a.sample.messages, b.sample.messages,
                "prompt for {} depends on the target or later data",
                t.user_id
            ),
            (Err(x), Err(y)) => assert_eq!(x, y),
            _ => panic!("eligibility must not depend on the target or later data"),
        }
    }
}

#[test]
fn synthetic_prompt_carries_signal() {
    // The user's earlier average predicts the target better than the global
    // mean — the quickstart needs a model to be able to beat the mean.
    let g = synthetic::generate(&synthetic::SyntheticConfig::default()).unwrap();
    let idx = HistoryIndex::new(g.interactions.clone());
    let mean = g.interactions.iter().map(|r| r.rating as f64).sum::<f64>() / g.interactions.len() as f64;
    let (mut se_mean, mut se_ev, mut n) = (0.0, 0.0, 0.0);
    for t in &g.interactions {
        let ev = idx.evidence(&t.user_id, &t.item_id, t.timestamp, 0, 0);
        if let (Some(u), Some(i)) = (ev.user_mean, ev.item_mean) {
            if ev.user_count >= 5 && ev.item_count >= 5 {
                let y = t.rating as f64;
                se_mean += (y - mean).powi(2);
                se_ev += (y - (u + i - mean)).powi(2);
                n += 1.0;
            }
        }
    }
    let (rm, re) = ((se_mean / n).sqrt(), (se_ev / n).sqrt());
    assert!(
        re + 0.1 < rm,
        "user + item averages from the prompt beat the global mean: {re:.3} vs {rm:.3}"
    );
}

#[test]
fn stage_defaults_files_parse() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("stages");
    let load =
        |name: &str| -> Value { serde_norway::from_str(&std::fs::read_to_string(root.join(name)).unwrap()).unwrap() };
    let mut v = load("ingest.yaml");
    v["format"] = json!("synthetic");
    serde_json::from_value::<recflow::stages::ingest::Config>(v).expect("stages/ingest.yaml is a valid ingest config");
    serde_json::from_value::<recflow::stages::split::Config>(load("split.yaml"))
        .expect("stages/split.yaml is a valid split config");
    serde_json::from_value::<recflow::stages::prompts::Config>(load("prompts.yaml"))
        .expect("stages/prompts.yaml is a valid prompts config");
}

#[test]
fn data_stages_run_through_the_worker_protocol() {
    // The runner executes built-in stages via exec-stage; the registry must
    // know every data kind and the outputs must land where declared.
    let tmp = tempfile::tempdir().unwrap();
    let reg = recflow::stages::builtin_registry();
    for kind in ["ingest", "filter", "split", "prompts"] {
        assert!(reg.get(kind).is_some(), "builtin_registry() has `{kind}`");
        assert!(
            recflow::stages::meta::find(kind).is_some(),
            "meta::builtin() has `{kind}`"
        );
    }
    let spec =
        |kind: &str, config: Value, inputs: BTreeMap<String, Vec<PathBuf>>, name: &str| recflow::worker::ExecSpec {
            kind: kind.into(),
            stage: name.into(),
            config,
            inputs,
            out_dir: tmp.path().join(name).join("out"),
            work_dir: tmp.path().join(name).join("work"),
            seed: 1,
            device: "cpu".into(),
        };
    let cancel = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let s = spec(
        "ingest",
        json!({"format": "synthetic", "synthetic": {"users": 30, "items": 20, "ratings_per_user": 8}}),
        BTreeMap::new(),
        "ingest",
    );
    recflow::worker::exec(&reg, &s, cancel.clone()).unwrap();
    let m: Value = serde_json::from_slice(&std::fs::read(s.out_dir.join("metrics.json")).unwrap()).unwrap();
    assert!(
        m["kept"].as_u64().unwrap() > 100,
        "metrics.json written with flat scalars: {m}"
    );
    let inter = s.out_dir.join("interactions.parquet");
    let sp = spec(
        "split",
        json!({}),
        BTreeMap::from([("interactions".to_string(), vec![inter])]),
        "split",
    );
    recflow::worker::exec(&reg, &sp, cancel).unwrap();
    for f in ["train.parquet", "valid.parquet", "test.parquet", "metrics.json"] {
        assert!(sp.out_dir.join(f).is_file(), "split wrote {f}");
    }
}
