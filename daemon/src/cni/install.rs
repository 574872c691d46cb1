//! Installs `drover-cni` on a node: the binary copied into the CNI bin directory, and a
//! `drover-cni` entry appended to the primary network's conflist (the first configuration file
//! of the CNI conf directory in lexical order, as container runtimes pick it; a single-plugin
//! `.conf` is converted to a `.conflist`). Uninstall removes the entry and the binary.
//!
//! Invariants: every file is replaced atomically (written beside, under a name no runtime reads,
//! then renamed), so a runtime never reads half a file and a failed write (a full disk) leaves
//! the previous file; a malformed configuration is refused and left as it is; every other
//! plugin's configuration is kept byte for byte in meaning (only the `plugins` list changes);
//! installing twice is installing once.

use std::path::{Path, PathBuf};

use serde_json::{Value, json};

/// The plugin's type (and binary name).
pub const PLUGIN: &str = "drover-cni";
/// Suffix of files being written (no runtime loads it).
const PARTIAL: &str = ".drover-partial";

/// What the plugin's entry says.
#[derive(Clone, Debug)]
pub struct Entry {
    pub socket: PathBuf,
    /// `None`: the plugin's defaults.
    pub exclude_namespaces: Option<Vec<String>>,
}

/// Why an install or uninstall failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {reason}")]
    Io { path: PathBuf, reason: String },
    #[error("{path}: not a CNI configuration: {reason} (left as it is)")]
    Malformed { path: PathBuf, reason: String },
    #[error(
        "{dir}: no CNI network configuration (.conflist, .conf or .json) to chain drover-cni to"
    )]
    NoNetwork { dir: PathBuf },
}

/// What an install changed.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The entry was added to (or refreshed in) this file.
    Written(PathBuf),
    /// The file already had the same entry.
    Unchanged(PathBuf),
}

fn io(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::Io {
        path: path.to_path_buf(),
        reason: e.to_string(),
    }
}

/// `drover-cni` beside the running executable (where the image and `cargo build` put it).
pub fn beside_this_executable() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(|d| d.join(PLUGIN)))
        .unwrap_or_else(|| PathBuf::from(PLUGIN))
}

/// Keeps the plugin chained in `conf_dir` until `shutdown`: checked every 2 s, re-added when the
/// network's own plugin (or an operator) rewrote the file.
pub async fn keep_chained(
    conf_dir: PathBuf,
    entry: Entry,
    shutdown: tokio_util::sync::CancellationToken,
) {
    let mut last_error = String::new();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(std::time::Duration::from_secs(2)) => {}
        }
        match chain(&conf_dir, &entry) {
            Ok(Outcome::Written(p)) => {
                tracing::warn!(file = %p.display(), "drover-cni was missing from the network configuration; chained again");
                last_error.clear();
            }
            Ok(Outcome::Unchanged(_)) => last_error.clear(),
            Err(e) if e.to_string() != last_error => {
                tracing::error!(error = %e, "cannot keep drover-cni chained; new pods are not captured");
                last_error = e.to_string();
            }
            Err(_) => {}
        }
    }
}

/// Copies `binary` to `bin_dir/drover-cni` (atomically) and chains the plugin to the primary
/// network of `conf_dir`.
pub fn install(
    binary: &Path,
    bin_dir: &Path,
    conf_dir: &Path,
    entry: &Entry,
) -> Result<Outcome, Error> {
    let target = bin_dir.join(PLUGIN);
    let partial = bin_dir.join(format!(".{PLUGIN}{PARTIAL}"));
    std::fs::copy(binary, &partial).map_err(|e| io(&partial, e))?;
    std::fs::rename(&partial, &target).map_err(|e| io(&target, e))?;
    chain(conf_dir, entry)
}

/// Adds (or refreshes) the plugin's entry in the primary network's configuration.
pub fn chain(conf_dir: &Path, entry: &Entry) -> Result<Outcome, Error> {
    let path = primary(conf_dir)?;
    let text = std::fs::read_to_string(&path).map_err(|e| io(&path, e))?;
    let conf: Value = serde_json::from_str(&text).map_err(|e| Error::Malformed {
        path: path.clone(),
        reason: e.to_string(),
    })?;
    let mut list = as_conflist(conf).map_err(|reason| Error::Malformed {
        path: path.clone(),
        reason,
    })?;
    let mut wanted = json!({"type": PLUGIN, "socket": entry.socket});
    if let Some(ex) = &entry.exclude_namespaces {
        wanted["excludeNamespaces"] = ex.clone().into();
    }
    let plugins = list["plugins"]
        .as_array_mut()
        .expect("checked by as_conflist");
    let existing = plugins.iter().position(|p| p["type"] == PLUGIN);
    let is_conflist = path.extension().is_some_and(|e| e == "conflist");
    match existing {
        Some(i) if plugins[i] == wanted && is_conflist => return Ok(Outcome::Unchanged(path)),
        Some(i) => plugins[i] = wanted,
        None => plugins.push(wanted),
    }
    let out = path.with_extension("conflist");
    write(&out, &list)?;
    if out != path {
        std::fs::remove_file(&path).map_err(|e| io(&path, e))?;
    }
    Ok(Outcome::Written(out))
}

/// Removes the plugin's entry from every configuration of `conf_dir` that has one, and the
/// binary from `bin_dir`; the files it changed.
pub fn uninstall(bin_dir: &Path, conf_dir: &Path) -> Result<Vec<PathBuf>, Error> {
    let mut changed = Vec::new();
    for path in configs(conf_dir)? {
        let Ok(text) = std::fs::read_to_string(&path) else {
            continue;
        };
        let Ok(mut conf) = serde_json::from_str::<Value>(&text) else {
            continue;
        };
        let Some(plugins) = conf["plugins"].as_array_mut() else {
            continue;
        };
        let before = plugins.len();
        plugins.retain(|p| p["type"] != PLUGIN);
        if plugins.len() != before {
            write(&path, &conf)?;
            changed.push(path);
        }
    }
    let binary = bin_dir.join(PLUGIN);
    match std::fs::remove_file(&binary) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io(&binary, e)),
    }
    Ok(changed)
}

/// The network configuration files of `dir`, in the order runtimes consider them.
fn configs(dir: &Path) -> Result<Vec<PathBuf>, Error> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| io(dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.is_file()
                && p.extension()
                    .is_some_and(|e| e == "conflist" || e == "conf" || e == "json")
        })
        .collect();
    files.sort();
    Ok(files)
}

/// The primary network's configuration: the first file.
fn primary(dir: &Path) -> Result<PathBuf, Error> {
    configs(dir)?
        .into_iter()
        .next()
        .ok_or_else(|| Error::NoNetwork {
            dir: dir.to_path_buf(),
        })
}

/// `conf` as a conflist: a `.conf` (one plugin) becomes a list of that one plugin.
fn as_conflist(conf: Value) -> Result<Value, String> {
    let Value::Object(mut map) = conf else {
        return Err("not a JSON object".into());
    };
    if map.get("plugins").is_some() {
        if !map["plugins"].is_array() {
            return Err("\"plugins\" is not a list".into());
        }
        return Ok(Value::Object(map));
    }
    if !map.get("type").is_some_and(Value::is_string) {
        return Err("neither \"plugins\" nor \"type\"".into());
    }
    let mut list = serde_json::Map::new();
    for key in ["cniVersion", "name"] {
        if let Some(v) = map.remove(key) {
            list.insert(key.into(), v);
        }
    }
    list.insert("plugins".into(), json!([Value::Object(map)]));
    Ok(Value::Object(list))
}

/// Replaces `path` with `value` (pretty JSON) atomically.
fn write(path: &Path, value: &Value) -> Result<(), Error> {
    let partial = path.with_file_name(format!(
        ".{}{PARTIAL}",
        path.file_name().unwrap_or_default().to_string_lossy()
    ));
    let mut text = serde_json::to_string_pretty(value).map_err(|e| io(path, e))?;
    text.push('\n');
    if let Err(e) = std::fs::write(&partial, text) {
        let _ = std::fs::remove_file(&partial);
        return Err(io(path, e));
    }
    std::fs::rename(&partial, path).map_err(|e| io(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("drover-install-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(d.join("bin")).unwrap();
        std::fs::create_dir_all(d.join("net.d")).unwrap();
        d
    }

    fn entry() -> Entry {
        Entry {
            socket: "/var/run/drover/cni.sock".into(),
            exclude_namespaces: None,
        }
    }

    const BRIDGE: &str = r#"{"cniVersion":"0.4.0","name":"k8s","plugins":[{"type":"bridge","bridge":"cni0","ipam":{"type":"host-local"}},{"type":"portmap","capabilities":{"portMappings":true}}]}"#;

    #[test]
    fn chains_after_the_primary_networks_plugins_once_and_uninstalls() {
        let d = dir("chain");
        let conf = d.join("net.d");
        std::fs::write(conf.join("10-k8s.conflist"), BRIDGE).unwrap();
        std::fs::write(conf.join("99-other.conflist"), BRIDGE).unwrap();
        let bin = d.join("bin/src");
        std::fs::write(&bin, b"binary").unwrap();
        let out = install(&bin, &d.join("bin"), &conf, &entry()).unwrap();
        let primary = conf.join("10-k8s.conflist");
        assert_eq!(out, Outcome::Written(primary.clone()));
        assert_eq!(std::fs::read(d.join("bin/drover-cni")).unwrap(), b"binary");
        let v: Value = serde_json::from_str(&std::fs::read_to_string(&primary).unwrap()).unwrap();
        assert_eq!(v["plugins"][0]["bridge"], "cni0", "kept");
        assert_eq!(v["plugins"][1]["type"], "portmap", "kept, in order");
        assert_eq!(v["plugins"][2]["type"], PLUGIN);
        assert_eq!(v["plugins"][2]["socket"], "/var/run/drover/cni.sock");
        // Only the primary network; twice is once.
        assert_eq!(
            std::fs::read_to_string(conf.join("99-other.conflist")).unwrap(),
            BRIDGE
        );
        assert_eq!(
            chain(&conf, &entry()).unwrap(),
            Outcome::Unchanged(primary.clone())
        );
        // No partial file is left for a runtime to read.
        let names: Vec<_> = std::fs::read_dir(&conf).unwrap().collect();
        assert_eq!(names.len(), 2);
        let changed = uninstall(&d.join("bin"), &conf).unwrap();
        assert_eq!(changed, std::slice::from_ref(&primary));
        let v: Value = serde_json::from_str(&std::fs::read_to_string(&primary).unwrap()).unwrap();
        let orig: Value = serde_json::from_str(BRIDGE).unwrap();
        assert_eq!(v, orig, "back to what it was");
        assert!(!d.join("bin/drover-cni").exists());
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn a_single_plugin_conf_becomes_a_conflist() {
        let d = dir("conf");
        let conf = d.join("net.d");
        std::fs::write(
            conf.join("10-bridge.conf"),
            r#"{"cniVersion":"0.3.1","name":"br","type":"bridge","bridge":"cni0"}"#,
        )
        .unwrap();
        let out = chain(&conf, &entry()).unwrap();
        assert_eq!(out, Outcome::Written(conf.join("10-bridge.conflist")));
        assert!(!conf.join("10-bridge.conf").exists());
        let v: Value = serde_json::from_str(
            &std::fs::read_to_string(conf.join("10-bridge.conflist")).unwrap(),
        )
        .unwrap();
        assert_eq!(v["name"], "br");
        assert_eq!(v["cniVersion"], "0.3.1");
        assert_eq!(v["plugins"][0]["type"], "bridge");
        assert!(v["plugins"][0].get("name").is_none());
        assert_eq!(v["plugins"][1]["type"], PLUGIN);
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn malformed_or_missing_configurations_are_refused_and_left_alone() {
        let d = dir("bad");
        let conf = d.join("net.d");
        let e = chain(&conf, &entry()).unwrap_err();
        assert!(
            e.to_string().contains("no CNI network configuration"),
            "{e}"
        );
        std::fs::write(conf.join("10-k8s.conflist"), "{\"plugins\": {").unwrap();
        let e = chain(&conf, &entry()).unwrap_err();
        assert!(
            e.to_string().contains("10-k8s.conflist") && e.to_string().contains("left as it is"),
            "{e}"
        );
        assert_eq!(
            std::fs::read_to_string(conf.join("10-k8s.conflist")).unwrap(),
            "{\"plugins\": {"
        );
        let _ = std::fs::remove_dir_all(&d);
    }
}
