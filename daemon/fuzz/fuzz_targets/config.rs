//! YAML text → resources → validated policy and resolved registry: must never panic, whatever
//! the input.
#![no_main]

use std::{path::PathBuf, sync::Arc};

use drover::{
    config::source::ConfigSet,
    registry::{Client, Registry},
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let mut set = ConfigSet::default();
    let mut problems = Vec::new();
    set.add_text(Arc::new(PathBuf::from("fuzz.yaml")), &text, &mut problems);
    for p in &problems {
        // Rendering a problem exercises the locator too.
        let _ = p.to_string();
    }
    if let Ok(registry) = Registry::build(&set, &Client::default()) {
        for (vip, _) in registry.vips() {
            let _ = registry.route(vip, None);
        }
    }
});
