//! Where the remote is: `recflow.toml`'s `[remote]` table as the user wrote
//! it ([`RemoteConfig`]), and the checked settings ([`RemoteSpec`]), with
//! `RECFLOW_REMOTE` over the file's `url`. Parsing makes no request; every
//! error names the setting, its value and what to write instead.
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use super::RemoteError;

/// The environment variable naming the remote (over `[remote] url`);
/// `off` or an empty value turns a configured remote off for one command.
pub const REMOTE_ENV: &str = "RECFLOW_REMOTE";

/// `[remote]` in `recflow.toml`, as written.
///
/// ```toml
/// [remote]
/// url = "s3://lab-bucket/recflow"     # or file:///mnt/shared/recflow-remote
/// endpoint = "https://s3.lab.example" # S3-compatible service (else AWS_ENDPOINT_URL, else AWS)
/// region = "us-east-1"                # else AWS_REGION / AWS_DEFAULT_REGION, else us-east-1
/// lease_s = 60                        # lease lifetime; renewed every lease_s / 3
/// jobs = 8                            # parallel transfers (push/pull --jobs overrides)
/// ```
/// No credentials here: they come from the environment or the AWS
/// credential chain only.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RemoteConfig {
    pub url: String,
    #[serde(default)]
    pub endpoint: Option<String>,
    #[serde(default)]
    pub region: Option<String>,
    #[serde(default)]
    pub lease_s: Option<f64>,
    #[serde(default)]
    pub jobs: Option<usize>,
}

/// Where a remote lives.
#[derive(Debug, Clone, PartialEq)]
pub enum Location {
    /// `s3://BUCKET[/PREFIX]`.
    S3 { bucket: String, prefix: String },
    /// `file:///ABSOLUTE/PATH`: a directory (a shared file system).
    File { dir: PathBuf },
}

/// Checked remote settings.
#[derive(Debug, Clone, PartialEq)]
pub struct RemoteSpec {
    pub url: String,
    pub location: Location,
    /// S3 endpoint URL (`http://` allows plain HTTP); None: AWS_ENDPOINT_URL or AWS.
    pub endpoint: Option<String>,
    pub region: Option<String>,
    /// A lease's lifetime without renewal.
    pub lease: Duration,
    /// Parallel transfers.
    pub jobs: usize,
    /// Where the url came from, for messages: `recflow.toml [remote] url` or `RECFLOW_REMOTE`.
    pub source: String,
}

pub const DEFAULT_LEASE_S: f64 = 60.0;
pub const DEFAULT_JOBS: usize = 8;

impl RemoteSpec {
    /// The project's remote: `RECFLOW_REMOTE` (if set) over `[remote] url`
    /// of `ROOT/recflow.toml`; None when neither names one.
    pub fn from_project(root: &Path) -> Result<Option<RemoteSpec>, RemoteError> {
        let cfg = crate::config::ProjectConfig::load(root).map_err(|e| RemoteError::Config(e.to_string()))?;
        let file = crate::config::config_path(root);
        let env = std::env::var(REMOTE_ENV).ok();
        Self::resolve(cfg.remote.as_ref(), env.as_deref(), &file)
    }

    /// `file_cfg` from `recflow.toml` (at `file`), `env` the value of `RECFLOW_REMOTE`.
    pub fn resolve(file_cfg: Option<&RemoteConfig>, env: Option<&str>, file: &Path) -> Result<Option<RemoteSpec>, RemoteError> {
        let field = |k: &str| format!("{} [remote] {k}", file.display());
        let (url, source) = match env.map(str::trim) {
            Some("") | Some("off") | Some("none") => return Ok(None),
            Some(u) => (u.to_string(), REMOTE_ENV.to_string()),
            None => match file_cfg {
                Some(c) => (c.url.trim().to_string(), field("url")),
                None => return Ok(None),
            },
        };
        let location = parse_url(&url).map_err(|why| RemoteError::Config(format!("{source} = \"{url}\": {why}")))?;
        let cfg = file_cfg.cloned().unwrap_or(RemoteConfig { url: url.clone(), endpoint: None, region: None, lease_s: None, jobs: None });
        if let Some(ep) = &cfg.endpoint {
            check_endpoint(ep).map_err(|why| RemoteError::Config(format!("{} = \"{ep}\": {why}", field("endpoint"))))?;
        } else if let Ok(ep) = std::env::var("AWS_ENDPOINT_URL") {
            check_endpoint(&ep).map_err(|why| RemoteError::Config(format!("AWS_ENDPOINT_URL = \"{ep}\": {why}")))?;
        }
        let lease_s = cfg.lease_s.unwrap_or(DEFAULT_LEASE_S);
        if !(lease_s.is_finite() && (0.5..=86400.0).contains(&lease_s)) {
            return Err(RemoteError::Config(format!(
                "{} = {lease_s}: a lease lives between 0.5 and 86400 seconds (default {DEFAULT_LEASE_S})",
                field("lease_s")
            )));
        }
        let jobs = cfg.jobs.unwrap_or(DEFAULT_JOBS);
        if !(1..=256).contains(&jobs) {
            return Err(RemoteError::Config(format!("{} = {jobs}: between 1 and 256 parallel transfers", field("jobs"))));
        }
        if let (Location::File { .. }, Some(_)) = (&location, &cfg.endpoint) {
            return Err(RemoteError::Config(format!("{}: an endpoint applies to s3:// remotes only (url is {url})", field("endpoint"))));
        }
        Ok(Some(RemoteSpec {
            url,
            location,
            endpoint: cfg.endpoint.clone().or_else(|| std::env::var("AWS_ENDPOINT_URL").ok()),
            region: cfg.region.clone(),
            lease: Duration::from_secs_f64(lease_s),
            jobs,
            source,
        }))
    }
}

const SUPPORTED: &str = "supported: s3://BUCKET[/PREFIX] (S3 or an S3-compatible service) and file:///ABSOLUTE/PATH (a shared directory)";

/// Parses a remote URL; the error says what is wrong and what is accepted.
pub fn parse_url(url: &str) -> Result<Location, String> {
    let Some((scheme, rest)) = url.split_once("://") else {
        return Err(format!("not a URL (no scheme); {SUPPORTED}"));
    };
    match scheme {
        "s3" | "s3a" => {
            let rest = rest.trim_end_matches('/');
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            if bucket.is_empty() {
                return Err("the bucket name is empty: write s3://BUCKET[/PREFIX]".into());
            }
            // S3's bucket naming rules (3-63 of a-z 0-9 . -, starting and ending alphanumeric).
            let ok_chars = bucket.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '.' || c == '-');
            let ends = bucket.chars().next().is_some_and(|c| c.is_ascii_alphanumeric()) && bucket.chars().last().is_some_and(|c| c.is_ascii_alphanumeric());
            if !(3..=63).contains(&bucket.len()) || !ok_chars || !ends {
                return Err(format!(
                    "`{bucket}` is not a valid bucket name (3 to 63 characters of a-z, 0-9, `.` and `-`, starting and ending with a letter or digit)"
                ));
            }
            if prefix.split('/').any(|p| p.is_empty() || p == "." || p == "..") && !prefix.is_empty() {
                return Err(format!("the prefix `{prefix}` has an empty, `.` or `..` part"));
            }
            Ok(Location::S3 { bucket: bucket.to_string(), prefix: prefix.to_string() })
        }
        "file" => {
            if !rest.starts_with('/') {
                return Err("a file:// remote needs an absolute path: file:///ABSOLUTE/PATH (three slashes)".into());
            }
            let dir = crate::pipeline::normalize(Path::new(rest));
            if !dir.is_dir() {
                return Err(format!(
                    "the directory {} does not exist: create it (`mkdir -p {}`) or fix the path",
                    dir.display(),
                    dir.display()
                ));
            }
            Ok(Location::File { dir })
        }
        other => Err(format!("unknown scheme `{other}`; {SUPPORTED}")),
    }
}

/// An endpoint is `http[s]://HOST[:PORT][/…]`.
fn check_endpoint(ep: &str) -> Result<(), String> {
    let rest = ep.strip_prefix("https://").or_else(|| ep.strip_prefix("http://"));
    match rest {
        Some(r) if !r.is_empty() && !r.starts_with('/') && !r.starts_with(':') => {
            let host_port = r.split('/').next().unwrap_or("");
            if let Some((_, port)) = host_port.rsplit_once(':') {
                if !host_port.ends_with(']') && port.parse::<u16>().is_err() {
                    return Err(format!("`{port}` is not a port number"));
                }
            }
            Ok(())
        }
        _ => Err("not an endpoint URL: write http://HOST:PORT or https://HOST".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(url: &str) -> RemoteConfig {
        RemoteConfig { url: url.into(), endpoint: None, region: None, lease_s: None, jobs: None }
    }

    #[test]
    fn urls_parse_or_name_what_is_wrong() {
        assert_eq!(
            parse_url("s3://lab-bucket/runs/recflow/").unwrap(),
            Location::S3 { bucket: "lab-bucket".into(), prefix: "runs/recflow".into() },
            "bucket and prefix, trailing slash dropped"
        );
        assert_eq!(parse_url("s3://lab-bucket").unwrap(), Location::S3 { bucket: "lab-bucket".into(), prefix: String::new() });
        assert!(parse_url("ftp://x/y").unwrap_err().contains("unknown scheme `ftp`"), "unknown scheme is named");
        assert!(parse_url("lab-bucket/x").unwrap_err().contains("no scheme"), "a bare path is refused");
        assert!(parse_url("s3://Lab_Bucket").unwrap_err().contains("not a valid bucket name"), "bucket rules checked");
        assert!(parse_url("s3:///x").unwrap_err().contains("bucket name is empty"));
        assert!(parse_url("s3://bucket/a//b").unwrap_err().contains("empty"), "an empty prefix part is refused");
        assert!(parse_url("file://relative/dir").unwrap_err().contains("absolute path"), "file:// needs three slashes");
        assert!(parse_url("file:///no/such/dir/for/recflow").unwrap_err().contains("does not exist"), "a missing directory is named");
        let d = tempfile::tempdir().unwrap();
        let u = format!("file://{}", d.path().display());
        assert_eq!(parse_url(&u).unwrap(), Location::File { dir: d.path().to_path_buf() });
    }

    #[test]
    fn env_overrides_the_file_and_errors_name_the_field() {
        let f = Path::new("/p/recflow.toml");
        assert_eq!(RemoteSpec::resolve(None, None, f).unwrap(), None, "nothing configured: no remote");
        let s = RemoteSpec::resolve(Some(&cfg("s3://from-file")), Some("s3://from-env/x"), f).unwrap().unwrap();
        assert_eq!(s.location, Location::S3 { bucket: "from-env".into(), prefix: "x".into() }, "RECFLOW_REMOTE wins");
        assert_eq!(s.source, REMOTE_ENV);
        assert_eq!(RemoteSpec::resolve(Some(&cfg("s3://from-file")), Some("off"), f).unwrap(), None, "off turns it off");
        let e = RemoteSpec::resolve(Some(&cfg("gs://b")), None, f).unwrap_err().to_string();
        assert!(e.contains("/p/recflow.toml [remote] url = \"gs://b\"") && e.contains("unknown scheme `gs`"), "{e}");
        let mut c = cfg("s3://bucket");
        c.endpoint = Some("localhost:9000".into());
        let e = RemoteSpec::resolve(Some(&c), None, f).unwrap_err().to_string();
        assert!(e.contains("[remote] endpoint = \"localhost:9000\"") && e.contains("http://HOST:PORT"), "{e}");
        let mut c = cfg("s3://bucket");
        c.lease_s = Some(0.0);
        assert!(RemoteSpec::resolve(Some(&c), None, f).unwrap_err().to_string().contains("lease_s = 0"));
    }
}
