//! The configuration loader's file and directory handling: the input describes a small tree —
//! nested directories, `.yaml`/`.yml` files and others, empty files, symlinks (to files, to
//! directories, dangling, to a parent) — written to a fresh directory and loaded as `drover run`
//! and `drover validate` load their `--config` paths. Must never panic or loop; every problem
//! names a file inside the tree.
#![no_main]

use std::path::{Path, PathBuf};

use drover::{
    config::{self, source::ConfigSet},
    registry::{Client, Registry},
};
use libfuzzer_sys::fuzz_target;

/// One entry: an op byte, a name (until NUL), content (until the 0xFF separator).
fn entries(data: &[u8]) -> impl Iterator<Item = (u8, String, &[u8])> {
    data.split(|&b| b == 0xff).filter_map(|rec| {
        let (&op, rest) = rec.split_first()?;
        let (name, content) = match rest.iter().position(|&b| b == 0) {
            Some(i) => (&rest[..i], &rest[i + 1..]),
            None => (rest, &[][..]),
        };
        let name: String = String::from_utf8_lossy(name)
            .chars()
            .filter(|c| c.is_ascii_alphanumeric() || *c == '-')
            .take(16)
            .collect();
        Some((op, if name.is_empty() { "x".into() } else { name }, content))
    })
}

fuzz_target!(|data: &[u8]| {
    let root = std::env::temp_dir().join(format!("drover-fuzz-tree-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(&root).expect("root");
    let mut dirs = vec![root.clone()];
    let mut made: Vec<PathBuf> = Vec::new();
    for (i, (op, name, content)) in entries(data).take(32).enumerate() {
        let dir = dirs[i % dirs.len()].clone();
        let path = match op % 8 {
            0 => {
                let d = dir.join(&name);
                if std::fs::create_dir_all(&d).is_ok() && d.components().count() < 40 {
                    dirs.push(d.clone());
                }
                d
            }
            1 => write(&dir.join(format!("{name}.yaml")), content),
            2 => write(&dir.join(format!("{name}.yml")), content),
            3 => write(&dir.join(format!("{name}.txt")), content),
            4 => write(&dir.join(format!("{name}.yaml")), b""),
            5 => link(made.last().unwrap_or(&root), &dir.join(format!("{name}.yaml"))),
            6 => link(&dir.join("missing"), &dir.join(format!("{name}.yaml"))),
            _ => link(&dir, &dir.join(&name)),
        };
        made.push(path);
    }
    for paths in [vec![root.clone()], made.iter().take(3).cloned().collect()] {
        if paths.is_empty() {
            continue;
        }
        match ConfigSet::load_all(&paths) {
            Ok((set, problems)) => {
                for p in &problems {
                    assert!(p.location.file.starts_with(&root), "{p}");
                }
                let _ = Registry::build(&set, &Client::default());
            }
            Err(config::Error::Read { path, .. } | config::Error::TooLarge { path, .. }) => {
                assert!(path.starts_with(&root), "{}", path.display());
            }
            Err(config::Error::Invalid(problems)) => {
                for p in &problems {
                    assert!(p.location.file.starts_with(&root), "{p}");
                }
            }
        }
    }
    let _ = std::fs::remove_dir_all(&root);
});

fn write(path: &Path, content: &[u8]) -> PathBuf {
    let _ = std::fs::write(path, content);
    path.to_path_buf()
}

fn link(target: &Path, at: &Path) -> PathBuf {
    let _ = std::os::unix::fs::symlink(target, at);
    at.to_path_buf()
}
